"""POMPCReplayBuffer: window sampling, alignment of planner stats, terminations, wrap-around (property tests).

Every stored value encodes its identity (env, episode, step in episode, global step), so a sampled window can be
checked field by field against the simulated ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_pompc.buffers import POMPCReplayBuffer, POMPCReplayBufferSamples

D = 4  # obs and action size: (env, episode, step, global step)
OBS_SPACE = spaces.Box(-1e6, 1e6, (D,), np.float32)
ACT_SPACE = spaces.Box(-1e6, 1e6, (D,), np.float32)


def _obs(e: int, ep: int, s: int, t: int) -> np.ndarray:
    return np.array([e, ep, s, t], dtype=np.float32)


def _action(e, ep, s, t):
    return _obs(e, ep, s, t) + 0.5


def _reward(e, ep, s):
    return float(e * 10_000 + ep * 100 + s)


def _plan_mean(e, ep, s, t):
    return _obs(e, ep, s, t) + 0.25


def _plan_std(e, s):
    return np.full(D, s + 1 + 0.125 * e, dtype=np.float32)


@dataclass
class Step:
    ep: int
    s: int
    done: bool
    truncated: bool
    has_plan: bool


def simulate(buffer: POMPCReplayBuffer, n_envs: int, T: int, episodes: list[list[tuple[int, bool]]],
             plans: list[bool]) -> dict[tuple[int, int], Step]:
    """Feed T steps of n_envs envs into ``buffer``; env e plays the episodes ``episodes[e]`` = [(length, truncated)]
    in a loop. :return: ground truth keyed by (env, global step)."""
    truth: dict[tuple[int, int], Step] = {}
    ep = [0] * n_envs
    s = [0] * n_envs
    for t in range(T):
        obs = np.stack([_obs(e, ep[e], s[e], t) for e in range(n_envs)])
        next_obs = np.stack([_obs(e, ep[e], s[e] + 1, t + 1) for e in range(n_envs)])  # terminal obs included
        act = np.stack([_action(e, ep[e], s[e], t) for e in range(n_envs)])
        rew = np.array([_reward(e, ep[e], s[e]) for e in range(n_envs)], dtype=np.float32)
        done = np.zeros(n_envs, dtype=bool)
        infos: list[dict] = []
        for e in range(n_envs):
            length, truncated = episodes[e][ep[e] % len(episodes[e])]
            done[e] = s[e] + 1 >= length
            infos.append({"TimeLimit.truncated": bool(done[e] and truncated)})
            truth[(e, t)] = Step(ep[e], s[e], bool(done[e]), bool(done[e] and truncated), plans[t])
        if plans[t]:
            buffer.set_next_plan(np.stack([_plan_mean(e, ep[e], s[e], t) for e in range(n_envs)]),
                                 np.stack([_plan_std(e, s[e]) for e in range(n_envs)]))
        else:
            buffer.set_next_plan(None, None)
        buffer.add(obs, next_obs, act, rew, done, infos)
        for e in range(n_envs):
            if done[e]:
                ep[e], s[e] = ep[e] + 1, 0
            else:
                s[e] += 1
    return truth


def valid_windows(truth, n_envs: int, T: int, size: int, H: int) -> set[tuple[int, int]]:
    """(env, global start) of every window of H steps inside one episode whose rows are still stored."""
    out = set()
    for e in range(n_envs):
        for t0 in range(max(0, T - size), T - H + 1):
            steps = [truth[(e, t0 + k)] for k in range(H)]
            if all(st_.ep == steps[0].ep for st_ in steps) and not any(st_.done for st_ in steps[:-1]):
                out.add((e, t0))
    return out


def expected_window(truth, e: int, t0: int, H: int, size: int) -> dict[str, np.ndarray]:
    """The fields of the window of env e starting at global step t0, from the ground truth."""
    steps = [truth[(e, t0 + k)] for k in range(H)]
    last = steps[-1]
    return dict(
        # obs[H] is the true next observation (the terminal observation when the episode ended)
        observations=np.stack([_obs(e, st_.ep, st_.s, t0 + k) for k, st_ in enumerate(steps)]
                              + [_obs(e, last.ep, last.s + 1, t0 + H)]),
        actions=np.stack([_action(e, st_.ep, st_.s, t0 + k) for k, st_ in enumerate(steps)]),
        rewards=np.array([[_reward(e, st_.ep, st_.s)] for st_ in steps], np.float32),
        # terminated excludes truncations
        terminated=np.array([[float(st_.done and not st_.truncated)] for st_ in steps], np.float32),
        # planner stats at obs[k] are those chosen when action[k] was taken; N(0, 1) and flag 0 without a plan
        plan_mean=np.stack([_plan_mean(e, st_.ep, st_.s, t0 + k) if st_.has_plan else np.zeros(D, np.float32)
                            for k, st_ in enumerate(steps)]),
        plan_std=np.stack([_plan_std(e, st_.s) if st_.has_plan else np.ones(D, np.float32) for st_ in steps]),
        has_plan=np.array([[float(st_.has_plan)] for st_ in steps], np.float32),
        rows=np.array([(t0 + k) % size for k in range(H)]),
    )


def check_batch(batch: POMPCReplayBufferSamples, truth, H: int, size: int, valid: set) -> set[tuple[int, int]]:
    """Assert that every window of the batch is a valid window and equals the stored ground truth, field by field
    (vectorised over the batch). :return: the set of (env, start) sampled."""
    first = batch.observations[0].numpy()
    ids = np.stack([first[:, 0], first[:, 3]], axis=1).astype(np.int64)  # (env, global start) per window
    uniq, inverse = np.unique(ids, axis=0, return_inverse=True)
    seen = {(int(e), int(t0)) for e, t0 in uniq}
    assert seen <= valid, sorted(seen - valid)  # contiguous, one env, one episode, rows still stored
    np.testing.assert_array_equal(batch.env_indices, ids[:, 0])
    exp = [expected_window(truth, e, t0, H, size) for e, t0 in seen_sorted(uniq)]
    for field in ("observations", "actions", "rewards", "terminated", "plan_mean", "plan_std", "has_plan"):
        expected = np.stack([w[field] for w in exp], axis=1)[:, inverse.reshape(-1)]  # (T, B, ...)
        np.testing.assert_array_equal(getattr(batch, field).numpy(), expected, err_msg=field)
    expected_rows = np.stack([w["rows"] for w in exp], axis=1)[:, inverse.reshape(-1)]
    np.testing.assert_array_equal(batch.rows, expected_rows)
    return seen


def seen_sorted(uniq: np.ndarray) -> list[tuple[int, int]]:
    return [(int(e), int(t0)) for e, t0 in uniq]


episode_lists = st.lists(st.tuples(st.integers(1, 8), st.booleans()), min_size=1, max_size=4)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_envs=st.integers(1, 3),
    H=st.integers(1, 4),
    size_extra=st.integers(0, 24),
    T=st.integers(1, 60),
    episodes=st.lists(episode_lists, min_size=3, max_size=3),
    plan_seed=st.integers(0, 2**16),
)
def test_sampled_windows_are_true_contiguous_episode_windows(n_envs, H, size_extra, T, episodes, plan_seed):
    rows_per_env = H + size_extra
    rng = np.random.default_rng(plan_seed)
    plans = list(rng.random(T) < 0.6)
    # SB3 convention: buffer_size counts transitions over all envs, buffer_size // n_envs rows per env
    buffer = POMPCReplayBuffer(rows_per_env * n_envs, OBS_SPACE, ACT_SPACE, "cpu", n_envs=n_envs, horizon=H)
    assert buffer.buffer_size == rows_per_env
    truth = simulate(buffer, n_envs, T, episodes, plans)
    valid = valid_windows(truth, n_envs, T, rows_per_env, H)
    if not valid:
        with pytest.raises((ValueError, RuntimeError), match="horizon|episode"):
            buffer.sample(8)
        return
    B = 2048
    batch = buffer.sample(B)
    assert batch.observations.shape == (H + 1, B, D)
    assert batch.actions.shape == (H, B, D)
    assert batch.rewards.shape == batch.terminated.shape == batch.has_plan.shape == (H, B, 1)
    assert batch.plan_mean.shape == batch.plan_std.shape == (H, B, D)
    assert batch.rows.shape == (H, B) and batch.env_indices.shape == (B,)
    seen = check_batch(batch, truth, H, rows_per_env, valid)
    # all valid windows are reachable (2048 uniform draws over ≤ 3·28 windows: a miss has probability < 1e-8)
    assert seen == valid


def test_wraparound_never_spans_the_write_pointer():
    """One long episode in a small ring: a window across the write pointer would jump back in time."""
    H, size = 3, 7
    buffer = POMPCReplayBuffer(size, OBS_SPACE, ACT_SPACE, "cpu", n_envs=1, horizon=H)
    truth = simulate(buffer, 1, 23, [[(1000, False)]], [True] * 23)
    assert buffer.full and buffer.pos == 23 % size
    valid = valid_windows(truth, 1, 23, size, H)
    assert valid == {(0, t0) for t0 in range(23 - size, 23 - H + 1)}
    batch = buffer.sample(500)
    assert check_batch(batch, truth, H, size, valid) == valid
    newest = (buffer.pos - 1) % size
    rows = batch.rows
    for k in range(H - 1):  # never the newest row followed by the oldest row
        assert not np.any((rows[k] == newest) & (rows[k + 1] == buffer.pos))


def test_short_episodes_are_never_sampled_and_only_short_episodes_raise():
    H = 3
    buffer = POMPCReplayBuffer(100, OBS_SPACE, ACT_SPACE, "cpu", n_envs=2, horizon=H)
    simulate(buffer, 2, 20, [[(2, False)], [(1, True), (2, False)]], [False] * 20)
    with pytest.raises((ValueError, RuntimeError), match="horizon|episode"):
        buffer.sample(16)
    # an empty / too small buffer also raises a clear error
    empty = POMPCReplayBuffer(50, OBS_SPACE, ACT_SPACE, "cpu", n_envs=1, horizon=H)
    with pytest.raises(ValueError, match="horizon"):
        empty.sample(4)
    # a mixture: only the long episodes are sampled
    mixed = POMPCReplayBuffer(50, OBS_SPACE, ACT_SPACE, "cpu", n_envs=1, horizon=H)
    truth = simulate(mixed, 1, 30, [[(2, False), (5, True), (1, False)]], [True] * 30)
    valid = valid_windows(truth, 1, 30, 50, H)
    batch = mixed.sample(300)
    seen = check_batch(batch, truth, H, 50, valid)
    assert seen == valid
    assert {truth[(0, t0)].ep % 3 for _, t0 in seen} == {1}  # the length-5 episodes only


def test_update_plans_overwrites_exactly_the_given_cells():
    H, size, n_envs = 2, 12, 3
    buffer = POMPCReplayBuffer(size * n_envs, OBS_SPACE, ACT_SPACE, "cpu", n_envs=n_envs, horizon=H)
    simulate(buffer, n_envs, 10, [[(4, False)], [(6, True)], [(3, False)]], [t % 2 == 0 for t in range(10)])
    means, stds, flags = buffer.plan_means.copy(), buffer.plan_stds.copy(), buffer.has_plan.copy()
    rows = np.array([1, 1, 5, 8])
    envs = np.array([0, 2, 1, 0])
    new_mean = np.arange(4 * D, dtype=np.float32).reshape(4, D) + 100
    new_std = np.full((4, D), 0.07, np.float32)
    buffer.update_plans(rows, envs, new_mean, new_std)
    mask = np.zeros((size, n_envs), dtype=bool)
    mask[rows, envs] = True
    np.testing.assert_array_equal(buffer.plan_means[~mask], means[~mask])
    np.testing.assert_array_equal(buffer.plan_stds[~mask], stds[~mask])
    np.testing.assert_array_equal(buffer.has_plan[~mask], flags[~mask])
    np.testing.assert_array_equal(buffer.plan_means[rows, envs], new_mean)
    np.testing.assert_array_equal(buffer.plan_stds[rows, envs], new_std)
    assert buffer.has_plan[rows, envs].all()
    # a window over (row 5, env 1) now returns the new stats
    win = buffer.get_windows(np.array([[4], [5]]), np.array([1]))
    np.testing.assert_array_equal(win.plan_mean[1, 0].numpy(), new_mean[2])
    assert win.has_plan[1, 0, 0].item() == 1.0
    np.testing.assert_array_equal(win.plan_mean[0, 0].numpy(), means[4, 1])


def test_constructor_validation():
    with pytest.raises(ValueError):
        POMPCReplayBuffer(10, OBS_SPACE, ACT_SPACE, "cpu", optimize_memory_usage=True)
    with pytest.raises(ValueError):
        POMPCReplayBuffer(10, OBS_SPACE, ACT_SPACE, "cpu", handle_timeout_termination=False)
    with pytest.raises(ValueError):
        POMPCReplayBuffer(10, OBS_SPACE, spaces.Discrete(3), "cpu")
    with pytest.raises(ValueError):
        POMPCReplayBuffer(3, OBS_SPACE, ACT_SPACE, "cpu", horizon=4)
    with pytest.raises(ValueError):
        POMPCReplayBuffer(3, OBS_SPACE, ACT_SPACE, "cpu", horizon=0)


def test_horizon_longer_than_the_rows_per_env_is_refused_at_construction():
    """SB3 keeps ``buffer_size // n_envs`` rows per env: 4 transitions over 3 envs is 1 row per env, which can never
    hold a window of 3 steps. The buffer should say so when it is built, not at the first ``sample``."""
    with pytest.raises(ValueError, match="horizon"):
        POMPCReplayBuffer(4, OBS_SPACE, ACT_SPACE, "cpu", n_envs=3, horizon=3)
    POMPCReplayBuffer(9, OBS_SPACE, ACT_SPACE, "cpu", n_envs=3, horizon=3)  # 3 rows per env: fine


def test_vecnormalize_pass_through():
    venv = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), norm_obs=True, norm_reward=True,
                        clip_obs=5.0, clip_reward=3.0)
    venv.obs_rms.mean = np.array([0.5, -0.2, 1.0])
    venv.obs_rms.var = np.array([4.0, 0.25, 1.0])
    venv.ret_rms.var = np.array(9.0)
    buffer = POMPCReplayBuffer(20, venv.observation_space, venv.action_space, "cpu", n_envs=1, horizon=2)
    rng = np.random.default_rng(0)
    raw_obs = rng.normal(size=(11, 1, 3)).astype(np.float32) * 3
    raw_rew = rng.normal(size=(10, 1)).astype(np.float32) * 20
    for t in range(10):
        buffer.add(raw_obs[t], raw_obs[t + 1], np.zeros((1, 1), np.float32), raw_rew[t], np.array([False]), [{}])
    rows = np.array([[3], [4]])
    win = buffer.get_windows(rows, np.array([0]), env=venv)
    eps = venv.epsilon
    exp_obs = np.clip((raw_obs[[3, 4, 5], 0] - venv.obs_rms.mean) / np.sqrt(venv.obs_rms.var + eps), -5, 5)
    np.testing.assert_allclose(win.observations[:, 0].numpy(), exp_obs, rtol=1e-5, atol=1e-6)
    exp_rew = np.clip(raw_rew[[3, 4], 0] / np.sqrt(9.0 + eps), -3, 3)
    np.testing.assert_allclose(win.rewards[:, 0, 0].numpy(), exp_rew, rtol=1e-5, atol=1e-6)
    # without the env: raw values
    raw = buffer.get_windows(rows, np.array([0]))
    np.testing.assert_allclose(raw.observations[:, 0].numpy(), raw_obs[[3, 4, 5], 0])
    assert raw.observations.dtype == torch.float32
