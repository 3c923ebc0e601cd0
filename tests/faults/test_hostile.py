"""Broken images and hostile rows through the real nightly run: each ends ok or dead-lettered with
its reason, the batch goes on, and the counts add up."""

from __future__ import annotations

from pathlib import Path

from tests.broken_images import Case, broken_image_cases
from tests.faults.world import (
    SIZES,
    Config,
    dead_letters,
    output_files,
    report,
    run_to_end,
)
from tests.fixtures.catalog import sqlite_catalog
from tests.fixtures.httpserver import LoopbackServer

RUN_ID = "night-1"

_DOWNLOAD = ("download", "DownloadError")

HOSTILE_URLS: list[tuple[str | None, str]] = [
    (None, "must hold a URL string, got None"),
    ("", "must hold a URL string, got ''"),
    ("   ", "must hold a URL string"),
    ("not a url", "has 'no scheme': only http and https URLs are downloaded"),
    ("file:///etc/passwd", "has 'file': only http and https URLs are downloaded"),
    ("ftp://127.0.0.1/x.jpg", "has 'ftp': only http and https URLs are downloaded"),
    ("javascript:alert(1)", "only http and https URLs are downloaded"),
    ("http://10.0.0.1/x.jpg", "is on host '10.0.0.1', which is not in allowed_hosts"),
    (
        "http://169.254.169.254/latest/meta-data/",
        "is on host '169.254.169.254', which is not in allowed_hosts",
    ),
    ("http://[::1]/x.jpg", "is on host '::1', which is not in allowed_hosts"),
    ("http://", "has no host"),
]


def test_broken_images_and_hostile_rows_each_end_ok_or_dead_lettered_with_their_reason(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """Every corrupt, truncated, forged or huge image, every bad URL and a duplicate key ends as
    documented; the good ones get thumbnails; read = ok + failed."""
    cases = broken_image_cases()
    rows: list[tuple[int, str | None]] = []
    fate: dict[int, Case] = {}
    for i, case in enumerate(cases, start=1):
        rows.append((i, http_server.add(f"/corpus/{case.name}", case.body, content_type=case.content_type)))
        fate[i] = case
    for j, (url, message) in enumerate(HOSTILE_URLS, start=len(cases) + 1):
        rows.append((j, url))
        fate[j] = Case(f"url-{j}", b"", "", *_DOWNLOAD, message)
    catalog = sqlite_catalog(tmp_path)
    catalog.seed(rows, nullable=True)
    config = Config(
        tmp_path,
        catalog.dsn,
        # Row 1 a second time: a duplicate key in flight, which fails alone.
        source={"query": "SELECT id, url FROM catalog UNION ALL SELECT id, url FROM catalog WHERE id = 1"},
        download={"allowed_hosts": ["127.0.0.1"]},
        thumbnail={"max_pixels": 40_000_000},
    )
    config.write()

    run = run_to_end(config, RUN_ID)

    assert run.process.returncode == 0, run.stderr
    good = sorted(i for i, case in fate.items() if case.stage is None)
    bad = sorted(i for i, case in fate.items() if case.stage is not None)
    summary = report(config, RUN_ID)
    assert summary["items"] == {
        "read": len(rows) + 1, "ok": len(good), "failed": len(bad) + 1, "skipped": 0, "unfinished": 0,
    }  # fmt: skip
    letters = dead_letters(config, RUN_ID)
    duplicate = [d for d in letters if d["stage"] == "source"]
    assert [(d["key"], d["error_type"]) for d in duplicate] == [(1, "pipeline.SourceError")]
    assert "duplicate key 1" in duplicate[0]["message"]
    by_key = {d["key"]: d for d in letters if d["stage"] != "source"}
    assert sorted(by_key) == bad
    for key in bad:
        case, letter = fate[key], by_key[key]
        assert (letter["stage"], letter["error_type"].rpartition(".")[2]) == (case.stage, case.error), (
            case.name,
            letter,
        )
        assert case.message in letter["message"], (case.name, letter["message"])
    assert output_files(config.root) == sorted(config.root / str(i) / f"{s}.png" for i in good for s in SIZES)
    assert sorted(int(k) for k, _, _ in catalog.results()) == good
