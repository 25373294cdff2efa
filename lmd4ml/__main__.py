"""``python -m lmd4ml ...``: the ``lmd4ml`` command without the console script."""

from lmd4ml.cli import main

main()
