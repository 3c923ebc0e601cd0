"""Tests for config.toml loading: every mistake is a ConfigError naming the file, the key and the fix."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import ConfigError, Pipeline, load_config

HEAD = """
[pipeline]
name = "t"
report_dir = "runs"

[source]
use = "{mod}:rows"
"""

GOOD_STAGE = """
[[stages]]
use = "{mod}:touch"
"""


def config_error(write_config: Callable[[str], Path], body: str) -> tuple[ConfigError, Path]:
    path = write_config(body)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return info.value, path


def test_valid_config_with_stage_module_next_to_it(write_config: Callable[[str], Path]) -> None:
    """A config using a stage module next to the file loads, with options checked and coerced."""
    path = write_config(
        HEAD
        + """
[databases.main]
dsn = "sqlite:///x.db"
concurrency = 2

[[stages]]
use = "{mod}:touch"
name = "touch"
concurrency = 3
width = 20
timeout = 1.5
retry = { attempts = 2, backoff = 0.0, on = ["KeyError"] }
"""
    )
    p = load_config(str(path))
    assert isinstance(p, Pipeline)
    stage = p.stages[0]
    assert (stage.name, stage.concurrency, stage.timeout) == ("touch", 3, 1.5)
    assert dict(stage.options) == {"width": 20}
    assert stage.retry.attempts == 2
    assert KeyError in stage.retry.retryable
    assert p.databases["main"].concurrency == 2
    assert p.report_dir == Path("runs")


@pytest.mark.parametrize(
    ("body", "location", "fix"),  # fix: a regular expression the message must contain
    [
        pytest.param(
            HEAD.replace('name = "t"', 'name = "t"\nqueue_sise = 3') + GOOD_STAGE,
            "pipeline.queue_sise",
            "remove it or check its spelling",
            id="unknown-key",
        ),
        pytest.param(
            HEAD + GOOD_STAGE + GOOD_STAGE + 'concurrency = "4"\n',
            "stages[1].concurrency",
            r"must be .*integer.*got '4'",
            id="wrong-type",
        ),
        pytest.param(
            HEAD + GOOD_STAGE + "concurrency = 0\n",
            "stages[0].concurrency",
            r"must be .*>= 1.*got 0",
            id="cap-below-one",
        ),
        pytest.param(
            HEAD + "\n[[stages]]\nname = 'x'\n",
            "stages[0].use",
            "'use' is required; add it",
            id="missing-use",
        ),
        pytest.param(
            HEAD + "\n[[stages]]\nuse = 'no_such_module_xyz:f'\n",
            "stages[0].use",
            "cannot import module 'no_such_module_xyz'",
            id="unimportable",
        ),
        pytest.param(
            HEAD + "\n[[stages]]\nuse = '{mod}:nope'\n",
            "stages[0].use",
            "has no attribute 'nope'",
            id="missing-callable",
        ),
        pytest.param(
            HEAD + "\n[[stages]]\nuse = '{mod}:NOT_CALLABLE'\n",
            "stages[0].use",
            "not a callable",
            id="not-callable",
        ),
        pytest.param(
            HEAD + GOOD_STAGE + 'colour = "red"\n',
            "stages[0].colour",
            "'colour'.*accepts width",
            id="unknown-option",
        ),
        pytest.param(
            HEAD + GOOD_STAGE + 'width = "wide"\n',
            "stages[0].width",
            "option 'width' = 'wide' is invalid",
            id="option-type",
        ),
        pytest.param(
            HEAD + GOOD_STAGE + "retry = { attempts = 0 }\n",
            "stages[0].retry.attempts",
            "must be >= 1",
            id="retry-attempts",
        ),
        pytest.param(
            HEAD + GOOD_STAGE + "retry = { on = ['NoSuchError'] }\n",
            "stages[0].retry.on",
            "not an exception type",
            id="retry-on",
        ),
        pytest.param(
            HEAD + GOOD_STAGE + 'kind = "process"\n', "stages[0].kind", "'async' or 'thread'", id="kind"
        ),
        pytest.param(
            HEAD + "\n[databases.main]\nconcurrency = 2\n" + GOOD_STAGE,
            "databases.main.dsn",
            "'dsn' is required",
            id="database-dsn",
        ),
        pytest.param(HEAD, "stages", "'stages' is required", id="no-stages"),
        pytest.param(
            HEAD + "count = 'three'\n" + GOOD_STAGE,
            "source.count",
            "option 'count' = 'three' is invalid",
            id="source-option",
        ),
    ],
)
def test_config_error_names_file_location_and_fix(
    write_config: Callable[[str], Path], body: str, location: str, fix: str
) -> None:
    """A bad config raises one ConfigError whose message has the file, the table/key and the fix."""
    err, path = config_error(write_config, body)
    assert err.file == str(path)
    assert err.location == location
    message = str(err)
    assert message.startswith(f"{path}: {location}: ")
    assert re.search(fix, message), message


def test_kind_thread_on_async_stage_in_config(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """kind = "thread" on an async def stage is refused at load time, at that stage."""
    (tmp_path / "asyncmod_cfg.py").write_text("async def go(item):\n    return item\n")
    err, _ = config_error(write_config, HEAD + "\n[[stages]]\nuse = 'asyncmod_cfg:go'\nkind = 'thread'\n")
    assert err.location == "stages[0]"
    assert "coroutine function" in str(err)


def test_toml_syntax_error_names_file(write_config: Callable[[str], Path]) -> None:
    """Invalid TOML is a ConfigError naming the file."""
    err, path = config_error(write_config, "[pipeline\nname = 1\n")
    assert err.file == str(path)
    assert "not valid TOML" in str(err)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError saying so."""
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "absent.toml"))


def test_missing_callable_suggests_a_close_name_and_lists_the_callables(
    write_config: Callable[[str], Path],
) -> None:
    """``stages.db:read`` is refused with "did you mean 'read_rows'?" and the module's callables."""
    err, _ = config_error(write_config, "[source]\nuse = 'stages.db:read'\n" + GOOD_STAGE)
    assert err.location == "source.use"
    assert "Did you mean 'read_rows'?" in str(err)
    assert "It has: execute_script, lookup, mysql_ledger, read_rows," in str(err)


def test_unknown_option_suggests_a_close_name(write_config: Callable[[str], Path]) -> None:
    """A misspelt option gets "did you mean ...?" after the options the callable accepts."""
    err, _ = config_error(write_config, HEAD + GOOD_STAGE + "widht = 3\n")
    assert err.location == "stages[0].widht"
    assert str(err).endswith("timeout, use. Check the spelling: did you mean 'width'?")


def test_unknown_option_without_a_close_name_lists_the_options(write_config: Callable[[str], Path]) -> None:
    """An option close to no name gets no guess, only the names that exist."""
    err, _ = config_error(write_config, HEAD + GOOD_STAGE + "dir = 'x'\n")
    assert "did you mean" not in str(err)
    assert "accepts width" in str(err)
