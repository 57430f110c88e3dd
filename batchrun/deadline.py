"""The ``deadline`` job key: when a batch or hybrid job must be done.

Three ways to write it, told apart by their shape:

- a local clock time ``"HH:MM"`` (or ``"HH:MM:SS"``): the next time the clock
  shows it after the job first starts (``"06:00"`` at 23:00 is tomorrow morning);
- an ISO 8601 date-time, ``"2026-11-30T06:00"`` (local time) or with an offset
  (``"…+01:00"``, ``"…Z"``);
- a duration from the job's first start: ``"45m"``, ``"20s"``, ``"2h"``, ``"1h30m"``.

``parse_deadline`` checks the text when the job is loaded (a typo is an error
before anything is sent); ``resolve`` turns it into an instant (epoch seconds)
once, when the job first starts. The engine keeps that instant beside the
journal, so a rerun keeps the deadline of the first start unless the command
gives another text.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

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
