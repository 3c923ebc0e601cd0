"""Per-host pacing: ``rate_per_host`` (:class:`_HostRates`) and Retry-After pauses (:class:`_HostGate`).

Both are waited on from the worker threads, inside an attempt's deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import urllib.parse
from collections.abc import Callable

import aiolimiter

from pipeline import TransientError, parse_rate

from ._errors import _redact


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
                raise self._closed_error(url, host)
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
            raise self._closed_error(url, host) from None
        finally:
            with self._lock:
                self._pending.discard(future)

    def _closed_error(self, url: str, host: str) -> TransientError:
        return TransientError(
            f"GET {_redact(url)} was not sent: the download stage closed while it waited "
            f"for host {host!r}'s rate_per_host ({self._rate})"
        )

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
