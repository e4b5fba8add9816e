"""Published learning curves of TD-MPC2 and BMPC on DMControl, shipped with the package, and a way to draw them.

The curves live in ``sb3_pompc/data/anchors/<algo>.csv`` (columns ``task,step,mean,lower,upper,n_seeds``; see the
``README.md`` of that folder for their origin). They are sampled every 100k environment steps with action repeat 2
(one step = one agent decision, 500 per episode): the protocol of the ``dmc/<domain>-<task>-v0`` ids, so their
step axis is ``num_timesteps`` of a run here. They are drawn as markers with error bars at the steps where they
were measured, never as lines joining points 100k steps apart.

Regenerating the tables from the published result files::

    python -m sb3_pompc.anchors --tdmpc2 <tdmpc2 repo>/results/tdmpc2 \\
        --bmpc <bmpc repo>/results/data_dmc_all_1M.json <bmpc repo>/results/data_dmc_hard_4M.json \\
        --out sb3_pompc/data/anchors
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from sb3_pompc.envs import DMC_DOMAIN_ALIASES, DMC_TASKS, dmc_env_id, parse_dmc_id

__all__ = [
    "ANCHOR_ALGOS",
    "ANCHOR_COLUMNS",
    "AnchorCurve",
    "env_to_task",
    "load_anchor_curves",
    "draw_anchor_markers",
    "summarize_tdmpc2_results",
    "summarize_bmpc_results",
]

#: file name (without ``.csv``) → name shown in legends, in drawing order
ANCHOR_ALGOS: dict[str, str] = {"tdmpc2": "TD-MPC2", "bmpc": "BMPC"}
#: columns of the shipped tables
ANCHOR_COLUMNS = ("task", "step", "mean", "lower", "upper", "n_seeds")

_TASK_DOMAIN_NAMES = {real: short for short, real in DMC_DOMAIN_ALIASES.items()}  # ball_in_cup → cup
_STYLES = {"tdmpc2": ("tab:orange", "s"), "bmpc": ("tab:green", "D")}
_BOOTSTRAP_RESAMPLES = 10_000


@dataclass
class AnchorCurve:
    """A published learning curve: the mean evaluation return and an interval per step.

    :param label: legend label, e.g. ``"TD-MPC2 (published, 3 seeds)"``
    :param steps: environment steps, increasing
    :param mean: mean evaluation return per step
    :param lower: lower end of the interval per step
    :param upper: upper end of the interval per step
    :param n_seeds: seeds behind the curve (None when the source does not say)
    :param algo: key of :data:`ANCHOR_ALGOS` (sets the colour and marker)
    """

    label: str
    steps: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    n_seeds: Optional[int] = None
    algo: str = ""

    def clipped(self, max_step: float) -> "AnchorCurve":
        """The points with ``step <= max_step``.

        :param max_step: the last step to keep
        """
        keep = self.steps <= max_step
        return AnchorCurve(self.label, self.steps[keep], self.mean[keep], self.lower[keep], self.upper[keep],
                           self.n_seeds, self.algo)


def env_to_task(env_id: str) -> Optional[str]:
    """Task name of the published results for a DMControl id, None for any other env.

    ``dmc/cartpole-balance-v0`` → ``cartpole-balance``; ``dmc/ball_in_cup-catch-v0`` → ``cup-catch``;
    ``dmc/finger-turn_easy-v0`` → ``finger-turn-easy``; ``Pendulum-v1`` → None.

    :param env_id: the Gymnasium id
    """
    try:
        domain, task = parse_dmc_id(env_id)
    except ValueError:
        return None
    return f"{_TASK_DOMAIN_NAMES.get(domain, domain)}-{task}".replace("_", "-")


def _dmc_task_names() -> set[str]:
    return {name for d, t in DMC_TASKS if (name := env_to_task(dmc_env_id(d, t))) is not None}


def _read_table(algo: str) -> list[dict[str, str]]:
    path = resources.files("sb3_pompc").joinpath("data", "anchors", f"{algo}.csv")
    if not path.is_file():
        return []
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    if rows and tuple(rows[0]) != ANCHOR_COLUMNS:
        raise ValueError(f"{algo}.csv: expected the columns {','.join(ANCHOR_COLUMNS)}, got {list(rows[0])}")
    return rows


def load_anchor_curves(env_id: str) -> list[AnchorCurve]:
    """The published curves (TD-MPC2, then BMPC) of a DMControl task, from the package's data.

    :param env_id: a ``dmc/<domain>-<task>-v0`` id
    :return: one curve per algorithm that has data for the task; ``[]`` for other envs or tasks without data
    """
    task = env_to_task(env_id)
    if task is None:
        return []
    curves = []
    for algo, name in ANCHOR_ALGOS.items():
        rows = [r for r in _read_table(algo) if r["task"] == task]
        if not rows:
            continue
        rows.sort(key=lambda r: int(r["step"]))
        seeds = [int(r["n_seeds"]) for r in rows if r["n_seeds"]]
        n_seeds = max(seeds) if seeds else None
        label = f"{name} (published, {n_seeds} seeds)" if n_seeds else f"{name} (published)"
        col = {c: np.asarray([float(r[c]) for r in rows]) for c in ("mean", "lower", "upper")}
        curves.append(AnchorCurve(label, np.asarray([int(r["step"]) for r in rows], dtype=np.int64), col["mean"],
                                  col["lower"], col["upper"], n_seeds, algo))
    return curves


def draw_anchor_markers(ax: Any, curves: Sequence[AnchorCurve], max_step: float) -> list[str]:
    """Draw published curves on a matplotlib axis: one marker per measured step with an error bar for its
    interval (clipped to DMControl's return range [0, 1000]), no line between points.

    :param ax: the matplotlib ``Axes``
    :param curves: curves from :func:`load_anchor_curves`
    :param max_step: points after this step are left out
    :return: the legend labels drawn (curves without a point up to ``max_step`` are skipped)
    """
    labels = []
    for i, curve in enumerate(curves):
        c = curve.clipped(max_step)
        if not len(c.steps):
            continue
        color, marker = _STYLES.get(c.algo, (f"C{(i + 2) % 10}", "o"))
        lower = np.clip(c.lower, 0.0, 1000.0)
        upper = np.clip(c.upper, 0.0, 1000.0)
        yerr = np.stack([np.maximum(c.mean - lower, 0.0), np.maximum(upper - c.mean, 0.0)])
        ax.errorbar(c.steps, c.mean, yerr=yerr, fmt=marker, linestyle="none", color=color, markersize=6,
                    capsize=4, elinewidth=1.2, label=c.label, zorder=3)
        labels.append(c.label)
    return labels


# ----------------------------------------------------------------------------------------- building the tables
def _bootstrap_interval(values: np.ndarray, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    if len(values) < 2:
        return float(values[0]), float(values[0])
    idx = rng.integers(0, len(values), size=(_BOOTSTRAP_RESAMPLES, len(values)))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize_tdmpc2_results(results_dir: Union[str, Path], tasks: Optional[set[str]] = None) -> list[dict[str, Any]]:
    """Rows of the TD-MPC2 table from its per-seed result files ``<task>.csv`` (columns ``step,reward,seed``):
    per task and step the mean over seeds, a 95 % percentile-bootstrap interval of that mean (10 000 resamples,
    generator seeded with 0 for each task) and the number of seeds.

    :param results_dir: folder of the per-task files
    :param tasks: task names to keep (default: the dm_control suite tasks)
    :return: rows with the keys of :data:`ANCHOR_COLUMNS`, sorted by task and step
    """
    tasks = _dmc_task_names() if tasks is None else tasks
    rows = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        if path.stem not in tasks:
            continue
        data = np.atleast_1d(np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64))
        missing = {"step", "reward", "seed"} - set(data.dtype.names or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        rng = np.random.default_rng(0)
        for step in np.unique(data["step"]):
            rewards = data["reward"][data["step"] == step]
            lo, hi = _bootstrap_interval(rewards, rng)
            rows.append(dict(task=path.stem, step=int(step), mean=float(rewards.mean()), lower=lo, upper=hi,
                             n_seeds=len(np.unique(data["seed"][data["step"] == step]))))
    return rows


def summarize_bmpc_results(json_files: Sequence[Union[str, Path]], algo: str = "BMPC",
                           tasks: Optional[set[str]] = None) -> list[dict[str, Any]]:
    """Rows of the BMPC table from its result files ``{algo: {task: {steps, values, lcbs, ucbs}}}`` (mean and
    confidence band over seeds; the number of seeds is not in the files). A later file wins for a task that two
    files hold (the 4M-step file extends the 1M-step one).

    :param json_files: the result files
    :param algo: the algorithm entry to read
    :param tasks: task names to keep (default: the dm_control suite tasks)
    :return: rows with the keys of :data:`ANCHOR_COLUMNS`, sorted by task and step
    """
    tasks = _dmc_task_names() if tasks is None else tasks
    entries: dict[str, dict[str, Any]] = {}
    for path in json_files:
        with open(path) as f:
            entries.update({t: e for t, e in json.load(f).get(algo, {}).items() if t in tasks})
    rows = []
    for task in sorted(entries):
        e = entries[task]
        columns = [np.asarray(e[k], dtype=np.float64) for k in ("steps", "values", "lcbs", "ucbs")]
        if len({len(c) for c in columns}) != 1:
            raise ValueError(f"{algo}/{task}: arrays of different lengths")
        for step, mean, lo, hi in sorted(zip(*columns)):
            rows.append(dict(task=task, step=int(step), mean=mean, lower=lo, upper=hi, n_seeds=""))
    return rows


def write_anchor_table(rows: Sequence[dict[str, Any]], path: Union[str, Path]) -> None:
    """Write rows as a table with the columns of :data:`ANCHOR_COLUMNS` (returns rounded to 0.01).

    :param rows: rows from :func:`summarize_tdmpc2_results` or :func:`summarize_bmpc_results`
    :param path: the CSV file to write
    """
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(ANCHOR_COLUMNS)
        for r in sorted(rows, key=lambda r: (r["task"], r["step"])):
            writer.writerow([r["task"], r["step"], *(f"{r[k]:.2f}" for k in ("mean", "lower", "upper")),
                             r["n_seeds"]])


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m sb3_pompc.anchors``: rebuild the shipped tables from the published result files."""
    p = argparse.ArgumentParser(prog="python -m sb3_pompc.anchors", description=main.__doc__)
    p.add_argument("--tdmpc2", required=True, help="folder of TD-MPC2's per-task result files (step,reward,seed)")
    p.add_argument("--bmpc", required=True, nargs="+", help="BMPC's DMControl result files (json)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tdmpc2", summarize_tdmpc2_results(args.tdmpc2)), ("bmpc", summarize_bmpc_results(args.bmpc))):
        write_anchor_table(rows, out / f"{name}.csv")
        print(f"{out / f'{name}.csv'}: {len(rows)} rows, {len({r['task'] for r in rows})} tasks")


if __name__ == "__main__":
    main()
