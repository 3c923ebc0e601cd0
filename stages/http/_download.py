"""HTTP stages: :func:`download` fetches ``item["url"]`` with ``requests``, in the thread pool.

Errors are sorted at one boundary (:func:`_translate` and the status checks in ``fetch``):

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

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import hashlib
import heapq
import http
import ipaddress
import itertools
import logging
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import aiolimiter
import idna
import pydantic
import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.connectionpool
from urllib3.util.retry import Retry as _Urllib3Retry

from pipeline import (
    ConfigError,
    Context,
    Item,
    Overloaded,
    TransientError,
    factory,
    parse_rate,
)

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

__all__ = ["DEFAULT_DEADLINE", "DEFAULT_USER_AGENT", "DownloadError", "download"]

DEFAULT_DEADLINE = 300.0
"""Seconds an attempt may take when neither ``deadline`` nor the stage's ``timeout`` is set."""

log = logging.getLogger("stages.http")

DEFAULT_USER_AGENT = f"pipeline-download/0.1 python-requests/{requests.__version__}"
"""The ``User-Agent`` sent unless the stage sets ``user_agent``."""

_CHUNK = 64 * 1024
# Error answers up to this size are read to the end so their connection goes back to the pool;
# larger ones are dropped with their connection.
_DRAIN_LIMIT = 64 * 1024
_SCHEMES = ("http", "https")


class DownloadError(Exception):
    """The download failed in a way a retry will not fix; the item is dead-lettered.

    Attributes:
        url: The URL, without userinfo.
        status: The HTTP status, when the server answered.
    """

    def __init__(self, message: str, *, url: str = "", status: int | None = None):
        self.url = url
        self.status = status
        super().__init__(message)


def _redact(url: str) -> str:
    """Return ``url`` without its userinfo (``user:password@``), for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        sent = urllib3.util.parse_url(url)
    except ValueError:
        return "<unparsable URL>"
    if (parts.hostname or "") != (sent.host or "").strip("[]").lower():
        # An ambiguous URL (a backslash before "@"): show it as requests would send it.
        return sent._replace(auth=None).url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds asked for by a ``Retry-After`` value (delta-seconds or an HTTP date).

    Returns ``None`` when the value is missing or unusable; a date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; a zoneless one is not an HTTP date
    return max(0.0, when.timestamp() - now)


def _status_text(response: requests.Response) -> str:
    try:
        phrase = http.HTTPStatus(response.status_code).phrase
    except ValueError:
        phrase = response.reason or ""
    return f"{response.status_code} {phrase}".rstrip()


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Shared address space (RFC 6598): carrier-grade NAT, and inside some clouds (Alibaba's metadata
# service is 100.100.100.200). ipaddress counts it neither private nor global.
_SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: where the IPv4 sits varies
_TEREDO = ipaddress.ip_network("2001::/32")


def _private_reason(address: IPAddress) -> str | None:
    """What kind of non-public address ``address`` is ("a loopback address"), or ``None`` if public.

    An IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:0:0/96``, 6to4 ``2002::/16``,
    NAT64 ``64:ff9b::/96``) is judged by the IPv4 address it carries; local-use NAT64 and Teredo
    (``2001::/32``), which reach IPv4 hosts through relays this check cannot see, are refused.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded: tuple[str, ipaddress.IPv4Address] | None = None
        if address.ipv4_mapped is not None:
            embedded = ("an IPv4-mapped address", address.ipv4_mapped)
        elif address.sixtofour is not None:
            embedded = ("a 6to4 address", address.sixtofour)
        elif address in _NAT64:
            embedded = ("a NAT64 address", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        elif address in _LOCAL_NAT64:
            return "a local-use NAT64 address (it may reach any IPv4 host behind the translator)"
        elif address in _TEREDO:
            return "a Teredo address (it reaches IPv4 hosts through a relay)"
        if embedded is not None:
            kind, inner = embedded
            reason = _private_reason(inner)
            return None if reason is None else f"{kind} embedding {inner}, {reason}"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        if address == ipaddress.IPv4Address("169.254.169.254"):
            return "a link-local address (the cloud metadata service)"
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private or address in _SHARED_SPACE:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    return None


def _host_patterns(hosts: list[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact names, and the ``.suffix`` of each ``"*.suffix"`` pattern."""
    cleaned = [h.strip().lower().rstrip(".") for h in hosts]
    return (
        frozenset(h for h in cleaned if not h.startswith("*.")),
        tuple(h[1:] for h in cleaned if h.startswith("*.")),
    )


def _host_list(value: object, info: pydantic.ValidationInfo) -> object:
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"{info.field_name} must be a list of host names, got {value!r}; "
            'write for example ["images.example.com", "*.cdn.example.com"]'
        )
    bad = [h for h in value if not isinstance(h, str) or not h.strip()]
    if bad:
        raise ValueError(
            f"{info.field_name} must hold host names, got {bad[0]!r}; "
            "write each host as a non-empty string, or remove the entry"
        )
    return value


def _not_empty_hosts(value: list[str], info: pydantic.ValidationInfo) -> list[str]:
    if not value:
        raise ValueError(
            f"{info.field_name} is an empty list, which refuses every URL; "
            "list the hosts to allow, or remove the option to allow any host"
        )
    return value


HostList = Annotated[list[str], pydantic.BeforeValidator(_host_list)]
"""Host names, each exact (``"example.com"``) or a ``"*.suffix"`` pattern."""

AllowedHosts = Annotated[HostList, pydantic.AfterValidator(_not_empty_hosts)]
"""A :data:`HostList` that is not empty (an empty allow-list would refuse every URL)."""


class _HostCheck:
    """The scheme and host rules, applied to each request as requests sends it.

    :meth:`prepare` reads a catalog URL as requests will (``PreparedRequest.prepare_url``) and
    refuses one that ``urllib.parse`` reads as another host: ``http://127.0.0.1:8080\\@a.example/``
    is ``a.example`` to urllib but a request to 127.0.0.1. :meth:`rules` then judges the host
    of a prepared URL, the one requests' adapter connects to, for the first URL and every
    redirect hop. With ``deny_private`` a host name is resolved here, and the connection
    resolves it again: :meth:`peer` checks the address actually connected, so a DNS server
    that answers differently the second time (DNS rebinding) is caught once connected, before
    anything is sent.
    """

    def __init__(
        self,
        allowed_hosts: list[str] | None,
        denied_hosts: list[str] | None = None,
        deny_private: bool = False,
        resolve: Callable[[str], list[str]] | None = None,
    ) -> None:
        self._exact: frozenset[str] | None = None
        self._suffixes: tuple[str, ...] = ()
        if allowed_hosts is not None:
            self._exact, self._suffixes = _host_patterns(allowed_hosts)
        self._denied_exact, self._denied_suffixes = _host_patterns(denied_hosts or [])
        self.deny_private = deny_private
        self._resolve = resolve or _resolve

    def __call__(self, url: str, *, what: str) -> None:
        """Check ``url`` as :meth:`prepare` then :meth:`rules` do (for tests and direct use)."""
        self.rules(self.prepare(url, what=what), what=what)

    def prepare(self, url: str, *, what: str) -> str:
        """Return ``url`` as requests will send it, after checking that it is one.

        Raises:
            DownloadError: Not an http(s) URL with a host, or an ambiguous one.
        """
        shown = _redact(url)
        try:
            parts = urllib.parse.urlsplit(url)
            written = (parts.hostname or "").rstrip(".")
        except ValueError as exc:
            raise DownloadError(
                f"{what} {shown!r} is not a valid URL ({exc}); fix the URL", url=shown
            ) from exc
        self._check_scheme(parts.scheme, url, what)
        if not written:
            raise DownloadError(f"{what} {shown!r} has no host; fix the URL", url=shown)
        request = requests.PreparedRequest()
        try:
            request.prepare_url(url, None)
        except (requests.RequestException, ValueError) as exc:
            raise DownloadError(
                f"{what} {shown!r} is not a valid URL ({exc}); fix the URL", url=shown
            ) from exc
        prepared = str(request.url)
        sent = (urllib.parse.urlsplit(prepared).hostname or "").rstrip(".")
        if not written.isascii():
            # The encoding prepare_url uses (IDNA 2008 with UTS 46), so an honest IDN matches.
            with contextlib.suppress(idna.IDNAError):
                written = idna.encode(written, uts46=True).decode("ascii")
        if written.isascii() and written.lower() != sent.lower():
            raise DownloadError(
                f"{what} {shown!r} is ambiguous: it reads as host {written!r}, but requests would "
                f"connect to host {sent!r} (a backslash, or another character URL parsers read "
                "differently, in front of '@'); fix the URL",
                url=shown,
            )
        return prepared

    def rules(self, url: str, *, what: str) -> None:
        """Apply the scheme and host rules to ``url``, a prepared URL, before it is requested.

        The host is read with ``urllib.parse``, exactly as requests' adapter reads it to pick
        the connection.

        Raises:
            DownloadError: The URL is refused.
            TransientError: With ``deny_private``, its host name did not resolve.
        """
        shown = _redact(url)
        try:
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
        except ValueError as exc:
            raise DownloadError(
                f"{what} {shown!r} is not a valid URL ({exc}); fix the URL", url=shown
            ) from exc
        self._check_scheme(parts.scheme, url, what)
        if not host:
            raise DownloadError(f"{what} {shown!r} has no host; fix the URL", url=shown)
        if host in self._denied_exact or (self._denied_suffixes and host.endswith(self._denied_suffixes)):
            raise DownloadError(
                f"{what} {shown!r} is on host {host!r}, which is in denied_hosts; "
                "remove the URL from the catalog, or the host from the stage's denied_hosts",
                url=shown,
            )
        if self._exact is not None and host not in self._exact and not host.endswith(self._suffixes):
            raise DownloadError(
                f"{what} {shown!r} is on host {host!r}, which is not in allowed_hosts; "
                "add it to the stage's allowed_hosts or fix the URL",
                url=shown,
            )
        if self.deny_private:
            self._check_addresses(url, host, what)

    def peer(self, address: str, host: str, shown: str) -> None:
        """With ``deny_private``, refuse a connection to ``host`` that reached ``address``.

        Raises:
            DownloadError: ``address`` is not public.
        """
        if not self.deny_private:
            return
        reason = _private_reason(ipaddress.ip_address(address.partition("%")[0]))
        if reason is not None:
            raise DownloadError(
                f"GET {shown} is refused: the connection to host {host!r} connected to {address!r}, "
                f"{reason}, and deny_private is set (the name resolved to a public address when "
                "checked: DNS rebinding, or a changing DNS answer); remove the URL from the catalog, "
                "or set deny_private = false if the stage must reach internal hosts",
                url=shown,
            )

    @staticmethod
    def _check_scheme(scheme: str, url: str, what: str) -> None:
        if scheme.lower() not in _SCHEMES:
            shown = _redact(url)
            raise DownloadError(
                f"{what} {shown!r} has {scheme or 'no scheme'!r}: only http and https URLs are "
                "downloaded; fix the URL",
                url=shown,
            )

    def _check_addresses(self, url: str, host: str, what: str) -> None:
        shown = _redact(url)
        try:
            addresses = [ipaddress.ip_address(host)]
            literal = True
        except ValueError:
            try:
                resolved = self._resolve(host)
            except OSError as exc:
                # requests would fail to connect the same way; a DNS outage passes, so retry.
                raise TransientError(
                    f"{what} {shown!r}: host {host!r} could not be resolved ({exc}), so deny_private "
                    "cannot check its addresses"
                ) from exc
            addresses = [ipaddress.ip_address(a.partition("%")[0]) for a in resolved]
            literal = False
        for address in addresses:
            reason = _private_reason(address)
            if reason is not None:
                target = f"host {host!r} is" if literal else f"host {host!r} resolves to {str(address)!r},"
                raise DownloadError(
                    f"{what} {shown!r} is refused: {target} {reason}, and deny_private is set; "
                    "remove the URL from the catalog, or set deny_private = false if the stage must "
                    "reach internal hosts",
                    url=shown,
                )


def _resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to, as requests would connect to it."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class _HostRates:
    """One ``aiolimiter.AsyncLimiter`` per host, on the event loop, waited on from worker threads.

    ``wait(url)`` blocks the calling thread until the URL's host may be sent one more request.
    The limiters live on ``loop`` (created there lazily, one per host name) and are only touched
    from it. :meth:`close` cancels every wait still pending, so a thread abandoned by a stage
    timeout or a stop never blocks on a loop that is about to go away.

    Args:
        loop: The run's event loop.
        rate: ``"COUNT/UNIT"``, as for a stage's ``rate``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, rate: str) -> None:
        count, period = parse_rate(rate)
        # As the engine does for Stage.rate: the rate holds, the burst is capped at 0.1 s worth.
        burst = max(1.0, count * min(period, 0.1) / period)
        self._max_rate = burst
        self._time_period = burst * period / count
        self._rate = rate
        self._loop = loop
        self._limiters: dict[str, aiolimiter.AsyncLimiter] = {}
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._closed = False

    async def _acquire(self, host: str) -> None:
        limiter = self._limiters.get(host)
        if limiter is None:
            limiter = self._limiters[host] = aiolimiter.AsyncLimiter(self._max_rate, self._time_period)
        await limiter.acquire()

    def wait(self, url: str, timeout: float | None = None) -> None:
        """Block until ``url``'s host has room under the rate (call from a worker thread).

        Raises:
            TransientError: The stage closed before the wait ended, or ``timeout`` seconds
                (what is left of the attempt's deadline) passed first.
        """
        host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".").lower()
        coro = self._acquire(host)
        with self._lock:
            if self._closed:
                coro.close()
                raise TransientError(
                    f"GET {_redact(url)} was not sent: the download stage closed while it waited "
                    f"for host {host!r}'s rate_per_host ({self._rate})"
                )
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError:  # the loop is closed
                coro.close()
                raise
            self._pending.add(future)
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransientError(
                f"GET {_redact(url)} was not sent: its deadline passed while it waited for host "
                f"{host!r}'s rate_per_host ({self._rate})"
            ) from None
        except concurrent.futures.CancelledError:
            raise TransientError(
                f"GET {_redact(url)} was not sent: the download stage closed while it waited "
                f"for host {host!r}'s rate_per_host ({self._rate})"
            ) from None
        finally:
            with self._lock:
                self._pending.discard(future)

    def close(self) -> None:
        """Refuse new waits and end the pending ones (their threads raise TransientError)."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, set()
        for future in pending:
            future.cancel()


def _origin(url: str) -> str:
    """``scheme://host:port`` of a URL, the default port written out: what a Retry-After pauses."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{parts.port or (443 if scheme == 'https' else 80)}"


class _HostGate:
    """Per-origin pauses asked for by ``Retry-After``: one host's pause never holds another's items.

    A request for a paused origin waits in its thread when the pause ends before its attempt's
    deadline, and fails at once (transiently: the engine retries it) when it does not, so a
    long pause does not hold a slot for nothing.

    Args:
        clock: Monotonic seconds; tests pass a fake one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def pause(self, origin: str, seconds: float) -> None:
        """Hold requests to ``origin`` for ``seconds`` from now (a longer pause already set stays)."""
        until = self._clock() + seconds
        with self._lock:
            if until > self._until.get(origin, 0.0):
                self._until[origin] = until

    def delay(self, origin: str, *, deadline: float) -> float:
        """Seconds a request to ``origin`` must wait now (0 when it is not paused).

        Raises:
            TransientError: The pause lasts past ``deadline`` (on the gate's clock).
        """
        now = self._clock()
        with self._lock:
            until = self._until.get(origin)
            if until is not None and until <= now:
                del self._until[origin]
                until = None
        if until is None:
            return 0.0
        if until > deadline:
            raise TransientError(
                f"host {origin} is paused for another {until - now:g}s by its Retry-After, past this "
                "attempt's deadline: the request was not sent, and the item is retried under the "
                "stage's retry policy (lower max_retry_after, or allow more attempts, if such items "
                "run out of attempts)"
            )
        return until - now

    def wait(self, origin: str, *, deadline: float) -> None:
        """Block until ``origin`` is not paused (see :meth:`delay`); call from a worker thread.

        Raises:
            TransientError: The pause lasts past ``deadline``, or the stage closed meanwhile.
        """
        delay = self.delay(origin, deadline=deadline)
        if delay > 0 and self._closed.wait(delay):
            raise TransientError(f"host {origin} was paused when the download stage closed")

    def close(self) -> None:
        """End every wait (their threads raise TransientError)."""
        self._closed.set()


def _shut(sock: socket.socket) -> None:
    """Shut ``sock`` down in both directions: a ``recv`` blocked in another thread returns at once
    (closing the file descriptor alone would not wake it). On an SSL socket this skips the TLS
    layer on purpose: it must work while another thread is inside a TLS read."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Attempt:
    """One call of ``fetch``: its deadline, and the sockets it uses, which the watchdog shuts down
    if the deadline passes first.

    Args:
        url: The URL, for messages (without userinfo).
        seconds: The deadline, from now.
        check: The host rules, for the connected peer's address.
    """

    def __init__(self, url: str, seconds: float, check: _HostCheck) -> None:
        self.url = url
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.check = check
        self.expired = False
        self._done = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def connected(self, sock: socket.socket, host: str, proxied: bool) -> None:
        """A new connection: check whom it reached, then watch it."""
        if not proxied:  # through a proxy the peer is the proxy; it must enforce the rule
            self.check.peer(str(sock.getpeername()[0]), host, self.url)
        self.use(sock)

    def use(self, sock: socket.socket) -> None:
        """Watch ``sock`` until the attempt ends; shut it at once if the deadline already passed."""
        with self._lock:
            if not self.expired:
                if not self._done:
                    self._sockets.append(sock)
                return
        _shut(sock)

    def expire(self) -> None:
        """The deadline passed: shut every socket the attempt still uses (from the watchdog)."""
        with self._lock:
            if self._done:
                return
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)

    def finish(self) -> None:
        """The attempt returned: its connections go back to the pool, unwatched."""
        with self._lock:
            self._done = True
            self._sockets.clear()


_current = threading.local()
"""``_current.attempt``: the :class:`_Attempt` the worker thread is running, if any."""


def _attempt() -> _Attempt | None:
    attempt: _Attempt | None = getattr(_current, "attempt", None)
    return attempt


class _Watchdog:
    """One daemon thread that expires attempts at their deadlines (see :class:`_Attempt`).

    A per-read timeout cannot bound a server that sends a byte just often enough; closing the
    connection from another thread can. Started on first use, stopped by :meth:`close`.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Attempt]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, attempt: _Attempt) -> None:
        """Expire ``attempt`` at its deadline, unless it finished by then."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the download stage was called after it was closed")
            heapq.heappush(self._heap, (attempt.deadline, next(self._order), attempt))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due: list[_Attempt] = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
                if due:
                    self._cond.release()
                    try:
                        for attempt in due:
                            attempt.expire()
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(self._heap[0][0] - now if self._heap else None)

    def close(self) -> None:
        """Expire every attempt still watched, and stop the thread."""
        with self._cond:
            self._closed = True
            pending, self._heap = self._heap, []
            thread, self._thread = self._thread, None
            self._cond.notify()
        for _, _, attempt in pending:
            attempt.expire()
        if thread is not None:
            thread.join()


class _WatchedConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection that reports each socket it opens, and each reuse, to the thread's attempt."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _report_new(sock, self)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _report_use(self)
        super().request(*args, **kwargs)


class _WatchedTLSConnection(urllib3.connection.HTTPSConnection):
    """:class:`_WatchedConnection` for https: the peer is checked before the TLS handshake."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _report_new(sock, self)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _report_use(self)
        super().request(*args, **kwargs)


def _report_new(sock: socket.socket, conn: urllib3.connection.HTTPConnection) -> None:
    attempt = _attempt()
    if attempt is None:
        return
    try:
        attempt.connected(sock, conn.host, proxied=conn.proxy is not None)
    except BaseException:
        sock.close()
        raise


def _report_use(conn: urllib3.connection.HTTPConnection) -> None:
    attempt = _attempt()
    if attempt is not None and conn.sock is not None:
        attempt.use(conn.sock)


class _WatchedPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedTLSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedTLSConnection


_POOLS = {"http": _WatchedPool, "https": _WatchedTLSPool}


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose connections (direct or through an HTTP proxy) report to the attempt."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.PoolManager:
        manager: urllib3.PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.ProxyManager):  # not SOCKS, which has pools of its own
            manager.pool_classes_by_scheme = _POOLS
        return manager


class _GuardedSession(requests.Session):
    """A session that checks each request it sends, the first and every redirect hop, as sent.

    Before each request: the host rules on the prepared URL, then the origin's Retry-After
    pause, then (with ``rates``) its host's turn, each bounded by the attempt's deadline. On a
    redirect to another host (or port, or scheme), the stage's custom ``headers`` are dropped,
    as requests drops ``Authorization``.
    """

    def __init__(
        self,
        check: _HostCheck,
        gate: _HostGate,
        rates: _HostRates | None = None,
        private_headers: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self._check = check
        self._gate = gate
        self._rates = rates
        self._private_headers = private_headers
        self._redirect_from = ""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        url = str(request.url)
        hop = kwargs.get("allow_redirects") is False  # resolve_redirects sends each hop so
        self._check.rules(url, what=f"redirect from {self._redirect_from!r} to" if hop else "URL")
        attempt = _attempt()
        deadline = math.inf if attempt is None else attempt.deadline
        self._gate.wait(_origin(url), deadline=deadline)
        if self._rates is not None:
            self._rates.wait(url, None if attempt is None else attempt.remaining())
        return super().send(request, **kwargs)

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None:
            self._redirect_from = _redact(resp.url)
        return target

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        super().rebuild_auth(prepared_request, response)  # type: ignore[no-untyped-call]  # stubs
        previous = response.request.url if response.request is not None else None
        if (
            self._private_headers
            and previous is not None
            and prepared_request.url is not None
            and self.should_strip_auth(previous, prepared_request.url)  # type: ignore[no-untyped-call]
        ):
            for name in self._private_headers:
                prepared_request.headers.pop(name, None)


class _Sessions:
    """One session per worker thread (a ``requests.Session`` is not thread-safe), all closed at the end."""

    def __init__(self, make: Callable[[], requests.Session]) -> None:
        self._make = make
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[requests.Session] = []
        self._closed = False

    def get(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._make()
            with self._lock:
                if self._closed:
                    session.close()
                    raise RuntimeError("the download stage was called after it was closed")
                self._all.append(session)
            self._local.session = session
        return session

    def __len__(self) -> int:
        with self._lock:
            return len(self._all)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sessions, self._all = self._all, []
        for session in sessions:
            session.close()


def _drain(response: requests.Response) -> None:
    """Read a small error body to its end, so the connection is reused rather than dropped."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) <= _DRAIN_LIMIT:
        with contextlib.suppress(requests.RequestException):
            response.content  # noqa: B018 - reading it is the point


def _translate(
    exc: requests.RequestException, url: str, *, connect_timeout: float, read_timeout: float
) -> Exception:
    """Map a ``requests`` error to TransientError (retry) or DownloadError (give up)."""
    shown = _redact(url)
    if isinstance(exc, requests.TooManyRedirects):
        return DownloadError(f"GET {shown} {exc}; raise max_redirects or fix the URL", url=shown)
    if isinstance(exc, requests.exceptions.SSLError):
        return DownloadError(
            f"GET {shown} failed TLS verification or handshake ({exc.__class__.__name__}); "
            "fix the server's certificate or the URL",
            url=shown,
        )
    if isinstance(exc, requests.ConnectTimeout):
        return TransientError(f"GET {shown} could not connect within {connect_timeout:g}s (connect_timeout)")
    if isinstance(exc, requests.ReadTimeout):
        return TransientError(f"GET {shown} got no data for {read_timeout:g}s (read_timeout)")
    if isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
        # ChunkedEncodingError is also what a body cut short of its Content-Length becomes.
        return TransientError(f"GET {shown} lost the connection ({exc.__class__.__name__}: {exc})")
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidSchema):
        return DownloadError(f"GET {shown} is not a URL requests can fetch ({exc}); fix the URL", url=shown)
    return DownloadError(f"GET {shown} failed ({exc.__class__.__name__}: {exc})", url=shown)


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


def _past_deadline(shown: str, seconds: float) -> TransientError:
    return TransientError(
        f"GET {shown} did not finish within {seconds:g}s (deadline); the server is too slow or "
        "trickles its answer. Raise the stage's timeout (or deadline) if it is only slow"
    )


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
    if status in (429, 503):
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
