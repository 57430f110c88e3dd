"""Every group's line of the JSON and CSV formats, made a column at a time.

``--by id`` over a million rows is a million lines. Instead of a Python object
per group and figure, each figure of a chunk of groups becomes text in one go
(pyarrow casts and string kernels, numpy arithmetic) and the chunk's lines are
joined in one call. The text is exactly what formatting each value gives
(:func:`json_scalar`, :func:`csv_field`): whole numbers in decimal, floats
rounded to 3 decimals as Python writes them, costs as exact decimals, key
values as ``json.dumps`` and ``csv`` write them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrun.report.groups import COUNTS, Groups, KeyValues
from batchrun.report.pricing import to_decimal
from batchrun.report.values import _plain, decimal_text

CHUNK = 65_536
"""Groups made into text at a time: the text of one chunk is what is held."""

_THOUSANDTHS = pa.array([f"{i:03d}".rstrip("0") or "0" for i in range(1000)])
"""The decimals of n/1000 as Python writes a float: 0 → "0", 500 → "5", 25 → "025"."""
_SIGN = pa.array(["", "-"])
_FLOAT_EXACT = 1e12
"""Below this a float rounded to 3 decimals has at most 15 digits: its repr is
the rounded decimal itself."""


def json_scalar(value: Any) -> str:
    """A value as the JSON format writes it: Decimal exact, floats as Python
    writes them (null when not finite), the rest as ``json.dumps``."""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, float):
        return json.dumps(value) if math.isfinite(value) else "null"
    return json.dumps(_plain(value), ensure_ascii=False)


def csv_field(value: Any) -> str:
    """A value as ``csv.writer`` writes it in a line of several fields."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([value, ""])
    return buffer.getvalue()[: -len(",\n")]


def json_groups(groups: Groups, by: Sequence[str], currency: str | None) -> Iterator[str]:
    """The JSON format's ``"groups"`` array, indented as the rest of the object,
    in chunks of text."""
    if not len(groups):
        yield "[]"
        return
    names = [*by, *_stat_order()]
    prefixes = ["{" + json.dumps(str(names[0])) + ": "]
    prefixes += [", " + json.dumps(str(name)) + ": " for name in names[1:]]
    currency_text = json_scalar(currency)
    yield "[\n    "
    for start in range(0, len(groups), CHUNK):
        stop = min(start + CHUNK, len(groups))
        keys = [_key_json(values[start:stop]) for values in groups.keys]
        figures = _figures(groups, start, stop, "null", currency_text, _float_json)
        parts: list[Any] = []
        for prefix, column in zip(prefixes, [*keys, *figures], strict=True):
            parts += [prefix, column]
        lines = pc.binary_join_element_wise(*parts, "}", "")
        yield ("" if start == 0 else ",\n    ") + _joined(lines, ",\n    ")
    yield "\n  ]"


def csv_groups(groups: Groups, currency: str | None) -> Iterator[str]:
    """The CSV format's group lines (``scope`` = group), in chunks of text."""
    currency_text = csv_field(currency) if currency is not None else ""
    for start in range(0, len(groups), CHUNK):
        stop = min(start + CHUNK, len(groups))
        keys = [_key_csv(values[start:stop]) for values in groups.keys]
        figures = _figures(groups, start, stop, "", currency_text, _float_csv)
        lines = pc.binary_join_element_wise("group", *keys, *figures, ",")
        yield _joined(lines, "\n") + "\n"


def _joined(lines: pa.Array, separator: str) -> str:
    """The lines as one text, made in one piece (no Python string per line)."""
    offsets = pa.array([0, len(lines)], pa.int32())
    return str(pc.binary_join(pa.ListArray.from_arrays(offsets, lines), separator)[0].as_py())


def _stat_order() -> list[str]:
    """The figures in the order the formats write them (``currency`` after the costs)."""
    from batchrun.report.groups import STAT_NAMES

    out: list[str] = []
    for name in STAT_NAMES:
        out.append(name)
        if name == "unpriced_rows":
            out.append("currency")
    return out


def _figures(
    groups: Groups,
    start: int,
    stop: int,
    null: str,
    currency: str,
    floats: Callable[[np.ndarray], pa.Array],
) -> list[Any]:
    """Each figure of groups ``start`` … ``stop`` as text, in :func:`_stat_order`."""
    unpriced = groups.counts("unpriced_rows")[start:stop]
    priced = _decimals(groups.cost_units()[start:stop], groups.scale)
    out: list[Any] = []
    made: list[tuple[np.ndarray, pa.Array]] = []  # a group of one row: mean = p50 = p95
    for name in _stat_order():
        if name in COUNTS:
            out.append(pc.cast(pa.array(groups.counts(name)[start:stop]), pa.string()))
        elif name == "cost":
            out.append(pc.if_else(pa.array(unpriced == 0), priced, null))
        elif name == "priced_cost":
            out.append(priced if groups.priced else null)
        elif name == "currency":
            out.append(currency)
        else:
            values = groups.floats(name)[start:stop]
            same = (t for v, t in made if np.array_equal(v, values, equal_nan=True))
            text = next(same, None)
            if text is None:
                text = floats(values)
                made.append((values, text))
            out.append(text)
    return out


def _decimals(units: np.ndarray, scale: int) -> pa.Array:
    """``units * 10**-scale`` as exact decimal text (:func:`decimal_text`)."""
    if units.dtype == object or scale > 18:
        return pa.array([decimal_text(to_decimal(u, scale)) for u in units.tolist()])
    magnitude = np.abs(units)
    whole = pc.cast(pa.array(magnitude // 10**scale), pa.string())
    sign = _SIGN.take(pa.array((units < 0).astype("int64")))
    if scale == 0:
        return pc.binary_join_element_wise(sign, whole, "")
    digits = pc.cast(pa.array(magnitude % 10**scale), pa.string())
    decimals = pc.utf8_rtrim(pc.utf8_lpad(digits, width=scale, padding="0"), characters="0")
    point = pc.if_else(pc.equal(decimals, ""), "", ".")
    return pc.binary_join_element_wise(sign, whole, point, decimals, "")


def _rounded(values: np.ndarray, null: str, other: Callable[[float], str]) -> pa.Array:
    """Floats rounded to 3 decimals, as ``repr(round(value, 3))`` writes them,
    ``null`` for NaN; ``other`` writes the values this cannot (infinite, huge,
    or too near a rounding boundary to decide without Python's exact rounding)."""
    with np.errstate(invalid="ignore"):
        scaled = values * 1000.0
        nearest = np.rint(scaled)
        distance = np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5)
        exact = (
            np.isfinite(values)
            & (np.abs(values) < _FLOAT_EXACT)
            & (distance > 2 * np.spacing(np.abs(scaled)))
        )
    thousandths = np.abs(np.where(exact, nearest, 0)).astype("int64")
    text = pc.binary_join_element_wise(
        _SIGN.take(pa.array(np.signbit(values).astype("int64"))),
        pc.cast(pa.array(thousandths // 1000), pa.string()),
        ".",
        _THOUSANDTHS.take(pa.array(thousandths % 1000)),
        "",
    )
    missing = np.isnan(values)
    if missing.any():
        text = pc.if_else(pa.array(missing), null, text)
    if (exact | missing).all():
        return text
    rest = np.flatnonzero(~exact & ~missing)
    fixed = text.to_numpy(zero_copy_only=False).astype(object)
    fixed[rest] = [other(v) for v in values[rest].tolist()]
    return pa.array(fixed, pa.string())


def _float_json(values: np.ndarray) -> pa.Array:
    return _rounded(values, "null", lambda v: json_scalar(round(v, 3)))


def _float_csv(values: np.ndarray) -> pa.Array:
    return _rounded(values, "", lambda v: csv_field(round(v, 3)))


def _key_json(values: KeyValues) -> pa.Array:
    """Key values as JSON: text without a character JSON escapes in quotes, in
    one go; anything else value by value."""
    text = _text(values)
    if text is not None:
        plain = pc.invert(pc.match_substring_regex(text, r'[\x00-\x1f"\\]')).fill_null(True)
        if pc.all(plain).as_py():
            quoted = pc.binary_join_element_wise('"', text, '"', "")
            return pc.fill_null(quoted, "null")
    return pa.array([json_scalar(v) for v in _pylist(values)], pa.string())


def _key_csv(values: KeyValues) -> pa.Array:
    """Key values as CSV fields: text that needs no quoting, and whole numbers,
    in one go; anything else value by value."""
    text = _text(values)
    if text is not None:
        plain = pc.invert(pc.match_substring_regex(text, '[,"\r\n]')).fill_null(True)
        if pc.all(plain).as_py() and not pc.any(pc.equal(text, "")).as_py():
            return pc.fill_null(text, "")
    elif isinstance(values, list) and {type(v) for v in values} <= {int, type(None)}:
        try:
            return pc.fill_null(pc.cast(pa.array(values, pa.int64()), pa.string()), "")
        except (pa.ArrowException, OverflowError):  # beyond int64
            pass
    return pa.array(["" if v is None else csv_field(v) for v in _pylist(values)], pa.string())


def _pylist(values: KeyValues) -> list[Any]:
    return values.to_pylist() if isinstance(values, pa.Array) else values


def _text(values: KeyValues) -> pa.Array | None:
    """Key values that are all text (or null) as an Arrow array; None otherwise."""
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    if not {type(v) for v in values} <= {str, type(None)}:
        return None
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowException, UnicodeError):  # a lone surrogate: no UTF-8
        return None
