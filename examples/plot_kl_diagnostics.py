"""KL diagnostics of POMPC runs (in the style of the PO-MPC paper's Fig. 6): how far the sampling policy π_s is
from its reference π_ref and from the buffer's planner statistics π^P over training, comparing priors.

Each run folder holds the ``progress.csv`` of SB3's CSV logger (written by examples/train_dmc.py and
examples/compare_family.py). Keys read (logged by ``POMPC._policy_step``, one value per logger dump):

- ``train/kl_mean`` / ``train/kl_std``: KL(π_s ‖ π_ref) over the batch (π_ref = buffer π^P for ``prior="planner"``,
  the learned prior π_p for ``"forward"``/``"reverse"``); the plot shows the mean and the variance (std²);
- ``train/kl_planner_mean`` / ``train/kl_planner_std``: KL(π_s ‖ π^P) to the raw buffer stats, comparable
  across priors;
- ``train/prior_loss`` (learned priors only), ``train/planner_std``, ``train/policy_std``, ``train/kl_coef`` (λ).

SB3's logger writes the value of the *last* update before each dump (one row per episode with
``log_interval=1``), so single rows are noisy: ``--smooth N`` averages N consecutive rows.

Usage::

    python examples/plot_kl_diagnostics.py planner=runs/planner forward=runs/fwd reverse=runs/rev -o kl.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

STEP_KEY = "time/total_timesteps"

# (title, key, transform) of every panel that can be drawn; a panel is drawn if any run logged its key
PANELS: list[tuple[str, str, str]] = [
    ("KL(π_s ‖ π_ref) mean", "train/kl_mean", "identity"),
    ("KL(π_s ‖ π_ref) variance over the batch", "train/kl_std", "square"),
    ("KL(π_s ‖ π^P buffer) mean", "train/kl_planner_mean", "identity"),
    ("KL(π_s ‖ π^P buffer) variance over the batch", "train/kl_planner_std", "square"),
    ("prior loss (KL between π_p and π^P)", "train/prior_loss", "identity"),
    ("λ (kl_coef)", "train/kl_coef", "identity"),
    ("planner std σ^P (buffer batch)", "train/planner_std", "identity"),
    ("π_s std", "train/policy_std", "identity"),
]


def parse_run_arg(item: str) -> tuple[str, Path]:
    """``LABEL=DIR`` or ``DIR`` (label = folder name) → (label, folder)."""
    if "=" in item:
        label, path = item.split("=", 1)
        return label, Path(path)
    return Path(item).name or item, Path(item)


def read_progress(run_dir: Union[str, Path]) -> dict[str, np.ndarray]:
    """``progress.csv`` of a run (or the file itself) → {column: float array}, rows sorted by timestep; rows
    without a timestep are dropped and empty cells are NaN.

    :param run_dir: the run folder or its progress.csv
    """
    import pandas as pd

    path = Path(run_dir)
    if path.is_dir():
        path = path / "progress.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no progress.csv at {path} (train with an SB3 logger that has the 'csv' format)")
    df = pd.read_csv(path)
    if STEP_KEY not in df.columns:
        raise ValueError(f"{path}: no {STEP_KEY} column")
    df = df[df[STEP_KEY].notna()].sort_values(STEP_KEY, kind="stable")
    return {c: pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in df.columns}


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` finite values (NaNs are ignored; the output keeps the length)."""
    if window <= 1:
        return x
    out = np.full_like(x, np.nan)
    finite = np.isfinite(x)
    for i in range(len(x)):
        lo = max(0, i - window + 1)
        seg = x[lo : i + 1][finite[lo : i + 1]]
        if finite[i] and len(seg):
            out[i] = seg.mean()
    return out


def kl_summary(progress: dict[str, np.ndarray], key: str, last_fraction: float = 0.5) -> Optional[float]:
    """Mean of the finite values of ``key`` over the last ``last_fraction`` of the logged rows (None if absent)."""
    if key not in progress:
        return None
    x = progress[key][np.isfinite(progress[key])]
    if not len(x):
        return None
    start = int(np.floor(len(x) * (1.0 - last_fraction)))
    return float(x[min(start, len(x) - 1):].mean())


def plot_kl_diagnostics(
    runs: Sequence[tuple[str, Union[str, Path]]],
    out_png: Union[str, Path],
    smooth_window: int = 5,
    log_y: bool = False,
    title: Optional[str] = None,
) -> list[str]:
    """Draw one panel per diagnostic key that any run logged, one line per run.

    :param runs: (label, run folder or progress.csv) pairs
    :param out_png: the PNG to write
    :param smooth_window: moving-average window in logged rows
    :param log_y: log scale on the KL panels
    :param title: figure title
    :return: the titles of the panels drawn
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("give at least one run")
    data = [(label, read_progress(path)) for label, path in runs]
    panels = [p for p in PANELS if any(p[1] in d and np.isfinite(d[p[1]]).any() for _, d in data)]
    if not panels:
        raise ValueError("none of the runs logged the KL diagnostics (train/kl_mean ...): are they POMPC runs that "
                         "reached learning_starts?")
    ncols = 2 if len(panels) <= 4 else 3 if len(panels) <= 6 else 4
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    colors = {label: cycle[i % len(cycle)] for i, (label, _) in enumerate(data)}  # one colour per run everywhere
    for ax, (panel_title, key, transform) in zip(axes.flat, panels):
        for label, d in data:
            if key not in d:
                continue
            y = d[key] ** 2 if transform == "square" else d[key]
            mask = np.isfinite(y)
            if not mask.any():
                continue
            marker = "o" if mask.sum() < 30 else None  # a single logged row is still visible
            ax.plot(d[STEP_KEY][mask], smooth(y[mask], smooth_window), marker=marker, markersize=3, label=label,
                    color=colors[label])
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("environment steps", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if log_y and key.startswith("train/kl") and key != "train/kl_coef":
            ax.set_yscale("log")
        if key == "train/kl_coef":
            ax.set_title(panel_title + " (λ = ∞ not drawn)", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:  # the first panel may miss a run (prior_loss exists for learned priors only)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle(title or f"KL diagnostics (moving average over {smooth_window} logged rows)", fontsize=10,
                 y=1.0 - 0.01 / nrows)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1.0 - 0.08 / nrows),
               ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.16 / nrows))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return [p[0] for p in panels]


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (or RUN_DIR) holding progress.csv")
    p.add_argument("-o", "--out", default="kl_diagnostics.png", help="PNG to write")
    p.add_argument("--smooth", type=int, default=5, help="moving average over this many logged rows")
    p.add_argument("--logy", action="store_true", help="log scale on the KL panels")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    panels = plot_kl_diagnostics([parse_run_arg(r) for r in args.runs], args.out, args.smooth, args.logy, args.title)
    print(f"wrote {args.out} ({len(panels)} panels)")
    return panels


if __name__ == "__main__":
    main(sys.argv[1:])
