"""DownloadError, and the one boundary where requests' errors become the engine's.

Also what every message needs: a URL without its userinfo (:func:`_redact`), an answer's status
as text, and the seconds a ``Retry-After`` asks for.
"""

from __future__ import annotations

import email.utils
import http
import math
import urllib.parse

import requests
import urllib3

from pipeline import TransientError


class DownloadError(Exception):
    """The download failed in a way a retry will not fix; the item is dead-lettered.

    Attributes:
        url: The URL, without userinfo.
        status: The HTTP status, when the server answered.
    """

    # Public as stages.http.DownloadError: dead letters and tracebacks name it so.
    __module__ = "stages.http"

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


def _past_deadline(shown: str, seconds: float) -> TransientError:
    return TransientError(
        f"GET {shown} did not finish within {seconds:g}s (deadline); the server is too slow or "
        "trickles its answer. Raise the stage's timeout (or deadline) if it is only slow"
    )
