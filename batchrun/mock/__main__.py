"""``python -m batchrun.mock``: the same as ``batchrun mock-server`` (flags and all)."""

from batchrun.cli import CONTEXT_SETTINGS, mock_server

mock_server.main(prog_name="python -m batchrun.mock", **CONTEXT_SETTINGS)
