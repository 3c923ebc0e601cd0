"""The run's log context and the JSON log format (``--log-format json``).

The engine logs through the ``pipeline`` logger with stdlib :mod:`logging`. While a run goes on,
:data:`RUN_ID` holds its id (a contextvar, set once per run, so the per-item path pays
nothing); tasks the run starts inherit it. :class:`JsonFormatter` writes one JSON object a line
with that id, the stage a record concerns (``extra={"stage": name}``) and, for progress lines,
the figures of the snapshot (``extra={"progress": {...}}``).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["RUN_ID", "JsonFormatter", "notice", "run_id_context"]

RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("pipeline_run_id", default=None)
"""The id of the run the current task belongs to, or ``None`` outside a run."""


@contextlib.contextmanager
def run_id_context(run_id: str) -> Iterator[None]:
    """Set :data:`RUN_ID` for the block (and the tasks started in it)."""
    token = RUN_ID.set(run_id)
    try:
        yield
    finally:
        RUN_ID.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``run_id``,
    ``stage`` (when the record concerns one), ``message``, then a progress line's figures
    (``read``, ``done``, ``failed``, ``in_flight``, ``rate``, ``stages``) and ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "run_id": getattr(record, "run_id", None) or RUN_ID.get(),
        }
        stage = getattr(record, "stage", None)
        if stage is not None:
            out["stage"] = stage
        out["message"] = record.getMessage()
        progress = getattr(record, "progress", None)
        if isinstance(progress, dict):
            out.update(progress)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def notice(message: str, level: int = logging.INFO, *, run_id: str | None = None) -> None:
    """Tell the operator ``message`` on stderr: a plain line, or a JSON one (about ``run_id``)
    when the root logger writes JSON (``--log-format json``: then every stderr line parses)."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        logging.getLogger("pipeline.cli").log(level, "%s", message, extra={"run_id": run_id})
    else:
        print(message, file=sys.stderr)
