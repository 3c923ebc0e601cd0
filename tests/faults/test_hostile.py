"""Broken images and hostile rows through the real nightly run: each ends ok or dead-lettered with
its reason, the batch goes on, and the counts add up."""

from __future__ import annotations

import time
from pathlib import Path

from tests.broken_images import Case, broken_image_cases
from tests.faults.world import (
    SIZES,
    Config,
    dead_letters,
    output_files,
    report,
    run_to_end,
    serve_images,
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


def test_slow_servers_and_a_backslash_url_cannot_jam_the_download_stage(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """A trickled body, trickled headers and a backslash URL among 60 good rows, on 2 download
    slots with timeout = 5 and 2 attempts: the 60 end ok, the 3 are dead-lettered with their
    reasons, and no thread outlives its attempt. (pytest-timeout is the net for the wall time.)"""
    rows = serve_images(http_server, 60)
    padding = b"x" * 200  # one byte every 0.2 s: 40 s, far past the 4.5 s deadline
    body_url = http_server.add_trickle("/trickle/body.jpg", padding, interval=0.2)
    head_url = http_server.add_trickle("/trickle/head.jpg", padding, interval=0.2, headers=True)
    backslash = f"http://localhost:{http_server.port}\\@127.0.0.1/img/1.jpg"
    hostile = {61: (body_url, "(deadline)"), 62: (head_url, "(deadline)"), 63: (backslash, "is ambiguous")}
    rows[30:30] = [(key, url) for key, (url, _) in hostile.items()]
    catalog = sqlite_catalog(tmp_path)
    catalog.seed(rows)
    config = Config(
        tmp_path,
        catalog.dsn,
        download={
            "concurrency": 2,
            "timeout": 5,
            "read_timeout": 2.0,
            "allowed_hosts": ["127.0.0.1"],
            "retry": {"attempts": 2, "backoff": 0.01, "max_backoff": 0.02, "jitter": 0.0},
        },
    )
    config.write()

    started = time.monotonic()
    run = run_to_end(config, RUN_ID)
    print(f"60 good rows + 3 hostile ones: {time.monotonic() - started:.1f}s wall time")

    assert run.process.returncode == 0, run.stderr
    summary = report(config, RUN_ID)
    assert summary["items"] == {"read": 63, "ok": 60, "failed": 3, "skipped": 0, "unfinished": 0}
    assert summary["abandoned_threads"] == 0
    letters = {d["key"]: d for d in dead_letters(config, RUN_ID)}
    assert sorted(letters) == sorted(hostile)
    for key, (_, reason) in hostile.items():
        assert letters[key]["stage"] == "download"
        assert reason in letters[key]["message"], letters[key]
    assert http_server.hits("/%5C@127.0.0.1/img/1.jpg") == 0
