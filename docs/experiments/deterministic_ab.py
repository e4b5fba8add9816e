"""The A/B of ``predict(deterministic=True)``: trained models evaluated with each ``deterministic_action``
("elite", "mean" and TD-MPC2's "sample") on the same evaluation episodes (same env seed per mode)::

    python docs/experiments/deterministic_ab.py docs/experiments/runs/pendulum_5k/pompc/s0/model.zip --episodes 20
    python docs/experiments/deterministic_ab.py docs/experiments/runs/cartpole_balance_30k/pompc/s0/model.zip \
        --env dmc/cartpole-balance-v0 --episodes 20 --out deterministic_ab_cartpole.csv

The models are the ``model.zip`` files that ``ab_run.py`` writes at the end of a run (not committed: rerun the row).
Writes ``--out`` next to this file: one row per (model, mode) with the mean and std of the return.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ab_run import write_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model.zip files written by ab_run.py")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--out", default="deterministic_ab.csv", help="CSV name, written next to this file")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import gymnasium as gym
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    import sb3_pompc  # noqa: F401  (registers the dmc ids)
    from sb3_pompc import POMPC

    rows = []
    for model_path in map(Path, args.models):
        for how in ("elite", "mean", "sample"):
            model = POMPC.load(model_path, device="cpu", deterministic_action=how)
            env = Monitor(gym.make(args.env))
            env.reset(seed=20_000)
            torch.manual_seed(0)
            start = time.time()
            mean, std = evaluate_policy(model, env, n_eval_episodes=args.episodes, deterministic=True)
            rows.append(dict(model=str(model_path.parent), mode=how, episodes=args.episodes, mean=f"{mean:.1f}",
                             std=f"{std:.1f}", wall_s=f"{time.time() - start:.0f}"))
            print(rows[-1], flush=True)
    write_rows(Path(__file__).parent / args.out, rows)


if __name__ == "__main__":
    main()
