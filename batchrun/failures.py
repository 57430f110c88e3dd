"""Telling a job that cannot succeed from one with failing rows.

A job whose requests all fail the same way — the server cannot be reached, the
path or the model is wrong (404), a field is refused (the same 400/422 text),
the same 500 every time — should stop in seconds with that cause, not write a
million ``error`` rows. ``FailureWatch`` sees every row that ends failed
(after its retries: a server warming up with a few 503s is not a verdict) and
every answer, and says when to stop:

- before the first answer: ``FIRST_ROWS`` rows in a row failed with the same
  cause (a job with fewer rows finishes, its rows ``error``, exit 1);
- after it: the last ``window`` rows all failed with the same cause.

A cause is a failure's kind, HTTP status and message with the numbers masked,
so failures that differ only in a count or an id count as one. 429s are not
failures here (a rate-limited API is up), and 401/403 are the key probe's
(``KeyRejected``). ``top_causes`` lists what failed most, for the summary.

A failure is judged as a ``Failure``: its cause and what to say of it, made
where the request failed (``FailureWatch.failure_of``) and counted where the
job's rows meet (``FailureWatch.count``). Locally both are the scheduler's; on
Ray a sender makes it and the driver counts every sender's rows together.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchrun.config import Job
from batchrun.errors import (
    CannotConnect,
    EveryRequestFails,
    RateLimited,
    RequestError,
    RequestTimeout,
)

if TYPE_CHECKING:
    from batchrun.outputs import Record

FIRST_ROWS = 5
"""Before any answer, this many failed rows in a row with one cause stop the job."""
MIN_WINDOW = 50
"""After an answer, at least this many rows in a row failing with one cause stop it."""
AUTH_STATUSES = frozenset({401, 403})

_NUMBERS = re.compile(r"\d+(\.\d+)?")


def cause_of(error: str) -> str:
    """A row's error with numbers masked: the cause it shares with other rows."""
    return _NUMBERS.sub("N", error)[:300]


@dataclass(frozen=True)
class Failure:
    """A row's failure as the watch counts it: small and picklable, so it can
    travel with the row's result (from a Ray sender to the driver)."""

    cause: tuple[str, int | None, str]
    """The error's kind, HTTP status and message with the numbers masked."""
    error: str
    """The error as it reads (the stop quotes the last one)."""
    fix: str
    """What to check for a failure of this kind, where it is known."""


class FailureWatch:
    """Counts failures by cause and says when a job cannot succeed."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.window = max(MIN_WINDOW, 2 * job.workers)
        self.answered = False
        self._cause: tuple[str, int | None, str] | None = None
        self._streak = 0

    def watches(self, exc: RequestError) -> bool:
        """Whether ``exc`` is a failure this watch counts (429s and 401/403 are not)."""
        return not isinstance(exc, RateLimited) and exc.status not in AUTH_STATUSES

    def answer(self) -> None:
        """An answer came: the API and the job work."""
        self.answered = True
        self._cause, self._streak = None, 0

    def failure_of(self, exc: RequestError) -> Failure | None:
        """``exc`` as the watch counts it; None for a failure it does not count."""
        if not self.watches(exc):
            return None
        return Failure(_key(exc), str(exc), self.fix(exc))

    def row_failed(self, exc: RequestError, row: int | None = None) -> EveryRequestFails | None:
        """Row ``row`` ended failed with ``exc``: the stop to make, if the job
        cannot succeed. (The row's number is for a watch that counts elsewhere:
        a Ray sender's sends the failure back with that row's result.)"""
        failure = self.failure_of(exc)
        return self.count(failure) if failure is not None else None

    def count(self, failure: Failure) -> EveryRequestFails | None:
        """One more failed row: the stop to make, if the job cannot succeed."""
        limit = self.window if self.answered else FIRST_ROWS
        if failure.cause == self._cause:
            self._streak += 1
        else:
            self._cause, self._streak = failure.cause, 1
        if self._streak >= limit:
            return self._stop(failure, self._streak)
        return None

    def _stop(self, failure: Failure, count: int) -> EveryRequestFails:
        if self.answered:
            what = f"the last {count} rows all failed the same way"
            then = (
                "Their error rows are kept: fix the cause, then run the same command with "
                "--retry-failed to send them again (rows not sent yet are sent too)."
            )
        else:
            what = f"the first {count} rows all failed the same way, before any answer"
            then = (
                "Nothing was recorded for the rows that failed this way: fix the cause and run the "
                "same command again."
            )
        return EveryRequestFails(
            f"Stopped: {what}: {failure.error}. {failure.fix} {then}".replace("  ", " ")
        )

    def fix(self, exc: RequestError) -> str:
        """What to check for a failure of this kind, where it is known."""
        job = self.job
        if isinstance(exc, CannotConnect):
            return (
                f"Check base_url ({job.base_url}): is the server up, and can this machine reach it "
                "(DNS, TLS, a proxy)?"
            )
        if isinstance(exc, RequestTimeout):
            return (
                f"No answer came within request_timeout_s={job.request_timeout_s:g}s: check the "
                "server, or raise request_timeout_s."
            )
        if exc.status == 404:
            return (
                f"Check the path of base_url ({job.url}) and the model id "
                f"({job.model or 'named by each request'})."
            )
        if exc.status in (400, 422):
            return (
                "The server refuses what the request carries: check the field its message names "
                "(in [params], [headers] or a job key such as stream or response_schema)."
            )
        if exc.status is not None and exc.status >= 500:
            return (
                "The server fails every request with this error: check its logs, the model id "
                "and the request options."
            )
        return ""


HOLD_MAX = 1000
"""Failed rows held back at most, before the job's first answer."""


class HeldFailures:
    """Rows that failed before the job's first answer, held back rather than
    journaled: a job the watch then stops records none of them, so the rerun
    sends them; an answer (or the end of a run that was not stopped) writes them
    with ``release``. Past ``HOLD_MAX`` (too many different failures to wait for
    a verdict) they are written and no more are held. Locally the scheduler
    holds them; on Ray, the driver."""

    def __init__(self, write: Callable[[Record], None]) -> None:
        self._write = write
        self.rows: list[Record] = []
        self.holding = True

    def hold(self, rec: Record) -> None:
        self.rows.append(rec)
        if len(self.rows) > HOLD_MAX:
            self.holding = False
            self.release()

    def release(self) -> None:
        """Write every row held, in the order they came."""
        rows, self.rows = self.rows, []
        for rec in rows:
            self._write(rec)

    def drop(self) -> None:
        """Forget them: nothing is recorded for them, and the rerun sends them."""
        self.rows.clear()


def _key(exc: RequestError) -> tuple[str, int | None, str]:
    return type(exc).__name__, exc.status, cause_of(str(exc))


def top_causes(errors: Iterable[str | None], n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` most common causes among failed rows' errors, with their counts
    (each shown as the first error of its cause)."""
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for error in errors:
        if error is None:
            continue
        cause = cause_of(error)
        counts[cause] += 1
        first.setdefault(cause, error)
    return [(first[cause], count) for cause, count in counts.most_common(n)]
