"""The live dashboard: ``lmd4ml dashboard RUNS_DIR`` or ``lm.train(..., dashboard=True)``.

- :mod:`~lmd4ml.dashboard.data`: runs in memory, followed live; thinning and smoothing.
- :mod:`~lmd4ml.dashboard.panels`: which panels a run gets, after Cockpit's layout.
- :mod:`~lmd4ml.dashboard.figure`: the plotly figure and the patches that extend it.
- :mod:`~lmd4ml.dashboard.tables`: the runs table, runs' labels, progress, the long CSV.
- :mod:`~lmd4ml.dashboard.app`: the Dash app and its callbacks (only runs it listed).
- :mod:`~lmd4ml.dashboard.inputs`: every value a callback request carries, checked.
- :mod:`~lmd4ml.dashboard.auth`: the token a server asks of every request.
- :mod:`~lmd4ml.dashboard.launch`: starting it in its own process beside training.
- :mod:`~lmd4ml.dashboard.cli`: the ``lmd4ml dashboard`` command.
- :mod:`~lmd4ml.dashboard.plot`: ``lm.plot``, the figure drawn once for a notebook.

Dash and plotly (the ``dashboard`` extra) are imported by ``app``, and by ``figure`` and
``plot`` only where they draw: ``import lmd4ml`` (which exposes ``lm.plot``) needs neither.
"""
