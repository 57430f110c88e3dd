"""Usage and cost of finished jobs (``batchrun report``), read back from their
output files. What lives where:

- :mod:`~batchrun.report.read`: reading the outputs, each paid answer once
  (shard parts beside their merged file, a copy).
- :mod:`~batchrun.report.compute`: computing the report (:class:`Report`,
  :func:`build_report`); what each figure counts is told there.
- :mod:`~batchrun.report.groups`: the figures of every group at once
  (:class:`Stats`, the vectorized group-by); :mod:`~batchrun.report.pricing`
  their exact costs as whole numbers.
- :mod:`~batchrun.report.compare`: ``--compare`` (night over night) and the
  ``--fail-if`` checks.
- :mod:`~batchrun.report.render`: the text formats (:func:`render`: table, csv,
  json, markdown; :func:`render_chunks` in pieces) and the number and money
  formatters; :mod:`~batchrun.report.lines` the csv and json lines of every
  group, a column at a time.
- :mod:`~batchrun.report.html`: the self-contained HTML page (:func:`render_html`,
  :func:`write_html`).

Importing this package imports pandas and pyarrow: the CLI imports it only when
the ``report`` command runs.
"""

from batchrun.report.compute import STAT_NAMES, Report, Stats, build_report
from batchrun.report.html import render_html, write_html
from batchrun.report.render import FORMATS, render, render_chunks

__all__ = [
    "FORMATS",
    "STAT_NAMES",
    "Report",
    "Stats",
    "build_report",
    "render",
    "render_chunks",
    "render_html",
    "write_html",
]
