"""Option types for the built-in stages: constraints the engine checks once, before the run.

The engine validates a stage's options against its signature with pydantic (see
``pipeline.Stage``), so a constraint written in an annotation here is the whole check: no
stage re-checks its options by hand. Numbers are strict, so ``true`` is not taken for ``1``
and ``"5"`` is not taken for ``5``; a float option accepts an integer (``timeout = 5``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = ["Flag", "Identifier", "NonNegativeInt", "PositiveInt", "PositiveSeconds", "Seconds"]

PositiveInt = Annotated[int, Field(ge=1, strict=True)]
"""An integer >= 1 (a count, a size, a number of attempts)."""

NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
"""An integer >= 0."""

Seconds = Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)]
"""A duration in seconds, >= 0."""

PositiveSeconds = Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]
"""A duration in seconds, > 0."""

Flag = Annotated[bool, Field(strict=True)]
"""``true`` or ``false``, nothing else."""

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
"""A SQL identifier (a table or column name): letters, digits and underscores."""
