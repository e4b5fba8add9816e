"""Grids of training runs (settings × seeds × tasks) that scale out through an Optuna storage.

``python -m sb3_pompc.sweep run GRID.yml --storage URL --study NAME --workers K --out DIR`` runs the grid's points
(one Optuna trial per training run, a ``GridSampler`` over the axes); any number of such commands on any number of
machines share one grid through the storage (a journal file on a shared disk, or an RDB URL).
``python -m sb3_pompc.sweep plot DIR`` draws the learning curves (mean and 95 % bootstrap band over seeds).

The runner lives in :mod:`sb3_pompc.sweep.runner`, the plot in :mod:`sb3_pompc.sweep.plot` and the grid files in
:mod:`sb3_pompc.sweep.grid`.
"""

from sb3_pompc.sweep.grid import Grid, GridError, load_grid, parse_grid

__all__ = ["Grid", "GridError", "load_grid", "parse_grid"]
