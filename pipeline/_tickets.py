"""Every item's fate: a ticket per source item, and the tally that ends each one exactly once.

The feeder opens a ticket for each item it reads; stages end the ticket's branches (fan-out
children share their parent's ticket); when the last branch ends, the tally counts the item
once as ok, failed or skipped and records it in the ledger. What is still open when the run
stops is reported unfinished. ``read == ok + failed + skipped + unfinished`` holds by
construction: this module is the only one that moves those counts.
"""

from __future__ import annotations

from typing import Any

from ._budget import MemoryBudget, weigh
from ._ledger import RunLedger
from ._report import DeadLetterWriter

__all__ = ["Tally", "Ticket"]


class Ticket:
    """One source item's fate; fan-out children share it."""

    __slots__ = (
        "attempts",
        "charged",
        "error",
        "failed",
        "held",
        "key",
        "ok",
        "peak",
        "pending",
        "reserve",
        "skip",
        "stage",
        "weight",
    )

    def __init__(self, key: object):
        self.key = key
        self.pending = 1
        self.ok = False
        self.failed = False
        self.skip = False  # skipped upstream, then recorded by an ``always`` stage
        self.attempts = 1
        self.stage: str | None = None
        self.error: str | None = None
        # With a memory budget: what the item weighs (measured when a stage hands it on), what
        # attempts hold for it, its reserve at admission, what it is charged, its heaviest.
        self.weight = 0
        self.held = 0
        self.reserve = 0
        self.charged = 0
        self.peak = 0


class Tally:
    """The run's item counts, its open tickets by key, its dead letters and its ledger records.

    Args:
        dead: Where failed items are written.
        budget: The memory budget, if the run has one.
    """

    def __init__(self, dead: DeadLetterWriter, budget: MemoryBudget | None = None):
        self.dead = dead
        self.budget = budget
        self.ledger: RunLedger | None = None
        self.read = 0
        self.ok = 0
        self.failed = 0
        self.skipped = 0
        self.open: dict[Any, Ticket] = {}
        """Tickets of the items read and not yet ended, by key."""

    @property
    def done(self) -> int:
        """Items that ended, however they ended."""
        return self.ok + self.failed + self.skipped

    def settle(self, ticket: Ticket, ok: bool | None) -> None:
        """One branch of ``ticket`` ended: ok (``True``) or skipped (``None``)."""
        if ok:
            ticket.ok = True
        ticket.pending -= 1
        if ticket.pending == 0:
            self._close(ticket)

    def fail(
        self, ticket: Ticket, stage: str, error: BaseException, attempts: int, *, ends: bool = True
    ) -> None:
        """One branch of ``ticket`` failed in ``stage``: dead-letter it.

        With ``ends=False`` the branch goes on to an ``always`` stage, which ends it later.
        """
        self.dead.write(key=ticket.key, stage=stage, error=error, attempts=attempts)
        ticket.failed = True
        ticket.stage = stage
        ticket.error = f"{type(error).__name__}: {error}"
        ticket.attempts = max(ticket.attempts, attempts)
        if ends:
            ticket.pending -= 1
            if ticket.pending == 0:
                self._close(ticket)

    async def admit(self, ticket: Ticket, row: dict[str, Any]) -> None:
        """With a memory budget: wait until ``row`` may enter, and charge its ticket."""
        assert self.budget is not None
        ticket.weight = ticket.peak = weigh(row)
        ticket.reserve = ticket.charged = await self.budget.admit(ticket.weight)

    def reweigh(self, ticket: Ticket, weight: int, held: int = 0) -> None:
        """With a memory budget: ``ticket``'s item now weighs ``weight`` and its attempt holds
        ``held`` more (summed over fan-out children by the caller)."""
        assert self.budget is not None
        ticket.weight, ticket.held = weight, held
        now = weight + held
        if now > ticket.peak:
            ticket.peak = now
        charge = max(ticket.reserve, now)
        self.budget.charge(charge - ticket.charged)
        ticket.charged = charge

    def _close(self, ticket: Ticket) -> None:
        if self.budget is not None:
            self.budget.ended(ticket.charged, ticket.peak)
        open_ = self.open
        if open_.get(ticket.key) is ticket:  # a rejected duplicate never entered
            del open_[ticket.key]
        if ticket.failed:
            self.failed += 1
            state = "failed"
        elif ticket.ok and not ticket.skip:
            self.ok += 1
            state = "done"
        else:
            self.skipped += 1
            state = "skipped"
        if self.ledger is not None:
            self.ledger.record(ticket.key, state, ticket.attempts, ticket.stage, ticket.error)
