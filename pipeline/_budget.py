"""The memory budget: items weighed by the bytes they hold, admission held while over budget.

Queues bound items by count, not by bytes: ``queue_size x max_bytes`` can reach gigabytes on a
night of large images. With ``[pipeline] memory_budget = "1GiB"`` the run weighs every item:

* an item's weight is the bytes it holds: the length of each bytes-like value in it (one level
  into lists, tuples and dicts), measured each time a stage hands it on;
* an attempt of a stage marked :func:`~pipeline.weighs` also holds what the stage says it will
  allocate for that item (decoded pixels, for an image), for the attempt's duration;
* the source is read only while ``weighed + expected <= budget``, where ``expected`` is the
  heaviest item seen so far (its peak over its life). Until the first item has ended there is
  no such figure, so the run then holds one item at a time.

Only admission waits: an item in flight always goes on, so the budget can never deadlock the
run, and an item heavier than the whole budget still runs, alone. It is a bound on what the
run holds, not on the interpreter: the process's peak RSS is reported beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import re
import sys
from typing import Any, Final

from ._exceptions import ConfigError

__all__ = ["MemoryBudget", "parse_size", "return_freed_memory", "weigh"]

_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*\Z", re.IGNORECASE)
_BYTES = (bytes, bytearray, memoryview)


def parse_size(value: int | str, what: str = "memory_budget") -> int:
    """``"512MiB"``, ``"1GiB"``, ``"500MB"`` or a number of bytes, as bytes.

    Raises:
        ConfigError: Not a positive size.
    """
    if isinstance(value, bool):
        raise ConfigError(f'{what} must be a size such as "512MiB" or "1GiB", got {value!r}')
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f'{what} {value!r} is not a size; write for example "512MiB", "1GiB" or "500MB"'
            )
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 1:
        raise ConfigError(f"{what} must be at least 1 byte, got {value!r}")
    return size


def weigh(item: Any) -> int:
    """The bytes an item holds: its bytes-like values, one level into lists, tuples and dicts."""
    total = 0
    if not isinstance(item, dict):
        return 0
    for value in item.values():
        if isinstance(value, _BYTES):
            total += len(value)
        elif isinstance(value, list | tuple):
            total += sum(len(v) for v in value if isinstance(v, _BYTES))
        elif isinstance(value, dict):
            total += sum(len(v) for v in value.values() if isinstance(v, _BYTES))
    return total


class MemoryBudget:
    """What the run's items are charged, against a budget that holds the source back.

    An item is charged the larger of what it weighs now and its reserve: what the heaviest item
    so far weighed when it was admitted. So admitting items that will grow (a row that becomes a
    download) cannot flood the queues before their bytes exist.

    Args:
        total: The budget in bytes.
    """

    def __init__(self, total: int):
        self.total = total
        self.charged = 0
        """Bytes charged now to the items in flight."""
        self.peak = 0
        """The most ever charged at once."""
        self.expected = 0
        """The heaviest item seen so far, at its heaviest: what admitting one more may cost."""
        self.items = 0
        self._learned = False
        self._changed = asyncio.Event()

    async def admit(self, weight: int) -> int:
        """Wait until an item that weighs ``weight`` now may enter; count it, and return its
        reserve. Until one item has ended, one item at a time."""
        while self.items and (not self._learned or self.charged + max(weight, self.expected) > self.total):
            self._changed.clear()
            await self._changed.wait()
        reserve = max(weight, self.expected)
        self.items += 1
        self.charge(reserve)
        return reserve

    def charge(self, delta: int) -> None:
        """Charge ``delta`` bytes more (or fewer); never waits: the bytes exist already."""
        self.charged += delta
        if delta > 0:
            if self.charged > self.peak:
                self.peak = self.charged
        elif delta < 0:
            self._changed.set()

    def ended(self, charged: int, peak_weight: int) -> None:
        """An item ended: it was charged ``charged``, and weighed at most ``peak_weight``."""
        self.items -= 1
        self._learned = True
        if peak_weight > self.expected:
            self.expected = peak_weight
        self.charge(-charged)
        self._changed.set()


_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8


def return_freed_memory() -> bool:
    """On glibc, have malloc give large freed buffers back to the system (``mallopt``): image
    bodies of 128 KiB and more get their own mappings, and threads share two arenas. Without
    it, buffers freed by download and thumbnail threads stay in per-thread pools and the
    process's RSS sits 10-50% above what the items hold. Returns whether it was applied.

    The same as ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2`` in the environment; called
    when a run has a memory budget.
    """
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        return bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024)) and bool(mallopt(_M_ARENA_MAX, 2))
    return False
