"""``python -m batchrun``: the same as the ``batchrun`` command."""

from batchrun.cli import main

main()
