"""The README's examples run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _named(lang: str, name: str) -> str:
    for block in _blocks(lang):
        if block.startswith(f"# {name}\n"):
            return block
    raise AssertionError(f"README has no {lang} block starting with '# {name}'")


def test_custom_stage_example_runs_from_toml(tmp_path: Path) -> None:
    """The ten-line custom stage and its TOML run with `pipeline run` and do what they say."""
    (tmp_path / "my_stages.py").write_text(_named("python", "my_stages.py"))
    (tmp_path / "my.toml").write_text(_named("toml", "my.toml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "my.toml", "--report", "report.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["items"] == {"read": 5, "ok": 5, "failed": 0, "skipped": 0, "unfinished": 0}
    assert report["stages"][0]["name"] == "shout"


def test_python_api_example_runs(tmp_path: Path, monkeypatch: object) -> None:
    """The 'From Python, without TOML' example runs against the same stages."""
    namespace: dict[str, object] = {}
    exec(_named("python", "my_stages.py"), namespace)
    example = next(b for b in _blocks("python") if "from pipeline import Pipeline" in b)
    example = example.replace(
        'name="demo",', f'name="demo", report_dir=__import__("pathlib").Path({str(tmp_path)!r}),'
    )
    exec(example, namespace)
    report = namespace["report"]
    assert report.items.read == 100  # type: ignore[attr-defined]
    assert report.items.ok == 100  # type: ignore[attr-defined]
