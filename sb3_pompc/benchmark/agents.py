"""The benchmark's agents: a synthetic environment of the requested sizes, an agent built on it through the public
API, and a replay buffer filled with random transitions."""

from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_pompc.pompc import POMPC

__all__ = ["DTYPES", "PLANNER_DTYPES", "SyntheticEnv", "make_model", "fill_replay_buffer"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
PLANNER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class SyntheticEnv(gym.Env):
    """A tiny random environment with Box observations and actions of the requested sizes (cheetah-run's 17/6 by
    default): observations are standard normal, rewards uniform in [0, 1], episodes are truncated after
    ``episode_length`` steps. Only its spaces matter to the benchmark.

    :param obs_dim: observation size
    :param action_dim: action size (actions in [−1, 1])
    :param episode_length: steps before truncation
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, obs_dim: int = 17, action_dim: int = 6, episode_length: int = 500) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
        self.episode_length = episode_length
        self._t = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._t = 0
        return self.np_random.standard_normal(self.observation_space.shape).astype(np.float32), {}

    def step(self, action: np.ndarray):
        self._t += 1
        obs = self.np_random.standard_normal(self.observation_space.shape).astype(np.float32)
        return obs, float(self.np_random.uniform()), False, self._t >= self.episode_length, {}


def make_model(
    model_size: Optional[int],
    n_envs: int,
    dtype: str = "fp32",
    device: str = "cpu",
    obs_dim: int = 17,
    action_dim: int = 6,
    preset: str = "pompc",
    seed: int = 0,
    **overrides: Any,
) -> POMPC:
    """Build a POMPC agent through the public API on a ``DummyVecEnv`` of ``n_envs`` :class:`SyntheticEnv`.

    :param model_size: 1, 5, 19, 48 or 317 (None: give ``latent_dim``/``mlp_dim``/... in ``overrides``)
    :param n_envs: number of environments (= states planned per call)
    :param dtype: "fp32" or "bf16" (the ``planner_dtype``)
    :param device: torch device
    :param obs_dim: observation size
    :param action_dim: action size
    :param preset: POMPC preset
    :param seed: random seed
    :param overrides: any other POMPC keyword argument (``num_samples=256``, ``reanalyze_batch_size=2``, ...)
    :return: the agent, with ``learning_starts=0``, no pretraining burst and a 4096-row buffer
    """
    env = DummyVecEnv([lambda: SyntheticEnv(obs_dim, action_dim) for _ in range(n_envs)])
    kwargs: dict[str, Any] = dict(
        model_size=model_size,
        learning_starts=0,
        pretrain_updates=0,
        buffer_size=max(4096, 64 * n_envs),
        planner_dtype=PLANNER_DTYPES[dtype],
        device=device,
        seed=seed,
    )
    kwargs.update(overrides)
    return POMPC("MlpPolicy", env, preset=preset, **kwargs)


def fill_replay_buffer(model: POMPC, seed: int = 0) -> None:
    """Fill the whole replay buffer with random transitions (no episode ends, every row with a planner
    Gaussian), writing its arrays directly: much faster than stepping the environment."""
    rb = model.replay_buffer
    rng = np.random.default_rng(seed)
    rb.observations[:] = rng.standard_normal(rb.observations.shape)
    rb.next_observations[:] = rng.standard_normal(rb.next_observations.shape)
    rb.actions[:] = rng.uniform(-1.0, 1.0, rb.actions.shape)
    rb.rewards[:] = rng.uniform(0.0, 1.0, rb.rewards.shape)
    rb.dones[:] = 0.0
    rb.timeouts[:] = 0.0
    rb.plan_means[:] = rng.uniform(-1.0, 1.0, rb.plan_means.shape)
    rb.plan_stds[:] = rng.uniform(0.05, 2.0, rb.plan_stds.shape)
    rb.has_plan[:] = True
    rb.pos, rb.full = 0, True
