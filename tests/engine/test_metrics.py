"""``pipeline run --metrics-textfile``: the report in Prometheus text format."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.engine.cli import run_cli

STAGES = """
def rows(count: int = 6):
    for i in range(count):
        yield {"id": i}

def picky(item):
    if item["id"] % 3 == 0:
        raise ValueError("no multiples of three")
    return item
"""


def test_metrics_textfile_has_the_runs_counts_per_outcome_and_stage(tmp_path: Path) -> None:
    """The textfile holds the item counts, the exit code and per-stage figures, parseable by Prometheus."""
    (tmp_path / "metric_stages.py").write_text(STAGES)
    (tmp_path / "config.toml").write_text(
        '[pipeline]\nname = "m"\nmax_failures = 10\n'
        '[source]\nuse = "metric_stages:rows"\n'
        '[[stages]]\nuse = "metric_stages:picky"\nretry = { attempts = 1 }\n'
    )
    proc = run_cli("run", "config.toml", "--metrics-textfile", "metrics/pipeline.prom", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families((tmp_path / "metrics/pipeline.prom").read_text())
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"pipeline": "m", **labels}.items())))]

    assert value("pipeline_items", outcome="read") == 6
    assert value("pipeline_items", outcome="ok") == 4
    assert value("pipeline_items", outcome="failed") == 2
    assert value("pipeline_last_run_exit_code") == 0
    assert value("pipeline_last_run_success") == 1
    assert value("pipeline_stage_items", stage="picky", outcome="failed") == 2
    assert value("pipeline_stage_concurrency", stage="picky") == 1


def test_metrics_textfile_is_written_for_a_failed_run_too(tmp_path: Path) -> None:
    """A run over max_failures still writes its metrics, with exit code 1 and success 0."""
    (tmp_path / "metric_stages2.py").write_text(STAGES)
    (tmp_path / "config.toml").write_text(
        '[pipeline]\nname = "m"\n'
        '[source]\nuse = "metric_stages2:rows"\n'
        '[[stages]]\nuse = "metric_stages2:picky"\nretry = { attempts = 1 }\n'
    )
    proc = run_cli("run", "config.toml", "--metrics-textfile", "m.prom", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    text = (tmp_path / "m.prom").read_text()
    assert 'pipeline_last_run_exit_code{pipeline="m"} 1.0' in text
    assert 'pipeline_last_run_success{pipeline="m"} 0.0' in text
