"""Values as a report shows them: keys as plain Python values (numpy scalars
unwrapped, nulls as None, dates as ISO text), group labels, and round numbers
for chart axes."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd


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


def decimal_text(value: Decimal) -> str:
    """Exact, without exponent or trailing zeros: Decimal('2.640E-2') → '0.0264'."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


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
