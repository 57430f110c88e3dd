"""Input tables: JSONL or Parquet, read as a stream of batches of rows.

Every row gets a ``row`` number (0-based position in the input) and an ``id``:
the value of the id column when the input has one, else the row number.

``InputTable.scan`` reads the whole input once before anything is sent, so that
a bad line deep in a large file is an error (exit 2) rather than a surprise after
half the job was paid for. It keeps only counts and 64-bit id hashes, never rows.

JSONL is parsed line by line with orjson rather than with pyarrow's JSON reader:
that reader cannot name the line of a parse error, cannot skip a bad line, and
fixes column types from the first block.
"""

from __future__ import annotations

import hashlib
import io
import json
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from batchrun.errors import InputError

BATCH_ROWS = 2048
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_LISTED = 5


@dataclass(frozen=True)
class RowBatch:
    """Consecutive input rows: ``rows[i]`` is row number ``start + i`` with id ``ids[i]``."""

    start: int
    ids: list[str]
    rows: list[dict[str, Any]]


@dataclass
class Scan:
    """What a full pass over the input found."""

    num_rows: int
    columns: list[str]
    has_id_column: bool
    keep_schema: pa.Schema
    skipped_lines: list[int] = field(default_factory=list)
    id_hashes: Any = None
    """array('q') of the ids' hashes, one per row, taken during the scan for the
    duplicate check (which sorts them in place), then dropped."""
    skip: Any = None
    """numpy bool mask: rows left out of this run (later duplicates with --dedupe,
    rows of other shards with --shard)."""

    def __post_init__(self) -> None:
        if self.skip is None:
            import numpy as np

            self.skip = np.zeros(self.num_rows, dtype=bool)

    @property
    def rows_kept(self) -> int:
        """Rows this run must give a result (the output's row count)."""
        return self.num_rows - int(self.skip.sum())


_U64_MAX = 2**64 - 1


def _exact_int(digits: str) -> int | str:
    """A JSON integer as orjson reads it when it can (from -2**63 to 2**64 - 1),
    else its exact decimal text: ids beyond 64 bits stay distinct, not floats."""
    value = int(digits)
    return value if _INT64_MIN <= value <= _U64_MAX else digits


def _exact_loads(line: bytes) -> Any:
    """The line parsed like orjson.loads, but with integers beyond 64 bits kept
    exact as text. Only lines holding a float come here."""
    return json.loads(line, parse_int=_exact_int)


def _has_float(value: Any) -> bool:
    """Whether a parsed value holds a float anywhere: orjson reads an integer
    beyond 64 bits as one, so a line without floats lost no digit. (Checking the
    parsed values costs a fraction of scanning the line's bytes for digits.)"""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is float:
            return True
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
    return False


def _id_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


class InputTable:
    """A JSONL file, a Parquet file, or a folder of Parquet part files."""

    def __init__(
        self, path: Path, *, skip_bad_lines: bool = False, batch_requests: bool = False
    ) -> None:
        """``batch_requests``: the JSONL lines are OpenAI Batch API requests
        ({"custom_id", "method", "url", "body"}); each is checked as such."""
        self.path = path
        self.skip_bad_lines = skip_bad_lines
        self.batch_requests = batch_requests
        self._floats = True
        """Whether JSONL rows may hold floats (integers beyond 64 bits read as
        floats need an exact reparse): until one whole pass has found none."""
        if not path.exists():
            raise InputError(
                f"Input {path} does not exist. Check the `input` path (paths in a job file are relative to the job file's folder)."
            )
        if path.is_dir():
            self.parts = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not self.parts:
                raise InputError(
                    f"Input folder {path} holds no *.parquet files. Point `input` at a JSONL file, a Parquet file or a folder of Parquet parts."
                )
            self.format = "parquet"
        elif path.suffix.lower() in (".parquet", ".pq"):
            self.parts = [path]
            self.format = "parquet"
        else:
            self.parts = [path]
            self.format = "jsonl"

    # ---- the full pass -------------------------------------------------

    def scan(
        self, id_column: str, id_required: bool, keep_columns: Sequence[str], dedupe: bool = False
    ) -> Scan:
        """Read the whole input once: count rows, check every line or part, find
        duplicate ids and settle the Arrow types of ``keep_columns``.

        Raises InputError naming the file and line (or row) and the fix.
        """
        if self.format == "jsonl":
            scan = self._scan_jsonl(id_column, keep_columns)
        else:
            scan = self._scan_parquet(id_column, keep_columns)
        if scan.num_rows == 0:
            raise InputError(
                f"Input {self.path} has no rows. Give it at least one {'JSON object line' if self.format == 'jsonl' else 'row'}."
            )
        if id_required and not scan.has_id_column:
            raise InputError(
                f"Input {self.path} has no id column `{id_column}`. Columns present: {', '.join(scan.columns)}. "
                "Set `id_column` to one of them, or leave it at `id` to number the rows."
            )
        if scan.has_id_column:
            self._check_duplicates(scan, id_column, dedupe)
        scan.id_hashes = None  # 8 bytes a row, needed by that check alone
        missing = [c for c in keep_columns if c not in scan.columns]
        if missing:
            raise InputError(
                f"`keep_columns` names {', '.join(missing)}, which input {self.path} lacks. Columns present: {', '.join(scan.columns)}."
            )
        return scan

    def _jsonl_objects(
        self, skipped: list[int] | None = None
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (line number, object) for each non-blank line. A bad line raises
        InputError, or with skip_bad_lines is passed over (and its number appended
        to ``skipped``)."""
        try:
            fh = self.path.open("rb")
        except OSError as exc:
            raise InputError(f"Input {self.path} cannot be read: {exc.strerror}.") from None
        floats = False
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                    if self._floats and _has_float(obj):
                        obj = _exact_loads(line)
                        floats = True
                except orjson.JSONDecodeError as exc:
                    if self.skip_bad_lines:
                        if skipped is not None:
                            skipped.append(lineno)
                        continue
                    raise InputError(self._bad_line_message(lineno, line, exc)) from None
                if not isinstance(obj, dict):
                    if self.skip_bad_lines:
                        if skipped is not None:
                            skipped.append(lineno)
                        continue
                    raise InputError(
                        f"Input {self.path}, line {lineno}: valid JSON but a {type(obj).__name__}, not an object. "
                        'Each line must be one JSON object like {"id": "T-1", "ticket": "..."}; fix the line or pass --skip-bad-lines.'
                    )
                yield lineno, obj
        # A whole pass without a float: the next passes need not look for one.
        self._floats = floats

    def _bad_line_message(self, lineno: int, line: bytes, exc: Exception) -> str:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return (
                f"Input {self.path}, line {lineno}: bytes that are not UTF-8 (at byte {uexc.start} of the line). "
                "Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or pass --skip-bad-lines to skip such lines."
            )
        return (
            f"Input {self.path}, line {lineno}: not valid JSON ({exc}). "
            "Fix the line, or pass --skip-bad-lines to skip and count such lines."
        )

    def _scan_jsonl(self, id_column: str, keep_columns: Sequence[str]) -> Scan:
        columns: dict[str, None] = {}
        kinds: dict[str, set[type]] = {c: set() for c in keep_columns}
        num_rows = 0
        id_hashes = array("q")  # for the duplicate check, without a second read
        first_without_id: int | None = None
        skipped: list[int] = []
        for lineno, obj in self._jsonl_objects(skipped):
            for key in obj:
                if key not in columns:
                    columns[key] = None
            for c, seen in kinds.items():
                value = obj.get(c)
                if value is not None:
                    # An int beyond int64 cannot be an Arrow int: keep such a column as text.
                    seen.add(
                        str
                        if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX
                        else type(value)
                    )
            if self.batch_requests:
                self._check_batch_request(lineno, obj)
            if id_column not in obj and first_without_id is None:
                first_without_id = lineno
            if id_column in obj:
                value = obj[id_column]
                if value is None:
                    raise InputError(
                        f"Input {self.path}, line {lineno}: `{id_column}` is null. Give every row an id, or set `id_column` to another column."
                    )
                id_hashes.append(hash(_id_text(value)))
            num_rows += 1
        if id_column in columns and first_without_id is not None:
            raise InputError(
                f"Input {self.path}, line {first_without_id}: no `{id_column}`, though other lines have one. "
                "Give every row an id, or set `id_column` to another column."
            )
        keep_schema = pa.schema([pa.field(c, _arrow_type_for(kinds[c])) for c in keep_columns])
        scan = Scan(num_rows, list(columns), id_column in columns, keep_schema, skipped)
        scan.id_hashes = id_hashes
        return scan

    def _check_batch_request(self, lineno: int, obj: dict[str, Any]) -> None:
        where = f"Input {self.path}, line {lineno}"
        if not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
            raise InputError(
                f"{where}: an OpenAI batch request needs a string `custom_id`; add one to the line."
            )
        if not isinstance(obj.get("body"), dict) or not isinstance(
            obj["body"].get("messages"), list
        ):
            raise InputError(
                f"{where}: the request's `body` must be a chat completion request with `messages`; fix the line."
            )
        url = obj.get("url")
        if url is not None and not str(url).rstrip("/").endswith("/chat/completions"):
            raise InputError(
                f"{where}: url {url!r} is not a chat completions request; batchrun sends only "
                "/v1/chat/completions requests. Leave such lines out of the file."
            )

    def _open_parquet(self, part: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(part)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(
                f"Input {part} is not a readable Parquet file ({exc}). Check the file, or give JSONL "
                "(a file whose name does not end in .parquet is read as JSONL)."
            ) from None

    def _scan_parquet(self, id_column: str, keep_columns: Sequence[str]) -> Scan:
        first_names: list[str] | None = None
        num_rows = 0
        id_hashes = array("q")
        keep: dict[
            str, tuple[pa.Field, Path]
        ] = {}  # the column's field so far, and the part that set it
        for part in self.parts:
            pf = self._open_parquet(part)
            names = pf.schema_arrow.names
            if first_names is None:
                first_names = names
            elif set(names) != set(first_names):
                raise InputError(
                    f"Input part {part} has columns {', '.join(names)}, but {self.parts[0]} has {', '.join(first_names)}. "
                    "All parts of a Parquet folder must have the same columns."
                )
            for name in keep_columns:
                if name in names:
                    keep[name] = self._joined_field(name, pf.schema_arrow.field(name), part, keep)
            if id_column in names:
                for batch in pf.iter_batches(columns=[id_column], batch_size=65536):
                    nulls = batch.column(0).null_count
                    if nulls:
                        first = batch.column(0).is_null().index(True).as_py()
                        raise InputError(
                            f"Input {part}, row {num_rows + first}: `{id_column}` is null. Give every row an id, or set `id_column` to another column."
                        )
                    id_hashes.extend(hash(_id_text(v)) for v in batch.column(0).to_pylist())
                    num_rows += batch.num_rows
            else:
                num_rows += pf.metadata.num_rows
        assert first_names is not None
        keep_schema = pa.schema([keep[c][0] for c in keep_columns if c in keep])
        scan = Scan(num_rows, first_names, id_column in first_names, keep_schema)
        scan.id_hashes = id_hashes
        return scan

    @staticmethod
    def _joined_field(
        name: str, field: pa.Field, part: Path, seen: dict[str, tuple[pa.Field, Path]]
    ) -> tuple[pa.Field, Path]:
        """The keep column's field over the parts so far and this one: the same
        type, or one that holds both without changing a value (int32 and int64
        as int64, a dictionary as its values, string and large_string as
        large_string). InputError naming both parts when there is none: the
        output has one type per column."""
        if name not in seen:
            return field, part
        before, where = seen[name]
        joined = _lossless_join(before.type, field.type)
        if joined is None:
            raise InputError(
                f"Input parts disagree on the type of keep column `{name}`: {where} has {before.type}, "
                f"{part} has {field.type}. The output has one type per column: write the column with "
                "the same type in every part (e.g. cast it to string), or leave it out of keep_columns."
            )
        return before.with_type(joined).with_nullable(before.nullable or field.nullable), where

    def _check_duplicates(self, scan: Scan, id_column: str, dedupe: bool) -> None:
        import numpy as np

        # Sorted where they lie: a sorted copy or an argsort would take 8 more bytes a row.
        ordered = np.frombuffer(scan.id_hashes, dtype=np.int64)
        ordered.sort()
        same = ordered[1:] == ordered[:-1]
        if not same.any():
            return
        suspect = set(ordered[1:][same].tolist())
        first_row: dict[str, int] = {}
        dups: dict[str, list[int]] = {}
        for row, id_ in enumerate(self._iter_ids(id_column)):
            if hash(id_) not in suspect:
                continue
            if id_ in first_row:
                dups.setdefault(id_, [first_row[id_]]).append(row)
            else:
                first_row[id_] = row
        if not dups:
            return  # hash collisions only
        if dedupe:
            for rows in dups.values():
                scan.skip[rows[1:]] = True
            return
        listed = "; ".join(
            f"{i!r} at rows {', '.join(map(str, rows))}"
            for i, rows in list(dups.items())[:MAX_LISTED]
        )
        more = f" and {len(dups) - MAX_LISTED} more" if len(dups) > MAX_LISTED else ""
        raise InputError(
            f"Input {self.path} has duplicate ids in `{id_column}`: {listed}{more}. Ids must be unique so each row is "
            "sent and resumed once: fix the input, or pass --dedupe to keep the first row of each id."
        )

    def keep_shard(self, scan: Scan, id_column: str | None, shard: int, shards: int) -> None:
        """Leave out of ``scan`` every row whose id does not hash to ``shard`` of ``shards``."""
        ids: Iterator[str] = (
            self._iter_ids(id_column) if id_column else (str(r) for r in range(scan.num_rows))
        )
        for row, id_ in enumerate(ids):
            if shard_of(id_, shards) != shard:
                scan.skip[row] = True

    def _iter_ids(self, id_column: str) -> Iterator[str]:
        if self.format == "jsonl":
            for _, obj in self._jsonl_objects():
                yield _id_text(obj[id_column]) if id_column in obj else ""
        else:
            for part in self.parts:
                for batch in self._open_parquet(part).iter_batches(
                    columns=[id_column], batch_size=65536
                ):
                    for value in batch.column(0).to_pylist():
                        yield _id_text(value)

    # ---- the streaming passes ------------------------------------------

    def batches(
        self, columns: Sequence[str], id_column: str | None, batch_rows: int = BATCH_ROWS
    ) -> Iterator[RowBatch]:
        """Rows in input order with the ``columns`` the prompt needs.

        ``id_column`` None numbers the rows instead.
        """
        start = 0
        if self.format == "jsonl":
            rows: list[dict[str, Any]] = []
            for _, obj in self._jsonl_objects():
                rows.append(obj)
                if len(rows) >= batch_rows:
                    yield RowBatch(start, self._ids(rows, start, id_column), rows)
                    start += len(rows)
                    rows = []
            if rows:
                yield RowBatch(start, self._ids(rows, start, id_column), rows)
            return
        wanted = list(dict.fromkeys([*columns, *([id_column] if id_column else [])]))
        for part in self.parts:
            pf = self._open_parquet(part)
            present = [c for c in wanted if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(columns=present, batch_size=batch_rows):
                rows = batch.to_pylist()
                yield RowBatch(start, self._ids(rows, start, id_column), rows)
                start += len(rows)

    @staticmethod
    def _ids(rows: list[dict[str, Any]], start: int, id_column: str | None) -> list[str]:
        if id_column is None:
            return [str(start + i) for i in range(len(rows))]
        return [_id_text(row[id_column]) for row in rows]

    def keep_batches(
        self, keep_schema: pa.Schema, batch_rows: int = BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """The ``keep_columns`` in input order, typed by ``keep_schema``."""
        names = keep_schema.names
        if self.format == "parquet":
            for part in self.parts:
                pf = self._open_parquet(part)
                for batch in pf.iter_batches(columns=names, batch_size=batch_rows):
                    batch = batch.select(names)
                    if batch.schema != keep_schema:  # a part whose types the scan widened
                        batch = pa.RecordBatch.from_arrays(
                            [
                                c.cast(f.type)
                                for c, f in zip(batch.columns, keep_schema, strict=True)
                            ],
                            schema=keep_schema,
                        )
                    yield batch
            return
        rows: list[dict[str, Any]] = []
        for _, obj in self._jsonl_objects():
            rows.append(obj)
            if len(rows) >= batch_rows:
                yield _keep_batch(rows, keep_schema)
                rows = []
        if rows:
            yield _keep_batch(rows, keep_schema)


def shard_of(row_id: str, shards: int) -> int:
    """The shard (0-based) a row id belongs to: a hash of the id, the same on every
    run and machine (not Python's salted hash)."""
    digest = hashlib.blake2b(row_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def _lossless(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether every value of type ``src`` casts to ``dst`` unchanged."""
    if src == dst or pa.types.is_null(src):
        return True
    if pa.types.is_dictionary(src):
        return _lossless(src.value_type, dst)
    if pa.types.is_integer(src) and pa.types.is_integer(dst):
        if pa.types.is_signed_integer(dst):
            grow = (
                0 if pa.types.is_signed_integer(src) else 1
            )  # an unsigned value needs a sign bit more
            return bool(src.bit_width + grow <= dst.bit_width)
        return pa.types.is_unsigned_integer(src) and src.bit_width <= dst.bit_width
    if pa.types.is_floating(dst) and (pa.types.is_integer(src) or pa.types.is_floating(src)):
        exact = {16: 11, 32: 24, 64: 53}[dst.bit_width]  # bits of a whole number the float holds
        if pa.types.is_floating(src):
            return bool(src.bit_width <= dst.bit_width)
        return bool(src.bit_width - pa.types.is_signed_integer(src) <= exact)
    return (pa.types.is_string(src) and pa.types.is_large_string(dst)) or (
        pa.types.is_binary(src) and pa.types.is_large_binary(dst)
    )


def _lossless_join(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """A type both ``a`` and ``b`` cast to without changing a value, or None."""
    if _lossless(a, b):
        return b
    if _lossless(b, a):
        return a
    try:
        joined = (
            pa.unify_schemas(
                [pa.schema([("c", a)]), pa.schema([("c", b)])], promote_options="permissive"
            )
            .field("c")
            .type
        )
    except (pa.ArrowTypeError, pa.ArrowInvalid, TypeError):
        return None
    return joined if _lossless(a, joined) and _lossless(b, joined) else None


def _arrow_type_for(kinds: set[type]) -> pa.DataType:
    """The Arrow type for JSON values of these Python types: one scalar kind keeps
    its type, ints with floats become float64, anything else a JSON string."""
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds and kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def _keep_batch(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """The keep columns of JSONL rows, typed by ``schema``: values of a text
    column that are not text become JSON text. Built by pyarrow's JSON reader,
    which is faster than converting Python lists and does not load pandas."""
    text = [f.name for f in schema if pa.types.is_string(f.type)]
    lines = []
    for row in rows:
        kept = {f.name: row.get(f.name) for f in schema}
        for name in text:
            value = kept[name]
            if value is not None and not isinstance(value, str):
                kept[name] = orjson.dumps(value).decode()
        lines.append(orjson.dumps(kept))
    buffer = b"\n".join(lines)
    table = pa_json.read_json(
        io.BytesIO(buffer),
        read_options=pa_json.ReadOptions(use_threads=False, block_size=len(buffer) + 1),
        parse_options=pa_json.ParseOptions(explicit_schema=schema),
    )
    return pa.RecordBatch.from_arrays(
        [table.column(f.name).combine_chunks() for f in schema], schema=schema
    )
