"""``report.html``: one self-contained page for a run, built from the files in its run directory.

The page is made from ``report.json``, ``timeline.json`` (the sampled series and the run's
settings, see :mod:`._timeline`) and ``dead_letters.jsonl``, never from the live run, so that
``pipeline report RUN_DIR`` rebuilds exactly what the run wrote. Charts are matplotlib figures
drawn on the Agg canvas (no pyplot, so no GUI backend and no global figure state), saved as SVG
and inlined; the page loads nothing at view time. Everything that comes from the run (keys,
error messages, names) is escaped: a dead letter's message is whatever a remote server said.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import math
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._adaptive import Auto
from ._contract import describe
from ._definition import LedgerStore, PipelineDefinition
from ._report import group_records
from ._timeline import Timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "REPORT_HTML",
    "TIMELINE_JSON",
    "describe_settings",
    "render_html",
    "write_report_html",
    "write_run_page",
]

log = logging.getLogger("pipeline")

REPORT_HTML = "report.html"
TIMELINE_JSON = "timeline.json"

# Option names whose values are never shown: a password passed as a stage option stays private.
_SECRET = re.compile(r"pass|secret|token|credential|api_?key|auth", re.IGNORECASE)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")

_OUTCOME_COLORS = {"ok": "#2e7d32", "failed": "#c62828", "skipped": "#9e9e9e", "unfinished": "#ef6c00"}


# -- settings --------------------------------------------------------------------------------


def describe_settings(pipeline: PipelineDefinition) -> dict[str, Any]:
    """The run's settings as JSON-ready data, for the page: no DSNs, no secret-looking options."""

    def options(opts: Mapping[str, Any]) -> dict[str, Any]:
        return {k: "***" if _SECRET.search(k) else _plain(v) for k, v in opts.items()}

    def concurrency(value: int | Auto) -> str | int:
        if isinstance(value, Auto):
            bounds = f"min {value.min}, max {value.max if value.max is not None else 'default'}"
            return f"auto ({bounds}{f', {value.algorithm}' if value.algorithm else ''})"
        return value

    ledger = pipeline.ledger
    return {
        "pipeline": {
            "name": pipeline.name,
            "queue_size": pipeline.queue_size,
            "grace_period": pipeline.grace_period,
            "max_failures": pipeline.max_failures,
            "circuit_breaker": pipeline.circuit_breaker,
            "ledger": describe(ledger.fn) if isinstance(ledger, LedgerStore) else str(ledger),
        },
        "databases": {name: {"concurrency": db.concurrency} for name, db in pipeline.databases.items()},
        "source": {
            "use": describe(pipeline.source.fn),
            "key": pipeline.source.key,
            "watermark": pipeline.source.watermark,
            "options": options(pipeline.source.options),
        },
        "stages": [
            {
                "name": s.name,
                "use": describe(s.fn),
                "concurrency": concurrency(s.concurrency),
                "queue_size": s.queue_size or pipeline.queue_size,
                "timeout": s.timeout,
                "retry": f"{s.retry.attempts} attempts, backoff {s.retry.backoff}s..{s.retry.max_backoff}s",
                "rate": s.rate,
                "always": s.always,
                "batch": f"size {b.size}, max_wait {b.max_wait:g}s" if (b := s.batching) else None,
                "options": options(s.options),
            }
            for s in pipeline.stages
        ],
    }


def _plain(value: Any) -> Any:
    """A setting as JSON data; URLs lose their user:password@ part."""
    if isinstance(value, str):
        return _USERINFO.sub("***@", value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return _USERINFO.sub("***@", repr(value))


# -- the page ---------------------------------------------------------------------------------


def write_run_page(
    run_dir: Path,
    timeline: Timeline | None,
    pipeline: PipelineDefinition,
    interrupted: bool,
    draw: bool = True,
) -> None:
    """Write timeline.json and report.html beside a run's report.json. A failure is logged
    (stderr), never raised: the run's outcome is report.json's, and it is written already.

    An interrupted run gets no page: the grace period is what the scheduler's kill timeout
    allows, and drawing takes seconds. ``pipeline report RUN_DIR`` makes it afterwards, as it
    does for a run told not to ``draw`` (a shard on Dask, whose worker has the next shard to run).
    """
    page = run_dir / REPORT_HTML
    try:
        if timeline is not None:
            timeline.write(run_dir / TIMELINE_JSON, settings=describe_settings(pipeline))
        if interrupted or not draw:
            page.unlink(missing_ok=True)
            why = "an interrupted run" if interrupted else "this run"
            log.info("no report.html for %s; `pipeline report %s` makes it", why, run_dir)
            return
        write_report_html(run_dir)
    except Exception as exc:
        # A page left by an earlier attempt of the run id would show the wrong run.
        with contextlib.suppress(OSError):
            page.unlink(missing_ok=True)
        log.error(
            "report.html could not be made (%s: %s); report.json has the run's report; "
            "`pipeline report %s` tries again",
            type(exc).__name__,
            exc,
            run_dir,
        )


def write_report_html(run_dir: Path) -> Path:
    """Build ``run_dir/report.html`` from the files in ``run_dir``, atomically, and return its path.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``report.json``.
        ValueError: A file in ``run_dir`` is not what a run writes.
    """
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    timeline_path = run_dir / TIMELINE_JSON
    timeline = json.loads(timeline_path.read_text(encoding="utf-8")) if timeline_path.exists() else None
    dead_path = run_dir / "dead_letters.jsonl"
    dead: list[dict[str, Any]] = []
    if dead_path.exists():
        for line in dead_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                dead.append(json.loads(line))
    page = render_html(report, timeline, dead)
    path = run_dir / REPORT_HTML
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


_PAGE = string.Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0 auto; padding: 16px 24px 48px; max-width: 1180px; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 17px; margin: 28px 0 6px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
p.hint { color: #666; margin: 2px 0 8px; }
.status { display: inline-block; padding: 1px 10px; border-radius: 10px; color: #fff; font-weight: 600; }
.status-ok { background: #2e7d32; } .status-failed { background: #c62828; }
.status-interrupted { background: #ef6c00; }
.meta { color: #555; } .meta span { margin-right: 18px; }
.error { background: #fdecea; border-left: 4px solid #c62828; padding: 6px 10px; margin: 8px 0;
         white-space: pre-wrap; overflow-wrap: anywhere; }
.note { background: #fff8e1; border-left: 4px solid #f9a825; padding: 6px 10px; margin: 8px 0; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.msg { max-width: 420px; overflow-wrap: anywhere; } code { font-size: 12px; }
.chart svg { max-width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 0 24px; }
</style>
</head>
<body>
$body
</body>
</html>
""")


def render_html(
    report: Mapping[str, Any], timeline: Mapping[str, Any] | None, dead_letters: Sequence[Mapping[str, Any]]
) -> str:
    """The page for one run: ``report`` as in report.json, ``timeline`` as in timeline.json (or
    ``None``), ``dead_letters`` the records of dead_letters.jsonl.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (the ``plot`` extra), with the fix.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "report.html needs matplotlib: pip install 'pipeline[plot]' (make install does)"
        ) from exc

    # text.parse_math off: a stage name with "$" in it is a name, not a formula to parse.
    # svg.fonttype none: text stays text (small, searchable), drawn in the page's fonts.
    with matplotlib.rc_context({"svg.fonttype": "none", "text.parse_math": False, "font.size": 9}):
        body = "\n".join(_sections(report, timeline, dead_letters))
    title = f"{report.get('pipeline', '')} [{report.get('run_id', '')}] {report.get('status', '')}"
    return _PAGE.substitute(title=_e(title), body=body)


def _sections(
    report: Mapping[str, Any], timeline: Mapping[str, Any] | None, dead_letters: Sequence[Mapping[str, Any]]
) -> Iterable[str]:
    items = report.get("items", {})
    stages = report.get("stages", [])
    status = str(report.get("status", ""))
    yield (
        f"<h1>{_e(report.get('pipeline', ''))} <code>{_e(report.get('run_id', ''))}</code> "
        f'<span class="status status-{_e(status)}">{_e(status)}</span></h1>'
    )
    meta = [
        f"started {report.get('started_at', '')}",
        f"wall {_seconds(float(report.get('wall_s') or 0))}",
        f"exit code {report.get('exit_code', '')}",
        f"read {items.get('read', 0)}",
    ]
    if report.get("already_done"):
        meta.append(f"{report['already_done']} already done in earlier attempts")
    if report.get("not_retried"):
        meta.append(f"{report['not_retried']} failed earlier, not retried")
    yield '<p class="meta">' + "".join(f"<span>{_e(m)}</span>" for m in meta) + "</p>"
    for key in ("error", "ledger_error"):
        if report.get(key):
            yield f'<div class="error">{_e(report[key])}</div>'
    bottleneck = report.get("bottleneck")
    if bottleneck:
        yield f"<p><b>Bottleneck: {_e(bottleneck.get('stage'))}</b> — {_e(bottleneck.get('reason'))}</p>"

    yield "<h2>Items by outcome</h2>"
    yield _chart(_outcome_chart(items))
    yield _stage_table(stages)

    series = [s for s in (timeline or {}).get("stages", []) if s.get("name")]
    if timeline is None or not series or len(timeline.get("t", [])) < 2:
        yield "<h2>Over time</h2>"
        yield '<p class="note">No timeline was sampled for this run (it ended before its stages ran).</p>'
    else:
        t = [float(x) for x in timeline["t"]]
        yield "<h2>Throughput per stage</h2>"
        yield '<p class="hint">Items leaving each stage (ok, failed or skipped) per second.</p>'
        yield _chart(_throughput_chart(t, series))
        yield "<h2>In flight against the cap</h2>"
        yield (
            '<p class="hint">Items inside each stage, and its cap; for <code>concurrency = "auto"</code> '
            "the cap's changes are marked.</p>"
        )
        traces = {s.get("name"): s.get("limit_trace") or [] for s in stages}
        yield _chart(_in_flight_chart(t, series, traces))
        yield "<h2>Queue depth</h2>"
        yield (
            '<p class="hint">Items waiting in front of each stage (dashed: the queue\'s bound). A full '
            "queue in front of a stage, with empty ones after it, marks the bottleneck.</p>"
        )
        yield _chart(_queue_chart(t, series))

    yield "<h2>Latency per stage</h2>"
    yield '<p class="hint">Percentiles of one attempt, in milliseconds (log scale).</p>'
    yield _chart(_latency_chart(stages)) if _has_latency(stages) else '<p class="note">No attempts.</p>'

    yield "<h2>Dead letters</h2>"
    yield from _dead_letters(report, dead_letters)

    yield "<h2>Settings</h2>"
    settings = (timeline or {}).get("settings")
    if settings:
        yield from _settings(settings)
    else:
        yield '<p class="note">This run directory does not record the run\'s settings.</p>'


def _stage_table(stages: Sequence[Mapping[str, Any]]) -> str:
    head = (
        "stage", "kind", "cap", "ok", "failed", "skipped", "retries", "max in flight",
        "p50 ms", "p95 ms", "p99 ms", "busy", "blocked s",
    )  # fmt: skip
    rows = []
    for s in stages:
        lat = s.get("latency_s") or {}
        cells = [
            _e(s.get("name")),
            _e(s.get("kind")),
            *(
                f'<td class="n">{_e(s.get(k, ""))}</td>'
                for k in ("concurrency", "ok", "failed", "skipped", "retries", "max_in_flight")
            ),
            *(f'<td class="n">{_ms(lat.get(q))}</td>' for q in ("p50", "p95", "p99")),
            f'<td class="n">{float(s.get("busy_ratio") or 0):.0%}</td>',
            f'<td class="n">{float(s.get("blocked_s") or 0):.2f}</td>',
        ]
        rows.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
    return _table(head, rows)


def _dead_letters(report: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Iterable[str]:
    # The file gathers every attempt of the run id; the page shows this attempt's, like the counts.
    started = str(report.get("started_at") or "")
    this = [r for r in records if str(r.get("time", "")) >= started]
    before = [r for r in records if str(r.get("time", "")) < started]
    earlier = len({_key(r) for r in before} - {_key(r) for r in this})
    if not this:
        yield "<p>No item failed in this attempt.</p>"
    else:
        groups = group_records(this)
        yield (
            f'<p class="hint">{sum(g.count for g in groups)} items failed, in {len(groups)} groups '
            "(by stage, error and the message without URLs and quoted values).</p>"
        )
        rows = [
            f'<tr><td class="n">{g.count}</td><td>{_e(g.stage)}</td><td><code>{_e(g.error_type)}</code></td>'
            f'<td class="msg">{_e(g.reason)}</td>'
            f'<td class="msg">{_e(", ".join(map(repr, g.keys)))}{_more(g.count, len(g.keys))}</td>'
            f'<td class="msg">{_e(g.example)}</td></tr>'
            for g in groups
        ]
        yield _table(("items", "stage", "error", "reason", "example keys", "example message"), rows)
    if earlier:
        yield (
            f'<p class="note">{earlier} more items failed in earlier attempts of this run id; '
            "<code>pipeline deadletters CONFIG --run-id ID</code> lists those still failed.</p>"
        )


def _settings(settings: Mapping[str, Any]) -> Iterable[str]:
    top = {**settings.get("pipeline", {})}
    for name, db in (settings.get("databases") or {}).items():
        top[f"databases.{name}"] = db
    for key, value in (settings.get("source") or {}).items():
        top[f"source.{key}"] = value
    yield '<div class="grid"><div>'
    rows = [f"<tr><td>{_e(k)}</td><td>{_value(v)}</td></tr>" for k, v in top.items()]
    yield _table(("setting", "value"), rows)
    yield "</div></div>"
    stages = settings.get("stages") or []
    if stages:
        keys = [k for k in stages[0] if k != "name"]
        cells = ("".join(f"<td>{_value(s.get(k))}</td>" for k in keys) for s in stages)
        rows = [f"<tr><td>{_e(s.get('name'))}</td>{c}</tr>" for s, c in zip(stages, cells, strict=True)]
        yield _table(("stage", *keys), rows)


# -- charts -----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # Fixed margins (in inches), legends in the right one: a layout engine would double the
    # drawing time, and every run pays it.
    fig.subplots_adjust(left=0.9 / width, right=1 - 1.6 / width, bottom=0.5 / height, top=1 - 0.12 / height)
    return fig


def _chart(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    # Inline: the XML prolog and doctype do not belong inside an HTML document.
    return f'<div class="chart">{svg[svg.index("<svg") :]}</div>'


def _outcome_chart(items: Mapping[str, Any]) -> Figure:
    fig = _figure(11, 1.0)
    ax = fig.add_subplot()
    left = 0
    for outcome, color in _OUTCOME_COLORS.items():
        n = int(items.get(outcome) or 0)
        ax.barh([0], [n], left=left, color=color, label=f"{outcome} {n}")
        if n:
            ax.text(left + n / 2, 0, str(n), ha="center", va="center", color="white", fontweight="bold")
        left += n
    ax.set_xlim(0, max(left, 1))
    ax.set_yticks([])
    ax.set_xlabel("items")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=7, labelspacing=0.15)
    return fig


def _throughput_chart(t: list[float], series: Sequence[Mapping[str, Any]]) -> Figure:
    fig = _figure(11, 2.8)
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        ended = s.get("ended") or []
        rates = [
            (ended[k] - ended[k - 1]) / (t[k] - t[k - 1]) if t[k] > t[k - 1] else 0.0
            for k in range(1, min(len(t), len(ended)))
        ]
        # Each rate holds over the interval that starts at its sample.
        ax.step(t[: len(rates) + 1], [*rates, *rates[-1:]], where="post", color=f"C{i}", label=str(s["name"]))
    _time_axis(ax, t, "items/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def _in_flight_chart(
    t: list[float], series: Sequence[Mapping[str, Any]], traces: Mapping[Any, Sequence[Sequence[float]]]
) -> Figure:
    fig = _figure(11, 1.3 * len(series) + 0.6)
    fig.subplots_adjust(top=1 - 0.3 / fig.get_figheight(), hspace=0.45)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, s) in enumerate(zip(axes, series, strict=True)):
        in_flight, cap = s.get("in_flight") or [], s.get("cap") or []
        n = min(len(t), len(in_flight), len(cap))
        ax.fill_between(t[:n], in_flight[:n], step="post", color=f"C{i}", alpha=0.35, linewidth=0)
        ax.step(t[:n], in_flight[:n], where="post", color=f"C{i}", linewidth=1, label="in flight")
        trace = traces.get(s.get("name")) or []
        if trace:
            # The auto cap's every change, as the controller made it (samples would miss some).
            xs, ys = [float(p[0]) for p in trace], [int(p[1]) for p in trace]
            ax.step([*xs, t[-1]], [*ys, ys[-1]], where="post", color="#6a1b9a", lw=1.2, label="auto cap")
            ax.plot(xs, ys, linestyle="none", marker="o", markersize=3, color="#6a1b9a")
        else:
            ax.step(t[:n], cap[:n], where="post", color="#333", linestyle="--", linewidth=1, label="cap")
        top = max([*in_flight[:n], *cap[:n], *(int(p[1]) for p in trace), 1])
        ax.set_ylim(0, top * 1.15)
        ax.set_title(str(s["name"]), loc="left", fontsize=9, pad=3)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    _time_axis(axes[-1], t, None)
    return fig


def _queue_chart(t: list[float], series: Sequence[Mapping[str, Any]]) -> Figure:
    fig = _figure(11, 2.8)
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        queued = s.get("queued") or []
        n = min(len(t), len(queued))
        ax.step(t[:n], queued[:n], where="post", color=f"C{i}", label=f"before {s['name']}")
        if s.get("queue_size"):
            ax.axhline(int(s["queue_size"]), color=f"C{i}", linestyle=":", linewidth=1)
    _time_axis(ax, t, "items queued")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def _has_latency(stages: Sequence[Mapping[str, Any]]) -> bool:
    return any((s.get("latency_s") or {}).get("p50") is not None for s in stages)


def _latency_chart(stages: Sequence[Mapping[str, Any]]) -> Figure:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = _figure(11, 0.6 * len(stages) + 0.7)
    ax = fig.add_subplot()
    height = 0.26
    for j, (q, color) in enumerate((("p50", "#90caf9"), ("p95", "#1e88e5"), ("p99", "#0d47a1"))):
        values = [((s.get("latency_s") or {}).get(q) or math.nan) * 1000 for s in stages]
        ys = [i + (j - 1) * height for i in range(len(stages))]
        bars = ax.barh(ys, values, height=height, color=color, label=q)
        ax.bar_label(bars, labels=[_ms(v / 1000) if v == v else "" for v in values], padding=2, fontsize=7)
    ax.set_yticks(range(len(stages)), [str(s.get("name")) for s in stages])
    ax.invert_yaxis()
    ax.set_xscale("log")
    # From a whole decade below the fastest, so bar lengths compare (a log axis has no zero).
    known = [v for s in stages for v in ((s.get("latency_s") or {}).get(q) for q in ("p50", "p99")) if v]
    ax.set_xlim(left=10 ** math.floor(math.log10(min(known) * 1000)))
    # Plain numbers: the log axis' default labels are mathtext, which the page does not parse.
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ms per attempt")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def _time_axis(ax: Axes, t: list[float], ylabel: str | None) -> None:
    ax.set_xlim(0, max(t[-1], 1e-3))
    ax.set_xlabel("seconds since the start")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


# -- text -------------------------------------------------------------------------------------


def _key(record: Mapping[str, Any]) -> str:
    return json.dumps(record.get("key"), sort_keys=True, default=str)


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 60 else f"{s:.0f} s ({s / 60:.1f} min)"


def _ms(seconds: object) -> str:
    if not isinstance(seconds, int | float) or seconds != seconds:
        return "-"
    ms = float(seconds) * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def _more(count: int, shown: int) -> str:
    return "" if count <= shown else f" +{count - shown} more"


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return _e(", ".join(f"{k} = {json.dumps(v, default=str)}" for k, v in value.items()) or "-")
    if value is None:
        return "-"
    return f"<code>{_e(value)}</code>"


def _table(head: Sequence[str], rows: Iterable[str]) -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
