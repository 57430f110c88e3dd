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
- ``cost``: exact ``Decimal``. Each row's four kinds of tokens (uncached and
  cached prompt, plain and reasoning completion; cached held to at most the
  prompt tokens, reasoning to the completion tokens) are summed per group, model,
  price period (the rates in force on the UTC date of ``finished_at``) and
  ``tier``, then priced once with :meth:`~batchrun.prices.Rates.cost`, the
  function that prices ``batchrun run``'s ``cost`` column — the same figure as
  pricing each row and summing, since a cost is linear in tokens. A group with
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
counted once (:mod:`batchrun.report.read`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from batchrun.errors import JobError
from batchrun.outputs import output_files
from batchrun.prices import BATCH, ONLINE, Prices, load_prices
from batchrun.report.read import read_outputs, utc_dates, utc_day

if TYPE_CHECKING:
    from batchrun.report.compare import Comparison

# ---- the figures -----------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """The figures of one group (or of the total). See the module docstring for
    what each one counts; tokens are counts, costs are in the prices' currency,
    latencies in milliseconds."""

    rows: int
    ok: int
    failed: int
    invalid: int
    reused: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    reused_tokens: int
    no_usage: int
    cost: Decimal | None
    priced_cost: Decimal | None
    unpriced_tokens: int
    unpriced_rows: int
    tokens_per_row_mean: float | None
    tokens_per_row_p50: float | None
    tokens_per_row_p95: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    retries: int

    @property
    def cached_share(self) -> float | None:
        """Of the prompt tokens, the share read from the cache (None: no prompt tokens)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def reasoning_share(self) -> float | None:
        """Of the completion tokens, the share of hidden reasoning."""
        return self.reasoning_tokens / self.completion_tokens if self.completion_tokens else None


STAT_NAMES = tuple(f.name for f in fields(Stats))
RESERVED_NAMES = frozenset({*STAT_NAMES, "currency", "scope"})
"""Names a ``--by`` column cannot have: they are the report's own columns."""


@dataclass(frozen=True)
class Group:
    """One group: its key (one value per ``--by`` column, None for null) and figures."""

    key: tuple[Any, ...]
    stats: Stats


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
    groups: tuple[Group, ...]
    unpriced_models: tuple[str, ...]
    """Models of sent rows that the prices file does not price (all of them without one)."""
    cost_chart: tuple[tuple[str, Stats], ...]
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
    rows = _row_figures(frame, prices)
    total_groups = _aggregate(frame, rows, (), prices)
    total = total_groups[0].stats if total_groups else _empty_stats(prices)
    groups = tuple(_aggregate(frame, rows, by, prices)) if by else ()
    if by:
        cost_chart = tuple((_key_label(g.key), g.stats) for g in groups)
    else:
        per_model = _aggregate(frame, rows, ("model",), prices)
        cost_chart = tuple((_key_label(g.key), g.stats) for g in per_model)
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
        tiers=tuple(
            (_key_label(g.key), g.stats) for g in _aggregate(frame, rows, ("tier",), prices)
        ),
        batch_saved=_batch_saved(frame, rows, prices),
    )


@dataclass(frozen=True)
class _Rows:
    """Per-row figures, as numpy arrays aligned with the frame."""

    sent: np.ndarray
    work: pd.DataFrame
    usage: pd.DataFrame
    """What the cost is computed from, per row: its tokens as ``Rates.cost`` takes
    them (zeros for the rows not sent) and whether it was sent."""
    pricing: list[pd.Series]
    """What each row's price depends on (:func:`_pricing`)."""


def _ints(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """An integer column as (int64 values with nulls as 0, null mask)."""
    nulls = series.isna().to_numpy()
    values = pd.to_numeric(series).fillna(0).to_numpy(dtype="int64")
    return values, nulls


def _row_figures(frame: pd.DataFrame, prices: Prices | None) -> _Rows:
    status = frame["status"].to_numpy(dtype=object)
    ok = status == "ok"
    failed = status == "error"
    invalid = status == "invalid"
    attempts = frame["attempts"].to_numpy(dtype="float64", na_value=np.nan)
    reused = (attempts == 0) & ok
    sent = ~(attempts == 0)  # a null attempts counts as sent: never under-report cost
    prompt, prompt_null = _ints(frame["prompt_tokens"])
    completion, completion_null = _ints(frame["completion_tokens"])
    total, total_null = _ints(frame["total_tokens"])
    cached, _ = _ints(frame["cached_tokens"])
    reasoning, _ = _ints(frame["reasoning_tokens"])
    latency = frame["latency_ms"].to_numpy(dtype="float64", na_value=np.nan)
    zero = np.zeros(len(frame), dtype="int64")
    work = pd.DataFrame(
        {
            "rows": np.ones(len(frame), dtype="int64"),
            "ok": ok.astype("int64"),
            "failed": failed.astype("int64"),
            "invalid": invalid.astype("int64"),
            "reused": reused.astype("int64"),
            "prompt_tokens": np.where(sent, prompt, zero),
            "completion_tokens": np.where(sent, completion, zero),
            "total_tokens": np.where(sent, total, zero),
            "cached_tokens": np.where(sent, cached, zero),
            "reasoning_tokens": np.where(sent, reasoning, zero),
            "reused_tokens": np.where(reused, total, zero),
            "no_usage": (sent & (ok | invalid) & prompt_null & completion_null & total_null).astype(
                "int64"
            ),
            "retries": np.where(attempts >= 1, np.nan_to_num(attempts) - 1, 0).astype("int64"),
            "tokens_per_row": np.where(sent & ~total_null, total.astype("float64"), np.nan),
            "latency_ms": np.where(sent, latency, np.nan),
        },
        index=frame.index,
    )
    # As Rates.cost takes them: cached at most the prompt, reasoning at most the completion.
    usage = pd.DataFrame(
        {
            "prompt": work["prompt_tokens"],
            "completion": work["completion_tokens"],
            "cached": np.minimum(work["cached_tokens"], work["prompt_tokens"]),
            "reasoning": np.minimum(work["reasoning_tokens"], work["completion_tokens"]),
            "sent": sent.astype("int64"),
        },
        index=frame.index,
    )
    return _Rows(sent=sent, work=work, usage=usage, pricing=_pricing(frame, prices))


_SUMS = [
    "rows",
    "ok",
    "failed",
    "invalid",
    "reused",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "reused_tokens",
    "no_usage",
    "retries",
]


def _groupers(frame: pd.DataFrame, keys: Sequence[str]) -> list[pd.Series]:
    if not keys:
        return [pd.Series(np.zeros(len(frame), dtype="int8"), index=frame.index, name="_all")]
    return [frame[k].rename(f"_key{i}") for i, k in enumerate(keys)]


def _groupby(data: pd.DataFrame, groupers: list[pd.Series]) -> Any:
    """``data.groupby`` keeping null keys; :func:`_sorted` orders the groups after."""
    return data.groupby(groupers, dropna=False, sort=False)


def _key_tuples(index: pd.Index) -> list[tuple[Any, ...]]:
    return [tuple(_plain(v) for v in (k if isinstance(k, tuple) else (k,))) for k in index]


def _aggregate(
    frame: pd.DataFrame, rows: _Rows, keys: Sequence[str], prices: Prices | None
) -> list[Group]:
    """One Group per distinct key of ``keys`` (the total when ``keys`` is empty)."""
    if len(frame) == 0:
        return []
    groupers = _groupers(frame, keys)
    grouped = _groupby(rows.work, groupers)
    sums = grouped[_SUMS].sum()
    figures = {
        "tokens_per_row_mean": grouped["tokens_per_row"].mean(),
        "tokens_per_row_p50": grouped["tokens_per_row"].quantile(0.5),
        "tokens_per_row_p95": grouped["tokens_per_row"].quantile(0.95),
        "latency_ms_p50": grouped["latency_ms"].quantile(0.5),
        "latency_ms_p95": grouped["latency_ms"].quantile(0.95),
    }
    # Plain lists, not .iloc per value: --by a column of a million values stays fast.
    counts = {name: sums[name].tolist() for name in _SUMS}
    floats = {
        name: (series if series.index.equals(sums.index) else series.reindex(sums.index)).tolist()
        for name, series in figures.items()
    }
    costs = _costs(rows, groupers, prices)
    groups = []
    for i, key in enumerate(_key_tuples(sums.index)):
        priced, unpriced_rows, unpriced_tokens = costs.get(key, (Decimal(0), 0, 0))
        stats = Stats(
            **{name: int(values[i]) for name, values in counts.items()},
            cost=priced if unpriced_rows == 0 else None,
            priced_cost=priced if prices is not None else None,
            unpriced_tokens=unpriced_tokens,
            unpriced_rows=unpriced_rows,
            tokens_per_row_mean=_float(floats["tokens_per_row_mean"][i]),
            tokens_per_row_p50=_float(floats["tokens_per_row_p50"][i]),
            tokens_per_row_p95=_float(floats["tokens_per_row_p95"][i]),
            latency_ms_p50=_float(floats["latency_ms_p50"][i]),
            latency_ms_p95=_float(floats["latency_ms_p95"][i]),
        )
        groups.append(Group(key if keys else (), stats))
    return _sorted(groups)


def _pricing(frame: pd.DataFrame, prices: Prices | None) -> list[pd.Series]:
    """Per row, what its price depends on: the model, the index of the price
    period its ``finished_at`` falls in (``ModelPrice.period``: 0 for a model whose
    price never changed) and its tier."""
    period = np.zeros(len(frame), dtype="int64")
    dated = {m: p for m, p in prices.models.items() if p.changes} if prices is not None else {}
    if dated:
        codes, dates = utc_dates(frame["finished_at"])
        models = frame["model"].to_numpy(dtype=object)
        for name, price in dated.items():
            mine = models == name
            if mine.any():
                # One lookup per distinct date; the last entry serves the rows with no date.
                lookup = np.array([*(price.period(d) for d in dates), price.period(None)])
                period[mine] = lookup[codes[mine]]
    return [
        frame["model"].rename("_model"),
        pd.Series(period, index=frame.index, name="_period"),
        frame["tier"].fillna(ONLINE).rename("_tier"),
    ]


def _costs(
    rows: _Rows, groupers: list[pd.Series], prices: Prices | None
) -> dict[tuple[Any, ...], tuple[Decimal, int, int]]:
    """Per group key: (cost of the priced sent rows, unpriced sent rows, their tokens).

    Tokens are summed per group, model, price period and tier first (exact
    integers), then priced."""
    per_price = _groupby(rows.usage, [*groupers, *rows.pricing]).sum()
    out: dict[tuple[Any, ...], tuple[Decimal, int, int]] = {}
    for full_key, prompt, completion, cached, reasoning, sent in zip(
        _key_tuples(per_price.index),
        per_price["prompt"].tolist(),
        per_price["completion"].tolist(),
        per_price["cached"].tolist(),
        per_price["reasoning"].tolist(),
        per_price["sent"].tolist(),
        strict=True,
    ):
        key, (model, period, tier) = full_key[:-3], full_key[-3:]
        priced, unpriced_rows, unpriced_tokens = out.get(key, (Decimal(0), 0, 0))
        if sent:
            price = prices.price(model) if prices is not None else None
            if price is None:
                unpriced_rows += sent
                unpriced_tokens += prompt + completion
            else:
                priced += price.periods[period].cost(
                    prompt, completion, cached, reasoning, tier=tier
                )
        out[key] = (priced, unpriced_rows, unpriced_tokens)
    return out


def _batch_saved(frame: pd.DataFrame, rows: _Rows, prices: Prices | None) -> Decimal | None:
    """The online price of the priced batch rows less what they cost as batch rows
    (the same pricing as every cost here); None when there is none."""
    if prices is None or len(frame) == 0:
        return None
    per_price = _groupby(rows.usage, [*_groupers(frame, ()), *rows.pricing]).sum()
    saved: Decimal | None = None
    for full_key, prompt, completion, cached, reasoning, sent in zip(
        _key_tuples(per_price.index),
        per_price["prompt"].tolist(),
        per_price["completion"].tolist(),
        per_price["cached"].tolist(),
        per_price["reasoning"].tolist(),
        per_price["sent"].tolist(),
        strict=True,
    ):
        model, period, tier = full_key[-3:]
        price = prices.price(model)
        if not sent or tier != BATCH or price is None:
            continue
        rates = price.periods[period]
        counts = (prompt, completion, cached, reasoning)
        saved = (
            (saved or Decimal(0))
            + rates.cost(*counts, tier=ONLINE)
            - rates.cost(*counts, tier=BATCH)
        )
    return saved


def _sorted(groups: list[Group]) -> list[Group]:
    """Groups sorted by key, nulls last; values of mixed types sort by their text."""

    def order(group: Group) -> tuple[Any, ...]:
        return tuple((v is None, type(v).__name__, v) for v in group.key)

    try:
        return sorted(groups, key=order)
    except TypeError:
        return sorted(groups, key=lambda g: tuple((v is None, str(v)) for v in g.key))


def _empty_stats(prices: Prices | None) -> Stats:
    return Stats(
        **dict.fromkeys(_SUMS, 0),
        cost=Decimal(0),
        priced_cost=Decimal(0) if prices is not None else None,
        unpriced_tokens=0,
        unpriced_rows=0,
        tokens_per_row_mean=None,
        tokens_per_row_p50=None,
        tokens_per_row_p95=None,
        latency_ms_p50=None,
        latency_ms_p95=None,
    )


def _histogram(frame: pd.DataFrame, rows: _Rows) -> list[Bin]:
    """completion_tokens of the sent rows that reported it, in at most about 30 bins
    of a round width."""
    values, nulls = _ints(frame["completion_tokens"])
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


def _days(frame: pd.DataFrame, rows: _Rows) -> list[Day]:
    """Rows per UTC date of finished_at, every date of the range (up to a year of
    them) listed even when empty, undated rows last."""
    work = pd.DataFrame(
        {
            "day": utc_day(frame["finished_at"]),
            "ok": rows.work["ok"],
            "failed": rows.work["failed"],
            "invalid": rows.work["invalid"],
        }
    )
    counts = work.groupby("day", dropna=False, sort=False)[["ok", "failed", "invalid"]].sum()
    by_day = {
        _plain(d): tuple(int(v) for v in r)
        for d, r in zip(counts.index, counts.values, strict=True)
    }
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


# ---- values -----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A key value as a plain Python value: numpy scalars unwrapped, nulls as None,
    dates and timestamps as ISO text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, pd.Timestamp | dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _float(value: Any) -> float | None:
    value = _plain(value)
    return None if value is None else float(value)


def _key_label(key: tuple[Any, ...]) -> str:
    return " / ".join(_text(v) for v in key) if key else "total"


def _text(value: Any) -> str:
    return "(null)" if value is None else str(value)


def nice_ceil(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times 10**k at least ``value`` (for axis steps and bin widths)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value - 1e-12:
            return step * power
    return 10 * power
