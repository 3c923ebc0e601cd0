"""HTTP stages: :func:`download` fetches ``item["url"]`` with ``requests``, in the thread pool.

The public names live here; the modules behind them, bottom up (each imports only those above
it)::

    _errors     DownloadError, the requests-error boundary (_translate), _redact(), status text,
                Retry-After parsing
    _hosts      the scheme and host rules (_HostCheck), allowed_hosts/denied_hosts option types,
                deny_private's address judgement and resolver
    _gate       per-host pacing: rate_per_host (_HostRates) and Retry-After pauses (_HostGate)
    _deadline   the attempt deadline: _Attempt, the watchdog thread, the watched connections,
                pools and adapter
    _session    _GuardedSession (the rules, pauses and rates on every hop), one per thread
    _download   the download stage and the GET of one item

Errors are sorted at one boundary (``_translate`` and the status checks in ``fetch``):

* connection errors, timeouts, truncated bodies, 5xx and 429 raise
  :class:`~pipeline.TransientError` (chained), which the engine retries;
* 429 or 503 with a usable ``Retry-After`` pause that origin (scheme, host and port) in the
  stage's per-host gate and raise :class:`~pipeline.Overloaded`: other hosts go on, and a retry
  for the paused host waits out the pause (or fails at once, transiently, if the pause outlasts
  its deadline). The engine's stage-wide :class:`~pipeline.RetryAfter` is not used;
* an attempt still running at its ``deadline`` has its connection closed by a watchdog thread
  and raises :class:`~pipeline.TransientError`: a server trickling its headers or body a byte at
  a time cannot hold a slot past the deadline;
* everything else (a bad or ambiguous URL, one refused by ``allowed_hosts``, ``denied_hosts`` or
  ``deny_private``, another 4xx, a body over ``max_bytes``, too many
  redirects, a TLS failure) raises :class:`DownloadError`, which fails the item for good.

Host rules are applied to each request as requests will send it (the prepared URL, every hop),
never to a parse that disagrees with the connection; with ``deny_private`` the address actually
connected is checked too, before a byte is sent on it.

URLs in messages never carry userinfo (``user:password@``).
"""

from ._download import DEFAULT_DEADLINE, DEFAULT_USER_AGENT, download
from ._errors import DownloadError

__all__ = ["DEFAULT_DEADLINE", "DEFAULT_USER_AGENT", "DownloadError", "download"]

# Show the stage as stages.http's (in reprs and engine messages), not as the private module that
# happens to define it; DownloadError says so itself.
download.__module__ = __name__
