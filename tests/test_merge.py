"""``batchrun merge``: sharded outputs back into one file, and the checks that guard it.

The shards and the unsharded run are real runs of the sample job against the embedded
endpoint (``--mock``), made once per module; the other cases change copies of them
with pyarrow.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

import batchrun.idcheck
import batchrun.rowmerge
from batchrun.cli import main
from batchrun.errors import InputError, OutputError
from batchrun.merge import merge_outputs
from tests.conftest import REPO, SAMPLE_JSONL, SAMPLE_PARQUET

JOB = REPO / "jobs" / "summarize_tickets.toml"
SAMPLE_ROWS = 200
# Differ from run to run by nature; every other column must match.
RUN_COLUMNS = {"latency_ms", "queued_ms", "response_id", "started_at", "finished_at"}


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``part-0`` … ``part-2`` (the sample job in 3 shards) and ``full`` (unsharded)."""
    folder = tmp_path_factory.mktemp("runs")
    logger = logging.getLogger("batchrun")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    made = {}
    try:
        for name, shard in [
            ("part-0", "0/3"),
            ("part-1", "1/3"),
            ("part-2", "2/3"),
            ("full", None),
        ]:
            out = folder / f"{name}.parquet"
            args: list[str | Path] = ["run", JOB, "--mock", "-q", "--output", out]
            result = cli(*args, *(["--shard", shard] if shard else []))
            assert result.exit_code == 0, result.output
            made[name] = out
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    return made


@pytest.fixture
def work(runs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Copies of ``runs`` in this test's own folder (tests may change them)."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    return {name: Path(shutil.copy(path, folder / path.name)) for name, path in runs.items()}


def parts(work: dict[str, Path]) -> list[Path]:
    return [work["part-0"], work["part-1"], work["part-2"]]


def rewrite(path: Path, **columns: pa.Array) -> None:
    """Replace ``columns`` of the output at ``path``, keeping its schema and metadata."""
    table = pq.read_table(path)
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), values)
    pq.write_table(table, path)


def metadata(path: Path) -> dict[str, object]:
    meta: dict[str, object] = orjson.loads(pq.read_schema(path).metadata[b"batchrun"])
    return meta


# ---- the sharded job, merged ------------------------------------------------------------


def test_merged_shards_equal_one_unsharded_run(work: dict[str, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged.parquet"
    # Out of order on purpose: the merged file is in input order whatever the order given.
    result = cli("merge", work["part-2"], work["part-0"], work["part-1"], "-o", merged)
    assert result.exit_code == 0, result.output
    assert "rows        200  (ok 200, failed 0)" in result.output
    assert "duplicates  none" in result.output

    got, want = pq.read_table(merged), pq.read_table(work["full"])
    assert got.column("row").to_pylist() == list(range(SAMPLE_ROWS))
    assert got.schema.names == want.schema.names
    same = [c for c in want.schema.names if c not in RUN_COLUMNS]
    assert {"id", "row", "completion", "total_tokens", "status", "customer", "priority"} <= set(
        same
    )
    assert got.select(same).equals(want.select(same))
    assert got.schema.remove_metadata().equals(want.schema.remove_metadata())


def test_merged_metadata_is_the_first_files_plus_merged_from(
    work: dict[str, Path], tmp_path: Path
) -> None:
    merged = tmp_path / "merged.parquet"
    assert cli("merge", *parts(work), "-o", merged).exit_code == 0
    meta, first = metadata(merged), metadata(work["part-0"])
    assert meta["run_id"] == first["run_id"]
    assert meta["job"] == first["job"]
    assert meta["rows"] == SAMPLE_ROWS
    assert "shard" not in meta["identity"]  # type: ignore[operator]
    assert [m["shard"] for m in meta["merged_from"]] == ["0/3", "1/3", "2/3"]  # type: ignore[attr-defined]
    assert sum(m["rows"] for m in meta["merged_from"]) == SAMPLE_ROWS  # type: ignore[attr-defined]
    assert pq.ParquetFile(merged).metadata.row_group(0).column(0).compression == "ZSTD"


def test_a_merged_output_resumes_as_a_finished_run(work: dict[str, Path], tmp_path: Path) -> None:
    """Rerunning the unsharded job onto the merged file sends nothing: it is the job's output."""
    merged = tmp_path / "merged.parquet"
    assert cli("merge", *parts(work), "-o", merged).exit_code == 0
    result = cli("run", JOB, "--mock", "--output", merged)
    assert result.exit_code == 0, result.output
    assert "requests    0" in result.output
    assert "from an earlier run 200" in result.output


def test_folders_and_globs_leave_out_the_output(work: dict[str, Path]) -> None:
    folder = work["full"].parent
    work["full"].unlink()
    merged = folder / "merged.parquet"
    for spec in [folder, folder / "part-*.parquet", folder / "*.parquet"]:
        # The second and third time, merged.parquet is in the folder (and the glob) too.
        result = cli("merge", spec, "-o", merged)
        assert result.exit_code == 0, result.output
        assert "files       3" in result.output
    assert pq.read_metadata(merged).num_rows == SAMPLE_ROWS


def test_the_python_api_returns_the_counts(work: dict[str, Path], tmp_path: Path) -> None:
    result = merge_outputs(parts(work), tmp_path / "m.parquet", input=SAMPLE_JSONL)
    assert (result.rows, result.ok, result.failed, result.invalid) == (SAMPLE_ROWS, 200, 0, 0)
    assert (result.duplicate_ids, result.duplicates_dropped, result.missing) == (0, 0, 0)
    assert result.checked_by == "ids"
    assert result.files == parts(work)


# ---- doubled ids ------------------------------------------------------------------------


def test_a_shard_given_twice_is_an_error_naming_ids_and_files(
    work: dict[str, Path], tmp_path: Path
) -> None:
    again = Path(shutil.copy(work["part-1"], tmp_path / "part-1-again.parquet"))
    merged = tmp_path / "merged.parquet"
    result = cli("merge", *parts(work), again, "-o", merged)
    assert result.exit_code == 2
    n = pq.read_metadata(again).num_rows
    first_id = pq.read_table(again).column("id")[0].as_py()
    assert f"{n} ids have more than one row" in result.output
    assert f"{first_id!r} ({work['part-1']}, {again})" in result.output
    assert f"and {n - 5} more" in result.output
    assert "--prefer-ok" in result.output
    assert not merged.exists()


def test_the_same_file_named_twice_is_read_once(work: dict[str, Path], tmp_path: Path) -> None:
    result = cli("merge", *parts(work), work["part-0"], "-o", tmp_path / "m.parquet")
    assert result.exit_code == 0, result.output
    assert "files       3" in result.output


def test_prefer_ok_keeps_ok_then_the_latest(work: dict[str, Path], tmp_path: Path) -> None:
    """Two runs of one job: the first failed some rows, a rerun answered them."""
    first, rerun = work["full"], Path(shutil.copy(work["full"], tmp_path / "rerun.parquet"))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    stamp = pa.timestamp("us", tz="UTC")

    # Row 0: error first, ok in the rerun → ok.  Row 1: ok first, error in the rerun → ok.
    # Row 2: both ok, the rerun later → the rerun's.  Row 3: both error → the later one.
    # Row 4: both ok, the first later → the first's.  Others: both ok at one time → the later file's.
    def statuses(*values: str) -> pa.Array:
        return pa.array([*values, *["ok"] * (SAMPLE_ROWS - len(values))])

    def completions(tag: str) -> pa.Array:
        return pa.array([f"{tag} {i}" for i in range(SAMPLE_ROWS)])

    def times(*hours: int) -> pa.Array:
        return pa.array(
            [t0 + dt.timedelta(hours=h) for h in [*hours, *[0] * (SAMPLE_ROWS - len(hours))]], stamp
        )

    rewrite(
        first,
        status=statuses("error", "ok", "ok", "error", "ok"),
        completion=completions("first"),
        finished_at=times(0, 0, 0, 0, 5),
    )
    rewrite(
        rerun,
        status=statuses("ok", "error", "ok", "error", "ok"),
        completion=completions("rerun"),
        finished_at=times(1, 1, 1, 1, 1),
    )
    merged = tmp_path / "merged.parquet"

    refused = cli("merge", first, rerun, "-o", merged)
    assert refused.exit_code == 2
    assert "200 ids have more than one row" in refused.output

    result = cli("merge", first, rerun, "-o", merged, "--prefer-ok")
    assert result.exit_code == 0, result.output
    assert "200 ids resolved (--prefer-ok), 200 rows dropped" in result.output
    assert "rows        200  (ok 199, failed 1)" in result.output
    got = pq.read_table(merged).slice(0, 6).select(["status", "completion"]).to_pylist()
    assert [(r["status"], r["completion"]) for r in got] == [
        ("ok", "rerun 0"),
        ("ok", "first 1"),
        ("ok", "rerun 2"),
        ("error", "rerun 3"),
        ("ok", "first 4"),
        ("ok", "rerun 5"),
    ]


def test_a_null_finished_at_counts_as_oldest(work: dict[str, Path], tmp_path: Path) -> None:
    first, rerun = work["full"], Path(shutil.copy(work["full"], tmp_path / "rerun.parquet"))
    rewrite(first, completion=pa.array(["first"] * SAMPLE_ROWS))
    rewrite(
        rerun,
        completion=pa.array(["rerun"] * SAMPLE_ROWS),
        finished_at=pa.nulls(SAMPLE_ROWS, pa.timestamp("us", tz="UTC")),
    )
    merged = tmp_path / "m.parquet"
    assert cli("merge", first, rerun, "-o", merged, "--prefer-ok").exit_code == 0
    assert set(pq.read_table(merged).column("completion").to_pylist()) == {"first"}


def test_two_ids_on_one_row_mean_different_inputs(work: dict[str, Path], tmp_path: Path) -> None:
    other = Path(shutil.copy(work["part-1"], tmp_path / "other.parquet"))
    ids = pq.read_table(other).column("id")
    rewrite(other, id=pc.binary_join_element_wise("X-", ids, ""))
    result = cli("merge", work["part-1"], other, "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert "row numbers belong to more than one id" in result.output
    assert f"is {ids[0].as_py()!r} in {work['part-1']} but 'X-{ids[0].as_py()}' in {other}" in (
        result.output
    )


# ---- missing ids ------------------------------------------------------------------------


@pytest.mark.parametrize("input_file", [SAMPLE_JSONL, SAMPLE_PARQUET], ids=["jsonl", "parquet"])
def test_a_missing_shard_is_found_by_id(
    work: dict[str, Path], tmp_path: Path, input_file: Path
) -> None:
    merged = tmp_path / "merged.parquet"
    left_out = pq.read_table(work["part-2"]).column("id").to_pylist()
    result = cli("merge", work["part-0"], work["part-1"], "-o", merged, "--input", input_file)
    assert result.exit_code == 2
    assert f"{len(left_out)} ids of the input have no row" in result.output
    assert repr(left_out[0]) in result.output
    assert "--allow-missing" in result.output
    assert not merged.exists()

    allowed = cli(
        "merge",
        work["part-0"],
        work["part-1"],
        "-o",
        merged,
        "--input",
        input_file,
        "--allow-missing",
    )
    assert allowed.exit_code == 0, allowed.output
    assert f"missing     {len(left_out)} input ids (--allow-missing): {left_out[0]!r}" in (
        allowed.output
    )
    assert pq.read_metadata(merged).num_rows == SAMPLE_ROWS - len(left_out)


def test_a_missing_shard_is_found_by_row_number_without_input(
    work: dict[str, Path], tmp_path: Path
) -> None:
    first_missing = min(pq.read_table(work["part-2"]).column("row").to_pylist())
    result = cli("merge", work["part-0"], work["part-1"], "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert "row numbers of the input have no row" in result.output
    assert f"row {first_missing}," in result.output


def test_ids_not_in_the_input_are_an_error(work: dict[str, Path], tmp_path: Path) -> None:
    lines = SAMPLE_JSONL.read_bytes().splitlines(keepends=True)
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_bytes(b"".join(lines[1:]))
    result = cli("merge", *parts(work), "-o", tmp_path / "m.parquet", "--input", shorter)
    assert result.exit_code == 2
    assert f"1 ids of the outputs are not in input {shorter}: 'T-000001'" in result.output


def test_id_column_names_the_inputs_id_column(work: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_bytes(SAMPLE_JSONL.read_bytes().replace(b'"id":', b'"ticket_id":'))
    merged = tmp_path / "m.parquet"
    # The job's id_column (`id`) is not in this input: its ids would be row numbers.
    assert cli("merge", *parts(work), "-o", merged, "--input", renamed).exit_code == 2
    result = cli(
        "merge", *parts(work), "-o", merged, "--input", renamed, "--id-column", "ticket_id"
    )
    assert result.exit_code == 0, result.output
    assert "missing     none" in result.output


# ---- schemas and files ------------------------------------------------------------------


def test_different_columns_are_an_error_naming_both_files(
    work: dict[str, Path], tmp_path: Path
) -> None:
    table = pq.read_table(work["part-1"])
    pq.write_table(table.drop_columns(["product"]), work["part-1"])
    result = cli("merge", *parts(work), "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert f"{work['part-0']} and {work['part-1']} have different columns" in result.output
    assert f"`product` only in {work['part-0']}" in result.output

    i = table.schema.get_field_index("prompt_tokens")
    pq.write_table(
        table.set_column(i, "prompt_tokens", table.column(i).cast(pa.float64())), work["part-1"]
    )
    result = cli("merge", *parts(work), "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert "`prompt_tokens` is int64 vs double" in result.output


def test_columns_in_another_order_merge(work: dict[str, Path], tmp_path: Path) -> None:
    table = pq.read_table(work["part-1"])
    pq.write_table(table.select(list(reversed(table.schema.names))), work["part-1"])
    merged = tmp_path / "m.parquet"
    assert cli("merge", *parts(work), "-o", merged).exit_code == 0
    assert pq.read_schema(merged).names == table.schema.names


def test_not_a_batchrun_output(work: dict[str, Path], tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.parquet"
    pq.write_table(pa.table({"id": ["a"]}), stranger)
    result = cli("merge", work["part-0"], stranger, "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert f"{stranger} is not a batchrun output: it has no `row`, `status`, `finished_at`" in (
        result.output
    )
    text = tmp_path / "notes.parquet"
    text.write_text("hello")
    result = cli("merge", text, "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert "is not a readable Parquet file" in result.output
    result = cli("merge", tmp_path / "nowhere.parquet", "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_the_write_is_atomic(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = tmp_path / "merged.parquet"
    assert cli("merge", *parts(work), "-o", merged).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.parquet", "outputs"]
    before = merged.read_bytes()

    # The disk fills while writing: the old file stays whole and no temporary is left.
    real = pq.ParquetWriter.write_table
    calls = []

    def full_disk(self: pq.ParquetWriter, *args: object, **kwargs: object) -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        merge_outputs(parts(work), merged)
    assert calls
    result = cli("merge", *parts(work), "-o", merged)
    assert result.exit_code == 2
    assert f"Cannot write {merged}: No space left on device" in result.output
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    assert merged.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.parquet", "outputs"]


def test_the_output_may_be_one_of_the_files_merged(work: dict[str, Path], tmp_path: Path) -> None:
    """Merge shards 0 and 1, then add shard 2 into the same file."""
    merged = tmp_path / "merged.parquet"
    first = cli("merge", work["part-0"], work["part-1"], "-o", merged, "--allow-missing")
    assert first.exit_code == 0, first.output
    result = cli("merge", merged, work["part-2"], "-o", merged)
    assert result.exit_code == 0, result.output
    assert pq.read_table(merged).column("row").to_pylist() == list(range(SAMPLE_ROWS))


def test_a_missing_output_folder_is_an_error(work: dict[str, Path], tmp_path: Path) -> None:
    result = cli("merge", *parts(work), "-o", tmp_path / "nope" / "m.parquet")
    assert result.exit_code == 2
    assert "mkdir -p" in result.output


def test_merge_raises_input_error_for_the_python_api(work: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="have no row"):
        merge_outputs([work["part-0"]], tmp_path / "m.parquet", input=SAMPLE_JSONL)
    assert list(tmp_path.iterdir()) == [work["part-0"].parent]


def test_a_window_over_2_gib_of_text_is_gathered_in_halves(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of tens of kilobytes could put over 2 GiB of text in one column of a
    window, which one take cannot hold; pretend so, with small files."""
    want = tmp_path / "want.parquet"
    assert cli("merge", *parts(work), "-o", want).exit_code == 0
    real_take = batchrun.rowmerge._take
    sizes = []

    def overflowing(table: pa.Table, indices: object) -> pa.Table:
        sizes.append(len(indices))  # type: ignore[arg-type]
        if len(indices) > 7:  # type: ignore[arg-type]
            raise pa.ArrowCapacityError("array cannot contain more than 2147483646 bytes")
        return real_take(table, indices)  # type: ignore[arg-type]

    monkeypatch.setattr(batchrun.rowmerge, "_take", overflowing)
    merged = tmp_path / "m.parquet"
    assert cli("merge", *parts(work), "-o", merged).exit_code == 0
    monkeypatch.undo()
    assert max(sizes) > 7, "the halving was not exercised"
    assert pq.read_schema(merged).equals(pq.read_schema(want), check_metadata=True)
    assert pq.read_table(merged).equals(pq.read_table(want))


def test_null_ids_are_not_a_batchrun_output(work: dict[str, Path], tmp_path: Path) -> None:
    table = pq.read_table(work["part-1"])
    nullable = pa.schema([f.with_nullable(True) for f in table.schema])
    ids = table.column("id").to_pylist()
    table = table.cast(nullable).set_column(0, "id", pa.array([None, *ids[1:]], pa.string()))
    pq.write_table(table, work["part-1"])
    result = cli("merge", *parts(work), "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert f"{work['part-1']} has rows without `id`" in result.output


# ---- memory: a window at a time --------------------------------------------------------


@pytest.mark.parametrize("prefer_ok", [False, True])
def test_a_small_batch_gives_the_same_file(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefer_ok: bool
) -> None:
    """Files read 7 rows at a time, ids checked in 16 partitions: memory holds a few
    rows per file, and the merged file is the same, row for row and in its metadata."""
    files = [*parts(work), work["full"]] if prefer_ok else parts(work)
    want = merge_outputs(files, tmp_path / "want.parquet", prefer_ok=prefer_ok)
    monkeypatch.setattr(batchrun.idcheck, "PARTITION_IDS", 16)
    got = merge_outputs(files, tmp_path / "got.parquet", prefer_ok=prefer_ok, batch_rows=7)
    assert got.rows == want.rows == SAMPLE_ROWS
    assert (got.ok, got.failed, got.duplicate_ids, got.duplicates_dropped) == (
        want.ok,
        want.failed,
        want.duplicate_ids,
        want.duplicates_dropped,
    )
    assert got.duplicates_dropped == (SAMPLE_ROWS if prefer_ok else 0)
    a, b = pq.ParquetFile(tmp_path / "want.parquet"), pq.ParquetFile(tmp_path / "got.parquet")
    assert a.schema_arrow.equals(b.schema_arrow, check_metadata=True)
    assert a.read().equals(b.read())


def test_the_checks_hold_across_partitions(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the ids spread over 64 partitions of a few ids each, the checks by id
    find what they find in one."""
    monkeypatch.setattr(batchrun.idcheck, "PARTITION_IDS", 8)
    test_a_missing_shard_is_found_by_id(work, tmp_path, SAMPLE_JSONL)
    test_ids_not_in_the_input_are_an_error(work, tmp_path)


def test_one_id_on_two_row_numbers_means_different_inputs(
    work: dict[str, Path], tmp_path: Path
) -> None:
    """Rows 0 and 1 swapped in one run's input: --prefer-ok cannot choose between
    rows of different inputs."""
    moved = Path(shutil.copy(work["full"], tmp_path / "moved.parquet"))
    ids = pq.read_table(moved).column("id").to_pylist()
    rewrite(moved, id=pa.array([ids[1], ids[0], *ids[2:]]))
    result = cli("merge", work["full"], moved, "-o", tmp_path / "m.parquet", "--prefer-ok")
    assert result.exit_code == 2
    assert "2 row numbers belong to more than one id" in result.output
    # The same when no row number is shared: shard 0 on row 0, the moved id on row 1.
    lone = tmp_path / "lone.parquet"
    table = pq.read_table(work["full"])
    pq.write_table(table.slice(0, 1), work["part-0"])
    pq.write_table(table.slice(0, 1).set_column(1, "row", pa.array([1])), lone)
    result = cli("merge", work["part-0"], lone, "-o", tmp_path / "m.parquet", "--allow-missing")
    assert result.exit_code == 2
    assert (
        f"1 ids are on more than one row number: {ids[0]!r} is row 0 in {work['part-0']} "
        f"and row 1 in {lone}"
    ) in result.output
    assert "come from different inputs" in result.output
    assert not (tmp_path / "m.parquet").exists()


def test_a_file_out_of_row_order_is_refused(work: dict[str, Path], tmp_path: Path) -> None:
    table = pq.read_table(work["part-1"])
    pq.write_table(table.take(pa.array(range(table.num_rows - 1, -1, -1))), work["part-1"])
    result = cli("merge", *parts(work), "-o", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert f"{work['part-1']} is not in row order" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
