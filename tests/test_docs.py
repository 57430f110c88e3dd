"""README.md stays true to the code: every job key and run option is documented."""

from __future__ import annotations

import re

from click.testing import CliRunner

from batchrun.cli import main
from batchrun.config import KEYS
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_job_key_is_in_the_key_table_with_its_default() -> None:
    section = README.split("### Job keys", 1)[1].split("\n### ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, flags=re.M))
    for key in KEYS:
        assert key.name in rows, f"README's job-key table lacks `{key.name}`"
        default = rows[key.name].strip()
        if key.default in (None, (), {}):
            assert default in ("—", "empty"), (key.name, default)
        else:
            shown = str(key.default).lower() if isinstance(key.default, bool) else str(key.default)
            assert default == f"`{shown}`", (key.name, default)


def test_every_run_option_is_documented() -> None:
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    keys = {k.flag for k in KEYS} | {k.alias for k in KEYS if k.alias}
    options = set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - keys - {"--help"}
    missing = sorted(o for o in options if o not in README)
    assert not missing, f"README does not mention {missing}"


def test_exit_codes_are_documented() -> None:
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 5 |", "| 130 / 143 |"):
        assert code in README
