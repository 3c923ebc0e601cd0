"""Option types for the built-in stages: constraints the engine checks once, before the run.

The engine validates a stage's options against its signature with pydantic (see
``pipeline.Stage``), so a constraint written in an annotation here is the whole check: no
stage re-checks its options by hand. Numbers are strict, so ``true`` is not taken for ``1``
and ``"5"`` is not taken for ``5``; a float option accepts an integer (``timeout = 5``). Names
whose meaning does not depend on case (image formats, layouts) are taken in any case and
normalised (:data:`UpperCase`, :data:`LowerCase`), so ``format = "jpeg"`` means ``"JPEG"``.

A direct Python call of a stage function (a notebook, a test) bypasses the engine;
:func:`checked_options` runs the engine's same check on such a call, once per set of options.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable, Mapping
from typing import Annotated, Any, TypeVar, cast

from pydantic import BeforeValidator, Field, ValidationInfo

import pipeline

__all__ = [
    "Flag",
    "Identifier",
    "LowerCase",
    "NonNegativeInt",
    "PositiveInt",
    "PositiveSeconds",
    "Seconds",
    "FieldName",
    "InvalidOptionError",
    "Rate",
    "UpperCase",
    "checked_options",
]

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


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


UpperCase = BeforeValidator(_upper)
"""Upper-cases a string option before it is checked: ``Annotated[Literal["JPEG", "PNG"], UpperCase]``
takes ``"jpeg"``. Only for options whose meaning does not depend on case (format names, not paths)."""

LowerCase = BeforeValidator(_lower)
"""Lower-cases a string option before it is checked, as :data:`UpperCase` upper-cases it."""


def _field_name(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"{info.field_name} must be a non-empty field name, got {value!r}; "
            "set it to the item field to read"
        )
    return value


FieldName = Annotated[str, BeforeValidator(_field_name)]
"""The name of an item field (``"url"``, ``"body"``): a non-empty string."""


def _rate(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, str):
        raise ValueError(f'{info.field_name} must be a rate such as "10/s", got {value!r}')
    try:
        pipeline.parse_rate(value)
    except pipeline.ConfigError as exc:
        raise ValueError(f"{info.field_name}: {exc.message}") from None
    return value


Rate = Annotated[str, BeforeValidator(_rate)]
"""A rate of the form ``"COUNT/UNIT"`` (``"50/s"``, ``"3000/min"``), as for a stage's ``rate``."""


class InvalidOptionError(pipeline.ConfigError, ValueError):
    """A direct call of a stage function (outside a run) was given a bad option.

    A :class:`~pipeline.ConfigError`, with the engine's message, and a ``ValueError``, as a
    bad argument to a Python function is.
    """


F = TypeVar("F", bound=Callable[..., Any])

_MAX_CHECKED = 256  # distinct option sets remembered per function; more only re-check


_SCALARS = frozenset({bool, int, float, str, bytes, type(None)})


def _freeze(value: object) -> Hashable:
    """A hashable stand-in for an option value; types are kept, so ``True`` is not ``1``."""
    kind = type(value)
    if kind in _SCALARS:  # the usual case first: this runs on every call
        return (kind, value)
    if isinstance(value, list | tuple):
        return (kind, tuple([_freeze(v) for v in value]))
    if isinstance(value, Mapping):
        return (kind, tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, set | frozenset):
        return (kind, frozenset(_freeze(v) for v in value))
    hash(value)  # TypeError for an unhashable value: the caller then checks without the cache
    return (kind, value)


def checked_options(fn: F) -> F:
    """Check the options of a direct call of stage ``fn`` as the engine does, once per option set.

    A run never needs this: the engine checks a stage's options against its signature when
    the :class:`~pipeline.Stage` is made. A direct Python call (a notebook, a test) bypasses
    the engine, so the wrapper builds that same ``pipeline.Stage(fn, options=...)`` the first
    time it sees a set of options, and remembers the sets that passed: per item, a call costs
    a dict lookup, not a validation. ``fn`` is called with the options as the engine checked
    them (normalised: ``format="jpeg"`` arrives as ``"JPEG"``), as in a run. Works on a plain
    or ``async def`` stage function and on a :func:`~pipeline.factory` (put ``@factory``
    outside it); the signature, as the engine reads it, is ``fn``'s.

    Raises:
        InvalidOptionError: On a call whose options the engine would refuse (for an
            ``async def`` stage, when the call is awaited).
        TypeError: ``fn`` is a generator function, which this does not wrap.
    """
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"checked_options cannot wrap the generator function {fn.__qualname__}: a wrapper would "
            "hide from the engine that it fans out; leave it unwrapped"
        )
    passed: dict[Hashable, dict[str, Any]] = {}

    def check(options: dict[str, Any]) -> dict[str, Any]:
        try:
            key: Hashable = tuple([(name, _freeze(value)) for name, value in options.items()])
        except TypeError:
            key = None
        if key is not None:
            checked = passed.get(key)
            if checked is not None:
                return checked
        try:
            checked = dict(pipeline.Stage(wrapper, options=options).options)
        except pipeline.ConfigError as exc:
            raise InvalidOptionError(exc.message, location=exc.location) from None
        if key is not None:
            if len(passed) >= _MAX_CHECKED:
                passed.clear()
            passed[key] = checked
        return checked

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(first: Any, /, *args: Any, **options: Any) -> Any:
            return await fn(first, *args, **check(options))

    else:

        @functools.wraps(fn)
        def wrapper(first: Any, /, *args: Any, **options: Any) -> Any:
            return fn(first, *args, **check(options))

    return cast(F, wrapper)
