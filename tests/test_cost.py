"""Costs that match the invoice: cached and reasoning tokens in the usage,
and the embedded endpoint that reports them."""

from __future__ import annotations

from typing import Any

import pytest

from batchrun.cli import main
from batchrun.mock import MockConfig
from batchrun.payload import MAX_USAGE_TOKENS, parse_completion


def usage_of(**usage: Any) -> Any:
    return parse_completion({"choices": [{"message": {"content": "x"}}], "usage": usage})


def test_cached_and_reasoning_tokens_are_read_from_the_openai_shape() -> None:
    c = usage_of(
        prompt_tokens=100,
        completion_tokens=50,
        total_tokens=150,
        prompt_tokens_details={"cached_tokens": 64, "audio_tokens": 0},
        completion_tokens_details={"reasoning_tokens": 30},
    )
    assert (c.prompt_tokens, c.cached_tokens, c.completion_tokens, c.reasoning_tokens) == (
        100,
        64,
        50,
        30,
    )
    assert c.usage_problem is None


def test_cache_read_input_tokens_counts_as_cached() -> None:
    c = usage_of(prompt_tokens=100, completion_tokens=5, cache_read_input_tokens=80)
    assert c.cached_tokens == 80 and c.reasoning_tokens is None


def test_details_the_server_did_not_send_are_null_and_zero_is_zero() -> None:
    c = usage_of(prompt_tokens=10, completion_tokens=5)
    assert c.cached_tokens is None and c.reasoning_tokens is None
    c = usage_of(
        prompt_tokens=10,
        completion_tokens=5,
        prompt_tokens_details={"cached_tokens": 0},
        completion_tokens_details=None,
    )
    assert c.cached_tokens == 0 and c.reasoning_tokens is None


@pytest.mark.parametrize(
    ("details", "problem"),
    [
        ({"prompt_tokens_details": {"cached_tokens": -1}}, "cached_tokens = -1 is not a possible"),
        ({"prompt_tokens_details": {"cached_tokens": 1.5}}, "is not a possible count"),
        ({"prompt_tokens_details": {"cached_tokens": True}}, "is not a possible count"),
        ({"prompt_tokens_details": {"cached_tokens": "64"}}, "is not a possible count"),
        (
            {"prompt_tokens_details": {"cached_tokens": MAX_USAGE_TOKENS + 1}},
            "is not a possible count",
        ),
        ({"prompt_tokens_details": {"cached_tokens": 101}}, "is more than usage.prompt_tokens"),
        (
            {"completion_tokens_details": {"reasoning_tokens": 51}},
            "reasoning_tokens = 51 is more than usage.completion_tokens = 50",
        ),
        ({"cache_read_input_tokens": -5}, "cache_read_input_tokens = -5"),
    ],
)
def test_an_impossible_detail_is_missing_and_the_counts_stay(
    details: dict[str, Any], problem: str
) -> None:
    c = usage_of(prompt_tokens=100, completion_tokens=50, **details)
    assert c.prompt_tokens == 100 and c.completion_tokens == 50
    assert c.cached_tokens is None and c.reasoning_tokens is None
    assert c.usage_problem is not None and problem in c.usage_problem


def test_details_without_the_count_they_belong_to_are_dropped() -> None:
    c = usage_of(completion_tokens=5, prompt_tokens_details={"cached_tokens": 3})
    assert c.cached_tokens is None
    assert "comes without usage.prompt_tokens" in (c.usage_problem or "")
    # An impossible main count drops the whole usage, details with it.
    c = usage_of(prompt_tokens=-1, completion_tokens=5, prompt_tokens_details={"cached_tokens": 3})
    assert (c.prompt_tokens, c.cached_tokens) == (None, None)
    assert "prompt_tokens = -1" in (c.usage_problem or "")


@pytest.mark.parametrize(
    ("field", "value"), [("cached_share", 1.5), ("cached_share", -0.1), ("reasoning_tokens", -1)]
)
def test_the_mock_refuses_an_impossible_usage_detail(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        MockConfig(**{field: value})


def test_mock_server_flags_set_the_usage_details() -> None:
    from batchrun.cli import _mock_config

    command = main.commands["mock-server"]
    args = ["--cached-share", "0.25", "--reasoning-tokens", "12"]
    config = _mock_config(command.make_context("mock-server", args).params)
    assert (config.cached_share, config.reasoning_tokens) == (0.25, 12)
