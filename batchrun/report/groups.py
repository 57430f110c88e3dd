"""The report's group-by, vectorized: a million groups (``--by id``) in seconds.

Every row gets its group's number, the groups numbered in the order the report
lists them (by key, nulls last); then every figure of every group is computed
at once with numpy, no Python loop per group:

- counts and token sums: exact int64 sums over the rows sorted by group;
- means: the exact integer sum over the count;
- percentiles: over the rows sorted by group, then value; between the two
  values around it a percentile interpolates linearly, as pandas' does;
- cost: whole numbers of ``10**-scale`` currency units
  (:mod:`batchrun.report.pricing`), summed the same way, exact.

:class:`Groups` holds the result as columns. A :class:`Group` (and its
:class:`Stats`) is made only when one is asked for: the formats that list every
group (csv, json) write them from the columns. What each figure counts is told
in :mod:`batchrun.report.compute`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from functools import cached_property
from typing import Any, TypeAlias, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchrun.prices import BATCH, Prices
from batchrun.report.pricing import RowCosts, row_costs, to_decimal
from batchrun.report.read import sorted_codes
from batchrun.report.values import _plain


@dataclass(frozen=True)
class Stats:
    """The figures of one group (or of the total). See
    :mod:`batchrun.report.compute` for what each one counts; tokens are counts,
    costs are in the prices' currency, latencies in milliseconds."""

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
COUNTS = (
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
    "unpriced_tokens",
    "unpriced_rows",
)
"""The figures that are sums of a whole number per row."""
FLOATS = (
    "tokens_per_row_mean",
    "tokens_per_row_p50",
    "tokens_per_row_p95",
    "latency_ms_p50",
    "latency_ms_p95",
)
"""The figures that are floats (None where no row qualifies)."""


@dataclass(frozen=True)
class Group:
    """One group: its key (one value per ``--by`` column, None for null) and figures."""

    key: tuple[Any, ...]
    stats: Stats


# ---- per row ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """What each row adds to its group, as numpy arrays aligned with the frame."""

    sent: np.ndarray
    counts: np.ndarray
    """(len(COUNTS), rows) int64: each row's part of every count figure."""
    tokens_per_row: np.ndarray
    """total_tokens of a sent row that reported it, else NaN."""
    latency_ms: np.ndarray
    """latency_ms of a sent row, else NaN."""
    costs: RowCosts
    priced: bool
    """Whether a prices file was given (else every ``priced_cost`` is None)."""

    def count(self, name: str) -> np.ndarray:
        return self.counts[COUNTS.index(name)]

    @cached_property
    def by_tokens(self) -> np.ndarray:
        """Row indices in tokens_per_row order (NaN last)."""
        return np.argsort(self.tokens_per_row)

    @cached_property
    def by_latency(self) -> np.ndarray:
        return np.argsort(self.latency_ms)


def _equals(series: pd.Series, value: str) -> np.ndarray:
    """Where a text column holds ``value`` (never where it is null)."""
    return np.asarray((series == value).to_numpy(dtype=bool, na_value=False))


def ints(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """An integer column as (int64 values with nulls as 0, null mask)."""
    nulls = np.asarray(series.isna().to_numpy())
    if pd.api.types.is_integer_dtype(series.dtype):
        return np.asarray(series.to_numpy(dtype="int64", na_value=0)), nulls
    values = pd.to_numeric(series).fillna(0).to_numpy(dtype="int64")
    return values, nulls


def row_figures(frame: pd.DataFrame, prices: Prices | None) -> Rows:
    ok, failed, invalid = (_equals(frame["status"], s) for s in ("ok", "error", "invalid"))
    attempts = frame["attempts"].to_numpy(dtype="float64", na_value=np.nan)
    reused = (attempts == 0) & ok
    sent = ~(attempts == 0)  # a null attempts counts as sent: never under-report cost
    prompt, prompt_null = ints(frame["prompt_tokens"])
    completion, completion_null = ints(frame["completion_tokens"])
    total, total_null = ints(frame["total_tokens"])
    cached, _ = ints(frame["cached_tokens"])
    reasoning, _ = ints(frame["reasoning_tokens"])
    zero = np.zeros(len(frame), dtype="int64")
    prompt, completion, total = (np.where(sent, v, zero) for v in (prompt, completion, total))
    cached, reasoning = np.where(sent, cached, zero), np.where(sent, reasoning, zero)
    # As Rates.cost takes them: cached at most the prompt, reasoning at most the completion.
    tokens = (prompt, completion, np.minimum(cached, prompt), np.minimum(reasoning, completion))
    batch = _equals(frame["tier"], BATCH).astype("int64")
    costs = row_costs(frame, prices, sent, batch, tokens)
    columns = {
        "rows": np.ones(len(frame), dtype="int64"),
        "ok": ok,
        "failed": failed,
        "invalid": invalid,
        "reused": reused,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "cached_tokens": cached,
        "reasoning_tokens": reasoning,
        "reused_tokens": np.where(reused, ints(frame["total_tokens"])[0], zero),
        "no_usage": sent & (ok | invalid) & prompt_null & completion_null & total_null,
        "retries": np.where(attempts >= 1, np.nan_to_num(attempts) - 1, 0),
        "unpriced_tokens": np.where(costs.unpriced, prompt + completion, zero),
        "unpriced_rows": costs.unpriced,
    }
    counts = np.empty((len(COUNTS), len(frame)), dtype="int64")
    for i, name in enumerate(COUNTS):
        counts[i] = columns[name]
    latency = frame["latency_ms"].to_numpy(dtype="float64", na_value=np.nan)
    return Rows(
        sent=sent,
        counts=counts,
        tokens_per_row=np.where(sent & ~total_null, total.astype("float64"), np.nan),
        latency_ms=np.where(sent, latency, np.nan),
        costs=costs,
        priced=prices is not None,
    )


# ---- which group each row is in ---------------------------------------------------------


KeyValues: TypeAlias = "list[Any] | pa.Array"
"""A ``--by`` column's value for each group: plain Python values, or text kept
in Arrow (a column of a million ids never becomes a million Python strings)."""


@dataclass(frozen=True)
class Grouping:
    """Each row's group number (0 … size - 1, groups in key order) and each
    group's key values, one :data:`KeyValues` per ``--by`` column."""

    codes: np.ndarray
    keys: list[KeyValues]
    size: int

    @cached_property
    def order(self) -> np.ndarray:
        """Row indices sorted by group (rows of a group in frame order)."""
        return np.argsort(self.sortable, kind="stable")

    @cached_property
    def sortable(self) -> np.ndarray:
        """The codes in the smallest type that holds them: numpy sorts up to 16-bit
        integers by radix, many times faster."""
        for kind in ("uint8", "uint16"):
            if self.size <= np.iinfo(kind).max + 1:
                return self.codes.astype(kind)
        return self.codes

    @cached_property
    def starts(self) -> np.ndarray:
        """Where each group's rows begin in :attr:`order`."""
        counts = np.bincount(self.codes, minlength=self.size)
        return np.concatenate(([0], np.cumsum(counts)[:-1])).astype("int64")

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Per group, the exact sum of ``values`` (one value per row along the
        last axis; the result has one per group there)."""
        if self.size == 1:
            return np.asarray(values.sum(axis=-1))[..., np.newaxis]
        if self.size == len(self.codes):  # a row per group (--by id): nothing to add
            return values[..., self.order]
        if values.dtype != object and values.size:
            # float64 adds whole numbers exactly while every partial sum stays
            # below 2**53, and bincount needs no sort of the rows.
            bound = float(np.abs(values).max()) * len(self.codes)
            if bound < 2.0**53:
                rows = values.reshape(-1, values.shape[-1])
                sums = [np.bincount(self.codes, weights=row, minlength=self.size) for row in rows]
                return np.stack(sums).astype("int64").reshape((*values.shape[:-1], self.size))
        return np.add.reduceat(values[..., self.order], self.starts, axis=-1)


def grouping(frame: pd.DataFrame, keys: Sequence[str]) -> Grouping:
    """Group the rows by the columns ``keys`` (none: one group of every row)."""
    n = len(frame)
    if not keys:
        return Grouping(np.zeros(n, dtype="int64"), [], 1 if n else 0)
    ranked = [_ranks(frame[key]) for key in keys]
    if len(ranked) == 1:
        ranks, values = ranked[0]
        return Grouping(ranks, [values], len(values))
    sizes = [len(values) for _, values in ranked]
    if float(np.prod([float(s) for s in sizes])) < 2.0**62:
        combined = np.zeros(n, dtype="int64")
        for (ranks, _), size in zip(ranked, sizes, strict=True):
            combined = combined * size + ranks
        codes, found = sorted_codes(combined)
        parts = []
        for size in reversed(sizes):
            parts.append(found % size)
            found = found // size
        parts.reverse()
    else:  # too many combinations to number: compare the ranks as rows
        stacked = np.stack([ranks for ranks, _ in ranked], axis=1)
        unique_rows, codes = np.unique(stacked, axis=0, return_inverse=True)
        parts = [unique_rows[:, i] for i in range(len(ranked))]
    key_values: list[KeyValues] = [
        values.take(pa.array(part))
        if isinstance(values, pa.Array)
        else np.array(values, dtype=object)[part].tolist()
        for (_, values), part in zip(ranked, parts, strict=True)
    ]
    codes = codes.reshape(-1).astype("int64")
    return Grouping(codes, key_values, len(key_values[0]))


def _ranks(column: pd.Series) -> tuple[np.ndarray, KeyValues]:
    """Each row's place among the column's distinct values in the report's order
    (by value, values of mixed types by type name first, nulls last), and those
    values, plain (see :func:`batchrun.report.values._plain`), in that order."""
    dtype = column.dtype
    if isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow":
        text = pa.array(column.array)
        return _text_ranks(text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text)
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    plain = _plain_values(uniques)
    order = _order(plain)
    place = np.empty(len(plain) + 1, dtype="int64")
    place[order] = np.arange(len(plain))
    place[-1] = len(plain)  # code -1: null, last
    values = [plain[i] for i in order.tolist()]
    if (codes < 0).any():
        values.append(None)
    return place[codes], values


def _text_ranks(text: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """:func:`_ranks` of text held by Arrow, all in Arrow: its byte order is
    Python's order of the same strings."""
    encoded = pc.dictionary_encode(text)
    distinct = encoded.dictionary
    order = np.asarray(pc.sort_indices(distinct))
    place = np.empty(len(distinct) + 1, dtype="int64")
    place[order] = np.arange(len(distinct))
    place[-1] = len(distinct)  # null, last
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype("int64")
    values = distinct.take(pa.array(order))
    if encoded.indices.null_count:
        values = pa.concat_arrays([values, pa.nulls(1, values.type)])
    return place[codes], values


def _plain_values(uniques: Any) -> list[Any]:
    if isinstance(uniques.dtype, pd.StringDtype):
        return list(uniques.tolist())
    if uniques.dtype == object:
        if pd.api.types.infer_dtype(uniques, skipna=False) == "string":
            return list(uniques.tolist())
    elif pd.api.types.is_integer_dtype(uniques.dtype) or pd.api.types.is_float_dtype(uniques.dtype):
        return [_plain(v) for v in uniques.tolist()]
    return [_plain(v) for v in uniques]


def _order(plain: list[Any]) -> np.ndarray:
    kinds = {type(v) for v in plain}
    if kinds == {str}:
        try:
            return np.asarray(pc.sort_indices(pa.array(plain, pa.string())))
        except (pa.ArrowException, UnicodeError):  # a lone surrogate: no UTF-8
            pass
    elif len(kinds) == 1 and kinds <= {int, float, bool}:
        return np.argsort(np.array(plain), kind="stable")
    positions = range(len(plain))
    try:
        ordered = sorted(positions, key=lambda i: (type(plain[i]).__name__, plain[i]))
    except TypeError:
        ordered = sorted(positions, key=lambda i: str(plain[i]))
    return np.array(ordered, dtype="int64")


# ---- the figures of every group ---------------------------------------------------------


class Groups(Sequence[Group]):
    """The figures of every group, as columns (one value per group, in key
    order). Indexing makes a :class:`Group`; :meth:`counts`, :meth:`floats` and
    :meth:`cost_units` give whole columns."""

    def __init__(
        self,
        keys: list[KeyValues],
        counts: np.ndarray,
        floats: dict[str, np.ndarray],
        units: np.ndarray,
        scale: int,
        priced: bool,
    ) -> None:
        self.keys = keys
        """Per ``--by`` column, each group's value."""
        self._counts = counts
        self._floats = floats
        self._units = units
        self.scale = scale
        self.priced = priced
        """Whether a prices file was given."""

    @classmethod
    def none(cls, priced: bool) -> Groups:
        """No group at all (a report without ``--by``, or of no row)."""
        empty = np.zeros((len(COUNTS), 0), dtype="int64")
        floats = {name: np.zeros(0) for name in FLOATS}
        return cls([], empty, floats, np.zeros(0, "int64"), 0, priced)

    def __len__(self) -> int:
        return int(self._counts.shape[1])

    @overload
    def __getitem__(self, index: int) -> Group: ...
    @overload
    def __getitem__(self, index: slice) -> list[Group]: ...
    def __getitem__(self, index: int | slice) -> Group | list[Group]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return Group(self.key(index), self.stats(index))

    def __iter__(self) -> Iterator[Group]:
        return (self[i] for i in range(len(self)))

    def key(self, index: int) -> tuple[Any, ...]:
        return tuple(
            values[index].as_py() if isinstance(values, pa.Array) else values[index]
            for values in self.keys
        )

    def stats(self, index: int) -> Stats:
        counts: dict[str, int] = dict(zip(COUNTS, self._counts[:, index].tolist(), strict=True))
        priced = to_decimal(self._units[index], self.scale)
        floats: dict[str, float | None] = {
            name: None if np.isnan(values[index]) else float(values[index])
            for name, values in self._floats.items()
        }
        return Stats(
            **counts,
            cost=priced if counts["unpriced_rows"] == 0 else None,
            priced_cost=priced if self.priced else None,
            **floats,  # type: ignore[arg-type]
        )

    def counts(self, name: str) -> np.ndarray:
        """A count figure of every group (int64)."""
        return self._counts[COUNTS.index(name)]

    def floats(self, name: str) -> np.ndarray:
        """A float figure of every group (float64, NaN for None)."""
        return self._floats[name]

    def cost_units(self) -> np.ndarray:
        """``priced_cost`` of every group in ``10**-scale`` units (int64 or object);
        ``cost`` is the same where ``unpriced_rows`` is 0, else None."""
        return self._units

    def costliest(self, limit: int, then_tokens: bool = False) -> np.ndarray:
        """The indices of the ``limit`` groups that cost most (their priced part
        when unpriced), costliest first; ties by total tokens (with
        ``then_tokens``: without prices every cost ties), then in key order."""
        cost = self._units.astype("float64") if self._units.dtype == object else self._units
        tokens = self.counts("total_tokens") if then_tokens else np.zeros(len(self), "int64")
        order = np.lexsort((np.arange(len(self)), -tokens, -cost))
        return order[:limit]


def aggregate(frame: pd.DataFrame, rows: Rows, keys: Sequence[str]) -> Groups:
    """The figures of every distinct key of ``keys`` (the total when ``keys`` is empty)."""
    groups = grouping(frame, keys)
    if groups.size == 0:
        return Groups.none(rows.priced)
    counts = groups.sum(rows.counts)
    tokens = _sorted_values(groups, rows.tokens_per_row, rows.by_tokens)
    latency = _sorted_values(groups, rows.latency_ms, rows.by_latency)
    # total_tokens sums the sent rows, a null counting 0: the sum of those that reported it.
    mean = np.where(
        tokens.valid > 0,
        counts[COUNTS.index("total_tokens")] / np.maximum(tokens.valid, 1),
        np.nan,
    )
    floats = {
        "tokens_per_row_mean": mean,
        "tokens_per_row_p50": _percentile(groups, tokens, 0.5),
        "tokens_per_row_p95": _percentile(groups, tokens, 0.95),
        "latency_ms_p50": _percentile(groups, latency, 0.5),
        "latency_ms_p95": _percentile(groups, latency, 0.95),
    }
    units = groups.sum(rows.costs.units)
    return Groups(groups.keys, counts, floats, units, rows.costs.scale, rows.priced)


@dataclass(frozen=True)
class _Sorted:
    values: np.ndarray
    """The values sorted by group, then value (NaN last in each group)."""
    valid: np.ndarray
    """Per group, how many are not NaN."""


def _sorted_values(groups: Grouping, values: np.ndarray, by_value: np.ndarray) -> _Sorted:
    if groups.size == 1:
        order = by_value
    elif groups.size == len(values):  # a row per group
        order = groups.order
    else:  # a stable sort by group keeps each group's rows in value order
        order = by_value[np.argsort(groups.sortable[by_value], kind="stable")]
    ordered = values[order]
    valid = np.bincount(groups.codes[~np.isnan(values)], minlength=groups.size)
    return _Sorted(ordered, valid)


def _percentile(groups: Grouping, data: _Sorted, q: float) -> np.ndarray:
    """Per group, the ``q`` quantile with linear interpolation (NaN: no value),
    computed as pandas' groupby quantile computes it."""
    n = data.valid
    has = n > 0
    if len(data.values) == groups.size:  # a row per group: its value, or none
        return np.where(has, data.values, np.nan)
    position = q * (np.maximum(n, 1) - 1)
    below = position.astype("int64")
    frac = position % 1
    at = groups.starts + below
    value = data.values[np.minimum(at, len(data.values) - 1)]
    above = data.values[np.minimum(at + 1, len(data.values) - 1)]
    with np.errstate(invalid="ignore"):
        result = np.where(frac == 0, value, value + (above - value) * frac)
    return np.where(has, result, np.nan)
