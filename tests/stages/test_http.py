"""stages.http.download against a real loopback server (tests/fixtures/httpserver.py)."""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import email.utils
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import requests
import requests.adapters

import stages.http
from pipeline import (
    ConfigError,
    Item,
    Retry,
    RetryAfter,
    Stage,
    StageTimeout,
    TransientError,
)
from pipeline.testing import open_context, run_stages_async
from stages.http import (
    DownloadError,
    _HostCheck,
    _private_reason,
    _redact,
    _retry_after_seconds,
    download,
)
from tests.fixtures.httpserver import LoopbackServer, Route

Fetch = Callable[[Item], Item]
OpenDownload = Callable[..., Awaitable[Fetch]]

POOL_FULL = "Connection pool is full"


@pytest.fixture
async def open_download() -> AsyncIterator[OpenDownload]:
    """Enter ``download`` with a test Context; every stage opened is closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_(*, concurrency: int = 4, **options: Any) -> Fetch:
            ctx = await stack.enter_async_context(open_context(stage="download", concurrency=concurrency))
            fetch: Fetch = await stack.enter_async_context(download(ctx, trust_env=False, **options))
            return fetch

        yield open_


async def call(fetch: Fetch, url: object, **fields: Any) -> Item:
    """Run ``fetch`` in a worker thread, as the engine does."""
    return await asyncio.to_thread(fetch, {"id": 1, "url": url, **fields})


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- answers ------------------------------------------------------------------------------


async def test_ok_download_adds_body_and_its_facts(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A 200 answer adds body, content_type, http_status, bytes and sha256, keeping the item's fields."""
    body = os.urandom(10_000)
    url = http_server.add("/a.jpg", body, content_type="image/jpeg")
    fetch = await open_download()

    out = await call(fetch, url, sku="X1")

    assert out == {
        "id": 1,
        "url": url,
        "sku": "X1",
        "body": body,
        "content_type": "image/jpeg",
        "http_status": 200,
        "bytes": 10_000,
        "sha256": hashlib.sha256(body).hexdigest(),
    }


async def test_content_type_keeps_only_the_media_type(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """Content-Type parameters are dropped and the media type lower-cased."""
    url = http_server.add("/a.png", b"x", content_type="Image/PNG; charset=binary")
    fetch = await open_download()

    assert (await call(fetch, url))["content_type"] == "image/png"


async def test_garbage_body_is_returned_as_is(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """Bytes that are not an image are downloaded unchanged; decoding is the image stage's job."""
    garbage = b"\x00\xffnot a jpeg at all" * 100
    url = http_server.add("/broken.jpg", garbage, content_type="image/jpeg")
    fetch = await open_download()

    out = await call(fetch, url)

    assert out["body"] == garbage
    assert out["content_type"] == "image/jpeg"


async def test_request_carries_user_agent_and_extra_headers(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """user_agent and headers are sent with every request."""
    url = http_server.add("/a.jpg", b"x")
    fetch = await open_download(user_agent="thumbs/2", headers={"X-Batch": "nightly"})

    await call(fetch, url)

    sent = http_server.requests[0].headers
    assert (sent["User-Agent"], sent["X-Batch"]) == ("thumbs/2", "nightly")


# -- transient failures -------------------------------------------------------------------


async def test_read_timeout_is_transient(http_server: LoopbackServer, open_download: OpenDownload) -> None:
    """A server that does not answer within read_timeout raises TransientError."""
    http_server.add_slow("/slow.jpg")  # held until the server closes
    fetch = await open_download(read_timeout=0.2)

    with pytest.raises(TransientError, match=r"no data for 0\.2s \(read_timeout\)") as info:
        await call(fetch, http_server.url("/slow.jpg"))

    assert not isinstance(info.value, RetryAfter)
    assert isinstance(info.value.__cause__, requests.ReadTimeout)


async def test_refused_connection_is_transient(open_download: OpenDownload) -> None:
    """A refused connection raises TransientError, chained to the requests error."""
    fetch = await open_download()

    with pytest.raises(TransientError, match="lost the connection") as info:
        await call(fetch, f"http://127.0.0.1:{closed_port()}/a.jpg")

    assert isinstance(info.value.__cause__, requests.ConnectionError)


async def test_flaky_503_is_transient_then_succeeds(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """503 without Retry-After raises TransientError (urllib3 does not retry it); the next call succeeds."""
    url = http_server.add_flaky("/f.jpg", b"ok", failures=1, status=503)
    fetch = await open_download()

    with pytest.raises(TransientError, match="503 Service Unavailable") as info:
        await call(fetch, url)
    assert not isinstance(info.value, RetryAfter)
    assert http_server.hits("/f.jpg") == 1  # urllib3's own retries are off

    assert (await call(fetch, url))["body"] == b"ok"


async def test_error_answer_keeps_the_connection_alive(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A small error body is drained, so the retry reuses the same keep-alive connection."""
    url = http_server.add_flaky("/f.jpg", b"ok", failures=2, status=500)
    fetch = await open_download()

    def fail_twice_then_succeed() -> None:
        # On one thread, so one session: to_thread per call could pick different workers.
        for _ in range(2):
            with pytest.raises(TransientError):
                fetch({"id": 1, "url": url})
        fetch({"id": 1, "url": url})

    await asyncio.to_thread(fail_twice_then_succeed)

    assert http_server.connections == 1


@pytest.mark.parametrize(("status", "header", "expected"), [(429, "7", 7.0), (503, "2", 2.0)])
async def test_retry_after_raises_retry_after_with_its_delay(
    http_server: LoopbackServer, open_download: OpenDownload, status: int, header: str, expected: float
) -> None:
    """429 or 503 with Retry-After in seconds raises RetryAfter(delay), then the retry succeeds."""
    url = http_server.add_flaky("/r.jpg", b"ok", failures=1, status=status, retry_after=header)
    fetch = await open_download()

    with pytest.raises(RetryAfter) as info:
        await call(fetch, url)

    assert info.value.delay == expected
    assert str(status) in str(info.value)
    assert (await call(fetch, url))["body"] == b"ok"


async def test_retry_after_is_capped_by_max_retry_after(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A Retry-After longer than max_retry_after is cut to max_retry_after."""
    url = http_server.add_flaky("/r.jpg", b"ok", failures=1, status=429, retry_after="86400")
    fetch = await open_download(max_retry_after=60)

    with pytest.raises(RetryAfter) as info:
        await call(fetch, url)

    assert info.value.delay == 60.0


async def test_429_without_retry_after_is_plain_transient(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """429 without a usable Retry-After raises TransientError, not RetryAfter."""
    url = http_server.add_flaky("/r.jpg", b"ok", failures=1, status=429, retry_after="soon")
    fetch = await open_download()

    with pytest.raises(TransientError, match="429 Too Many Requests") as info:
        await call(fetch, url)

    assert not isinstance(info.value, RetryAfter)


def test_retry_after_http_date_counts_from_now() -> None:
    """A Retry-After HTTP date gives the seconds from now until then; a past date gives 0."""
    now = 1_700_000_000.0
    later = email.utils.formatdate(now + 30, usegmt=True)
    earlier = email.utils.formatdate(now - 30, usegmt=True)

    assert (_retry_after_seconds(later, now), _retry_after_seconds(earlier, now)) == (30.0, 0.0)


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "nan", "inf", "Wed, 21 Oct 2015 07:28:00"])
def test_retry_after_unusable_values_are_ignored(value: str | None) -> None:
    """Missing, negative, non-finite, zoneless or unparsable Retry-After values give None."""
    assert _retry_after_seconds(value, 0.0) is None


async def test_truncated_body_is_transient(http_server: LoopbackServer, open_download: OpenDownload) -> None:
    """A body cut short of its Content-Length raises TransientError."""
    url = http_server.add_truncated("/t.jpg", b"x" * 10_000, send_bytes=1_000)
    fetch = await open_download()

    with pytest.raises(TransientError, match="lost the connection") as info:
        await call(fetch, url)

    assert isinstance(info.value.__cause__, requests.RequestException)


async def test_500_is_transient(http_server: LoopbackServer, open_download: OpenDownload) -> None:
    """A 5xx answer raises TransientError naming the status."""
    url = http_server.add("/e.jpg", b"boom", status=500)
    fetch = await open_download()

    with pytest.raises(TransientError, match="500 Internal Server Error"):
        await call(fetch, url)


# -- permanent failures -------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 404, 410])
async def test_4xx_is_permanent_with_status_and_url(
    http_server: LoopbackServer, open_download: OpenDownload, status: int
) -> None:
    """A 4xx other than 429 raises DownloadError naming the status and the URL."""
    url = http_server.add("/gone.jpg", b"", status=status)
    fetch = await open_download()

    with pytest.raises(DownloadError) as info:
        await call(fetch, url)

    assert f"answered {status} " in str(info.value)
    assert url in str(info.value)
    assert info.value.status == status


async def test_password_is_not_in_the_message(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """Userinfo in the URL is stripped from error messages."""
    fetch = await open_download()
    url = f"http://bob:s3cret@127.0.0.1:{http_server.port}/missing.jpg"

    with pytest.raises(DownloadError) as info:
        await call(fetch, url)

    assert "s3cret" not in str(info.value)
    assert "bob" not in info.value.url
    assert http_server.url("/missing.jpg") in str(info.value)


def test_redact_strips_userinfo_only() -> None:
    """_redact drops user:password@ and keeps the rest of the URL."""
    assert _redact("https://u:p@h.example:8443/a?q=1") == "https://h.example:8443/a?q=1"


async def test_oversized_content_length_is_refused(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A Content-Length above max_bytes fails for good, before the body is read."""
    url = http_server.add("/big.jpg", b"x" * 2_000)
    fetch = await open_download(max_bytes=1_000)

    with pytest.raises(DownloadError, match="announces 2000 bytes, larger than max_bytes=1000"):
        await call(fetch, url)


async def test_oversized_streamed_body_is_refused(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A body without Content-Length that grows past max_bytes fails for good while streaming."""
    url = http_server.add("/big.jpg", b"x" * 300_000, chunked=True)
    fetch = await open_download(max_bytes=100_000)

    with pytest.raises(DownloadError, match="more than 100000 bytes, larger than max_bytes=100000"):
        await call(fetch, url)


async def test_body_of_exactly_max_bytes_is_accepted(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """max_bytes is inclusive: a streamed body of exactly that size is downloaded."""
    url = http_server.add("/edge.jpg", b"x" * 100_000, chunked=True)
    fetch = await open_download(max_bytes=100_000)

    assert (await call(fetch, url))["bytes"] == 100_000


async def test_redirects_within_max_redirects_are_followed(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A chain of max_redirects redirects ends in the final body."""
    url = http_server.add_redirects("/hop", 2, b"final")
    fetch = await open_download(max_redirects=2)

    assert (await call(fetch, url))["body"] == b"final"


async def test_redirect_chain_longer_than_max_redirects_fails(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """One redirect more than max_redirects fails for good, and the final URL is never fetched."""
    url = http_server.add_redirects("/hop", 3, b"final")
    fetch = await open_download(max_redirects=2)

    with pytest.raises(DownloadError, match="Exceeded 2 redirects"):
        await call(fetch, url)

    assert http_server.hits("/hop/r3") == 0


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "127.0.0.1/a.jpg"])
async def test_non_http_urls_are_refused(open_download: OpenDownload, url: str) -> None:
    """Only http and https URLs are fetched; anything else fails for good with a clear message."""
    fetch = await open_download()

    with pytest.raises(DownloadError, match="only http and https URLs are downloaded"):
        await call(fetch, url)


async def test_host_not_in_allowed_hosts_is_refused(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A URL whose host is not in allowed_hosts fails for good without any request."""
    http_server.add("/a.jpg", b"x")
    fetch = await open_download(allowed_hosts=["cdn.example.com"])

    with pytest.raises(DownloadError, match=r"host '127\.0\.0\.1', which is not in allowed_hosts"):
        await call(fetch, http_server.url("/a.jpg"))

    assert http_server.hits("/a.jpg") == 0


async def test_redirect_to_a_host_not_allowed_is_not_followed(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """allowed_hosts applies to each redirect target before it is requested."""
    http_server.add("/away", status=302, headers={"Location": f"http://localhost:{http_server.port}/a.jpg"})
    http_server.add("/a.jpg", b"x")
    fetch = await open_download(allowed_hosts=["127.0.0.1"])

    with pytest.raises(DownloadError, match=r"redirect from .* host 'localhost'"):
        await call(fetch, http_server.url("/away"))

    assert http_server.hits("/a.jpg") == 0


def test_allowed_hosts_wildcard_matches_subdomains_only() -> None:
    """'*.example.com' allows img.example.com but not example.com itself."""
    check = _HostCheck(["*.example.com"])
    check("https://img.example.com/a.jpg", what="URL")

    with pytest.raises(DownloadError):
        check("https://example.com/a.jpg", what="URL")


# -- denied hosts and private addresses ---------------------------------------------------


async def test_deny_private_refuses_a_loopback_ip_in_the_url(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """deny_private refuses http://127.0.0.1:PORT/... for good, naming the host and why, with no request."""
    url = http_server.add("/a.jpg", b"x")
    fetch = await open_download(deny_private=True)

    with pytest.raises(DownloadError, match=r"host '127\.0\.0\.1' is a loopback address") as info:
        await call(fetch, url)

    assert "deny_private = false" in str(info.value)
    assert "remove the URL from the catalog" in str(info.value)
    assert http_server.hits("/a.jpg") == 0


async def test_deny_private_refuses_a_name_resolving_to_loopback(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """deny_private resolves http://localhost:PORT/... and refuses it for its loopback address."""
    http_server.add("/a.jpg", b"x")
    fetch = await open_download(deny_private=True)

    with pytest.raises(DownloadError, match=r"host 'localhost' resolves to '(127\.0\.0\.1|::1)', a loopback"):
        await call(fetch, f"http://localhost:{http_server.port}/a.jpg")

    assert http_server.hits("/a.jpg") == 0


async def test_deny_private_applies_to_each_redirect_target(
    http_server: LoopbackServer, open_download: OpenDownload, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redirect from a host that passes deny_private to a loopback IP is refused before it is requested."""
    real = stages.http._resolve
    # 'localhost' passes as a public host (TEST-NET would not: it is reserved), so the first
    # request goes out; the connection itself still resolves it for real.
    monkeypatch.setattr(
        stages.http, "_resolve", lambda host: ["93.184.216.34"] if host == "localhost" else real(host)
    )
    http_server.add("/away", status=302, headers={"Location": http_server.url("/a.jpg")})
    http_server.add("/a.jpg", b"x")
    fetch = await open_download(deny_private=True)

    with pytest.raises(DownloadError, match=r"redirect from .* host '127\.0\.0\.1' is a loopback address"):
        await call(fetch, f"http://localhost:{http_server.port}/away")

    assert (http_server.hits("/away"), http_server.hits("/a.jpg")) == (1, 0)


async def test_redirect_to_a_denied_host_is_not_followed(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """denied_hosts applies to each redirect target: an allowed host redirecting to a denied one fails."""
    http_server.add("/away", status=302, headers={"Location": f"http://localhost:{http_server.port}/a.jpg"})
    http_server.add("/a.jpg", b"x")
    fetch = await open_download(denied_hosts=["localhost"], allowed_hosts=["127.0.0.1", "localhost"])

    with pytest.raises(DownloadError, match=r"redirect from .* host 'localhost', which is in denied_hosts"):
        await call(fetch, http_server.url("/away"))

    assert (http_server.hits("/away"), http_server.hits("/a.jpg")) == (1, 0)


async def test_denied_host_exact_name_is_refused(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A host listed in denied_hosts fails for good, with no request, and the message names the fix."""
    url = http_server.add("/a.jpg", b"x")
    fetch = await open_download(denied_hosts=["127.0.0.1"])

    with pytest.raises(DownloadError, match=r"host '127\.0\.0\.1', which is in denied_hosts; remove"):
        await call(fetch, url)

    assert http_server.hits("/a.jpg") == 0


def test_denied_hosts_wildcard_matches_subdomains_only() -> None:
    """'*.internal.example' denies a.internal.example (any case) but not internal.example or others."""
    check = _HostCheck(None, ["*.internal.example"])
    for url in ("http://a.internal.example/x", "http://B.A.Internal.Example./x"):
        with pytest.raises(DownloadError, match="which is in denied_hosts"):
            check(url, what="URL")
    check("http://internal.example/x", what="URL")
    check("http://a.internal.example.org/x", what="URL")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.254", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.100.100.200", "a private address"),
        ("fc00::1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("127.0.0.1", "a loopback address"),
        ("127.1.2.3", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a link-local address (the cloud metadata service)"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("93.184.216.34", None),
        ("172.32.0.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_private_reason_sorts_addresses(address: str, reason: str | None) -> None:
    """Each private range deny_private refuses is named; public unicast addresses pass."""
    assert _private_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]/x",
        "http://[fe80::1%25eth0]/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/x",  # 127.0.0.1 as one number: getaddrinfo reads it as an address
        "http://0x7f.1/x",
    ],
)
def test_deny_private_sees_through_address_spellings(url: str) -> None:
    """IPv6 literals, zone ids and numeric spellings of loopback and metadata addresses are refused too."""
    check = _HostCheck(None, None, deny_private=True)

    with pytest.raises(DownloadError, match="deny_private is set"):
        check(url, what="URL")


def test_deny_private_refuses_a_name_if_any_address_is_private() -> None:
    """A name resolving to one public and one private address is refused, naming the private one."""
    check = _HostCheck(None, None, deny_private=True, resolve=lambda host: ["93.184.216.34", "10.0.0.5"])

    with pytest.raises(DownloadError, match=r"host 'mixed\.example' resolves to '10\.0\.0\.5', a private"):
        check("http://mixed.example/x", what="URL")


def test_deny_private_passes_a_name_with_only_public_addresses() -> None:
    """A name resolving only to public addresses passes the check."""
    check = _HostCheck(None, None, deny_private=True, resolve=lambda host: ["93.184.216.34", "2606:2800::1"])
    check("http://public.example/x", what="URL")


def test_deny_private_name_that_does_not_resolve_is_transient() -> None:
    """A name that cannot be resolved is a TransientError (a DNS outage passes), not a pass."""

    def fail(host: str) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    check = _HostCheck(None, None, deny_private=True, resolve=fail)

    with pytest.raises(TransientError, match="could not be resolved"):
        check("http://flaky-dns.example/x", what="URL")


async def test_engine_dead_letters_a_private_url_after_one_attempt(http_server: LoopbackServer) -> None:
    """Run by the engine, a URL refused by deny_private is a permanent failure: one attempt, dead-lettered."""
    url = http_server.add("/a.jpg", b"x")
    stage = Stage(
        download,
        name="download",
        retry=Retry(attempts=3, backoff=0, jitter=0),
        options={"trust_env": False, "deny_private": True},
    )

    async with asyncio.timeout(30):
        run = await run_stages_async([{"id": 1, "url": url}], stage)

    assert [(d["error_type"], d["attempts"]) for d in run.dead_letters] == [("stages.http.DownloadError", 1)]
    assert http_server.hits("/a.jpg") == 0


@pytest.mark.parametrize(
    "item", [{"id": 1}, {"id": 1, "url": None}, {"id": 1, "url": "  "}, {"id": 1, "url": 42}]
)
async def test_missing_or_non_string_url_fails_for_good(open_download: OpenDownload, item: Item) -> None:
    """A missing, NULL, blank or non-string url field fails for good, naming the field."""
    fetch = await open_download()

    with pytest.raises(DownloadError, match="field 'url' must hold a URL string"):
        await asyncio.to_thread(fetch, item)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"read_timeout": 0}, "read_timeout must be > 0"),
        ({"max_bytes": 0}, "max_bytes must be >= 1"),
        ({"max_redirects": -1}, "max_redirects must be >= 0"),
        ({"allowed_hosts": []}, "allowed_hosts is an empty list"),
        ({"url_field": ""}, "url_field must be a non-empty field name"),
        ({"denied_hosts": [""]}, "denied_hosts must hold host names"),
        ({"denied_hosts": "localhost"}, "denied_hosts must be a list of host names"),
        ({"deny_private": "yes"}, "deny_private must be true or false"),
        ({"rate_per_host": "fast"}, "rate_per_host: rate 'fast' is not of the form"),
        ({"rate_per_host": "0/s"}, "rate_per_host: rate '0/s' must be a positive count"),
        ({"rate_per_host": 10}, "rate_per_host must be a rate such as"),
    ],
)
async def test_bad_options_are_refused(
    open_download: OpenDownload, options: dict[str, Any], message: str
) -> None:
    """Out-of-range options raise ConfigError when the stage opens."""
    with pytest.raises(ConfigError, match=message):
        await open_download(**options)


# -- sessions and pools -------------------------------------------------------------------


async def run_gated(
    server: LoopbackServer,
    fetch: Callable[[Item], Any],
    url: str,
    callers: int,
    pool: concurrent.futures.ThreadPoolExecutor | None = None,
) -> list[Any]:
    """Run ``callers`` calls at once on ``callers`` threads, all held in flight, then released."""
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(callers))
        server.hold_all()
        futures = [loop.run_in_executor(pool, fetch, {"id": i, "url": url}) for i in range(callers)]
        try:
            await asyncio.to_thread(server.wait_for_in_flight, callers)
        finally:
            server.release_all()
        return list(await asyncio.gather(*futures))


async def test_concurrent_callers_each_use_their_own_kept_alive_connection(
    http_server: LoopbackServer, open_download: OpenDownload, caplog: pytest.LogCaptureFixture
) -> None:
    """N threads run N requests at once, reuse their N connections, and never log "pool is full"."""
    callers = 6
    url = http_server.add("/a.jpg", b"x" * 1000)
    fetch = await open_download(concurrency=callers)

    # One pool for both rounds, as the engine keeps its worker threads for the whole run.
    with (
        concurrent.futures.ThreadPoolExecutor(callers) as pool,
        caplog.at_level(logging.WARNING, logger="urllib3"),
    ):
        await run_gated(http_server, fetch, url, callers, pool)
        assert http_server.max_in_flight == callers
        await run_gated(http_server, fetch, url, callers, pool)

    assert http_server.hits("/a.jpg") == 2 * callers
    assert http_server.connections == callers
    assert POOL_FULL not in caplog.text


async def test_pool_full_detector_sees_a_shared_undersized_pool(
    http_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Control for the test above: one session with pool_maxsize=1 shared by 4 threads logs "pool is full"."""
    url = http_server.add("/a.jpg", b"x")
    with requests.Session() as session:
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=1))

        def fetch(item: Item) -> bytes:
            return session.get(item["url"], timeout=10).content

        with caplog.at_level(logging.WARNING, logger="urllib3"):
            await run_gated(http_server, fetch, url, 4)

    assert POOL_FULL in caplog.text


async def test_closing_the_stage_closes_every_session(http_server: LoopbackServer) -> None:
    """When the factory exits, every thread's session is closed and its connections with it."""
    url = http_server.add("/a.jpg", b"x")
    async with open_context(stage="download", concurrency=3) as ctx:
        async with download(ctx, trust_env=False) as fetch:
            await run_gated(http_server, fetch, url, 3)
            assert http_server.open_connections == 3

    await asyncio.to_thread(http_server.wait_until, lambda: http_server.open_connections == 0)


def test_server_releases_a_held_request_when_its_event_is_set(http_server: LoopbackServer) -> None:
    """The fixture's slow mode answers once the test sets the returned event."""
    release = http_server.add_slow("/slow.jpg", b"late")
    result: list[bytes] = []
    with requests.Session() as session:
        worker = threading.Thread(
            target=lambda: result.append(session.get(http_server.url("/slow.jpg"), timeout=10).content)
        )
        worker.start()
        http_server.wait_for_in_flight(1)
        assert not result
        release.set()
        worker.join(10)

    assert result == [b"late"]


# -- through the engine -------------------------------------------------------------------


async def test_engine_retries_transient_answers_and_dead_letters_permanent_ones(
    http_server: LoopbackServer,
) -> None:
    """Run by the engine: 503 and 429 + Retry-After are retried to success; a 404 is dead-lettered."""
    ok = http_server.add("/ok.jpg", b"ok")
    flaky = http_server.add_flaky("/flaky.jpg", b"flaky", failures=1, status=503)
    limited = http_server.add_flaky("/limited.jpg", b"limited", failures=1, status=429, retry_after="0")
    missing = http_server.url("/missing.jpg")
    items = [{"id": n, "url": url} for n, url in enumerate([ok, flaky, limited, missing])]
    stage = Stage(
        download,
        name="download",
        concurrency=2,
        retry=Retry(attempts=3, backoff=0, jitter=0),
        options={"trust_env": False},
    )

    async with asyncio.timeout(30):  # a safety net: an engine hang fails here, not at pytest-timeout
        run = await run_stages_async(items, stage)

    assert sorted(item["body"] for item in run.outputs) == [b"flaky", b"limited", b"ok"]
    assert [(d["key"], d["stage"], d["error_type"], d["attempts"]) for d in run.dead_letters] == [
        (3, "download", "stages.http.DownloadError", 1)
    ]
    assert "answered 404 Not Found" in run.dead_letters[0]["message"]


# -- rate_per_host ------------------------------------------------------------------------


def busiest_second(times: list[float]) -> int:
    """The most of ``times`` that fall within any one second (window closed at both ends)."""
    times = sorted(times)
    return max(bisect.bisect_right(times, t + 1.0) - i for i, t in enumerate(times))


async def test_rate_per_host_paces_each_host_on_its_own(http_server: LoopbackServer) -> None:
    """rate_per_host="20/s" holds each host to 20/s (burst 2) while two hosts together go past it."""
    per_host = 36  # at 20/s after a burst of 2: about 1.7 s per host, both hosts at once
    http_server.add("/p", b"x")
    hosts = {"a": f"http://127.0.0.1:{http_server.port}", "b": f"http://localhost:{http_server.port}"}
    items = [
        {"id": f"{name}{n}", "url": f"{base}/p?{name}{n}"}
        for n in range(per_host)
        for name, base in hosts.items()
    ]
    stage = Stage(
        download,
        name="download",
        concurrency=8,
        retry=Retry(attempts=1),
        options={"trust_env": False, "rate_per_host": "20/s"},
    )

    async with asyncio.timeout(30):
        run = await run_stages_async(items, stage, queue_size=16)

    assert len(run.outputs) == len(items)
    assert not run.dead_letters
    seen = http_server.requests
    by_host = {name: [r.at for r in seen if r.path.startswith(f"/p?{name}")] for name in hosts}
    assert {name: len(times) for name, times in by_host.items()} == {"a": per_host, "b": per_host}
    # The limiter lets out burst + rate x window: 2 + 20 a second. A request arriving up to 0.1 s
    # after its release widens the window by that much: 2 more.
    most = 20 + 2 + 2
    assert busiest_second(by_host["a"]) <= most
    assert busiest_second(by_host["b"]) <= most
    assert busiest_second([r.at for r in seen]) > most


TIMED_OUT = f"{StageTimeout.__module__}.{StageTimeout.__qualname__}"
"""The ``error_type`` of a dead letter for an attempt that ran past the stage's timeout."""


def abandoned_call_stage(rate: str) -> Stage:
    """A download stage whose attempts time out after 0.3 s and are not retried."""
    return Stage(
        download,
        name="download",
        timeout=0.3,
        retry=Retry(attempts=1),
        options={"trust_env": False, "rate_per_host": rate},
    )


async def test_rate_wait_abandoned_by_a_timeout_ends_with_the_stage(http_server: LoopbackServer) -> None:
    """A thread still waiting for its host's turn when the run ends is released, not left behind."""
    first = http_server.add("/first", b"x")
    second = http_server.add("/second", b"x")
    items = [{"id": 1, "url": first}, {"id": 2, "url": second}]

    # 1/min: the first request goes at once, the second would wait a minute.
    async with asyncio.timeout(10):  # less than the grace period an unreleased thread is given
        run = await run_stages_async(items, abandoned_call_stage("1/min"))

    assert [item["id"] for item in run.outputs] == [1]
    assert [(d["key"], d["error_type"]) for d in run.dead_letters] == [(2, TIMED_OUT)]
    assert run.report.abandoned_threads == 0
    assert http_server.hits("/second") == 0


async def test_redirect_hop_waits_for_its_own_host(http_server: LoopbackServer) -> None:
    """A redirect to another host counts against that host's rate, not the first URL's."""
    port = http_server.port
    http_server.add("/taken", b"x")
    http_server.add("/target", b"x")
    http_server.route("/hop", Route(status=302, location=f"http://localhost:{port}/target"))
    items = [
        {"id": 1, "url": f"http://localhost:{port}/taken"},  # uses localhost's one request a minute
        {"id": 2, "url": f"http://127.0.0.1:{port}/hop"},  # 127.0.0.1 is free; its hop is not
    ]

    async with asyncio.timeout(10):
        run = await run_stages_async(items, abandoned_call_stage("1/min"))

    assert [item["id"] for item in run.outputs] == [1]
    assert [(d["key"], d["error_type"]) for d in run.dead_letters] == [(2, TIMED_OUT)]
    assert (http_server.hits("/hop"), http_server.hits("/target")) == (1, 0)
