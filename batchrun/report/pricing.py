"""Costs as exact whole numbers, so a million groups are priced without a
Decimal per group.

A rate of :class:`~batchrun.prices.Rates` is a decimal per million tokens (less
the batch discount on a batch row): divided by a million it is a whole number
of ``10**-scale`` currency units per token, for one ``scale`` that fits every
rate used. Each row's cost is then a whole number of units (its tokens times
those numbers), a group's cost a sum of whole numbers, and ``units *
10**-scale`` the same exact figure as :meth:`Rates.cost` of the group's summed
tokens: a cost is linear in tokens.

The units are int64 while the largest sum they could reach fits in one; past
that they are Python ints (a numpy object array), slower but as exact.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import pandas as pd

from batchrun.prices import MILLION, ModelPrice, Prices, Rates
from batchrun.report.read import sorted_codes, utc_dates

_EXACT = decimal.Context(prec=200)
"""Enough digits that no product or quotient of rates is ever rounded."""
_INT64_ROOM = 2.0**62


@dataclass(frozen=True)
class RowCosts:
    """Each row's cost in ``10**-scale`` currency units."""

    units: np.ndarray
    """The cost of the row's usage, 0 for a row not sent or not priced (int64 or object)."""
    unpriced: np.ndarray
    """Rows sent whose model has no price (all the rows sent, without prices)."""
    scale: int
    batch_saved: Decimal | None
    """What the priced batch rows would have cost more online; None: no such row."""


def to_decimal(units: int, scale: int) -> Decimal:
    """``units * 10**-scale``, exactly (whatever the Decimal context's precision)."""
    return Decimal(f"{int(units)}E-{scale}")


def periods(frame: pd.DataFrame, prices: Prices | None) -> np.ndarray:
    """Per row, the index of the price period its ``finished_at`` falls in
    (``ModelPrice.period``: 0 for a model whose price never changed)."""
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
    return period


def row_costs(
    frame: pd.DataFrame,
    prices: Prices | None,
    sent: np.ndarray,
    batch: np.ndarray,
    tokens: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> RowCosts:
    """Price every row: its model's rates in force on the UTC date of its
    ``finished_at``, batch rows at their discount. ``tokens``: (prompt,
    completion, cached, reasoning) as :meth:`Rates.cost` takes them (cached at
    most the prompt, reasoning at most the completion; zeros for a row not sent)."""
    n = len(frame)
    if prices is None or n == 0:
        return RowCosts(np.zeros(n, dtype="int64"), sent.copy(), 0, None)
    models, names = pd.factorize(frame["model"], use_na_sentinel=True)
    period = periods(frame, prices)
    # Rows with the same model, period and tier pay the same rates: find the few
    # combinations, price each once, and give every row its combination's numbers.
    combined = models.astype("int64") * (2 * (int(period.max()) + 1)) + period * 2 + batch
    combo_of_row, combos = sorted_codes(combined)
    span = 2 * (int(period.max()) + 1)
    found: list[tuple[Rates, bool] | None] = []
    for combo in combos.tolist():
        model = combo // span
        price: ModelPrice | None = prices.price(names[model]) if model >= 0 else None
        found.append(
            (price.periods[(combo % span) // 2], bool(combo % 2)) if price is not None else None
        )
    per_token = [_per_token(f[0], f[1]) if f is not None else None for f in found]
    online = [_per_token(f[0], False) if f is not None and f[1] else None for f in found]
    scale = max((_places(r) for rates in (*per_token, *online) if rates for r in rates), default=0)
    units = _units(tokens, [_whole(r, scale) for r in per_token], combo_of_row, n)
    priced = np.array([f is not None for f in found], dtype=bool)[combo_of_row]
    units = np.where(sent, units, 0)
    saved: Decimal | None = None
    in_batch = sent & priced & batch.astype(bool)
    if in_batch.any():
        at_online = _units(tokens, [_whole(r, scale) for r in online], combo_of_row, n)
        extra = np.where(in_batch, at_online - units, 0)
        saved = to_decimal(int(extra.sum()), scale)
    return RowCosts(units, sent & ~priced, scale, saved)


def _per_token(rates: Rates, batch: bool) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    """The rates per token (prompt, completion, cached, reasoning), exact."""
    off = 1 - rates.batch_discount if batch and rates.batch_discount else Decimal(1)
    return tuple(  # type: ignore[return-value]
        _EXACT.divide(_EXACT.multiply(rate, off), MILLION).normalize(_EXACT)
        for rate in (
            rates.prompt_per_million,
            rates.completion_per_million,
            rates.cached_prompt_per_million,
            rates.reasoning_per_million,
        )
    )


def _places(rate: Decimal) -> int:
    exponent = rate.as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _whole(rates: tuple[Decimal, ...] | None, scale: int) -> tuple[int, ...]:
    if rates is None:
        return (0, 0, 0, 0)
    return tuple(int(_EXACT.scaleb(rate, scale)) for rate in rates)


def _units(
    tokens: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    whole: list[tuple[int, ...]],
    combo_of_row: np.ndarray,
    n: int,
) -> np.ndarray:
    """Per row: (prompt - cached) x prompt + cached x cached + (completion -
    reasoning) x completion + reasoning x reasoning rate, in units."""
    prompt, completion, cached, reasoning = tokens
    top = max((abs(w) for rates in whole for w in rates), default=0)
    reach = float(top) * (float(np.abs(prompt).sum()) + float(np.abs(completion).sum()))
    kind: type = np.int64 if reach < _INT64_ROOM else object
    table: np.ndarray = np.array(whole, dtype=kind).reshape(-1, 4)
    rate = table[combo_of_row]
    parts = (prompt - cached, completion - reasoning, cached, reasoning)
    total: np.ndarray = np.zeros(n, dtype=kind)
    for i, count in enumerate(parts):
        total = total + rate[:, i] * (count if kind is np.int64 else count.astype(object))
    return total
