"""No silent wrong answers: settings and inputs that would train on something else than asked are refused or
warned about before training, with a message that names the problem and the remedy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from conftest import tiny_algo

from sb3_pompc import POMPC

torch.set_num_threads(1)


class ScaledRewardEnv(gym.Env):
    """A 2-D point mass whose reward is ``scale · (−|pos|²)`` (the scale is what is checked).

    :param scale: reward multiplier
    :param low, high: the action box
    """

    def __init__(self, scale: float = 1.0, low: Any = -1.0, high: Any = 1.0, obs_dtype: Any = np.float32) -> None:
        bound = 255 if obs_dtype == np.uint8 else 10
        self.observation_space = spaces.Box(-bound * (obs_dtype != np.uint8), bound, (2,), obs_dtype)
        self.action_space = spaces.Box(np.asarray(low, np.float32) * np.ones(2, np.float32),
                                       np.asarray(high, np.float32) * np.ones(2, np.float32))
        self.scale = scale

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.pos, self.t = np.array([0.5, -0.5]), 0
        return self.pos.astype(self.observation_space.dtype), {}

    def step(self, action):
        self.pos = np.clip(self.pos + 0.1 * np.asarray(action, np.float64), -3, 3)
        self.t += 1
        reward = -self.scale * float(np.sum(self.pos**2) + 0.1)
        return self.pos.astype(self.observation_space.dtype), reward, False, self.t >= 30, {}


@pytest.mark.parametrize("scale", [1e6, 1e12])
def test_rewards_beyond_the_value_support_warn_at_once(scale: float) -> None:
    model = POMPC("MlpPolicy", ScaledRewardEnv(scale), seed=0, **tiny_algo(learning_starts=20))
    with pytest.warns(UserWarning, match="outside the value support") as record:
        model.learn(5)
    assert "norm_reward=True" in str(record[0].message)


def test_rewards_too_small_to_be_seen_warn_when_learning_starts() -> None:
    model = POMPC("MlpPolicy", ScaledRewardEnv(1e-6), seed=0, **tiny_algo(learning_starts=20, pretrain_updates=1))
    with pytest.warns(UserWarning, match="too small for the value support"):
        model.learn(25)


def test_ordinary_rewards_do_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    POMPC("MlpPolicy", ScaledRewardEnv(1.0), seed=0, **tiny_algo(learning_starts=20, pretrain_updates=1)).learn(25)
    assert not [w for w in recwarn if "value support" in str(w.message)]


@pytest.mark.parametrize("low, high", [([-1, 0], [1, 0]), (-3e38, 3e38)])  # gymnasium itself refuses low > high
def test_degenerate_action_boxes_are_refused_at_construction(low, high) -> None:
    env = ScaledRewardEnv()
    env.action_space = spaces.Box(np.array(low, np.float32) * np.ones(2, np.float32),
                                  np.array(high, np.float32) * np.ones(2, np.float32))
    with pytest.raises(ValueError, match="low < high with a finite width"):
        POMPC("MlpPolicy", env, **tiny_algo())


@pytest.mark.parametrize("buffer_size", [3, 4, 5])
def test_a_buffer_too_small_for_the_horizon_is_refused(buffer_size: int) -> None:
    with pytest.raises(ValueError, match="buffer_size .* must be at least 2·horizon = 6"):
        POMPC("MlpPolicy", ScaledRewardEnv(), **tiny_algo(buffer_size=buffer_size, horizon=3))


def test_a_replay_buffer_horizon_other_than_the_planners_is_refused() -> None:
    with pytest.raises(ValueError, match=r"replay_buffer_kwargs\['horizon'\] \(5\) differs from horizon \(3\)"):
        POMPC("MlpPolicy", ScaledRewardEnv(), replay_buffer_kwargs=dict(horizon=5), **tiny_algo(horizon=3))
    POMPC("MlpPolicy", ScaledRewardEnv(), replay_buffer_kwargs=dict(horizon=3), **tiny_algo(horizon=3))


def test_episode_start_of_the_wrong_length_names_the_argument() -> None:
    model = POMPC("MlpPolicy", ScaledRewardEnv(), **tiny_algo())
    obs = np.zeros((2, 2), np.float32)
    _, state = model.predict(obs)
    with pytest.raises(ValueError, match="episode_start must hold one flag per observation"):
        model.predict(obs, state=state, episode_start=np.array([True, False, True]))


def test_a_uint8_vector_is_accepted_and_an_image_is_refused() -> None:
    POMPC("MlpPolicy", ScaledRewardEnv(obs_dtype=np.uint8), **tiny_algo()).learn(10)
    env = ScaledRewardEnv()
    env.observation_space = spaces.Box(0, 255, (16, 16), np.uint8)
    with pytest.raises(ValueError, match="image-like"):
        POMPC("MlpPolicy", env, **tiny_algo())


def test_settings_given_to_load_take_effect_or_are_refused(tmp_path: Path) -> None:
    """rl-zoo3's ``-i`` passes its hyper-parameters to ``load``: planner settings are rebuilt, settings that define
    the networks or the replay windows are refused before anything is built, and the warm-up does not repeat."""
    env = ScaledRewardEnv()
    model = POMPC("MlpPolicy", env, seed=0, **tiny_algo(learning_starts=20, pretrain_updates=2))
    model.learn(30)
    model.save(tmp_path / "m")
    model.save_replay_buffer(tmp_path / "buffer")
    loaded = POMPC.load(tmp_path / "m", env=env, num_samples=48, iterations=3, batch_size=8, learning_starts="auto")
    loaded.load_replay_buffer(tmp_path / "buffer")
    planner = loaded.policy.planner
    assert (planner.num_samples, planner.iterations) == (48, 3) and loaded.config.num_samples == 48
    assert loaded.batch_size == 8 and loaded.reanalyzer.planner.num_samples == 48
    updates = loaded._n_updates
    loaded.learn(10)  # a new learn resets the env; no second warm-up: it plans and updates from the first step
    assert loaded._n_updates == updates + 10
    assert loaded.replay_buffer.has_plan[30:40].all()
    for change, name in ((dict(horizon=5), "horizon"), (dict(latent_dim=64), "latent_dim"),
                         (dict(kl_coef="auto"), "kl_coef")):
        with pytest.raises(ValueError, match=f"a loaded model cannot change .*{name}"):
            POMPC.load(tmp_path / "m", env=env, **change)
    same = POMPC.load(tmp_path / "m", env=env, horizon=3, latent_dim=32)  # unchanged values are fine
    assert same.config == model.config
