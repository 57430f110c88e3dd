"""Personal data pseudonymized before sending and restored in the output (``pii``).

Unit tests of the detection and restoration (``batchrun.pii``), then whole jobs
against a server on 127.0.0.1 that records every request body it receives and
answers with the placeholders it was sent, changed the ways models change them.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner

from batchrun import pii
from batchrun.cli import main
from batchrun.config import load_job
from batchrun.engines.local import run_job
from batchrun.errors import JobError
from batchrun.lifecycle import RunOptions
from batchrun.mock import MockConfig, serve
from batchrun.payload import prepare_rows, request_hash
from batchrun.plan import plan_job
from batchrun.stream_options import StreamOptions
from tests.conftest import assert_exit, make_job, run_app, write_jsonl

pytestmark = pytest.mark.timeout(60)

ALL_KINDS = ["email", "phone", "card", "iban", "ip"]
PATTERNS = {"customer_number": r"CUST-\d{6}"}

# Every value here must leave the machine only as a placeholder.
EMAILS = ["jane.doe@example.com", "t.nowak@example.de", "Mei.Chen+billing@mail.example.co.uk"]
PHONES = [
    "+1 (415) 555-0132",
    "(415) 555-0188",
    "415.555.0143",
    "415-555-0187",
    "4155550123",
    "+44 20 7946 0958",
    "+49 30 901820",
]
CARDS = ["4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "3782 822463 10005"]
IBANS = ["DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32", "NL91ABNA0417164300"]
IPS = ["203.0.113.42", "2001:db8::8a2e:370:7334"]
CUSTOMERS = ["CUST-204518", "CUST-771203"]
VALUES = EMAILS + PHONES + CARDS + IBANS + IPS + CUSTOMERS


def scanner(kinds: list[str] | None = None, patterns: dict[str, str] | None = None) -> pii.Scanner:
    return pii.Scanner(ALL_KINDS if kinds is None else kinds, patterns or {}, "US")


def pseudonymize(text: str, **kw: Any) -> tuple[str, pii.RowPii]:
    messages, row = scanner(**kw).pseudonymize([{"role": "user", "content": text}])
    return messages[0]["content"], row


def pii_tickets() -> list[dict[str, Any]]:
    """Tickets full of personal data: every value above, in several formats and places."""
    return [
        {
            "id": "T-1",
            "ticket": f"Charged twice on card {CARDS[0]}. Refund it and write to {EMAILS[0]}; "
            f"again, {EMAILS[0]} is the address.\n\nJane\n{PHONES[0]}",
        },
        {
            "id": "T-2",
            "ticket": f"The debit from {IBANS[0]} failed. Customer number {CUSTOMERS[0]}. "
            f"Call me on {PHONES[6]} or write to {EMAILS[1]}.",
        },
        {
            "id": "T-3",
            "ticket": f"Logins from {IPS[0]} and {IPS[1]} are blocked. Pay to {IBANS[1]} "
            f"or {IBANS[2]}. Reach me at {PHONES[1]}, {PHONES[2]} or {PHONES[5]}.",
        },
        {
            "id": "T-4",
            "ticket": f"Cards {CARDS[1]}, {CARDS[2]} and {CARDS[3]} were all declined "
            f"({CUSTOMERS[1]}). Phone {PHONES[3]}, fax {PHONES[4]}, mail {EMAILS[2]}.",
        },
    ]


# ---- detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value"),
    [("email", v) for v in EMAILS]
    + [("phone", v) for v in PHONES]
    + [("card", v) for v in CARDS]
    + [("iban", v) for v in IBANS]
    + [("ip", v) for v in IPS],
)
def test_each_kind_is_replaced_by_a_numbered_placeholder(kind: str, value: str) -> None:
    text, row = pseudonymize(f"Contact: {value}. Thanks!", kinds=[kind])
    assert text == f"Contact: <{kind.upper()}_1>. Thanks!"
    assert row.values == {f"{kind.upper()}_1": value}
    assert row.found == 1


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 was refused.",  # 16 digits that fail the Luhn check
        "Card 4111111111111112 was refused.",
        "IBAN DE89 3704 0044 0532 0130 01 is wrong.",  # the check digits do not fit
        "Order 12345678 from 2026-10-01, version 4.14.4, $149.13, at 10:30:00.",
        "Ask for 555-0132.",  # no area code: not a whole US number
        "Build 1.2.3.400 failed; see ticket 99.",
        "Write to support at example dot com, or @jane on chat.",
    ],
)
def test_what_fails_the_checks_stays_as_it_is(text: str) -> None:
    out, row = pseudonymize(text)
    assert out == text
    assert row.found == 0


def test_custom_patterns_and_the_same_value_twice_in_a_row() -> None:
    text, row = pseudonymize(
        f"{CUSTOMERS[0]} wrote from {EMAILS[0]}, then {CUSTOMERS[1]} and {CUSTOMERS[0]} "
        f"from {EMAILS[0]} and {EMAILS[1]}.",
        patterns=PATTERNS,
    )
    assert text == (
        "<CUSTOMER_NUMBER_1> wrote from <EMAIL_1>, then <CUSTOMER_NUMBER_2> and "
        "<CUSTOMER_NUMBER_1> from <EMAIL_1> and <EMAIL_2>."
    )
    assert row.found == 4
    assert row.counts == {"customer_number": 2, "email": 2}


def test_a_job_pattern_wins_over_a_builtin_kind() -> None:
    text, _ = pseudonymize("Account 4155550123 is locked.", patterns={"account": r"\b\d{10}\b"})
    assert text == "Account <ACCOUNT_1> is locked."


def test_every_message_is_scanned_and_numbers_run_across_them() -> None:
    messages = [
        {"role": "system", "content": f"Escalations go to {EMAILS[1]}."},
        {"role": "user", "content": [{"type": "text", "text": f"I am {EMAILS[0]}."}]},
        {"role": "assistant", "content": f"Noted, {EMAILS[0]}."},
    ]
    out, row = scanner().pseudonymize(messages)
    assert out[0]["content"] == "Escalations go to <EMAIL_1>."
    assert out[1]["content"] == [{"type": "text", "text": "I am <EMAIL_2>."}]
    assert out[2]["content"] == "Noted, <EMAIL_2>."
    assert messages[0]["content"] == f"Escalations go to {EMAILS[1]}."  # the input is left alone
    assert row.found == 2


def test_a_placeholder_already_in_the_input_keeps_its_number() -> None:
    text, row = pseudonymize(f"The form showed <EMAIL_1> instead of {EMAILS[0]}.")
    assert text == "The form showed <EMAIL_1> instead of <EMAIL_2>."
    unrestored: set[str] = set()
    answer = row.restore_text("It showed <EMAIL_1>, not <EMAIL_2>.", unrestored)
    assert answer == f"It showed <EMAIL_1>, not {EMAILS[0]}."
    assert unrestored == set()


# ---- restoration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "restored"),
    [
        ("Mail <EMAIL_1> now.", "Mail {e} now."),
        ("Mail EMAIL_1 now.", "Mail {e} now."),
        ("Mail <email_1> now.", "Mail {e} now."),
        ("Mail [EMAIL_1] now.", "Mail {e} now."),
        ("Mail {Email_1} now.", "Mail {e} now."),
        ("Mail {{Email_1}} now.", "Mail {e} now."),
        ("Mail < EMAIL 1 > now.", "Mail {e} now."),
        ("Mail &lt;EMAIL_1&gt; now.", "Mail {e} now."),
        ("Mail **EMAIL_1**.", "Mail **{e}**."),
        ("(see EMAIL_1)", "(see {e})"),
        ("Mail <EMAIL_1>, <EMAIL_1>; call <PHONE_1>.", "Mail {e}, {e}; call {p}."),
        ("A customer_number_1 and [Customer-Number-1].", "A {c} and {c}."),
    ],
)
def test_placeholders_come_back_whatever_the_model_did_to_them(answer: str, restored: str) -> None:
    _, row = pseudonymize(f"{EMAILS[0]} {PHONES[0]} {CUSTOMERS[0]}", patterns=PATTERNS)
    unrestored: set[str] = set()
    expected = restored.format(e=EMAILS[0], p=PHONES[0], c=CUSTOMERS[0])
    assert row.restore_text(answer, unrestored) == expected
    assert unrestored == set()


def test_placeholders_that_stand_for_nothing_are_counted_and_left() -> None:
    _, row = pseudonymize(f"Mail {EMAILS[0]}.")
    record: dict[str, Any] = {"completion": "Mail <EMAIL_1> or <EMAIL_2>, [EMAIL_2], PHONE_7."}
    row.restore(record)  # type: ignore[arg-type]
    assert record["completion"] == f"Mail {EMAILS[0]} or <EMAIL_2>, [EMAIL_2], PHONE_7."
    assert record["pii_found"] == 1
    assert record["pii_unrestored"] == 2  # EMAIL_2 (twice) and PHONE_7
    # Words that only look alike stay: "email 2" without brackets, EMAIL_12 is not EMAIL_1.
    assert row.restore_text("email 1, EMAIL_12", set()) == "email 1, EMAIL_12"


def test_typed_values_are_restored_everywhere_inside() -> None:
    _, row = pseudonymize(f"{EMAILS[0]} {PHONES[0]}")
    record: dict[str, Any] = {
        "completion": '{"contact": "<EMAIL_1>"}',
        "values": {"contact": "<EMAIL_1>", "all": ["email_1", {"tel": "[PHONE_1]"}], "n": 3},
    }
    row.restore(record)  # type: ignore[arg-type]
    assert record["values"] == {
        "contact": EMAILS[0],
        "all": [EMAILS[0], {"tel": PHONES[0]}],
        "n": 3,
    }
    assert record["completion"] == f'{{"contact": "{EMAILS[0]}"}}'


def test_a_mapping_never_shows_its_values() -> None:
    _, row = pseudonymize(f"{EMAILS[0]}")
    assert EMAILS[0] not in repr(row)
    assert EMAILS[0] not in scanner().scrub(f"bad message {{'content': '{EMAILS[0]}'}}")


# ---- the job keys ----------------------------------------------------------------------


def test_the_keys_are_checked(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "ticket": "x"}])
    with pytest.raises(JobError, match="the kinds are email, phone, card, iban, ip"):
        make_job(pii=["email", "passport"])
    with pytest.raises(JobError, match="not a valid regular expression"):
        make_job(pii_patterns={"order": "ORD-(\\d+"})
    with pytest.raises(JobError, match="matches an empty text"):
        make_job(pii_patterns={"order": "\\d*"})
    with pytest.raises(JobError, match="built-in kind"):
        make_job(pii_patterns={"email": "x+"})
    with pytest.raises(JobError, match="the name 'order id'"):
        make_job(pii_patterns={"order id": "x+"})
    with pytest.raises(JobError, match=r"`pii_region`.*'XX'"):
        make_job(pii=["phone"], pii_region="XX")
    job = make_job(pii="email, phone", pii_region="de")
    assert job.pii == ("email", "phone")
    assert job.pii_region == "DE"


def test_a_missing_library_is_named_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pii, "_importable", lambda: {"phonenumbers"})
    with pytest.raises(JobError, match=r"card, iban.*python-stdnum: pip install 'batchrun\[pii\]'"):
        make_job(pii=["email", "phone", "card", "iban"])
    make_job(pii=["email", "phone", "ip"])  # these need no stdnum


# ---- requests ---------------------------------------------------------------------------


def _prepared(job: Any) -> list[Any]:
    from batchrun.checks import check_job

    return list(check_job(job, RunOptions()).rows())


def test_the_request_hash_is_deterministic_and_tells_values_apart(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "ticket": f"Write to {EMAILS[0]}."},
        {"id": "b", "ticket": f"Write to {EMAILS[1]}."},
        {"id": "c", "ticket": f"Write to {EMAILS[0]}."},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(output="out.parquet", pii=["email"])
    first, second = _prepared(job), _prepared(job)
    assert [p.request_hash for p in first] == [p.request_hash for p in second]
    assert first[0].body == first[1].body  # the same request is sent …
    assert first[0].request_hash != first[1].request_hash  # … but --reuse tells them apart
    assert first[0].request_hash == first[2].request_hash
    assert b"<EMAIL_1>" in first[0].body and EMAILS[0].encode() not in first[0].body
    # A job without pii keeps the hashes it always had.
    plain = _prepared(make_job(output="out.parquet"))
    assert plain[0].pii is None and EMAILS[0].encode() in plain[0].body


def test_a_dropped_stream_options_keeps_the_values_in_the_hash(tmp_path: Path) -> None:
    """A streamed pii row re-rendered without a refused stream_options: its
    hash is still made with its values (--reuse tells such rows apart)."""
    write_jsonl(tmp_path / "in.jsonl", pii_tickets())
    job = make_job(output="out.parquet", stream=True, **PII_KEYS)
    p = _prepared(job)[0]
    assert b'"stream_options"' in p.body
    StreamOptions(job, {"sent": False, "refused": "HTTP 400"}).render(p)
    assert b'"stream_options"' not in p.body
    assert p.request_hash == p.rehash(p.body) != request_hash(p.body)


def test_a_row_leaving_for_a_ray_sender_carries_placeholders_only(tmp_path: Path) -> None:
    """The Ray driver's handoff: what a sender gets of a pii row (pickled, as
    Ray sends it) holds no value, no mapping and no hash made with them; the
    result it brings back is restored on the driver, with the row's own hash."""
    from batchrun.engines.ray.rows import Handoff

    write_jsonl(tmp_path / "in.jsonl", pii_tickets())
    job = make_job(output="out.parquet", **PII_KEYS)
    handoff = Handoff(None, StreamOptions(job))
    rows = _prepared(job)
    for p in rows:
        blob = pickle.dumps(handoff.outbound(p))
        assert b"<EMAIL_1>" in blob
        for value in VALUES:
            assert value.encode() not in blob, value
        assert p.request_hash.encode() not in blob
        assert p.pii is not None and p.pii.found  # the driver's copy keeps them
    p = rows[0]
    rec: dict[str, Any] = {
        "row": p.row, "id": p.id, "status": "ok", "completion": "Wrote to <email_2>.",
        "attempts": 1, "request_hash": "",
    }  # fmt: skip
    handoff.inbound(p, rec, None)
    assert rec["completion"] == f"Wrote to {EMAILS[0]}."
    assert (rec["request_hash"], rec["pii_found"]) == (p.request_hash, 4)
    # A body the sender changed (the search moved on, a field dropped) is hashed here.
    body = p.body.replace(b"Jane", b"J.")
    rec = {"row": p.row, "id": p.id, "status": "error", "error": "HTTP 500", "attempts": 1}
    handoff.inbound(p, rec, body)
    assert rec["request_hash"] == p.rehash(body) != request_hash(body)
    assert rec["pii_found"] == 4 and "completion" not in rec


def test_openai_batch_bodies_are_pseudonymized(tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": "r1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"I am {EMAILS[0]}"}]},
        }
    ]
    write_jsonl(tmp_path / "batch.jsonl", lines)
    job = load_job(
        None, {"input": "batch.jsonl", "output": "o.parquet", "pii": ["email"], "api_key_env": ""}
    )
    (p,) = _prepared(job)
    assert orjson.loads(p.body)["messages"][0]["content"] == "I am <EMAIL_1>"


def test_a_row_error_shows_no_value(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "msgs": [f"call {PHONES[0]}"]}])
    job = make_job(
        output="out.parquet", prompt_template=None, messages_column="msgs", pii=["phone"]
    )
    (p,) = _prepared(job)
    assert p.error is not None and "<PHONE>" in p.error and PHONES[0] not in p.error


# ---- whole jobs against a recording server ------------------------------------------------

_PLACEHOLDER = re.compile(r"<([A-Z_]+?)_(\d+)>")
_VARIANTS: list[Callable[[str, str], str]] = [
    lambda label, n: f"<{label}_{n}>",
    lambda label, n: f"{label}_{n}",
    lambda label, n: f"<{label.lower()}_{n}>",
    lambda label, n: f"[{label}_{n}]",
    lambda label, n: f"{{{label.title()}_{n}}}",
]


def model_answer(text: str) -> str:
    """What the recording server's model says: the user's text with each placeholder
    changed one of the ways models change them, and one that stands for nothing."""
    count = iter(range(1000))
    changed = _PLACEHOLDER.sub(lambda m: _VARIANTS[next(count) % 5](m[1], m[2]), text)
    return f"{changed} (see also <EMAIL_99>)"


class Recorder:
    """An OpenAI-compatible server that keeps every request body it receives."""

    def __init__(self, structured: bool = False, fail: Callable[[str], bool] | None = None):
        self.bodies: list[bytes] = []
        self.structured = structured
        self.fail = fail or (lambda text: False)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.bodies.append(raw)
        body = orjson.loads(raw)
        text = body["messages"][-1]["content"]
        if self.fail(text):
            # A server that quotes the request in its error, as some do.
            message = f"content rejected: {text}"
            return web.json_response({"error": {"message": message}}, status=400)
        answer = model_answer(text)
        if self.structured:
            found = _PLACEHOLDER.findall(text)
            answer = orjson.dumps(
                {
                    "summary": answer,
                    "contacts": [f"<{label.lower()}_{n}>" for label, n in found],
                    "first": {"who": f"[{found[0][0]}_{found[0][1]}]"} if found else None,
                }
            ).decode()
        return web.json_response(
            {
                "id": "cmpl-1",
                "model": "m",
                "choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    def sent(self) -> str:
        return b"\n".join(self.bodies).decode()


def expected(row: dict[str, Any]) -> str:
    """The completion once restored: the ticket as written, and the placeholder that
    stands for nothing left as it came."""
    return f"{row['ticket']} (see also <EMAIL_99>)"


PII_KEYS: dict[str, Any] = {
    "prompt_template": "{ticket}",
    "system_prompt": f"Escalate to {EMAILS[1]} when in doubt.",
    "pii": ALL_KINDS,
    "pii_patterns": PATTERNS,
}
"""A pii job's keys (and the Ray engine's tests')."""

TYPED_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "contacts": {"type": "array", "items": {"type": "string"}},
        "first": {"type": ["object", "null"], "properties": {"who": {"type": "string"}}},
    },
    "required": ["summary", "contacts"],
}
"""What the recording server answers with ``structured``."""


def pii_job(tmp_path: Path, base_url: str, **keys: Any) -> Any:
    write_jsonl(tmp_path / "in.jsonl", pii_tickets())
    return make_job(
        base_url,
        output=tmp_path / "out.parquet",
        **PII_KEYS,
        **({"concurrency": 2, "max_attempts": 1} | keys),
    )


async def test_no_value_is_sent_and_every_repeated_placeholder_comes_back(tmp_path: Path) -> None:
    server = Recorder()
    async with run_app(server.app()) as base_url:
        result = await run_job(pii_job(tmp_path, base_url), RunOptions(progress=False))
    assert result.ok == 4
    sent = server.sent()
    assert len(server.bodies) == 4
    for value in VALUES:
        assert value not in sent, value
        assert value.replace(" ", "") not in sent.replace(" ", ""), value
    assert "<EMAIL_1>" in sent and "<CUSTOMER_NUMBER_1>" in sent
    table = pq.read_table(tmp_path / "out.parquet")
    rows = table.to_pylist()
    for row, ticket in zip(rows, pii_tickets(), strict=True):
        assert row["completion"] == expected(ticket), row["id"]
        assert row["pii_unrestored"] == 1  # <EMAIL_99>
    assert [r["pii_found"] for r in rows] == [4, 4, 8, 8]  # the system prompt's e-mail too
    assert table.schema.field("pii_found").type == "int32"
    meta = table.schema.metadata[b"batchrun"].decode()
    assert not any(
        value in meta for value in VALUES if value != EMAILS[1]
    )  # EMAILS[1]: in the job's system prompt


async def test_typed_columns_are_restored(tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text(json.dumps(TYPED_SCHEMA))
    server = Recorder(structured=True)
    async with run_app(server.app()) as base_url:
        job = pii_job(
            tmp_path,
            base_url,
            response_schema=str(tmp_path / "schema.json"),
            schema_via="json_schema",
        )
        result = await run_job(job, RunOptions(progress=False))
    assert result.ok == 4
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    first = rows[0]
    assert first["summary"] == expected(pii_tickets()[0])
    # The user message's placeholders (the system prompt's e-mail is <EMAIL_1>).
    assert first["contacts"] == [CARDS[0], EMAILS[0], EMAILS[0], PHONES[0]]
    assert first["first"] == {"who": CARDS[0]}
    assert EMAILS[0] in first["completion"] and "<email_2>" not in first["completion"]
    for value in VALUES:
        assert value not in server.sent()


class Hang:
    """Answers the first ``answered`` requests, then holds every other one (a run
    killed while they wait)."""

    def __init__(self, answered: int) -> None:
        self.inner = Recorder()
        self.answered = answered

    async def handle(self, request: web.Request) -> web.Response:
        if len(self.inner.bodies) >= self.answered:
            self.inner.bodies.append(await request.read())
            await asyncio.sleep(30)
        return await self.inner.handle(request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app


async def test_a_resume_keeps_the_rows_restored_before_the_crash(tmp_path: Path) -> None:
    server = Hang(answered=2)
    out = tmp_path / "out.parquet"
    journal = out.with_name(out.name + ".partial") / "journal.jsonl"
    async with run_app(server.app()) as base_url:
        job = pii_job(tmp_path, base_url, concurrency=1)
        task = asyncio.create_task(run_job(job, RunOptions(progress=False)))
        for _ in range(200):
            if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
                break
            await asyncio.sleep(0.02)
        task.cancel()  # the process dies: the journal is all that is left
        with pytest.raises(asyncio.CancelledError):
            await task
        records = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
        assert len(records) == 2
        # What the journal holds is restored already: nothing else keeps the mapping.
        for rec in records:
            assert rec["completion"] == expected(pii_tickets()[rec["row"]])
            assert rec["pii_found"] == [4, 4, 8, 8][rec["row"]]
        server.answered = 100
        sent_before = len(server.inner.bodies)
        result = await run_job(pii_job(tmp_path, base_url), RunOptions(progress=False))
    assert result.ok == 4 and result.resumed == 2
    # The same placeholders, the same hashes: no conflict, and only the other rows are sent.
    assert len(server.inner.bodies) - sent_before == 2
    rows = pq.read_table(out).to_pylist()
    assert [r["completion"] for r in rows] == [expected(t) for t in pii_tickets()]
    assert [r["pii_found"] for r in rows] == [4, 4, 8, 8]


async def test_reuse_copies_restored_answers_and_never_another_rows(tmp_path: Path) -> None:
    server = Recorder()
    async with run_app(server.app()) as base_url:
        await run_job(pii_job(tmp_path, base_url), RunOptions(progress=False))
        first = tmp_path / "first.parquet"
        (tmp_path / "out.parquet").rename(first)
        # Tonight: the same tickets, and one whose only change is its e-mail address.
        changed = pii_tickets()
        changed[1]["ticket"] = str(changed[1]["ticket"]).replace(EMAILS[1], "other@example.com")
        job = pii_job(tmp_path, base_url)
        write_jsonl(tmp_path / "in.jsonl", changed)
        server.bodies.clear()
        result = await run_job(job, RunOptions(progress=False, reuse=(first,)))
    assert result.reused == 3
    assert len(server.bodies) == 1  # the changed ticket: its request hash differs
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["attempts"] for r in rows] == [0, 1, 0, 0]
    assert [r["completion"] for r in rows] == [expected(t) for t in changed]
    assert "other@example.com" in rows[1]["completion"] and EMAILS[1] not in rows[1]["completion"]
    assert [r["pii_found"] for r in rows] == [4, 5, 8, 8]


def test_no_value_reaches_the_log_stderr_or_errors(tmp_path: Path, threaded: Any) -> None:
    # Rows 2 and 4 fail, the server quoting their text (as sent) in its error.
    server = Recorder(fail=lambda text: "<CUSTOMER_NUMBER_1>" in text)
    base_url = threaded(lambda: run_app(server.app()))
    write_jsonl(tmp_path / "in.jsonl", pii_tickets())
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--input", "in.jsonl",
            "--output", "out.parquet",
            "--model", "m",
            "--base-url", base_url,
            "--api-key-env", "",
            "--prompt-template", "{ticket}",
            "--pii", ",".join(ALL_KINDS),
            "--pii-pattern", f"customer_number={PATTERNS['customer_number']}",
            "--max-attempts", "1",
            "--log-file", "run.log",
            "--log-format", "json",
            "-v",
        ],
    )  # fmt: skip
    assert_exit(result, 1)
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    errors = [r["error"] for r in rows if r["status"] == "error"]
    assert len(errors) == 2 and all("<CUSTOMER_NUMBER_1>" in e for e in errors)
    log = (tmp_path / "run.log").read_text()
    assert "row_failed" in log
    for value in VALUES:
        assert value not in log, value
        assert value not in result.output, value
        assert not any(value in e for e in errors), value
    # The rows that were answered are restored all the same.
    assert rows[0]["completion"] == expected(pii_tickets()[0])


def test_plan_shows_the_request_as_sent_and_the_counts(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", pii_tickets())
    args = ["plan", "--input", "in.jsonl", "--output", "o.parquet", "--model", "m"]
    args += ["--prompt-template", "{ticket}", "--pii", ",".join(ALL_KINDS), "--mock"]
    args += ["--pii-pattern", f"customer_number={PATTERNS['customer_number']}"]
    result = CliRunner().invoke(main, args)
    assert_exit(result, 0)
    assert "<CARD_1>" in result.output and "<EMAIL_1>" in result.output
    assert (
        "pii           email 3, phone 7, card 4, iban 3, ip 2, customer_number 2" in result.output
    )
    for value in VALUES:
        assert value not in result.output, value
    shown = CliRunner().invoke(main, [*args, "--show-pii-map"])
    assert_exit(shown, 0)
    assert "T-1" in shown.output and f"<CARD_1> = {CARDS[0]}" in shown.output
    assert f"<IBAN_1> = {IBANS[0]}" in shown.output


def test_plan_counts_over_the_whole_input(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": str(i), "ticket": f"Mail me at user{i}@example.com"} for i in range(300)],
    )
    planned = plan_job(make_job(output="o.parquet", pii=["email"]), RunOptions(mock=True))
    assert planned.pii is not None
    assert planned.pii.kinds == {"email": 300} and planned.pii.rows == 300
    assert len(planned.pii.first) == pii.MAP_ROWS


async def test_the_embedded_endpoint_echoes_the_prompt(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", pii_tickets())
    async with serve(MockConfig(echo_chars=400)) as server:
        job = make_job(
            server.base_url,
            output=tmp_path / "out.parquet",
            prompt_template="{ticket}",
            pii=ALL_KINDS,
        )
        await run_job(job, RunOptions(progress=False))
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert rows[0]["completion"].endswith(f'You wrote: "…{pii_tickets()[0]["ticket"]}"')
    assert all(r["pii_unrestored"] == 0 for r in rows)


def test_prepare_rows_without_pii_is_unchanged(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "ticket": EMAILS[0]}])
    job = make_job(output="o.parquet")
    from batchrun.inputs import InputTable

    table = InputTable(job.input)
    (p,) = prepare_rows(job, table.batches(("ticket",), "id"))
    from batchrun.payload import request_hash

    assert p.request_hash == request_hash(p.body)
