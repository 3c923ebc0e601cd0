"""Fixtures shared by the stages' tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.catalog import Catalog, mysql_catalog, sqlite_catalog
from tests.fixtures.mariadb import MariaDB


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """A fresh database of each kind; MariaDB gets its password from the environment."""
    if request.param == "sqlite":
        return sqlite_catalog(tmp_path)
    server: MariaDB = request.getfixturevalue("mysql_db")
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", server.password)
    return mysql_catalog(server, autocommit=True)
