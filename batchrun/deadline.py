"""The ``deadline`` job key: when a batch or hybrid job must be done.

Three ways to write it, told apart by their shape:

- a local clock time ``"HH:MM"`` (or ``"HH:MM:SS"``): the next time the clock
  shows it after the job first starts (``"06:00"`` at 23:00 is tomorrow morning);
- an ISO 8601 date-time, ``"2026-11-30T06:00"`` (local time) or with an offset
  (``"…+01:00"``, ``"…Z"``);
- a duration from the job's first start: ``"45m"``, ``"20s"``, ``"2h"``, ``"1h30m"``.

``check_batch_keys`` checks it when the job is loaded (a typo is an error before
anything is sent), with what ``mode`` asks of the other keys; ``resolve`` turns it into an instant (epoch seconds)
once, when the job first starts. The engine keeps that instant beside the
journal, so a rerun keeps the deadline of the first start unless the command
gives another text.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchrun.errors import JobError

_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")

FORMS = '"HH:MM" (the next such local time), an ISO 8601 date-time ("2026-11-30T06:00"), or a duration from the first start ("45m", "20s", "1h30m")'


@dataclass(frozen=True)
class DeadlineSpec:
    """A deadline as written: ``kind`` is clock, instant or duration."""

    text: str
    kind: str
    clock: dt.time | None = None
    instant: dt.datetime | None = None
    seconds: float = 0.0


def parse_deadline(text: str) -> DeadlineSpec:
    """The deadline ``text`` means, or ValueError saying which forms it may take."""
    text = text.strip()
    clock = _CLOCK.fullmatch(text)
    if clock:
        hour, minute, second = (int(g or 0) for g in clock.groups())
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{text!r} is not a time of day (HH:MM, 00:00 to 23:59)")
        return DeadlineSpec(text, "clock", clock=dt.time(hour, minute, second))
    duration = _DURATION.fullmatch(text)
    if duration and text and any(duration.groups()):
        hours, minutes, seconds = (float(g or 0) for g in duration.groups())
        total = hours * 3600 + minutes * 60 + seconds
        if total <= 0:
            raise ValueError(f"{text!r} is no time at all: give a duration above zero")
        return DeadlineSpec(text, "duration", seconds=total)
    if "T" in text or " " in text:
        try:
            instant = dt.datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            pass
        else:
            return DeadlineSpec(text, "instant", instant=instant)
    raise ValueError(f"{text!r} is not a deadline: write {FORMS}")


def resolve(spec: DeadlineSpec, start: float) -> float:
    """The instant (epoch seconds) ``spec`` names for a job first started at ``start``."""
    if spec.kind == "duration":
        return start + spec.seconds
    if spec.kind == "instant":
        assert spec.instant is not None
        instant = spec.instant
        if instant.tzinfo is None:
            instant = instant.astimezone()  # a naive date-time is local time
        return instant.timestamp()
    assert spec.clock is not None
    now = dt.datetime.fromtimestamp(start).astimezone()
    today = dt.datetime.combine(now.date(), spec.clock).astimezone()
    if today.timestamp() <= start:
        today = dt.datetime.combine(now.date() + dt.timedelta(days=1), spec.clock).astimezone()
    return today.timestamp()


def local_text(instant: float) -> str:
    """``instant`` as a local date-time for messages (``2026-11-30 06:00:00``)."""
    return dt.datetime.fromtimestamp(instant).strftime("%Y-%m-%d %H:%M:%S")


def check_batch_keys(values: Mapping[str, Any], source: str) -> None:
    """JobError for a ``deadline`` that is none of its forms, a hybrid job
    without one, and what a provider's Batch API cannot do (``load_job``)."""
    if values["deadline"] is not None:
        try:
            parse_deadline(values["deadline"])
        except ValueError as exc:
            raise JobError(f"`deadline` in {source}: {exc}.") from None
    mode = values["mode"]
    if mode == "online":
        return
    if mode == "hybrid" and values["deadline"] is None:
        raise JobError(
            f'`mode` is "hybrid" in {source} but no `deadline` is given: set deadline = "06:00" '
            "(or pass --deadline 45m): hybrid sends online what the batch has not answered by then."
        )
    if values["pii"] or values["pii_patterns"]:
        raise JobError(
            f'`mode` is "{mode}" in {source}, which does not take `pii` yet: the answers of a '
            'batch come back after the run that pseudonymized them. Use mode = "online" with pii.'
        )
    if values["max_cost"] is not None:
        raise JobError(
            f'`mode` is "{mode}" in {source}, and a batch cannot keep to `max_cost`: it is '
            'submitted whole and paid as it is answered. Leave max_cost out, or use mode = "online".'
        )
    if values["stream"] or values["endpoint"] != "chat":
        what = "stream = true" if values["stream"] else f'endpoint = "{values["endpoint"]}"'
        raise JobError(
            f'`mode` is "{mode}" in {source}, which a Batch API cannot serve with {what}: '
            'batches answer /v1/chat/completions whole. Leave that out, or use mode = "online".'
        )
