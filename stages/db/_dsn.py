"""DSNs: parse ``mysql://`` and ``sqlite:///`` DSNs, hide their passwords, find the env password.

* ``mysql://user[:password]@host[:port]/db[?unix_socket=/path]`` (``mariadb://`` too). The
  password comes from ``PIPELINE_DB_<NAME>_PASSWORD`` when that is set, else from the DSN.
  The userinfo runs to the *last* ``@``, so a password may hold ``?``, ``#``, ``/``, ``@`` and
  ``:`` unescaped (percent-escapes such as ``%40`` are decoded too); :func:`redact` reads it
  the same way, so what the parser takes for the password is what it hides.
* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

A password never appears in a message or a ``repr``: every message shows :func:`redact`'s form.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from pipeline import ConfigError

from ._sql import Dialect

__all__ = ["redact"]


def _split_userinfo(rest: str) -> tuple[str, str | None, str]:
    """Split what follows ``scheme://`` into ``(user, password or None, host and the rest)``.

    The userinfo ends at the *last* ``@``, as the parser below reads it: a password may hold
    ``?``, ``#``, ``/``, ``@`` and ``:`` unescaped. The user ends at its first ``:``.
    """
    at = rest.rfind("@")
    if at < 0:
        return "", None, rest
    user, colon, password = rest[:at].partition(":")
    return user, (password if colon else None), rest[at + 1 :]


def redact(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``, safe to log or show.

    The user part runs to the last ``@`` (as the DSN parser reads it), so a password holding
    unescaped ``?``, ``#``, ``/``, ``@`` or ``:`` is hidden whole; ``password=`` and ``passwd=``
    query parameters are hidden too.

    Args:
        dsn: A DSN, well-formed or not.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return dsn
    if scheme.lower() != "sqlite":
        user, password, host = _split_userinfo(rest)
        if password is not None:
            rest = f"{user}:***@{host}"
    rest = re.sub(r"(?i)([?&](?:password|passwd)=)[^&#]*", r"\1***", rest)
    return f"{scheme}{sep}{rest}"


def _env_name(name: str) -> str:
    """``name`` as it appears in ``PIPELINE_DB_<NAME>_PASSWORD``."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


@dataclass(frozen=True)
class _Target:
    """A parsed DSN. ``password`` is kept out of the repr."""

    dialect: Dialect
    redacted: str
    host: str = ""
    port: int = 3306
    user: str = ""
    password: str = field(default="", repr=False)
    database: str = ""
    unix_socket: str | None = None
    path: str = ""


def _parse_dsn(name: str, dsn: str) -> _Target:
    """Parse database ``name``'s DSN, taking the password from the environment when set.

    Raises:
        ConfigError: The DSN is unusable; the message shows it redacted.
    """
    shown = redact(dsn)
    scheme = dsn.partition("://")[0].lower()
    if scheme == "sqlite":
        if not dsn.lower().startswith("sqlite:///"):
            raise ConfigError(
                f"database {name!r} has DSN {shown!r}, but a SQLite DSN has no host: write "
                "sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        path = dsn[len("sqlite:///") :]
        if not path:
            raise ConfigError(f"database {name!r} has DSN {shown!r} without a file path; add one")
        return _Target(dialect="sqlite", redacted=shown, path=path)
    if scheme not in ("mysql", "mariadb"):
        raise ConfigError(
            f"database {name!r} has DSN {shown!r} with scheme {scheme!r}; "
            "use mysql://user@host:port/db or sqlite:///path.db"
        )
    user, password, location = _split_userinfo(dsn.partition("://")[2])
    hostport, slash, tail = location.partition("/")
    path, _, query_text = tail.partition("?")
    host, port = _host_port(hostport)
    if host is None:
        raise ConfigError(
            f"database {name!r} has a malformed DSN {shown!r} (host and port {hostport!r}); "
            "write mysql://user@host:port/db"
        )
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    unknown = sorted(set(query) - {"unix_socket"})
    if unknown:
        raise ConfigError(
            f"database {name!r} has DSN {shown!r} with unknown parameters {unknown}; "
            "only ?unix_socket=/path is understood"
        )
    database = unquote(path)
    if not slash or not database or "/" in database:
        raise ConfigError(f"database {name!r} has DSN {shown!r} without a database name; end it with /dbname")
    if not user:
        raise ConfigError(f"database {name!r} has DSN {shown!r} without a user; write mysql://user@host/db")
    env_password = os.environ.get(f"PIPELINE_DB_{_env_name(name)}_PASSWORD")
    password = env_password if env_password is not None else unquote(password or "")
    return _Target(
        dialect="mysql",
        redacted=shown,
        host=host or "127.0.0.1",
        port=port,
        user=unquote(user),
        password=password,
        database=database,
        unix_socket=query.get("unix_socket") or None,
    )


def _host_port(hostport: str) -> tuple[str | None, int]:
    """``host[:port]`` or ``[v6]:port`` as ``(host, port)``; ``(None, 0)`` when malformed."""
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            return None, 0
        port_text = after[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if any(c in host for c in "/?#@ "):
        return None, 0
    if not port_text:
        return host, 3306
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None, 0
    return host, int(port_text)
