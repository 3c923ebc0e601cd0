"""``pipeline stages [MODULE]``: the stages a module offers, their kinds, options and summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pydantic
import pytest

from pipeline._listing import describe_module, type_text
from tests.engine.cli import run_cli

MODULE = '''
"""Stages for the listing tests."""
import contextlib

import pipeline

__all__ = ["rows", "touch", "load", "open_session", "join_path"]


def rows(*, count: int = 3):
    """Source: count rows."""
    yield from ({"id": i} for i in range(count))


def touch(item, *, width: int = 10):
    """Stage: add a width.

    More text that is not shown.
    """
    return item


async def load(item):
    """Fetch ``item[url]``, see :func:`touch`."""
    return item


@pipeline.factory
@contextlib.asynccontextmanager
async def open_session(ctx, *, size: int):
    yield touch


def join_path(root: str, name: str) -> str:
    return root + name
'''


def test_stages_lists_the_builtin_stages(tmp_path: Path) -> None:
    """Without a module, every built-in stage module is listed with kinds, typed options and
    defaults, and first docstring lines; helpers that are not stages are left out."""
    proc = run_cli("stages", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for use in ("db:read_rows", "http:download", "image:thumbnail", "files:write"):
        assert f"stages.{use}" in out
    assert "quality: int (1..100) = 85" in out
    assert "format: 'JPEG' | 'WEBP' | 'PNG' (checked) = 'WEBP'" in out
    assert "allowed_hosts: list[str] (checked) | None = None" in out  # a type, not rich markup
    assert "Decode the item's image" in out  # the first docstring line (the table may wrap it)
    assert "safe_key" not in out
    assert max(map(len, out.splitlines())) <= 150  # a fixed width when stdout is not a terminal


def test_stages_module_shows_kinds_options_and_summaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a module, each public callable's kind comes from the stage contract: a source takes
    only options, a stage the item; a factory says factory; a function of two positional
    parameters is a helper."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "listing_mod.py").write_text(MODULE)
    infos = {i.use.partition(":")[2]: i for i in describe_module("listing_mod")}
    assert {n: i.kind for n, i in infos.items()} == {
        "join_path": "helper",
        "load": "async",
        "open_session": "factory",
        "rows": "source",
        "touch": "thread",
    }
    assert infos["touch"].options == ("width: int = 10",)
    assert infos["touch"].summary == "Stage: add a width."
    assert infos["load"].summary == "Fetch item[url], see touch."
    assert infos["open_session"].options == ("size: int",)
    assert infos["rows"].options == ("count: int = 3",)
    assert [i.use for i in describe_module("listing_mod", helpers=False)] == [
        "listing_mod:load",
        "listing_mod:open_session",
        "listing_mod:rows",
        "listing_mod:touch",
    ]


def test_stages_unknown_module_is_a_usage_error(tmp_path: Path) -> None:
    """``pipeline stages nope`` exits 2 saying the module cannot be imported."""
    proc = run_cli("stages", "no_such_module_here", cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot import module 'no_such_module_here'" in proc.stderr


@pytest.mark.parametrize(
    ("annotation", "text"),
    [
        (Annotated[int, pydantic.Field(ge=1, le=100)], "int (1..100)"),
        (Annotated[int, pydantic.Field(ge=1, strict=True)], "int (>=1)"),
        (Annotated[float, pydantic.Field(gt=0)], "float (>0)"),
        (Annotated[list[int], pydantic.Field(min_length=1)], "list[int] (len>=1)"),
        (Annotated[str, pydantic.Field(max_length=8), pydantic.Field(max_length=4)], "str (len<=4)"),
        (Literal["a", "b"], "'a' | 'b'"),
        (str | None, "str | None"),
    ],
)
def test_type_text_shows_constraints_compactly(annotation: object, text: str) -> None:
    """Annotated constraints read as ranges and bounds; strictness is not shown."""
    assert type_text(annotation) == text
