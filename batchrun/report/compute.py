"""Usage and cost of finished jobs, read back from their output files.

``batchrun report OUTPUT... [--prices FILE] [--by COLUMN ...]`` reads one or many
outputs (files, folders of ``*.parquet``, globs), only the columns it needs, and
counts in total and per group. What each figure means:

- ``rows``: every output row. ``ok``, ``failed`` (status ``error``) and
  ``invalid`` (status ``invalid``: the API answered, and was paid, but not as
  the job asked: the answer did not fit its schema, or was a refusal or tool
  calls the request did not offer) are counted apart: an invalid row is not an
  API failure.
- A row with ``attempts == 0`` had no request in the run that wrote it: either
  *reused* (status ``ok``, copied by ``--reuse`` from an earlier output) or never
  sent (it could not be turned into a request; status ``error``). Nothing was paid
  for it in that run, so its tokens are in neither the token sums nor the cost:
  ``reused`` counts the reused rows and ``reused_tokens`` their total tokens.
- ``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``cached_tokens``
  (of the prompt tokens, those read from the server's cache) and
  ``reasoning_tokens`` (of the completion tokens, those of hidden reasoning):
  sums of the usage columns over the rows sent (``attempts >= 1``; a null
  ``attempts`` counts as sent, so cost is never under-reported), failed and
  invalid rows included where the API reported usage. A null usage counts 0;
  ``no_usage`` counts the ok and invalid rows sent whose answer reported no usage
  at all (the cost misses them).
- ``cost``: exact ``Decimal``: the sum over the group's rows of each row's four
  kinds of tokens (uncached and cached prompt, plain and reasoning completion;
  cached held to at most the prompt tokens, reasoning to the completion tokens)
  at the rates of :meth:`~batchrun.prices.Rates.cost`, the function that prices
  ``batchrun run``'s ``cost`` column: its model's rates in force on the UTC date
  of its ``finished_at``, for its ``tier``. Summed as whole numbers of a small
  unit (:mod:`batchrun.report.pricing`), it is the same figure to the last
  digit as ``Rates.cost`` of the group's summed tokens per model, price period
  and tier, since a cost is linear in tokens. A group with
  any sent row whose model has no price has ``cost = None`` ("unpriced", never
  0); ``priced_cost`` is then the cost of its priced rows and ``unpriced_tokens``
  the prompt + completion tokens left unpriced. Without a prices file every sent
  row is unpriced and ``priced_cost`` is None.
- ``tokens_per_row_*``: mean, median and 95th percentile of ``total_tokens``
  over the sent rows that reported it; ``latency_ms_p50`` / ``_p95`` over the sent
  rows (milliseconds, retries included). Percentiles interpolate linearly; None
  when no row qualifies.
- ``retries``: requests beyond the first, ``sum(attempts - 1)`` over rows with
  ``attempts >= 1`` (re-asks after an answer that did not fit the schema count).

``--by day`` groups by the UTC date of ``finished_at`` unless the output has a
column named ``day``. Rows a file holds that an earlier file held already are
counted once (:mod:`batchrun.report.read`). The groups are computed all at once,
a million of them in seconds (:mod:`batchrun.report.groups`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from batchrun.errors import JobError
from batchrun.outputs import output_files
from batchrun.prices import Prices, load_prices
from batchrun.report.groups import (
    COUNTS,
    STAT_NAMES,
    Group,
    Groups,
    Rows,
    Stats,
    aggregate,
    ints,
    row_figures,
)
from batchrun.report.read import read_outputs, utc_dates
from batchrun.report.values import _key_label, _plain, nice_ceil

if TYPE_CHECKING:
    from batchrun.report.compare import Comparison

__all__ = ["STAT_NAMES", "Bin", "Day", "Group", "Groups", "Report", "Stats", "build_report"]

# ---- the figures -----------------------------------------------------------------------

RESERVED_NAMES = frozenset({*STAT_NAMES, "currency", "scope"})
"""Names a ``--by`` column cannot have: they are the report's own columns."""


@dataclass(frozen=True)
class Bin:
    """A histogram bin: rows whose completion_tokens is in ``low..high`` (inclusive)."""

    low: int
    high: int
    rows: int


@dataclass(frozen=True)
class Day:
    """Rows that finished on one UTC date (None: no finished_at), by status."""

    day: str | None
    ok: int
    failed: int
    invalid: int


@dataclass(frozen=True)
class Report:
    """Everything the formats render: the figures, plus the data of the charts."""

    files: tuple[Path, ...]
    by: tuple[str, ...]
    prices: Prices | None
    total: Stats
    groups: Groups
    """One per distinct ``--by`` key, in key order (none without ``--by``)."""
    unpriced_models: tuple[str, ...]
    """Models of sent rows that the prices file does not price (all of them without one)."""
    cost_chart: Groups
    """Bars of the cost chart: the groups, or per model when there is no ``--by``."""
    completion_histogram: tuple[Bin, ...]
    days: tuple[Day, ...]
    never_sent: int = 0
    """Rows with attempts 0 that are not ok: they could not be made into a request."""
    duplicates: int = 0
    """Rows skipped because an earlier file held them already (shard parts and
    their merged file, a copy)."""
    tiers: tuple[tuple[str, Stats], ...] = ()
    """The figures per ``tier`` (online, batch)."""
    batch_saved: Decimal | None = None
    """What the rows a provider batch answered would have cost more online (None:
    no priced batch row)."""
    comparison: Comparison | None = None
    """Against ``--compare``'s outputs, and the ``--fail-if`` checks."""

    @property
    def currency(self) -> str | None:
        return self.prices.currency if self.prices is not None else None


# ---- computing --------------------------------------------------------------------------


def build_report(
    outputs: Iterable[str | Path],
    by: Sequence[str] = (),
    prices: Prices | str | Path | None = None,
    compare: Iterable[str | Path] | None = None,
    fail_if: Sequence[str] = (),
) -> Report:
    """Read ``outputs`` (files, folders, globs) and compute the report.

    ``by``: output columns to group by (``day``: the UTC date of finished_at).
    ``prices``: a :class:`Prices` or the path of a prices file; None leaves every
    cost unpriced. ``compare``: the outputs to compare with (last night's), read
    the same way; ``fail_if``: checks on the figures (``cost_per_row>+20%``,
    ``failure_rate>0.05``); both land in ``Report.comparison``. Raises InputError
    (outputs, columns) or JobError (prices file, a ``by`` name the report uses
    itself, a check that does not parse)."""
    from batchrun.report.compare import compare_reports, parse_checks  # it imports this module

    keys = _check_by(by)
    checks = parse_checks(fail_if, compare is not None)
    if prices is not None and not isinstance(prices, Prices):
        prices = load_prices(prices)
    report = _build(outputs, keys, prices)
    if compare is None and not checks:
        return report
    baseline = _build(compare, keys, prices) if compare is not None else None
    return replace(report, comparison=compare_reports(report, baseline, checks))


def _build(outputs: Iterable[str | Path], keys: tuple[str, ...], prices: Prices | None) -> Report:
    files = tuple(output_files(outputs))
    read = read_outputs(files, keys)
    return compute_report(read.frame, keys, prices, files, read.duplicates)


def _check_by(by: Sequence[str]) -> tuple[str, ...]:
    keys: list[str] = []
    for name in by:
        if not name:
            raise JobError("--by needs a column name (or day).")
        if name in RESERVED_NAMES:
            raise JobError(
                f"--by {name}: {name} is the name of a report column, so the groups could not carry it. "
                "Copy the column under another name to group by it."
            )
        if name not in keys:
            keys.append(name)
    return tuple(keys)


def compute_report(
    frame: pd.DataFrame,
    by: Sequence[str],
    prices: Prices | None,
    files: Sequence[Path] = (),
    duplicates: int = 0,
) -> Report:
    """The report of ``frame`` (columns as :func:`read_outputs` returns them)."""
    by = tuple(by)
    rows = row_figures(frame, prices)
    total_groups = aggregate(frame, rows, ())
    total = total_groups[0].stats if len(total_groups) else _empty_stats(prices)
    groups = aggregate(frame, rows, by) if by else Groups.none(rows.priced)
    cost_chart = groups if by else aggregate(frame, rows, ("model",))
    sent_models = frame["model"][rows.sent]
    unpriced = sorted(
        {
            str(_plain(m))
            for m in sent_models.drop_duplicates()
            if prices is None or prices.price(_plain(m)) is None
        }
    )
    return Report(
        files=tuple(files),
        by=by,
        prices=prices,
        total=total,
        groups=groups,
        unpriced_models=tuple(unpriced),
        cost_chart=cost_chart,
        completion_histogram=tuple(_histogram(frame, rows)),
        days=tuple(_days(frame, rows)),
        never_sent=int(np.count_nonzero(~rows.sent) - total.reused),
        duplicates=duplicates,
        tiers=tuple((_key_label(g.key), g.stats) for g in aggregate(frame, rows, ("tier",))),
        batch_saved=rows.costs.batch_saved,
    )


def _empty_stats(prices: Prices | None) -> Stats:
    return Stats(
        **dict.fromkeys(COUNTS, 0),
        cost=Decimal(0),
        priced_cost=Decimal(0) if prices is not None else None,
        tokens_per_row_mean=None,
        tokens_per_row_p50=None,
        tokens_per_row_p95=None,
        latency_ms_p50=None,
        latency_ms_p95=None,
    )


def _histogram(frame: pd.DataFrame, rows: Rows) -> list[Bin]:
    """completion_tokens of the sent rows that reported it, in at most about 30 bins
    of a round width."""
    values, nulls = ints(frame["completion_tokens"])
    values = values[rows.sent & ~nulls]
    if values.size == 0:
        return []
    low, high = int(values.min()), int(values.max())
    width = nice_ceil(max(1.0, (high - low + 1) / 30))
    width = max(1, int(width))
    start = (low // width) * width
    counts = np.bincount((values - start) // width)
    return [
        Bin(start + i * width, start + (i + 1) * width - 1, int(n)) for i, n in enumerate(counts)
    ]


def _days(frame: pd.DataFrame, rows: Rows) -> list[Day]:
    """Rows per UTC date of finished_at, every date of the range (up to a year of
    them) listed even when empty, undated rows last."""
    codes, dates = utc_dates(frame["finished_at"])
    statuses = np.stack([rows.count(s) for s in ("ok", "failed", "invalid")], axis=1)
    counts = np.zeros((len(dates) + 1, 3), dtype="int64")  # the last: no date (code -1)
    np.add.at(counts, codes, statuses)
    by_day: dict[str | None, tuple[int, ...]] = {
        d.isoformat(): tuple(counts[i].tolist()) for i, d in enumerate(dates)
    }
    if (codes < 0).any():
        by_day[None] = tuple(counts[-1].tolist())
    dated = sorted(d for d in by_day if d is not None)
    if dated:
        first, last = dt.date.fromisoformat(dated[0]), dt.date.fromisoformat(dated[-1])
        if (last - first).days <= 366:
            dated = [
                (first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)
            ]
    days = [Day(d, *by_day.get(d, (0, 0, 0))) for d in dated]
    if None in by_day:
        days.append(Day(None, *by_day[None]))
    return days
