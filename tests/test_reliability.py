"""Reliability of POMPC: exact resume across processes, determinism, numerical safety under adversarial batches,
bad input after construction (callbacks, damaged or mismatched model files) and the replay buffer's memory check.

All runs use a tiny CPU model and one torch thread; the file takes well under a minute of CPU time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common import buffers as sb3_buffers
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv

from conftest import TINY_ALGO, tiny_algo

from sb3_pompc import POMPC
from sb3_pompc.buffers import POMPCReplayBuffer
from sb3_pompc.math import symlog
from sb3_pompc.rng import get_rng_states

torch.set_num_threads(1)

TINY: dict[str, Any] = TINY_ALGO


tiny = tiny_algo


class PointMassEnv(gym.Env):
    """A deterministic 2-D point mass: the same start state at every reset, truncated after ``episode_length``
    steps, action box low = (−2, 0), high = (2, 3). Its state never depends on an RNG, so a fresh copy reset at an
    episode boundary is in exactly the state an auto-reset copy is in.

    :param episode_length: steps before truncation
    :param reward_scale: multiplies the reward −|pos|²
    """

    def __init__(self, episode_length: int = 50, reward_scale: float = 1.0) -> None:
        self.observation_space = spaces.Box(-10.0, 10.0, (4,), np.float32)
        self.action_space = spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 3.0], np.float32))
        self.episode_length, self.reward_scale = episode_length, reward_scale

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.pos, self.vel, self.t = np.array([0.5, -0.3]), np.zeros(2), 0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.vel]).astype(np.float32)

    def step(self, action: np.ndarray):
        action = np.clip(action, self.action_space.low, self.action_space.high)
        self.vel = 0.9 * self.vel + 0.1 * (action - np.array([0.0, 1.5]))
        self.pos = np.clip(self.pos + 0.1 * self.vel, -2.0, 2.0)
        self.t += 1
        return self._obs(), -self.reward_scale * float(np.sum(self.pos**2)), False, self.t >= self.episode_length, {}


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested structures of tensors, arrays, dicts, lists and scalars (torch.equal, array_equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def optimizer_states(model: POMPC) -> dict[str, Any]:
    """Every optimiser's state dict (world model, π_s, π_p, Q̃, λ)."""
    policy = model.policy
    named = dict(model=policy.optimizer, pi=policy.pi_optimizer, prior=policy.prior_optimizer,
                 kl_critic=policy.kl_critic_optimizer, kl_coef=model.kl_coef_optimizer)
    return {name: opt.state_dict() for name, opt in named.items() if opt is not None}


BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts", "plan_means",
                 "plan_stds", "has_plan")


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))


# --------------------------------------------------------------------------------------------- 1. exact resume
RESUME_CFG = tiny(kl_coef="auto", prior="reverse", kl_value=True, reanalyze_interval=3, learning_starts=50)
RESUME_SEED, K, EPISODE, REWARD_SCALE = 7, 100, 50, 30.0

RESUME_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_reliability import K, PointMassEnv
    from sb3_pompc import POMPC

    model = POMPC.load({src!r}, env=PointMassEnv({episode}, {reward_scale}))
    model.load_replay_buffer({src_buffer!r})
    assert model.num_timesteps == K and model.replay_buffer.pos == K
    model.learn(K, reset_num_timesteps=False)
    model.save({dst!r})
    model.save_replay_buffer({dst_buffer!r})
    print("resumed-in-pid", os.getpid())
    """
)


def test_exact_resume_in_a_new_process(tmp_path: Path) -> None:
    """Train k steps, save the model and the replay buffer, continue k steps in a NEW PROCESS after loading both,
    and compare with one uninterrupted 2k-step run of the same seed: bit-identical parameters (running scales Q/KL
    included), optimiser states (world model, π_s, π_p, Q̃, λ), λ, buffer (planner stats included, which lazy
    reanalyze rewrites), counters and the RNG streams at the end.

    Protocol. SB3's ``load`` creates a fresh env and resets it (``force_reset``); the env's own state and RNG cannot
    be saved in general. So the boundary k is the end of an episode (k = 2 episodes of 50 steps) of a deterministic
    env (:class:`PointMassEnv`, same start state at every reset): the uninterrupted run auto-resets there into the
    very state the resumed run's fresh env resets into, and the planner warm start is dropped at an episode start in
    both runs (so ``_plan_mean``, which is not saved, does not matter). The model saves the global RNG states
    (python, numpy, torch) and the action space's, and ``load`` restores them for a seeded model instead of SB3's
    re-seeding; without that the resumed run replays the random numbers of step 0 (the first test of this file's
    history: actions differed from the first planned step after the boundary).
    """
    first = POMPC("MlpPolicy", PointMassEnv(EPISODE, REWARD_SCALE), seed=RESUME_SEED, **RESUME_CFG)
    # Q's spread stays < 1 in such a short run, so S_Q would sit at its floor 1 in both runs: start it at 5, so that
    # every policy update moves it (S ← S + τ(max(P95 − P5, 1) − S)) and its comparison below means something
    first.policy.q_scale.value.fill_(5.0)
    first.learn(K)
    assert first._n_updates == 5 + K - 50  # real updates happened before the boundary
    src, src_buffer = tmp_path / "k.zip", tmp_path / "k_buffer.pkl"
    dst, dst_buffer = tmp_path / "2k_resumed.zip", tmp_path / "2k_resumed_buffer.pkl"
    first.save(src)
    first.save_replay_buffer(src_buffer)
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), src=str(src), src_buffer=str(src_buffer),
                                  dst=str(dst), dst_buffer=str(dst_buffer), episode=EPISODE,
                                  reward_scale=REWARD_SCALE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed-in-pid" in proc.stdout and int(proc.stdout.split()[-1]) != os.getpid()

    whole = POMPC("MlpPolicy", PointMassEnv(EPISODE, REWARD_SCALE), seed=RESUME_SEED, **RESUME_CFG)
    whole.policy.q_scale.value.fill_(5.0)
    whole.learn(2 * K)
    whole_rng = get_rng_states(whole.action_space, whole.device)

    resumed = POMPC.load(dst)  # restores the resumed run's RNG states into this process
    resumed.load_replay_buffer(dst_buffer)
    resumed_rng = get_rng_states(resumed.action_space, resumed.device)

    for name in ("num_timesteps", "_n_updates", "_n_policy_updates", "_episode_num"):
        assert getattr(resumed, name) == getattr(whole, name), name
    assert whole._n_updates == 5 + 2 * K - 50 and whole._episode_num == 2 * K // EPISODE
    assert_identical(resumed.policy.state_dict(), whole.policy.state_dict(), "policy")
    assert torch.equal(resumed.policy.q_scale.value, whole.policy.q_scale.value)
    assert torch.equal(resumed.policy.kl_scale.value, whole.policy.kl_scale.value)
    assert 1.0 < resumed.policy.q_scale.value.item() < 5.0  # the running scale moved: the comparison is not vacuous
    assert torch.equal(resumed.log_kl_coef, whole.log_kl_coef) and resumed.current_kl_coef() != 1.0
    assert_identical(optimizer_states(resumed), optimizer_states(whole), "optimizers")
    rb_r, rb_w = resumed.replay_buffer, whole.replay_buffer
    assert (rb_r.pos, rb_r.full) == (rb_w.pos, rb_w.full) == (2 * K, False)
    for name in BUFFER_ARRAYS:
        assert_identical(getattr(rb_r, name), getattr(rb_w, name), f"buffer.{name}")
    assert rb_w.has_plan[:50].any()  # reanalyze rewrote warm-up rows in both runs
    # the random streams are aligned at the end as well (the next step would be identical too)
    assert torch.equal(resumed_rng["torch"], whole_rng["torch"])
    assert_identical(resumed_rng["numpy"], whole_rng["numpy"], "numpy rng")


# -------------------------------------------------------------------------------------------- 2. determinism
def _train_and_evaluate(seed: int) -> tuple[POMPC, list[float]]:
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1", max_episode_steps=40), seed=seed, **tiny(learning_starts=40))
    model.learn(80)
    eval_env = DummyVecEnv([lambda: gym.make("Pendulum-v1", max_episode_steps=40)])
    eval_env.seed(1234)
    torch.manual_seed(0)
    returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=2, return_episode_rewards=True)
    return model, list(returns)


def test_same_seed_same_results_other_seed_differs() -> None:
    """Two CPU runs with the same seed give identical parameters and identical evaluation returns (seeded eval env,
    seeded torch); another seed gives different ones."""
    model_a, returns_a = _train_and_evaluate(seed=0)
    model_b, returns_b = _train_and_evaluate(seed=0)
    model_c, returns_c = _train_and_evaluate(seed=1)
    assert returns_a == returns_b, (returns_a, returns_b)
    assert_identical(model_a.policy.state_dict(), model_b.policy.state_dict(), "policy")
    for name in BUFFER_ARRAYS:
        assert_identical(getattr(model_a.replay_buffer, name), getattr(model_b.replay_buffer, name), name)
    assert returns_c != returns_a
    a, c = model_a.policy.state_dict(), model_c.policy.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


# ----------------------------------------------------------------------------------------- 3. numerical safety
def _fill_adversarial(model: POMPC, rows: int, seed: int = 0) -> None:
    """Fill the buffer with adversarial transitions: π^P std at the floor (0.05) or the ceiling (2), π^P means at ±1,
    actions at the box corners, rewards of ±1e4 and ±1e5 (value targets far beyond the two-hot support), large
    observations, 25-step episodes ending in terminations or truncations."""
    rng = np.random.default_rng(seed)
    rb: POMPCReplayBuffer = model.replay_buffer
    A = int(np.prod(model.action_space.shape))
    obs = rng.normal(size=(1, 4)).astype(np.float32)
    for t in range(rows):
        scale = 50.0 if t % 7 == 0 else 1.0
        next_obs = (rng.normal(size=(1, 4)) * scale).astype(np.float32)
        action = rng.choice([-1.0, 1.0], size=(1, A)).astype(np.float32)
        reward = rng.choice([-1e5, -1e4, 1e4, 1e5], size=1).astype(np.float32)
        end = (t + 1) % 25 == 0
        truncated = end and (t // 25) % 2 == 0
        mean = rng.choice([-1.0, 1.0], size=(1, A))
        std = rng.choice([0.05, 2.0], size=(1, A))
        rb.set_next_plan(mean, std)
        rb.add(obs, next_obs, action, reward, np.array([end]), [{"TimeLimit.truncated": truncated}])
        obs = rng.normal(size=(1, 4)).astype(np.float32) if end else next_obs


@pytest.mark.parametrize(
    ("case", "updates"),
    [
        (dict(preset="pompc", prior="reverse", kl_coef="auto", kl_value=True, episodic=True), 1000),
        (dict(preset="bmpc", reanalyze_interval=40), 1000),
    ],
    ids=["pompc-auto-kl_value-episodic", "bmpc-reanalyze"],
)
def test_adversarial_batches_stay_finite(case: dict[str, Any], updates: int) -> None:
    """Thousands of updates (2000 over both cases) on adversarial buffer contents: every loss, parameter,
    optimiser moment, running scale and λ stays finite, and the planner still returns finite actions in [−1, 1]."""
    model = POMPC("MlpPolicy", PointMassEnv(), seed=0, **tiny(batch_size=8), **case)
    _fill_adversarial(model, rows=400)
    # the data is adversarial: rewards beyond the two-hot support, π^P std at both clamps
    assert float(symlog(torch.tensor(1e5))) > model.policy.model.two_hot.vmax
    assert np.array_equal(np.unique(model.replay_buffer.plan_stds[:400]), np.array([0.05, 2.0], np.float32))
    logs: list[dict[str, torch.Tensor]] = []
    for i in range(updates):
        logs.append(model._update(8, pretrain=i < 20))
    keys = {k for log in logs for k in log}
    assert {"consistency_loss", "reward_loss", "value_loss", "policy_loss", "kl_mean"} <= keys
    for key in keys:
        values = torch.stack([log[key].float().reshape(()) for log in logs if key in log])
        assert torch.isfinite(values).all(), (key, values[~torch.isfinite(values)][:5])
    for name, p in model.policy.state_dict().items():
        if p.is_floating_point():
            assert torch.isfinite(p).all(), name
    for opt_name, state in optimizer_states(model).items():
        for moments in state["state"].values():
            for k, v in moments.items():
                assert torch.isfinite(torch.as_tensor(v)).all(), (opt_name, k)
    assert torch.isfinite(model.policy.q_scale.value).all() and torch.isfinite(model.policy.kl_scale.value).all()
    assert float(model.policy.kl_scale.value) >= 1.0 and float(model.policy.q_scale.value) >= 1.0
    if model.log_kl_coef is not None:
        assert torch.isfinite(model.log_kl_coef).all()
    obs = torch.as_tensor(model.replay_buffer.observations[:16, 0])
    res = model.policy.plan(obs, None, deterministic=False)
    assert torch.isfinite(res.action).all() and res.action.abs().max() <= 1.0
    assert torch.all(res.plan_std >= 0.05 - 1e-6) and torch.all(res.plan_std <= 2.0 + 1e-6)


@pytest.mark.parametrize(
    ("head", "term"), [("reward", "world-model loss"), ("prior", "prior loss")], ids=["reward-head", "prior-head"]
)
def test_non_finite_loss_stops_training_and_keeps_checkpoints(tmp_path: Path, head: str, term: str) -> None:
    """NaN parameters in a head make the next update raise FloatingPointError naming the loss term, before any
    optimiser step on that loss; checkpoints written before keep their bytes and load with finite parameters."""
    model = POMPC("MlpPolicy", PointMassEnv(40), seed=0, **tiny(learning_starts=30, prior="reverse"))
    ckpt_dir = tmp_path / "ckpt"
    model.learn(40, callback=CheckpointCallback(save_freq=20, save_path=str(ckpt_dir), name_prefix="pompc"))
    model.save(tmp_path / "before.zip")
    files_before = {p: p.read_bytes() for p in tmp_path.rglob("*.zip")}
    assert len(files_before) == 3  # 2 checkpoints + the explicit save

    with torch.no_grad():
        for p in getattr(model.policy.model, head).parameters():
            p.fill_(float("nan"))
    snapshot = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(FloatingPointError, match=f"non-finite {term}"):
        model.learn(40, reset_num_timesteps=False,
                    callback=CheckpointCallback(save_freq=20, save_path=str(ckpt_dir), name_prefix="pompc"))
    after = model.policy.state_dict()
    if head == "reward":  # stopped before the world-model step: nothing changed
        for k in snapshot:
            assert _nan_equal(after[k], snapshot[k]), k
    else:  # the world-model step ran; π_p (and π_s, updated after π_p) did not
        for k in snapshot:
            if k.startswith(("model.prior.", "model.pi.")):
                assert _nan_equal(after[k], snapshot[k]), k
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.zip")} == files_before
    for path in files_before:
        loaded = POMPC.load(path)
        assert all(torch.isfinite(v).all() for v in loaded.policy.state_dict().values() if v.is_floating_point())


# -------------------------------------------------------------------------------- 4. bad input after construction
class ActionTamperingCallback(BaseCallback):
    """A user callback that changes the actions about to be stored, in place (``self.locals["buffer_actions"]``):
    scaled ×5 (far outside [−1, 1]) at every step; it keeps a copy of what the planner/warm-up produced."""

    def __init__(self) -> None:
        super().__init__()
        self.original: list[np.ndarray] = []

    def _on_step(self) -> bool:
        buffer_actions = self.locals["buffer_actions"]
        self.original.append(buffer_actions.copy())
        buffer_actions *= 5.0
        return True


def test_out_of_bounds_actions_from_a_callback_are_clipped() -> None:
    """Actions the user pushes outside the box (a callback editing ``buffer_actions`` in place) are stored clipped
    to [−1, 1]: the world model and the KL terms only ever see actions of the planner's box. A NaN action is
    refused with a clear error."""
    callback = ActionTamperingCallback()
    model = POMPC("MlpPolicy", PointMassEnv(), seed=0, **tiny(learning_starts=30))
    model.learn(45, callback=callback)
    stored = model.replay_buffer.actions[:45, 0]
    original = np.concatenate(callback.original)
    assert np.abs(5.0 * original).max() > 1.5  # the callback did push actions out of the box
    np.testing.assert_array_equal(stored, np.clip(5.0 * original, -1.0, 1.0))
    assert all(torch.isfinite(v).all() for v in model.policy.state_dict().values() if v.is_floating_point())

    class NaNCallback(BaseCallback):
        def _on_step(self) -> bool:
            self.locals["buffer_actions"][:] = np.nan
            return True

    with pytest.raises(ValueError, match="non-finite action"):
        model.learn(5, reset_num_timesteps=False, callback=NaNCallback())


def test_predict_then_step_stays_in_bounds() -> None:
    """A user loop predict → env.step: actions within the env's box for observations far outside its observation
    box as well (the planner clamps in [−1, 1] and unscales)."""
    model = POMPC("MlpPolicy", PointMassEnv(), seed=0, **tiny())
    env = PointMassEnv()
    obs, _ = env.reset()
    state = None
    for t in range(5):
        action, state = model.predict(obs * (1.0 if t % 2 else 1e4), state=state, episode_start=np.array([t == 0]))
        assert action.shape == (2,)
        assert np.all(action >= env.action_space.low) and np.all(action <= env.action_space.high)
        obs, *_ = env.step(action)


@pytest.fixture(scope="module")
def saved_pendulum(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny POMPC saved for Pendulum-v1 (obs 3, action 1 in [−2, 2])."""
    path = tmp_path_factory.mktemp("saved") / "pendulum.zip"
    POMPC("MlpPolicy", "Pendulum-v1", seed=0, **tiny(buffer_size=1000)).save(path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "corrupted-data", "corrupted-weights", "not-a-zip"])
def test_damaged_model_file_gives_clear_error(saved_pendulum: Path, tmp_path: Path, damage: str) -> None:
    import zipfile

    original = saved_pendulum.read_bytes()
    with zipfile.ZipFile(saved_pendulum) as archive:
        offsets = {info.filename: info.header_offset for info in archive.infolist()}
    data = bytearray(original)
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "corrupted-data":  # inside the JSON member
        data[200:264] = bytes(64)
    elif damage == "corrupted-weights":  # inside policy.pth
        start = offsets["policy.pth"] + 2000
        data[start : start + 64] = bytes(64)
    else:
        data = bytearray(b"this is not a model\n" * 50)
    path = tmp_path / f"{damage}.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="zip|truncated or corrupted"):
        POMPC.load(path)
    assert path.read_bytes() == bytes(data)  # the damaged file is left as it was
    assert saved_pendulum.read_bytes() == original


@pytest.mark.parametrize(
    ("env_factory", "message"),
    [
        (lambda: PointMassEnv(), "Observation spaces do not match"),
        (lambda: gym.wrappers.RescaleAction(gym.make("Pendulum-v1"), -1.0, 1.0), "Action spaces do not match"),
    ],
    ids=["other-observations", "other-action-bounds"],
)
def test_load_with_mismatched_env_refused(saved_pendulum: Path, env_factory, message: str) -> None:
    before = saved_pendulum.read_bytes()
    with pytest.raises(ValueError, match=message):
        POMPC.load(saved_pendulum, env=env_factory())
    assert saved_pendulum.read_bytes() == before


# ------------------------------------------------------------------------------------------------- 5. memory
def test_memory_estimate_matches_allocation() -> None:
    """The estimate equals the bytes of every array the buffer allocates (float32 and float64 observations, 2 envs)."""
    for obs_space in (spaces.Box(-1.0, 1.0, (5,), np.float32), spaces.Box(-1.0, 1.0, (2, 3), np.float64)):
        action_space = spaces.Box(-2.0, 2.0, (3,), np.float32)
        rb = POMPCReplayBuffer(1001, obs_space, action_space, device="cpu", n_envs=2, horizon=3)
        allocated = sum(getattr(rb, name).nbytes for name in BUFFER_ARRAYS)
        assert rb.memory_bytes == allocated == POMPCReplayBuffer.estimate_memory(1001, obs_space, action_space, 2)


def test_memory_of_one_million_transitions_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    """1M transitions of Pendulum: the figure is logged before the arrays are allocated."""
    env = gym.make("Pendulum-v1")
    expected = POMPCReplayBuffer.estimate_memory(1_000_000, env.observation_space, env.action_space)
    assert expected == 1_000_000 * (2 * 3 * 4 + 4 + 3 * 4 + 2 * 4 + 1)
    with caplog.at_level("INFO", logger="sb3_pompc.buffers"):
        model = POMPC("MlpPolicy", env, **tiny(buffer_size=1_000_000))
    assert model.replay_buffer.memory_bytes == expected
    assert f"1000000 transitions need {expected / 1e9:.3f} GB" in caplog.text and "available" in caplog.text


def test_buffer_that_cannot_fit_is_refused_before_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffer larger than the available memory raises MemoryError with both figures, before SB3 allocates."""
    allocated: list[int] = []
    original_init = sb3_buffers.ReplayBuffer.__init__

    def spy(self, buffer_size, *args, **kwargs):
        allocated.append(buffer_size)
        original_init(self, buffer_size, *args, **kwargs)

    monkeypatch.setattr(sb3_buffers.ReplayBuffer, "__init__", spy)
    with pytest.raises(MemoryError, match=r"10000000000000 transitions need \d+\.\d+ GB \(\d+\.\d+ GB available\).*buffer_size"):
        POMPC("MlpPolicy", PointMassEnv(), **tiny(buffer_size=10**13))
    assert allocated == []
    # a small buffer goes through the same path and allocates
    POMPC("MlpPolicy", PointMassEnv(), **tiny(buffer_size=1000))
    assert allocated == [1000]
