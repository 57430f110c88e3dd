"""The cost report as one self-contained HTML page: cards (cached and reasoning
shares, the tier split among them), tables and SVG charts (cost per group,
completion-token histogram, rows per day), the comparison with ``--compare``'s
outputs and the ``--fail-if`` checks, inline CSS, no script and no link, so it
opens anywhere with no network. The figures come from
:mod:`batchrun.report.compute`, the formatters and tables from
:mod:`batchrun.report.render`; this module only draws them."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batchrun.errors import OutputError
from batchrun.files import write_atomic
from batchrun.report.compute import Report, Stats
from batchrun.report.pricing import to_decimal
from batchrun.report.render import (
    ROW_COLUMNS,
    USAGE_COLUMNS,
    check_lines,
    compare_rows,
    compare_title,
    fmt_count,
    fmt_money,
    fmt_number,
    fmt_tokens,
    report_notes,
    report_title,
    table_rows,
)
from batchrun.report.values import _key_label, nice_ceil

MAX_CHART_BARS = 40
"""The cost chart shows the groups that cost most, at most this many."""

# ---- the page -------------------------------------------------------------------------------


def write_html(report: Report, path: str | Path) -> None:
    """Write :func:`render_html` to ``path`` (a temporary name, then renamed onto it)."""
    path = Path(path)
    try:
        write_atomic(path, render_html(report).encode("utf-8"))
    except OSError as exc:
        raise OutputError(
            f"Cannot write the HTML report {path}: {exc.strerror}. Choose a path in a folder you can write to."
        ) from None


_STYLE = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff;
  --blue:#3366cc; --ok:#2f855a; --failed:#c53030; --invalid:#d69e2e; --grey:#9aa5b1; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1200px; margin:0 auto; padding:28px 24px 48px; }
h1 { font-size:24px; margin:0 0 4px; }
h2 { font-size:17px; margin:28px 0 10px; }
.sub { color:var(--muted); margin:0 0 20px; overflow-wrap:anywhere; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(170px, 1fr)); gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:22px; font-weight:600; margin-top:2px; font-variant-numeric:tabular-nums; }
.card .detail { color:var(--muted); font-size:12px; }
.charts { display:grid; grid-template-columns:repeat(auto-fit, minmax(480px, 1fr)); gap:16px; margin-top:20px;
  align-items:start; }
figure { margin:0; background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
figure.wide { grid-column:1 / -1; }
figcaption { font-weight:600; margin-bottom:6px; }
figcaption span { font-weight:400; color:var(--muted); }
svg { display:block; width:100%; height:auto; }
svg text { font-family:inherit; fill:var(--ink); }
svg .axis { fill:var(--muted); font-size:12px; }
svg .grid { stroke:var(--line); }
.empty { color:var(--muted); }
.table-wrap { overflow-x:auto; background:var(--card); border:1px solid var(--line); border-radius:8px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); white-space:nowrap; }
th { background:#eef2f7; font-weight:600; text-align:right; white-space:normal; vertical-align:bottom; }
td { text-align:right; }
th.key, td.key { text-align:left; }
tr.total td { font-weight:700; border-top:2px solid var(--ink); border-bottom:none; }
td.unpriced { color:var(--failed); }
.notes { color:var(--ink); margin-top:20px; padding-left:20px; }
.notes li { margin:4px 0; }
.notes li.crossed { color:var(--failed); font-weight:600; }
"""


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, inline SVG charts, no script, no link
    to anything outside it. Every value from the data is escaped."""
    t = report.total
    cost_text = fmt_money(t.cost)
    cost_detail = (
        report.currency or "no prices given"
        if t.cost is not None or t.priced_cost is None
        else f"priced part {fmt_money(t.priced_cost)} {report.currency}"
    )
    cards = [
        ("Rows", fmt_count(t.rows), f"ok {t.ok:,} · failed {t.failed:,} · invalid {t.invalid:,}"),
        ("Reused", fmt_count(t.reused), f"{t.reused_tokens:,} tokens, not costed"),
        (
            "Total tokens",
            fmt_tokens(t.total_tokens, t),
            f"prompt {t.prompt_tokens:,} · completion {t.completion_tokens:,}",
        ),
        ("Cost", cost_text, cost_detail),
        ("Retries", fmt_count(t.retries), "requests beyond the first"),
        (
            "Latency p50",
            f"{fmt_number(t.latency_ms_p50, 0)} ms",
            f"p95 {fmt_number(t.latency_ms_p95, 0)} ms",
        ),
        (
            "Cached share",
            _share(t.cached_share),
            f"{t.cached_tokens:,} of {t.prompt_tokens:,} prompt tokens from the cache",
        ),
        (
            "Reasoning share",
            _share(t.reasoning_share),
            f"{t.reasoning_tokens:,} of {t.completion_tokens:,} completion tokens",
        ),
        (
            "Tiers",
            " · ".join(f"{tier} {s.rows:,}" for tier, s in report.tiers) or "-",
            " · ".join(f"{tier} {fmt_money(s.cost)}" for tier, s in report.tiers)
            + (f" {report.currency}" if report.currency and report.tiers else "")
            + (
                f"; the batch saved {fmt_money(report.batch_saved)} against online"
                if report.batch_saved is not None
                else ""
            ),
        ),
    ]
    grouping = ", ".join(report.by) if report.by else "model"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>batchrun report</title>",
        f"<style>{_STYLE}</style></head><body><main>",
        "<h1>batchrun report</h1>",
        f'<p class="sub">{_h(report_title(report).removeprefix("batchrun report: "))}</p>',
        '<section class="cards">',
        *(
            f'<div class="card"><div class="label">{_h(label)}</div>'
            f'<div class="value">{_h(value)}</div><div class="detail">{_h(detail)}</div></div>'
            for label, value, detail in cards
        ),
        "</section>",
        *_comparison(report),
        '<section class="charts">',
        _figure(
            "chart-cost",
            f"Cost per {grouping}",
            f"({report.currency})" if report.currency else "(no prices given)",
            _cost_chart(report),
        ),
        _figure(
            "chart-completion-tokens",
            "Completion tokens per row",
            "(rows sent in this run)",
            _histogram_chart(report),
        ),
        _figure(
            "chart-rows-per-day",
            "Rows per day",
            "(UTC, by finished_at)",
            _days_chart(report),
            wide=True,
        ),
        "</section>",
        "<h2>Usage and cost</h2>",
        _html_table(report, USAGE_COLUMNS),
        "<h2>Per row</h2>",
        _html_table(report, ROW_COLUMNS),
    ]
    notes = report_notes(report)
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_h(n)}</li>" for n in notes) + "</ul>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _comparison(report: Report) -> list[str]:
    """The comparison table (with --compare) and the --fail-if checks, crossed ones in red."""
    parts = []
    headers, body = compare_rows(report)
    if body:
        parts.append(f"<h2>{_h(compare_title(report).capitalize())}</h2>")
        head = "".join(
            f'<th class="key">{_h(h)}</th>' if i == 0 else f"<th>{_h(h)}</th>"
            for i, h in enumerate(headers)
        )
        rows = "".join(
            "<tr>"
            + "".join(
                f'<td class="key">{_h(c)}</td>' if i == 0 else f"<td>{_h(c)}</td>"
                for i, c in enumerate(line)
            )
            + "</tr>"
            for line in body
        )
        parts.append(
            f'<div class="table-wrap" id="compare"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div>"
        )
    checks = check_lines(report)
    if checks:
        parts.append(
            '<ul class="notes" id="checks">'
            + "".join(
                f'<li class="crossed">{_h(line)}</li>' if crossed else f"<li>{_h(line)}</li>"
                for line, crossed in checks
            )
            + "</ul>"
        )
    return parts


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _figure(fig_id: str, title: str, note: str, body: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure id="{fig_id}"{cls}><figcaption>{_h(title)} <span>{_h(note)}</span></figcaption>'
        f"{body}</figure>"
    )


def _html_table(report: Report, columns: list[tuple[str, Callable[[Stats, Report], str]]]) -> str:
    headers, body = table_rows(report, columns)
    nkeys = len(report.by) or 1
    head = "".join(
        (f'<th class="key">{_h(h)}</th>' if i < nkeys else f"<th>{_h(h)}</th>")
        for i, h in enumerate(headers)
    )
    rows = []
    for n, line in enumerate(body):
        cls = ' class="total"' if n == len(body) - 1 else ""
        cells = []
        for i, cell in enumerate(line):
            klass = "key" if i < nkeys else "unpriced" if cell == "unpriced" else ""
            attr = f' class="{klass}"' if klass else ""
            cells.append(f"<td{attr}>{_h(cell)}</td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _fmt_tick(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}".rstrip("0")


def _cost_chart(report: Report) -> str:
    """Horizontal bars, the groups that cost most first; an unpriced group's bar is
    its priced part, grey, labelled unpriced."""
    if report.prices is None:
        return '<p class="empty">No prices given: pass --prices FILE to see costs.</p>'
    chart = report.cost_chart
    if not len(chart):
        return '<p class="empty">No rows.</p>'
    units, unpriced_rows = chart.cost_units(), chart.counts("unpriced_rows")
    items = [
        (_key_label(chart.key(i)), to_decimal(units[i], chart.scale), bool(unpriced_rows[i]))
        for i in chart.costliest(MAX_CHART_BARS).tolist()
    ]
    hidden = len(chart) - MAX_CHART_BARS
    top = max((float(v) for _, v, _ in items), default=0.0) or 1.0
    label_w = min(250, 16 + 8 * max(len(label) for label, _, _ in items))
    fits = (label_w - 14) // 8  # characters of a 13px label that fit left of the bars
    width, bar_h, gap, value_w = 540, 24, 8, 150
    plot_w = width - label_w - value_w
    height = len(items) * (bar_h + gap) + gap
    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="cost per group">']
    for i, (label, value, unpriced) in enumerate(items):
        y = gap + i * (bar_h + gap)
        w = max(1.0, plot_w * float(value) / top) if value else 0.0
        shown = label if len(label) <= fits else label[: fits - 1] + "…"
        text = (
            (f"unpriced (+{fmt_money(value)} priced)" if unpriced and value else "unpriced")
            if unpriced
            else f"{fmt_money(value)} {report.currency}"
        )
        color = "var(--grey)" if unpriced else "var(--blue)"
        out.append(
            f"<g><title>{_h(label)}: {_h(text)}</title>"
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end" font-size="13">{_h(shown)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3" fill="{color}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.7:.1f}" font-size="13">{_h(text)}</text></g>'
        )
    out.append("</svg>")
    if hidden > 0:
        out.append(f'<p class="empty">{hidden} cheaper groups not shown.</p>')
    return "".join(out)


def _histogram_chart(report: Report) -> str:
    bins = report.completion_histogram
    if not bins:
        return '<p class="empty">No row reported completion tokens.</p>'
    labels = [f"{b.low:,}" if b.low == b.high else f"{b.low:,}-{b.high:,}" for b in bins]
    return _columns_chart(
        labels,
        [[b.rows for b in bins]],
        [("rows", "var(--blue)")],
        x_title="completion tokens",
        aria="completion-token histogram",
        tick_labels=[f"{b.low:,}" for b in bins],
        width=540,
    )


def _days_chart(report: Report) -> str:
    days = report.days
    if not days:
        return '<p class="empty">No rows.</p>'
    labels = [d.day or "no date" for d in days]
    return _columns_chart(
        labels,
        [[d.ok for d in days], [d.failed for d in days], [d.invalid for d in days]],
        [("ok", "var(--ok)"), ("failed", "var(--failed)"), ("invalid", "var(--invalid)")],
        x_title="day (UTC)",
        aria="rows per day",
        tick_labels=labels,
        width=1120,
    )


def _columns_chart(
    labels: Sequence[str],
    series: Sequence[Sequence[int]],
    legend: Sequence[tuple[str, str]],
    *,
    x_title: str,
    aria: str,
    tick_labels: Sequence[str],
    width: int,
) -> str:
    """Vertical bars, stacked when there are several series, with a y axis of round
    steps, x labels thinned so they never overlap, and a tooltip per bar. ``width``
    is the viewBox width: the figure's width in CSS pixels, so text keeps its size."""
    height = 260
    left, right, top, bottom = 52, 12, 26, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    n = len(labels)
    totals = [sum(values[i] for values in series) for i in range(n)]
    step = nice_ceil(max(max(totals), 1) / 5)
    y_max = step * math.ceil(max(max(totals), 1) / step)
    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_h(aria)}">']
    ticks = round(y_max / step)
    for k in range(ticks + 1):
        value = k * step
        y = top + plot_h - plot_h * value / y_max
        out.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt_tick(value)}</text>'
        )
    slot = plot_w / n
    bar_w = min(max(1.0, slot * 0.8), 56.0)  # one day alone is a bar, not a wall
    for i in range(n):
        x = left + i * slot + (slot - bar_w) / 2
        base = float(top + plot_h)
        parts = []
        for values, (_, color) in zip(series, legend, strict=True):
            h = plot_h * values[i] / y_max
            if h > 0:
                base -= h
                parts.append(
                    f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{color}"/>'
                )
        detail = ", ".join(
            f"{name} {values[i]:,}" for values, (name, _) in zip(series, legend, strict=True)
        )
        out.append(f"<g><title>{_h(labels[i])}: {_h(detail)}</title>{''.join(parts)}</g>")
    longest = max(len(t) for t in tick_labels)
    every = max(1, math.ceil(n / max(1, plot_w // (7 * longest + 12))))
    for i in range(0, n, every):
        x = left + i * slot + slot / 2
        out.append(
            f'<text class="axis" x="{x:.1f}" y="{top + plot_h + 15}" text-anchor="middle">{_h(tick_labels[i])}</text>'
        )
    out.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="var(--muted)"/>'
        f'<text class="axis" x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">{_h(x_title)}</text>'
        f'<text class="axis" x="{left}" y="{top - 12}" text-anchor="start">rows</text>'
    )
    if len(legend) > 1:
        x = width - right
        for name, color in reversed(legend):
            x -= 8 + 7 * len(name) + 16
            out.append(
                f'<rect x="{x}" y="{top - 22}" width="10" height="10" fill="{color}"/>'
                f'<text class="axis" x="{x + 14}" y="{top - 13}">{_h(name)}</text>'
            )
    out.append("</svg>")
    return "".join(out)
