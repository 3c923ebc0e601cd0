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


def test_batched_stage_example_runs() -> None:
    """The 'Batched stages' example runs through the engine, its items in lists, one result each."""
    from pipeline import Stage
    from pipeline.testing import run_stages

    class Model:
        """Scores a text by its length, a whole list per call."""

        def __init__(self) -> None:
            self.calls: list[int] = []

        async def predict(self, texts: list[str]) -> list[int]:
            self.calls.append(len(texts))
            return [len(text) for text in texts]

    model = Model()
    namespace: dict[str, object] = {"model": model}
    exec(_named("python", "my_batched.py"), namespace)
    result = run_stages([{"id": i, "text": "x" * i} for i in range(450)], Stage(namespace["score"]))  # type: ignore[arg-type]
    assert result.report.items.ok == 450
    assert sorted((item["id"], item["score"]) for item in result.outputs) == [(i, i) for i in range(450)]
    assert max(model.calls) <= 200
    assert sum(model.calls) == 450
