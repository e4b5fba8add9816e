"""The A/B of ``predict(deterministic=True)``: the same trained models evaluated with each ``deterministic_action``
("elite", "mean" and TD-MPC2's "sample") on the same evaluation episodes (same env seed per mode)::

    python docs/experiments/deterministic_ab.py docs/experiments/runs/pendulum_5k/pompc --episodes 20

Writes ``deterministic_ab.csv`` next to this file: one row per (model, mode) with the mean and std of the return.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variant_dir", help="a folder of s<seed>/model.zip runs")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--env", default="Pendulum-v1")
    args = p.parse_args()
    torch.set_num_threads(1)
    import gymnasium as gym
    from stable_baselines3.common.evaluation import evaluate_policy

    import sb3_pompc  # noqa: F401
    from sb3_pompc import POMPC

    rows = []
    for model_path in sorted(Path(args.variant_dir).glob("s*/model.zip")):
        for how in ("elite", "mean", "sample"):
            model = POMPC.load(model_path, device="cpu", deterministic_action=how)
            env = gym.make(args.env)
            env.reset(seed=20_000)
            torch.manual_seed(0)
            start = time.time()
            mean, std = evaluate_policy(model, env, n_eval_episodes=args.episodes, deterministic=True)
            rows.append(dict(model=str(model_path.parent), mode=how, episodes=args.episodes, mean=f"{mean:.1f}",
                             std=f"{std:.1f}", wall_s=f"{time.time() - start:.0f}"))
            print(rows[-1], flush=True)
    out = Path(__file__).parent / "deterministic_ab.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
