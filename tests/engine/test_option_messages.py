"""Tests for the engine's message on a bad stage option: the option, the value, what is accepted."""

from __future__ import annotations

import re
from typing import Annotated, Any

import pydantic
import pytest

from pipeline import ConfigError, Stage


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError(f"n must be odd, got {value!r}; add or take one")
    return value


def stage(
    item: dict[str, Any],
    *,
    level: Annotated[int, pydantic.Field(ge=1, le=9, strict=True)] = 5,
    delay: Annotated[float, pydantic.Field(gt=0)] = 1.0,
    n: Annotated[int, pydantic.AfterValidator(_odd)] = 1,
    names: Annotated[list[Annotated[int, pydantic.Field(ge=0)]], pydantic.Field(min_length=1)] = [0],  # noqa: B006
    flag: Annotated[bool, pydantic.Field(strict=True)] = False,
) -> dict[str, Any]:
    return item


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"level": 0}, "option 'level' = 0 is invalid: level must be between 1 and 9, got 0", id="range"
        ),
        pytest.param({"delay": 0}, "delay must be > 0, got 0", id="bound-as-written"),
        pytest.param({"names": []}, "names must be non-empty, got []", id="empty"),
        pytest.param({"names": [1, -1]}, "names[1] must be >= 0, got -1", id="nested"),
        pytest.param({"flag": 1}, "flag must be true or false, got 1", id="strict-bool"),
        pytest.param({"level": "3"}, "level must be an integer, got '3'", id="type"),
    ],
)
def test_bound_and_type_errors_read_as_a_sentence(options: dict[str, Any], message: str) -> None:
    """A refused option reads "<option> must be <what is accepted>, got <value>", not pydantic's wording."""
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        Stage(stage, options=options)
    assert "Input should" not in str(info.value)
    assert info.value.location == next(iter(options))


def test_a_validators_own_sentence_is_kept() -> None:
    """A custom validator's ValueError message is the message, without pydantic's "Value error," prefix."""
    with pytest.raises(ConfigError) as info:
        Stage(stage, options={"n": 2})
    assert "is invalid: n must be odd, got 2; add or take one (see the signature of" in str(info.value)
    assert "Value error" not in str(info.value)
