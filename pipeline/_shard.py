"""Shards: one run split into N disjoint parts of the source, each run as a whole pipeline.

* :class:`Shard` ``(index, count)`` owns the items whose encoded key (:func:`pipeline.encode_key`)
  hashes to ``index``: ``zlib.crc32(encoded.encode()) % count == index``. ``crc32`` and never
  ``hash()``, which is salted per process: every shard, on every machine, draws the same line.
* ``--shard K/N`` names one; ``--shard auto/N`` takes K from the scheduler's environment
  (``JOB_COMPLETION_INDEX`` of a Kubernetes Indexed Job, ``SLURM_ARRAY_TASK_ID`` of a Slurm array).
* Caps are promises to the downstream for the whole run, and there is no coordinator: each of
  the ``P`` shards running at once takes :func:`cap_share` of a cap (the floor of ``cap / P``,
  and the shards with an index below ``cap % P`` one more). Those are ``cap % P`` shards in the
  whole run, so any ``P`` shards running together hold at most ``cap``; a cap below ``P`` would
  leave some shard nothing, and is refused.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from ._exceptions import ConfigError

__all__ = ["AUTO_INDEX_VARIABLES", "Shard", "cap_share", "check_parallel"]

AUTO_INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")
"""Where ``--shard auto/N`` finds the shard's index, first match wins: Kubernetes, then Slurm."""


@dataclass(frozen=True)
class Shard:
    """One shard of a run: the items whose encoded key hashes to ``index`` out of ``count``.

    Attributes:
        index: This shard's number, ``0 <= index < count``.
        count: How many shards the run has, >= 1.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if type(self.count) is not int or self.count < 1:
            raise ConfigError(f"a run has at least 1 shard, got count={self.count!r}", location="--shard")
        if type(self.index) is not int or not 0 <= self.index < self.count:
            raise ConfigError(
                f"shard index {self.index!r} is not between 0 and {self.count - 1} (count {self.count}); "
                "shards are numbered from 0",
                location="--shard",
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] | None = None) -> Shard:
        """Parse ``"K/N"``, or ``"auto/N"`` with K from the scheduler's environment.

        ``auto`` reads ``JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job, from 0), else
        ``SLURM_ARRAY_TASK_ID`` less ``SLURM_ARRAY_TASK_MIN`` (so ``--array=1-4`` works too); when
        ``SLURM_ARRAY_TASK_COUNT`` is set it must equal N.

        Args:
            text: The ``--shard`` value.
            environ: The environment to read for ``auto``; ``os.environ`` by default.

        Raises:
            ConfigError: Naming the value and the fix.
        """
        env = os.environ if environ is None else environ
        index_text, sep, count_text = text.strip().partition("/")
        try:
            count = int(count_text)
        except ValueError:
            count = 0
        if not sep or count < 1:
            raise ConfigError(
                f"--shard {text!r} is not of the form K/N; write for example --shard 0/4, or "
                "--shard auto/4 under a Kubernetes Indexed Job or a Slurm job array",
                location="--shard",
            )
        if index_text.strip().lower() == "auto":
            return cls(_index_from(env, count), count)
        try:
            index = int(index_text)
        except ValueError:
            raise ConfigError(
                f"--shard {text!r}: {index_text!r} is not a shard number; write K/N with K from 0 "
                f"to {count - 1}, or auto/{count}",
                location="--shard",
            ) from None
        return cls(index, count)

    def owns(self, encoded_key: str) -> bool:
        """Whether this shard owns the item whose key encodes (:func:`pipeline.encode_key`) to
        ``encoded_key``."""
        return zlib.crc32(encoded_key.encode("utf-8")) % self.count == self.index


def _index_from(env: Mapping[str, str], count: int) -> int:
    for name in AUTO_INDEX_VARIABLES:
        value = env.get(name)
        if value is None or not value.strip():
            continue
        try:
            index = int(value)
            if name == "SLURM_ARRAY_TASK_ID":
                index -= int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
                total = env.get("SLURM_ARRAY_TASK_COUNT")
                if total and int(total) != count:
                    raise ConfigError(
                        f"--shard auto/{count}, but this Slurm array has SLURM_ARRAY_TASK_COUNT={total}; "
                        f"make N the array's size (--shard auto/{total}) or resize the array",
                        location="--shard",
                    )
        except ValueError:
            raise ConfigError(
                f"--shard auto/{count}: {name}={value!r} is not a number", location="--shard"
            ) from None
        if not 0 <= index < count:
            raise ConfigError(
                f"--shard auto/{count}: {name}={value!r} gives shard {index}, not between 0 and "
                f"{count - 1}; make N the number of indexes the job has",
                location="--shard",
            )
        return index
    raise ConfigError(
        f"--shard auto/{count} takes the shard's index from {' or '.join(AUTO_INDEX_VARIABLES)}, and "
        "neither is set; run it as a Kubernetes Indexed Job or a Slurm array task, or give the index "
        f"(--shard 0/{count})",
        location="--shard",
    )


def check_parallel(shard: Shard, parallel: int | None) -> int:
    """How many shards run at once: ``parallel``, or every shard when ``None``.

    Raises:
        ConfigError: ``parallel`` is not between 1 and the shard count.
    """
    if parallel is None:
        return shard.count
    if type(parallel) is not int or not 1 <= parallel <= shard.count:
        raise ConfigError(
            f"--parallel must be between 1 and the shard count {shard.count}, got {parallel!r}",
            location="--parallel",
        )
    return parallel


def cap_share(cap: int, parallel: int, shard: Shard, *, what: str) -> int:
    """This shard's part of ``cap`` when ``parallel`` shards run at once.

    The floor of ``cap / parallel``, plus one for the shards with an index below ``cap %
    parallel``: there are that many such shards in the whole run, so any ``parallel`` shards
    running together hold at most ``cap``, and shards ``0 .. parallel - 1`` exactly ``cap``.

    Args:
        cap: The whole run's cap.
        parallel: Shards running at once.
        shard: This shard.
        what: The cap's config key, for the message (``databases.catalog.concurrency``).

    Raises:
        ConfigError: ``cap < parallel``: some shard would get no share.
    """
    if cap < parallel:
        raise ConfigError(
            f"{what} = {cap} is a cap for the whole run, and {parallel} shards running at once cannot "
            f"each take a part of it; raise it to at least {parallel}, or run fewer shards at once "
            f"(--parallel {cap})",
            location=what,
        )
    return cap // parallel + (1 if shard.index < cap % parallel else 0)
