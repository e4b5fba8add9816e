"""The PO-MPC family features, tested against the real algorithm (``sb3_pompc/pompc.py``).

Lazy reanalyze (what it overwrites and when it runs), auto λ (direction of the dual step, ``kl_warmup``), episodic
envs (no bootstrap through true terminations, bootstrap through time-limit truncations), the KL-regularised
critic Q̃ (``kl_value=True``), presets with explicit overrides (incl. π during the pretraining burst) and the
diagnostics that reach the logger. Every model is the tiny CPU configuration (``TINY``) on Pendulum-v1 or on a
small custom env; the file runs in well under a minute on one core.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.vec_env import DummyVecEnv

from conftest import TINY_ALGO, tiny_algo

from sb3_pompc import POMPC
from sb3_pompc import objectives as obj
from sb3_pompc.buffers import POMPCReplayBufferSamples

torch.set_num_threads(1)

TINY: dict[str, Any] = TINY_ALGO
BATCH = 16


tiny = tiny_algo


def silent_logger() -> Logger:
    """A logger without outputs (``train()`` records to the logger; SB3 sets one only in ``learn``)."""
    return Logger(folder=None, output_formats=[])


def filled(model: POMPC, steps: Optional[int] = None) -> POMPC:
    """Fill the replay buffer with random warm-up steps (no update runs) and set a silent logger.

    :param model: a fresh model
    :param steps: env steps, at most (default) ``learning_starts``
    """
    steps = model.learning_starts if steps is None else steps
    assert steps <= model.learning_starts
    model.learn(steps)
    assert model._n_updates == 0 and not model._pretrained
    model.set_logger(silent_logger())
    return model


def record_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[dict[str, Any]]:
    """Wrap ``owner.name`` so that every call's arguments and result are appended to the returned list.

    :param monkeypatch: pytest's monkeypatch (undoes the wrapping after the test)
    :param owner: module or object holding the callable
    :param name: attribute name of the callable
    """
    original: Callable[..., Any] = getattr(owner, name)
    calls: list[dict[str, Any]] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls.append(dict(args=args, kwargs=kwargs, out=out))
        return out

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def record_batches(monkeypatch: pytest.MonkeyPatch, model: POMPC) -> list[dict[str, Any]]:
    """Every batch the replay buffer hands to ``_update``: ``calls[i]["out"]``.

    :param monkeypatch: pytest's monkeypatch
    :param model: the model whose buffer is watched
    """
    return record_calls(monkeypatch, model.replay_buffer, "sample")


def record_reanalyze(
    monkeypatch: pytest.MonkeyPatch, model: POMPC
) -> tuple[list[tuple[str, int]], list[POMPCReplayBufferSamples]]:
    """Wrap ``model._update`` and ``model._reanalyze``: for each reanalyze, the update that ran it as ("pretrain", i)
    or ("policy", i) (i-th update of that kind, from 1), and the batches it returned.

    :param monkeypatch: pytest's monkeypatch
    :param model: the model to watch
    """
    original_update, original_reanalyze = model._update, model.reanalyzer.reanalyze
    counts = {"pretrain": 0, "policy": 0}
    current: list[tuple[str, int]] = []
    at: list[tuple[str, int]] = []
    returned: list[POMPCReplayBufferSamples] = []

    def update(batch_size: int, pretrain: bool) -> dict[str, torch.Tensor]:
        kind = "pretrain" if pretrain else "policy"
        counts[kind] += 1
        current[:] = [(kind, counts[kind])]
        return original_update(batch_size, pretrain=pretrain)

    def reanalyze(batch: POMPCReplayBufferSamples) -> POMPCReplayBufferSamples:
        at.append(current[0])
        returned.append(original_reanalyze(batch))
        return returned[-1]

    monkeypatch.setattr(model, "_update", update)
    monkeypatch.setattr(model.reanalyzer, "reanalyze", reanalyze)
    return at, returned


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of ``module``'s parameters. :param module: the module"""
    return [p.detach().clone() for p in module.parameters()]


def same_params(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    """Whether ``module``'s parameters equal ``before`` bit for bit. :param module: the module :param before: copies"""
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def last_train_row(progress: Path) -> dict[str, str]:
    """The last progress.csv row that holds ``train/`` values. :param progress: the csv file"""
    with open(progress) as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/n_updates")]
    assert rows, "no train/ row was dumped"
    return rows[-1]


class FallingEnv(gym.Env):
    """A 1-D balance task that terminates for real: ``x ← x + 0.25·a + noise``; terminated when |x| > 1 or after a
    random 5–15 steps (no time limit, so there is never a truncation). Reward ``1 − x²`` (never 0). Episode
    lengths and noise come from the env's ``np_random`` (seeded by ``reset(seed=...)``).
    """

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-5.0, 5.0, (3,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.2, 0.2))
        self.t, self.limit = 0, int(self.np_random.integers(5, 16))
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return np.array([self.x, self.x**2, self.t / 15.0], dtype=np.float32)

    def step(self, action: np.ndarray):
        self.x += 0.25 * float(np.asarray(action).reshape(-1)[0]) + 0.05 * float(self.np_random.normal())
        self.t += 1
        terminated = abs(self.x) > 1.0 or self.t >= self.limit
        return self._obs(), 1.0 - self.x**2, terminated, False, {}


# ------------------------------------------------------------------------------------------------ 1. lazy reanalyze
def _manually_filled_two_env_model(**overrides: Any) -> POMPC:
    """Two Pendulum envs; 60 rows per env written by hand: π^P random on every other row, none on the others.

    :param overrides: POMPC settings on top of the tiny configuration
    """
    env = DummyVecEnv([lambda: gym.make("Pendulum-v1")] * 2)
    model = POMPC("MlpPolicy", env, seed=0, **tiny(**overrides))
    rb = model.replay_buffer
    rng = np.random.default_rng(0)
    for i in range(60):
        if i % 2:
            rb.set_next_plan(rng.uniform(-0.9, 0.9, (2, 1)), rng.uniform(0.1, 1.5, (2, 1)))
        obs = rng.normal(size=(2, 3)).astype(np.float32)
        rb.add(obs, obs + 0.1, rng.uniform(-1, 1, (2, 1)).astype(np.float32), rng.normal(size=2),
               np.zeros(2), [{}, {}])
    assert rb.has_plan[:60].any() and not rb.has_plan[:60].all()
    return model


def test_reanalyze_overwrites_exactly_the_sampled_cells(randomize: Callable[..., torch.nn.Module]) -> None:
    """``Reanalyzer.reanalyze`` re-plans obs[0..H−1] of the first ``reanalyze_batch_size`` windows: exactly those (row, env)
    cells of the buffer change (planned π^P, std within the planner bounds), every other cell stays bit-identical,
    the returned batch carries the new stats in its first nb columns and the old ones elsewhere, and each cell's
    π^P is the plan of that cell's own observation."""
    nb = 5
    model = _manually_filled_two_env_model(reanalyze_batch_size=nb, reanalyze_interval=0)
    # random weights: a fresh model's zero-initialised reward and critic heads give the same plan for every state
    randomize(model.policy.model, 0.3)
    rb, H = model.replay_buffer, model.horizon
    batch = rb.sample(BATCH)
    assert len(set(batch.env_indices.tolist())) == 2  # both env columns are sampled
    snap_mean, snap_std, snap_has = rb.plan_means.copy(), rb.plan_stds.copy(), rb.has_plan.copy()
    in_mean, in_std, in_has = batch.plan_mean.clone(), batch.plan_std.clone(), batch.has_plan.clone()

    torch.manual_seed(123)
    out = model.reanalyzer.reanalyze(batch)
    # the new π^P reaches the host buffer without a host sync: queued now, written by the next flush
    assert model.reanalyzer.pending == 1
    assert np.array_equal(rb.plan_means, snap_mean) and np.array_equal(rb.has_plan, snap_has)
    model.reanalyzer.flush()
    assert model.reanalyzer.pending == 0

    written = np.zeros(snap_has.shape, dtype=bool)
    written[batch.rows[:, :nb], batch.env_indices[None, :nb]] = True
    assert written.sum() >= H  # at least one window's worth of cells
    # the written cells: planned now, std within [min_std, max_std], values changed
    lo, hi = model.policy.planner.min_std, model.policy.planner.max_std
    assert rb.has_plan[written].all()
    assert np.all(rb.plan_stds[written] >= lo - 1e-6) and np.all(rb.plan_stds[written] <= hi + 1e-6)
    assert np.all(np.abs(rb.plan_means[written]) <= 1.0 + 1e-6)
    assert np.all(rb.plan_means[written] != snap_mean[written])
    assert np.all(rb.plan_stds[written] != snap_std[written])
    assert not snap_has[written].all()  # some written cells had no plan before (warm-up rows)
    # every other cell (other rows, the other env's column of the same rows, unused rows): bit-identical
    assert np.array_equal(rb.plan_means[~written], snap_mean[~written])
    assert np.array_equal(rb.plan_stds[~written], snap_std[~written])
    assert np.array_equal(rb.has_plan[~written], snap_has[~written])

    # the returned batch: new stats in the first nb columns (those the buffer holds), old ones elsewhere
    assert torch.equal(out.plan_mean[:, nb:], in_mean[:, nb:]) and torch.equal(out.plan_std[:, nb:], in_std[:, nb:])
    assert torch.equal(out.has_plan[:, nb:], in_has[:, nb:])
    old_cols = (batch.rows[:, nb:], batch.env_indices[None, nb:])
    assert np.array_equal(out.plan_mean[:, nb:].numpy(), snap_mean[old_cols])
    assert torch.all(out.has_plan[:, :nb] == 1.0)
    new_by_cell: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for t in range(H):
        for j in range(nb):
            cell = (int(batch.rows[t, j]), int(batch.env_indices[j]))
            new_by_cell.setdefault(cell, []).append((out.plan_mean[t, j].numpy(), out.plan_std[t, j].numpy()))
    for (row, e), values in new_by_cell.items():  # a cell shared by two windows holds one of their plans
        assert any(np.array_equal(rb.plan_means[row, e], m) and np.array_equal(rb.plan_stds[row, e], s)
                   for m, s in values), (row, e)
    # the caller's batch is not modified in place; the rest of the batch is passed through
    assert torch.equal(batch.plan_mean, in_mean) and torch.equal(batch.has_plan, in_has)
    assert torch.equal(out.observations, batch.observations) and torch.equal(out.actions, batch.actions)

    # each cell's π^P is the plan of THAT cell's observation (time-major order kept): re-plan with the same seed
    cell_obs = rb.observations[batch.rows[:, :nb], batch.env_indices[None, :nb]].reshape(H * nb, -1)
    torch.manual_seed(123)
    res = model.policy.plan(torch.as_tensor(cell_obs, dtype=torch.float32), None, deterministic=False,
                            planner=model.reanalyzer.planner, pi_log_std_bounds=model.reanalyzer.log_std_bounds)
    assert len(np.unique(res.plan_mean.numpy().round(4))) > H * nb // 2  # the plans depend on the state
    torch.testing.assert_close(out.plan_mean[:, :nb], res.plan_mean.reshape(H, nb, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.plan_std[:, :nb], res.plan_std.reshape(H, nb, -1), rtol=0, atol=1e-6)


def test_plan_writes_are_flushed_in_order_and_only_when_their_copy_has_run() -> None:
    """``Reanalyzer.flush(wait=False)`` writes the finished copies (oldest first) and stops at the first one still
    running (no host sync); ``wait=True`` waits for that copy's event, then writes the rest."""

    class Copy:  # a CUDA event stand-in
        def __init__(self, done: bool) -> None:
            self.done, self.waited = done, False

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.waited, self.done = True, True

    model = _manually_filled_two_env_model(reanalyze_interval=0)
    rb = model.replay_buffer
    rows, envs = np.array([7, 8]), np.array([0, 1])
    first, second, third = Copy(True), Copy(False), Copy(True)
    for value, event in ((0.1, first), (0.2, second), (0.3, third)):  # the same two cells, three times
        host = torch.cat([torch.full((2, 1), value), torch.full((2, 1), 1.0 + value)], dim=-1)
        model.reanalyzer._pending.append((rows, envs, host, event))

    model.reanalyzer.flush(wait=False)
    assert model.reanalyzer.pending == 2 and not second.waited  # stopped at the running copy
    np.testing.assert_allclose(rb.plan_means[rows, envs], [[0.1], [0.1]])
    np.testing.assert_allclose(rb.plan_stds[rows, envs], [[1.1], [1.1]])
    model.reanalyzer.flush()
    assert model.reanalyzer.pending == 0 and second.waited and not third.waited
    np.testing.assert_allclose(rb.plan_means[rows, envs], [[0.3], [0.3]], rtol=1e-6)  # the newest write wins
    assert rb.has_plan[rows, envs].all()


def test_update_reanalyzes_every_interval_and_never_while_pretraining(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_update`` calls ``Reanalyzer.reanalyze`` exactly at policy updates k·interval (3rd, 6th, 9th, 12th), never in the
    pretraining burst (where the policy-update counter stays 0, and 0 % interval == 0), and trains on the batch it
    returns."""
    model = _manually_filled_two_env_model(reanalyze_interval=3, reanalyze_batch_size=4)
    model.set_logger(silent_logger())
    at, returned = record_reanalyze(monkeypatch, model)
    prior_calls = record_calls(monkeypatch, obj, "prior_loss")

    model.train(gradient_steps=0, batch_size=BATCH)  # the pretraining burst only
    assert model._pretrained and model._n_updates == 5 and at == []
    has_plan_before = model.replay_buffer.has_plan.copy()
    model.train(gradient_steps=7, batch_size=BATCH)
    # train() ends with every reanalyzed π^P written into the buffer (cells without a plan before now have one)
    assert model.reanalyzer.pending == 0
    assert (model.replay_buffer.has_plan & ~has_plan_before).any()
    model.train(gradient_steps=5, batch_size=BATCH)
    assert model._n_policy_updates == 12
    assert at == [("policy", 3), ("policy", 6), ("policy", 9), ("policy", 12)]
    # the update that reanalyzed fits the prior to the reanalyzed π^P (update 3 = the 5 + 3rd prior_loss call)
    plan_mean_used = prior_calls[5 + 2]["args"][2]
    assert torch.equal(plan_mean_used, returned[0].plan_mean)


# ----------------------------------------------------------------------------------------------------- 2. auto λ
@pytest.mark.parametrize("target_kl, direction", [(1e-6, +1), (1e6, -1)], ids=["target-below", "target-above"])
def test_auto_lambda_moves_toward_the_target_kl(target_kl: float, direction: int) -> None:
    """``kl_coef="auto_1.0"``: λ grows at every update while the KL exceeds the target and shrinks while it is below."""
    model = filled(POMPC("MlpPolicy", "Pendulum-v1", seed=0, **tiny(kl_coef="auto_1.0", target_kl=target_kl,
                                                                      mask_unplanned=False)))
    assert model.current_kl_coef() == pytest.approx(1.0)
    lams = [model.current_kl_coef()]
    for _ in range(6):
        model._update(BATCH, pretrain=False)
        lams.append(model.current_kl_coef())
    steps = np.diff(lams) * direction
    assert np.all(steps > 0), lams
    assert model.current_kl_coef() == pytest.approx(float(model.log_kl_coef.detach().exp()))


def test_kl_warmup_forces_lambda_to_zero_for_the_first_k_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kl_coef="auto", kl_warmup=k``: the first k updates use λ = 0 (no KL term in the policy loss), report
    λ = 0, and leave the λ optimiser unstepped; the KL term and the dual steps start at update k + 1."""
    k = 3
    model = filled(POMPC("MlpPolicy", "Pendulum-v1", seed=0, **tiny(kl_coef="auto", kl_warmup=k, target_kl=1e-6,
                                                                      mask_unplanned=False)))
    loss_calls = record_calls(monkeypatch, obj, "policy_loss")
    log_lam0 = model.log_kl_coef.detach().clone()
    used, reported, log_lams = [], [], []
    for _ in range(k + 2):
        model._update(BATCH, pretrain=False)
        lam = loss_calls[-1]["args"][3]
        used.append(float(lam))
        reported.append(model.current_kl_coef())
        log_lams.append(model.log_kl_coef.detach().clone())
    # during the warm-up: λ = 0 in the loss, no KL term, λ reported 0, log λ untouched and Adam never stepped
    for j in range(k):
        assert used[j] == 0.0, (j + 1, used)
        assert loss_calls[j]["args"][1] is None  # no KL term while λ = 0
        assert torch.equal(log_lams[j], log_lam0), (j + 1, log_lams)
    for j in range(k - 1):
        assert reported[j] == 0.0, (j + 1, reported)
    # afterwards: λ > 0 enters the loss, the dual step moves log λ (KL ≫ target, so λ grows)
    assert used[k] > 0.0 and loss_calls[k]["args"][1] is not None
    assert log_lams[k] > log_lam0 and log_lams[k + 1] > log_lams[k]
    assert reported[k + 1] == pytest.approx(float(log_lams[k + 1].exp())) and reported[k + 1] > 1.0


# ------------------------------------------------------------------------------------------------- 3. terminations
def test_episodic_env_does_not_bootstrap_through_terminations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A terminating env with ``episodic=True``: the termination head exists and its loss is logged; at terminal
    transitions the TD target is exactly the reward (no γ·Q term although Q ≠ 0), elsewhere it bootstraps."""
    model = POMPC("MlpPolicy", FallingEnv(), seed=0, episodic=True, **tiny(learning_starts=40, gamma=0.9))
    assert model.policy.model.termination is not None
    model.set_logger(configure(str(tmp_path), ["csv"]))
    td_calls = record_calls(monkeypatch, obj, "td_target")
    batches = record_batches(monkeypatch, model)
    model.learn(80, log_interval=1)
    assert len(td_calls) == len(batches) == 5 + 40

    rb = model.replay_buffer
    n = rb.num_rows()
    assert rb.dones[:n].sum() >= 5 and rb.timeouts[:n].sum() == 0  # true terminations only
    n_terminal = 0
    bootstrapped_terminal = 0
    for call, batch in zip(td_calls, [c["out"] for c in batches]):
        reward, terminated, next_q, gamma = call["args"]
        y = call["out"]
        assert gamma == model.gamma == 0.9
        assert torch.equal(terminated, batch.terminated) and torch.equal(reward, batch.rewards)
        term = terminated.bool()
        # the terminal flags come from the buffer's dones of the same (row, env) cells
        dones = rb.dones[batch.rows, batch.env_indices[None, :]]
        assert np.array_equal(term.squeeze(-1).numpy(), dones > 0)
        n_terminal += int(term.sum())
        assert torch.equal(y[term], reward[term])  # y == r exactly: nothing is bootstrapped through a terminal
        bootstrapped_terminal += int((next_q[term] != 0).sum())
    assert n_terminal >= 10
    assert bootstrapped_terminal > 0  # the critic was non-zero there, so the mask (not a zero Q) made y == r
    # away from terminals the target bootstraps (the critic is no longer zero after a few updates)
    reward, terminated, next_q, _ = td_calls[-1]["args"]
    live = ~terminated.bool()
    assert (td_calls[-1]["out"][live] != reward[live]).float().mean() > 0.9

    row = last_train_row(tmp_path / "progress.csv")
    assert "train/termination_loss" in row and math.isfinite(float(row["train/termination_loss"]))
    assert float(row["train/termination_loss"]) > 0


def test_time_limit_truncations_still_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pendulum episodes end by a time limit only: the buffer has episode ends, yet every sampled ``terminated`` is
    0 (also for windows ending on a truncated step), the TD target bootstraps there, and no termination head is
    added (``episodic="auto"``)."""
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0, env_kwargs={"max_episode_steps": 20})
    model = filled(POMPC("MlpPolicy", env, seed=0, **tiny(learning_starts=60)), 60)
    rb = model.replay_buffer
    assert rb.dones[:60].sum() == 3 and np.array_equal(rb.timeouts[:60], rb.dones[:60])
    big = rb.sample(400)
    ends_on_truncation = rb.dones[big.rows[-1], big.env_indices] > 0
    assert ends_on_truncation.any()
    assert torch.all(big.terminated == 0)

    td_calls = record_calls(monkeypatch, obj, "td_target")
    model.train(gradient_steps=3, batch_size=BATCH)
    assert len(td_calls) == 5 + 3
    for call in td_calls:
        assert torch.all(call["args"][1] == 0)
    assert not model.episodic and model.policy.model.termination is None and not model._saw_termination


# ------------------------------------------------------------------------------------------- 4. KL-regularised critic
@pytest.mark.parametrize("prior, steps", [("planner", "H-1"), ("reverse", "H")])
def test_kl_value_critic_is_trained_toward_the_kl_regularised_target(monkeypatch: pytest.MonkeyPatch, prior: str,
                                                                     steps: str) -> None:
    """``kl_value=True``: Q̃ exists with its own target and optimiser and changes at every update; its target is
    built from r, (1 − term), Q̃_targ, λ and the KL at z' over H − 1 steps with the raw planner prior (π^P exists at
    obs[1..H−1] only) and over H steps with a learned prior."""
    lam = 0.5
    model = filled(POMPC("MlpPolicy", "Pendulum-v1", seed=0, **tiny(kl_value=True, kl_coef=lam, prior=prior,
                                                                      mask_unplanned=False)))
    wm = model.policy.model
    assert wm.kl_critic is not None and wm.kl_critic_target is not None
    assert wm.kl_critic is not wm.critic and model.policy.kl_critic_optimizer is not None
    H = model.horizon
    T = H - 1 if steps == "H-1" else H
    calls = record_calls(monkeypatch, obj, "kl_value_target")
    batches = record_batches(monkeypatch, model)
    for _ in range(3):
        q_tilde, q_tilde_target, q = params_of(wm.kl_critic), params_of(wm.kl_critic_target), params_of(wm.critic)
        model._update(BATCH, pretrain=False)
        assert not same_params(wm.kl_critic, q_tilde)
        assert not same_params(wm.kl_critic_target, q_tilde_target)  # soft update of Q̃'s own target
        assert not same_params(wm.critic, q)
    assert len(calls) == 3
    for call, batch in zip(calls, [c["out"] for c in batches]):
        reward, terminated, next_q, next_kl, kl_coef, gamma, q_scale, kl_scale = call["args"]
        y = call["out"]
        for tensor in (reward, terminated, next_q, next_kl, y):
            assert tensor.shape == (T, BATCH, 1)
        assert torch.equal(reward, batch.rewards[:T]) and torch.equal(terminated, batch.terminated[:T])
        assert float(kl_coef) == lam and gamma == model.gamma
        assert q_scale is model.policy.q_scale.value and kl_scale is model.policy.kl_scale.value  # S_Q / S_KL unit
        assert torch.all(next_kl >= 0) and torch.all(torch.isfinite(next_kl)) and torch.any(next_kl > 0)


# ---------------------------------------------------------------------------------------------------- 5. presets
def test_explicit_arguments_override_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """``preset="bmpc", reanalyze_interval=0`` never reanalyzes (plain bmpc does at update 10);
    ``preset="tdmpc2", num_q=3`` builds 3 critic heads (plain tdmpc2 builds 5) and keeps the rest of the preset."""
    counts = {}
    for name, kwargs in {"bmpc": {}, "bmpc-no-reanalyze": dict(reanalyze_interval=0)}.items():
        model = filled(POMPC("MlpPolicy", "Pendulum-v1", seed=0, preset="bmpc", **tiny(num_q=None, **kwargs)))
        at, _ = record_reanalyze(monkeypatch, model)
        model.train(gradient_steps=10, batch_size=BATCH)
        counts[name] = (model.reanalyze_interval, at, model.policy.model.num_q)
    assert counts["bmpc"] == (10, [("policy", 10)], 2)
    assert counts["bmpc-no-reanalyze"] == (0, [], 2)

    z = torch.zeros(4, 32)
    a = torch.zeros(4, 1)
    for num_q, expected in ((None, 5), (3, 3)):
        model = POMPC("MlpPolicy", "Pendulum-v1", seed=0, preset="tdmpc2", **tiny(num_q=num_q))
        wm = model.policy.model
        assert wm.num_q == expected
        assert wm.critic_logits(z, a).shape[0] == expected
        assert model.current_kl_coef() == 0.0 and model.config.policy_squash == "tanh"  # the rest of the preset
        assert model.reanalyze_interval == 0 and model.prior == "planner"


@pytest.mark.parametrize(
    "preset, pretrain_policy, updates_pi",
    [("tdmpc2", None, True), ("bmpc", None, False), ("bmpc", True, True), ("tdmpc2", False, False)],
)
def test_pretraining_burst_updates_pi_only_where_the_preset_says(preset: str, pretrain_policy: Optional[bool],
                                                                 updates_pi: bool) -> None:
    """A pretrain-only ``train(0)`` right after the warm-up: TD-MPC2 updates π_s in the burst, BMPC does not
    (``pretrain_policy`` overrides either way); the world model is trained in every case."""
    kwargs = {} if pretrain_policy is None else dict(pretrain_policy=pretrain_policy)
    model = filled(POMPC("MlpPolicy", "Pendulum-v1", seed=0, preset=preset, **tiny(**kwargs)))
    wm = model.policy.model
    pi, encoder, dynamics = params_of(wm.pi), params_of(wm.encoder), params_of(wm.dynamics)
    model.train(gradient_steps=0, batch_size=BATCH)
    assert model._pretrained and model._n_updates == 5 and model._n_policy_updates == 0
    assert same_params(wm.pi, pi) is not updates_pi
    assert not same_params(wm.encoder, encoder) and not same_params(wm.dynamics, dynamics)
    model.train(gradient_steps=0, batch_size=BATCH)  # the burst runs once
    assert model._n_updates == 5


# ------------------------------------------------------------------------------------------------ 6. diagnostics
@pytest.mark.parametrize("prior", ["reverse", "planner"])
def test_diagnostic_keys_reach_the_csv_logger(tmp_path: Path, prior: str) -> None:
    """The KL diagnostics (to the policy's reference and to the raw π^P), the prior loss (learned prior only), the
    planner std and λ reach progress.csv with finite values; with the raw planner prior both KLs are the same."""
    env = make_vec_env("Pendulum-v1", n_envs=1, seed=0, env_kwargs={"max_episode_steps": 20})
    model = POMPC("MlpPolicy", env, seed=0, **tiny(kl_coef="auto", prior=prior, learning_starts=30))
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(60, log_interval=1)
    row = last_train_row(tmp_path / "progress.csv")
    keys = ["train/kl_mean", "train/kl_std", "train/kl_planner_mean", "train/kl_planner_std", "train/planner_std",
            "train/kl_coef", "train/kl_coef_loss"]
    if prior != "planner":
        keys.append("train/prior_loss")
    values = {}
    for key in keys:
        assert row.get(key, "") != "", (key, sorted(row))
        values[key] = float(row[key])
        assert math.isfinite(values[key]), (key, row[key])
    assert values["train/kl_mean"] >= 0 and values["train/kl_std"] >= 0 and values["train/kl_planner_mean"] >= 0
    assert values["train/kl_planner_std"] >= 0
    assert 0.05 - 1e-6 <= values["train/planner_std"] <= 2.0 + 1e-6
    assert values["train/kl_coef"] > 0 and values["train/kl_coef"] != 1.0  # auto λ was learned
    if prior == "planner":
        assert row.get("train/prior_loss", "") == ""  # no learned prior, nothing to log
        assert values["train/kl_mean"] == pytest.approx(values["train/kl_planner_mean"], rel=1e-5)
    else:
        assert values["train/prior_loss"] >= 0
        assert values["train/kl_mean"] != values["train/kl_planner_mean"]
