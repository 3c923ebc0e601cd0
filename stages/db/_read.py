"""The ``read_rows`` source: a query's rows as items, keyset-paged, across reconnects."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from pydantic import AfterValidator

from pipeline import ConfigError, Context, Item, Shard, TransientError, encode_key, factory, shards_itself

from .._options import Identifier, PositiveInt, Seconds
from ._database import DatabaseName, shared_database
from ._errors import DatabaseError
from ._sql import _keyset_queries, _same_key_query, _shard_condition, _translate_sql

__all__ = ["read_rows"]

log = logging.getLogger("stages.db")


def _owns(shard: Shard, key: Any) -> bool:
    """The engine's test (see ``pipeline.Shard.owns``); a key that cannot be encoded is shard 0's."""
    try:
        return shard.owns(encode_key(key))
    except (TypeError, ValueError):
        return shard.index == 0


def _no_placeholders(query: str) -> str:
    """Refuse a query with ``?`` placeholders in either dialect (checked again once the dialect
    is known: a ``?`` in a MySQL ``#`` comment is no placeholder)."""
    if _translate_sql(query, "mysql")[1] and _translate_sql(query, "sqlite")[1]:
        raise ValueError(f"the read_rows query takes no ? placeholders, got {query!r}; inline the values")
    return query


Query = Annotated[str, AfterValidator(_no_placeholders)]
"""The ``query`` option of :func:`read_rows`: a SELECT without ``?`` placeholders."""

_RECONNECT_MAX_WAIT = 10.0
"""The longest single wait between two attempts at a chunk."""


@shards_itself
@factory
@contextlib.asynccontextmanager
async def read_rows(
    ctx: Context,
    *,
    database: DatabaseName,
    query: Query,
    key_column: Identifier = "id",
    chunk_size: PositiveInt = 1000,
    since: Any = None,
    watermark_column: Identifier | None = None,
    reconnect_attempts: PositiveInt = 10,
    reconnect_backoff: Seconds = 0.25,
) -> AsyncIterator[AsyncIterator[Item]]:
    """Source: stream the rows of ``query`` as dicts, ``chunk_size`` rows per round trip.

    Rows are read with keyset pagination on ``key_column``: each chunk is
    ``SELECT * FROM (<query>) AS q WHERE q.<key> > <last key> ORDER BY q.<key> LIMIT <chunk_size>``,
    so memory stays at one chunk however large the table, and a connection is held only while
    one chunk is fetched. The key must be unique and not NULL in the query's result, and
    indexed in the table if the table is large. A key that repeats is not lost at a chunk
    boundary: every row with it is read (each chunk fetches one row more, to see whether it
    ends inside a run of equal keys), and the engine fails each copy after the first as a
    duplicate key, with the reason in the dead letters; a warning names the key column.

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

    Sharded runs (``--shard K/N``): the shard's rows are chosen in SQL, with
    ``CRC32(CAST(q.<key> AS CHAR)) % N = K`` added to every chunk's query. For an integer key
    that is exactly the engine's partition (``crc32`` of :func:`pipeline.encode_key`), which the
    ledger's per-shard counts use, and each row is checked against it as it is yielded. No index
    serves the test: every shard walks the key index through the whole result, about N x
    ``chunk_size`` entries per chunk of its own, so the database reads N times what one run
    would, while the rows sent, and everything after, are divided by N. A key of another type
    (text, whose encoding is JSON) is not pushed down: the shard reads every row and keeps its
    own by the engine's test, as the engine would; one ``LIMIT 1`` query looks at the key's type
    when the source opens.

    Args:
        ctx: The engine's context.
        database: The ``[databases.<name>]`` to read from.
        query: A ``SELECT`` without placeholders; its rows become the items.
        key_column: A unique column of the result, in whose order rows come; a plain identifier.
        chunk_size: Rows per round trip, >= 1.
        since: Passed by the engine for incremental runs (see above); ``None`` reads every row.
        watermark_column: The column ``since`` is compared with, a plain identifier; required when
            ``since`` is given.
        reconnect_attempts: Attempts at each chunk (>= 1) before a transient database error fails
            the run.
        reconnect_backoff: Seconds (>= 0) before the second attempt; it doubles on each further one.

    The engine checks the options against these annotations when the source is made, so a
    ``key_column`` that is not a plain identifier or a ``chunk_size`` of 0 is a
    :class:`~pipeline.ConfigError` naming the option and its value.

    Raises:
        ConfigError: The query has ``?`` placeholders, or ``since`` is given without
            ``watermark_column``.
    """
    if watermark_column is None and since is not None:
        raise ConfigError(
            f"read_rows got since={since!r} (the engine passes it when [source] watermark is set) but no "
            "watermark_column to compare it with; set watermark_column to the same column as watermark"
        )
    db = await shared_database(ctx, database)
    if _translate_sql(query, db.dialect)[1]:
        raise ConfigError(f"the read_rows query takes no ? placeholders, got {query!r}; inline the values")
    # A first night (no since yet) reads everything, even with watermark_column set.
    column = watermark_column if since is not None else None
    prefix: tuple[Any, ...] = () if column is None else (since,)
    shard = ctx.shard if ctx.shard is not None and ctx.shard.count > 1 else None
    condition = None

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

    def key_of(row: Item) -> Any:
        try:
            key = row[key_column]
        except KeyError:
            raise DatabaseError(
                f"the read_rows query on database {db.name!r} returns no column {key_column!r} "
                f"(it returns {sorted(row)}); select it or set key_column",
                database=db.name,
                dsn=db.dsn,
                action="reading rows",
            ) from None
        if key is None:
            # `key > NULL` matches nothing: going on would end the stream early, silently.
            raise DatabaseError(
                f"the read_rows query on database {db.name!r} returned a NULL {key_column!r}, so "
                "the rows after it cannot be paged; filter out NULL keys in the query "
                f"(WHERE {key_column} IS NOT NULL) or choose a key column without NULLs",
                database=db.name,
                dsn=db.dsn,
                action="reading rows",
            )
        return key

    if shard is not None:
        # Only an integer key's text is its encoding: look at the first row's key.
        probe_sql, _ = _keyset_queries(db.dialect, query, key_column, column)
        probe = await fetch(probe_sql, (*prefix, 1), "looking at the key column's type")
        if probe and type(probe[0].get(key_column)) is int:
            condition = _shard_condition(db.dialect, key_column, shard.index, shard.count)
        elif probe:
            log.info(
                "read_rows: %s is not an integer column, so shard %s reads every row and keeps its own",
                key_column,
                shard,
            )
    first_sql, next_sql = _keyset_queries(db.dialect, query, key_column, column, condition)
    same_sql = _same_key_query(db.dialect, query, key_column, column, condition)

    def owned(chunk: list[Item]) -> list[Item]:
        """The rows of ``chunk`` this shard owns, by the engine's test; when SQL chose them
        already, a row it disagrees on is an error rather than a lost or doubled item."""
        assert shard is not None
        mine = [row for row in chunk if _owns(shard, row.get(key_column))]
        if condition is not None and len(mine) != len(chunk):
            stray = next(row.get(key_column) for row in chunk if not _owns(shard, row.get(key_column)))
            raise DatabaseError(
                f"read_rows on database {db.name!r}: the shard filter in SQL gave shard {shard} the "
                f"row with {key_column}={stray!r}, which the engine's partition puts elsewhere; a key "
                "column with values of several types cannot be sharded in SQL",
                database=db.name,
                dsn=db.dsn,
                action="reading rows",
            )
        return mine

    async def rows() -> AsyncGenerator[Item, None]:
        # One row more than a chunk: it shows whether the chunk ends inside a run of equal keys.
        chunk = await fetch(first_sql, (*prefix, chunk_size + 1), "reading the first chunk of rows")
        while True:
            more = len(chunk) > chunk_size
            if more:
                peek = chunk.pop()
                last = key_of(chunk[-1])
                if key_of(peek) == last:
                    chunk = await with_every_copy(chunk, last)
            for row in owned(chunk) if shard is not None else chunk:
                yield row
            if not more:
                return
            chunk = []  # let the previous chunk go before the next one arrives
            chunk = await fetch(
                next_sql, (*prefix, last, chunk_size + 1), f"reading rows after {key_column}={last!r}"
            )

    async def with_every_copy(chunk: list[Item], last: Any) -> list[Item]:
        """``chunk`` with its trailing rows of key ``last`` replaced by every row of that key.

        The next chunk starts after ``last``, so copies of it past the chunk would be skipped
        without a word. Fetched before any of them is yielded, they reach the engine one after
        the other, and it fails each copy after the first as a duplicate key in flight.
        """
        log.warning(
            "read_rows: %s=%r appears more than once in the query's result; every copy after the "
            "first fails as a duplicate. Make key_column unique in the query (a primary key)",
            key_column,
            last,
        )
        keep = len(chunk)
        while keep and chunk[keep - 1].get(key_column) == last:
            keep -= 1
        copies = await fetch(same_sql, (*prefix, last), f"reading the rows with {key_column}={last!r}")
        return chunk[:keep] + copies

    stream = rows()
    try:
        yield stream
    finally:
        await stream.aclose()
