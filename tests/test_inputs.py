"""Tests of input tables: JSONL and Parquet read as batches, and the full scan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import InputError
from batchrun.inputs import InputTable, RowBatch
from tests.conftest import SAMPLE_JSONL, SAMPLE_PARQUET, tickets, write_jsonl


def collect(
    table: InputTable, columns: Sequence[str], id_column: str | None, batch_rows: int = 2048
) -> tuple[list[RowBatch], list[int], list[str], list[dict[str, Any]]]:
    """All batches, plus the row numbers, ids and rows they cover, flattened."""
    batches = list(table.batches(columns, id_column, batch_rows=batch_rows))
    numbers = [b.start + i for b in batches for i in range(len(b.rows))]
    ids = [i for b in batches for i in b.ids]
    rows = [r for b in batches for r in b.rows]
    for b in batches:
        assert len(b.ids) == len(b.rows)
    return batches, numbers, ids, rows


def write_parquet(path: Path, rows: list[dict[str, Any]] | pa.Table, **kwargs: Any) -> Path:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    pq.write_table(table, path, **kwargs)
    return path


def keep_table(table: InputTable, schema: pa.Schema, batch_rows: int = 2048) -> pa.Table:
    return pa.Table.from_batches(
        list(table.keep_batches(schema, batch_rows=batch_rows)), schema=schema
    )


# ---- JSONL and Parquet give the same rows ----------------------------------------


def test_sample_jsonl_and_parquet_give_the_same_rows() -> None:
    columns = ["ticket", "customer", "subject"]
    jsonl = InputTable(SAMPLE_JSONL)
    parquet = InputTable(SAMPLE_PARQUET)
    assert jsonl.format == "jsonl" and parquet.format == "parquet"

    scan_j = jsonl.scan("id", True, ["customer", "priority"])
    scan_p = parquet.scan("id", True, ["customer", "priority"])
    assert scan_j.num_rows == scan_p.num_rows == 200
    assert scan_j.columns == scan_p.columns
    assert scan_j.has_id_column and scan_p.has_id_column
    assert scan_j.keep_schema.names == scan_p.keep_schema.names == ["customer", "priority"]
    assert all(pa.types.is_string(t) for t in scan_j.keep_schema.types)

    batches_j, numbers_j, ids_j, rows_j = collect(jsonl, columns, "id", batch_rows=64)
    batches_p, numbers_p, ids_p, rows_p = collect(parquet, columns, "id", batch_rows=64)
    assert [b.start for b in batches_j] == [b.start for b in batches_p] == [0, 64, 128, 192]
    assert numbers_j == numbers_p == list(range(200))
    assert ids_j == ids_p
    assert ids_j[0] == "T-000001" and ids_j[-1] == "T-000200"
    assert [{c: r[c] for c in columns} for r in rows_j] == [
        {c: r[c] for c in columns} for r in rows_p
    ]
    # Parquet reads only what the prompt needs (plus the id).
    assert set(rows_p[0]) == {*columns, "id"}

    # Same values (the Parquet schema also carries the file's `not null`).
    assert (
        keep_table(jsonl, scan_j.keep_schema).to_pydict()
        == keep_table(parquet, scan_p.keep_schema).to_pydict()
    )


def test_folder_of_parquet_parts_reads_like_one_file(tmp_path: Path) -> None:
    whole = pq.read_table(SAMPLE_PARQUET)
    folder = tmp_path / "parts"
    (folder / "part-02").mkdir(parents=True)
    write_parquet(folder / "part-00.parquet", whole.slice(0, 70))
    write_parquet(folder / "part-01.parquet", whole.slice(70, 50))
    # Parts are read in sorted path order, subfolders included.
    write_parquet(folder / "part-02" / "0.parquet", whole.slice(120))
    (folder / "_SUCCESS").write_text("")  # not a part: ignored

    parts = InputTable(folder)
    single = InputTable(SAMPLE_PARQUET)
    assert parts.format == "parquet"
    assert len(parts.parts) == 3

    scan = parts.scan("id", True, ["priority"])
    assert scan.num_rows == 200

    _, numbers, ids, rows = collect(parts, ["ticket"], "id", batch_rows=32)
    _, numbers_1, ids_1, rows_1 = collect(single, ["ticket"], "id", batch_rows=32)
    assert numbers == numbers_1 == list(range(200))
    assert ids == ids_1
    assert rows == rows_1
    assert keep_table(parts, scan.keep_schema, batch_rows=32).equals(
        keep_table(single, single.scan("id", True, ["priority"]).keep_schema)
    )


def test_small_jsonl_and_parquet_agree_without_id_column(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "n": i} for i in range(7)]
    jsonl = InputTable(write_jsonl(tmp_path / "in.jsonl", rows))
    parquet = InputTable(write_parquet(tmp_path / "in.parquet", rows))
    for table in (jsonl, parquet):
        scan = table.scan("id", False, [])
        assert scan.num_rows == 7
        assert not scan.has_id_column
        assert scan.columns == ["text", "n"]
        batches, numbers, ids, got = collect(table, ["text"], None, batch_rows=3)
        assert [b.start for b in batches] == [0, 3, 6]
        assert numbers == list(range(7))
        assert ids == [str(i) for i in range(7)]
        assert [r["text"] for r in got] == [r["text"] for r in rows]


# ---- ids ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_int_ids_become_strings(tmp_path: Path, fmt: str) -> None:
    rows = [{"id": 10 + i, "text": f"t{i}"} for i in range(4)]
    path = (
        write_jsonl(tmp_path / "in.jsonl", rows)
        if fmt == "jsonl"
        else write_parquet(tmp_path / "in.parquet", rows)
    )
    table = InputTable(path)
    assert table.scan("id", False, []).has_id_column
    _, _, ids, _ = collect(table, ["text"], "id")
    assert ids == ["10", "11", "12", "13"]
    assert all(isinstance(i, str) for i in ids)


def test_custom_id_column(tmp_path: Path) -> None:
    rows = [{"key": f"k{i}", "id": "same", "text": "x"} for i in range(3)]
    table = InputTable(write_jsonl(tmp_path / "in.jsonl", rows))
    scan = table.scan("key", True, [])  # the `id` column's repeats do not matter
    assert scan.has_id_column
    _, _, ids, _ = collect(table, ["text"], "key")
    assert ids == ["k0", "k1", "k2"]


def test_id_required_but_missing_lists_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"ticket": "a", "customer": "c"}])
    with pytest.raises(InputError, match="no id column `ticket_id`") as info:
        InputTable(path).scan("ticket_id", True, [])
    assert "Columns present: ticket, customer" in str(info.value)


def test_id_required_but_missing_in_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", [{"ticket": "a"}])
    with pytest.raises(InputError, match="Columns present: ticket"):
        InputTable(path).scan("ticket_id", True, [])


def test_duplicate_ids_are_named(tmp_path: Path) -> None:
    ids = ["a", "b", "a", "c", "b", "a"]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": "x"} for i in ids])
    with pytest.raises(InputError, match="duplicate ids") as info:
        InputTable(path).scan("id", False, [])
    msg = str(info.value)
    assert "'a' at rows 0, 2, 5" in msg
    assert "'b' at rows 1, 4" in msg
    assert "'c'" not in msg
    assert "--dedupe" in msg


def test_dedupe_lists_the_later_rows(tmp_path: Path) -> None:
    ids = ["a", "b", "a", "c", "b", "a"]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": "x"} for i in ids])
    scan = InputTable(path).scan("id", False, [], dedupe=True)
    assert set(scan.skip.nonzero()[0].tolist()) == {2, 4, 5}
    assert scan.rows_kept == scan.num_rows - 3
    assert scan.num_rows == 6


def test_duplicate_ids_in_parquet_folder_across_parts(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "p0.parquet", [{"id": "a"}, {"id": "b"}])
    write_parquet(folder / "p1.parquet", [{"id": "c"}, {"id": "a"}])
    with pytest.raises(InputError, match="'a' at rows 0, 3"):
        InputTable(folder).scan("id", False, [])
    assert InputTable(folder).scan("id", False, [], dedupe=True).skip.nonzero()[0].tolist() == [3]


def test_int_and_string_id_with_the_same_text_are_duplicates(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": 1}, {"id": "1"}])
    with pytest.raises(InputError, match="'1' at rows 0, 1"):
        InputTable(path).scan("id", False, [])


def test_many_duplicate_ids_are_summarised(tmp_path: Path) -> None:
    rows = [{"id": f"d{i}"} for i in range(7)] * 2
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(InputError, match="and 2 more"):
        InputTable(path).scan("id", False, [])


def test_null_id_in_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n{"id": null}\n')
    with pytest.raises(InputError, match=r"line 3: `id` is null") as info:
        InputTable(path).scan("id", False, [])
    assert str(path) in str(info.value)


def test_null_id_in_parquet_names_the_row(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "p0.parquet", [{"id": "a"}, {"id": "b"}])
    write_parquet(folder / "p1.parquet", [{"id": "c"}, {"id": None}])
    with pytest.raises(InputError, match=r"row 3: `id` is null"):
        InputTable(folder).scan("id", False, [])


@pytest.mark.parametrize("missing", [0, 1])
def test_jsonl_row_without_the_id_column_is_an_input_error(tmp_path: Path, missing: int) -> None:
    rows: list[dict[str, Any]] = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    del rows[missing]["id"]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    table = InputTable(path)
    with pytest.raises(InputError, match=f"line {missing + 1}"):
        scan = table.scan("id", False, [])
        collect(table, ["text"], "id" if scan.has_id_column else None)


# ---- scan: counting and bad input -----------------------------------------------


def test_scan_counts_rows_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "x": 1}\n\n   \n{"id": "b", "y": 2}\r\n{"id": "c"}')
    scan = InputTable(path).scan("id", True, [])
    assert scan.num_rows == 3
    assert scan.columns == ["id", "x", "y"]  # first-seen order over all lines
    assert scan.skipped_lines == []


def test_scan_counts_parquet_rows_without_id_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.pq", [{"text": str(i)} for i in range(11)])
    table = InputTable(path)
    assert table.format == "parquet"
    assert table.scan("id", False, []).num_rows == 11


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_jsonl_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match="has no rows"):
        InputTable(path).scan("id", False, [])


def test_empty_parquet_is_an_error(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", pa.table({"id": pa.array([], pa.string())}))
    with pytest.raises(InputError, match="has no rows"):
        InputTable(path).scan("id", False, [])


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n{"id": "b",\n{"id": "c"}\n')
    with pytest.raises(InputError) as info:
        InputTable(path).scan("id", False, [])
    msg = str(info.value)
    assert f"Input {path}, line 3: not valid JSON" in msg
    assert "--skip-bad-lines" in msg


def test_skip_bad_lines_skips_and_lists_them(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n[1, 2]\n{"id": "\xff"}\n{"id": "c"}\n')
    table = InputTable(path, skip_bad_lines=True)
    scan = table.scan("id", True, [])
    assert scan.skipped_lines == [2, 4, 5]
    assert scan.num_rows == 3
    batches, numbers, ids, _ = collect(table, [], "id", batch_rows=2)
    assert numbers == [0, 1, 2]
    assert ids == ["a", "b", "c"]
    assert [b.start for b in batches] == [0, 2]


def test_skip_bad_lines_with_every_line_bad_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"nope\n{bad\n")
    with pytest.raises(InputError, match="has no rows"):
        InputTable(path, skip_bad_lines=True).scan("id", False, [])


@pytest.mark.parametrize(
    ("line", "kind"),
    [(b"[1, 2]", "list"), (b'"text"', "str"), (b"3", "int"), (b"null", "NoneType")],
)
def test_json_that_is_not_an_object_names_the_line(tmp_path: Path, line: bytes, kind: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\n' + line + b"\n")
    with pytest.raises(InputError, match=f"line 2: valid JSON but a {kind}, not an object"):
        InputTable(path).scan("id", False, [])


def test_non_utf8_bytes_name_utf8_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a", "t": "ok"}\n{"id": "b", "t": "caf\xe9"}\n')
    with pytest.raises(InputError) as info:
        InputTable(path).scan("id", False, [])
    msg = str(info.value)
    assert "line 2" in msg
    assert "not UTF-8" in msg
    assert "at byte 21 of the line" in msg


def test_non_utf8_bytes_also_stop_batches(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "\xe9"}\n')
    with pytest.raises(InputError, match="line 2"):
        list(InputTable(path).batches([], "id"))


def test_file_named_parquet_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    write_jsonl(path, tickets(3))
    with pytest.raises(InputError, match="not a readable Parquet file") as info:
        InputTable(path).scan("id", False, [])
    assert str(path) in str(info.value)


def test_missing_input_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as info:
        InputTable(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)


def test_folder_without_parquet_parts(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    write_jsonl(folder / "x.jsonl", tickets(1))
    with pytest.raises(InputError, match=r"holds no \*\.parquet files"):
        InputTable(folder)


def test_parquet_parts_with_different_columns(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "p0.parquet", [{"id": "a", "text": "x"}])
    write_parquet(folder / "p1.parquet", [{"id": "b", "body": "y"}])
    with pytest.raises(InputError, match="must have the same columns"):
        InputTable(folder).scan("id", False, [])


# ---- keep_columns ------------------------------------------------------------


def test_keep_column_missing_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", tickets(2))
    with pytest.raises(InputError, match="`keep_columns` names priority, region") as info:
        InputTable(path).scan("id", False, ["customer", "priority", "region"])
    assert "Columns present: id, customer, ticket" in str(info.value)


def test_keep_column_missing_in_parquet_is_an_error(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", tickets(2))
    with pytest.raises(InputError, match="`keep_columns` names region"):
        InputTable(path).scan("id", False, ["region"])


JSONL_KEEP_ROWS: list[dict[str, Any]] = [
    {
        "id": "r0",
        "s": "a",
        "i": 1,
        "f": 1,
        "b": True,
        "d": {"k": 1},
        "m": "x",
        "ib": 1,
        "n": None,
        "l": [1, "a"],
    },
    {"id": "r1", "s": None, "i": None, "f": 2.5, "b": False, "d": {"k": [2]}, "m": 2, "ib": True},
    {
        "id": "r2",
        "s": "c",
        "i": 3,
        "f": None,
        "b": None,
        "d": None,
        "m": {"y": None},
        "ib": 3,
        "l": [],
    },
]


def test_keep_column_types_inferred_for_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", JSONL_KEEP_ROWS)
    keep = ["s", "i", "f", "b", "d", "m", "ib", "n", "l"]
    scan = InputTable(path).scan("id", True, keep)
    assert scan.keep_schema.names == keep
    types = dict(zip(scan.keep_schema.names, scan.keep_schema.types, strict=True))
    assert types == {
        "s": pa.string(),
        "i": pa.int64(),
        "f": pa.float64(),  # ints and floats mixed
        "b": pa.bool_(),
        "d": pa.string(),  # objects as JSON text
        "m": pa.string(),  # mixed kinds as JSON text
        "ib": pa.string(),  # bools are not ints
        "n": pa.string(),  # never a value
        "l": pa.string(),
    }


def test_keep_batches_for_jsonl_are_typed_and_in_input_order(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", JSONL_KEEP_ROWS)
    table = InputTable(path)
    keep = ["m", "i", "f", "b", "d", "s", "ib", "n", "l"]
    scan = table.scan("id", True, keep)
    batches = list(table.keep_batches(scan.keep_schema, batch_rows=2))
    assert [b.num_rows for b in batches] == [2, 1]
    assert all(b.schema.equals(scan.keep_schema) for b in batches)
    got = pa.Table.from_batches(batches).to_pydict()
    assert list(got) == keep
    assert got["s"] == ["a", None, "c"]
    assert got["i"] == [1, None, 3]
    assert got["f"] == [1.0, 2.5, None]
    assert got["b"] == [True, False, None]
    assert got["d"] == ['{"k":1}', '{"k":[2]}', None]
    assert got["m"] == ["x", "2", '{"y":null}']
    assert got["ib"] == ["1", "true", "3"]
    assert got["n"] == [None, None, None]
    assert got["l"] == ['[1,"a"]', None, "[]"]


def test_keep_types_come_from_the_parquet_schema(tmp_path: Path) -> None:
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("small", pa.int32()),
            ("when", pa.timestamp("ms")),
            ("tags", pa.list_(pa.string())),
            ("score", pa.float32()),
        ]
    )
    data = pa.table(
        {
            "id": ["a", "b", "c"],
            "small": pa.array([1, None, 3], pa.int32()),
            "when": pa.array([0, 1000, 2000], pa.timestamp("ms")),
            "tags": [["x"], [], None],
            "score": pa.array([0.5, 1.5, None], pa.float32()),
        },
        schema=schema,
    )
    path = write_parquet(tmp_path / "in.parquet", data)
    table = InputTable(path)
    keep = ["tags", "small", "when"]
    scan = table.scan("id", True, keep)
    assert scan.keep_schema.names == keep
    assert scan.keep_schema.types == [pa.list_(pa.string()), pa.int32(), pa.timestamp("ms")]
    got = keep_table(table, scan.keep_schema, batch_rows=2)
    assert got.column_names == keep
    assert got.to_pydict()["small"] == [1, None, 3]
    assert got.to_pydict()["tags"] == [["x"], [], None]


def test_keep_batches_across_batch_boundary_keep_all_rows_in_order(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "n": i} for i in range(10)]
    for path in (
        write_jsonl(tmp_path / "in.jsonl", rows),
        write_parquet(tmp_path / "in.parquet", rows),
    ):
        table = InputTable(path)
        scan = table.scan("id", True, ["n"])
        batches = list(table.keep_batches(scan.keep_schema, batch_rows=4))
        assert [b.num_rows for b in batches] == [4, 4, 2]
        assert pa.Table.from_batches(batches).column("n").to_pylist() == list(range(10))


def test_keep_column_with_int_beyond_int64_is_kept(tmp_path: Path) -> None:
    big = 2**63
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "n": big}, {"id": "b", "n": 1}])
    table = InputTable(path)
    scan = table.scan("id", True, ["n"])
    values = keep_table(table, scan.keep_schema).column("n").to_pylist()
    assert values in ([big, 1], [str(big), "1"], [float(big), 1.0])


# ---- batching -----------------------------------------------------------------


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 5, 6, 100])
def test_jsonl_batches_across_boundaries(tmp_path: Path, batch_rows: int) -> None:
    rows = tickets(5)
    table = InputTable(write_jsonl(tmp_path / "in.jsonl", rows))
    batches, numbers, ids, got = collect(table, ["ticket"], "id", batch_rows=batch_rows)
    assert all(0 < len(b.rows) <= batch_rows for b in batches)
    assert [b.start for b in batches] == list(range(0, 5, batch_rows))
    assert numbers == list(range(5))
    assert ids == [r["id"] for r in rows]
    assert got == rows
    # Numbered rows (no id column) agree with positions across the boundary too.
    _, _, numbered, _ = collect(table, ["ticket"], None, batch_rows=batch_rows)
    assert numbered == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("batch_rows", [1, 2, 4])
def test_parquet_parts_batches_across_boundaries(tmp_path: Path, batch_rows: int) -> None:
    rows = tickets(8)
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "a.parquet", rows[:3])
    write_parquet(folder / "b.parquet", rows[3:], row_group_size=2)
    table = InputTable(folder)
    batches, numbers, ids, got = collect(table, ["ticket"], None, batch_rows=batch_rows)
    assert all(0 < len(b.rows) <= batch_rows for b in batches)
    assert numbers == list(range(8))
    assert ids == [str(i) for i in range(8)]
    assert [r["ticket"] for r in got] == [r["ticket"] for r in rows]
    # Each batch's ids match its own start.
    for b in batches:
        assert b.ids == [str(b.start + i) for i in range(len(b.rows))]


def test_parquet_batches_include_id_column_once(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "in.parquet", tickets(2))
    _, _, ids, rows = collect(InputTable(path), ["id", "ticket"], "id")
    assert ids == ["T-0000", "T-0001"]
    assert list(rows[0]) == ["id", "ticket"]


def test_jsonl_rows_are_whole_objects(tmp_path: Path) -> None:
    row = {"id": "a", "nested": {"x": [1, 2]}, "text": "é ✓"}
    path = tmp_path / "in.jsonl"
    path.write_bytes(orjson.dumps(row) + b"\n")
    _, _, _, rows = collect(InputTable(path), ["text"], "id")
    assert rows == [row]
