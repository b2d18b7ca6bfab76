"""Presenting stored records: leaderboard tables and self-contained HTML reports.

One job per module, and data flows one way (a module imports only modules to its left):
:mod:`.format` (numbers as text) <- :mod:`.plots` (matplotlib figures) <- :mod:`.html`
(templates, writing pages) <- :mod:`.leaderboard` (protocols, aggregation, Pareto ranks) <-
:mod:`.writers` (md / csv / json / html tables) <- :mod:`.report` (run and leaderboard
reports) <- :mod:`.cli` (the ``leaderboard`` and ``report`` sub-commands).  Nothing is
imported here, so ``import cfbench.present`` does not pull in matplotlib.
"""
