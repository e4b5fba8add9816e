"""One training run for the A/B tables of docs/results.md: train, evaluate every ``--eval-every`` steps, write
``eval.csv`` (step, mean, std, wall_time_s), ``summary.json`` and ``model.zip`` into ``--out``.

The run resumes: after each evaluation it saves the model, the replay buffer (``--out/checkpoint/``) and
``eval.csv``; started again with the same ``--out`` it continues from the last evaluation (``--out/checkpoint`` is
deleted when the run is complete). Each evaluation resets the evaluation env with seed 10 000 + seed + step, so its
episodes depend only on the seed, the step and the model. The training env restarts at a resume with a fresh reset
(seed + step), as ``POMPC.load`` does; with ``--eval-every`` a multiple of the episode length the break falls between
two episodes, as in an uninterrupted run.

It uses only the public API (``POMPC``, ``learn``, ``evaluate_policy``), so the same file runs against an older
checkout of the package (``PYTHONPATH=<checkout> python docs/experiments/ab_run.py ...``), which is how the rows of
the previous default were produced.

Example::

    python docs/experiments/ab_run.py --env Pendulum-v1 --steps 10000 --seed 0 --small --out runs/new_s0
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import shutil
import time
from pathlib import Path

import torch

# the small model of the Pendulum rows (a few minutes per 10k steps on one CPU core)
SMALL = dict(model_size=None, latent_dim=64, mlp_dim=128, enc_dim=64, num_q=2, num_samples=128, num_elites=16,
             num_pi_trajs=8, iterations=3, batch_size=64, reanalyze_interval=0)
# the CPU settings of the DMControl rows
CPU = dict(model_size=1, num_samples=64, num_elites=8, num_pi_trajs=4, iterations=3, batch_size=64,
           reanalyze_interval=0, pretrain_updates=500)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write the evaluation rows as CSV."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=2500)
    p.add_argument("--episodes", type=int, default=5, help="evaluation episodes at each intermediate evaluation")
    p.add_argument("--final-episodes", type=int, default=10, help="evaluation episodes at the end")
    p.add_argument("--small", action="store_true", help="the small Pendulum model")
    p.add_argument("--cpu", action="store_true", help="the CPU DMControl settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a POMPC keyword argument")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import gymnasium as gym
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    import sb3_pompc  # noqa: F401  (registers the dmc ids)
    from sb3_pompc import POMPC

    kwargs = {**(SMALL if args.small else {}), **(CPU if args.cpu else {})}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    out = Path(args.out)
    checkpoint, partial = out / "checkpoint", out / "checkpoint.partial"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if (out / "summary.json").exists() and not checkpoint.exists():
        print(f"{out} holds a finished run: nothing to do", flush=True)
        return
    if (checkpoint / "model.zip").exists() and (out / "eval.csv").exists():  # resume after the last evaluation
        with open(out / "eval.csv", newline="") as f:
            rows = [{k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]
        model = POMPC.load(checkpoint / "model.zip", env=gym.make(args.env))
        model.load_replay_buffer(checkpoint / "replay_buffer.pkl")
        rows = [row for row in rows if row["step"] <= model.num_timesteps]  # a row written after the checkpoint
        model.get_env().seed(args.seed + model.num_timesteps)
        print(f"resumed at step {model.num_timesteps}", flush=True)
    else:
        torch.manual_seed(args.seed)
        model = POMPC("MlpPolicy", args.env, seed=args.seed, **kwargs)
    eval_env = Monitor(gym.make(args.env))
    start = time.time() - (rows[-1]["wall_time_s"] if rows else 0.0)
    while model.num_timesteps < args.steps:
        model.learn(min(args.eval_every, args.steps - model.num_timesteps), reset_num_timesteps=not rows)
        episodes = args.final_episodes if model.num_timesteps >= args.steps else args.episodes
        eval_env.reset(seed=10_000 + args.seed + model.num_timesteps)
        mean, std = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=True)
        rows.append(dict(step=model.num_timesteps, mean=float(mean), std=float(std), wall_time_s=time.time() - start))
        print(rows[-1], flush=True)
        if model.num_timesteps < args.steps:  # model and buffer replace the previous checkpoint together
            model.save(partial / "model.zip")
            model.save_replay_buffer(partial / "replay_buffer.pkl")
            shutil.rmtree(checkpoint, ignore_errors=True)
            partial.rename(checkpoint)
        write_rows(out / "eval.csv", rows)
    model.save(out / "model.zip")
    shutil.rmtree(checkpoint, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(dict(env=args.env, steps=args.steps, seed=args.seed, settings=kwargs,
                                                      final=rows[-1]), indent=1, default=str))


if __name__ == "__main__":
    main()
