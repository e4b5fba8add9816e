"""The training job: train POMPC on one task, evaluate it on a schedule and plot its learning curve next to the
published TD-MPC2 and BMPC curves of the same task.

Examples::

    # PO-MPC on cartpole-balance with the CPU-sized settings, 30k steps (3 evaluation episodes every 5k steps)
    python -m sb3_pompc.train --env dmc/cartpole-balance-v0 --cpu --steps 30000 --out runs/cartpole
    # the same through the console script; the TD-MPC2 / BMPC special cases, another prior, a learned λ
    sb3-pompc-train --preset tdmpc2 --cpu --out runs/tdmpc2
    sb3-pompc-train --prior forward --kl-coef auto --cpu --out runs/fwd_auto
    # any other POMPC keyword argument
    sb3-pompc-train --env Pendulum-v1 --steps 2000 --set learning_starts=500 --set num_samples=64

The job prints its plan first (task, preset, steps, warm-up, evaluation schedule and its estimated cost, output
folder), warns when ``--steps`` does not exceed the warm-up (the model would never be updated), and shows a
progress bar with an ETA for training and for each evaluation.

Writes into ``--out``: ``eval.csv`` (``step,mean,std,wall_time_s``), ``curve.png`` (our curve and the published
curves as markers at their steps, 100k apart), ``progress.csv`` (SB3 logger: ``train/kl_mean`` etc.),
``config.json``, ``summary.json`` and ``model.zip``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from sb3_pompc.anchors import draw_anchor_markers, env_to_task, load_anchor_curves
from sb3_pompc.cli import parse_overrides
from sb3_pompc.presets import CPU_SETTINGS

__all__ = ["build_model_kwargs", "eval_schedule", "make_env", "plot_curve", "train", "main"]

#: evaluation episodes per evaluation: with ``--cpu`` / without
CPU_EVAL_EPISODES, EVAL_EPISODES = 3, 10
ANCHOR_STEP = 100_000  # the published curves are sampled every 100k steps


def parse_kl_coef_arg(text: Optional[str]) -> Union[float, str, None]:
    """``--kl-coef``: a float, ``inf``, ``auto`` or ``auto_<init>`` (None = the preset's).

    :param text: the argument
    """
    if text is None:
        return None
    return text if text.startswith("auto") else float(text)


def build_model_kwargs(
    preset: str = "pompc",
    kl_coef: Union[float, str, None] = None,
    prior: Optional[str] = None,
    cpu: bool = False,
    seed: int = 0,
    device: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The POMPC keyword arguments of a run: preset, λ, prior, the CPU-sized settings if asked, then ``overrides``.

    :param preset: "pompc", "tdmpc2" or "bmpc"
    :param kl_coef: λ (None = the preset's)
    :param prior: π_ref (None = the preset's)
    :param cpu: use :data:`sb3_pompc.presets.CPU_SETTINGS` (and device "cpu" unless ``device`` is given)
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
        kwargs.update(CPU_SETTINGS)
    kwargs["device"] = device if device is not None else ("cpu" if cpu else "auto")
    kwargs.update(overrides or {})
    return kwargs


def make_env(env_id: str, seed: int) -> Any:
    """A 1-env ``DummyVecEnv`` with ``Monitor``, seeded; Dict observations are flattened.

    :param env_id: Gymnasium id (importing sb3_pompc registers the ``dmc/`` ids)
    :param seed: the env's seed
    """
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

    def wrapper(env: gym.Env) -> gym.Env:
        if isinstance(env.observation_space, gym.spaces.Dict):
            env = gym.wrappers.FlattenObservation(env)
        return env

    return make_vec_env(env_id, n_envs=1, seed=seed, wrapper_class=wrapper)


def eval_schedule(steps: int, eval_freq: int, eval_at_start: bool) -> list[int]:
    """The steps at which :class:`~sb3_pompc.callbacks.EvalCurveCallback` evaluates a run of ``steps`` steps (one
    training env): step 0 if asked, every multiple of ``eval_freq``, and the last step.

    :param steps: environment steps of the run
    :param eval_freq: evaluation period in steps
    :param eval_at_start: evaluate at step 0 too
    """
    points = ([0] if eval_at_start else []) + list(range(eval_freq, steps + 1, eval_freq))
    if not points or points[-1] != steps:
        points.append(steps)
    return points


def measure_plan_seconds(model: Any, repeats: int = 3) -> float:
    """Seconds per deterministic plan of one observation (what one evaluation step costs), measured in a forked RNG
    so that the training run is unchanged.

    :param model: a POMPC model
    :param repeats: timed plans after one untimed one
    """
    import torch

    obs = np.zeros(model.observation_space.shape, dtype=np.float32)
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.predict(obs, deterministic=True)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.predict(obs, deterministic=True)
    return (time.perf_counter() - t0) / repeats


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe_plan(model: Any, env_id: str, length: Optional[int], steps: int, out: Path, eval_freq: int,
                  eval_episodes: int, eval_at_start: bool, cpu: bool) -> list[str]:
    """The lines printed before training: what the job will do and what evaluating will cost.

    :param model: the POMPC model about to train
    :param env_id: the task
    :param length: steps per evaluation episode (None: unknown)
    :param steps: environment steps
    :param out: output folder
    :param eval_freq: evaluation period
    :param eval_episodes: episodes per evaluation
    :param eval_at_start: evaluate at step 0 too
    :param cpu: the CPU-sized settings are used
    """
    warmup = int(model.learning_starts)
    planned = max(0, steps - warmup)
    lines = [
        f"  agent:      POMPC preset={model.preset} (λ={model.kl_coef}, prior={model.prior}), "
        f"{'CPU-sized settings, ' if cpu else ''}device={model.device}, seed={model.seed}",
        f"  training:   {steps:,} steps = {min(steps, warmup):,} warm-up steps with random actions "
        f"(learning_starts={warmup})" + (f", a burst of {model.pretrain_updates} updates, then {planned:,} planned "
                                         f"steps with {_count(model.gradient_steps, 'update')} each" if planned else ""),
    ]
    points = eval_schedule(steps, eval_freq, eval_at_start)
    cost = f"{_count(len(points), 'evaluation')} x {_count(eval_episodes, 'episode')}"
    if length:
        plans = len(points) * eval_episodes * int(length)
        cost += f" x {length} steps = {plans:,} planned steps"
        if not model.policy.compile:
            per_plan = measure_plan_seconds(model)
            cost += f", about {_minutes(plans * per_plan)} ({1000 * per_plan:.0f} ms per plan, measured now)"
    shown = ", ".join(f"{p:,}" for p in points[:4]) + (f", ..., {points[-1]:,}" if len(points) > 4 else "")
    lines.append(f"  evaluation: at steps {shown}: {cost}")
    anchors = load_anchor_curves(env_id)
    lines.append("  published:  " + (", ".join(c.label for c in anchors) + " (markers every 100k steps)" if anchors
                                     else "no published curves for this environment"))
    lines.append(f"  output:     {out} (eval.csv, curve.png, progress.csv, summary.json, model.zip)")
    return lines


def warmup_warning(steps: int, learning_starts: int) -> Optional[str]:
    """The warning for a run that ends inside the warm-up, None otherwise.

    :param steps: environment steps
    :param learning_starts: the model's warm-up steps
    """
    if steps > learning_starts:
        return None
    return (f"WARNING: --steps {steps} does not exceed the warm-up (learning_starts={learning_starts}): the agent only "
            f"takes random actions and the model is never updated. Train for more than {learning_starts} steps, "
            "or shorten the warm-up with --set learning_starts=N.")


def plot_curve(
    eval_csv: Union[str, Path],
    out_png: Union[str, Path],
    env_id: Optional[str] = None,
    label: str = "POMPC (ours)",
    title: Optional[str] = None,
    anchors: bool = True,
) -> list[str]:
    """Plot our eval curve (mean ± std over evaluation episodes) and, as markers, the published curves of the task
    up to ``max(our last step, 100k)``.

    :param eval_csv: ``eval.csv`` of :class:`~sb3_pompc.callbacks.EvalCurveCallback`
    :param out_png: the PNG to write
    :param env_id: the Gymnasium id (its published curves are drawn when it has some)
    :param label: legend label of our curve
    :param title: plot title (default: the task)
    :param anchors: draw the published curves
    :return: the legend labels drawn, ours first
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sb3_pompc.callbacks import read_eval_csv

    ours = read_eval_csv(eval_csv)
    task = env_to_task(env_id) if env_id else None
    max_step = max(float(ours["step"].max()) if len(ours["step"]) else 0.0, float(ANCHOR_STEP))
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    ax.plot(ours["step"], ours["mean"], "o-", color="tab:blue", label=f"{label} (± std over eval episodes)")
    ax.fill_between(ours["step"], ours["mean"] - ours["std"], ours["mean"] + ours["std"], color="tab:blue",
                    alpha=0.2, linewidth=0)
    labels = [label] + (draw_anchor_markers(ax, load_anchor_curves(env_id), max_step) if anchors and env_id else [])
    ax.set_xlim(-0.02 * max_step, max_step * 1.04)
    if task is not None:  # DMControl returns lie in [0, 1000]
        ax.set_ylim(0, 1050)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("eval episode return")
    title = title or task or env_id or "learning curve"
    if len(labels) > 1:
        title += "\n(published results: markers with error bars at their steps, 100k apart)"
    elif anchors and task is None:
        title += "\n(no published curves for this environment)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return labels


def train(
    env_id: str,
    steps: int,
    out: Union[str, Path],
    model_kwargs: dict[str, Any],
    eval_freq: int = 5000,
    eval_episodes: int = EVAL_EPISODES,
    eval_at_start: bool = True,
    anchors: bool = True,
    label: Optional[str] = None,
    verbose: int = 1,
    log_formats: Sequence[str] = ("csv",),
    progress_bar: Optional[bool] = None,
    cpu: bool = False,
) -> dict[str, Any]:
    """Train one run and write eval.csv, curve.png, progress.csv, config.json, summary.json and model.zip.

    :param env_id: Gymnasium id
    :param steps: environment steps
    :param out: output folder
    :param model_kwargs: POMPC keyword arguments (see :func:`build_model_kwargs`)
    :param eval_freq: evaluate every this many steps
    :param eval_episodes: episodes per evaluation
    :param eval_at_start: evaluate at step 0 too
    :param anchors: draw the published curves of the task
    :param label: legend label of the curve
    :param verbose: 1 prints the plan, the warm-up warning, the evaluations and the summary
    :param log_formats: SB3 logger outputs ("csv" is read by plot_kl_diagnostics; "stdout", "tensorboard")
    :param progress_bar: progress bars for training and evaluations (None = with ``verbose``)
    :param cpu: the CPU-sized settings are in ``model_kwargs`` (only changes the printed plan)
    :return: the summary (final eval return, wall times, paths)
    """
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.logger import configure

    from sb3_pompc import POMPC
    from sb3_pompc.callbacks import EvalCurveCallback, TrainingProgressBar, episode_length

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress_bar = bool(verbose) if progress_bar is None else progress_bar
    seed = int(model_kwargs.get("seed", 0))
    env = make_env(env_id, seed)
    eval_env = make_env(env_id, seed + 10_000)
    with open(out / "config.json", "w") as f:
        json.dump(dict(env=env_id, steps=steps, eval_freq=eval_freq, eval_episodes=eval_episodes,
                       eval_at_start=eval_at_start,
                       model_kwargs={k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in model_kwargs.items()}), f, indent=2)
    t0 = time.perf_counter()
    model = POMPC("MlpPolicy", env, **model_kwargs)
    model.set_logger(configure(str(out), list(log_formats)))
    warning = warmup_warning(steps, int(model.learning_starts))
    if verbose:
        lines = describe_plan(model, env_id, episode_length(eval_env), steps, out, eval_freq, eval_episodes,
                              eval_at_start, cpu)
        print("\n".join(lines), flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    callback = EvalCurveCallback(eval_env, eval_freq=eval_freq, n_eval_episodes=eval_episodes,
                                 log_path=out / "eval.csv", deterministic=True, eval_seed=seed + 10_000,
                                 eval_at_start=eval_at_start, eval_at_end=True, progress_bar=progress_bar,
                                 verbose=verbose)
    callbacks = [TrainingProgressBar(), callback] if progress_bar else [callback]
    model.learn(steps, callback=CallbackList(callbacks), log_interval=1)
    total_s = time.perf_counter() - t0
    train_s = total_s - callback.eval_time_s
    model.save(out / "model.zip")
    task = env_to_task(env_id)
    if label is None:
        label = f"ours: preset={model.preset}, λ={model.kl_coef}, prior={model.prior}"
    labels = plot_curve(out / "eval.csv", out / "curve.png", env_id, label=label,
                        title=f"{task or env_id}: {steps} steps, seed {seed}", anchors=anchors)
    final_mean, final_std = callback.rows[-1][1], callback.rows[-1][2]
    summary = dict(
        env=env_id, task=task, steps=int(model.num_timesteps), final_mean_return=final_mean,
        final_std_return=final_std, wall_time_s=total_s, train_time_s=train_s, eval_time_s=callback.eval_time_s,
        train_s_per_1k_steps=1000.0 * train_s / max(1, model.num_timesteps), anchors=labels[1:],
        preset=model.preset, kl_coef=str(model.kl_coef), prior=model.prior, warmup_only=warning is not None,
    )
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    if verbose:
        print(f"final eval return {final_mean:.1f} ± {final_std:.1f} ({eval_episodes} episodes) at step "
              f"{model.num_timesteps}")
        print(f"wall time {_minutes(total_s)} (training {_minutes(train_s)} = {summary['train_s_per_1k_steps']:.1f} s "
              f"per 1k steps, evaluation {_minutes(callback.eval_time_s)})")
        print(f"wrote {out / 'eval.csv'}, {out / 'curve.png'}, {out / 'progress.csv'}, {out / 'model.zip'}")
    if warning:
        print(warning, file=sys.stderr, flush=True)
    env.close()
    eval_env.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m sb3_pompc.train`` / ``sb3-pompc-train``."""
    p = argparse.ArgumentParser(prog="sb3-pompc-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="dmc/cartpole-balance-v0", help="Gymnasium id (dmc/<domain>-<task>-v0)")
    p.add_argument("--steps", type=int, default=30_000, help="environment steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="pompc", choices=["pompc", "tdmpc2", "bmpc"])
    p.add_argument("--kl-coef", default=None, help="λ: float, inf, auto or auto_<init> (default: the preset's)")
    p.add_argument("--prior", default=None, choices=["planner", "forward", "reverse"],
                   help="π_ref (default: the preset's)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU-sized settings (" + ", ".join(f"{k}={v}" for k, v in CPU_SETTINGS.items())
                   + f"), {CPU_EVAL_EPISODES} evaluation episodes and no step-0 evaluation unless asked")
    p.add_argument("--device", default=None, help="torch device (default: cpu with --cpu, else auto)")
    p.add_argument("--eval-freq", type=int, default=5000, help="evaluate every this many steps")
    p.add_argument("--eval-episodes", type=int, default=None,
                   help=f"episodes per evaluation (default {EVAL_EPISODES}, {CPU_EVAL_EPISODES} with --cpu)")
    p.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate at step 0 too (default: yes, no with --cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--out", default=None, help="output folder (default runs/<task>_<preset>_s<seed>)")
    p.add_argument("--no-anchors", action="store_true", help="do not draw the published curves")
    p.add_argument("--label", default=None, help="legend label of our curve")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other POMPC keyword argument, e.g. --set num_samples=64 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-stdout", action="store_true", help="also print the SB3 log tables")
    p.add_argument("--tensorboard", action="store_true", help="also write tensorboard logs into --out")
    p.add_argument("--quiet", action="store_true", help="print nothing but warnings")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job from the command line.

    :param argv: the arguments (default: ``sys.argv[1:]``)
    :return: the run's summary
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as e:
        parser.error(f"--set: {e}")
    eval_episodes = args.eval_episodes or (CPU_EVAL_EPISODES if args.cpu else EVAL_EPISODES)
    eval_at_start = (not args.cpu) if args.eval_at_start is None else args.eval_at_start
    task = env_to_task(args.env)
    out = args.out or str(Path("runs") / f"{task or args.env.replace('/', '_')}_{args.preset}_s{args.seed}")
    if not args.quiet:
        print(f"sb3-pompc train: {args.env}, {args.steps:,} steps, preset {args.preset}, output {out}; "
              "building the environment and the model ...", flush=True)
    import torch

    torch.set_num_threads(max(1, args.threads))
    model_kwargs = build_model_kwargs(args.preset, parse_kl_coef_arg(args.kl_coef), args.prior, args.cpu, args.seed,
                                      args.device, overrides)
    formats = ["csv"] + (["stdout"] if args.log_stdout else []) + (["tensorboard"] if args.tensorboard else [])
    return train(args.env, args.steps, out, model_kwargs, args.eval_freq, eval_episodes, eval_at_start,
                 not args.no_anchors, args.label, 0 if args.quiet else 1, formats,
                 progress_bar=not (args.quiet or args.no_progress), cpu=args.cpu)


def cli() -> None:
    """Entry point of the ``sb3-pompc-train`` console script."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
