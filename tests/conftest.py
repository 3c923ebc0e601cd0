"""Shared test set-up: asyncio debug mode, and the real servers the tests run against."""

import os

# Every loop the tests create runs in debug mode: slow callbacks and never-awaited
# coroutines show up as failures rather than passing silently.
os.environ.setdefault("PYTHONASYNCIODEBUG", "1")

pytest_plugins = ["tests.fixtures.mariadb", "tests.fixtures.httpserver"]
