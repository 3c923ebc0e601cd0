"""Tests for the public surface: ``__all__`` is what is exported, and everything public is documented."""

from __future__ import annotations

import dataclasses
import inspect
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest

import pipeline
import pipeline.testing


def public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # `from __future__ import annotations`
    }


def test_all_matches_exported_names() -> None:
    """``pipeline.__all__`` lists exactly the public names the package exports, without duplicates."""
    assert len(pipeline.__all__) == len(set(pipeline.__all__))
    assert set(pipeline.__all__) == public_names(pipeline)


def test_testing_all_matches_its_definitions() -> None:
    """``pipeline.testing.__all__`` lists exactly the public classes and functions it defines."""
    module = pipeline.testing
    defined = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    }
    assert set(module.__all__) == defined
    for name in module.__all__:
        assert (getattr(module, name).__doc__ or "").strip(), f"pipeline.testing.{name} has no docstring"


def documented_members(obj: type) -> list[tuple[str, Any]]:
    out = []
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            out.append((name, value.fget))
        elif isinstance(value, (classmethod, staticmethod)):
            out.append((name, value.__func__))
        elif inspect.isfunction(value):
            out.append((name, value))
    return out


@pytest.mark.parametrize("name", pipeline.__all__)
def test_public_name_has_docstring(name: str) -> None:
    """Every public name, and every public method or property of a public class, has its own docstring."""
    obj = getattr(pipeline, name)
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "__origin__")):
        assert (obj.__doc__ or "").strip(), f"pipeline.{name} has no docstring"
    if isinstance(obj, type):
        for member, fn in documented_members(obj):
            assert (fn.__doc__ or "").strip(), f"pipeline.{name}.{member} has no docstring"


def test_package_docstring_draws_the_checked_layers() -> None:
    """The package docstring lists every module of the engine, bottom up, in the order of the
    import-linter layers contract that ``make lint`` checks: the drawing and the check agree."""
    root = Path(pipeline.__file__ or "").parent
    modules = {p.stem for p in root.glob("*.py")} - {"__init__", "__main__"}
    doc = pipeline.__doc__ or ""
    drawn = [m for m in re.findall(r"^    (_?[a-z]+)\s{2,}", doc, flags=re.MULTILINE) if m in modules]
    assert sorted(drawn) == sorted(modules), "every module appears once in the docstring"
    config = tomllib.loads((root.parent / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers" and c["containers"] == ["pipeline"])
    assert drawn == list(reversed(layers["layers"]))


def test_exception_hierarchy() -> None:
    """Engine errors share one root; stage signals (Skip, TransientError) are not engine errors."""
    for exc in (pipeline.ConfigError, pipeline.StageError, pipeline.ResourceError, pipeline.SourceError):
        assert issubclass(exc, pipeline.PipelineError)
    assert issubclass(pipeline.StageTimeout, pipeline.StageError)
    assert issubclass(pipeline.StageTimeout, TimeoutError)
    assert issubclass(pipeline.StageMisuse, pipeline.StageError)
    assert issubclass(pipeline.RetryAfter, pipeline.TransientError)
    assert not issubclass(pipeline.Skip, pipeline.PipelineError)
    assert not issubclass(pipeline.TransientError, pipeline.PipelineError)


def test_py_typed_marker_is_shipped() -> None:
    """The package carries py.typed so type checkers use its annotations."""
    assert (Path(pipeline.__file__ or "").parent / "py.typed").is_file()


@pytest.mark.parametrize("name", [n for n in pipeline.__all__ if isinstance(getattr(pipeline, n), type)])
def test_public_class_names_its_public_home(name: str) -> None:
    """A public class that stored data can name (an exception's type in a dead letter) is
    ``pipeline.<Name>``, not its private module; every public class's type hints resolve."""
    cls = getattr(pipeline, name)
    if issubclass(cls, BaseException) or not dataclasses.is_dataclass(cls):
        assert cls.__module__ == "pipeline"
    typing.get_type_hints(cls)
