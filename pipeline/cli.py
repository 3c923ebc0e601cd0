"""The ``pipeline`` command: ``run``, ``validate``, ``tune``, ``deadletters``, ``retry``, ``report``,
``stages``, ``status``.

A public module: ``pipeline.cli.main(argv)`` is the command itself, for programs that wrap it
(``python -m stages.demo`` does). It loads and runs pipelines through the public API
(``load_config``, ``run``), as any program would; its reports and tables are its own.

Exit codes: 0 ok (failures within ``max_failures``), 1 over the threshold or the run failed,
2 usage or config error, 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Run a batch pipeline described by a TOML file.",
        epilog="Exit codes: 0 ok, 1 failed (or more failures than max_failures), "
        "2 usage or config error, 130/143 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the pipeline")
    run.add_argument("config", type=Path, help="the pipeline's config.toml")
    run.add_argument("--report", type=Path, metavar="PATH", help="also write the JSON report here")
    run.add_argument("--limit", type=int, metavar="N", help="read at most N items from the source")
    run.add_argument(
        "--run-id", metavar="ID", help="the run's id (default: name and date; rerunning an id resumes it)"
    )
    run.add_argument(
        "--retry-failed", action="store_true", help="on a rerun, take the items that failed again too"
    )
    run.add_argument(
        "--metrics-textfile",
        type=Path,
        metavar="PATH",
        help="also write the report as Prometheus metrics here (node_exporter's textfile collector)",
    )
    run.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="with --dask: run the pipeline as N shards, one Dask task each, under one run id",
    )
    run.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="the Dask scheduler that runs the --shards (tcp://host:8786; needs the dask extra)",
    )
    group = run.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="live progress display (default: when stderr is a terminal)",
    )
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="plain periodic log lines instead of the live display",
    )
    validate = sub.add_parser("validate", help="check the config and exit; nothing runs")
    validate.add_argument("config", type=Path, help="the pipeline's config.toml")
    from ._tune import add_arguments as add_tune_arguments

    tune = sub.add_parser("tune", help="measure each cap on a sample and recommend one (--write to save it)")
    add_tune_arguments(tune)
    dead = sub.add_parser("deadletters", help="list a run's failures, grouped by stage and reason")
    dead.add_argument("config", type=Path, help="the pipeline's config.toml")
    dead.add_argument("--run-id", metavar="ID", help="the run (default: the latest with failures)")
    retry = sub.add_parser("retry", help="replay a run's failed items, after the cause is fixed")
    retry.add_argument("config", type=Path, help="the pipeline's config.toml")
    retry.add_argument("--run-id", metavar="ID", required=True, help="the run whose failures to replay")
    retry.add_argument("--report", type=Path, metavar="PATH", help="also write the JSON report here")
    retry.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    for sharded in (run, retry):
        sharded.add_argument(
            "--shard",
            metavar="K/N",
            help="run shard K of N (from 0) of the run: the items whose key hashes to K; auto/N takes K "
            "from JOB_COMPLETION_INDEX (Kubernetes) or SLURM_ARRAY_TASK_ID (Slurm)",
        )
        sharded.add_argument(
            "--parallel",
            type=int,
            metavar="P",
            help="how many shards run at once (default N): each takes 1/P of every database's "
            "concurrency and every stage's rate",
        )
    status = sub.add_parser("status", help="each shard's state and counts for a run, from the ledger")
    status.add_argument("config", type=Path, help="the pipeline's config.toml")
    status.add_argument("--run-id", metavar="ID", help="the run (default: name and today's date)")
    status.add_argument("--json", action="store_true", help="print JSON: run_id, state, items, shards")
    page = sub.add_parser("report", help="rebuild a run's report.html from the files in its run directory")
    page.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's directory: report_dir/<run id>")
    for logged in (run, retry, tune):
        logged.add_argument(
            "--log-format",
            choices=("text", "json"),
            default="text",
            help="log lines on stderr: text (default), or one JSON object a line, for log collectors",
        )
    stages = sub.add_parser(
        "stages", help="list the built-in stages (or MODULE's): kind, options and defaults, summary"
    )
    stages.add_argument("module", nargs="?", metavar="MODULE", help="e.g. stages.image or my_stages")
    return parser


def _configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from ._logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _deadletters(pipeline: Any, run_id: str | None) -> int:
    from rich.console import Console
    from rich.table import Table

    from ._deadletters import group_dead_letters, latest_run_id, shards_with_dead_letters

    run_id = run_id or latest_run_id(pipeline)
    groups = group_dead_letters(pipeline, run_id)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    if not groups:
        console.print(f"run {run_id}: no items are still failed")
        return EXIT_OK
    table = Table(
        title=f"run {run_id}: {sum(g.count for g in groups)} items still failed", title_justify="left"
    )
    for column in ("items", "stage", "error", "reason", "keys"):
        table.add_column(column, justify="right" if column == "items" else "left", overflow="fold")
    for g in groups:
        more = "" if g.count <= len(g.keys) else f" +{g.count - len(g.keys)}"
        table.add_row(str(g.count), g.stage, g.error_type, g.reason, ", ".join(map(repr, g.keys)) + more)
    console.print(table)
    shards = shards_with_dead_letters(pipeline, run_id)
    if not shards:
        console.print(f"after fixing the cause: pipeline retry CONFIG --run-id {run_id}")
    for shard in shards:
        console.print(f"after fixing the cause: pipeline retry CONFIG --run-id {run_id} --shard {shard}")
    return EXIT_OK


def _status(pipeline: Any, run_id: str | None, as_json: bool) -> int:
    import asyncio

    from ._exceptions import ConfigError, PipelineError
    from ._run import default_run_id
    from ._status import read_status, render_status

    run_id = run_id or default_run_id(pipeline.name)
    try:
        status = asyncio.run(read_status(pipeline, run_id))
    except ConfigError:
        raise
    except PipelineError as exc:  # the ledger's database is down, say
        print(f"status of run {run_id!r} could not be read: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if status is None:
        print(f"run {run_id!r} is not in the ledger: no shard of it has started", file=sys.stderr)
        return EXIT_USAGE
    print(render_status(status, as_json=as_json))
    return EXIT_OK


def _report_page(run_dir: Path) -> int:
    from ._html import write_report_html

    if not (run_dir / "report.json").is_file():
        print(f"{run_dir} has no report.json; give a run's directory (report_dir/<run id>)", file=sys.stderr)
        return EXIT_USAGE
    try:
        page = write_report_html(run_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{run_dir}: report.html could not be made: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"report: {page}", file=sys.stderr)
    return EXIT_OK


def _run_on_dask(args: argparse.Namespace) -> int:
    """``run --shards N --dask ADDRESS``: the shards as Dask tasks, one combined status."""
    from . import ConfigError, PipelineError
    from ._logs import notice

    try:
        if args.dask is None or args.shards is None:
            raise ConfigError(
                "--shards N and --dask ADDRESS go together: the shards run as tasks on that Dask "
                "scheduler (to run one shard of a run here, give --shard K/N)",
                location="--dask" if args.dask is None else "--shards",
            )
        if args.shard is not None:
            raise ConfigError(
                "--shard K/N runs one shard here, --shards N --dask ADDRESS runs all N on Dask; "
                "give one of them",
                location="--shard",
            )
        if args.metrics_textfile is not None:
            raise ConfigError(
                "--metrics-textfile describes one process's run; with --dask each shard's report.json "
                "is in its shard-K-of-N directory. Drop --metrics-textfile",
                location="--metrics-textfile",
            )
        from ._dask import run_on_dask

        report = run_on_dask(
            args.config,
            shards=args.shards,
            address=args.dask,
            run_id=args.run_id,
            parallel=args.parallel,
            limit=args.limit,
            retry_failed=args.retry_failed,
        )
    except ConfigError as exc:
        where = "" if exc.file else f"{args.config}: "
        notice(f"config error: {where}{exc}", logging.ERROR)
        return EXIT_USAGE
    except (PipelineError, ModuleNotFoundError) as exc:
        notice(f"run failed: {exc}", logging.ERROR)
        return EXIT_FAILED
    except KeyboardInterrupt:
        notice(
            "interrupted: no longer waiting; shards already running in workers run to their end "
            "(a thread cannot be stopped). Run the same command with the same --run-id to resume the rest",
            logging.WARNING,
        )
        return 130
    if args.report is not None:
        report.write(args.report)
    _print_sharded(report)
    return report.exit_code


def _print_sharded(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    items = report.items
    table = Table(
        title=(
            f"{report.pipeline} [{report.run_id}] {report.status} in {report.wall_s:.2f}s, "
            f"{len(report.shards)} shards on {report.address} ({report.parallel} at once): "
            f"read {items.read}, ok {items.ok}, failed {items.failed}, skipped {items.skipped}, "
            f"already done {report.already_done}"
        ),
        title_justify="left",
    )
    for column in ("shard", "status", "read", "ok", "failed", "skipped", "already done", "wall s", "worker"):
        table.add_column(column, justify="left" if column in ("shard", "status", "worker") else "right")
    for shard in report.shards:
        r = shard.report
        figures = (
            [str(v) for v in (r.items.read, r.items.ok, r.items.failed, r.items.skipped, r.already_done)]
            + [f"{r.wall_s:.2f}"]
            if r is not None
            else ["-"] * 6
        )
        table.add_row(shard.shard, shard.status, *figures, shard.worker or "-")
    console = Console() if sys.stdout.isatty() else Console(width=150)
    console.print(table)
    for shard in report.shards:
        if shard.error:
            console.print(f"shard {shard.shard}: {shard.error}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script and ``python -m pipeline``."""
    args = _parser().parse_args(argv)
    _configure_logging(getattr(args, "log_format", "text"))
    if args.command == "stages":
        from ._listing import main as list_stages

        return list_stages(args.module)
    if args.command == "tune":
        from ._tune import main as tune

        return tune(args)
    if args.command == "report":
        return _report_page(args.run_dir)
    from . import ConfigError, PipelineError, Shard, load_config, run
    from ._logs import notice

    if getattr(args, "log_format", "text") == "json" and args.progress is None:
        args.progress = False  # a live table would interleave with the JSON lines

    try:
        pipeline = load_config(args.config)
        if args.command == "validate":
            stages = ", ".join(s.name for s in pipeline.stages)
            print(f"{args.config}: valid. {len(pipeline.stages)} stages: {stages}")
            return EXIT_OK
        if args.command == "deadletters":
            return _deadletters(pipeline, args.run_id)
        if args.command == "status":
            return _status(pipeline, args.run_id, args.json)
        limit = getattr(args, "limit", None)
        if limit is not None and limit < 0:
            raise ConfigError(f"--limit must be >= 0, got {limit}")
        shard = Shard.parse(args.shard) if getattr(args, "shard", None) is not None else None
    except ConfigError as exc:
        where = "" if exc.file else f"{args.config}: "
        notice(f"config error: {where}{exc}", logging.ERROR)
        return EXIT_USAGE

    if args.command == "run" and (args.dask is not None or args.shards is not None):
        return _run_on_dask(args)

    from ._progress import print_summary

    report = None
    try:
        report = run(
            pipeline,
            run_id=args.run_id,
            limit=limit,
            report_path=args.report,
            progress=args.progress,
            retry_failed=getattr(args, "retry_failed", False),
            only_failed=args.command == "retry",
            shard=shard,
            parallel=getattr(args, "parallel", None),
        )
    except ConfigError as exc:
        where = "" if exc.file else f"{args.config}: "
        notice(f"config error: {where}{exc}", logging.ERROR)
        return EXIT_USAGE
    except PipelineError as exc:
        notice(f"run failed: {exc}", logging.ERROR)
        report = getattr(exc, "report", None)
    except Exception as exc:
        logging.getLogger("pipeline").exception(
            "run failed with an unexpected error (an engine or stage bug)"
        )
        report = getattr(exc, "report", None)
    if report is None:  # failed before it could report
        return EXIT_FAILED
    print_summary(report)
    metrics = getattr(args, "metrics_textfile", None)
    if metrics is not None:
        from ._metrics import write_textfile

        write_textfile(report, metrics)
    if pipeline.report_dir is not None:
        from ._run import run_directory

        run_dir = run_directory(pipeline.report_dir, report.run_id, shard)
        page = run_dir / "report.html"  # absent only when it could not be made (logged above)
        notice(f"report: {page if page.exists() else run_dir / 'report.json'}", run_id=report.run_id)
    if report.abandoned_threads:
        # The interpreter would join the stuck threads at exit, forever: leave without them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(report.exit_code)
    return report.exit_code
