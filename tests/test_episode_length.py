"""The episode length of any environment (``sb3_pompc.episodes.get_episode_length``, also exported by
``sb3_pompc.envs``): every way of setting it, through Gymnasium wrappers and SB3 VecEnvs; the smallest active limit
wins. The lengths of the parametrised cases are also played out until the first truncation.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from sb3_pompc.envs import get_episode_length, make_dmc_env, register_dmc_envs

register_dmc_envs()


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path, monkeypatch) -> None:
    """MuJoCo may write ``MUJOCO_LOG.TXT`` to the working directory: run every test from a temporary one."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# episode length: every way of setting it, the smallest active limit wins
# ---------------------------------------------------------------------------------------------------------------
def _pendulum_limit_70():
    from stable_baselines3.common.monitor import Monitor

    return Monitor(gym.wrappers.TimeLimit(gym.make("Pendulum-v1"), 70))


def _dmc_length_90():
    from stable_baselines3.common.monitor import Monitor

    return Monitor(gym.make("dmc/cartpole-balance-v0", episode_length=90))


def _pendulum_registered():
    return gym.make("Pendulum-v1")


def _steps_to_truncation(env: gym.Env, cap: int = 1000) -> int:
    """Agent steps until the first truncation, played out (the ground truth of an episode length)."""
    env.reset(seed=0)
    for t in range(1, cap + 1):
        *_, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        assert not terminated
        if truncated:
            return t
    return cap + 1


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: gym.make("dmc/cartpole-balance-v0"), 500),  # the env's own episode_length
        (lambda: gym.make("dmc/cartpole-balance-v0", episode_length=40), 40),
        (lambda: gym.make("dmc/cartpole-balance-v0", max_episode_steps=30), 30),  # TimeLimit below episode_length
        (lambda: gym.make("Pendulum-v1"), 200),  # the registered spec default
        (lambda: gym.make("Pendulum-v1", max_episode_steps=50), 50),
        (lambda: gym.wrappers.TimeLimit(gym.make("Pendulum-v1"), 60), 60),  # by hand, below the registered 200
        (lambda: gym.wrappers.TimeLimit(gym.make("Pendulum-v1"), 300), 200),  # by hand, but 200 truncates first
        (lambda: gym.wrappers.ClipAction(gym.wrappers.TimeLimit(gym.make("Pendulum-v1", max_episode_steps=300),
                                                                 80)), 80),  # through another wrapper
        (lambda: gym.wrappers.TimeLimit(make_dmc_env("cartpole", "balance", episode_length=25), 35), 25),
    ],
    ids=["dmc", "dmc-episode_length", "dmc-max_episode_steps", "spec", "make-max_episode_steps", "TimeLimit-60",
         "TimeLimit-300-over-200", "TimeLimit-under-ClipAction", "TimeLimit-over-dmc-25"],
)
def test_episode_length_is_what_truncates_first(make, expected):
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    env = make()
    assert _steps_to_truncation(env) == expected  # played out: the length really is what truncates
    assert get_episode_length(env) == expected
    assert get_episode_length(Monitor(make())) == expected
    venv = DummyVecEnv([lambda: Monitor(make())])
    assert get_episode_length(venv) == expected
    assert get_episode_length(VecNormalize(venv)) == expected


def test_episode_length_spec_fallback_and_unknown():
    from types import SimpleNamespace

    # an env with a spec but no wrapper chain (the fallback) and one with neither (unknown)
    assert get_episode_length(SimpleNamespace(spec=SimpleNamespace(max_episode_steps=123))) == 123
    assert get_episode_length(gym.make("Pendulum-v1").unwrapped) is None  # nothing truncates it
    assert get_episode_length(gym.make("Pendulum-v1", max_episode_steps=None).unwrapped) is None


def test_episode_length_through_subproc_vec_env():
    from stable_baselines3.common.vec_env import SubprocVecEnv, VecNormalize

    for make, expected in ((_pendulum_limit_70, 70), (_dmc_length_90, 90), (_pendulum_registered, 200)):
        venv = SubprocVecEnv([make, make], start_method="fork")
        try:
            assert get_episode_length(VecNormalize(venv)) == expected
        finally:
            venv.close()
