"""The download stage: options, the per-thread sessions, and the GET of one item."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import requests
from urllib3.util.retry import Retry as _Urllib3Retry

from pipeline import ConfigError, Context, Item, Overloaded, TransientError, factory

from .._options import (
    FieldName,
    Flag,
    NonNegativeInt,
    PositiveInt,
    PositiveSeconds,
    Rate,
    Seconds,
    checked_options,
)
from ._deadline import _Attempt, _current, _Watchdog, _WatchedAdapter
from ._errors import (
    DownloadError,
    _past_deadline,
    _redact,
    _retry_after_seconds,
    _status_text,
    _translate,
)
from ._gate import _HostGate, _HostRates, _origin
from ._hosts import AllowedHosts, HostList, _HostCheck
from ._session import _GuardedSession, _Sessions

DEFAULT_DEADLINE = 300.0
"""Seconds an attempt may take when neither ``deadline`` nor the stage's ``timeout`` is set."""

log = logging.getLogger("stages.http")

DEFAULT_USER_AGENT = f"pipeline-download/0.1 python-requests/{requests.__version__}"
"""The ``User-Agent`` sent unless the stage sets ``user_agent``."""

# The body is read in pieces this large: on 600 KB images, 1 MiB pieces cost ~0.4 ms less CPU
# per download than 64 KiB ones (fewer trips through requests' and urllib3's generators; measured
# single-threaded on loopback), and a body over max_bytes is refused at most this far past it.
_CHUNK = 1024 * 1024
# Error answers up to this size are read to the end so their connection goes back to the pool;
# larger ones are dropped with their connection.
_DRAIN_LIMIT = 64 * 1024


def _drain(response: requests.Response) -> None:
    """Read a small error body to its end, so the connection is reused rather than dropped."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) <= _DRAIN_LIMIT:
        with contextlib.suppress(requests.RequestException):
            response.content  # noqa: B018 - reading it is the point


@factory
@checked_options  # the engine checks a run's options; this checks a direct call's, once
@contextlib.asynccontextmanager
async def download(
    ctx: Context,
    *,
    url_field: FieldName = "url",
    connect_timeout: PositiveSeconds = 5.0,
    read_timeout: PositiveSeconds = 30.0,
    max_bytes: PositiveInt = 50_000_000,
    allowed_hosts: AllowedHosts | None = None,
    denied_hosts: HostList | None = None,
    deny_private: Flag = False,
    max_redirects: NonNegativeInt = 5,
    max_retry_after: Seconds = 300.0,
    headers: dict[str, str] | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
    trust_env: Flag = True,
    rate_per_host: Rate | None = None,
    deadline: PositiveSeconds | None = None,
) -> AsyncIterator[Callable[[Item], Item]]:
    """Download ``item[url_field]``; a blocking stage, run in the engine's thread pool.

    Adds to the item: ``body`` (bytes), ``content_type`` (the media type, lower case, without
    parameters; ``""`` if absent), ``http_status``, ``bytes`` (``len(body)``) and ``sha256``
    (hex digest of ``body``). The body is stored as received (after any ``Content-Encoding``
    is undone); checking that it is an image is the image stage's job.

    Each worker thread has its own ``requests.Session``, whose pool holds up to the stage's
    cap (``ctx.limiter.total``) connections, so keep-alive connections are reused and never
    discarded as "pool full". urllib3 does not retry: the engine does, per the stage's
    ``retry`` policy. All sessions are closed when the stage closes.

    Args:
        ctx: The engine's context.
        url_field: The item field holding the URL.
        connect_timeout: Seconds to wait for a connection.
        read_timeout: Seconds to wait for each read from the socket (not for the whole
            answer: ``deadline`` bounds that).
        max_bytes: Largest body accepted; a larger one fails the item for good.
        allowed_hosts: If given, only these hosts (and the targets of their redirects) are
            fetched; ``"*.example.com"`` allows any subdomain of ``example.com``.
        denied_hosts: These hosts are never fetched, nor redirected to; same forms as
            ``allowed_hosts`` (``"*.example.com"`` is the subdomains, not ``example.com``
            itself). Checked before ``allowed_hosts``.
        deny_private: Refuse loopback, private (10/8, 172.16/12, 192.168/16, 100.64/10,
            fc00::/7), link-local (169.254/16 with the cloud metadata address, fe80::/10),
            unspecified, multicast and reserved addresses: an IP written in the URL, or any
            one address its host name resolves to, and the address each connection actually
            reached (so a name that resolves differently the second time, DNS rebinding, is
            refused before a byte is sent). IPv6 forms carrying an IPv4 address (IPv4-mapped,
            6to4, NAT64) are judged by that address; Teredo and local-use NAT64 are refused.
            Set it when the URLs come from users. A name that does not resolve is a transient
            failure. Through a proxy the connected peer is the proxy: it is not checked.
        max_redirects: Redirects followed before the item fails.
        max_retry_after: The longest ``Retry-After`` honoured, in seconds; longer asks are cut
            to this. A 429 or 503 with ``Retry-After`` pauses its origin (scheme, host, port),
            not the stage: other hosts go on. A request for a paused origin waits in its slot
            if the pause ends before its deadline, else fails transiently at once and is
            retried under the stage's ``retry`` policy.
        headers: Extra request headers; they override ``user_agent``. They are dropped when
            a redirect leaves the first URL's host (or port, or scheme), as requests drops
            ``Authorization``.
        user_agent: The ``User-Agent`` header.
        trust_env: Take proxies and ``.netrc`` credentials from the environment, as
            ``requests`` does by default.
        rate_per_host: At most this many requests per period to any one host, for example
            ``"10/s"`` (the ``COUNT/UNIT`` of a stage's ``rate``; the burst is capped at 0.1 s
            worth). A host is the URL's host name, whatever the port: ``localhost`` and
            ``127.0.0.1`` are two hosts. Every request counts, redirect hops included, each
            against its own host. The wait happens in the worker thread, holding its slot and
            counting towards the deadline: a long run of URLs on one host can hold
            every slot while other hosts wait, so mix hosts in the source's order.
        deadline: Seconds one call may take in all (connecting, headers, body, redirects and
            waits), enforced by a watchdog thread that closes the connection when it passes,
            so the call returns on its own thread however slowly the server trickles. By
            default the stage's ``timeout`` less a tenth (at most 1 s), so the stage's own
            error, not the engine's timeout, reports it and the slot is free when the engine
            moves on; :data:`DEFAULT_DEADLINE` if the stage has no timeout. It may not exceed
            the stage's ``timeout``. Name resolution is not covered (it cannot be interrupted).

    Yields:
        ``fetch(item) -> item``, a plain function.

    Raises:
        ConfigError: On a direct call, an option is out of range (also a ``ValueError``); in a
            run the engine refuses it when the stage is defined, before anything runs. Also
            when ``deadline`` is longer than the stage's ``timeout``.
    """
    if deadline is None:
        deadline = DEFAULT_DEADLINE if ctx.timeout is None else ctx.timeout - min(1.0, ctx.timeout / 10)
    elif ctx.timeout is not None and deadline > ctx.timeout:
        raise ConfigError(
            f"stage {ctx.stage!r}: deadline must be at most the stage's timeout ({ctx.timeout:g}s), "
            f"got {deadline!r}; past the timeout the engine gives up on the call anyway, and its "
            "thread would hold the slot until the deadline. Lower deadline, or leave it out"
        )
    limit = deadline
    # Each download in flight may come to hold max_bytes: count that against memory_budget.
    ctx.weighs(lambda item: max_bytes)
    rates = None if rate_per_host is None else _HostRates(asyncio.get_running_loop(), rate_per_host)
    check = _HostCheck(allowed_hosts, denied_hosts, deny_private)
    gate = _HostGate()
    watchdog = _Watchdog()
    pool_size = ctx.max_concurrency
    request_headers = {"User-Agent": user_agent, **(headers or {})}
    private_headers = tuple(name for name in headers or {} if name.lower() != "user-agent")
    timeout = (connect_timeout, read_timeout)

    def make_session() -> requests.Session:
        session = _GuardedSession(check, gate, rates, private_headers)
        session.max_redirects = max_redirects
        session.trust_env = trust_env
        session.headers.update(request_headers)
        # total=0, read=False: urllib3 never retries or re-sends on its own; the engine does.
        adapter = _WatchedAdapter(
            pool_maxsize=pool_size, max_retries=_Urllib3Retry(total=0, read=False, redirect=False)
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    sessions = _Sessions(make_session)

    def fetch(item: Item) -> Item:
        """Download one item's URL and return the item with the body and its facts added."""
        url = item.get(url_field)
        if not isinstance(url, str) or not url.strip():
            raise DownloadError(
                f"field {url_field!r} must hold a URL string, got {url!r}; fix the source row "
                "or set the stage's url_field option"
            )
        url = url.strip()
        shown = _redact(url)
        prepared = check.prepare(url, what="URL")
        attempt = _Attempt(shown, limit, check)
        watchdog.watch(attempt)
        _current.attempt = attempt
        try:
            facts = _get(sessions.get(), prepared, shown)
            if attempt.expired:  # a body read to its close may end "cleanly" when the watchdog cuts it
                raise _past_deadline(shown, limit)
            return {**item, **facts}
        except requests.RequestException as exc:
            if attempt.expired:
                raise _past_deadline(shown, limit) from exc
            raise _translate(exc, url, connect_timeout=connect_timeout, read_timeout=read_timeout) from exc
        finally:
            _current.attempt = None
            attempt.finish()

    def _get(session: requests.Session, url: str, shown: str) -> Item:
        """The GET itself: the body and its facts, or the error its answer calls for."""
        response = session.get(url, timeout=timeout, stream=True)
        with response:
            status = response.status_code
            if status >= 300:
                _drain(response)
                _raise_for_status(response, shown, max_retry_after, gate)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise DownloadError(
                    f"GET {shown} announces {int(length)} bytes, larger than max_bytes={max_bytes}; "
                    "raise max_bytes or skip this URL",
                    url=shown,
                    status=status,
                )
            digest = hashlib.sha256()
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(
                        f"GET {shown} sent more than {max_bytes} bytes, larger than "
                        f"max_bytes={max_bytes}; raise max_bytes or skip this URL",
                        url=shown,
                        status=status,
                    )
                digest.update(chunk)
                chunks.append(chunk)
            content_type = response.headers.get("Content-Type", "")
        body = b"".join(chunks)
        return {
            "body": body,
            "content_type": content_type.split(";", 1)[0].strip().lower(),
            "http_status": status,
            "bytes": size,
            "sha256": digest.hexdigest(),
        }

    try:
        yield fetch
    finally:
        gate.close()
        if rates is not None:
            rates.close()
        watchdog.close()
        sessions.close()


def _raise_for_status(
    response: requests.Response, shown: str, max_retry_after: float, gate: _HostGate
) -> None:
    """Raise the right error for an answer that is not 2xx (redirects are already followed)."""
    status = response.status_code
    said = _status_text(response)
    if status in (429, 503):
        raw = response.headers.get("Retry-After")
        delay = _retry_after_seconds(raw, time.time())
        if delay is not None:
            delay = min(delay, max_retry_after)
            origin = _origin(response.url)
            gate.pause(origin, delay)
            log.info("host %s paused for %.1fs by its Retry-After (GET %s)", origin, delay, shown)
            raise Overloaded(
                f"GET {shown} answered {said} with Retry-After {raw!r}; pausing host {origin} "
                f"for {delay:g}s (other hosts go on)"
            )
        raise Overloaded(f"GET {shown} answered {said}")  # a loss signal for adaptive limits
    if status >= 500:
        raise TransientError(f"GET {shown} answered {said}")
    if 300 <= status < 400:
        raise DownloadError(
            f"GET {shown} answered {said} without a usable Location; fix the URL", url=shown, status=status
        )
    raise DownloadError(
        f"GET {shown} answered {said}; the URL is wrong or gone, fix or drop it", url=shown, status=status
    )
