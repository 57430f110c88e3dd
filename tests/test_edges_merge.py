"""Merging outputs of different jobs (another model, another prompt) is refused
(exit 2, nothing written) naming the keys that differ, unless --allow-mixed."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchrun.cli import main
from batchrun.errors import InputError
from batchrun.merge import merge_outputs
from tests.conftest import REPO, assert_exit

pytestmark = pytest.mark.timeout(60)

JOB = REPO / "jobs" / "summarize_tickets.toml"


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shard 0/2 of the sample job, shard 1/2 of it, and shard 1/2 of it with
    another model and another prompt."""
    folder = tmp_path_factory.mktemp("shards")
    # The CLI configures the `batchrun` logger; a module fixture runs before the
    # autouse fixture that would restore it, so it restores it itself.
    logger = logging.getLogger("batchrun")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    made = {}
    try:
        for name, extra in [
            ("part-0", ["--shard", "0/2"]),
            ("part-1", ["--shard", "1/2"]),
            (
                "other-1",
                [
                    "--shard",
                    "1/2",
                    "--model",
                    "another/model",
                    "--prompt-template",
                    "Gist: {ticket}",
                ],
            ),
        ]:
            out = folder / f"{name}.parquet"
            assert_exit(cli("run", JOB, "--mock", "-q", "--output", out, *extra), 0)
            made[name] = out
    finally:
        for handler in logger.handlers:
            if handler not in saved[0]:
                handler.close()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    return made


def test_outputs_of_different_jobs_are_not_merged(shards: dict[str, Path], tmp_path: Path) -> None:
    final = tmp_path / "final.parquet"
    result = cli("merge", shards["part-0"], shards["other-1"], "-o", final)
    assert_exit(result, 2)
    assert result.stderr == (
        f"batchrun: The outputs come from different jobs: {shards['other-1']} (`model`, "
        f"`prompt_template`) differs from {shards['part-0']} in the keys named. One merged file "
        "would mix answers to different requests. Merge each job's outputs on their own, or pass "
        "--allow-mixed to merge them anyway.\n"
    )
    assert not final.exists()
    with pytest.raises(InputError, match="come from different jobs"):
        merge_outputs([shards["part-0"], shards["other-1"]], final)


def test_allow_mixed_merges_them_with_a_note(shards: dict[str, Path], tmp_path: Path) -> None:
    final = tmp_path / "final.parquet"
    result = cli("merge", shards["part-0"], shards["other-1"], "-o", final, "--allow-mixed")
    assert_exit(result, 0)
    assert (
        f"note        {shards['other-1']} (`model`, `prompt_template`) differs from the first file"
        in result.stderr
    )
    assert pq.read_table(final).num_rows == 200


def test_shards_of_one_job_merge_as_before(shards: dict[str, Path], tmp_path: Path) -> None:
    final = tmp_path / "final.parquet"
    result = cli("merge", shards["part-0"], shards["part-1"], "-o", final)
    assert_exit(result, 0)
    assert "note" not in result.stderr
    assert pq.read_table(final).num_rows == 200
