"""Learning checks: a CI-sized one (Pendulum, a few thousand steps) and the slow ones
(cartpole-balance ≥ 900 after 30k steps, Pendulum ≥ −250 after 10k steps; run with ``pytest -m slow``).

Each check also evaluates uniformly random actions on the same evaluation seeds, to show the threshold is one a
broken agent cannot reach.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

import sb3_pompc  # noqa: F401  (registers the dmc ids)
from sb3_pompc import POMPC
from sb3_pompc.presets import CPU_SETTINGS  # the settings of the README's main command (--cpu)

# a small model that learns Pendulum in a few thousand steps on one CPU core
PENDULUM_SMALL = dict(
    model_size=None, latent_dim=64, mlp_dim=128, enc_dim=64, num_q=2, num_samples=128, num_elites=16,
    num_pi_trajs=8, iterations=3, batch_size=64, reanalyze_interval=0,
)


def _evaluate(model, env_id: str, episodes: int, seed: int = 1000) -> float:
    env = Monitor(gym.make(env_id))
    env.reset(seed=seed)
    mean, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True)
    return float(mean)


class _RandomAgent:
    """Uniform random actions through the predict() interface (what a broken planner amounts to)."""

    def __init__(self, action_space: gym.spaces.Box, seed: int = 0) -> None:
        self.space = action_space
        self.space.seed(seed)

    def predict(self, obs, state=None, episode_start=None, deterministic=False):
        n = obs.shape[0] if obs.ndim > 1 else 1
        return np.stack([self.space.sample() for _ in range(n)]), state


def _random_return(env_id: str, episodes: int) -> float:
    env = Monitor(gym.make(env_id))
    env.reset(seed=1000)
    mean, _ = evaluate_policy(_RandomAgent(env.action_space), env, n_eval_episodes=episodes)
    return float(mean)


def _train(env_id: str, steps: int, seed: int, **kwargs) -> POMPC:
    torch.manual_seed(seed)
    model = POMPC("MlpPolicy", env_id, seed=seed, **kwargs)
    model.learn(steps)
    return model


BF16 = dict(planner_dtype="bfloat16", update_dtype="bfloat16")


# the order matters for speed only: tests/conftest.py runs these first, the two fp32 ones on one xdist worker
@pytest.mark.parametrize("preset,extra", [("pompc", {}), ("tdmpc2", {}), ("pompc", BF16)], ids=["pompc", "tdmpc2", "pompc-bf16"])
def test_pendulum_learns_fast(preset: str, extra: dict) -> None:
    """CI-sized: 2.5k steps on Pendulum-v1 beat −700 (random actions score about −1200 here); also with bf16
    planning and bf16 updates."""
    threshold = -700.0
    model = _train("Pendulum-v1", 2500, seed=0, preset=preset, learning_starts=500, pretrain_updates=200,
                   **PENDULUM_SMALL, **extra)
    score = _evaluate(model, "Pendulum-v1", episodes=5)
    baseline = _random_return("Pendulum-v1", episodes=5)
    assert baseline < threshold, f"random actions score {baseline:.0f}: the threshold {threshold} is too weak"
    assert score > threshold, f"{preset}: eval return {score:.0f} after 2.5k steps (threshold {threshold})"


@pytest.mark.slow
def test_pendulum_10k() -> None:
    """Pendulum-v1 mean return ≥ −250 after 10k steps."""
    model = _train("Pendulum-v1", 10_000, seed=0, learning_starts=1000, pretrain_updates=1000, **PENDULUM_SMALL)
    score = _evaluate(model, "Pendulum-v1", episodes=10)
    assert _random_return("Pendulum-v1", episodes=10) < -250
    assert score >= -250, f"Pendulum eval return {score:.0f} after 10k steps"


@pytest.mark.slow
def test_cartpole_balance_30k() -> None:
    """dmc/cartpole-balance eval return (10 episodes) ≥ 900 after 30k steps with the CPU preset."""
    model = _train("dmc/cartpole-balance-v0", 30_000, seed=0, **CPU_SETTINGS)
    score = _evaluate(model, "dmc/cartpole-balance-v0", episodes=10)
    assert _random_return("dmc/cartpole-balance-v0", episodes=10) < 900
    assert score >= 900, f"cartpole-balance eval return {score:.0f} after 30k steps"
