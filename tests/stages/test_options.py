"""Tests for the shared option types and the direct-call check of ``stages._options``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import pydantic
import pytest

from pipeline import ConfigError, Stage
from stages._options import FieldName, InvalidOptionError, PositiveInt, Rate, checked_options

checks: list[object] = []


def _count(value: object) -> object:
    checks.append(value)
    return value


Counted = Annotated[Any, pydantic.AfterValidator(_count)]


@checked_options
def counted(item: dict[str, Any], *, n: PositiveInt = 1, tag: Counted = None) -> dict[str, Any]:
    return {**item, "n": n, "tag": tag}


@checked_options
async def counted_async(item: dict[str, Any], *, n: PositiveInt = 1) -> dict[str, Any]:
    return {**item, "n": n}


def named(item: dict[str, Any], *, field: FieldName = "url", rate: Rate | None = None) -> dict[str, Any]:
    return item


@pytest.fixture(autouse=True)
def _no_checks_yet() -> Iterator[None]:
    checks.clear()
    yield
    checks.clear()


def test_direct_call_checks_each_option_set_once() -> None:
    """The engine's check runs on the first call with a set of options, not again for the next items."""
    for i in range(5):
        assert counted({"id": i}, tag=[1, 2]) == {"id": i, "n": 1, "tag": [1, 2]}
    assert checks == [[1, 2]]
    counted({"id": 9}, tag=[1, 3])
    assert checks == [[1, 2], [1, 3]]


def test_direct_call_tells_true_from_one() -> None:
    """A cached n=1 does not let n=True through: the cache keys on the values' types too."""
    counted({}, n=1)
    with pytest.raises(InvalidOptionError, match="n must be an integer, got True"):
        counted({}, n=True)


def test_direct_call_error_is_the_engines_and_a_value_error() -> None:
    """A bad option on a direct call raises the engine's ConfigError message, also as a ValueError."""
    with pytest.raises(ConfigError) as engine:
        Stage(counted, options={"n": 0})
    with pytest.raises(InvalidOptionError) as direct:
        counted({}, n=0)
    assert isinstance(direct.value, ValueError)
    assert str(direct.value) == str(engine.value)
    assert "n must be >= 1, got 0" in str(direct.value)


async def test_direct_call_of_an_async_stage_is_checked() -> None:
    """An async def stage keeps its kind under the check; a bad call raises when awaited."""
    assert Stage(counted_async).name == "counted_async"
    assert await counted_async({}, n=2) == {"n": 2}
    with pytest.raises(InvalidOptionError, match="n must be >= 1"):
        await counted_async({}, n=0)


def test_generator_functions_are_refused() -> None:
    """Wrapping a generator would hide its kind from the engine, so checked_options refuses it."""

    def fan_out(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield item

    with pytest.raises(TypeError, match="generator function"):
        checked_options(fan_out)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"field": ""}, "field must be a non-empty field name, got ''"),
        ({"field": 3}, "field must be a non-empty field name, got 3"),
        ({"rate": "fast"}, "rate: rate 'fast' is not of the form"),
        ({"rate": 5}, 'rate must be a rate such as "10/s", got 5'),
    ],
)
def test_field_name_and_rate_are_refused_with_a_sentence(options: dict[str, Any], message: str) -> None:
    """FieldName and Rate name the option, the value and the fix."""
    with pytest.raises(ConfigError, match=message):
        Stage(named, options=options)
