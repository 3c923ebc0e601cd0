"""The database a run opens: its pool, its shared limiter, and the one error boundary.

The engine hands a stage ``ctx.database(name)``, a DSN and the one
:class:`~pipeline.CapacityLimiter` that every stage touching that database shares. One
:class:`Database` (one pool: aiomysql for MySQL/MariaDB, a few aiosqlite connections for SQLite)
is opened per database per run, through ``ctx.shared(f"db:{name}", ...)``
(:func:`shared_database`), and closed by the engine at the end of the run. Every use of a
connection holds the database's limiter, and the pool never holds more connections than the
limiter's total when the pool opened, so the server never sees more than that many connections
from a run.

Driver errors are translated in one place, :meth:`Database._driver_errors`: lost or refused
connections, "too many connections", lock-wait timeouts, deadlocks and SQLite's "database is
locked" become :class:`~pipeline.TransientError` (retried where the caller's policy says: a
stage's ``retry``, read_rows' reconnects, the ledger's next flush); anything else becomes a
:class:`~stages.db.DatabaseError` that names the database (with its DSN redacted), what failed
and the fix, and says whether it is about one row's values (``row_data``). A database the run
cannot reach when it opens it is a DatabaseError that says it is not retried.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import difflib
import logging
import sqlite3
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import aiomysql
import aiosqlite
import pymysql

from pipeline import (
    CapacityLimiter,
    ConfigError,
    Context,
    DatabaseHandle,
    Item,
    Overloaded,
    TransientError,
    UsesDatabase,
)

from ._dsn import _env_name, _parse_dsn, _Target
from ._errors import DatabaseError
from ._sql import Dialect, Params, _quote, _translate_sql

__all__ = ["Database", "DatabaseName", "execute_script", "shared_database"]

# One logger for the package, as when it was one module.
log = logging.getLogger("stages.db")

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

# MySQL/MariaDB error codes about one row's values (too long, out of range, not in the
# column's character set, NULL in a NOT NULL column): the statement fails for that row's data,
# and would fail again on any retry, but the other rows of a batch are fine.
_MYSQL_ROW_DATA_CODES = frozenset({1048, 1264, 1265, 1292, 1366, 1406})

_DRIVER_ERRORS = (pymysql.err.Error, sqlite3.Error, OSError, UnicodeEncodeError)
"""What the drivers raise; everything else (a bug, a cancellation) passes through untranslated.
``UnicodeEncodeError``: a parameter the driver cannot encode (a lone surrogate)."""

_DEFAULT_CONNECT_TIMEOUT = 10.0
_DEFAULT_BUSY_TIMEOUT = 5.0
# Below the usual server wait_timeout (8 hours), so an idle pooled connection is replaced
# before the server drops it under us.
_DEFAULT_POOL_RECYCLE = 3600.0


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
        """Quote a plain identifier for this dialect.

        Raises:
            ConfigError: ``identifier`` is not a plain SQL identifier.
        """
        return _quote(self.dialect, identifier)

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
        with self._driver_errors(action):
            async with self.limiter:
                await self._execute(text, batch, "many")

    async def _run(self, sql: str, params: Params, mode: Mode, action: str) -> Any:
        text, placeholders = _translate_sql(sql, self.dialect)
        if placeholders != len(params):
            raise ValueError(
                f"{action} on database {self.name!r}: the SQL has {placeholders} ? placeholders "
                f"but {len(params)} parameters were given; make them match"
            )
        with self._driver_errors(action):
            async with self.limiter:
                return await self._execute(text, tuple(params), mode)

    async def _script(self, sql: str) -> None:
        with self._driver_errors("running a script"):
            async with self.limiter:
                await self._execute(sql, (), "script")

    @contextlib.contextmanager
    def _driver_errors(self, action: str) -> Iterator[None]:
        """The one boundary: re-raise a driver error from the block as :meth:`_translate` says.

        Every statement on the database runs inside it. ``OSError`` covers the sockets'
        ``ConnectionError`` and ``TimeoutError``.
        """
        try:
            yield
        except _DRIVER_ERRORS as exc:
            raise self._translate(exc, action) from exc

    def _classify(self, exc: BaseException) -> tuple[int | None, str, bool, bool]:
        """``(code, label, transient, about one row's data)`` of a driver error."""
        code: int | None = None
        detail = str(exc) or type(exc).__name__
        row_data = False
        if isinstance(exc, pymysql.err.Error):
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            detail = str(exc.args[1]) if len(exc.args) > 1 else detail
            # InterfaceError means the connection was already closed under us.
            transient = isinstance(exc, pymysql.err.InterfaceError) or code in _MYSQL_TRANSIENT_CODES
            row_data = isinstance(exc, pymysql.err.DataError) or code in _MYSQL_ROW_DATA_CODES
        elif isinstance(exc, sqlite3.Error):
            text = str(exc).lower()
            transient = isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)
            row_data = isinstance(exc, sqlite3.DataError | sqlite3.IntegrityError) or "too big" in text
        elif isinstance(exc, UnicodeEncodeError):
            transient, row_data = False, True
        else:
            transient = True
        label = f"error {code}: {detail}" if code is not None else f"{type(exc).__name__}: {detail}"
        return code, label, transient, row_data

    def _translate(self, exc: BaseException, action: str) -> Exception:
        """Classify a driver error: TransientError (or Overloaded), else DatabaseError."""
        where = f"database {self.name!r} ({self.dsn})"
        code, label, transient, row_data = self._classify(exc)
        # Whether the attempt is retried is the caller's policy (a stage's retry, read_rows'
        # reconnects, the ledger's next flush), not this boundary's: say what it is, not more.
        if code == 1040:  # too many connections: a loss signal for adaptive limits
            return Overloaded(f"{action} on {where} failed ({label}); the server is overloaded (transient).")
        if transient:
            return TransientError(f"{action} on {where} failed ({label}); the error is transient.")
        if row_data:
            hint = "the row's values do not fit the table's columns: fix the data or widen the column"
        else:
            hint = _MYSQL_HINTS.get(code or 0, "check the SQL, the tables and the DSN").format(
                env=_env_name(self.name)
            )
        return DatabaseError(
            f"{action} on {where} failed ({label}); {hint}.",
            database=self.name,
            dsn=self.dsn,
            action=action,
            code=code,
            row_data=row_data,
        )

    def _unreachable(self, exc: TransientError, where: str) -> DatabaseError:
        """The error for a database the run could not reach when it opened it: not retried."""
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        label = self._classify(cause)[1]
        return DatabaseError(
            f"connecting on database {self.name!r} ({self.dsn}) failed ({label}); opening a database "
            f"is not retried, so the run stops here: check that the server is up and reachable at "
            f"{where}, then run again.",
            database=self.name,
            dsn=self.dsn,
            action="connecting",
            code=getattr(cause, "args", (None,))[0] if isinstance(cause, pymysql.err.Error) else None,
        )

    async def columns(self, table: str) -> set[str] | None:
        """The names of ``table``'s columns, or ``None`` when there is no such table.

        Raises:
            ConfigError: ``table`` is not a plain identifier.
        """
        quoted = self.quote(table)  # refuses anything but a plain identifier
        if self.dialect == "mysql":
            sql = (
                "SELECT COLUMN_NAME AS name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = ?"
            )
            rows = await self.fetch_all(sql, (table,), action=f"looking for table {table!r}")
        else:
            rows = await self.fetch_all(f"PRAGMA table_info({quoted})", action=f"looking for table {table!r}")
        return {str(r["name"]) for r in rows} or None

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


def _crc32(value: object) -> int | None:
    """SQLite's ``crc32(x)``: MySQL's ``CRC32()``, of the UTF-8 text (or the bytes) of ``x``."""
    if value is None:
        return None
    return zlib.crc32(value if isinstance(value, bytes) else str(value).encode("utf-8"))


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
            # What MySQL's CRC32() is, for the shard filter of read_rows and the ledger.
            await conn.create_function("crc32", 1, _crc32, deterministic=True)
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


_OPTIONS = {
    "connect_timeout": "MySQL: seconds to wait for a new connection",
    "busy_timeout": "SQLite: seconds a writer waits for the file's write lock",
    "pool_recycle": "MySQL: seconds after which an idle pooled connection is replaced",
}
"""The ``[databases.<name>]`` keys these stages understand beyond the engine's ``dsn`` and
``concurrency``; each dialect ignores the other's, so a config can switch DSNs alone."""


def _seconds(name: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise ConfigError(
            f"databases.{name}.{key} must be a number of seconds >= 0, got {value!r}; set it to one",
            location=key,
        )
    return float(value)


def _option_seconds(handle: DatabaseHandle, key: str, default: float) -> float:
    """A ``[databases.<name>]`` option in seconds (checked at definition too, by _check_entry)."""
    return _seconds(handle.name, key, handle.options.get(key, default))


def _check_entry(name: str, dsn: str, options: Mapping[str, Any]) -> None:
    """Check a ``[databases.<name>]`` entry a stage of this package uses, before the run.

    Raises:
        ConfigError: The DSN is unusable (``location`` ``"dsn"``), or a key is unknown or its
            value invalid (``location`` that key).
    """
    try:
        _parse_dsn(name, dsn)
    except ConfigError as exc:
        raise ConfigError(exc.message, location="dsn") from None
    for key, value in options.items():
        if key not in _OPTIONS:
            close = difflib.get_close_matches(key, _OPTIONS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = "; ".join(f"{k} ({what})" for k, what in _OPTIONS.items())
            raise ConfigError(
                f"unknown key {key!r} for a database used by stages.db; {hint}it understands "
                f"dsn, concurrency, {known}. Remove the key or fix its spelling",
                location=key,
            )
        _seconds(name, key, value)


DatabaseName = Annotated[str, UsesDatabase(_check_entry)]
"""A stage option naming a ``[databases.<name>]`` entry: the engine refuses a name that is not
configured, and this package checks the entry's DSN and keys, when the pipeline is defined."""


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
        try:
            await db.fetch_one("SELECT 1", action="connecting")
        except TransientError as exc:
            where = target.unix_socket or f"{target.host}:{target.port}"
            raise db._unreachable(exc, where if target.dialect == "mysql" else target.path) from exc
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
        DatabaseError: The database refused the first connection (wrong password, unknown db),
            or could not be reached (not retried: the run stops).
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
