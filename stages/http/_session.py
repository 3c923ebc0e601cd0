"""The requests sessions: one per worker thread, each checking every request it sends."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import requests

from ._deadline import _attempt
from ._errors import _redact
from ._gate import _HostGate, _HostRates, _origin
from ._hosts import _HostCheck


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
