"""HTTP stages: :func:`download` fetches ``item["url"]`` with ``requests``, in the thread pool.

Errors are sorted at one boundary (:func:`_translate` and the status checks in ``fetch``):

* connection errors, timeouts, truncated bodies, 5xx and 429 raise
  :class:`~pipeline.TransientError` (chained), which the engine retries;
* 429 or 503 with a usable ``Retry-After`` raise :class:`~pipeline.RetryAfter`, which pauses
  the whole stage before the retry;
* everything else (a bad URL, one refused by ``allowed_hosts``, ``denied_hosts`` or
  ``deny_private``, another 4xx, a body over ``max_bytes``, too many
  redirects, a TLS failure) raises :class:`DownloadError`, which fails the item for good.

URLs in messages never carry userinfo (``user:password@``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import hashlib
import http
import ipaddress
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import aiolimiter
import pydantic
import requests
import requests.adapters
from urllib3.util.retry import Retry as _Urllib3Retry

from pipeline import (
    Context,
    Item,
    Overloaded,
    RetryAfter,
    TransientError,
    factory,
    parse_rate,
)

from ._options import (
    FieldName,
    Flag,
    NonNegativeInt,
    PositiveInt,
    PositiveSeconds,
    Rate,
    Seconds,
    checked_options,
)

__all__ = ["DEFAULT_USER_AGENT", "DownloadError", "download"]

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
    except ValueError:
        return "<unparsable URL>"
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


def _private_reason(address: IPAddress) -> str | None:
    """What kind of non-public address ``address`` is ("a loopback address"), or ``None`` if public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
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
    """The scheme and host rules, applied to the first URL and to every redirect target.

    With ``deny_private`` a host name is resolved here, and the connection resolves it again:
    a DNS server that answers differently the second time (DNS rebinding) is not caught. Keep
    an egress firewall for that; this check stops the honest mistakes and the plain attacks.
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
        self._deny_private = deny_private
        self._resolve = resolve or _resolve

    def __call__(self, url: str, *, what: str) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
        except ValueError as exc:
            raise DownloadError(
                f"{what} {_redact(url)!r} is not a valid URL ({exc}); fix the URL", url=_redact(url)
            ) from exc
        if parts.scheme.lower() not in _SCHEMES:
            scheme = parts.scheme or "no scheme"
            raise DownloadError(
                f"{what} {_redact(url)!r} has {scheme!r}: only http and https URLs are downloaded; "
                "fix the URL",
                url=_redact(url),
            )
        if not host:
            raise DownloadError(f"{what} {_redact(url)!r} has no host; fix the URL", url=_redact(url))
        if host in self._denied_exact or (self._denied_suffixes and host.endswith(self._denied_suffixes)):
            raise DownloadError(
                f"{what} {_redact(url)!r} is on host {host!r}, which is in denied_hosts; "
                "remove the URL from the catalog, or the host from the stage's denied_hosts",
                url=_redact(url),
            )
        if self._exact is not None and host not in self._exact and not host.endswith(self._suffixes):
            raise DownloadError(
                f"{what} {_redact(url)!r} is on host {host!r}, which is not in allowed_hosts; "
                "add it to the stage's allowed_hosts or fix the URL",
                url=_redact(url),
            )
        if self._deny_private:
            self._check_addresses(url, host, what)

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

    def wait(self, url: str) -> None:
        """Block until ``url``'s host has room under the rate (call from a worker thread).

        Raises:
            TransientError: The stage closed before the wait ended.
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
            future.result()
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


class _GuardedSession(requests.Session):
    """A session that checks each redirect target before following it (not after the fact).

    With ``rates``, every request it sends (the first and each redirect hop) first waits for
    its host's turn.
    """

    def __init__(self, check: _HostCheck, rates: _HostRates | None = None) -> None:
        super().__init__()
        self._check = check
        self._rates = rates

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if self._rates is not None and request.url is not None:
            self._rates.wait(request.url)
        return super().send(request, **kwargs)

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None:
            try:
                self._check(
                    urllib.parse.urljoin(resp.url, target), what=f"redirect from {_redact(resp.url)!r} to"
                )
            except Exception:
                resp.close()
                raise
        return target


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
        read_timeout: Seconds to wait for each read from the socket (not for the whole body:
            the stage's ``timeout`` bounds that).
        max_bytes: Largest body accepted; a larger one fails the item for good.
        allowed_hosts: If given, only these hosts (and the targets of their redirects) are
            fetched; ``"*.example.com"`` allows any subdomain of ``example.com``.
        denied_hosts: These hosts are never fetched, nor redirected to; same forms as
            ``allowed_hosts`` (``"*.example.com"`` is the subdomains, not ``example.com``
            itself). Checked before ``allowed_hosts``.
        deny_private: Refuse loopback, private (10/8, 172.16/12, 192.168/16, 100.64/10,
            fc00::/7), link-local (169.254/16 with the cloud metadata address, fe80::/10),
            unspecified, multicast and reserved addresses: an IP written in the URL, or any
            one address its host name resolves to. Set it when the URLs come from users. A
            name that does not resolve is a transient failure.
        max_redirects: Redirects followed before the item fails.
        max_retry_after: The longest ``Retry-After`` honoured, in seconds; longer asks are cut
            to this.
        headers: Extra request headers; they override ``user_agent``.
        user_agent: The ``User-Agent`` header.
        trust_env: Take proxies and ``.netrc`` credentials from the environment, as
            ``requests`` does by default.
        rate_per_host: At most this many requests per period to any one host, for example
            ``"10/s"`` (the ``COUNT/UNIT`` of a stage's ``rate``; the burst is capped at 0.1 s
            worth). A host is the URL's host name, whatever the port: ``localhost`` and
            ``127.0.0.1`` are two hosts. Every request counts, redirect hops included, each
            against its own host. The wait happens in the worker thread, holding its slot and
            counting towards the stage's ``timeout``: a long run of URLs on one host can hold
            every slot while other hosts wait, so mix hosts in the source's order.

    Yields:
        ``fetch(item) -> item``, a plain function.

    Raises:
        ConfigError: On a direct call, an option is out of range (also a ``ValueError``); in a
            run the engine refuses it when the stage is defined, before anything runs.
    """
    rates = None if rate_per_host is None else _HostRates(asyncio.get_running_loop(), rate_per_host)
    check = _HostCheck(allowed_hosts, denied_hosts, deny_private)
    pool_size = ctx.max_concurrency
    request_headers = {"User-Agent": user_agent, **(headers or {})}
    timeout = (connect_timeout, read_timeout)

    def make_session() -> requests.Session:
        session = _GuardedSession(check, rates)
        session.max_redirects = max_redirects
        session.trust_env = trust_env
        session.headers.update(request_headers)
        # total=0, read=False: urllib3 never retries or re-sends on its own; the engine does.
        adapter = requests.adapters.HTTPAdapter(
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
        check(url, what="URL")
        try:
            response = sessions.get().get(url, timeout=timeout, stream=True)
        except requests.RequestException as exc:
            raise _translate(exc, url, connect_timeout=connect_timeout, read_timeout=read_timeout) from exc
        with response:
            status = response.status_code
            if status >= 300:
                _drain(response)
                _raise_for_status(response, shown, max_retry_after)
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
            try:
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
            except requests.RequestException as exc:
                raise _translate(
                    exc, url, connect_timeout=connect_timeout, read_timeout=read_timeout
                ) from exc
            content_type = response.headers.get("Content-Type", "")
        body = b"".join(chunks)
        return {
            **item,
            "body": body,
            "content_type": content_type.split(";", 1)[0].strip().lower(),
            "http_status": status,
            "bytes": size,
            "sha256": digest.hexdigest(),
        }

    try:
        yield fetch
    finally:
        if rates is not None:
            rates.close()
        sessions.close()


def _raise_for_status(response: requests.Response, shown: str, max_retry_after: float) -> None:
    """Raise the right error for an answer that is not 2xx (redirects are already followed)."""
    status = response.status_code
    said = _status_text(response)
    if status in (429, 503):
        raw = response.headers.get("Retry-After")
        delay = _retry_after_seconds(raw, time.time())
        if delay is not None:
            delay = min(delay, max_retry_after)
            raise RetryAfter(
                delay, f"GET {shown} answered {said} with Retry-After {raw!r}; pausing the stage {delay:g}s"
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
