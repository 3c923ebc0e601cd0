"""Hostile database configuration through the real command: a DSN password with URL delimiters,
an unreachable server, and config mistakes that must stop at ``pipeline validate``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.world import Config, Run, report, run_to_end

RUN_ID = "night-1"


@pytest.mark.parametrize("password", ["Dsn?Pw-333", "Dsn#Pw-333", "Dsn/Pw@333:x"])
def test_a_dsn_password_with_url_delimiters_appears_nowhere(tmp_path: Path, password: str) -> None:
    """A DSN whose password holds ? # / @ or : on an unreachable server fails the run with exit 1,
    saying the database is not retried; no part of the password is in stderr or the report."""
    config = Config(tmp_path, f"mysql://pipeline:{password}@127.0.0.1:1/catalog")
    config.write()

    run = run_to_end(config, RUN_ID)

    assert run.process.returncode == 1, run.stderr
    assert "connecting on database 'catalog' (mysql://pipeline:***@127.0.0.1:1/catalog)" in run.stderr
    assert "will be retried" not in run.stderr
    assert "not retried" in run.stderr
    summary = report(config, RUN_ID)
    everything = run.stdout + run.stderr + str(summary)
    assert "Pw" not in everything
    assert "333" not in everything


def test_validate_refuses_a_misspelt_database_option_and_creates_nothing(tmp_path: Path) -> None:
    """`pipeline validate` on a config with `busy_timout` exits 2 with one config error naming the
    file, the key and the fix, and creates no directory."""
    config = Config(tmp_path, f"sqlite:///{tmp_path / 'catalog.db'}", databases={"busy_timout": 5.0})
    config.write()
    for command in ("validate", "run"):
        run = Run(command, str(config.path), cwd=tmp_path)
        code = run.wait()
        assert code == 2, run.stderr
        errors = [line for line in run.stderr.splitlines() if "config error" in line]
        assert len(errors) == 1, run.stderr
        assert str(config.path) in errors[0]
        assert "databases.catalog.busy_timout" in errors[0]
        assert "busy_timeout" in errors[0].replace("busy_timout", "")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
