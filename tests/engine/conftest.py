"""Fixtures for the engine tests: config files with their own stage module, in tmp_path."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

STAGE_MODULE = '''
"""Stages for one test's config; each call leaves a trace so a test can tell whether it ran."""
import os
import pathlib

HERE = pathlib.Path(__file__).parent


def rows(count: int = 3, missing_key_at: int = -1):
    for i in range(count):
        yield {{"n": i}} if i == missing_key_at else {{"id": i, "n": i}}


def touch(item, *, width: int = 10):
    (HERE / "ran").touch()
    return {{**item, "width": width}}


def fail_odd(item):
    if item["id"] % 2:
        raise ValueError(f"odd item {{item['id']}}")
    return item


def broken_rows(count: int = 1):
    yield {{"id": 0}}
    raise OSError("disk gone")


NOT_CALLABLE = 42
'''


@pytest.fixture
def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Path]]:
    """Write ``config.toml`` (with ``{mod}`` standing for a fresh stage module) into tmp_path.

    The stage module gets a unique name, so a module cached by an earlier test is never reused,
    and sys.path / sys.modules are restored after the test.
    """
    monkeypatch.setattr(sys, "path", list(sys.path))
    mod = f"stages_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{mod}.py").write_text(STAGE_MODULE.format())

    def write(body: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(textwrap.dedent(body).replace("{mod}", mod))
        return path

    yield write
    sys.modules.pop(mod, None)
