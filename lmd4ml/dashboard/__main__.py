"""``python -m lmd4ml.dashboard RUNS_DIR [--port] [--host] [--token | --no-token]``:
``lmd4ml dashboard`` without the console script (what ``lm.train(dashboard=True)`` runs)."""

import sys

from lmd4ml.dashboard.cli import main

main(["dashboard", *sys.argv[1:]])
