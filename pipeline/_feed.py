"""The feeder: the source read in batches into the first queue, each row checked and ticketed.

* A plain (sync) source iterator may block, so it is read in the thread pool, up to
  ``SOURCE_BATCH`` rows per hop; an async iterator is read on the loop, one row at a time.
* Every row gets a :class:`~pipeline._tickets.Ticket`. A row without a usable key (missing,
  empty, unhashable, a duplicate of one in flight) fails alone, as a ``source`` dead letter.
* On a rerun of a run id, one ledger lookup per batch says which rows already ended; those are
  not read again (``--retry-failed`` and ``pipeline retry`` take the failed ones).
* The largest watermark value read is kept; the run stores it only if every item ended well.
* Stopping (a signal, the circuit breaker, ``--limit``) ends the reading; the queue is then closed
  so the stages drain what is in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any, Final

from ._contract import describe
from ._definition import Source
from ._exceptions import PipelineError, SourceError
from ._ledger import RunLedger, encode_key
from ._shard import Shard
from ._stage import END
from ._tickets import Tally, Ticket

__all__ = ["SOURCE_BATCH", "Feeder"]

log = logging.getLogger("pipeline")

SOURCE_BATCH: Final = 256
"""Rows pulled per thread hop from a plain (sync) source iterator."""


class Feeder:
    """Reads one source into the first stage's queue.

    Args:
        spec: The source's definition (its key and watermark fields).
        queue: The first stage's queue.
        tally: Where rows get their tickets and bad rows fail.
        executor: Where a plain source iterator is read.
        limit: Read at most this many items; ``None`` for all.
        only_failed: Take only the items that failed in an earlier attempt of the run id.
        retry_failed: Take the failed items again too, besides the unrecorded ones.
        shard: Take only the rows this shard owns (for a source that does not filter itself);
            the others are another shard's, and are not counted at all.
    """

    def __init__(
        self,
        spec: Source,
        queue: asyncio.Queue[Any],
        tally: Tally,
        *,
        executor: concurrent.futures.Executor,
        limit: int | None,
        only_failed: bool,
        retry_failed: bool,
        shard: Shard | None = None,
    ):
        self._spec = spec
        self._shard = shard
        self._queue = queue
        self._tally = tally
        self._executor = executor
        self._limit = limit
        self._only_failed = only_failed
        self._retry_failed = retry_failed
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waiting_on_source = False
        self._cancelled_to_stop = False
        self.watermark: Any = None
        """The largest watermark value read so far."""
        self.already_done = 0
        """Rows not read again because they ended in an earlier attempt of the run id."""
        self.not_retried = 0
        """Rows not read again because they failed earlier (and failures are not retried)."""

    @property
    def stopping(self) -> bool:
        """Whether reading was asked to stop."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Read no more rows. A feeder waiting on the source stops waiting (never while it
        holds a row, which would lose it)."""
        self._stopping.set()
        if self._task is not None and self._waiting_on_source:
            self._cancelled_to_stop = True
            self._task.cancel()

    async def feed(self, source: Any, ledger: RunLedger | None) -> None:
        """Read ``source`` into the queue until it ends or reading stops, then close the queue.

        Args:
            source: The opened source (an iterable or async iterable of dicts).
            ledger: The run's ledger when this run id is being resumed, else ``None``.
        """
        self._task = asyncio.current_task()
        q, tally = self._queue, self._tally
        key_field = self._spec.key
        watermark = self._spec.watermark
        limit = self._limit
        stopping = self._stopping
        states: list[str | None] | None = None
        open_ = tally.open
        reading = True
        async with contextlib.aclosing(self._batches(source)) as batches:
            async for batch in batches:
                if self._shard is not None:
                    batch = [row for row in batch if _owned(self._shard, row, key_field)]
                if ledger is not None:
                    states = await ledger.states(
                        [row.get(key_field) if isinstance(row, dict) else None for row in batch]
                    )
                for i, row in enumerate(batch):
                    if type(row) is not dict and not isinstance(row, dict):
                        raise SourceError(
                            f"the source yielded {type(row).__name__}, expected a dict per item "
                            f"({describe(self._spec.fn)})"
                        )
                    key = row.get(key_field)
                    if states is not None and self._already_ended(states[i]):
                        continue
                    ticket = Ticket(key)
                    tally.read += 1
                    if tally.budget is not None:
                        await tally.admit(ticket, row)  # held while the run is over its memory budget
                    try:  # the usual case, checked inline; _check_key explains the others
                        clean = key is not None and key != "" and key not in open_
                    except TypeError:
                        clean = False
                    if not clean:
                        problem = _check_key(row, key_field, key, open_)
                        tally.fail(ticket, "source", SourceError(problem or "bad key"), 1)
                    else:
                        open_[key] = ticket
                        if watermark is not None:
                            self._advance_watermark(row.get(watermark))
                        try:
                            q.put_nowait((row, ticket))
                        except asyncio.QueueFull:
                            await q.put((row, ticket))
                    if (limit is not None and tally.read >= limit) or stopping.is_set():
                        reading = False
                        break
                if not reading:
                    break
        # Not in a finally: after an error the consumers are being cancelled, and a put into a
        # full queue would wait for them forever.
        self._task = None
        await q.put(END)

    def _already_ended(self, state: str | None) -> bool:
        """On a rerun: whether an item whose recorded state is ``state`` is not taken again."""
        if self._only_failed:
            return state != "failed"
        if state == "failed" and not self._retry_failed:
            self.not_retried += 1
            return True
        if state in ("done", "skipped"):
            self.already_done += 1
            return True
        return False

    def _advance_watermark(self, value: Any) -> None:
        if value is None:
            return
        try:
            if self.watermark is None or value > self.watermark:
                self.watermark = value
        except TypeError:
            log.warning("watermark values of different types: %r and %r", self.watermark, value)

    async def _batches(self, source: Any) -> AsyncGenerator[Sequence[Any], None]:
        """Yield the source's rows in batches: one row at a time from an async iterator, and
        up to ``SOURCE_BATCH`` per thread hop from a plain one (which may block)."""
        if self._limit == 0:
            return
        if hasattr(source, "__aiter__"):
            async for batch in self._async_rows(source):
                yield batch
            return
        try:
            it = iter(source)
        except TypeError:
            raise SourceError(
                f"the source returned {type(source).__name__}, which is not iterable; return or yield dicts"
            ) from None
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await loop.run_in_executor(self._executor, _take, it, SOURCE_BATCH)
                yield batch
                if len(batch) < SOURCE_BATCH:
                    return
        except Exception as exc:
            if isinstance(exc, PipelineError):
                raise
            raise SourceError(f"the source failed: {type(exc).__name__}: {exc}") from exc
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    async def _async_rows(self, source: Any) -> AsyncGenerator[Sequence[Any], None]:
        it = source.__aiter__()
        try:
            while True:
                self._waiting_on_source = True
                try:
                    row = await it.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    # Our own stop() cancelled the wait, and nothing else has cancelled us since.
                    if self._cancelled_to_stop and me is not None and me.cancelling() == 1:
                        me.uncancel()
                        return
                    raise
                except Exception as exc:
                    raise SourceError(f"the source failed: {type(exc).__name__}: {exc}") from exc
                finally:
                    self._waiting_on_source = False
                yield (row,)
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()


def _owned(shard: Shard, row: Any, key_field: str) -> bool:
    """Whether ``shard`` takes ``row``. Every row goes to exactly one shard, a bad one too (it
    fails there alone): a key that cannot be encoded goes to shard 0, and a row that is not a
    dict to every shard, which each fail the run on it."""
    if not isinstance(row, dict):
        return True
    try:
        encoded = encode_key(row.get(key_field))
    except (TypeError, ValueError):
        return shard.index == 0
    return shard.owns(encoded)


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for row in it:
        out.append(row)
        if len(out) >= n:
            break
    return out


def _check_key(row: dict[str, Any], key_field: str, key: object, open_: dict[Any, Ticket]) -> str | None:
    """Why this row cannot go in, or ``None``."""
    if key_field not in row:
        return (
            f"the source row has no {key_field!r} field, which is the configured key; "
            f"its fields are {sorted(row)!r}"
        )
    if key is None or key == "":
        return f"the source row's key {key_field!r} is {key!r}; every item needs a key"
    try:
        duplicate = key in open_
    except TypeError:
        return f"the source row's key {key!r} is a {type(key).__name__}, which cannot be a key"
    if duplicate:
        return f"duplicate key {key!r}: an item with this key is already in flight in this run"
    return None
