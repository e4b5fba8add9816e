"""Learning curves of a sweep folder: one line per setting, the mean over seeds and a 95 % bootstrap band.

A setting is a run's axis values without ``seed`` (and without ``env``: every env gets its own panel). Each run
folder holds the ``settings.json``, ``eval.csv`` and ``progress.csv`` written by the runner. Curves of the seeds of
one setting are put on common x values (the union of their x within the range every seed covers, linear
interpolation between a seed's own points; runs of one grid share their evaluation steps, so nothing is
interpolated there). The band is the 2.5 / 97.5 percentile of the mean of 2000 resamples of the seeds (with
replacement, one fixed random stream), drawn curve-wise: a resample picks whole curves.

Published anchor curves (DMControl tasks) are drawn as markers at their real steps when ``sb3_pompc.anchors`` is
installed; other envs get none.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = ["RunCurve", "load_runs", "bootstrap_band", "align_curves", "plot_sweep", "STEP_COLUMN"]

#: x column of ``progress.csv``
STEP_COLUMN = "time/total_timesteps"
N_RESAMPLES = 2000


@dataclass
class RunCurve:
    """One run's curve.

    :param name: the run folder's name
    :param env: the environment id
    :param setting: the axis values except ``seed`` and ``env``
    :param seed: the run's seed
    :param x: env steps, increasing
    :param y: the plotted value per step
    """

    name: str
    env: str
    setting: dict[str, Any]
    seed: int
    x: np.ndarray
    y: np.ndarray


def _read_eval(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from sb3_pompc.callbacks import read_eval_csv

    data = read_eval_csv(path)
    mean = data["mean"] if "mean" in data else data["mean_return"]
    return np.asarray(data["step"], dtype=np.float64), np.asarray(mean, dtype=np.float64)


def _read_progress(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            x, y = row.get(STEP_COLUMN, ""), row.get(metric, "")
            if x not in ("", None) and y not in ("", None):
                xs.append(float(x))
                ys.append(float(y))
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(ys)[order]


def load_runs(folder: Union[str, Path], metric: Optional[str] = None) -> list[RunCurve]:
    """The curves of every run folder under ``folder`` that has a ``settings.json`` and the curve's file.

    :param folder: the sweep's ``--out`` folder
    :param metric: None = evaluation return (``eval.csv``); else a ``progress.csv`` column, e.g. ``train/kl_mean``
    """
    runs = []
    for settings_path in sorted(Path(folder).glob("*/settings.json")):
        run_dir = settings_path.parent
        config = json.loads(settings_path.read_text())
        path = run_dir / ("eval.csv" if metric is None else "progress.csv")
        if not path.is_file():
            continue
        x, y = _read_eval(path) if metric is None else _read_progress(path, metric)
        if len(x) == 0:
            continue
        axes = config.get("axes", {})
        setting = {k: v for k, v in axes.items() if k not in ("seed", "env")}
        runs.append(RunCurve(run_dir.name, config["env"], setting, int(config["seed"]), x, y))
    return runs


def align_curves(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Put curves on common x values: the union of their x inside the range that every curve covers.

    :param curves: ``[(x, y)]`` with increasing x
    :return: ``x`` (m,) and ``Y`` (n_curves, m)
    """
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    xs = np.unique(np.concatenate([x for x, _ in curves]))
    xs = xs[(xs >= lo) & (xs <= hi)]
    return xs, np.stack([np.interp(xs, x, y) for x, y in curves])


def bootstrap_band(values: np.ndarray, n_resamples: int = N_RESAMPLES, level: float = 0.95,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds and a percentile bootstrap band of that mean.

    :param values: (n_seeds, m) one row per seed
    :param n_resamples: bootstrap resamples (each picks n_seeds rows with replacement)
    :param level: coverage of the band
    :param seed: seed of the resampling stream
    :return: mean, low, high, each (m,)
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    means = values[idx].mean(axis=1)  # (n_resamples, m)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return values.mean(axis=0), low, high


def _label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "all runs"


def _sort_key(setting: dict[str, Any]) -> tuple:
    return tuple((0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, math.inf, str(v))
                 for v in setting.values())


def _anchor_functions() -> Optional[tuple[Any, Any]]:
    try:
        from sb3_pompc.anchors import draw_anchor_markers, load_anchor_curves
    except ImportError:
        return None
    return load_anchor_curves, draw_anchor_markers


def plot_sweep(folder: Union[str, Path], out: Optional[Union[str, Path]] = None, metric: Optional[str] = None,
               summary: Optional[Union[str, Path]] = None, log_y: bool = False) -> tuple[Path, Path]:
    """Draw a sweep folder's curves into a PNG and write the final values into a summary CSV.

    :param folder: the sweep's ``--out`` folder
    :param out: the PNG (default ``folder/curves.png``, or ``folder/<metric with / as _>.png``)
    :param metric: None = evaluation return; else a ``progress.csv`` column (x = ``time/total_timesteps``)
    :param summary: the CSV (default: ``out`` with the suffix ``.csv``); columns env, setting, n_seeds,
        final_step, final_mean, ci_low, ci_high (at the last step that every seed of the setting reached)
    :param log_y: a logarithmic y axis (values that are not positive are left out of the drawing, not of the CSV)
    :return: the PNG and the CSV paths
    :raises FileNotFoundError: if no run folder has the curve's file
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    runs = load_runs(folder, metric)
    if not runs:
        what = "eval.csv" if metric is None else f"progress.csv with {metric!r}"
        raise FileNotFoundError(f"{folder}: no run folder with settings.json and {what}")
    stem = "curves" if metric is None else metric.replace("/", "_")
    out = Path(out) if out is not None else folder / f"{stem}.png"
    summary = Path(summary) if summary is not None else out.with_suffix(".csv")

    envs = sorted({r.env for r in runs})
    fig, axes = plt.subplots(1, len(envs), figsize=(6.0 * len(envs), 4.2), squeeze=False)
    anchors = _anchor_functions() if metric is None else None
    rows = []
    for ax, env in zip(axes[0], envs):
        groups: dict[str, list[RunCurve]] = {}
        for r in sorted((r for r in runs if r.env == env), key=lambda r: (_sort_key(r.setting), r.seed)):
            groups.setdefault(_label(r.setting), []).append(r)
        max_step = 0.0
        for label, members in groups.items():
            x, values = align_curves([(r.x, r.y) for r in members])
            if len(x) == 0:
                continue
            mean, low, high = bootstrap_band(values)
            line, = ax.plot(x, mean, marker="." if len(x) <= 50 else None, label=f"{label} (n={len(members)})")
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            max_step = max(max_step, float(x[-1]))
            rows.append(dict(env=env, setting=label, n_seeds=len(members), final_step=int(x[-1]),
                             final_mean=float(mean[-1]), ci_low=float(low[-1]), ci_high=float(high[-1])))
        if anchors is not None:
            curves = anchors[0](env)
            if curves:
                anchors[1](ax, curves, max_step)
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return" if metric is None else metric)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{folder.name}: mean and 95 % bootstrap band over seeds")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    with open(summary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["env", "setting", "n_seeds", "final_step", "final_mean", "ci_low",
                                               "ci_high"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return out, summary
