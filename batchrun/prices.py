"""Token prices, as decimals (a float summed over a million rows drifts, a
Decimal does not), and the one function that turns usage into money.

A prices file is TOML::

    currency = "USD"          # optional, default USD
    discount = 0.1            # optional: a fraction off every rate (a contract discount)
    batch_discount = 0.5      # optional: a fraction off rows answered by a provider batch

    [models."deepseek-ai/DeepSeek-R1"]
    prompt_per_million = 0.55
    completion_per_million = 2.19
    cached_prompt_per_million = 0.14   # optional, default: the prompt rate
    reasoning_per_million = 2.19       # optional, default: the completion rate
    discount = 0.2                     # optional, overrides the file's discount
    batch_discount = 0.5               # optional, overrides the file's batch_discount

    [[models."deepseek-ai/DeepSeek-R1".since]]   # a price change, in force from its date
    date = 2026-03-15                            # a UTC date (or "2026-03-15")
    prompt_per_million = 0.50                    # keys left out stay as they were

A model's own table holds the rates in force until its first ``since`` date;
each ``since`` table the rates from its date on (00:00 UTC), the keys it does
not give carried over from the rates before it. A cached rate or reasoning
rate never given follows the prompt or completion rate in force.

:meth:`Rates.cost` is the one cost function: the ``cost`` column of ``batchrun
run``, the ``max_cost`` budget, the run summary and ``batchrun report`` all
price usage through it, so they agree to the last digit. A model missing from
the file is *unpriced*: its cost is None, never zero.
"""

from __future__ import annotations

import bisect
import datetime as dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from batchrun.errors import JobError

MILLION = Decimal(1_000_000)
ONLINE = "online"
BATCH = "batch"
"""Values of the output's ``tier`` column: how the row was answered. The batch
discount applies to ``batch`` rows only."""

RATE_KEYS = (
    "prompt_per_million",
    "completion_per_million",
    "cached_prompt_per_million",
    "reasoning_per_million",
)
MODEL_KEYS = (*RATE_KEYS, "discount", "batch_discount")
"""What a model's table (and each of its ``since`` tables) may set."""


@dataclass(frozen=True)
class Rates:
    """The rates of one model over one period, per million tokens, after the
    contract discount; ``batch_discount`` is the fraction off batch rows."""

    prompt_per_million: Decimal
    completion_per_million: Decimal
    cached_prompt_per_million: Decimal
    reasoning_per_million: Decimal
    batch_discount: Decimal = Decimal(0)

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        *,
        tier: str | None = ONLINE,
    ) -> Decimal:
        """The cost of this usage: ``(prompt - cached) x prompt rate + cached x
        cached rate + (completion - reasoning) x completion rate + reasoning x
        reasoning rate``, less the batch discount when ``tier`` is ``batch``.

        Cached tokens are part of the prompt tokens and reasoning tokens part of
        the completion tokens (the OpenAI usage shape): more cached than prompt
        tokens (or reasoning than completion) counts as all of them."""
        cached = min(cached_tokens, prompt_tokens)
        reasoning = min(reasoning_tokens, completion_tokens)
        amount = (
            self.prompt_per_million * (prompt_tokens - cached)
            + self.cached_prompt_per_million * cached
            + self.completion_per_million * (completion_tokens - reasoning)
            + self.reasoning_per_million * reasoning
        ) / MILLION
        if tier == BATCH and self.batch_discount:
            amount *= 1 - self.batch_discount
        return amount

    def worst_case(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """The most this usage can cost online, however much of it is cached or
        reasoning (a cached rate may be above the prompt rate)."""
        return max(
            self.cost(prompt_tokens, completion_tokens, cached, reasoning)
            for cached in (0, prompt_tokens)
            for reasoning in (0, completion_tokens)
        )


@dataclass(frozen=True)
class ModelPrice:
    """A model's rates over time: ``periods[0]`` holds the rates in force until
    ``changes[0]``, ``periods[i]`` those from ``changes[i - 1]`` on (UTC dates)."""

    periods: tuple[Rates, ...]
    changes: tuple[dt.date, ...] = ()

    def period(self, on: dt.date | None = None) -> int:
        """Which period ``on`` (a UTC date; None: today) falls in: its index in ``periods``."""
        return bisect.bisect_right(self.changes, on or today())

    def rates(self, on: dt.date | None = None) -> Rates:
        """The rates in force on ``on`` (a UTC date; None: today)."""
        return self.periods[self.period(on)]

    def cost(self, *tokens: int, on: dt.date | None = None, tier: str | None = ONLINE) -> Decimal:
        """:meth:`Rates.cost` of ``tokens`` (prompt, completion[, cached[, reasoning]])
        at the rates in force on ``on`` (None: today)."""
        return self.rates(on).cost(*tokens, tier=tier)


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def utc_date(value: Any) -> dt.date | None:
    """The UTC date of a timestamp: epoch microseconds (as the journal keeps
    ``finished_at``), a datetime (naive ones taken as UTC) or a date; None stays None."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo is None else value.astimezone(dt.UTC)).date()
    if isinstance(value, dt.date):
        return value
    return (dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(value))).date()


@dataclass(frozen=True)
class Prices:
    """Prices per model, in one currency."""

    currency: str
    models: Mapping[str, ModelPrice]
    path: Path | None = None

    def price(self, model: str | None) -> ModelPrice | None:
        return self.models.get(model) if model is not None else None

    def cost(
        self,
        model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        *,
        on: dt.date | None = None,
        tier: str | None = ONLINE,
    ) -> Decimal | None:
        """The cost of this usage (a null count as 0), or None when the model is unpriced."""
        price = self.price(model)
        if price is None:
            return None
        return price.cost(
            prompt_tokens or 0,
            completion_tokens or 0,
            cached_tokens or 0,
            reasoning_tokens or 0,
            on=on,
            tier=tier,
        )

    def row_cost(self, row: Mapping[str, Any]) -> Decimal | None:
        """The cost of one output row (a journal record, or a row as the output
        holds it): its usage at the rates in force on the UTC date of its
        ``finished_at``, for its ``tier``. None when the row sent no request
        (``attempts`` 0: reused, or never sent; nothing was paid in its run) or its
        model is unpriced."""
        if row.get("attempts") == 0:
            return None
        return self.cost(
            row.get("model"),
            row.get("prompt_tokens"),
            row.get("completion_tokens"),
            row.get("cached_tokens"),
            row.get("reasoning_tokens"),
            on=utc_date(row.get("finished_at")),
            tier=row.get("tier") or ONLINE,
        )


# ---- reading a prices file ----------------------------------------------------------


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise JobError(f"{where} must be a number, not {value!r}.")
    try:
        # str() first: Decimal(0.6) would carry the float's binary error.
        result = Decimal(str(value))
    except InvalidOperation:
        raise JobError(f"{where} must be a number, not {value!r}.") from None
    if not result.is_finite() or result < 0:
        raise JobError(f"{where} must be a finite number of at least 0, not {value!r}.")
    return result


def _discount(value: Any, where: str) -> Decimal:
    discount = _decimal(value, where)
    if discount > 1:
        raise JobError(
            f"{where} is {value}: a discount is a fraction from 0 to 1 (0.5 = half price)."
        )
    return discount


def load_prices(path: str | Path) -> Prices:
    """Read and check a prices file. JobError names the file, the key and the fix."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise JobError(
            f"Prices file {path} does not exist. Check the path (see jobs/prices.toml for the format)."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"Prices file {path} is not valid TOML: {exc}. Fix that line.") from None
    unknown = set(data) - {"currency", "discount", "batch_discount", "models"}
    if unknown:
        raise JobError(
            f"Unknown key {', '.join(sorted(unknown))} in prices file {path}: it takes currency, "
            'discount, batch_discount and [models."NAME"] tables.'
        )
    currency = data.get("currency", "USD")
    if not isinstance(currency, str) or not currency:
        raise JobError(f'`currency` in {path} must be a currency code like "USD".')
    defaults = {
        "discount": _discount(data.get("discount", 0), f"`discount` in {path}"),
        "batch_discount": _discount(data.get("batch_discount", 0), f"`batch_discount` in {path}"),
    }
    models_raw = data.get("models", {})
    if not isinstance(models_raw, dict):
        raise JobError(
            f'`models` in {path} must be tables: [models."MODEL"] with prompt_per_million and completion_per_million.'
        )
    models = {
        name: _model_price(entry, defaults, f'[models."{name}"] in {path}')
        for name, entry in models_raw.items()
    }
    return Prices(currency, models, path)


def _model_price(entry: Any, defaults: Mapping[str, Decimal], where: str) -> ModelPrice:
    if not isinstance(entry, dict):
        raise JobError(
            f"{where} must be a table with prompt_per_million and completion_per_million."
        )
    extra = set(entry) - {*MODEL_KEYS, "since"}
    if extra:
        raise JobError(
            f"Unknown key {', '.join(sorted(extra))} in {where}: it takes {', '.join(MODEL_KEYS)} "
            "and [[since]] tables of price changes."
        )
    for key in ("prompt_per_million", "completion_per_million"):
        if key not in entry:
            raise JobError(f"{where} has no `{key}`: give the price per million tokens.")
    given = dict(defaults) | {k: _checked(k, entry[k], where) for k in MODEL_KEYS if k in entry}
    periods = [_rates(given)]
    changes: list[dt.date] = []
    for n, change in enumerate(_since_tables(entry.get("since", []), where)):
        at = f"[[since]] table {n + 1} of {where}"
        extra = set(change) - {*MODEL_KEYS, "date"}
        if extra:
            raise JobError(
                f"Unknown key {', '.join(sorted(extra))} in {at}: it takes date and "
                f"{', '.join(MODEL_KEYS)}."
            )
        date = _date(change.get("date"), at)
        if changes and date <= changes[-1]:
            raise JobError(
                f"{at} starts on {date}, not after the change before it ({changes[-1]}): "
                "list the [[since]] tables in date order, one per date."
            )
        given |= {k: _checked(k, change[k], at) for k in MODEL_KEYS if k in change}
        periods.append(_rates(given))
        changes.append(date)
    return ModelPrice(tuple(periods), tuple(changes))


def _checked(key: str, value: Any, where: str) -> Decimal:
    if key in ("discount", "batch_discount"):
        return _discount(value, f"`{key}` in {where}")
    return _decimal(value, f"`{key}` in {where}")


def _rates(given: Mapping[str, Decimal]) -> Rates:
    """The rates a model's keys (as given so far) make: the defaults filled in,
    the contract discount taken off."""
    keep = 1 - given["discount"]
    prompt = given["prompt_per_million"]
    completion = given["completion_per_million"]
    return Rates(
        prompt * keep,
        completion * keep,
        given.get("cached_prompt_per_million", prompt) * keep,
        given.get("reasoning_per_million", completion) * keep,
        given["batch_discount"],
    )


def _since_tables(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise JobError(
            f"`since` in {where} must be [[since]] tables, each with a `date` and the rates "
            "in force from that date."
        )
    return value


def _date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        raise JobError(
            f"`date` in {where} is a date and time ({value}): give a date, like 2026-03-15 "
            "(the rates apply from 00:00 UTC that day)."
        )
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    if value is None:
        raise JobError(
            f"{where} has no `date`: give the date the rates apply from, like 2026-03-15."
        )
    raise JobError(f"`date` in {where} must be a date like 2026-03-15, not {value!r}.")
