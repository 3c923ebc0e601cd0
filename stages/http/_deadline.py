"""The attempt deadline: a watchdog thread shuts the sockets of an attempt that outlives it.

Each worker thread's current :class:`_Attempt` is found through a thread-local; the watched
connections report each socket they open or reuse to it, and new ones are checked against
``deny_private`` before anything is sent (:meth:`_HostCheck.peer`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from typing import Any

import requests.adapters
import urllib3
import urllib3.connection
import urllib3.connectionpool

from ._hosts import _HostCheck


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


class _WatchedTLSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    """:class:`_WatchedConnection` for https: the peer is checked before the TLS handshake."""


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
