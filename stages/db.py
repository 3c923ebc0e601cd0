"""SQL stages: stream rows out of a database, look rows up per item, record results.

The engine knows nothing of SQL: it hands a stage ``ctx.database(name)``, a DSN and the one
:class:`~pipeline.CapacityLimiter` that every stage touching that database shares. This module
does the rest, for two kinds of database:

* ``mysql://user[:password]@host[:port]/db[?unix_socket=/path]`` (MySQL or MariaDB, through
  aiomysql). The password comes from ``PIPELINE_DB_<NAME>_PASSWORD`` when that is set,
  else from the DSN.
* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (through aiosqlite), the
  embedded default.

One :class:`Database` (one connection pool) is opened per database per run, through
``ctx.shared(f"db:{name}", ...)``, and closed by the engine at the end of the run. Every use of a
connection holds the database's limiter, and the pool never holds more connections than the
limiter's total when the pool opened, so the server never sees more than that many connections
from a run.

Errors from the drivers are translated in one place (:meth:`Database._translate`): lost or
refused connections, "too many connections", lock-wait timeouts, deadlocks and SQLite's
"database is locked" become :class:`~pipeline.TransientError` (retried); anything else becomes a
:class:`DatabaseError` that names the database (with its DSN redacted) and what failed. A
password never appears in a log line, an exception message or a ``repr``.

:func:`mysql_ledger` keeps the run ledger (:class:`~pipeline.RunLedger`) in a table of such a
database instead of the default SQLite file, so several workers can share runs.

SQL given to this module uses ``?`` placeholders for either kind; they are translated to ``%s``
for MySQL, outside string literals and comments.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import aiomysql
import aiosqlite
import pymysql
from pydantic import Field

from pipeline import (
    BufferedLedger,
    CapacityLimiter,
    ConfigError,
    Context,
    DatabaseHandle,
    Item,
    Overloaded,
    ResourceError,
    RunLedger,
    Skip,
    TransientError,
    encode_key,
    factory,
)

__all__ = [
    "Database",
    "DatabaseError",
    "RowNotFoundError",
    "execute_script",
    "TableLedger",
    "lookup",
    "mysql_ledger",
    "read_rows",
    "redact",
    "shared_database",
    "write_results",
]

log = logging.getLogger(__name__)

Dialect = Literal["mysql", "sqlite"]
Params = Sequence[Any]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# MySQL/MariaDB error codes worth another attempt: the connection was refused, lost or killed,
# the server is full or shutting down, or the statement lost a lock race.
_MYSQL_TRANSIENT_CODES = frozenset(
    {
        1040,  # ER_CON_COUNT_ERROR: too many connections
        1053,  # ER_SERVER_SHUTDOWN
        1205,  # ER_LOCK_WAIT_TIMEOUT
        1213,  # ER_LOCK_DEADLOCK
        1927,  # ER_CONNECTION_KILLED (MariaDB)
        2002,  # CR_CONNECTION_ERROR: unix socket refused
        2003,  # CR_CONN_HOST_ERROR: TCP connection refused
        2006,  # CR_SERVER_GONE_ERROR
        2013,  # CR_SERVER_LOST
        2055,  # CR_SERVER_LOST_EXTENDED
    }
)

# A hint per permanent MySQL error code, so the message names the fix.
_MYSQL_HINTS = {
    1044: "grant the user access to this database",
    1045: "check the user name and the password (PIPELINE_DB_{env}_PASSWORD or the DSN)",
    1049: "check the database name in the DSN",
    1054: "check the column names in the query",
    1064: "fix the SQL syntax",
    1146: "create the table or fix its name in the query",
}

_DEFAULT_CONNECT_TIMEOUT = 10.0
_DEFAULT_BUSY_TIMEOUT = 5.0
# Below the usual server wait_timeout (8 hours), so an idle pooled connection is replaced
# before the server drops it under us.
_DEFAULT_POOL_RECYCLE = 3600.0


class DatabaseError(ResourceError):
    """A database operation failed in a way a retry will not fix.

    The message names the database, its redacted DSN, what was being done and the fix; the
    driver's exception is chained as ``__cause__``. A :class:`~pipeline.ResourceError`, so a
    database refused when the run opens it (a wrong password, an unknown database) fails the run
    with this message, not as an unexpected error with a traceback.

    Attributes:
        database: The ``[databases.<name>]`` name.
        dsn: The DSN with any password replaced by ``***``.
        action: What was being done, for example ``"looking up a row"``.
        code: The server's error code, when it gave one.
    """

    def __init__(self, message: str, *, database: str, dsn: str, action: str, code: int | None = None):
        self.database = database
        self.dsn = dsn
        self.action = action
        self.code = code
        super().__init__(message)


class RowNotFoundError(LookupError):
    """:func:`lookup` found no row for an item and its ``missing`` option is ``"fail"``."""


# --------------------------------------------------------------------------------------------
# DSNs


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


# --------------------------------------------------------------------------------------------
# SQL text


def _check_identifier(value: str, option: str) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ConfigError(
            f"{option} must be a plain SQL identifier (letters, digits and _, not starting with a "
            f"digit), got {value!r}"
        )
    return value


def _quote(dialect: Dialect, identifier: str) -> str:
    # Only ever called on names that passed _check_identifier, so no escaping is needed.
    return f"`{identifier}`" if dialect == "mysql" else f'"{identifier}"'


@functools.lru_cache(maxsize=256)
def _translate_sql(sql: str, dialect: Dialect) -> tuple[str, int]:
    """Return ``sql`` ready for the driver, and how many ``?`` placeholders it has.

    For MySQL, ``?`` becomes ``%s`` and ``%`` becomes ``%%`` (pymysql applies ``%`` formatting
    to the whole statement), except that ``?`` inside string literals, quoted identifiers and
    comments is left alone.
    """
    mysql = dialect == "mysql"
    out: list[str] = []
    count = 0
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\" and mysql and c != "`":
                    j += 2
                elif sql[j] == c and j + 1 < n and sql[j + 1] == c:
                    j += 2  # a doubled quote stands for itself
                elif sql[j] == c:
                    break
                else:
                    j += 1
            end = min(j + 1, n)
        elif sql.startswith("--", i) or (mysql and c == "#"):
            end = sql.find("\n", i)
            end = n if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
        else:
            if c == "?":
                count += 1
                out.append("%s" if mysql else "?")
            elif c == "%" and mysql:
                out.append("%%")
            else:
                out.append(c)
            i += 1
            continue
        chunk = sql[i:end]
        out.append(chunk.replace("%", "%%") if mysql else chunk)
        i = end
    return "".join(out), count


def _keyset_queries(
    dialect: Dialect, query: str, key_column: str, watermark_column: str | None = None
) -> tuple[str, str]:
    """Return the first-chunk and next-chunk statements (``?`` placeholders) for ``query``.

    Without ``watermark_column`` their parameters are ``(limit)`` and ``(last key, limit)``; with
    it, ``(since, limit)`` and ``(since, last key, limit)``.
    """
    body = query.strip().rstrip(";").rstrip()
    key = f"q.{_quote(dialect, key_column)}"
    # The newlines keep a trailing `-- comment` in the user's query from eating the wrapper.
    inner = f"SELECT * FROM (\n{body}\n) AS q"
    if watermark_column is None:
        first = f"{inner} ORDER BY {key} LIMIT ?"
        following = f"{inner} WHERE {key} > ? ORDER BY {key} LIMIT ?"
    else:
        changed = f"q.{_quote(dialect, watermark_column)} > ?"
        first = f"{inner} WHERE {changed} ORDER BY {key} LIMIT ?"
        following = f"{inner} WHERE {changed} AND {key} > ? ORDER BY {key} LIMIT ?"
    return first, following


# --------------------------------------------------------------------------------------------
# The database: a pool, the shared limiter, and the one error boundary


Mode = Literal["all", "one", "rowcount", "script", "many"]


class Database(abc.ABC):
    """A database opened for a run: its pool and its shared limiter.

    Every call takes one connection, under the database's limiter, for one statement, and
    gives it back. Use :func:`shared_database` to get the run's instance; the engine closes it.

    Attributes:
        name: The ``[databases.<name>]`` name.
        dialect: ``"mysql"`` or ``"sqlite"``.
        dsn: The DSN, redacted.
        limiter: The limiter shared by every stage using this database.
    """

    dialect: Dialect

    def __init__(self, name: str, target: _Target, limiter: CapacityLimiter):
        self.name = name
        self.dsn = target.redacted
        self.limiter = limiter

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.dsn}>"

    def quote(self, identifier: str) -> str:
        """Quote a plain identifier (checked with the same rule as the options) for this dialect."""
        return _quote(self.dialect, _check_identifier(identifier, "identifier"))

    async def fetch_all(
        self, sql: str, params: Params = (), *, action: str = "running a query"
    ) -> list[Item]:
        """Run ``sql`` (``?`` placeholders) and return every row as a dict. Keep results small."""
        rows: list[Item] = await self._run(sql, params, "all", action)
        return rows

    async def fetch_one(
        self, sql: str, params: Params = (), *, action: str = "running a query"
    ) -> Item | None:
        """Run ``sql`` and return its first row as a dict, or ``None`` when there is none."""
        row: Item | None = await self._run(sql, params, "one", action)
        return row

    async def execute(self, sql: str, params: Params = (), *, action: str = "running a statement") -> int:
        """Run one statement in autocommit mode and return the affected row count."""
        count: int = await self._run(sql, params, "rowcount", action)
        return count

    async def execute_many(
        self, sql: str, rows: Sequence[Params], *, action: str = "writing a batch"
    ) -> None:
        """Run one statement once per row of parameters, all in one transaction, on one connection.

        The limiter is held for the whole batch, as for any one statement.
        """
        text, placeholders = _translate_sql(sql, self.dialect)
        batch = tuple(tuple(row) for row in rows)
        for row in batch:
            if len(row) != placeholders:
                raise ValueError(
                    f"{action} on database {self.name!r}: the SQL has {placeholders} ? placeholders "
                    f"but a row has {len(row)} parameters; make them match"
                )
        if not batch:
            return
        try:
            async with self.limiter:
                await self._execute(text, batch, "many")
        except (pymysql.err.Error, sqlite3.Error, OSError) as exc:
            raise self._translate(exc, action) from exc

    async def _run(self, sql: str, params: Params, mode: Mode, action: str) -> Any:
        text, placeholders = _translate_sql(sql, self.dialect)
        if placeholders != len(params):
            raise ValueError(
                f"{action} on database {self.name!r}: the SQL has {placeholders} ? placeholders "
                f"but {len(params)} parameters were given; make them match"
            )
        try:
            async with self.limiter:
                return await self._execute(text, tuple(params), mode)
        except (pymysql.err.Error, sqlite3.Error, OSError) as exc:
            # OSError covers ConnectionError and TimeoutError.
            raise self._translate(exc, action) from exc

    async def _script(self, sql: str) -> None:
        try:
            async with self.limiter:
                await self._execute(sql, (), "script")
        except (pymysql.err.Error, sqlite3.Error, OSError) as exc:
            raise self._translate(exc, "running a script") from exc

    def _translate(self, exc: BaseException, action: str) -> Exception:
        """The one boundary: turn a driver error into TransientError or DatabaseError."""
        where = f"database {self.name!r} ({self.dsn})"
        code: int | None = None
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, pymysql.err.Error):
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            detail = str(exc.args[1]) if len(exc.args) > 1 else detail
            # InterfaceError means the connection was already closed under us.
            transient = isinstance(exc, pymysql.err.InterfaceError) or code in _MYSQL_TRANSIENT_CODES
        elif isinstance(exc, sqlite3.Error):
            text = str(exc).lower()
            transient = isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)
        else:
            transient = True
        label = f"error {code}: {detail}" if code is not None else f"{type(exc).__name__}: {detail}"
        if code == 1040:  # too many connections: a loss signal for adaptive limits
            return Overloaded(f"{action} on {where} failed ({label}); the attempt will be retried.")
        if transient:
            return TransientError(f"{action} on {where} failed ({label}); the attempt will be retried.")
        hint = _MYSQL_HINTS.get(code or 0, "check the SQL, the tables and the DSN").format(
            env=_env_name(self.name)
        )
        return DatabaseError(
            f"{action} on {where} failed ({label}); {hint}.",
            database=self.name,
            dsn=self.dsn,
            action=action,
            code=code,
        )

    @abc.abstractmethod
    async def _execute(self, sql: str, params: tuple[Any, ...], mode: Mode) -> Any: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...


class _MySQLDatabase(Database):
    dialect: Dialect = "mysql"

    def __init__(self, name: str, target: _Target, limiter: CapacityLimiter, pool: Any):
        super().__init__(name, target, limiter)
        self._pool = pool
        # aiomysql's pool does not wake its waiters when a closed connection is handed back, so
        # it must never have any: at most maxsize callers reach pool.acquire() at once. The
        # limiter usually guarantees that already, unless its total was raised after opening.
        self._slots = asyncio.Semaphore(pool.maxsize)

    async def _execute(self, sql: str, params: tuple[Any, ...], mode: Mode) -> Any:
        async with self._slots:
            conn = await self._pool.acquire()
            try:
                cur = await conn.cursor(aiomysql.DictCursor)
                if mode == "script":
                    await cur.execute(sql)  # no args: no %-formatting of the script
                    while await cur.nextset():
                        pass
                    result: Any = None
                elif mode == "many":
                    # On failure the connection is closed below, which rolls the batch back.
                    await conn.begin()
                    await cur.executemany(sql, params)
                    await conn.commit()
                    result = None
                else:
                    # Always a tuple, never None: pymysql only undoes the %% escaping when
                    # it formats arguments in.
                    count = await cur.execute(sql, params)
                    if mode == "all":
                        result = await cur.fetchall()
                    elif mode == "one":
                        result = await cur.fetchone()
                    else:
                        result = count
                await cur.close()
            except BaseException:
                # A failed statement may leave unread results or a half-sent packet behind:
                # never hand that connection to the next caller. (aiomysql already closes a
                # connection whose read was cancelled; this covers every other way out.)
                conn.close()
                raise
            finally:
                await self._pool.release(conn)
        return result

    async def _close(self) -> None:
        self._pool.close()
        await self._pool.wait_closed()


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Item:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


class _SQLiteDatabase(Database):
    """SQLite through a few aiosqlite connections, opened lazily, at most ``size`` of them.

    Each aiosqlite connection is a thread; WAL mode lets the readers run in parallel with
    each other and with the one writer, so the limiter's total means real parallelism for
    reads. Writers queue on SQLite's write lock for up to ``busy_timeout``.
    """

    dialect: Dialect = "sqlite"

    def __init__(
        self, name: str, target: _Target, limiter: CapacityLimiter, *, size: int, busy_timeout: float
    ):
        super().__init__(name, target, limiter)
        self._path = target.path
        # Every connection to ":memory:" is a different database: one connection only.
        self._size = 1 if target.path == ":memory:" else size
        self._busy_ms = int(busy_timeout * 1000)
        self._slots = asyncio.Semaphore(self._size)
        self._idle: list[aiosqlite.Connection] = []
        self._open: set[aiosqlite.Connection] = set()

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: autocommit, each statement its own transaction, so a
        # connection never carries an open transaction back into the pool.
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            conn.row_factory = _dict_row  # type: ignore[assignment]
            await conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            await conn.close()
            raise
        self._open.add(conn)
        return conn

    async def _discard(self, conn: aiosqlite.Connection) -> None:
        self._open.discard(conn)
        await conn.close()

    async def _execute(self, sql: str, params: tuple[Any, ...], mode: Mode) -> Any:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                if mode == "script":
                    await conn.executescript(sql)
                    result: Any = None
                elif mode == "many":
                    await conn.execute("BEGIN")
                    try:
                        await conn.executemany(sql, params)
                        await conn.execute("COMMIT")
                    except BaseException:
                        await asyncio.shield(conn.execute("ROLLBACK"))
                        raise
                    result = None
                else:
                    async with conn.execute(sql, params) as cur:
                        if mode == "all":
                            result = await cur.fetchall()
                        elif mode == "one":
                            result = await cur.fetchone()
                        else:
                            result = cur.rowcount
            except asyncio.CancelledError:
                # The statement may still be running in the connection's thread; closing
                # queues behind it, and the connection is not reused.
                await asyncio.shield(self._discard(conn))
                raise
            except BaseException:
                # An autocommit connection is sound after a failed statement: keep it.
                self._idle.append(conn)
                raise
            self._idle.append(conn)
        return result

    async def _close(self) -> None:
        conns, self._open, self._idle = list(self._open), set(), []
        for conn in conns:
            await conn.close()


def _option_seconds(handle: DatabaseHandle, key: str, default: float) -> float:
    value = handle.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"databases.{handle.name}.{key} must be a number of seconds >= 0, got {value!r}")
    return float(value)


@contextlib.asynccontextmanager
async def _open_database(
    handle: DatabaseHandle, *, multi_statements: bool = False
) -> AsyncIterator[Database]:
    """Open ``handle``'s pool, check that a connection works, and close the pool on exit."""
    target = _parse_dsn(handle.name, handle.dsn)
    size = handle.limiter.total
    db: Database
    if target.dialect == "mysql":
        pool = await aiomysql.create_pool(
            # minsize=0: every connection is opened inside the limiter, on demand.
            minsize=0,
            maxsize=size,
            pool_recycle=int(_option_seconds(handle, "pool_recycle", _DEFAULT_POOL_RECYCLE)),
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password,
            db=target.database,
            unix_socket=target.unix_socket,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=_option_seconds(handle, "connect_timeout", _DEFAULT_CONNECT_TIMEOUT),
            client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS if multi_statements else 0,
        )
        db = _MySQLDatabase(handle.name, target, handle.limiter, pool)
    else:
        db = _SQLiteDatabase(
            handle.name,
            target,
            handle.limiter,
            size=size,
            busy_timeout=_option_seconds(handle, "busy_timeout", _DEFAULT_BUSY_TIMEOUT),
        )
    try:
        # Fail at start-up, not once per item, when the server is down or the password wrong.
        await db.fetch_one("SELECT 1", action="connecting")
        log.debug("opened database %r (%s) with at most %d connections", handle.name, db.dsn, size)
        yield db
    finally:
        await db._close()
        log.debug("closed database %r (%s)", handle.name, db.dsn)


async def shared_database(ctx: Context, name: str) -> Database:
    """Return the run's :class:`Database` for ``[databases.<name>]``, opening it on first use.

    Every stage that asks for the same name gets the same pool and the same limiter; the
    engine closes it at the end of the run.

    Raises:
        ConfigError: The database is not configured, or its DSN or options are invalid.
        DatabaseError: The database refused the first connection (wrong password, unknown db).
        TransientError: The server could not be reached.
    """
    handle = ctx.database(name)
    return await ctx.shared(f"db:{handle.name}", lambda: _open_database(handle))


async def execute_script(dsn: str, sql: str, *, name: str = "script") -> None:
    """Run a multi-statement SQL script on ``dsn`` with one connection, outside any run.

    For seeding demo or test data. ``sql`` is sent as is (no placeholders). The password comes
    from ``PIPELINE_DB_<NAME>_PASSWORD`` or the DSN, as for a configured database.

    Args:
        dsn: A ``mysql://`` or ``sqlite:///`` DSN.
        sql: Statements separated by ``;``.
        name: The database name used for the password variable and in error messages.
    """
    handle = DatabaseHandle(name=name, dsn=dsn, limiter=CapacityLimiter(1, name=f"db:{name}"))
    async with _open_database(handle, multi_statements=True) as db:
        await db._script(sql)


# --------------------------------------------------------------------------------------------
# Stages


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _check_reconnect(attempts: int, backoff: float) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigError(f"reconnect_attempts must be an integer >= 1, got {attempts!r}")
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or backoff < 0:
        raise ConfigError(f"reconnect_backoff must be a number of seconds >= 0, got {backoff!r}")


_RECONNECT_MAX_WAIT = 10.0
"""The longest single wait between two attempts at a chunk."""


@factory
@contextlib.asynccontextmanager
async def read_rows(
    ctx: Context,
    *,
    database: str,
    query: str,
    key_column: str = "id",
    chunk_size: int = 1000,
    since: Any = None,
    watermark_column: str | None = None,
    reconnect_attempts: int = 10,
    reconnect_backoff: float = 0.25,
) -> AsyncIterator[AsyncIterator[Item]]:
    """Source: stream the rows of ``query`` as dicts, ``chunk_size`` rows per round trip.

    Rows are read with keyset pagination on ``key_column``: each chunk is
    ``SELECT * FROM (<query>) AS q WHERE q.<key> > <last key> ORDER BY q.<key> LIMIT <chunk_size>``,
    so memory stays at one chunk however large the table, and a connection is held only while
    one chunk is fetched. The key must be unique and not NULL in the query's result, and
    indexed in the table if the table is large.

    Incremental runs: with ``[source] watermark = "updated_at"`` the engine passes ``since``, the
    largest ``updated_at`` of the last successful run, and only rows with
    ``q.<watermark_column> > since`` are read (a bound parameter, never SQL text). Set
    ``watermark_column`` to the same column as ``[source] watermark``: the engine names the item
    field it tracks, this stage the column it filters on. ``since`` arrives as the text the
    ledger kept (``str()`` of the value); both databases compare it with a date, time or number
    column as that type.

    A database that restarts or fails over mid-run: a chunk whose fetch fails with a
    :class:`~pipeline.TransientError` (lost or refused connection, server shutting down) is
    fetched again, after ``reconnect_backoff`` seconds, then twice that, and so on (each wait at
    most 10 s), up to ``reconnect_attempts`` attempts in all; with the defaults the source waits
    about 45 s plus connection time before it gives up and the run fails. Each retry asks again for
    the rows after the last key already yielded, so no row is skipped or read twice. The pool
    drops the connection of a failed statement and opens a new one on the next use.

    Args:
        ctx: The engine's context.
        database: The ``[databases.<name>]`` to read from.
        query: A ``SELECT`` without placeholders; its rows become the items.
        key_column: A unique column of the result, in whose order rows come.
        chunk_size: Rows per round trip.
        since: Passed by the engine for incremental runs (see above); ``None`` reads every row.
        watermark_column: The column ``since`` is compared with; required when ``since`` is given.
        reconnect_attempts: Attempts at each chunk before a transient database error fails the run.
        reconnect_backoff: Seconds before the second attempt; it doubles on each further one.

    Raises:
        ConfigError: ``key_column`` or ``watermark_column`` is not a plain identifier,
            ``chunk_size`` < 1, the reconnect options are out of range, the query has ``?``
            placeholders, or ``since`` is given without ``watermark_column``.
    """
    _check_identifier(key_column, "key_column")
    _check_chunk_size(chunk_size)
    _check_reconnect(reconnect_attempts, reconnect_backoff)
    if watermark_column is not None:
        _check_identifier(watermark_column, "watermark_column")
    elif since is not None:
        raise ConfigError(
            f"read_rows got since={since!r} (the engine passes it when [source] watermark is set) but no "
            "watermark_column to compare it with; set watermark_column to the same column as watermark"
        )
    db = await shared_database(ctx, database)
    if _translate_sql(query, db.dialect)[1]:
        raise ConfigError(f"the read_rows query takes no ? placeholders, got {query!r}; inline the values")
    # A first night (no since yet) reads everything, even with watermark_column set.
    column = watermark_column if since is not None else None
    first_sql, next_sql = _keyset_queries(db.dialect, query, key_column, column)
    prefix: tuple[Any, ...] = () if column is None else (since,)

    async def fetch(sql: str, params: tuple[Any, ...], action: str) -> list[Item]:
        import tenacity  # deferred: only a source that is used pays for the import

        def note(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "read_rows will retry %s in %.2fs (attempt %d of %d failed): %s",
                action,
                wait,
                state.attempt_number,
                reconnect_attempts,
                error,
            )

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(reconnect_attempts),
            wait=tenacity.wait_exponential(multiplier=reconnect_backoff, max=_RECONNECT_MAX_WAIT),
            retry=tenacity.retry_if_exception_type(TransientError),
            before_sleep=note,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await db.fetch_all(sql, params, action=action)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def rows() -> AsyncGenerator[Item, None]:
        chunk = await fetch(first_sql, (*prefix, chunk_size), "reading the first chunk of rows")
        while True:
            for row in chunk:
                yield row
            if len(chunk) < chunk_size:
                return
            try:
                last = chunk[-1][key_column]
            except KeyError:
                raise DatabaseError(
                    f"the read_rows query on database {db.name!r} returns no column {key_column!r} "
                    f"(it returns {sorted(chunk[-1])}); select it or set key_column",
                    database=db.name,
                    dsn=db.dsn,
                    action="reading rows",
                ) from None
            if last is None:
                # `key > NULL` matches nothing: going on would end the stream early, silently.
                raise DatabaseError(
                    f"the read_rows query on database {db.name!r} returned a NULL {key_column!r}, so "
                    "the rows after it cannot be paged; filter out NULL keys in the query "
                    f"(WHERE {key_column} IS NOT NULL) or choose a key column without NULLs",
                    database=db.name,
                    dsn=db.dsn,
                    action="reading rows",
                )
            chunk = []  # let the previous chunk go before the next one arrives
            chunk = await fetch(
                next_sql, (*prefix, last, chunk_size), f"reading rows after {key_column}={last!r}"
            )

    stream = rows()
    try:
        yield stream
    finally:
        await stream.aclose()


MissingPolicy = Literal["fail", "skip", "keep"]


@factory
@contextlib.asynccontextmanager
async def lookup(
    ctx: Context,
    *,
    database: str,
    query: str,
    params: list[str],
    missing: MissingPolicy = "fail",
) -> AsyncIterator[Callable[[Item], Coroutine[Any, Any, Item]]]:
    """Stage: run a parameterised query per item and add its first row's columns to the item.

    Args:
        ctx: The engine's context.
        database: The ``[databases.<name>]`` to query.
        query: SQL with one ``?`` per entry of ``params``, for example
            ``SELECT owner, licence FROM assets WHERE id = ?``.
        params: Item field names whose values fill the placeholders, in order.
        missing: When no row matches: ``"fail"`` fails the item (:class:`RowNotFoundError`),
            ``"skip"`` skips it, ``"keep"`` passes it on unchanged.

    Raises:
        ConfigError: The placeholder count differs from ``len(params)``, or ``missing`` is unknown.
    """
    if missing not in ("fail", "skip", "keep"):
        raise ConfigError(f"missing must be 'fail', 'skip' or 'keep', got {missing!r}")
    db = await shared_database(ctx, database)
    placeholders = _translate_sql(query, db.dialect)[1]
    if placeholders != len(params):
        raise ConfigError(
            f"the lookup query has {placeholders} ? placeholders but params names {len(params)} "
            f"fields ({params!r}); give one field per placeholder"
        )
    fields = tuple(params)

    async def run(item: Item) -> Item:
        try:
            values = [item[name] for name in fields]
        except KeyError as exc:
            raise ValueError(
                f"lookup needs item field {exc.args[0]!r} for its query, but the item has only "
                f"{sorted(item)}; add the field in an earlier stage or fix params"
            ) from None
        row = await db.fetch_one(query, values, action="looking up a row")
        if row is None:
            shown = ", ".join(f"{name}={value!r}" for name, value in zip(fields, values, strict=True))
            if missing == "skip":
                raise Skip(f"no row in database {db.name!r} for {shown}")
            if missing == "fail":
                raise RowNotFoundError(
                    f"lookup found no row in database {db.name!r} for {shown}; fix the data, or set "
                    "missing='skip' or 'keep'"
                )
            return item
        item.update(row)
        return item

    yield run


_RESULT_COLUMNS = (
    "key",
    "status",
    "outputs",
    "width",
    "height",
    "bytes",
    "sha256",
    "error",
    "run_id",
    "updated_at",
)


def _results_ddl(dialect: Dialect, table: str) -> str:
    if dialect == "mysql":
        return (
            f"CREATE TABLE IF NOT EXISTS {table} ("
            "`key` VARCHAR(255) NOT NULL PRIMARY KEY, `status` VARCHAR(32) NOT NULL, "
            "`outputs` LONGTEXT NULL, `width` INT NULL, `height` INT NULL, `bytes` BIGINT NULL, "
            "`sha256` CHAR(64) NULL, `error` TEXT NULL, `run_id` VARCHAR(255) NOT NULL, "
            "`updated_at` DATETIME(6) NOT NULL) CHARACTER SET utf8mb4"
        )
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        '"key" TEXT NOT NULL PRIMARY KEY, "status" TEXT NOT NULL, "outputs" TEXT, "width" INTEGER, '
        '"height" INTEGER, "bytes" INTEGER, "sha256" TEXT, "error" TEXT, "run_id" TEXT NOT NULL, '
        '"updated_at" TEXT NOT NULL)'
    )


def _upsert_sql(dialect: Dialect, table: str) -> str:
    columns = ", ".join(_quote(dialect, c) for c in _RESULT_COLUMNS)
    values = ", ".join("?" for _ in _RESULT_COLUMNS)
    updates = [c for c in _RESULT_COLUMNS if c != "key"]
    if dialect == "mysql":
        # VALUES(col) rather than a row alias: MariaDB has no `AS new` form.
        assignments = ", ".join(f"`{c}` = VALUES(`{c}`)" for c in updates)
        return f"INSERT INTO {table} ({columns}) VALUES ({values}) ON DUPLICATE KEY UPDATE {assignments}"
    assignments = ", ".join(f'"{c}" = excluded."{c}"' for c in updates)
    return f'INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT("key") DO UPDATE SET {assignments}'


_ERROR_LIMIT = 2000
"""Characters of an upstream error kept in the ``error`` column (a traceback-sized message is cut)."""

# ``scheme://user:password@host``: the password goes, the user stays. The stages already keep
# passwords out of their messages; this is a second line for a custom stage that does not.
_USERINFO_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^\s/?#]*@")


def _error_text(item: Item) -> str | None:
    """The ``error`` column for an item diverted to the stage: ``"<stage>: <Type>: <message>"``."""
    error = item.get("error")
    if error is None:
        return None
    stage = item.get("failed_stage")
    text = f"{stage}: {error}" if stage else str(error)
    text = _USERINFO_PASSWORD.sub(r"\1***@", text)
    return text if len(text) <= _ERROR_LIMIT else text[: _ERROR_LIMIT - 3] + "..."


@factory
@contextlib.asynccontextmanager
async def write_results(
    ctx: Context,
    *,
    database: str,
    table: str = "results",
    create_table: bool = True,
    key_field: str = "id",
) -> AsyncIterator[Callable[[Item], Coroutine[Any, Any, Item]]]:
    """Stage: upsert one row per item into ``table`` and pass the item on.

    The row is ``key`` (``str(item[key_field])``, the primary key), ``status``, ``outputs``
    (JSON of ``item["outputs"]``), ``width``, ``height``, ``bytes``, ``sha256`` (from the item,
    NULL when absent), ``error``, ``run_id`` and ``updated_at`` (UTC).

    Run it as an ``always`` stage (``Stage(always=True)``, TOML ``always = true``) and it also
    records the items that failed or were skipped upstream: the engine hands those over with
    ``failed_stage`` set, and their row gets ``status`` ``"failed"`` or ``"skipped"``,
    ``error`` ``"<stage>: <ExceptionType>: <message>"`` (the skip's reason for a skip, NULL when
    it gave none), and ``outputs`` NULL unless the item carries some. An item that came through
    every stage gets ``status`` ``"ok"``, ``outputs`` ``[]`` when absent, and ``error`` NULL; a
    ``status`` or ``error`` field of its own (a catalog column of that name) is not taken for
    the engine's.

    The row is tonight's outcome: writing the same key again replaces the whole row, so an item
    that failed tonight after an ok night reads ``failed`` with the reason and ``outputs`` NULL,
    even though last night's files are still on disk (nothing here deletes them). Query the
    row, not the directory, to know what is current.

    Args:
        ctx: The engine's context.
        database: The ``[databases.<name>]`` to write to.
        table: The table, a plain identifier.
        create_table: Create the table when it does not exist.
        key_field: The item field holding the item's key.

    Raises:
        ConfigError: ``table`` is not a plain identifier.
    """
    _check_identifier(table, "table")
    db = await shared_database(ctx, database)
    quoted = db.quote(table)
    if create_table:
        await db.execute(_results_ddl(db.dialect, quoted), action=f"creating table {table!r}")
    sql = _upsert_sql(db.dialect, quoted)
    run_id = ctx.run_id

    async def run(item: Item) -> Item:
        try:
            key = item[key_field]
        except KeyError:
            raise ValueError(
                f"write_results needs the item's key in field {key_field!r}, but the item has only "
                f"{sorted(item)}; set key_field"
            ) from None
        now = datetime.now(UTC)
        # MySQL DATETIME has no zone: store naive UTC. SQLite gets ISO 8601 text.
        updated_at: Any = now.replace(tzinfo=None) if db.dialect == "mysql" else now.isoformat()
        if "failed_stage" in item:  # diverted by the engine: failed or skipped upstream
            status = str(item.get("status") or "failed")
            outputs = item.get("outputs")
            outputs_json = None if outputs is None else json.dumps(outputs)
            error = _error_text(item)
        else:
            status, outputs_json, error = "ok", json.dumps(item.get("outputs", [])), None
        row = (
            str(key),
            status,
            outputs_json,
            item.get("width"),
            item.get("height"),
            item.get("bytes"),
            item.get("sha256"),
            error,
            run_id,
            updated_at,
        )
        await db.execute(sql, row, action=f"writing the result row to {table!r}")
        return item

    yield run


# --------------------------------------------------------------------------------------------
# The run ledger in a table


_LEDGER_ITEM_COLUMNS = ("run_id", "key", "state", "attempts", "stage", "error", "updated_at")


def _ledger_ddl(dialect: Dialect, items: str, runs: str) -> list[str]:
    if dialect == "mysql":
        # Binary collation: keys "A" and "a" are different items. VARCHAR(255) x 2 fits InnoDB's
        # index limit in utf8mb4.
        text = "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
        return [
            f"CREATE TABLE IF NOT EXISTS {items} (`run_id` {text}, `key` {text}, "
            "`state` VARCHAR(16) NOT NULL, `attempts` INT NOT NULL, `stage` VARCHAR(255) NULL, "
            "`error` TEXT NULL, `updated_at` DATETIME(6) NOT NULL, PRIMARY KEY (`run_id`, `key`)) "
            "CHARACTER SET utf8mb4",
            f"CREATE TABLE IF NOT EXISTS {runs} (`run_id` {text} PRIMARY KEY, "
            "`pipeline` VARCHAR(255) NOT NULL, `status` VARCHAR(32) NOT NULL, "
            "`started_at` DATETIME(6) NOT NULL, `finished_at` DATETIME(6) NULL, `watermark` TEXT NULL, "
            "KEY (`pipeline`, `status`, `finished_at`)) CHARACTER SET utf8mb4",
        ]
    return [
        f'CREATE TABLE IF NOT EXISTS {items} ("run_id" TEXT NOT NULL, "key" TEXT NOT NULL, '
        '"state" TEXT NOT NULL, "attempts" INTEGER NOT NULL, "stage" TEXT, "error" TEXT, '
        '"updated_at" TEXT NOT NULL, PRIMARY KEY ("run_id", "key"))',
        f'CREATE TABLE IF NOT EXISTS {runs} ("run_id" TEXT PRIMARY KEY, "pipeline" TEXT NOT NULL, '
        '"status" TEXT NOT NULL, "started_at" TEXT NOT NULL, "finished_at" TEXT, "watermark" TEXT)',
    ]


_LEDGER_LOOKUP_CHUNK = 500
"""Keys per ``IN (...)`` lookup on a rerun."""


class TableLedger(BufferedLedger):
    """A :class:`~pipeline.RunLedger` in two tables of a :class:`Database`: ``<table>`` (one row
    per item and run) and ``<table>_runs``. Made by :func:`mysql_ledger`.

    Every write is an upsert on ``(run_id, key)``, so workers sharing a run id never leave two
    rows for an item. Records are buffered and written in one transaction per flush.
    """

    def __init__(
        self, db: Database, *, table: str, pipeline: str, run_id: str, flush_interval: float
    ) -> None:
        super().__init__()
        self.db = db
        self.pipeline = pipeline
        self.run_id = run_id
        self.flush_interval = flush_interval
        self.resuming = False
        self._table = table
        self._items = db.quote(table)
        self._runs = db.quote(f"{table}_runs")
        q = db.quote
        columns = ", ".join(q(c) for c in _LEDGER_ITEM_COLUMNS)
        values = ", ".join("?" for _ in _LEDGER_ITEM_COLUMNS)
        updates = [c for c in _LEDGER_ITEM_COLUMNS if c not in ("run_id", "key")]
        if db.dialect == "mysql":
            assign = ", ".join(f"{q(c)} = VALUES({q(c)})" for c in updates)
            conflict = f"ON DUPLICATE KEY UPDATE {assign}"
            run_conflict = "ON DUPLICATE KEY UPDATE `status` = 'running', `finished_at` = NULL"
        else:
            assign = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in updates)
            conflict = f'ON CONFLICT ("run_id", "key") DO UPDATE SET {assign}'
            run_conflict = 'ON CONFLICT ("run_id") DO UPDATE SET "status" = \'running\', "finished_at" = NULL'
        self._upsert = f"INSERT INTO {self._items} ({columns}) VALUES ({values}) {conflict}"
        self._start = (
            f"INSERT INTO {self._runs} (run_id, pipeline, status, started_at) "
            f"VALUES (?, ?, 'running', ?) {run_conflict}"
        )

    def _time(self, iso: str | None = None) -> Any:
        """A timestamp column's value: naive UTC for MySQL's DATETIME, ISO 8601 text for SQLite."""
        when = datetime.fromisoformat(iso) if iso else datetime.now(UTC)
        return when.astimezone(UTC).replace(tzinfo=None) if self.db.dialect == "mysql" else when.isoformat()

    async def _exists(self) -> bool:
        # Asked first, because MySQL warns on CREATE TABLE IF NOT EXISTS of an existing table.
        names = (self._table, f"{self._table}_runs")
        if self.db.dialect == "mysql":
            sql = (
                "SELECT COUNT(*) AS n FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name IN (?, ?)"
            )
        else:
            sql = "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)"
        row = await self.db.fetch_one(sql, names, action="looking for the ledger table")
        return row is not None and int(row["n"]) == len(names)

    async def open(self, *, create_table: bool) -> None:
        """Create the tables if asked, and find out whether this run id is resuming."""
        if create_table and not await self._exists():
            for ddl in _ledger_ddl(self.db.dialect, self._items, self._runs):
                await self.db.execute(ddl, action="creating the ledger table")
        row = await self.db.fetch_one(
            f"SELECT 1 AS x FROM {self._items} WHERE run_id = ? LIMIT 1",
            (self.run_id,),
            action="reading the ledger",
        )
        self.resuming = row is not None

    async def states(self, keys: Sequence[object]) -> list[str | None]:
        """See :meth:`pipeline.RunLedger.states`: one ``IN (...)`` query per 500 keys."""
        encoded: list[str | None] = []
        for key in keys:
            try:
                encoded.append(encode_key(key))
            except TypeError:
                encoded.append(None)
        wanted = sorted({k for k in encoded if k is not None})
        found: dict[str, str] = {}
        for i in range(0, len(wanted), _LEDGER_LOOKUP_CHUNK):
            chunk = wanted[i : i + _LEDGER_LOOKUP_CHUNK]
            rows = await self.db.fetch_all(
                f"SELECT {self.db.quote('key')} AS k, state FROM {self._items} "
                f"WHERE run_id = ? AND {self.db.quote('key')} IN ({', '.join('?' for _ in chunk)})",
                (self.run_id, *chunk),
                action="reading the ledger",
            )
            found.update((str(r["k"]), str(r["state"])) for r in rows)
        return [None if k is None else found.get(k) for k in encoded]

    def timestamp(self) -> Any:
        return self._time()

    async def write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        """Upsert ``batch`` in one transaction."""
        await self.db.execute_many(self._upsert, batch, action="writing the ledger")

    async def start_run(self, started_at: str) -> None:
        """Note that this run id started (again)."""
        await self.db.execute(
            self._start, (self.run_id, self.pipeline, self._time(started_at)), action="starting the run"
        )

    async def finish_run(self, status: str, watermark: str | None) -> None:
        """Note how this run ended, and its watermark when it succeeded."""
        await self.db.execute(
            f"UPDATE {self._runs} SET status = ?, finished_at = ?, watermark = COALESCE(?, watermark) "
            "WHERE run_id = ?",
            (status, self._time(), watermark if status == "ok" else None, self.run_id),
            action="finishing the run",
        )

    async def last_watermark(self) -> str | None:
        """The watermark of this pipeline's last successful run, if any."""
        row = await self.db.fetch_one(
            f"SELECT watermark FROM {self._runs} WHERE pipeline = ? AND status = 'ok' "
            "AND watermark IS NOT NULL ORDER BY finished_at DESC LIMIT 1",
            (self.pipeline,),
            action="reading the last watermark",
        )
        return None if row is None else str(row["watermark"])

    async def counts(self) -> dict[str, int]:
        """How many of this run's items are in each state."""
        rows = await self.db.fetch_all(
            f"SELECT state, COUNT(*) AS n FROM {self._items} WHERE run_id = ? GROUP BY state",
            (self.run_id,),
            action="reading the ledger",
        )
        return {str(r["state"]): int(r["n"]) for r in rows}

    async def failed(self) -> list[tuple[str, int, str | None, str | None]]:
        """This run's failed items: ``(key as JSON, attempts, stage, error)``, by key."""
        rows = await self.db.fetch_all(
            f"SELECT {self.db.quote('key')} AS k, attempts, stage, error FROM {self._items} "
            f"WHERE run_id = ? AND state = 'failed' ORDER BY {self.db.quote('key')}",
            (self.run_id,),
            action="reading the ledger",
        )
        return [(str(r["k"]), int(r["attempts"]), r["stage"], r["error"]) for r in rows]


@factory
@contextlib.asynccontextmanager
async def mysql_ledger(
    ctx: Context,
    *,
    database: str,
    table: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=58)] = "pipeline_ledger",
    create_table: bool = True,
    flush_interval: Annotated[float, Field(gt=0)] = 0.25,
) -> AsyncIterator[RunLedger]:
    """Ledger: keep the run ledger in ``table`` (and ``<table>_runs``) of a configured database.

    For runs shared by several workers (``[pipeline] ledger = { use = "stages.db:mysql_ledger",
    database = "catalog" }``). It uses the database's pool and limiter, like every stage on it.
    Works on a ``sqlite:///`` database too. Keys longer than 255 characters (as JSON) do not fit.

    Args:
        ctx: The engine's context (its ``pipeline`` and ``run_id`` pick the rows).
        database: The ``[databases.<name>]`` to keep the ledger in.
        table: The items table, a plain identifier; the runs table is ``<table>_runs``.
        create_table: Create the tables when they do not exist.
        flush_interval: Seconds between batched writes.

    Raises:
        ConfigError: ``table`` is not a plain identifier, or the database is not configured.
    """
    _check_identifier(table, "table")
    _check_identifier(f"{table}_runs", "table")
    if isinstance(flush_interval, bool) or flush_interval <= 0:
        raise ConfigError(f"flush_interval must be a number of seconds > 0, got {flush_interval!r}")
    db = await shared_database(ctx, database)
    ledger = TableLedger(
        db, table=table, pipeline=ctx.pipeline, run_id=ctx.run_id, flush_interval=flush_interval
    )
    await ledger.open(create_table=create_table)
    yield ledger
