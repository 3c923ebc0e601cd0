"""``--metrics-textfile PATH``: the run report in Prometheus text format, via prometheus_client.

For node_exporter's textfile collector, the usual way to watch cron jobs: the file is written
atomically at the end of every run (prometheus_client writes a temp file and renames it), so
the collector never reads half a file.
"""

from __future__ import annotations

from pathlib import Path

from ._report import RunReport

__all__ = ["write_textfile"]


def write_textfile(report: RunReport, path: Path) -> None:
    """Write ``report`` as Prometheus metrics to ``path``."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    base = ["pipeline"]

    def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
        return Gauge(f"pipeline_{name}", doc, base + labels, registry=registry)

    items = gauge("items", "Items of the last run, by how they ended.", ["outcome"])
    for outcome in ("read", "ok", "failed", "skipped", "unfinished"):
        items.labels(report.pipeline, outcome).set(getattr(report.items, outcome))
    gauge("last_run_exit_code", "Exit code of the last run.", []).labels(report.pipeline).set(
        report.exit_code
    )
    gauge("last_run_wall_seconds", "Wall time of the last run.", []).labels(report.pipeline).set(
        report.wall_s
    )
    gauge("last_run_success", "1 if the last run's status was ok.", []).labels(report.pipeline).set(
        1 if report.status == "ok" else 0
    )
    finished = gauge("last_run_timestamp_seconds", "When the last run ended (Unix time).", [])
    finished.labels(report.pipeline).set_to_current_time()
    stage_items = gauge("stage_items", "Items per stage and outcome, last run.", ["stage", "outcome"])
    retries = gauge("stage_retries", "Attempts beyond the first, last run.", ["stage"])
    cap = gauge("stage_concurrency", "The stage's cap at the end of the last run.", ["stage"])
    in_flight = gauge("stage_max_in_flight", "Most items inside the stage at once.", ["stage"])
    busy = gauge("stage_busy_ratio", "Share of the stage's capacity in use.", ["stage"])
    blocked = gauge("stage_blocked_seconds", "Time workers waited on a full downstream queue.", ["stage"])
    latency = gauge("stage_latency_seconds", "Latency of one attempt, by quantile.", ["stage", "quantile"])
    for s in report.stages:
        labels = (report.pipeline, s.name)
        for outcome in ("ok", "failed", "skipped"):
            stage_items.labels(*labels, outcome).set(getattr(s, outcome))
        retries.labels(*labels).set(s.retries)
        cap.labels(*labels).set(s.concurrency)
        in_flight.labels(*labels).set(s.max_in_flight)
        busy.labels(*labels).set(s.busy_ratio)
        blocked.labels(*labels).set(s.blocked_s)
        for name, value in s.latency_s.items():
            if value is not None:
                latency.labels(*labels, f"0.{name[1:]}").set(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
