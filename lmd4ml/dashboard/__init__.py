"""The live dashboard: ``lmd4ml dashboard RUNS_DIR`` or ``lm.train(..., dashboard=True)``.

- :mod:`~lmd4ml.dashboard.data`: runs in memory, followed live; thinning and smoothing.
- :mod:`~lmd4ml.dashboard.panels`: which panels a run gets, after Cockpit's layout.
- :mod:`~lmd4ml.dashboard.figure`: the plotly figure and the patches that extend it.
- :mod:`~lmd4ml.dashboard.app`: the Dash app and its callbacks (only runs it listed).
- :mod:`~lmd4ml.dashboard.auth`: the token a server asks of every request.
- :mod:`~lmd4ml.dashboard.launch`: starting it in its own process beside training.
- :mod:`~lmd4ml.dashboard.cli`: ``lmd4ml dashboard`` (which :mod:`lmd4ml.cli` hands over).

Only ``app`` and ``figure`` import Dash and plotly (the ``dashboard`` extra).
"""
