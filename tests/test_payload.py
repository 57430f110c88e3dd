"""Tests of the pure row → request and answer → completion functions."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchrun.errors import BadResponse, EmptyAnswer, JobError, RowError
from batchrun.payload import (
    Completion,
    build_body,
    build_messages,
    encode_body,
    parse_completion,
    prompt_columns,
    prompt_sizes,
    request_hash,
    template_columns,
)
from tests.conftest import make_job

# What this file's jobs lay over make_job's defaults (None: the Job's default stays).
JOB_KEYS: dict[str, Any] = {"model": "m-1", "api_key_env": None, "request_timeout_s": None}


# ---- template_columns ------------------------------------------------------------


def test_template_columns_in_order_each_once() -> None:
    assert list(template_columns("{b} and {a}, then {b} again; {c}{a}")) == ["b", "a", "c"]


def test_template_columns_ignore_escaped_braces() -> None:
    assert list(template_columns('JSON like {{"x": 1}} for {ticket} }}{{')) == ["ticket"]
    assert list(template_columns("no placeholders at all")) == []
    assert list(template_columns("")) == []


def test_template_columns_allow_format_spec_and_conversion() -> None:
    assert list(template_columns("{score:.2f} {name!r} {x:>{w}}")) == ["score", "name", "x"]


@pytest.mark.parametrize(
    "template",
    ["Summarize: {}", "{0}", "{ticket} {1}", "{row.ticket}", "{row[0]}", "{ticket[name]}"],
)
def test_template_placeholders_that_are_not_columns_rejected(template: str) -> None:
    with pytest.raises(JobError, match="not a column name"):
        template_columns(template)


@pytest.mark.parametrize("template", ["{ticket", "ticket}", "{a} } {b}"])
def test_unbalanced_braces_rejected(template: str) -> None:
    with pytest.raises(JobError, match="not a valid template"):
        template_columns(template)


def test_prompt_columns() -> None:
    assert list(prompt_columns(make_job(**JOB_KEYS, prompt_template="{a} {b} {a}"))) == ["a", "b"]
    assert list(
        prompt_columns(make_job(**JOB_KEYS, prompt_template=None, messages_column="msgs"))
    ) == ["msgs"]


# ---- build_messages: template ----------------------------------------------------


def test_template_with_system_prompt() -> None:
    job = make_job(
        **JOB_KEYS,
        prompt_template="Ticket {id}: {ticket}\nFrom {customer}",
        system_prompt="Be brief.",
    )
    row = {"id": "T-1", "ticket": "It broke {badly}", "customer": "Zoë", "extra": None}
    assert build_messages(job, row) == [
        {"role": "system", "content": "Be brief."},
        # Braces inside values are not re-interpreted.
        {"role": "user", "content": "Ticket T-1: It broke {badly}\nFrom Zoë"},
    ]


def test_template_without_system_prompt() -> None:
    job = make_job(**JOB_KEYS, prompt_template="{{literal}} {ticket}")
    assert build_messages(job, {"ticket": "x"}) == [{"role": "user", "content": "{literal} x"}]


def test_empty_system_prompt_sends_none() -> None:
    job = make_job(**JOB_KEYS, system_prompt="")
    assert [m["role"] for m in build_messages(job, {"ticket": "x"})] == ["user"]


def test_numbers_are_formatted() -> None:
    job = make_job(**JOB_KEYS, prompt_template="{n} items at {price} each, {ratio:.1f}")
    messages = build_messages(job, {"n": 3, "price": 2.5, "ratio": 0.75})
    assert messages[-1]["content"] == "3 items at 2.5 each, 0.8"


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"ticket": None}, "null or missing"),
        ({}, "null or missing"),
        ({"ticket": ["a"]}, "holds a list, not text"),
        ({"ticket": {"a": 1}}, "holds a dict, not text"),
        ({"ticket": True}, "holds a bool, not text"),
        ({"ticket": b"x"}, "holds a bytes, not text"),
    ],
)
def test_bad_prompt_values_raise_row_error(row: dict[str, Any], words: str) -> None:
    with pytest.raises(RowError, match=words) as info:
        build_messages(make_job(**JOB_KEYS), row)
    assert "`ticket`" in str(info.value)


def test_empty_string_value_is_text() -> None:
    assert build_messages(make_job(**JOB_KEYS), {"ticket": ""})[-1]["content"] == "Summarize: "


def test_value_not_fitting_format_spec_is_a_row_error() -> None:
    job = make_job(**JOB_KEYS, prompt_template="Score {score:.1f}")
    assert build_messages(job, {"score": 0.25})[-1]["content"] == "Score 0.2"
    with pytest.raises(RowError):
        build_messages(job, {"score": "high"})


# ---- build_messages: messages column ----------------------------------------------


def test_messages_column_passes_list_through() -> None:
    job = make_job(**JOB_KEYS, prompt_template=None, messages_column="msgs")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    out = build_messages(job, {"msgs": msgs})
    assert out == msgs
    assert out is not msgs  # a copy: the caller's list is not shared


def test_messages_column_system_prompt_prepended_when_list_has_none() -> None:
    job = make_job(
        **JOB_KEYS, prompt_template=None, messages_column="msgs", system_prompt="Be brief."
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert build_messages(job, {"msgs": msgs}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert msgs == [{"role": "user", "content": "hi"}]  # input not modified


def test_messages_column_system_prompt_not_prepended_when_list_has_one() -> None:
    job = make_job(
        **JOB_KEYS, prompt_template=None, messages_column="msgs", system_prompt="Be brief."
    )
    msgs = [{"role": "system", "content": "Own system."}, {"role": "user", "content": "hi"}]
    assert build_messages(job, {"msgs": msgs}) == msgs


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "is null"),
        ([], "is list"),
        ("hi", "is str"),
        ({"role": "user", "content": "hi"}, "is dict"),
        (["hi"], "holds 'hi'"),
        ([{"content": "hi"}], "not a chat message"),
        ([{"role": 1, "content": "hi"}], "not a chat message"),
        ([{"role": "user"}], "not a chat message"),
        ([{"role": "user", "content": "ok"}, None], "holds None"),
    ],
)
def test_bad_message_lists_raise_row_error(value: Any, words: str) -> None:
    job = make_job(**JOB_KEYS, prompt_template=None, messages_column="msgs", system_prompt="s")
    with pytest.raises(RowError, match=words) as info:
        build_messages(job, {"msgs": value})
    assert "`msgs`" in str(info.value)


def test_missing_messages_column_is_a_row_error() -> None:
    with pytest.raises(RowError, match="`msgs` is null"):
        build_messages(
            make_job(**JOB_KEYS, prompt_template=None, messages_column="msgs"), {"other": 1}
        )


# ---- build_body, encode_body, request_hash --------------------------------------------


def test_build_body_without_metadata() -> None:
    job = make_job(**JOB_KEYS, temperature=0.3, max_tokens=99)
    messages = [{"role": "user", "content": "x"}]
    body = build_body(job, messages, "T-1")
    assert body == {"model": "m-1", "messages": messages, "temperature": 0.3, "max_tokens": 99}
    assert "metadata" not in body


def test_build_body_with_metadata_adds_row_id() -> None:
    job = make_job(**JOB_KEYS, metadata={"job": "j", "row_id": "ignored"})
    body = build_body(job, [{"role": "user", "content": "x"}], "T-7")
    assert body["metadata"] == {"job": "j", "row_id": "T-7"}
    assert job.metadata == {"job": "j", "row_id": "ignored"}  # the job's table is untouched


def test_encode_body_is_compact_json() -> None:
    body = build_body(make_job(**JOB_KEYS), [{"role": "user", "content": "é"}], "1")
    raw = encode_body(body)
    assert isinstance(raw, bytes)
    assert orjson.loads(raw) == body
    assert "é".encode() in raw


def test_request_hash_same_body_same_hash() -> None:
    job = make_job(**JOB_KEYS, metadata={"a": 1})
    messages = build_messages(job, {"ticket": "x"})
    first = request_hash(encode_body(build_body(job, messages, "r1")))
    again = request_hash(
        encode_body(build_body(make_job(**JOB_KEYS, metadata={"a": 1}), list(messages), "r1"))
    )
    assert first == again
    assert len(first) == 32
    int(first, 16)  # hex


@pytest.mark.parametrize(
    "change",
    [
        {"row_id": "r2"},
        {"ticket": "y"},
        {"temperature": 0.71},
        {"max_tokens": 513},
        {"model": "m-2"},
        {"metadata": {"a": 2}},
    ],
)
def test_request_hash_differs_when_anything_sent_differs(change: dict[str, Any]) -> None:
    def hash_for(row_id: str = "r1", ticket: str = "x", **job_values: Any) -> str:
        job = make_job(**{**JOB_KEYS, "metadata": {"a": 1}, **job_values})
        body = build_body(job, build_messages(job, {"ticket": ticket}), row_id)
        return request_hash(encode_body(body))

    assert hash_for() != hash_for(**change)


def test_request_hash_is_over_the_exact_bytes() -> None:
    assert request_hash(b"{}") != request_hash(b"{ }")
    assert request_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223"


@pytest.mark.parametrize(
    "contents",
    [
        ["Summarize: a plain ticket"],
        ["Résumé: café, naïve, €5 🙂", "ascii"],  # 2-, 3- and 4-byte characters
        ["", "x" * 10],
        [],
    ],
)
def test_prompt_sizes_count_characters_and_bytes(contents: list[str]) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": c} for c in contents]
    messages.append({"role": "assistant", "content": None})  # not text: not counted
    estimate, bound = prompt_sizes(messages)
    assert estimate == sum(len(c) for c in contents) // 4
    assert bound == sum(len(c.encode()) for c in contents) + 8 * len(messages) + 8


# ---- parse_completion ---------------------------------------------------------------


def answer(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "cmpl-1",
        "model": "m-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Done."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    data.update(extra)
    return data


def test_parse_normal_answer() -> None:
    assert parse_completion(answer()) == Completion(
        text="Done.",
        finish_reason="stop",
        prompt_tokens=12,
        completion_tokens=3,
        total_tokens=15,
        response_id="cmpl-1",
        response_model="m-1",
    )


def test_parse_answer_total_as_given_even_if_not_the_sum() -> None:
    c = parse_completion(
        answer(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 10})
    )
    assert c.total_tokens == 10


def test_parse_answer_missing_usage_gives_none_tokens() -> None:
    data = answer()
    del data["usage"]
    c = parse_completion(data)
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (None, None, None)
    assert c.text == "Done."


@pytest.mark.parametrize("usage", [None, "12", [12], {}])
def test_parse_answer_unusable_usage_gives_none_tokens(usage: Any) -> None:
    c = parse_completion(answer(usage=usage))
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (None, None, None)


def test_parse_answer_total_computed_when_missing() -> None:
    c = parse_completion(answer(usage={"prompt_tokens": 7, "completion_tokens": 5}))
    assert c.total_tokens == 12


def test_parse_answer_total_not_computed_from_half_usage() -> None:
    c = parse_completion(answer(usage={"prompt_tokens": 7}))
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (7, None, None)


def test_parse_answer_non_int_token_counts_are_none() -> None:
    c = parse_completion(
        answer(usage={"prompt_tokens": True, "completion_tokens": "5", "total_tokens": 1.5})
    )
    assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (None, None, None)


def test_parse_answer_without_ids() -> None:
    data = {
        "choices": [{"message": {"role": "assistant", "content": "Hi."}}],
        "id": 5,
        "model": None,
    }
    c = parse_completion(data)
    assert c.text == "Hi."
    assert c.finish_reason is None
    assert c.response_id is None
    assert c.response_model is None


def test_parse_answer_without_text_is_an_empty_answer() -> None:
    """No text, no tool call, no refusal: retried like an unreadable body (see
    test_answers for every shape)."""
    with pytest.raises(EmptyAnswer, match=r"message\.content is null"):
        parse_completion({"choices": [{"message": {"role": "assistant", "content": None}}]})
    with pytest.raises(EmptyAnswer, match="its message is not an object"):
        parse_completion(answer(choices=[{"message": "hi", "finish_reason": "stop"}]))
    with pytest.raises(EmptyAnswer, match="finish_reason length: max_tokens ran out"):
        parse_completion(answer(choices=[{"finish_reason": "length"}]))


@pytest.mark.parametrize("choices", [None, [], "x", [None], ["text"], {"0": {}}])
def test_parse_answer_without_choices_is_bad_response(choices: Any) -> None:
    data = answer(choices=choices)
    if choices is None:
        del data["choices"]
    with pytest.raises(BadResponse, match="no `choices`"):
        parse_completion(data)


@pytest.mark.parametrize(
    ("data", "kind"), [([], "list"), ("ok", "str"), (None, "NoneType"), (3, "int")]
)
def test_parse_non_object_is_bad_response(data: Any, kind: str) -> None:
    with pytest.raises(BadResponse, match=f"JSON {kind}, not an object"):
        parse_completion(data)


def test_bad_response_is_retryable() -> None:
    with pytest.raises(BadResponse) as info:
        parse_completion([])
    assert info.value.retryable is True
