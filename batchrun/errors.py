"""Every error batchrun raises, under one root.

Errors are classified by type (and, for HTTP answers, by status code), never by
the text of a message. The tree::

    BatchrunError                 root; ``str(exc)`` is the message the CLI prints
    ├── JobError                  bad job file, flag or keyword (exit 2, nothing sent)
    ├── InputError                unreadable or unusable input (exit 2, nothing sent)
    ├── OutputError               output cannot be written (exit 2; work on disk kept)
    │   └── DiskFull              no space left (ENOSPC, EDQUOT) while journaling or writing (exit 6, resumable)
    ├── ResumeConflict            the unfinished run belongs to another job, or its job.json is unreadable (exit 2)
    ├── RowError                  one row cannot become a request; becomes its ``error``
    ├── Abandoned                 a row left unsent because the job is stopping (the resume sends it)
    ├── InvalidAnswer             an answer that is not JSON, does not fit the schema or was
    │                             cut off; asked again, then the row is ``invalid``
    ├── JobStopped                the job stopped early; ``exit_code`` says why
    │   ├── KeyRejected           the first requests all came back 401/403 (exit 3)
    │   ├── ApiDown               every request failed for too long (exit 3)
    │   ├── EveryRequestFails     every request fails with one cause: DNS, 404, a refused field (exit 3)
    │   ├── TooManyFailures       --max-failures reached (exit 3)
    │   ├── BudgetReached         max_cost would be passed (exit 4)
    │   ├── OutputBusy            another run holds the output's lock (exit 3)
    │   └── Interrupted           Ctrl-C (130) or SIGTERM (143)
    └── RequestError              one request failed; becomes a row's ``error``
        ├── RetryableError        worth another attempt
        │   ├── RateLimited       429 (``retry_after``, remaining budgets: what its headers said)
        │   ├── ServerError       408, 409, 5xx
        │   ├── RequestTimeout    no answer within request_timeout_s
        │   ├── ConnectionDropped the connection failed or closed mid-answer
    │   │   └── CannotConnect no connection at all: refused, DNS, TLS
        │   └── BadResponse       a 2xx answer whose body cannot be read
        │       └── EmptyAnswer   a choice with no text, no tool call and no refusal (its usage kept)
        └── FatalRequestError     not worth another attempt: 400, 401, 403, 404, 422, …,
            │                     a redirect to another origin
            ├── AnswerTooLarge    an answer larger than max_response_bytes
            └── SchemaRejected    the server refused how the schema was sent (schema_via = "auto" then tries the next way)

``RowError``, ``Abandoned``, ``InvalidAnswer`` and ``RequestError`` never escape
the scheduler: a failed row is a row.
"""

from __future__ import annotations

import errno
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchrun.payload import Completion


class BatchrunError(Exception):
    """Root of every batchrun error. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 2


class JobError(BatchrunError):
    """The job (file, flags or keywords) is not valid; nothing was sent."""


class InputError(BatchrunError):
    """The input cannot be read or does not fit the job; nothing was sent."""


class OutputError(BatchrunError):
    """The output cannot be written; what is already on disk is kept for resume."""


class DiskFull(OutputError):
    """The disk is full (or the quota used up) while journaling or writing the
    output. Every result written before stays on disk: free space and run the
    same command again to resume. Its own exit code, because requests were sent
    and paid for (2 means nothing was)."""

    exit_code = 6


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def write_failed(exc: OSError, message: str) -> OutputError:
    """Our error for an OSError while writing: DiskFull for a full disk or quota
    (by errno), OutputError for the rest. ``message`` says what is kept and what to do."""
    if exc.errno in DISK_FULL_ERRNOS:
        return DiskFull(message)
    return OutputError(message)


class ResumeConflict(BatchrunError):
    """The unfinished run at the output path cannot be resumed by this job: it is
    another job's, or its ``job.json`` is unreadable."""


class RowError(BatchrunError):
    """This row cannot be turned into a request (a prompt column is null or not text)."""


class Abandoned(BatchrunError):
    """The job is stopping (a signal, the budget): this row is left without a
    result, for the resume to send. Never escapes the scheduler."""


class InvalidAnswer(BatchrunError):
    """A completion that is not JSON, does not fit the response schema, or was cut off."""


class JobStopped(BatchrunError):
    """The job stopped before every row had a result; rerun the command to resume."""

    exit_code = 3


class KeyRejected(JobStopped):
    """The API refused the key on every one of the first requests."""


class ApiDown(JobStopped):
    """Every request failed for longer than the circuit breaker allows."""


class EveryRequestFails(JobStopped):
    """Every request fails with one cause (see ``failures.FailureWatch``): the
    job cannot succeed as it is, so it stops instead of recording error rows."""


class TooManyFailures(JobStopped):
    """More rows failed than --max-failures allows."""


class BudgetReached(JobStopped):
    """Starting another request could push the spend over max_cost."""

    exit_code = 4


class OutputBusy(JobStopped):
    """Another run (the PID in the lock file) is writing the same output: two runs
    at once would send the same rows twice. Nothing was sent."""


class Interrupted(JobStopped):
    """Stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def by_signal(cls, signum: int, output: Path | None) -> Interrupted:
        """The stop a signal ends a job with. ``output`` None: the signal came
        before sending began or after it ended, when the journal (if any) is whole."""
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if output is None:
            saved = "Nothing is lost: run the same command again to resume."
        else:
            saved = (
                f"Every finished row is saved in {output}.partial; "
                "run the same command again to resume."
            )
        return cls(f"Stopped by {name}. {saved}", exit_code=128 + signum)


class Terminated(BaseException):
    """Not an error: SIGTERM raised in the main thread, as KeyboardInterrupt is
    for Ctrl-C (installed by ``raise_terminated``)."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: raise Terminated where the main thread is."""
    raise Terminated


class RequestError(BatchrunError):
    """One request failed. ``status`` is the HTTP status when there was an answer."""

    retryable = False

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = 1


class RetryableError(RequestError):
    """A failure that another attempt may cure."""

    retryable = True


class RateLimited(RetryableError):
    """429. What the answer's headers said (None: not said):

    - ``retry_after``: the wait in seconds the API asked for (``retry-after-ms``,
      else ``Retry-After``);
    - ``remaining_requests``, ``remaining_tokens``: what is left of the API's
      budgets (``x-ratelimit-remaining-requests``, ``-tokens``); a 0 says the
      budget is spent, so every request would get a 429 (``exhausted``);
    - ``sent_at``: when the request left, on the job's limits clock (set by the
      scheduler): a 429 for a request sent before a pause began is part of
      that pause's episode.
    """

    def __init__(
        self,
        message: str,
        status: int | None = 429,
        retry_after: float | None = None,
        *,
        remaining_requests: int | None = None,
        remaining_tokens: int | None = None,
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after
        self.remaining_requests = remaining_requests
        self.remaining_tokens = remaining_tokens
        self.sent_at: float | None = None

    @property
    def exhausted(self) -> bool:
        """The answer says a budget is spent (a remaining count of 0), not only
        that this one request was refused."""
        return self.remaining_requests == 0 or self.remaining_tokens == 0


class ServerError(RetryableError):
    """408, 409 or 5xx: the server could not answer this time."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class RequestTimeout(RetryableError):
    """No complete answer within request_timeout_s."""


class ConnectionDropped(RetryableError):
    """The connection could not be made, or closed before the answer was complete."""


class CannotConnect(ConnectionDropped):
    """No connection could be made: refused, a DNS failure, a TLS failure."""


class BadResponse(RetryableError):
    """A 2xx answer whose body is not the JSON (or SSE) a chat completion should be."""


class EmptyAnswer(BadResponse):
    """A 2xx answer whose choice says nothing: no text, no tool call, no refusal.
    Retried like an unreadable body; ``answer`` is what it did report (its usage
    was paid, and goes into the row's)."""

    def __init__(self, message: str, answer: Completion, status: int | None = None) -> None:
        super().__init__(message, status)
        self.answer = answer


class FatalRequestError(RequestError):
    """An answer that another attempt will not change (400, 401, 403, 404, 422, …)."""


class AnswerTooLarge(FatalRequestError):
    """An answer larger than max_response_bytes (decompressed); reading stopped there."""


class SchemaRejected(FatalRequestError):
    """The server refused the way a request carried its response schema (a 400,
    422 or 500 naming the format, while ``schema_via = "auto"`` is still
    searching): not retried as it is; the row is sent again the next way."""
