"""Never pay twice across nights: answers reused from earlier outputs.

``--reuse PREVIOUS.parquet`` (files or folders) indexes the ``ok`` rows of
earlier outputs by ``request_hash``. A row of tonight's job whose exact request
was already answered is copied from there instead of being sent. A reused row
keeps the earlier answer and usage (they describe the completion) with
``attempts = 0``: no request was sent for it in this run, so nothing was paid.

The index holds two numpy arrays (64-bit hash prefixes and positions), about
16 bytes per earlier row; the answers are read back only for the rows reused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.errors import InputError
from batchrun.journal import Journal, hash_key
from batchrun.outputs import (
    EMBEDDED_ENDPOINT,
    PII_FIELDS,
    RESULT_FIELDS,
    STATUS_NONE,
    journal_value,
    output_files,
)
from batchrun.payload import Prepared
from batchrun.prices import ONLINE

log = logging.getLogger("batchrun")

_ROW_BITS = 40
"""Positions pack (file index << 40 | row index): a trillion rows per file."""


@dataclass(frozen=True)
class Match:
    """Row ``row`` (id ``id``) of this job is answered at ``position`` of the index."""

    row: int
    id: str
    position: int


class ReuseIndex:
    """The ok rows of earlier outputs, by request hash. Outputs the embedded
    endpoint answered are left out unless ``embedded`` (a ``--mock`` run):
    a real run never takes the mock's text for a real answer."""

    def __init__(self, paths: Sequence[Path], embedded: bool = False) -> None:
        self.files = output_files(paths)
        if not embedded:
            mocked = [f for f in self.files if _answered_by(f) == EMBEDDED_ENDPOINT]
            if mocked:
                log.warning(
                    "--reuse leaves out %d output(s) answered by %s: %s",
                    len(mocked),
                    EMBEDDED_ENDPOINT,
                    ", ".join(str(f) for f in mocked),
                    extra={"event": "reuse_skipped"},
                )
                self.files = [f for f in self.files if f not in mocked]
        keys: list[np.ndarray[Any, Any]] = []
        positions: list[np.ndarray[Any, Any]] = []
        for index, path in enumerate(self.files):
            try:
                table = pq.read_table(path, columns=["request_hash", "status"])
            except (pa.ArrowInvalid, OSError, KeyError) as exc:
                raise InputError(
                    f"--reuse {path} is not a batchrun output (it needs the columns request_hash and status): {exc}"
                ) from None
            ok = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False)
            hashes = table.column("request_hash").to_pylist()
            rows = np.nonzero(ok)[0]
            keys.append(
                np.fromiter((hash_key(hashes[r]) for r in rows), dtype=np.int64, count=len(rows))
            )
            positions.append((np.int64(index) << _ROW_BITS) | rows.astype(np.int64))
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        all_pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.positions = all_pos[order]

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, request_hash: str) -> int | None:
        """The position of an ok answer to this exact request, or None."""
        key = hash_key(request_hash)
        i = int(np.searchsorted(self.keys, key))
        if i < len(self.keys) and self.keys[i] == key:
            return int(self.positions[i])
        return None

    def records(self, matches: Sequence[Match], model: str) -> Iterator[dict[str, Any]]:
        """Journal records for ``matches``, read from the earlier files."""
        names = [f.name for f in (*RESULT_FIELDS, *PII_FIELDS)]
        by_file: dict[int, list[Match]] = {}
        for m in matches:
            by_file.setdefault(m.position >> _ROW_BITS, []).append(m)
        mask = (1 << _ROW_BITS) - 1
        for file_index, group in by_file.items():
            group.sort(key=lambda m: m.position & mask)
            pf = pq.ParquetFile(self.files[file_index])
            present = [n for n in names if n in pf.schema_arrow.names]
            start = 0
            i = 0
            # Stream the earlier file and pick the matched rows, batch by batch.
            for batch in pf.iter_batches(batch_size=65536, columns=present):
                end = start + batch.num_rows
                picked: list[Match] = []
                while i < len(group) and (group[i].position & mask) < end:
                    picked.append(group[i])
                    i += 1
                if picked:
                    taken = batch.take(
                        pa.array([(m.position & mask) - start for m in picked], pa.int64())
                    )
                    for m, earlier in zip(picked, taken.to_pylist(), strict=True):
                        rec = {k: journal_value(v) for k, v in earlier.items()}
                        rec.update(row=m.row, id=m.id, model=model, attempts=0)
                        rec["tier"] = rec.get("tier") or ONLINE  # an output from before tiers
                        yield rec
                start = end


def _answered_by(path: Path) -> str | None:
    """Who answered an earlier output, from its metadata (None when it does not say)."""
    try:
        meta = pq.read_schema(path).metadata or {}
        answered_by = orjson.loads(meta[b"batchrun"]).get("answered_by")
    except (pa.ArrowInvalid, OSError, KeyError, orjson.JSONDecodeError, AttributeError):
        return None
    return answered_by if isinstance(answered_by, str) else None


def reuse_answers(
    journal: Journal,
    paths: tuple[Path, ...],
    rows: Iterator[Prepared],
    model: str,
    embedded: bool,
) -> tuple[int, int]:
    """Journal the rows whose exact request an earlier output answered ok (the
    embedded endpoint's answers only when this run is ``embedded`` too).
    Returns how many rows were reused and the tokens they would have cost."""
    index = ReuseIndex(list(paths), embedded=embedded)
    matches = []
    for p in rows:
        if journal.status[p.row] != STATUS_NONE or p.error:
            continue
        position = index.find(p.request_hash)
        if position is not None:
            matches.append(Match(p.row, p.id, position))
    tokens = 0
    for rec in index.records(matches, model):
        journal.append(rec)
        tokens += rec.get("total_tokens") or 0
    log.info(
        "reused %d rows from %d earlier outputs (%d tokens)",
        len(matches),
        len(index.files),
        tokens,
        extra={"event": "reuse", "rows_reused": len(matches), "tokens_saved": tokens},
    )
    return len(matches), tokens
