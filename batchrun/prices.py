"""Token prices, as decimals: a float summed over a million rows drifts, a
Decimal does not.

A prices file is TOML::

    currency = "USD"          # optional, default USD
    discount = 0.5            # optional: a fraction taken off every price (batch discounts)

    [models."meta-llama/Llama-3.3-70B-Instruct"]
    prompt_per_million = 0.60
    completion_per_million = 0.80
    discount = 0.2            # optional, overrides the file's discount for this model

A model missing from the file is *unpriced*: its cost is None, never zero.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from batchrun.errors import JobError

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class ModelPrice:
    """Price per million tokens, after any discount."""

    prompt_per_million: Decimal
    completion_per_million: Decimal

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (
            self.prompt_per_million * prompt_tokens
            + self.completion_per_million * completion_tokens
        ) / MILLION


@dataclass(frozen=True)
class Prices:
    """Prices per model, in one currency."""

    currency: str
    models: Mapping[str, ModelPrice]
    path: Path | None = None

    def price(self, model: str | None) -> ModelPrice | None:
        return self.models.get(model) if model is not None else None

    def cost(
        self, model: str | None, prompt_tokens: int | None, completion_tokens: int | None
    ) -> Decimal | None:
        """The cost of this usage, or None when the model is unpriced."""
        price = self.price(model)
        if price is None:
            return None
        return price.cost(prompt_tokens or 0, completion_tokens or 0)


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
    unknown = set(data) - {"currency", "discount", "models"}
    if unknown:
        raise JobError(
            f'Unknown key {", ".join(sorted(unknown))} in prices file {path}: it takes currency, discount and [models."NAME"] tables.'
        )
    currency = data.get("currency", "USD")
    if not isinstance(currency, str) or not currency:
        raise JobError(f'`currency` in {path} must be a currency code like "USD".')
    default_discount = _discount(data.get("discount", 0), f"`discount` in {path}")
    models_raw = data.get("models", {})
    if not isinstance(models_raw, dict):
        raise JobError(
            f'`models` in {path} must be tables: [models."MODEL"] with prompt_per_million and completion_per_million.'
        )
    models: dict[str, ModelPrice] = {}
    for name, entry in models_raw.items():
        where = f'[models."{name}"] in {path}'
        if not isinstance(entry, dict):
            raise JobError(
                f"{where} must be a table with prompt_per_million and completion_per_million."
            )
        extra = set(entry) - {"prompt_per_million", "completion_per_million", "discount"}
        if extra:
            raise JobError(
                f"Unknown key {', '.join(sorted(extra))} in {where}: it takes prompt_per_million, completion_per_million and discount."
            )
        for key in ("prompt_per_million", "completion_per_million"):
            if key not in entry:
                raise JobError(f"{where} has no `{key}`: give the price per million tokens.")
        keep = 1 - _discount(entry.get("discount", default_discount), f"`discount` in {where}")
        models[name] = ModelPrice(
            _decimal(entry["prompt_per_million"], f"`prompt_per_million` in {where}") * keep,
            _decimal(entry["completion_per_million"], f"`completion_per_million` in {where}")
            * keep,
        )
    return Prices(currency, models, path)


def _discount(value: Any, where: str) -> Decimal:
    discount = _decimal(value, where)
    if discount > 1:
        raise JobError(
            f"{where} is {value}: a discount is a fraction from 0 to 1 (0.5 = half price)."
        )
    return discount
