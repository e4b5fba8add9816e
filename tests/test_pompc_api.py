"""POMPC behind the Stable-Baselines3 API, and the errors it gives for input it does not support.

Every training here uses a tiny CPU model (``TINY``) on Pendulum-v1 or on small custom Box envs, so the file runs
in about a minute on one core.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from conftest import TINY_ALGO, tiny_algo

from sb3_pompc import POMPC

torch.set_num_threads(1)

TINY: dict[str, Any] = TINY_ALGO


tiny = tiny_algo


def short_pendulum(n_envs: int = 1, episode_steps: int = 30, seed: Optional[int] = None):
    """Pendulum-v1 with short episodes (so that episodes end and SB3 dumps its logs)."""
    return make_vec_env("Pendulum-v1", n_envs=n_envs, seed=seed, env_kwargs={"max_episode_steps": episode_steps})


class BoundsEnv(gym.Env):
    """A deterministic 2-D point mass whose action box is not [−1, 1] (low = (−2, 0), high = (2, 3)).

    Every action it receives is recorded in ``self.received``; it raises if an action leaves its box.

    :param episode_length: steps before truncation
    """

    def __init__(self, episode_length: int = 40) -> None:
        self.observation_space = spaces.Box(-10.0, 10.0, (4,), np.float32)
        self.action_space = spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 3.0], np.float32))
        self.episode_length = episode_length
        self.received: list[np.ndarray] = []

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.pos, self.vel, self.t = np.array([0.5, -0.3]), np.zeros(2), 0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.vel]).astype(np.float32)

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float32)
        if not self.action_space.contains(action):
            raise AssertionError(f"action {action} outside the box [{self.action_space.low}, {self.action_space.high}]")
        self.received.append(action.copy())
        self.vel = 0.9 * self.vel + 0.1 * (action - np.array([0.0, 1.5]))
        self.pos = np.clip(self.pos + 0.1 * self.vel, -2.0, 2.0)
        self.t += 1
        return self._obs(), -float(np.sum(self.pos**2)), False, self.t >= self.episode_length, {}


class SpacesEnv(gym.Env):
    """An env with arbitrary spaces (only construction is tested with it).

    :param observation_space: observation space
    :param action_space: action space
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any):
        return self.observation_space.sample(), 0.0, False, False, {}


class DictBoxEnv(gym.Env):
    """A Dict observation of two Box entries (flattenable), Box actions in [−1, 1], 30-step episodes."""

    def __init__(self) -> None:
        self.observation_space = spaces.Dict(
            {"position": spaces.Box(-5.0, 5.0, (2,), np.float32), "velocity": spaces.Box(-5.0, 5.0, (3,), np.float32)}
        )
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.t = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray):
        self.t += 1
        obs = {"position": np.full(2, 0.1 * self.t, np.float32), "velocity": np.asarray(np.r_[action, 0.0], np.float32)}
        return obs, float(-np.abs(action).sum()), False, self.t >= 30, {}


class NaNObsEnv(gym.Env):
    """Box env that emits a NaN observation once: at step ``nan_step`` (counted over the env's whole life) or,
    with ``nan_step = 0``, from its first ``reset``.

    :param nan_step: global step whose observation is NaN (0: the first reset)
    :param episode_length: steps before truncation
    """

    def __init__(self, nan_step: int, episode_length: int = 30) -> None:
        self.observation_space = spaces.Box(-10.0, 10.0, (3,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.nan_step, self.episode_length = nan_step, episode_length
        self.total, self.t, self.resets = 0, 0, 0

    def _obs(self, poison: bool) -> np.ndarray:
        obs = np.array([np.sin(0.1 * self.t), np.cos(0.1 * self.t), 0.01 * self.t], np.float32)
        if poison:
            obs[1] = np.nan
        return obs

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.t = 0
        self.resets += 1
        return self._obs(self.nan_step == 0 and self.resets == 1), {}

    def step(self, action: np.ndarray):
        self.t += 1
        self.total += 1
        obs = self._obs(self.total == self.nan_step)
        return obs, float(-np.square(action).sum()), False, self.t >= self.episode_length, {}


class CountingCallback(BaseCallback):
    """Counts the callback events of one ``learn`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.training_start = 0
        self.training_end = 0
        self.rollout_starts = 0
        self.timesteps_seen: list[int] = []

    def _on_training_start(self) -> None:
        self.training_start += 1

    def _on_rollout_start(self) -> None:
        self.rollout_starts += 1

    def _on_step(self) -> bool:
        self.steps += 1
        self.timesteps_seen.append(self.num_timesteps)
        return True

    def _on_training_end(self) -> None:
        self.training_end += 1


def _params_finite(model: POMPC) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.policy.state_dict().values() if p.is_floating_point())


# ---------------------------------------------------------------------------------------------------------- SB3 API
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """POMPC (default preset, reanalyze off so that warm-up rows keep has_plan False) trained 120 timesteps on 2
    Pendulum envs with a csv logger, a counting callback, a checkpoint callback and the progress bar (one training
    shared by the API tests)."""
    folder = tmp_path_factory.mktemp("trained")
    env = short_pendulum(n_envs=2, seed=0)
    model = POMPC("MlpPolicy", env, seed=0, **tiny(reanalyze_interval=0))
    model.set_logger(configure(str(folder / "log"), ["csv"]))
    counter = CountingCallback()
    checkpoints = CheckpointCallback(save_freq=20, save_path=str(folder / "ckpt"), name_prefix="pompc")
    model.learn(120, callback=[counter, checkpoints], log_interval=1, progress_bar=True)
    return dict(model=model, counter=counter, folder=folder, env=env)


def test_learn_two_envs_plans_and_updates(trained: dict[str, Any]) -> None:
    """n_envs = 2: every step plans both envs; updates start after learning_starts; the buffer holds π^P."""
    model: POMPC = trained["model"]
    assert model.n_envs == 2 and model.num_timesteps == 120
    rb = model.replay_buffer
    assert rb.pos == 60 and rb.n_envs == 2
    # warm-up rows (timesteps ≤ 50: the first plan comes after the pretraining burst) carry no plan, the others do
    assert not rb.has_plan[:26].any()
    assert rb.has_plan[26:60].all()
    assert np.all(rb.plan_stds[26:60] >= model.policy.planner.min_std - 1e-6)
    # one update per step once num_timesteps > learning_starts, plus the pretraining burst
    steps_training = sum(1 for t in trained["counter"].timesteps_seen if t > model.learning_starts)
    assert model._n_updates == model.pretrain_updates + steps_training
    assert _params_finite(model)


def test_learn_single_env() -> None:
    """n_envs = 1 with a plain env id: trains, counts updates, keeps parameters finite."""
    model = POMPC("MlpPolicy", "Pendulum-v1", seed=1, **tiny(learning_starts=40, reanalyze_interval=0))
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(70)
    assert model.n_envs == 1 and model.num_timesteps == 70
    assert model._n_updates == 5 + 30
    assert model.replay_buffer.has_plan[41:70].all() and not model.replay_buffer.has_plan[:41].any()
    changed = [k for k, v in model.policy.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("model.encoder") for k in changed) and any(k.startswith("model.pi.") for k in changed)
    assert _params_finite(model)


def test_callbacks_and_progress_bar(trained: dict[str, Any]) -> None:
    """A custom BaseCallback sees every vectorised step; CheckpointCallback writes loadable checkpoints."""
    counter: CountingCallback = trained["counter"]
    assert counter.training_start == 1 and counter.training_end == 1
    assert counter.steps == 60  # 120 timesteps / 2 envs
    assert counter.timesteps_seen == list(range(2, 121, 2))
    ckpts = sorted((trained["folder"] / "ckpt").glob("pompc_*_steps.zip"))
    # save_freq counts callback calls: 20, 40, 60 calls = 40, 80, 120 timesteps
    assert [p.name for p in ckpts] == ["pompc_120_steps.zip", "pompc_40_steps.zip", "pompc_80_steps.zip"]
    loaded = POMPC.load(ckpts[1])
    assert loaded.num_timesteps == 40


def test_logger_train_keys(trained: dict[str, Any]) -> None:
    """The ``train/`` keys (losses, KL mean/std, λ, scales, planner std) reach the csv logger with finite values."""
    with open(trained["folder"] / "log" / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    # SB3 dumps once per finished episode: the two envs finish together, so every second row is empty
    rows = [row for row in rows if row.get("train/n_updates")]
    assert len(rows) == 2  # episodes end at 60 and 120 timesteps
    keys = set(rows[-1])
    expected = {
        "train/consistency_loss", "train/reward_loss", "train/value_loss", "train/policy_loss", "train/prior_loss",
        "train/kl_mean", "train/kl_std", "train/kl_coef", "train/planner_std", "train/q_scale", "train/kl_scale",
        "train/learning_rate", "train/n_updates", "train/grad_norm",
    }
    assert expected <= keys, sorted(expected - keys)
    last = rows[-1]
    for key in expected:
        assert math.isfinite(float(last[key])), (key, last[key])
    assert float(last["train/kl_coef"]) == 1.0  # the pompc preset's λ
    assert 0.05 - 1e-6 <= float(last["train/planner_std"]) <= 2.0 + 1e-6
    assert float(last["train/q_scale"]) >= 1.0 - 1e-6


def test_save_load_predict_identical(trained: dict[str, Any], tmp_path: Path) -> None:
    """save → load (with and without an env) → predict returns the same actions and states for the same torch seed,
    stochastic and deterministic, also when the returned state is fed back."""
    model: POMPC = trained["model"]
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = POMPC.load(path, env=short_pendulum(n_envs=2))
    loaded_no_env = POMPC.load(path)
    obs = np.array([[0.3, -0.95, 1.2], [-0.8, 0.6, -3.0]], np.float32)
    for deterministic in (False, True):
        outputs = []
        for m in (model, loaded, loaded_no_env):
            torch.manual_seed(123)
            a1, s1 = m.predict(obs, deterministic=deterministic)
            a2, s2 = m.predict(obs, state=s1, episode_start=np.array([False, True]), deterministic=deterministic)
            outputs.append((a1, s1, a2, s2))
        for other in outputs[1:]:
            for x, y in zip(outputs[0], other):
                assert x.dtype == y.dtype and np.array_equal(x, y)
        a1, s1, a2, s2 = outputs[0]
        assert a1.shape == (2, 1) and s1.shape == (2, model.horizon, 1)
        assert np.all(np.abs(a1) <= 2.0) and np.all(np.abs(a2) <= 2.0)
    # the seed matters for a stochastic plan (so the equality above is not trivially true)
    torch.manual_seed(1)
    a_1, _ = model.predict(obs)
    torch.manual_seed(2)
    a_2, _ = model.predict(obs)
    assert not np.array_equal(a_1, a_2)


def test_simnorm_layout_is_saved_and_files_without_it_load_contiguous(tmp_path: Path) -> None:
    """New agents use the strided SimNorm and save it in their policy kwargs; a file saved before the option
    existed (no ``simnorm_layout`` in its model kwargs, contiguous groups) loads with contiguous groups, so it
    computes what it computed when it was saved."""
    new = POMPC("MlpPolicy", "Pendulum-v1", **TINY)
    assert new.policy.model.encoder[-1].act.layout == "strided"
    new.save(tmp_path / "new.zip")
    assert POMPC.load(tmp_path / "new.zip").policy.model.dynamics[-1].act.layout == "strided"
    old = POMPC("MlpPolicy", "Pendulum-v1", simnorm_layout="contiguous", **TINY)
    del old.policy_kwargs["model_kwargs"]["simnorm_layout"]  # as written by earlier versions
    old.save(tmp_path / "old.zip")
    loaded = POMPC.load(tmp_path / "old.zip")
    assert loaded.policy.model.encoder[-1].act.layout == "contiguous"
    obs = torch.randn(4, 3)
    torch.testing.assert_close(loaded.policy.model.encode(obs), old.policy.model.encode(obs), rtol=0, atol=0)


def test_evaluate_policy_passes_state(trained: dict[str, Any]) -> None:
    """``evaluate_policy`` works and feeds the planner state and episode starts back into predict."""
    model: POMPC = trained["model"]
    calls: list[tuple[Optional[np.ndarray], Optional[np.ndarray], np.ndarray]] = []
    original = model.policy.predict

    def spy(observation, state=None, episode_start=None, deterministic=False):
        action, new_state = original(observation, state, episode_start, deterministic)
        calls.append((None if state is None else np.array(state), None if episode_start is None else np.array(episode_start), new_state))
        return action, new_state

    model.policy.predict = spy  # type: ignore[method-assign]
    try:
        eval_env = short_pendulum(n_envs=1, episode_steps=15, seed=5)
        returns, lengths = evaluate_policy(model, eval_env, n_eval_episodes=2, return_episode_rewards=True)
    finally:
        del model.policy.predict
    assert lengths == [15, 15] and all(math.isfinite(r) and r <= 0.0 for r in returns)
    assert len(calls) == 30
    assert calls[0][0] is None and calls[0][1] is not None and calls[0][1].all()
    for (_, _, prev_state), (state, episode_start, _) in zip(calls[:-1], calls[1:]):
        assert state is not None and np.array_equal(state, prev_state)
    # the second episode starts at call 15: its episode_start is True, the others False
    starts = [bool(c[1][0]) for c in calls]
    assert starts == [True] + [False] * 14 + [True] + [False] * 14


def test_predict_single_observation(trained: dict[str, Any]) -> None:
    """One unbatched observation → one unbatched action inside the env's bounds; the state round-trips."""
    model: POMPC = trained["model"]
    obs = np.array([0.0, 1.0, 0.5], np.float32)
    action, state = model.predict(obs)
    assert action.shape == (1,) and state.shape == (1, model.horizon, 1)
    assert -2.0 <= float(action[0]) <= 2.0
    action2, state2 = model.predict(obs, state=state, episode_start=np.array([False]), deterministic=True)
    assert action2.shape == (1,) and state2.shape == state.shape
    # a wrong state shape is refused with the expected shape in the message
    with pytest.raises(ValueError, match="n_envs, horizon, action_dim"):
        model.predict(obs, state=np.zeros((2, model.horizon, 1), np.float32))


def test_vec_normalize(tmp_path: Path) -> None:
    """Training under VecNormalize: the buffer keeps raw observations and samples normalised ones; the stats save
    and load; a model loaded with the loaded VecNormalize predicts."""
    venv = VecNormalize(short_pendulum(n_envs=1, seed=3), gamma=0.99)
    model = POMPC("MlpPolicy", venv, seed=3, **tiny(learning_starts=40))
    model.learn(60)
    assert model.get_vec_normalize_env() is venv and venv.obs_rms.count > 60
    rb = model.replay_buffer
    raw = rb.observations[: rb.pos, 0]
    assert np.all(np.abs(raw[:, :2]) <= 1.0 + 1e-6)  # cos θ, sin θ: raw, not normalised
    batch = rb.sample(8, env=venv)
    expected = venv.normalize_obs(rb.observations[batch.rows[0], batch.env_indices])
    np.testing.assert_allclose(batch.observations[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch.rewards[0, :, 0].numpy(), venv.normalize_reward(rb.rewards[batch.rows[0], batch.env_indices]), rtol=1e-5, atol=1e-6)

    stats, path = tmp_path / "vecnormalize.pkl", tmp_path / "model.zip"
    venv.save(stats)
    model.save(path)
    loaded_env = VecNormalize.load(str(stats), short_pendulum(n_envs=1))
    np.testing.assert_array_equal(loaded_env.obs_rms.mean, venv.obs_rms.mean)
    np.testing.assert_array_equal(loaded_env.obs_rms.var, venv.obs_rms.var)
    loaded = POMPC.load(path, env=loaded_env)
    loaded.learn(10, reset_num_timesteps=False)  # continues training with the loaded statistics
    action, _ = loaded.predict(loaded_env.reset())
    assert action.shape == (1, 1) and np.all(np.abs(action) <= 2.0)


def test_action_bounds_other_than_unit() -> None:
    """An env with a box other than [−1, 1]: the env only receives actions inside its box (warm-up and planned),
    the buffer stores them scaled to [−1, 1], and predict returns actions inside the box."""
    env = BoundsEnv()
    model = POMPC("MlpPolicy", env, seed=4, **tiny(learning_starts=30))
    model.learn(60)
    received = np.array(env.received)  # the DummyVecEnv wraps this very instance
    assert received.shape == (60, 2)
    low, high = env.action_space.low, env.action_space.high
    assert np.all(received >= low) and np.all(received <= high)
    stored = model.replay_buffer.actions[:60, 0]
    assert np.all(np.abs(stored) <= 1.0)
    np.testing.assert_allclose(low + 0.5 * (stored + 1.0) * (high - low), received, atol=1e-5)
    # the second dimension's box is [0, 3]: planned actions use more than the [0, 1] part of it
    assert received[30:, 1].max() > 1.0
    obs = np.stack([env._obs(), -env._obs()])
    actions, _ = model.predict(obs)
    assert actions.shape == (2, 2) and np.all(actions >= low) and np.all(actions <= high)


PRESET_CASES = [
    dict(preset="tdmpc2"),
    dict(preset="bmpc", reanalyze_interval=2),
    dict(preset="pompc"),
    dict(preset="pompc", prior="forward", kl_coef="auto", kl_value=True),
    dict(preset="pompc", prior="planner", kl_coef=1.0, kl_warmup=20, reanalyze_interval=2),
    dict(preset="pompc", prior="reverse", kl_coef=float("inf")),
    dict(preset="pompc", prior="forward", kl_coef=0.0),
    dict(preset="tdmpc2", kl_coef="auto_0.5", kl_value=True, kl_warmup=10, reanalyze_interval=2),
    dict(preset="bmpc", prior="reverse"),
]


@pytest.mark.parametrize("case", PRESET_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_presets_and_variants_train(case: dict[str, Any]) -> None:
    """Presets × priors × λ (0, 1, ∞, auto) × kl_value × kl_warmup × reanalyze run 220 env steps (two episodes'
    worth of warm-up, then 70 updates) with finite parameters and the expected λ."""
    model = POMPC("MlpPolicy", "Pendulum-v1", seed=0, **tiny(learning_starts=150), **case)
    model.learn(220)
    assert model._n_updates == 5 + 70
    assert _params_finite(model)
    lam = model.current_kl_coef()
    requested = case.get("kl_coef", {"tdmpc2": 0.0, "bmpc": float("inf"), "pompc": 1.0}[case["preset"]])
    if isinstance(requested, str):  # auto: λ was learned (moved from its initial value)
        init = float(requested.split("_")[1]) if "_" in requested else 1.0
        assert math.isfinite(lam) and lam > 0 and lam != init
    else:
        assert lam == requested
    if case.get("reanalyze_interval"):
        # reanalyze rewrote π^P of warm-up rows (which had none)
        assert model.replay_buffer.has_plan[:150].any()
    if case.get("kl_value"):
        assert model.policy.model.kl_critic is not None


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "action_space",
    [spaces.Discrete(3), spaces.MultiDiscrete([2, 3]), spaces.MultiBinary(4)],
    ids=["Discrete", "MultiDiscrete", "MultiBinary"],
)
def test_non_box_actions_refused(action_space: spaces.Space) -> None:
    env = SpacesEnv(spaces.Box(-1.0, 1.0, (3,), np.float32), action_space)
    with pytest.raises(ValueError, match=f"continuous Box action spaces only.*{type(action_space).__name__}"):
        POMPC("MlpPolicy", env, **TINY)
    with pytest.raises(ValueError, match="Box action spaces only"):
        POMPC("MlpPolicy", DummyVecEnv([lambda: SpacesEnv(spaces.Box(-1.0, 1.0, (3,), np.float32), action_space)]), **TINY)


def test_unbounded_actions_refused() -> None:
    env = SpacesEnv(spaces.Box(-1.0, 1.0, (3,), np.float32), spaces.Box(-np.inf, np.inf, (2,), np.float32))
    with pytest.raises(ValueError, match="finite action bounds"):
        POMPC("MlpPolicy", env, **TINY)


def test_image_observations_refused() -> None:
    env = SpacesEnv(spaces.Box(0, 255, (32, 32, 3), np.uint8), spaces.Box(-1.0, 1.0, (2,), np.float32))
    with pytest.raises(ValueError, match="state \\(vector\\) observations only.*image"):
        POMPC("MlpPolicy", env, **TINY)


def test_dict_with_discrete_entry_refused() -> None:
    obs_space = spaces.Dict({"pos": spaces.Box(-1.0, 1.0, (2,), np.float32), "mode": spaces.Discrete(3)})
    env = SpacesEnv(obs_space, spaces.Box(-1.0, 1.0, (2,), np.float32))
    with pytest.raises(ValueError, match="flatten Dict observations of Box entries only"):
        POMPC("MlpPolicy", env, **TINY)
    # a VecEnv cannot be flattened here: the message says how to fix it
    venv = DummyVecEnv([lambda: SpacesEnv(spaces.Dict({"pos": spaces.Box(-1.0, 1.0, (2,), np.float32)}),
                                          spaces.Box(-1.0, 1.0, (2,), np.float32))])
    with pytest.raises(ValueError, match="FlattenObservation"):
        POMPC("MlpPolicy", venv, **TINY)


def test_dict_of_box_env_is_flattened_and_trains(tmp_path: Path) -> None:
    model = POMPC("MlpPolicy", DictBoxEnv(), seed=0, **tiny(learning_starts=30))
    assert isinstance(model.observation_space, spaces.Box) and model.observation_space.shape == (5,)
    model.learn(45)
    assert model._n_updates == 5 + 15 and _params_finite(model)
    next_obs = model.replay_buffer.next_observations[:45, 0]
    # flattened in key order (position, velocity): both position entries equal 0.1·t after step t of an episode
    t = np.arange(45) % 30 + 1
    np.testing.assert_allclose(next_obs[:, 0], 0.1 * t, rtol=1e-6)
    np.testing.assert_allclose(next_obs[:, 1], 0.1 * t, rtol=1e-6)
    # predict takes the env's own Dict observations (flattened as in training), single or batched
    single = {"position": np.array([0.3, -0.2], np.float32), "velocity": np.array([0.1, 0.0, 2.0], np.float32)}
    flat = np.array([0.3, -0.2, 0.1, 0.0, 2.0], np.float32)
    torch.manual_seed(0)
    a_dict, s_dict = model.predict(single)
    torch.manual_seed(0)
    a_flat, s_flat = model.predict(flat)
    assert a_dict.shape == (2,) and np.array_equal(a_dict, a_flat) and np.array_equal(s_dict, s_flat)
    batch = {k: np.stack([v, v]) for k, v in single.items()}
    assert model.predict(batch)[0].shape == (2, 2)
    returns, lengths = evaluate_policy(model, DictBoxEnv(), n_eval_episodes=1, return_episode_rewards=True)
    assert lengths == [30] and math.isfinite(returns[0])
    # load with the Dict env flattens it as at construction
    model.save(tmp_path / "dict_model.zip")
    loaded = POMPC.load(tmp_path / "dict_model.zip", env=DictBoxEnv())
    loaded.learn(5, reset_num_timesteps=False)
    assert loaded.num_timesteps == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kl_coef=-0.5), "must be >= 0"),
        (dict(kl_coef=float("nan")), "must be >= 0"),
        (dict(kl_coef="auto_-1"), "must be finite and > 0"),
        (dict(kl_coef="sometimes"), "float >= 0, inf, 'auto'"),
        (dict(prior="uniform"), "unknown prior 'uniform'; supported priors: \\['planner', 'forward', 'reverse'\\]"),
        (dict(preset="dreamer"), "unknown preset 'dreamer'; supported presets: \\['bmpc', 'pompc', 'tdmpc2'\\]"),
        (dict(horizon=0), "horizon must be >= 1"),
        (dict(num_elites=64, num_samples=32), "num_elites \\(64\\) must be <= num_samples \\(32\\)"),
        (dict(num_pi_trajs=32, num_samples=32), "num_pi_trajs \\(32\\) must be < num_samples"),
        (dict(critic="v", kl_coef=1.0), "critic='v'.*supports only kl_coef=inf"),
        (dict(kl_value=True, kl_coef=float("inf")), "kl_value=True needs a finite"),
        (dict(simnorm_layout="blocked"), "simnorm_layout must be one of \\('contiguous', 'strided'\\)"),
    ],
)
def test_bad_hyperparameters_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        POMPC("MlpPolicy", "Pendulum-v1", **{**TINY, **kwargs})


@pytest.mark.parametrize(
    ("nan_step", "what"),
    [(40, "non-finite observation"), (60, "non-finite terminal observation"), (0, "non-finite observation")],
    ids=["mid-episode", "terminal-observation", "first-reset"],
)
def test_non_finite_observation_stops_training(nan_step: int, what: str) -> None:
    """A NaN observation (mid-episode after training started, as the terminal observation of an episode, or from
    the first reset) stops training with an error naming the problem before it reaches the buffer."""
    env = NaNObsEnv(nan_step)
    model = POMPC("MlpPolicy", env, seed=0, **tiny(learning_starts=20, pretrain_updates=2))
    with pytest.raises(ValueError, match=what):
        model.learn(80)
    rb = model.replay_buffer
    assert np.isfinite(rb.observations[: rb.pos]).all() and np.isfinite(rb.next_observations[: rb.pos]).all()
    assert _params_finite(model)
    assert rb.pos == max(nan_step - 1, 0)  # every transition before the poisoned one was stored


def test_predict_refuses_non_finite_observation(trained: dict[str, Any]) -> None:
    model: POMPC = trained["model"]
    with pytest.raises(ValueError, match="non-finite observation"):
        model.predict(np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 0.0]], np.float32))
    with pytest.raises(ValueError, match="non-finite observation"):
        model.predict(np.array([np.inf, 1.0, 0.0], np.float32))
