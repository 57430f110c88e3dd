"""What a person (or cron) sees while a job runs, and the tally behind it.

On a terminal: one progress line redrawn a few times a second on stderr
(rows done of total, ok and failed, tokens, rows per second, ETA). Off a
terminal: a plain log line every ``log_every_s`` seconds instead.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

log = logging.getLogger("batchrun")


@dataclass
class Tally:
    """Counts for one run. ``total`` rows need a result; ``resumed`` of them
    already had one when the run started (and are counted in ``ok``/``failed``)."""

    total: int
    resumed: int = 0
    ok: int = 0
    failed: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    no_usage: int = 0
    """Rows answered in this run whose answers reported no usage: the token
    counts leave them out, so they are partial."""
    cached_tokens: int = 0
    """Of the prompt tokens, those the server read from its cache."""
    reasoning_tokens: int = 0
    """Of the completion tokens, those spent on hidden reasoning."""
    requests: int = 0
    retries: int = 0
    cost: Decimal | None = None
    """The sum of the ``cost`` column over the rows with a result (None: not counted)."""
    currency: str = ""
    detail: str = ""
    """What the progress line adds at its end (a batch's status and counts)."""
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        """Rows with a result, those of earlier runs included."""
        return self.ok + self.failed + self.invalid

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def rows_per_s(self) -> float:
        elapsed = self.elapsed_s
        return (self.done - self.resumed) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rows_per_s
        return (self.total - self.done) / rate if rate > 0 else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _count(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 100_000:
        return f"{n / 1e3:.0f}k"
    return str(n)


def missing_usage(rows: int) -> str:
    """How a count of rows answered without usage is said wherever tokens are shown."""
    return f"usage not reported for {rows:,} row{'' if rows == 1 else 's'}"


def status_text(t: Tally) -> str:
    """The progress line's text without the bar."""
    tokens = t.prompt_tokens + t.completion_tokens
    return (
        f"{t.done}/{t.total} rows  ok {t.ok}  failed {t.failed}  "
        + (f"invalid {t.invalid}  " if t.invalid else "")
        + f"tokens {_tokens(tokens, t.no_usage)}  "
        + (f"spent {t.cost:.2f} {t.currency}  " if t.cost is not None else "")
        + f"{t.rows_per_s:,.0f} rows/s  ETA {duration(t.eta_s)}"
        + (f"  {t.detail}" if t.detail else "")
    )


def _tokens(tokens: int, no_usage: int) -> str:
    """The token count, partial (``+``) or unknown (``-``) when rows reported no usage."""
    if not no_usage:
        return _count(tokens)
    return f"{_count(tokens) + '+' if tokens else '-'} ({missing_usage(no_usage)})"


class Progress:
    """Draws the tally: a bar on a terminal, log lines elsewhere, a tqdm bar in
    a notebook. ``mode`` is "terminal", "log" or "notebook"; None picks terminal
    or log by whether the stream is a terminal."""

    def __init__(
        self,
        tally: Tally,
        stream: TextIO | None = None,
        enabled: bool = True,
        mode: str | None = None,
        log_every_s: float = 10.0,
    ) -> None:
        self.tally = tally
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.mode = mode or ("terminal" if self.stream.isatty() else "log")
        self.interval_s = log_every_s if self.mode == "log" else 0.2
        self._drawn = False
        self._bar: Any = None
        if enabled and self.mode == "notebook":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=tally.total, initial=tally.done, unit="row", dynamic_ncols=True)

    def tick(self) -> None:
        """Show the current state once."""
        if not self.enabled:
            return
        t = self.tally
        if self._bar is not None:
            self._bar.update(t.done - self._bar.n)
            self._bar.set_postfix_str(
                f"ok {t.ok} failed {t.failed} tokens {_tokens(t.prompt_tokens + t.completion_tokens, t.no_usage)}"
            )
        elif self.mode == "terminal":
            width = 24
            filled = int(width * t.done / t.total) if t.total else width
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {status_text(t)}\x1b[K")
            self.stream.flush()
            self._drawn = True
        else:
            log.info(
                "progress: %s", status_text(t), extra={"event": "progress", **progress_fields(t)}
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self.tick()
            self._bar.close()
        elif self.mode == "terminal" and self._drawn:
            self.tick()
            self.stream.write("\n")
            self.stream.flush()


def progress_fields(t: Tally) -> dict[str, object]:
    """The tally as plain values, for JSON log events."""
    return {
        "rows_done": t.done,
        "rows_total": t.total,
        "rows_ok": t.ok,
        "rows_failed": t.failed,
        "rows_invalid": t.invalid,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "rows_no_usage": t.no_usage,
        "cached_tokens": t.cached_tokens,
        "reasoning_tokens": t.reasoning_tokens,
        "requests": t.requests,
        "retries": t.retries,
        "rows_per_s": round(t.rows_per_s, 1),
        "cost": str(t.cost) if t.cost is not None else None,
    }
