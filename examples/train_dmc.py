"""Train POMPC on a DMControl task and plot its learning curve against the published TD-MPC2 and BMPC curves.

Examples::

    # the paper's POMPC on cartpole-balance with the CPU-friendly sizes, 30k steps, eval every 5k
    python examples/train_dmc.py --env dmc/cartpole-balance-v0 --steps 30000 --cpu --out runs/cartpole
    # TD-MPC2 / BMPC special cases, a different prior, a learned λ
    python examples/train_dmc.py --preset tdmpc2 --cpu --out runs/tdmpc2
    python examples/train_dmc.py --prior forward --kl-coef auto --cpu --out runs/fwd_auto
    # any other POMPC keyword argument
    python examples/train_dmc.py --env Pendulum-v1 --steps 2000 --set num_samples=64 --set horizon=5

Writes into ``--out``: ``eval.csv`` (step,mean_return,std_return,wall_time_s), ``curve.png`` (our curve and the
published anchors), ``progress.csv`` (SB3 logger: ``train/kl_mean`` etc., read by plot_kl_diagnostics.py),
``config.json``, ``summary.json`` and ``model.zip``.

The published anchors (``/work/shared/anchors``, see its README) are sampled every 100k environment steps: a short
run shows only their step-0 and 100k points. They use DMControl with action repeat 2 and 500 decisions per
episode (the protocol of the ``dmc/<domain>-<task>-v0`` ids), so their step axis matches ``num_timesteps`` here.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

# CPU-friendly sizes (docs/presets.md), the settings of the measured 30k-step cartpole-balance run in the closing
# notes: the 1M-parameter model (model_size=1), 64 MPPI samples (8 elites, 4 policy trajectories) x 3 iterations,
# batch 64, no lazy reanalyze, a 500-update pretraining burst. learning_starts stays "auto" (TD-MPC2's 2500 on DMC).
CPU_PRESET: dict[str, Any] = dict(
    model_size=1,
    num_samples=64,
    num_elites=8,
    num_pi_trajs=4,
    iterations=3,
    batch_size=64,
    reanalyze_interval=0,
    pretrain_updates=500,
)

# DMControl domain names as the published result files spell them
_DOMAIN_ALIASES = {"ball_in_cup": "cup"}

ANCHOR_STEP = 100_000  # the published curves are sampled every 100k steps


# ----------------------------------------------------------------------------------------------------- anchors
@dataclass
class AnchorCurve:
    """A published learning curve: mean return and a band per step.

    :param label: legend label
    :param steps: environment steps, increasing
    :param mean: mean evaluation return per step
    :param lower: lower edge of the band
    :param upper: upper edge of the band
    :param n_seeds: seeds averaged (None when the source gives only the band)
    """

    label: str
    steps: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    n_seeds: Optional[int] = None

    def clipped(self, max_step: float) -> "AnchorCurve":
        """The points with ``step <= max_step``."""
        keep = self.steps <= max_step
        return AnchorCurve(self.label, self.steps[keep], self.mean[keep], self.lower[keep], self.upper[keep],
                           self.n_seeds)


def env_to_task(env_id: str) -> Optional[str]:
    """Task name of the published results for a ``dmc/<domain>-<task>-v0`` id (None for other envs).

    ``dmc/cartpole-balance-v0`` → ``cartpole-balance``; ``dmc/ball_in_cup-catch-v0`` → ``cup-catch``;
    ``dmc/finger-turn_easy-v0`` → ``finger-turn-easy``.

    :param env_id: the Gymnasium id
    """
    match = re.fullmatch(r"dmc/([A-Za-z0-9_]+)-([A-Za-z0-9_]+)-v\d+", env_id)
    if match is None:
        return None
    domain, task = match.groups()
    domain = _DOMAIN_ALIASES.get(domain, domain)
    return f"{domain}-{task}".replace("_", "-")


def default_anchors_dir() -> Optional[Path]:
    """``<repo>/../shared/anchors`` if it exists, else None."""
    path = (REPO_ROOT.parent / "shared" / "anchors").resolve()
    return path if path.is_dir() else None


def load_tdmpc2_curve(anchors_dir: Union[str, Path], task: str, algo: str = "tdmpc2") -> Optional[AnchorCurve]:
    """Published curve from ``tdmpc2/<algo>/<task>.csv`` (columns step,reward,seed; one row per step and seed):
    the mean over seeds and a band of ± one standard deviation over seeds.

    :param anchors_dir: the anchors folder
    :param task: task name as the result files spell it (``cartpole-balance``)
    :param algo: ``tdmpc2``, ``sac`` or ``dreamerv3``
    :return: the curve, or None if the file does not exist
    """
    path = Path(anchors_dir) / "tdmpc2" / algo / f"{task}.csv"
    if not path.is_file():
        return None
    data = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
    data = np.atleast_1d(data)
    missing = {"step", "reward", "seed"} - set(data.dtype.names or ())
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    steps = np.unique(data["step"])
    mean, lower, upper = [], [], []
    n_seeds = len(np.unique(data["seed"]))
    for s in steps:
        r = data["reward"][data["step"] == s]
        m = float(r.mean())
        half = float(r.std(ddof=1)) if len(r) > 1 else 0.0
        mean.append(m)
        lower.append(m - half)
        upper.append(m + half)
    label = {"tdmpc2": "TD-MPC2", "sac": "SAC", "dreamerv3": "DreamerV3"}.get(algo, algo)
    return AnchorCurve(f"{label} (published, mean ± std over {n_seeds} seeds)", steps.astype(np.int64),
                       np.asarray(mean), np.asarray(lower), np.asarray(upper), n_seeds)


def load_bmpc_curve(
    anchors_dir: Union[str, Path], task: str, algo: str = "BMPC", file: str = "data_dmc_all_1M.json"
) -> Optional[AnchorCurve]:
    """Published curve from ``bmpc/<file>`` = ``{algo: {task: {steps, values, ucbs, lcbs}}}``.

    :param anchors_dir: the anchors folder
    :param task: task name (``cartpole-balance``)
    :param algo: ``BMPC``, ``tdmpc2``, ``sac`` or ``dreamerv3``
    :param file: ``data_dmc_all_1M.json``, ``data_dmc_hard_4M.json`` or ``data_humanoidbench_2M.json``
    :return: the curve, or None if the file, the algorithm or the task is missing
    """
    path = Path(anchors_dir) / "bmpc" / file
    if not path.is_file():
        return None
    with open(path) as f:
        data = json.load(f)
    entry = data.get(algo, {}).get(task)
    if entry is None:
        return None
    steps = np.asarray(entry["steps"], dtype=np.float64)
    values = np.asarray(entry["values"], dtype=np.float64)
    lcbs = np.asarray(entry.get("lcbs", values), dtype=np.float64)
    ucbs = np.asarray(entry.get("ucbs", values), dtype=np.float64)
    if not (len(steps) == len(values) == len(lcbs) == len(ucbs)):
        raise ValueError(f"{path}: {algo}/{task} has arrays of different lengths")
    order = np.argsort(steps, kind="stable")
    label = "BMPC" if algo == "BMPC" else algo
    return AnchorCurve(f"{label} (published, mean and conf. band)", steps[order].astype(np.int64), values[order],
                       lcbs[order], ucbs[order])


def load_anchor_curves(anchors_dir: Optional[Union[str, Path]], task: Optional[str]) -> list[AnchorCurve]:
    """TD-MPC2 (from the TD-MPC2 csv) and BMPC (from the BMPC json) curves of ``task`` that exist."""
    if anchors_dir is None or task is None or not Path(anchors_dir).is_dir():
        return []
    curves = [load_tdmpc2_curve(anchors_dir, task), load_bmpc_curve(anchors_dir, task)]
    return [c for c in curves if c is not None]


# ----------------------------------------------------------------------------------------------------- plot
def plot_curve(
    eval_csv: Union[str, Path],
    out_png: Union[str, Path],
    task: Optional[str] = None,
    anchors_dir: Optional[Union[str, Path]] = None,
    label: str = "POMPC (ours)",
    title: Optional[str] = None,
) -> list[str]:
    """Plot our eval curve (mean ± std over eval episodes) and the published anchors of ``task`` up to
    ``max(our last step, 100k)``.

    :param eval_csv: ``eval.csv`` of :class:`~sb3_pompc.callbacks.EvalCurveCallback`
    :param out_png: the PNG to write
    :param task: published task name (None = no anchors)
    :param anchors_dir: the anchors folder (None or missing = no anchors)
    :param label: legend label of our curve
    :param title: plot title (default: the task)
    :return: the legend labels drawn, ours first
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sb3_pompc.callbacks import read_eval_csv

    ours = read_eval_csv(eval_csv)
    max_step = max(float(ours["step"].max()) if len(ours["step"]) else 0.0, float(ANCHOR_STEP))
    anchors = [c.clipped(max_step) for c in load_anchor_curves(anchors_dir, task)]
    anchors = [c for c in anchors if len(c.steps)]
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    labels = []
    for curve, color in zip(anchors, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
        lo, hi = np.clip(curve.lower, 0.0, 1000.0), np.clip(curve.upper, 0.0, 1000.0)  # DMC returns are in [0, 1000]
        ax.plot(curve.steps, curve.mean, "o--", color=color, label=curve.label + ", points every 100k steps")
        ax.fill_between(curve.steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        labels.append(curve.label)
    ax.plot(ours["step"], ours["mean_return"], "o-", color="tab:blue", label=f"{label} (± std over eval episodes)")
    ax.fill_between(ours["step"], ours["mean_return"] - ours["std_return"], ours["mean_return"] + ours["std_return"],
                    color="tab:blue", alpha=0.2, linewidth=0)
    labels.insert(0, label)
    ax.set_xlim(0, max_step * 1.02)
    if task is not None:  # DMControl returns lie in [0, 1000]
        ax.set_ylim(0, 1050)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("eval episode return")
    if title is None:
        title = task or "learning curve"
    if anchors:
        title += "\n(published anchors are sampled every 100k steps: a short run shows their 0 and 100k points)"
    elif task is None:
        title += "\n(no published anchors for this environment)"
    else:
        title += f"\n(published anchors not found for {task!r}: our curve only)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return labels


# ----------------------------------------------------------------------------------------------------- training
def parse_value(text: str) -> Any:
    """``--set`` values: Python literals (``3``, ``0.5``, ``None``, ``True``, ``inf`` as a float) or strings."""
    if text in ("inf", "+inf", "infinity"):
        return float("inf")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_kl_coef_arg(text: Optional[str]) -> Union[float, str, None]:
    """``--kl-coef``: a float, ``inf``, ``auto`` or ``auto_<init>`` (None = the preset's)."""
    if text is None:
        return None
    if text.startswith("auto"):
        return text
    return float(text)


def build_model_kwargs(
    preset: str = "pompc",
    kl_coef: Union[float, str, None] = None,
    prior: Optional[str] = None,
    cpu: bool = False,
    seed: int = 0,
    device: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The POMPC keyword arguments of a run: preset, λ, prior, the CPU sizes if asked, then ``overrides``.

    :param preset: "pompc", "tdmpc2" or "bmpc"
    :param kl_coef: λ (None = the preset's)
    :param prior: π_ref (None = the preset's)
    :param cpu: use :data:`CPU_PRESET` (and device "cpu" unless ``device`` is given)
    :param seed: random seed
    :param device: torch device (None = "cpu" with ``cpu``, else "auto")
    :param overrides: any other POMPC keyword arguments (win over everything above)
    """
    kwargs: dict[str, Any] = dict(preset=preset, seed=seed)
    if kl_coef is not None:
        kwargs["kl_coef"] = kl_coef
    if prior is not None:
        kwargs["prior"] = prior
    if cpu:
        kwargs.update(CPU_PRESET)
    kwargs["device"] = device if device is not None else ("cpu" if cpu else "auto")
    kwargs.update(overrides or {})
    return kwargs


def make_env(env_id: str, seed: int):
    """A 1-env ``DummyVecEnv`` with ``Monitor``, seeded (importing sb3_pompc registers the ``dmc/`` ids)."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

    import sb3_pompc  # noqa: F401  (registers dmc/<domain>-<task>-v0)

    def wrapper(env: gym.Env) -> gym.Env:
        if isinstance(env.observation_space, gym.spaces.Dict):
            env = gym.wrappers.FlattenObservation(env)
        return env

    return make_vec_env(env_id, n_envs=1, seed=seed, wrapper_class=wrapper)


def train(
    env_id: str,
    steps: int,
    out: Union[str, Path],
    model_kwargs: dict[str, Any],
    eval_freq: int = 5000,
    eval_episodes: int = 10,
    eval_at_start: bool = True,
    anchors_dir: Optional[Union[str, Path]] = None,
    label: Optional[str] = None,
    verbose: int = 1,
    log_formats: Sequence[str] = ("csv",),
) -> dict[str, Any]:
    """Train one run and write eval.csv, curve.png, progress.csv, config.json, summary.json and model.zip.

    :param env_id: Gymnasium id
    :param steps: environment steps
    :param out: output folder
    :param model_kwargs: POMPC keyword arguments (see :func:`build_model_kwargs`)
    :param eval_freq: evaluate every this many steps
    :param eval_episodes: episodes per evaluation
    :param eval_at_start: evaluate at step 0 too
    :param anchors_dir: published curves (None = no anchors)
    :param label: legend label of the curve
    :param verbose: 1 prints evaluations and the summary
    :param log_formats: SB3 logger outputs ("csv" is needed by plot_kl_diagnostics.py; "stdout", "tensorboard")
    :return: the summary (final eval return, wall times, paths)
    """
    from stable_baselines3.common.logger import configure

    from sb3_pompc import POMPC
    from sb3_pompc.callbacks import EvalCurveCallback

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(model_kwargs.get("seed", 0))
    env = make_env(env_id, seed)
    eval_env = make_env(env_id, seed + 10_000)
    with open(out / "config.json", "w") as f:
        json.dump(dict(env=env_id, steps=steps, eval_freq=eval_freq, eval_episodes=eval_episodes,
                       model_kwargs={k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in model_kwargs.items()}), f, indent=2)
    t0 = time.perf_counter()
    model = POMPC("MlpPolicy", env, **model_kwargs)
    model.set_logger(configure(str(out), list(log_formats)))
    callback = EvalCurveCallback(eval_env, eval_freq=eval_freq, n_eval_episodes=eval_episodes,
                                 log_path=out / "eval.csv", deterministic=True, eval_seed=seed + 10_000,
                                 eval_at_start=eval_at_start, eval_at_end=True, verbose=verbose)
    model.learn(steps, callback=callback, log_interval=1)
    total_s = time.perf_counter() - t0
    train_s = total_s - callback.eval_time_s
    model.save(out / "model.zip")
    task = env_to_task(env_id)
    if label is None:
        label = f"ours: preset={model.preset}, λ={model.kl_coef}, prior={model.prior}"
    labels = plot_curve(out / "eval.csv", out / "curve.png", task, anchors_dir, label=label,
                        title=f"{task or env_id}: {steps} steps, seed {seed}")
    final_mean, final_std = callback.rows[-1][1], callback.rows[-1][2]
    summary = dict(
        env=env_id, task=task, steps=int(model.num_timesteps), final_mean_return=final_mean,
        final_std_return=final_std, wall_time_s=total_s, train_time_s=train_s, eval_time_s=callback.eval_time_s,
        train_s_per_1k_steps=1000.0 * train_s / max(1, model.num_timesteps), anchors=labels[1:],
        preset=model.preset, kl_coef=str(model.kl_coef), prior=model.prior,
    )
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    if verbose:
        print(f"final eval return {final_mean:.1f} ± {final_std:.1f} ({eval_episodes} episodes) at step "
              f"{model.num_timesteps}")
        print(f"wall time {total_s:.1f} s (training {train_s:.1f} s = {summary['train_s_per_1k_steps']:.1f} s per 1k "
              f"steps, evaluation {callback.eval_time_s:.1f} s)")
        if not labels[1:]:
            print("published anchors: none plotted" + (f" (none found for task {task!r})" if task else
                                                      " (not a dmc/ task)"))
        print(f"wrote {out / 'eval.csv'}, {out / 'curve.png'}, {out / 'progress.csv'}, {out / 'model.zip'}")
    env.close()
    eval_env.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="dmc/cartpole-balance-v0", help="Gymnasium id (dmc/<domain>-<task>-v0)")
    p.add_argument("--steps", type=int, default=30_000, help="environment steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="pompc", choices=["pompc", "tdmpc2", "bmpc"])
    p.add_argument("--kl-coef", default=None, help="λ: float, inf, auto or auto_<init> (default: the preset's)")
    p.add_argument("--prior", default=None, choices=["planner", "forward", "reverse"],
                   help="π_ref (default: the preset's)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU-friendly sizes: " + ", ".join(f"{k}={v}" for k, v in CPU_PRESET.items()))
    p.add_argument("--device", default=None, help="torch device (default: cpu with --cpu, else auto)")
    p.add_argument("--eval-freq", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--no-eval-at-start", action="store_true", help="skip the step-0 evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--out", default=None, help="output folder (default runs/<task>_<preset>_s<seed>)")
    p.add_argument("--anchors", default=None,
                   help="published curves folder (default ../shared/anchors relative to the repo, if it exists)")
    p.add_argument("--label", default=None, help="legend label of our curve")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other POMPC keyword argument, e.g. --set num_samples=64 (repeatable)")
    p.add_argument("--log-stdout", action="store_true", help="also print the SB3 log tables")
    p.add_argument("--tensorboard", action="store_true", help="also write tensorboard logs into --out")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["num_samples=64", "kl_warmup=100"]`` → ``{"num_samples": 64, "kl_warmup": 100}``."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip().replace("-", "_")] = parse_value(value.strip())
    return overrides


def resolve_anchors(arg: Optional[str]) -> Optional[Path]:
    """``--anchors`` value, or the default folder; None (with a message) when it does not exist."""
    path = Path(arg) if arg else default_anchors_dir()
    if path is None or not path.is_dir():
        print(f"published anchors not found ({arg or '../shared/anchors'}): plotting our curve only")
        return None
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    model_kwargs = build_model_kwargs(args.preset, parse_kl_coef_arg(args.kl_coef), args.prior, args.cpu, args.seed,
                                      args.device, parse_overrides(args.set))
    task = env_to_task(args.env)
    out = args.out or str(REPO_ROOT / "runs" / f"{task or args.env.replace('/', '_')}_{args.preset}_s{args.seed}")
    formats = ["csv"] + (["stdout"] if args.log_stdout else []) + (["tensorboard"] if args.tensorboard else [])
    return train(args.env, args.steps, out, model_kwargs, args.eval_freq, args.eval_episodes,
                 not args.no_eval_at_start, resolve_anchors(args.anchors), args.label, 0 if args.quiet else 1,
                 formats)


if __name__ == "__main__":
    main(sys.argv[1:])
