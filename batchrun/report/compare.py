"""Night over night: ``batchrun report TONIGHT --compare LAST_NIGHT`` and ``--fail-if``.

The comparison puts a handful of figures of the two reports' totals side by side
with the change in percent (:data:`FIGURES`). A ``--fail-if`` check names one of
them, a comparison and a bound:

- ``cost_per_row>+20%``: the change from the baseline, in percent (needs
  ``--compare``); ``rows<-10%`` for a fall. A rise from 0 is an infinite rise.
- ``failure_rate>0.05``: the figure itself (this report's value), any number.

Operators: ``>``, ``>=``, ``<``, ``<=``. A figure that cannot be known (the cost
of unpriced rows, a latency with no row sent) crosses every check on it: a
check that cannot be made must not pass in silence. Any crossed check makes
``batchrun report`` exit :data:`EXIT_CROSSED` (5), for a cron job that alerts.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from batchrun.errors import JobError
from batchrun.report.compute import Report, Stats

EXIT_CROSSED = 5
"""What ``batchrun report`` exits with when a ``--fail-if`` check is crossed."""

Value = float | Decimal | int | None


@dataclass(frozen=True)
class Figure:
    """One figure of the comparison: its name (for ``--fail-if`` and JSON), its
    label, how to get it from a report's total, and how to show it."""

    name: str
    label: str
    of: Callable[[Stats], Value]
    unit: str = ""
    """``%`` for a share (shown as a percentage), ``money``, ``ms``, or none."""
    decimals: int = 1


def _per_row(value: Decimal | int | None, stats: Stats) -> Value:
    if value is None or not stats.rows:
        return None
    return Decimal(value) / stats.rows


FIGURES: tuple[Figure, ...] = (
    Figure("rows", "rows", lambda s: s.rows, decimals=0),
    Figure("failure_rate", "failure rate", lambda s: s.failed / s.rows if s.rows else None, "%"),
    Figure("invalid_rate", "invalid rate", lambda s: s.invalid / s.rows if s.rows else None, "%"),
    Figure("tokens_per_row_mean", "tokens/row mean", lambda s: s.tokens_per_row_mean),
    Figure("tokens_per_row_p95", "tokens/row p95", lambda s: s.tokens_per_row_p95),
    Figure("cached_share", "cached share", lambda s: s.cached_share, "%"),
    Figure("reasoning_share", "reasoning share", lambda s: s.reasoning_share, "%"),
    Figure("cost", "cost", lambda s: s.cost, "money", 4),
    Figure("cost_per_row", "cost/row", lambda s: _per_row(s.cost, s), "money", 6),
    Figure("latency_ms_p50", "latency p50 ms", lambda s: s.latency_ms_p50, "ms"),
    Figure("latency_ms_p95", "latency p95 ms", lambda s: s.latency_ms_p95, "ms"),
)
BY_NAME = {f.name: f for f in FIGURES}


@dataclass(frozen=True)
class Change:
    """One figure in both reports."""

    figure: Figure
    baseline: Value
    current: Value

    @property
    def percent(self) -> float | None:
        """The change in percent; +inf for a rise from 0; None when either is unknown."""
        return percent_change(self.baseline, self.current)


def percent_change(baseline: Value, current: Value) -> float | None:
    if baseline is None or current is None:
        return None
    before, now = float(baseline), float(current)
    if before == 0:
        return 0.0 if now == 0 else math.copysign(math.inf, now)
    return (now - before) / abs(before) * 100


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_CHECK = re.compile(r"\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)\s*(%?)\s*")


@dataclass(frozen=True)
class Check:
    """One ``--fail-if`` check, parsed."""

    text: str
    figure: Figure
    op: str
    bound: float
    relative: bool
    """The bound is a change in percent from the baseline, not a value."""

    def crossed(self, current: Stats, baseline: Stats | None) -> str | None:
        """Why the check is crossed (what the figure is), or None when it holds."""
        now = self.figure.of(current)
        name = self.figure.name
        if self.relative:
            assert baseline is not None  # parse_checks makes sure
            before = self.figure.of(baseline)
            change = percent_change(before, now)
            if change is None:
                where = "in --compare's outputs" if before is None else "in this report"
                return f"{name} is unknown {where} {_UNKNOWN}"
            if _OPS[self.op](change, self.bound):
                return (
                    f"{name} changed {fmt_percent(change)} "
                    f"({fmt_value(self.figure, before)} -> {fmt_value(self.figure, now)})"
                )
            return None
        if now is None:
            return f"{name} is unknown {_UNKNOWN}"
        if _OPS[self.op](float(now), self.bound):
            return f"{name} is {fmt_value(self.figure, now)}"
        return None


_UNKNOWN = "(unpriced rows, or no row to measure it on), so the check cannot pass"


def parse_checks(texts: Sequence[str], compare: bool) -> tuple[Check, ...]:
    """``--fail-if`` texts as checks. JobError (exit 2) naming the text and the
    forms it may take; a check in percent without ``--compare`` is one too."""
    checks = []
    for text in texts:
        match = _CHECK.fullmatch(text)
        figure = BY_NAME.get(match.group(1)) if match else None
        bound = _number(match.group(3)) if match else None
        if match is None or figure is None or bound is None:
            problem = (
                f"{match.group(1)!r} is not a figure of the report"
                if match and figure is None
                else "it is not FIGURE OP BOUND"
            )
            raise JobError(
                f"--fail-if {text!r}: {problem}. Write a figure, >, >=, < or <=, and a change in "
                "percent from --compare's outputs (cost_per_row>+20%, rows<-10%) or a value "
                f"(failure_rate>0.05). Figures: {', '.join(BY_NAME)}."
            )
        relative = bool(match.group(4))
        if relative and not compare:
            raise JobError(
                f"--fail-if {text!r} bounds a change in percent: give the outputs to compare "
                "with (--compare LAST_NIGHT), or bound the value itself (without %)."
            )
        checks.append(Check(text.strip(), figure, match.group(2), bound, relative))
    return tuple(checks)


def _number(text: str) -> float | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return float(value) if value.is_finite() else None


@dataclass(frozen=True)
class Comparison:
    """This report against a baseline (``--compare``), and the ``--fail-if`` checks."""

    baseline: Report | None
    changes: tuple[Change, ...]
    checks: tuple[tuple[Check, str | None], ...]
    """Each check, and why it is crossed (None: it holds)."""

    @property
    def crossed(self) -> list[str]:
        """``CHECK: why`` for each crossed check."""
        return [f"{check.text}: {reason}" for check, reason in self.checks if reason is not None]

    @property
    def exit_code(self) -> int:
        return EXIT_CROSSED if self.crossed else 0


def compare_reports(
    current: Report, baseline: Report | None, checks: Sequence[Check]
) -> Comparison:
    """Compare ``current`` with ``baseline`` (their totals) and make the checks."""
    base = baseline.total if baseline is not None else None
    changes = (
        tuple(Change(f, f.of(base), f.of(current.total)) for f in FIGURES)
        if base is not None
        else ()
    )
    return Comparison(
        baseline,
        changes,
        tuple((check, check.crossed(current.total, base)) for check in checks),
    )


# ---- how the figures look ---------------------------------------------------------------


def fmt_value(figure: Figure, value: Value, currency: str | None = None) -> str:
    if value is None:
        return "-" if figure.unit != "money" else "unpriced"
    if figure.unit == "%":
        return f"{float(value) * 100:,.2f}%"
    if figure.unit == "money":
        return f"{Decimal(value):,.{figure.decimals}f}" + (f" {currency}" if currency else "")
    return f"{value:,.{figure.decimals}f}"


def fmt_percent(change: float | None) -> str:
    if change is None:
        return "-"
    if math.isinf(change):
        return "+inf%" if change > 0 else "-inf%"
    return f"{change:+,.1f}%"
