"""Collect the A/B runs of ``docs/experiments/runs/<task>/<variant>/s<seed>/`` (written by ``ab_run.py``) into one
summary CSV and one learning-curve PNG per figure (by default one per task, every variant), with the sweep runner's
plotter (mean over seeds and a 95 % bootstrap band)::

    python docs/experiments/collect.py            # every task folder under docs/experiments/runs
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sb3_pompc.sweep.plot import bootstrap_band, plot_sweep

HERE = Path(__file__).parent
#: figures that show some variants of a task: name → (task folder, variants)
FIGURES = {
    "cartpole_balance_10k": ("cartpole_balance_10k", ("pompc", "pompc_tanh", "previous_pompc", "tdmpc2")),
    "cartpole_lambda": ("cartpole_balance_10k",
                        ("pompc_lambda0", "pompc_lambda0.01", "pompc", "pompc_lambdainf", "tdmpc2")),
}


def collect(task_dir: Path, name: str, variants: Optional[Sequence[str]] = None) -> None:
    """Write ``<name>.csv`` (variant, seeds, final mean, 95 % CI, per-seed finals, mean wall time) and ``<name>.png``
    next to this file, from the runs of ``task_dir`` (only ``variants``, if given)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / name  # the plot's title
        flat.mkdir()
        for variant_dir in sorted(p for p in task_dir.iterdir() if p.is_dir()):
            if variants is not None and variant_dir.name not in variants:
                continue
            finals, walls, seeds = [], [], []
            for run in sorted(variant_dir.glob("s*")):
                summary = run / "summary.json"
                if not summary.is_file():
                    continue  # a run still in progress
                info = json.loads(summary.read_text())
                seed = int(info["seed"])
                (run / "settings.json").write_text(json.dumps(
                    dict(env=info["env"], seed=seed, axes=dict(variant=variant_dir.name, seed=seed))))
                (flat / f"{variant_dir.name}_s{seed}").symlink_to(run.resolve())
                finals.append(info["final"]["mean"])
                walls.append(info["final"]["wall_time_s"])
                seeds.append(seed)
            if not finals:
                continue
            mean, low, high = bootstrap_band(np.asarray(finals)[:, None])
            rows.append(dict(variant=variant_dir.name, seeds=" ".join(map(str, seeds)), final_mean=f"{mean[0]:.1f}",
                             ci_low=f"{low[0]:.1f}", ci_high=f"{high[0]:.1f}",
                             per_seed=" ".join(f"{v:.1f}" for v in finals),
                             wall_min=f"{np.mean(walls) / 60:.1f}"))
        if rows:
            plot_sweep(flat, out=HERE / f"{name}.png", summary=HERE / f"{name}_curves.csv")
    with open(HERE / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["variant"])
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(name, row)


if __name__ == "__main__":
    for task in sorted(p for p in (HERE / "runs").iterdir() if p.is_dir()):
        if not any(folder == task.name for folder, _ in FIGURES.values()):
            collect(task, task.name)
    for figure, (folder, names) in FIGURES.items():
        collect(HERE / "runs" / folder, figure, names)
