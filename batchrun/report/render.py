"""The report as text: a terminal table (``table``), ``csv`` (one line per group,
then the total; ``scope`` says which), ``json`` (one object ``{"total": {...},
"groups": [...], "duplicates_skipped": N, "compare": {...} or null, "checks":
[...]}``, costs as exact decimal numbers) and ``markdown``; and the number and
money formatters the HTML page uses too. The figures come from
:mod:`batchrun.report.compute`, the comparison from
:mod:`batchrun.report.compare` (every format but csv shows it).

csv and json list every group (their group lines are made a column at a time
by :mod:`batchrun.report.lines`, and :func:`render_chunks` hands them out a
chunk at a time); the table, markdown and the HTML page list at most
:data:`SHOWN_GROUPS`, the costliest, and say how many they leave out."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, Literal

from batchrun.errors import JobError
from batchrun.report.compare import Comparison, fmt_percent, fmt_value
from batchrun.report.compute import STAT_NAMES, Group, Report, Stats
from batchrun.report.lines import csv_groups, json_groups, json_scalar
from batchrun.report.values import _text, decimal_text

Format = Literal["table", "csv", "json", "markdown"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json", "markdown")
SHOWN_GROUPS = 1000
"""The most groups the table, markdown and HTML formats list (csv and json list all)."""


def stats_dict(stats: Stats, currency: str | None) -> dict[str, Any]:
    """The figures as a dict in schema order, with ``currency`` after the costs."""
    out: dict[str, Any] = {}
    for name in STAT_NAMES:
        out[name] = getattr(stats, name)
        if name == "unpriced_rows":
            out["currency"] = currency
    return out


def report_dict(report: Report) -> dict[str, Any]:
    """``{"total": {...}, "groups": [{by columns..., figures...}, ...],
    "duplicates_skipped": N, "batch_saved": ..., "compare": {...} or None, "checks":
    [...]}``; costs stay Decimal."""
    data = _document(report)
    data["groups"] = [
        {
            **dict(zip(report.by, group.key, strict=True)),
            **stats_dict(group.stats, report.currency),
        }
        for group in report.groups
    ]
    return data


def _document(report: Report) -> dict[str, Any]:
    """:func:`report_dict` with None for the groups."""
    comparison = report.comparison
    return {
        "total": stats_dict(report.total, report.currency),
        "groups": None,
        "duplicates_skipped": report.duplicates,
        "batch_saved": report.batch_saved,
        "compare": _compare_dict(comparison) if comparison and comparison.baseline else None,
        "checks": [
            {"check": check.text, "crossed": reason is not None, "reason": reason}
            for check, reason in (comparison.checks if comparison else ())
        ],
    }


def _compare_dict(comparison: Comparison) -> dict[str, Any]:
    """The baseline's files and rows, and per figure its two values and the change."""
    assert comparison.baseline is not None
    return {
        "files": [str(f) for f in comparison.baseline.files],
        "duplicates_skipped": comparison.baseline.duplicates,
        "figures": {
            c.figure.name: {
                "baseline": c.baseline,
                "current": c.current,
                "change_percent": c.percent,
            }
            for c in comparison.changes
        },
    }


# ---- formats ----------------------------------------------------------------------------


def render(report: Report, fmt: str = "table") -> str:
    """The report as text in ``fmt`` (table, csv, json or markdown), ending in a newline."""
    return "".join(render_chunks(report, fmt))


def render_chunks(report: Report, fmt: str = "table") -> Iterator[str]:
    """:func:`render` in pieces, to write out one at a time: a format that lists
    a million groups never holds all their text at once. JobError (an unknown
    format) is raised here, before any piece."""
    renderers: dict[str, Callable[[Report], Iterator[str]]] = {
        "table": lambda r: iter([render_table(r)]),
        "csv": _csv_chunks,
        "json": _json_chunks,
        "markdown": lambda r: iter([render_markdown(r)]),
    }
    if fmt not in renderers:
        raise JobError(f"Unknown report format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    return renderers[fmt](report)


def render_json(report: Report) -> str:
    """One JSON object; costs are exact decimal numbers (not floats), the other
    float figures rounded to 3 decimals, nulls for figures with no data."""
    return "".join(_json_chunks(report))


_GROUPS = "\x00groups"
"""Stands for the groups in the JSON object until they are written."""


def _json_chunks(report: Report) -> Iterator[str]:
    data = _document(report)
    data["total"] = _rounded(data["total"])
    data["groups"] = _GROUPS
    if data["compare"] is not None:
        data["compare"]["figures"] = {
            name: {k: _significant(v) for k, v in values.items()}
            for name, values in data["compare"]["figures"].items()
        }
    head, tail = (_json(data, 0) + "\n").split(json.dumps(_GROUPS))
    yield head
    yield from json_groups(report.groups, report.by, report.currency)
    yield tail


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """The float figures (not the key values) rounded to 3 decimals."""
    return {
        k: round(v, 3) if k in STAT_NAMES and isinstance(v, float) else v for k, v in values.items()
    }


def _significant(value: Any) -> Any:
    """A finite float to 6 significant digits (rates and changes can be small)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


def _json(value: Any, indent: int) -> str:
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = [f"{json.dumps(str(k))}: {_json(v, indent + 1)}" for k, v in value.items()]
        if indent >= 2:  # a group's figures on one line each group
            return "{" + ", ".join(inner) + "}"
        return "{\n" + ",\n".join(pad + line for line in inner) + "\n" + "  " * indent + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        items = [pad + _json(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json_scalar(value)


def render_csv(report: Report) -> str:
    """A header, one line per group, then the total line (``scope`` = group / total).
    Costs are exact decimals; a null is an empty field."""
    return "".join(_csv_chunks(report))


def _csv_chunks(report: Report) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scope", *report.by, *stats_dict(report.total, None)])
    yield buffer.getvalue()
    yield from csv_groups(report.groups, report.currency)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "total",
            *([None] * len(report.by)),
            *_csv_values(stats_dict(report.total, report.currency)),
        ]
    )
    yield buffer.getvalue()


def _csv_values(values: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for value in values.values():
        if isinstance(value, Decimal):
            out.append(decimal_text(value))
        elif isinstance(value, float):
            out.append(round(value, 3))
        else:
            out.append(value)
    return out


# The two tables every human-readable format shows: (header, figure) pairs.
USAGE_COLUMNS: list[tuple[str, Callable[[Stats, Report], str]]] = [
    ("rows", lambda s, r: fmt_count(s.rows)),
    ("ok", lambda s, r: fmt_count(s.ok)),
    ("failed", lambda s, r: fmt_count(s.failed)),
    ("invalid", lambda s, r: fmt_count(s.invalid)),
    ("reused", lambda s, r: fmt_count(s.reused)),
    ("prompt tokens", lambda s, r: fmt_tokens(s.prompt_tokens, s)),
    ("completion tokens", lambda s, r: fmt_tokens(s.completion_tokens, s)),
    ("total tokens", lambda s, r: fmt_tokens(s.total_tokens, s)),
    ("cached tokens", lambda s, r: fmt_count(s.cached_tokens)),
    ("reasoning tokens", lambda s, r: fmt_count(s.reasoning_tokens)),
    ("cost", lambda s, r: fmt_money(s.cost)),
]
ROW_COLUMNS: list[tuple[str, Callable[[Stats, Report], str]]] = [
    ("tokens/row mean", lambda s, r: fmt_number(s.tokens_per_row_mean, 1)),
    ("tokens/row p50", lambda s, r: fmt_number(s.tokens_per_row_p50, 1)),
    ("tokens/row p95", lambda s, r: fmt_number(s.tokens_per_row_p95, 1)),
    ("latency p50 ms", lambda s, r: fmt_number(s.latency_ms_p50, 1)),
    ("latency p95 ms", lambda s, r: fmt_number(s.latency_ms_p95, 1)),
    ("retries", lambda s, r: fmt_count(s.retries)),
]


def fmt_count(value: int) -> str:
    return f"{value:,}"


def fmt_tokens(value: int, stats: Stats) -> str:
    """A token sum, marked partial (``+``) when rows of the group reported no
    usage, and "not reported" when none of them did: never a 0 that is not one."""
    if not stats.no_usage:
        return fmt_count(value)
    return f"{value:,}+" if value else "not reported"


def fmt_number(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:,.{decimals}f}"


def fmt_money(value: Decimal | None) -> str:
    return "unpriced" if value is None else f"{value:,.4f}"


def _cost_header(report: Report) -> str:
    return f"cost {report.currency}" if report.currency else "cost"


def table_rows(
    report: Report, columns: list[tuple[str, Callable[[Stats, Report], str]]]
) -> tuple[list[str], list[list[str]]]:
    """Header and body of one table: a line per group shown (:func:`shown_groups`),
    then the total."""
    key_headers = list(report.by) or [""]
    headers = [*key_headers, *(_cost_header(report) if h == "cost" else h for h, _ in columns)]
    body = [
        [*(_text(v) for v in g.key), *(f(g.stats, report) for _, f in columns)]
        for g in shown_groups(report)
    ]
    total_key = ["total", *([""] * (len(key_headers) - 1))]
    body.append([*total_key, *(f(report.total, report) for _, f in columns)])
    return headers, body


def shown_groups(report: Report) -> list[Group]:
    """The groups the table, markdown and HTML formats list: every group, in key
    order, up to :data:`SHOWN_GROUPS`; past that the costliest (their priced part
    when unpriced; then the most tokens), costliest first."""
    groups = report.groups
    if len(groups) <= SHOWN_GROUPS:
        return list(groups)
    return [groups[i] for i in groups.costliest(SHOWN_GROUPS, then_tokens=True).tolist()]


def _files(report: Report) -> str:
    n = len(report.files)
    names = ", ".join(str(f) for f in report.files[:3]) + (", …" if n > 3 else "")
    return f"{n} file{'s' if n != 1 else ''} ({names})" if n else "no file"


def report_title(report: Report) -> str:
    files = _files(report)
    prices = (
        f"prices {report.prices.path or 'given'} ({report.currency})"
        if report.prices is not None
        else "no prices"
    )
    return f"batchrun report: {files}, {report.total.rows:,} rows, {prices}"


def report_notes(report: Report) -> list[str]:
    """What the reader must know to read the costs right."""
    notes = []
    t = report.total
    if report.prices is None:
        notes.append(
            "No prices: costs are unpriced. Pass --prices FILE (see jobs/prices.toml for the format)."
        )
    elif report.unpriced_models:
        notes.append(
            f"Unpriced: {', '.join(report.unpriced_models)} "
            f"{'has' if len(report.unpriced_models) == 1 else 'have'} no price in "
            f"{report.prices.path or 'the prices'}: {t.unpriced_tokens:,} tokens of "
            f"{t.unpriced_rows:,} rows are not costed (the priced rows cost "
            f"{fmt_money(t.priced_cost)} {report.currency}). Add the model to the prices file."
        )
    if t.reused:
        notes.append(
            f"Reused: {t.reused:,} rows ({t.reused_tokens:,} tokens) were copied from earlier "
            "outputs, not sent: they are not in the tokens or the cost."
        )
    if report.never_sent:
        notes.append(
            f"Never sent: {report.never_sent:,} failed rows could not be made into a request (attempts 0)."
        )
    if t.no_usage:
        notes.append(
            f"Usage not reported for {t.no_usage:,} row{'' if t.no_usage == 1 else 's'}: they were "
            "answered, but the server sent no token counts, so the token sums marked + leave them "
            'out ("not reported" where no row reported any) and the cost misses them.'
        )
    if t.invalid:
        notes.append(
            f"Invalid: {t.invalid:,} rows were answered (and paid) but not as the job asked: an "
            "answer that did not fit the schema, a refusal or tool calls the request did not offer."
        )
    batch = dict(report.tiers).get("batch")
    if batch is not None and report.prices is not None:
        saved = (
            f"; that saved {report.batch_saved:.4f} {report.currency} against sending them online"
            if report.batch_saved is not None
            else ""
        )
        notes.append(
            f"Batch: {batch.rows:,} rows were answered by a provider batch and are priced with "
            f"their batch_discount{saved}."
        )
    left_out = len(report.groups) - SHOWN_GROUPS
    if left_out > 0:
        notes.append(
            f"Groups: the {SHOWN_GROUPS:,} costliest of {len(report.groups):,} are shown, "
            f"costliest first; {left_out:,} are left out here. --format csv or json lists "
            "every group."
        )
    if report.duplicates:
        notes.append(
            f"Duplicates: {report.duplicates:,} rows were skipped because an earlier file holds "
            "them too (shard parts beside their merged file, a copy): each answer is counted once."
        )
    return notes


def render_table(report: Report) -> str:
    """A readable terminal table: usage and cost, then per-row figures, then notes."""
    out = [report_title(report), ""]
    for columns in (USAGE_COLUMNS, ROW_COLUMNS):
        headers, body = table_rows(report, columns)
        widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
        nkeys = len(report.by) or 1
        for line in [headers, *body]:
            cells = [
                cell.ljust(w) if i < nkeys else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ]
            out.append("  ".join(cells).rstrip())
        out.append("")
    headers, body = compare_rows(report)
    if body:
        out.append(compare_title(report))
        widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
        for line in [headers, *body]:
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ]
            out.append("  ".join(cells).rstrip())
        out.append("")
    out.extend(line for line, _ in check_lines(report))
    out.extend(report_notes(report))
    return "\n".join(out).rstrip("\n") + "\n"


def compare_title(report: Report) -> str:
    baseline = report.comparison.baseline if report.comparison else None
    assert baseline is not None
    return f"compared with {_files(baseline)}, {baseline.total.rows:,} rows"


def compare_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and body of the comparison table (no body without --compare)."""
    headers = ["figure", "baseline", "current", "change"]
    comparison = report.comparison
    if comparison is None or comparison.baseline is None:
        return headers, []
    currency = report.currency
    return headers, [
        [
            c.figure.label + (f" {currency}" if c.figure.unit == "money" and currency else ""),
            fmt_value(c.figure, c.baseline),
            fmt_value(c.figure, c.current),
            fmt_percent(c.percent),
        ]
        for c in comparison.changes
    ]


def check_lines(report: Report) -> list[tuple[str, bool]]:
    """One line per --fail-if check, saying whether it is crossed (and why), and
    whether it is."""
    comparison = report.comparison
    return [
        (f"fail-if {check.text}: " + (f"CROSSED: {reason}" if reason else "ok"), bool(reason))
        for check, reason in (comparison.checks if comparison else ())
    ]


def render_markdown(report: Report) -> str:
    """Two GitHub-style pipe tables (the total in bold) and the notes as a list."""
    out = [f"**{_md(report_title(report))}**", ""]
    nkeys = len(report.by) or 1
    for columns in (USAGE_COLUMNS, ROW_COLUMNS):
        headers, body = table_rows(report, columns)
        out.append("| " + " | ".join(_md(h) for h in headers) + " |")
        out.append(
            "|" + "|".join(":---" if i < nkeys else "---:" for i in range(len(headers))) + "|"
        )
        for n, line in enumerate(body):
            cells = [_md(c) for c in line]
            if n == len(body) - 1:
                cells = [f"**{c}**" if c else c for c in cells]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    headers, body = compare_rows(report)
    if body:
        out.append(f"**{_md(compare_title(report))}**")
        out.append("")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|:---|---:|---:|---:|")
        out.extend("| " + " | ".join(_md(c) for c in line) + " |" for line in body)
        out.append("")
    lines = [line for line, _ in check_lines(report)] + report_notes(report)
    out.extend(f"- {_md(line)}" for line in lines)
    return "\n".join(out).rstrip("\n") + "\n"


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
