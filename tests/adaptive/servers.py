"""Loopback HTTP servers with a known optimum, and a small HTTP stage, for tests and the benchmark.

:class:`KneeServer` answers ``GET /<anything>`` on ``127.0.0.1``:

* a *capacity knee*: with ``n`` requests in flight (itself included) an answer takes
  ``base * max(1, n / knee) * (1 + degrade * max(0, n - knee) / knee)`` seconds: flat up to
  ``knee``, then growing, and (with ``degrade > 0``) slightly worse than a plain queue, as a real
  server thrashes past its capacity: so the best fixed cap is ``knee``;
* a *rate wall*: with ``wall`` set, a token bucket of ``wall`` requests per second (``burst``
  deep); a request over it gets ``429 Too Many Requests`` at once;
* a *concurrency wall*: with ``wall_in_flight`` set, a request that arrives while that many are
  being answered gets a 429 at once: a wall that does not depend on how fast the client is;
* a *shift*: :meth:`KneeServer.shift` changes the knee while requests are being served, and
  ``shift_after`` does it by itself after that many answers.

:func:`fetch` is a minimal ``@factory`` stage (``requests`` in the thread pool, one session per
thread) that raises :class:`~pipeline.Overloaded` on 429 and 503, the loss signal adaptive limits
need.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import requests
import requests.adapters

from pipeline import Context, Item, Overloaded, factory

__all__ = ["KneeServer", "fetch"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30.0
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        status, delay = self.server.owner._enter()
        try:
            if delay:
                time.sleep(delay)  # the origin being slow: what the controllers measure
            body = b"ok" if status == 200 else b"slow down"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.server.owner._leave(status)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: KneeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class KneeServer:
    """A loopback server whose capacity is known (see the module docstring).

    Args:
        base: Seconds per answer below the knee.
        knee: Requests in flight the server takes without slowing down.
        degrade: Extra slowness per 100% of overload beyond a plain queue.
        wall: Requests per second before 429s, or ``None`` for no wall.
        burst: Depth of the wall's token bucket; a tenth of a second's worth by default.
        shift_after: After this many answers, the knee becomes ``shift_to``.
        shift_to: The knee after the shift.
        wall_in_flight: Requests being answered before 429s, or ``None`` for no such wall.
    """

    def __init__(
        self,
        *,
        base: float = 0.02,
        knee: int = 16,
        degrade: float = 0.0,
        wall: float | None = None,
        burst: float | None = None,
        shift_after: int | None = None,
        shift_to: int | None = None,
        wall_in_flight: int | None = None,
    ) -> None:
        self.base = base
        self.knee = knee
        self.degrade = degrade
        self.wall = wall
        self.burst = burst if burst is not None else max(1.0, (wall or 0) * 0.1)
        self.shift_after = shift_after
        self.shift_to = shift_to
        self.wall_in_flight = wall_in_flight
        self._serving = 0  # requests in flight that will be answered 200
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._refilled = time.monotonic()
        self.in_flight = 0
        self.max_in_flight = 0
        self.ok = 0
        self.rejected = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread: threading.Thread | None = None
        self.port = int(self._server.server_address[1])

    def url(self, path: str = "/x") -> str:
        """The URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def shift(self, knee: int) -> None:
        """Change the knee now."""
        with self._lock:
            self.knee = knee

    def _enter(self) -> tuple[int, float]:
        with self._lock:
            if self.wall_in_flight is not None and self._serving >= self.wall_in_flight:
                self.rejected += 1
                self.in_flight += 1
                return 429, 0.0
            if self.wall is not None:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.wall)
                self._refilled = now
                if self._tokens < 1:
                    self.rejected += 1
                    self.in_flight += 1
                    return 429, 0.0
                self._tokens -= 1
            self.in_flight += 1
            self._serving += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.ok += 1
            if self.shift_after is not None and self.shift_to is not None and self.ok == self.shift_after:
                self.knee = self.shift_to
            n, k = self.in_flight, self.knee
        over = max(0.0, (n - k) / k)
        return 200, self.base * max(1.0, n / k) * (1 + self.degrade * over)

    def _leave(self, status: int) -> None:
        with self._lock:
            self.in_flight -= 1
            if status == 200:
                self._serving -= 1

    def __enter__(self) -> KneeServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)


@factory
@contextlib.asynccontextmanager
async def fetch(ctx: Context, *, timeout: float = 10.0) -> AsyncIterator[Callable[[Item], Item]]:  # noqa: ASYNC109
    """GET ``item["url"]`` in the thread pool; 429/503 raise :class:`~pipeline.Overloaded`."""
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def session() -> requests.Session:
        s: requests.Session | None = getattr(local, "session", None)
        if s is None:
            s = requests.Session()
            s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=1, max_retries=0))
            local.session = s
            with lock:
                sessions.append(s)
        return s

    def get(item: Item) -> Item:
        response = session().get(item["url"], timeout=timeout)
        if response.status_code in (429, 503):
            raise Overloaded(f"GET {item['url']} answered {response.status_code}")
        response.raise_for_status()
        return {**item, "status": response.status_code}

    try:
        yield get
    finally:
        for s in sessions:
            s.close()
