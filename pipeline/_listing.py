"""``pipeline stages [MODULE]``: what a stage module offers, read from its signatures.

For each public callable: how the engine would run it (its kind), its options with their types,
constraints and defaults, and the first line of its docstring. Nothing is opened or called: a
factory's per-item kind is only known once it is opened, so it shows as ``factory``.

Kinds: ``async`` and ``thread`` (and ``async-gen`` / ``thread-gen`` for fan-out) for a stage
callable; ``factory`` for a stage factory; ``source`` for a source (plain or factory);
``ledger`` for a ledger factory; ``helper`` for a public function that is not a stage (shown
only when a module is named). A stage marked ``@pipeline.batched`` adds `` (batched)``.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._config import public_callables
from ._contract import batch_of, is_factory, stage_kind

__all__ = ["BUILTIN_MODULES", "StageInfo", "describe_module", "main", "option_text", "type_text"]

BUILTIN_MODULES = ("stages.db", "stages.http", "stages.image", "stages.files")
"""The modules ``pipeline stages`` lists when no module is named."""

_ITERABLES = {
    collections.abc.Iterable,
    collections.abc.Iterator,
    collections.abc.Generator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncIterator,
    collections.abc.AsyncGenerator,
}
# What a stage callable may be annotated to return: the item, nothing, or a wrapper of those.
_ITEM_RETURNS = {
    dict,
    collections.abc.Mapping,
    collections.abc.MutableMapping,
    collections.abc.Awaitable,
    collections.abc.Coroutine,
    *_ITERABLES,
}


@dataclass(frozen=True)
class StageInfo:
    """One public callable of a module, as ``pipeline stages`` shows it.

    Attributes:
        use: What a config's ``use`` names it: ``module:name``.
        kind: ``async``, ``thread``, ``async-gen``, ``thread-gen``, ``factory``, ``source``,
            ``ledger`` or ``helper``; `` (batched)`` follows a stage's kind when it takes lists.
        options: One ``name: type (constraints) = default`` line per option.
        summary: The first line of its docstring.
    """

    use: str
    kind: str
    options: tuple[str, ...]
    summary: str


def _constraints(metadata: Sequence[Any]) -> str:
    """``1..100``, ``>=1``, ``len>=1``, ``/pattern/``: the tightest of each bound, compactly."""
    flat: list[Any] = []
    for m in metadata:
        inner = getattr(m, "metadata", None)  # a pydantic Field(...) carries its constraints
        flat.extend(inner if isinstance(inner, list) else [m])
    lower: tuple[str, Any] | None = None
    upper: tuple[str, Any] | None = None
    min_len = max_len = pattern = None
    checked = False
    for c in flat:
        for op in ("ge", "gt"):
            v = getattr(c, op, None)
            if v is not None and (lower is None or v > lower[1]):
                lower = (op, v)
        for op in ("le", "lt"):
            v = getattr(c, op, None)
            if v is not None and (upper is None or v < upper[1]):
                upper = (op, v)
        if getattr(c, "min_length", None) is not None:
            min_len = max(min_len or 0, c.min_length)
        if getattr(c, "max_length", None) is not None:
            max_len = c.max_length if max_len is None else min(max_len, c.max_length)
        pattern = getattr(c, "pattern", None) or pattern
        checked = checked or callable(getattr(c, "func", None))
    parts = []
    if lower and upper and lower[0] == "ge" and upper[0] == "le":
        parts.append(f"{lower[1]}..{upper[1]}")
    else:
        signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        parts += [f"{signs[b[0]]}{b[1]}" for b in (lower, upper) if b is not None]
    if min_len is not None and max_len is not None:
        parts.append(f"len {min_len}..{max_len}")
    elif min_len is not None:
        parts.append(f"len>={min_len}")
    elif max_len is not None:
        parts.append(f"len<={max_len}")
    if pattern:
        parts.append(f"/{pattern}/")
    if checked:
        parts.append("checked")
    return ", ".join(parts)


def type_text(annotation: Any) -> str:
    """An annotation as an operator reads it: ``int (1..100)``, ``'nested' | 'sharded'``."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any"
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner, constraints = type_text(args[0]), _constraints(annotation.__metadata__)
        return f"{inner} ({constraints})" if constraints else inner
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is collections.abc.Callable:
            return "callable"
        return f"{name}[{', '.join(type_text(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default_text(value: Any, width: int = 40) -> str:
    if isinstance(value, types.MappingProxyType):
        value = dict(value)
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def option_text(param: inspect.Parameter) -> str:
    """``quality: int (1..100) = 85``; an option without a default is required."""
    text = f"{param.name}: {type_text(param.annotation)}"
    return text if param.default is param.empty else f"{text} = {_default_text(param.default)}"


def _returns_item(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation in (Any, None, type(None), object):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_returns_item(a) for a in typing.get_args(annotation))
    return (origin or annotation) in _ITEM_RETURNS


def _factory_kind(annotation: Any) -> str:
    """From ``AsyncIterator[X]``: a stage (X callable), a source (X iterable) or a ledger."""
    args = typing.get_args(annotation)
    if not args:
        return "factory"
    value = args[0]
    origin = typing.get_origin(value) or value
    if origin in _ITERABLES:
        return "source"
    if "Ledger" in getattr(origin, "__name__", ""):
        return "ledger"
    return "factory"


def _positional(params: Sequence[inspect.Parameter]) -> list[inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in params if p.kind in kinds and p.default is p.empty]


def _plain(text: str) -> str:
    """A docstring line without its reST: ``code`` and :func:`~x.name` read as code and name."""
    import re

    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def describe_callable(use: str, fn: Callable[..., Any]) -> StageInfo:
    """Read one callable's kind, options and summary from its signature and docstring."""
    summary = _plain((inspect.getdoc(fn) or "").strip().partition("\n")[0])
    try:
        sig = inspect.signature(fn, eval_str=True)
    except (TypeError, ValueError, NameError):
        return StageInfo(use, "factory" if is_factory(fn) else stage_kind(fn), ("(no signature)",), summary)
    params = list(sig.parameters.values())
    positional = _positional(params)
    batched = batch_of(fn) is not None
    if is_factory(fn):
        kind, options = _factory_kind(sig.return_annotation), params[1:]
    elif batched and len(positional) == 1:  # takes a list of items
        kind, options = stage_kind(fn), params[1:]
    elif not positional:
        kind, options = "source", params
    elif len(positional) == 1 and _returns_item(sig.return_annotation):
        kind, options = stage_kind(fn), params[1:]
    else:
        kind, options = "helper", params
    shown = [p for p in options if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(p.kind is p.VAR_KEYWORD for p in options):
        shown_text = (*map(option_text, shown), "**options: any")
    else:
        shown_text = tuple(map(option_text, shown))
    if batched and kind != "helper":
        kind = f"{kind} (batched)"
    return StageInfo(use, kind, shown_text, summary)


def describe_module(module_name: str, *, helpers: bool = True) -> list[StageInfo]:
    """Every public callable of ``module_name``; ``helpers=False`` leaves out non-stages.

    Raises:
        ImportError: The module cannot be imported.
    """
    import importlib

    module = importlib.import_module(module_name)
    infos = [describe_callable(f"{module_name}:{name}", fn) for name, fn in public_callables(module)]
    return [i for i in infos if helpers or i.kind != "helper"]


def main(module: str | None) -> int:
    """Print the table for ``module``, or for every built-in stage module; returns the exit code."""
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console() if sys.stdout.isatty() else Console(width=150)
    for name in (module,) if module else BUILTIN_MODULES:
        try:
            infos = describe_module(name, helpers=module is not None)
        except ImportError as exc:
            print(f"cannot import module {name!r} ({exc}); check the spelling", file=sys.stderr)
            return 2
        table = Table(title=name, title_justify="left", show_lines=True)
        table.add_column("use", no_wrap=True)
        table.add_column("kind")
        table.add_column("options", overflow="fold")
        table.add_column("description", overflow="fold", ratio=1)
        for info in infos:
            cells = (info.use, info.kind, "\n".join(info.options) or "-", info.summary)
            table.add_row(*map(Text, cells))  # Text: a `list[str]` is not rich markup
        console.print(table if infos else f"{name}: no public callables")
    return 0
