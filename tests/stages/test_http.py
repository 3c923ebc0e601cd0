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

import stages.http._hosts
from pipeline import (
    ConfigError,
    Item,
    Overloaded,
    Pipeline,
    Retry,
    RetryAfter,
    Stage,
    TransientError,
)
from pipeline.testing import memory_source, open_context, run_stages_async
from stages.http import DownloadError, download
from stages.http._errors import _redact, _retry_after_seconds
from stages.http._gate import _HostGate
from stages.http._hosts import _HostCheck, _private_reason
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


@pytest.mark.parametrize(("status", "header"), [(429, "7"), (503, "2")])
async def test_retry_after_pauses_its_host_not_the_stage(
    http_server: LoopbackServer, open_download: OpenDownload, status: int, header: str
) -> None:
    """429 or 503 with Retry-After raises Overloaded (not the stage-wide RetryAfter) and pauses
    that origin: the next call to it, whose deadline ends first, is not sent."""
    url = http_server.add_flaky("/r.jpg", b"ok", failures=1, status=status, retry_after=header)
    fetch = await open_download(deadline=1.0)

    with pytest.raises(
        Overloaded, match=rf"pausing host http://127\.0\.0\.1:{http_server.port} for {header}s"
    ) as info:
        await call(fetch, url)
    assert not isinstance(info.value, RetryAfter)
    assert str(status) in str(info.value)

    with pytest.raises(TransientError, match="is paused for another"):
        await call(fetch, url)
    assert http_server.hits("/r.jpg") == 1


async def test_retry_after_zero_lets_the_retry_through(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A Retry-After of 0 pauses nothing: the retry is sent and succeeds."""
    url = http_server.add_flaky("/r.jpg", b"ok", failures=1, status=429, retry_after="0")
    fetch = await open_download()

    with pytest.raises(Overloaded):
        await call(fetch, url)
    assert (await call(fetch, url))["body"] == b"ok"


async def test_retry_after_is_capped_by_max_retry_after(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """A Retry-After longer than max_retry_after is cut to max_retry_after."""
    url = http_server.add_flaky("/r.jpg", b"ok", failures=1, status=429, retry_after="86400")
    fetch = await open_download(max_retry_after=60)

    with pytest.raises(Overloaded, match="for 60s"):
        await call(fetch, url)


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
    real = stages.http._hosts._resolve
    # 'localhost' passes as a public host (TEST-NET would not: it is reserved), so the first
    # request goes out; the connection itself still resolves it for real.
    monkeypatch.setattr(
        stages.http._hosts, "_resolve", lambda host: ["93.184.216.34"] if host == "localhost" else real(host)
    )
    # The connected peer (127.0.0.1) would be refused on its own; that check has its own test.
    monkeypatch.setattr(stages.http._hosts._HostCheck, "peer", lambda self, address, host, shown: None)
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
        ("::ffff:127.0.0.1", "an IPv4-mapped address embedding 127.0.0.1, a loopback address"),
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


RATE_WAIT_TOO_LONG = "pipeline.TransientError"
"""The ``error_type`` of a dead letter for a request whose rate wait outlasted its deadline."""


def abandoned_call_stage(rate: str) -> Stage:
    """A download stage whose attempts time out after 0.3 s (deadline 0.27 s), not retried."""
    return Stage(
        download,
        name="download",
        timeout=0.3,
        retry=Retry(attempts=1),
        options={"trust_env": False, "rate_per_host": rate},
    )


async def test_rate_wait_abandoned_by_a_timeout_ends_with_the_stage(http_server: LoopbackServer) -> None:
    """A thread waiting for its host's turn gives up at its deadline, before the stage's timeout."""
    first = http_server.add("/first", b"x")
    second = http_server.add("/second", b"x")
    items = [{"id": 1, "url": first}, {"id": 2, "url": second}]

    # 1/min: the first request goes at once, the second would wait a minute.
    async with asyncio.timeout(10):  # less than the grace period an unreleased thread is given
        run = await run_stages_async(items, abandoned_call_stage("1/min"))

    assert [item["id"] for item in run.outputs] == [1]
    assert [(d["key"], d["error_type"]) for d in run.dead_letters] == [(2, RATE_WAIT_TOO_LONG)]
    assert "deadline passed while it waited" in run.dead_letters[0]["message"]
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
    assert [(d["key"], d["error_type"]) for d in run.dead_letters] == [(2, RATE_WAIT_TOO_LONG)]
    assert (http_server.hits("/hop"), http_server.hits("/target")) == (1, 0)


# -- URLs the parsers disagree on ---------------------------------------------------------


async def test_backslash_url_is_refused_before_connecting(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """'http://127.0.0.1:PORT\\@images.example.com/' reads as images.example.com to urllib.parse but
    requests connects to 127.0.0.1: it is refused for good, and no connection is made."""
    http_server.add("/img/1.jpg", b"x")
    fetch = await open_download(allowed_hosts=["images.example.com"])
    url = f"http://127.0.0.1:{http_server.port}\\@images.example.com/img/1.jpg"

    with pytest.raises(DownloadError, match=r"would connect to host '127\.0\.0\.1'.*fix the URL"):
        await call(fetch, url)

    assert http_server.connections == 0


def test_backslash_url_toward_the_metadata_address_is_refused_by_deny_private() -> None:
    """The same trick toward 169.254.169.254 is refused by the check, before any connection
    (the check runs before a request is sent; nothing here opens a socket)."""
    check = _HostCheck(None, None, deny_private=True, resolve=lambda host: ["93.184.216.34"])

    with pytest.raises(DownloadError, match=r"would connect to host '169\.254\.169\.254'"):
        check("http://169.254.169.254\\@images.example.com/latest/meta-data/", what="URL")


def test_an_internationalised_host_name_is_not_taken_for_ambiguous() -> None:
    """A non-ASCII host is compared in the IDNA form requests sends, so it passes as itself."""
    check = _HostCheck(["xn--bcher-kva.example", "xn--fa-hia.de"])
    assert check.prepare("http://Bücher.example/x.jpg", what="URL") == "http://xn--bcher-kva.example/x.jpg"
    check("http://faß.de/x", what="URL")


def test_host_rules_apply_to_the_host_requests_connects_to() -> None:
    """Allowed and denied hosts are matched against the host of the URL as requests prepares it."""
    check = _HostCheck(["127.0.0.1"], ["localhost"])
    with pytest.raises(DownloadError):
        check("http://localhost:1\\@127.0.0.1/x.jpg", what="URL")
    check("http://127.0.0.1:1/%5C@localhost/x.jpg", what="URL")  # the prepared form: host 127.0.0.1


# -- a total deadline ---------------------------------------------------------------------

TRICKLE = b"x" * 100
"""A body trickled one byte every 0.05 s: 5 s in all, far past the 0.5 s deadline of these tests."""


@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
async def test_a_trickling_server_is_cut_off_at_the_deadline(
    http_server: LoopbackServer, open_download: OpenDownload, headers: bool
) -> None:
    """A server sending a byte every 0.05 s never trips read_timeout (1 s); the deadline (0.5 s)
    closes the connection from the watchdog, the call raises TransientError naming the deadline
    on its own thread, and the server sees the connection gone before it sent its answer."""
    url = http_server.add_trickle("/slow.jpg", TRICKLE, interval=0.05, headers=headers)
    fetch = await open_download(read_timeout=1.0, deadline=0.5)

    with pytest.raises(TransientError, match=r"did not finish within 0\.5s \(deadline\)"):
        await call(fetch, url)

    await asyncio.to_thread(http_server.wait_until, lambda: http_server.in_flight == 0)
    assert http_server.trickled("/slow.jpg") < len(TRICKLE)


async def test_the_deadline_defaults_from_the_stage_timeout(http_server: LoopbackServer) -> None:
    """Run by the engine with timeout = 1 and no deadline option, a trickled body ends in the
    stage's own deadline error (not the engine's StageTimeout), and its slot is free again:
    the item after it, on the same single slot, succeeds."""
    slow = http_server.add_trickle("/slow.jpg", TRICKLE, interval=0.05)
    ok = http_server.add("/ok.jpg", b"ok")
    stage = Stage(
        download,
        name="download",
        concurrency=1,
        timeout=1.0,
        retry=Retry(attempts=1),
        options={"trust_env": False, "read_timeout": 1.0},
    )

    async with asyncio.timeout(30):
        run = await run_stages_async([{"id": 1, "url": slow}, {"id": 2, "url": ok}], stage)

    assert [item["id"] for item in run.outputs] == [2]
    assert [(d["key"], d["error_type"]) for d in run.dead_letters] == [(1, "pipeline.TransientError")]
    assert "(deadline)" in run.dead_letters[0]["message"]
    assert run.report.abandoned_threads == 0


# -- Retry-After pauses the host that asked -----------------------------------------------


async def test_retry_after_pauses_only_the_origin_that_asked(http_server: LoopbackServer) -> None:
    """Host A answers 429 Retry-After: 30; every item on host B (another origin: another port)
    completes while A is paused, long before the 30 s are over. A's item, whose host stays
    paused past its attempt's deadline, fails transiently naming the pause."""
    with LoopbackServer() as other:
        paused = http_server.add_flaky("/a.jpg", b"a", failures=5, status=429, retry_after="30")
        b_items = [{"id": f"b{i}", "url": other.add(f"/b{i}.jpg", b"b")} for i in range(8)]
        stage = Stage(
            download,
            name="download",
            concurrency=2,
            timeout=5.0,
            retry=Retry(attempts=2, backoff=0, jitter=0),
            options={"trust_env": False},
        )

        async with asyncio.timeout(15):  # the 30 s pause of the whole stage would blow this
            run = await run_stages_async([{"id": "a", "url": paused}, *b_items], stage)

    assert sorted(item["id"] for item in run.outputs) == sorted(item["id"] for item in b_items)
    assert [(d["key"], d["attempts"]) for d in run.dead_letters] == [("a", 2)]
    assert f"host http://127.0.0.1:{http_server.port} is paused" in run.dead_letters[0]["message"]
    assert http_server.hits("/a.jpg") == 1  # the retry was not sent to the paused host


def test_host_gate_holds_one_origin_until_its_pause_ends() -> None:
    """The per-host gate, on a fake clock: a paused origin waits out a pause that ends before
    the deadline, fails at once if it does not, and other origins never wait."""
    now = [100.0]
    gate = _HostGate(clock=lambda: now[0])
    gate.pause("http://a:80", 30.0)

    assert gate.delay("http://b:80", deadline=200.0) == 0.0
    assert gate.delay("http://a:80", deadline=200.0) == 30.0
    with pytest.raises(TransientError, match=r"host http://a:80 is paused for another 30s"):
        gate.delay("http://a:80", deadline=110.0)
    now[0] = 130.0
    assert gate.delay("http://a:80", deadline=140.0) == 0.0


# -- the connected peer is checked --------------------------------------------------------


async def test_deny_private_checks_the_address_actually_connected(
    http_server: LoopbackServer, open_download: OpenDownload, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a name that answers a public address to the check and 127.0.0.1 to the
    connection is refused once connected, before any request is sent on it."""
    url = http_server.add("/a.jpg", b"x").replace("127.0.0.1", "rebind.test")
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        if not answers:
            # The first answer is public; it must only ever be checked, never connected to.
            assert port is None, "the public answer reached a connection"
            answers.append("93.184.216.34")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]
        answers.append("127.0.0.1")
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetch = await open_download(deny_private=True)

    with pytest.raises(DownloadError, match=r"connected to '127\.0\.0\.1', a loopback address"):
        await call(fetch, url)

    assert answers == ["93.184.216.34", "127.0.0.1"]
    assert http_server.hits("/a.jpg") == 0


# -- custom headers stay with their host --------------------------------------------------


async def test_custom_headers_are_dropped_on_a_redirect_to_another_host(
    http_server: LoopbackServer, open_download: OpenDownload
) -> None:
    """X-Api-Key goes to the first host and to a same-origin hop, not to a redirect to another
    host (localhost vs 127.0.0.1), as requests does for Authorization; User-Agent stays."""
    port = http_server.port
    http_server.route("/start", Route(status=302, location="/same"))
    http_server.route("/same", Route(status=302, location=f"http://localhost:{port}/away.jpg"))
    http_server.add("/away.jpg", b"x")
    fetch = await open_download(headers={"X-Api-Key": "secret"}, user_agent="thumbs/2")

    await call(fetch, http_server.url("/start"))

    sent = {r.path: r.headers for r in http_server.requests}
    assert sent["/start"]["X-Api-Key"] == sent["/same"]["X-Api-Key"] == "secret"
    assert "X-Api-Key" not in sent["/away.jpg"]
    assert sent["/away.jpg"]["User-Agent"] == "thumbs/2"


# -- IPv6 addresses that embed an IPv4 one ------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("2002:7f00:1::1", "a 6to4 address embedding 127.0.0.1, a loopback address"),
        ("2002:a00:1::", "a 6to4 address embedding 10.0.0.1, a private address"),
        ("2002:a9fe:a9fe::", "a 6to4 address embedding 169.254.169.254, a link-local address"),
        ("64:ff9b::7f00:1", "a NAT64 address embedding 127.0.0.1, a loopback address"),
        ("64:ff9b::a9fe:a9fe", "a NAT64 address embedding 169.254.169.254, a link-local address"),
        ("64:ff9b:1::a00:1", "a local-use NAT64 address"),
        ("::ffff:10.0.0.1", "an IPv4-mapped address embedding 10.0.0.1, a private address"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "a Teredo address"),
        ("2002:5db8:d822::1", None),  # 6to4 of 93.184.216.34: public
        ("64:ff9b::5db8:d822", None),  # NAT64 of 93.184.216.34: public
    ],
)
def test_deny_private_sees_ipv4_inside_ipv6(address: str, reason: str | None) -> None:
    """6to4, NAT64 and IPv4-mapped addresses are judged by the IPv4 address they embed;
    local-use NAT64 and Teredo are refused outright."""
    got = _private_reason(ipaddress.ip_address(address))
    assert got == reason if reason is None else (got or "").startswith(reason)


# -- the memory budget --------------------------------------------------------------------


async def test_downloads_in_flight_count_max_bytes_against_the_memory_budget(
    http_server: LoopbackServer,
) -> None:
    """With memory_budget = 2.5 x max_bytes, each download in flight is charged max_bytes
    (its worst case), so at most 2 run at once although the stage has 4 slots."""
    max_bytes = 1_000_000
    urls = [http_server.add(f"/{i}.jpg", b"x" * 100) for i in range(12)]
    stage = Stage(
        download,
        name="download",
        concurrency=4,
        retry=Retry(attempts=1),
        options={"trust_env": False, "max_bytes": max_bytes},
    )
    pipeline = Pipeline(
        source=memory_source([{"id": i, "url": url} for i, url in enumerate(urls)]),
        stages=[stage],
        report_dir=None,
        ledger=False,
        memory_budget=int(2.5 * max_bytes),
    )

    async with asyncio.timeout(30):
        report = await pipeline.run_async(progress=False)

    assert report.items.ok == 12
    assert max_bytes <= report.memory["peak_charged_bytes"] <= 2.5 * max_bytes
    assert http_server.max_in_flight <= 2


# -- the package's public surface ---------------------------------------------------------


def test_public_names_resolve_and_are_shown_as_stages_http() -> None:
    """Every name in stages.http.__all__ exists, and the error and the stage carry stages.http as
    their module, so dead letters record stages.http.DownloadError rather than a private path."""
    assert len(stages.http.__all__) == len(set(stages.http.__all__))
    for name in stages.http.__all__:
        assert getattr(stages.http, name) is not None
    for obj in (DownloadError, download):
        assert obj.__module__ == "stages.http"
