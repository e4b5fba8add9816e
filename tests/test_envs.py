"""DMC environments with TD-MPC2's protocol (``sb3_pompc/envs.py``).

Reference values come from raw dm_control environments (``suite.load(..., task_kwargs={"random": seed})``) stepped by
hand, never from the wrapper under test. Only fast tasks are built (cartpole, cheetah, walker, quadruped-walk), and
nothing is rendered.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from sb3_pompc.envs import (
    DMC_ACTION_REPEAT,
    DMC_EPISODE_LENGTH,
    DMC_TASKS,
    DMCEnv,
    dmc_env_id,
    get_episode_length,
    make_dmc_env,
    parse_dmc_id,
    register_dmc_envs,
)

register_dmc_envs()


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path, monkeypatch) -> None:
    """MuJoCo appends its warnings (cheetah's deprecated ``settotalmass``) to ``MUJOCO_LOG.TXT`` in the working
    directory: run every test from a temporary one so the checkout stays clean."""
    monkeypatch.chdir(tmp_path)


def raw_dmc(domain: str, task: str, seed: int):
    """A raw dm_control environment, loaded as TD-MPC2 does."""
    from dm_control import suite

    return suite.load(domain, task, task_kwargs={"random": seed})


def flat(observation) -> np.ndarray:
    """Reference flattening: every entry in dict order, flattened, float32 (written out, independent of envs.py)."""
    parts = []
    for key in observation:
        parts.extend(np.asarray(observation[key], dtype=np.float64).reshape(-1).tolist())
    return np.array(parts, dtype=np.float32)


def rollout(env: gym.Env, actions: np.ndarray, seed=None) -> tuple[list[np.ndarray], list[float]]:
    """Reset (with ``seed``) and play ``actions``; returns observations (reset one first) and rewards."""
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, terminated, truncated, _ = env.step(a)
        observations.append(obs)
        rewards.append(r)
        assert not terminated and not truncated
    return observations, rewards


# ---------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------
def test_task_list_matches_dm_control_suite():
    from dm_control import suite

    assert tuple(DMC_TASKS) == tuple(tuple(p) for p in suite.ALL_TASKS)


def test_register_is_idempotent_and_covers_every_task():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium warns when an id is registered twice
        ids_1 = register_dmc_envs()
        ids_2 = register_dmc_envs()
    assert ids_1 == ids_2
    assert len(set(ids_1)) == len(DMC_TASKS) + 1  # + dmc/cup-catch-v0
    for domain, task in DMC_TASKS:
        assert dmc_env_id(domain, task) in gym.registry
    for env_id in ("dmc/cartpole-balance-v0", "dmc/cheetah-run-v0", "dmc/walker-walk-v0", "dmc/ball_in_cup-catch-v0",
                   "dmc/cup-catch-v0"):
        spec = gym.registry[env_id]
        assert spec.max_episode_steps is None  # the env truncates itself
        assert spec.entry_point == "sb3_pompc.envs:DMCEnv"


def test_gym_make_and_cup_alias():
    env = gym.make("dmc/cup-catch-v0", seed=0)
    base = env.unwrapped
    assert isinstance(base, DMCEnv) and (base.domain, base.task) == ("ball_in_cup", "catch")
    assert env.spec.id == "dmc/cup-catch-v0" and env.spec.max_episode_steps is None
    assert base.episode_length == DMC_EPISODE_LENGTH == 500 and base.action_repeat == DMC_ACTION_REPEAT == 2
    assert get_episode_length(env) == 500
    obs, _ = env.reset(seed=4)
    ref = raw_dmc("ball_in_cup", "catch", 4).reset()
    np.testing.assert_array_equal(obs, flat(ref.observation))
    assert gym.make("dmc/ball_in_cup-catch-v0").unwrapped.observation_space.shape == (8,)


def test_import_and_registration_do_not_import_dm_control():
    """Loads envs.py and the modules it imports on their own (not via the package's ``__init__``, whose other modules
    import torch: a bare ``sb3_pompc`` package stands in for it) in a fresh interpreter."""
    path = Path(__file__).resolve().parents[1] / "sb3_pompc" / "envs.py"
    code = (
        "import importlib.util, sys, types\n"
        f"pkg = types.ModuleType('sb3_pompc'); pkg.__path__ = [{str(path.parent)!r}]; sys.modules['sb3_pompc'] = pkg\n"
        f"spec = importlib.util.spec_from_file_location('dmc_envs_alone', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "ids = mod.register_dmc_envs()\n"
        "import gymnasium\n"
        "assert 'dmc/walker-walk-v0' in gymnasium.registry, 'not registered'\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dm_control', 'mujoco', 'torch')]\n"
        "print('HEAVY', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------------------------------
# observations
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("domain,task,dim", [("cartpole", "balance", 5), ("cheetah", "run", 17),
                                             ("manipulator", "bring_ball", 44)])
def test_observation_is_flat_float32_concatenation(domain, task, dim):
    env = make_dmc_env(domain, task, seed=7)
    assert env.observation_space == gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
    raw = raw_dmc(domain, task, 7)
    obs, info = env.reset()
    ts = raw.reset()
    assert obs.dtype == np.float32 and obs.shape == (dim,)
    np.testing.assert_array_equal(obs, flat(ts.observation))
    a = np.linspace(-0.9, 0.8, env.action_space.shape[0]).astype(np.float32)
    obs, *_ = env.step(a)
    raw.step(a.astype(np.float64))
    ts = raw.step(a.astype(np.float64))
    assert obs.dtype == np.float32 and obs.shape == (dim,)
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs, flat(ts.observation))


# ---------------------------------------------------------------------------------------------------------------
# episode length, action repeat and rewards
# ---------------------------------------------------------------------------------------------------------------
def test_episode_truncates_at_exactly_500_agent_steps():
    env = make_dmc_env("cartpole", "balance", seed=0)
    dt = env.dm_env.control_timestep()
    env.reset()
    action = np.zeros(1, dtype=np.float32)
    for t in range(1, 501):
        obs, reward, terminated, truncated, info = env.step(action)
        assert terminated is False
        assert truncated is (t == 500), t
        assert isinstance(reward, float)
    # 500 agent steps = 1000 control steps
    assert env.physics.data.time == pytest.approx(1000 * dt)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(action)
    # the next episode lasts 500 steps too
    env.reset()
    flags = [env.step(action)[3] for _ in range(500)]
    assert flags.index(True) == 499


def test_custom_episode_length_and_action_repeat():
    env = make_dmc_env("cartpole", "balance", seed=0, action_repeat=3, episode_length=7)
    assert get_episode_length(env) == 7
    env.reset()
    flags = [env.step(np.zeros(1, dtype=np.float32))[2:4] for _ in range(7)]
    assert flags == [(False, False)] * 6 + [(False, True)]
    assert env.physics.data.time == pytest.approx(21 * env.dm_env.control_timestep())


def test_reward_is_sum_of_two_control_step_rewards():
    seed = 3
    env = make_dmc_env("walker", "walk", seed=seed)
    raw = raw_dmc("walker", "walk", seed)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(40, 6)).astype(np.float32)
    obs, _ = env.reset()
    raw.reset()
    first_rewards = []
    for a in actions:
        obs, reward, terminated, truncated, _ = env.step(a)
        ts_1 = raw.step(a.astype(np.float64))
        ts_2 = raw.step(a.astype(np.float64))
        first_rewards.append(ts_1.reward)
        assert reward == ts_1.reward + ts_2.reward
        np.testing.assert_array_equal(obs, flat(ts_2.observation))
    assert min(first_rewards) > 0  # so the sum differs from either reward alone


# ---------------------------------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_same_trajectory_different_seed_differs():
    actions = np.random.default_rng(1).uniform(-1, 1, size=(25, 1)).astype(np.float32)
    obs_a, rew_a = rollout(make_dmc_env("cartpole", "swingup", seed=11), actions)
    obs_b, rew_b = rollout(make_dmc_env("cartpole", "swingup", seed=11), actions)
    np.testing.assert_array_equal(np.stack(obs_a), np.stack(obs_b))
    assert rew_a == rew_b
    obs_c, rew_c = rollout(make_dmc_env("cartpole", "swingup", seed=12), actions)
    assert not np.array_equal(obs_a[0], obs_c[0])
    assert rew_a != rew_c


def test_reset_seed_reproduces_constructor_seed_and_unseeded_reset_continues():
    actions = np.random.default_rng(2).uniform(-1, 1, size=(10, 6)).astype(np.float32)
    ref_env = make_dmc_env("cheetah", "run", seed=5)
    first_ref, _ = rollout(ref_env, actions)
    second_ref, _ = rollout(ref_env, actions)  # reset() without seed continues the stream
    assert not np.array_equal(first_ref[0], second_ref[0])

    env = make_dmc_env("cheetah", "run", seed=999)
    rollout(env, actions)  # consume some randomness first
    first, _ = rollout(env, actions, seed=5)
    second, _ = rollout(env, actions)
    np.testing.assert_array_equal(np.stack(first), np.stack(first_ref))
    np.testing.assert_array_equal(np.stack(second), np.stack(second_ref))

    # gym.make(...).reset(seed=s) == a raw dm_control env loaded with random=s
    made = gym.make("dmc/cheetah-run-v0")
    obs, _ = made.reset(seed=5)
    np.testing.assert_array_equal(obs, flat(raw_dmc("cheetah", "run", 5).reset().observation))


def test_bad_seeds_raise():
    with pytest.raises(ValueError, match="seed"):
        make_dmc_env("cartpole", "balance", seed=-1)
    env = make_dmc_env("cartpole", "balance")
    with pytest.raises(ValueError, match="seed"):
        env.reset(seed=2**40)


# ---------------------------------------------------------------------------------------------------------------
# actions
# ---------------------------------------------------------------------------------------------------------------
def test_action_space_and_rescaling_to_true_bounds():
    from dm_control import suite

    env = make_dmc_env("quadruped", "walk", seed=0)
    spec = suite.load("quadruped", "walk", task_kwargs={"random": 0}).action_spec()
    low, high = np.asarray(spec.minimum, np.float64), np.asarray(spec.maximum, np.float64)
    assert not (np.all(low == -1) and np.all(high == 1))  # a task whose bounds differ from [-1, 1]
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (12,), np.float32)
    env.reset()
    for a, expected in ((-1.0, low), (1.0, high), (0.0, (low + high) / 2), (0.5, low + 0.75 * (high - low)),
                        (3.0, high)):  # out-of-range actions are clipped
        env.step(np.full(12, a, dtype=np.float32))
        np.testing.assert_allclose(env.physics.data.ctrl, expected, rtol=0, atol=1e-12)

    # the whole transition matches a raw env driven with the rescaled controls
    raw = raw_dmc("quadruped", "walk", 1)
    env.reset(seed=1)
    raw.reset()
    a = np.random.default_rng(3).uniform(-1, 1, 12).astype(np.float32)
    obs, reward, *_ = env.step(a)
    control = low + (a.astype(np.float64) + 1) / 2 * (high - low)
    r1, ts = raw.step(control).reward, raw.step(control)
    assert reward == pytest.approx(r1 + ts.reward, rel=1e-12)
    np.testing.assert_allclose(obs, flat(ts.observation), rtol=1e-6, atol=1e-6)


def test_unit_bound_actions_pass_through_and_nan_is_rejected():
    env = make_dmc_env("cheetah", "run", seed=0)
    env.reset()
    a = np.array([-1.0, -0.5, 0.0, 0.25, 0.75, 1.0], dtype=np.float32)
    env.step(a)
    np.testing.assert_array_equal(env.physics.data.ctrl, a.astype(np.float64))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.full(6, np.nan, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_ids_raise_clear_errors():
    with pytest.raises(ValueError, match=r"'dmc/foo-bar-v0'.*dmc/cartpole-balance-v0"):
        make_dmc_env("foo", "bar")
    with pytest.raises(ValueError, match=r"'dmc/cartpole-nope-v0'.*dmc/cartpole-swingup-v0"):
        DMCEnv("cartpole", "nope")
    with pytest.raises(ValueError, match=r"dmc/walker-fly-v0.*dmc/walker-walk-v0"):
        parse_dmc_id("dmc/walker-fly-v0")
    with pytest.raises(ValueError, match="cartpolebalance"):
        parse_dmc_id("cartpolebalance")
    with pytest.raises(ValueError, match="action_repeat"):
        make_dmc_env("cartpole", "balance", action_repeat=0)
    with pytest.raises(ValueError, match="episode_length"):
        make_dmc_env("cartpole", "balance", episode_length=0)
    with pytest.raises(ValueError, match="render_mode"):
        make_dmc_env("cartpole", "balance", render_mode="human")
    assert parse_dmc_id("dmc/cup-catch-v0") == ("ball_in_cup", "catch")
    assert parse_dmc_id("walker-walk") == ("walker", "walk")
    assert parse_dmc_id("dmc/humanoid_CMU-run-v0") == ("humanoid_CMU", "run")


# ---------------------------------------------------------------------------------------------------------------
# Gymnasium / SB3 compatibility
# ---------------------------------------------------------------------------------------------------------------
def test_gymnasium_env_checker_passes():
    from gymnasium.utils.env_checker import check_env

    env = make_dmc_env("cartpole", "balance", seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
        check_env(gym.make("dmc/cheetah-run-v0").unwrapped, skip_render_check=True)  # the registered version
    # the protocol's observation space is Box(-inf, inf): the checker's two "infinity" notes are expected
    messages = [str(w.message) for w in caught if "WARN" in str(w.message) and "infinity" not in str(w.message)]
    assert messages == [], messages
    assert any("infinity" in str(w.message) for w in caught)  # the filter above sees the checker's warnings


def test_info_is_picklable_and_env_closes_twice():
    env = gym.make("dmc/cartpole-balance-v0", seed=0)
    _, info = env.reset()
    pickle.dumps(info)
    *_, info = env.step(env.action_space.sample())
    pickle.dumps(info)
    assert isinstance(info, dict)
    env.close()
    env.close()
    with pytest.raises(RuntimeError):
        env.unwrapped.step(np.zeros(1, dtype=np.float32))


def test_works_in_sb3_vec_envs():
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = make_vec_env("dmc/cartpole-balance-v0", n_envs=2, seed=0)
    assert get_episode_length(venv) == 500
    obs = venv.reset()
    assert obs.shape == (2, 5) and obs.dtype == np.float32
    assert not np.array_equal(obs[0], obs[1])  # make_vec_env seeds env i with seed + i
    first_obs = obs.copy()
    for t in range(1, 501):
        obs, rewards, dones, infos = venv.step(np.zeros((2, 1), dtype=np.float32))
        assert rewards.shape == (2,)
        assert bool(dones.all()) is (t == 500) and bool(dones.any()) is (t == 500)
    for info in infos:
        assert info["TimeLimit.truncated"] is True
        assert info["episode"]["l"] == 500
        assert info["terminal_observation"].shape == (5,)
    venv.close()

    again = make_vec_env("dmc/cartpole-balance-v0", n_envs=2, seed=0).reset()
    np.testing.assert_array_equal(again, first_obs)

    dummy = DummyVecEnv([lambda: make_dmc_env("cheetah", "run", seed=1)])
    assert get_episode_length(dummy) == 500
    obs = dummy.reset()
    obs, rewards, dones, _ = dummy.step(np.zeros((1, 6), dtype=np.float32))
    assert obs.shape == (1, 17) and not dones[0] and np.isfinite(rewards).all()


# ---------------------------------------------------------------------------------------------------------------
# headless machines
# ---------------------------------------------------------------------------------------------------------------
def test_select_headless_mujoco_gl_rules():
    from sb3_pompc.envs import select_headless_mujoco_gl

    def loads_only(*names):
        return lambda libraries: any(n in lib for lib in libraries for n in names)

    env = {}
    assert select_headless_mujoco_gl(env, "linux", loads_only("EGL", "OSMesa")) == "egl" and env["MUJOCO_GL"] == "egl"
    env = {}
    assert select_headless_mujoco_gl(env, "linux", loads_only("OSMesa")) == "osmesa" and env == {"MUJOCO_GL": "osmesa"}
    env = {}
    assert select_headless_mujoco_gl(env, "linux", loads_only()) is None and env == {}
    for env in ({"MUJOCO_GL": "glfw"}, {"DISPLAY": ":0"}, {"WAYLAND_DISPLAY": "wayland-0"}):
        before = dict(env)
        assert select_headless_mujoco_gl(env, "linux", loads_only("EGL")) is None and env == before
    env = {}
    assert select_headless_mujoco_gl(env, "darwin", loads_only("EGL")) is None and env == {}


def _egl_loads() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libEGL.so.1")
    except OSError:
        return False
    return True


def test_headless_dmc_env_prints_no_glfw_warning(tmp_path):
    """No DISPLAY and no MUJOCO_GL: importing sb3_pompc picks a backend, and neither building and stepping a dmc env
    nor initialising GLFW prints GLFW's missing-DISPLAY warning."""
    code = (
        "import os, sb3_pompc, gymnasium as gym\n"
        "env = gym.make('dmc/cartpole-balance-v0'); env.reset(seed=0); env.step(env.action_space.sample())\n"
        "print('MUJOCO_GL', os.environ.get('MUJOCO_GL'))\n"
        "import glfw; glfw.init()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MUJOCO_GL", "PYTHONWARNINGS",
                                                             "PYOPENGL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "DISPLAY environment variable is missing" not in out.stderr and "GLFWError" not in out.stderr, out.stderr
    if _egl_loads():
        assert "MUJOCO_GL egl" in out.stdout
    # without sb3_pompc, the same GLFW call does print the warning (the check above can fail)
    bare = subprocess.run([sys.executable, "-c", "import glfw; glfw.init()"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert "DISPLAY environment variable is missing" in bare.stderr


def test_explicit_mujoco_gl_is_kept(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MUJOCO_GL"] = "disable"
    code = "import os, sb3_pompc.envs; print(os.environ['MUJOCO_GL'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "disable", out.stderr
