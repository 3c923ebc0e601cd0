"""DSNs: parse ``mysql://`` and ``sqlite:///`` DSNs, hide their passwords, find the env password.

* ``mysql://user[:password]@host[:port]/db[?unix_socket=/path]`` (``mariadb://`` too). The
  password comes from ``PIPELINE_DB_<NAME>_PASSWORD`` when that is set, else from the DSN.
* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

A password never appears in a message or a ``repr``: every message shows :func:`redact`'s form.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from pipeline import ConfigError

from ._sql import Dialect

__all__ = ["redact"]


def redact(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``, safe to log or show.

    Everything up to the last ``@`` of the authority counts as the user part, so a password
    holding an unescaped ``/`` or ``@`` is still hidden; ``password=`` and ``passwd=`` query
    parameters are hidden too.

    Args:
        dsn: A DSN, well-formed or not.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return dsn
    if scheme.lower() != "sqlite":
        query_at = rest.find("?")
        authority_end = len(rest) if query_at < 0 else query_at
        at = rest.rfind("@", 0, authority_end)
        if at >= 0:
            user, colon, _ = rest[:at].partition(":")
            if colon:
                rest = f"{user}:***{rest[at:]}"
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
    try:
        parts = urlsplit(dsn)
        port = parts.port or 3306
    except ValueError:
        # Not chained: a urlsplit message could quote part of the authority.
        raise ConfigError(
            f"database {name!r} has a malformed DSN {shown!r}; write mysql://user@host:port/db"
        ) from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"unix_socket"})
    if unknown:
        raise ConfigError(
            f"database {name!r} has DSN {shown!r} with unknown parameters {unknown}; "
            "only ?unix_socket=/path is understood"
        )
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigError(f"database {name!r} has DSN {shown!r} without a database name; end it with /dbname")
    if not parts.username:
        raise ConfigError(f"database {name!r} has DSN {shown!r} without a user; write mysql://user@host/db")
    env_password = os.environ.get(f"PIPELINE_DB_{_env_name(name)}_PASSWORD")
    password = env_password if env_password is not None else unquote(parts.password or "")
    return _Target(
        dialect="mysql",
        redacted=shown,
        host=parts.hostname or "127.0.0.1",
        port=port,
        user=unquote(parts.username),
        password=password,
        database=database,
        unix_socket=query.get("unix_socket") or None,
    )
