"""Objectives (spec §3.3 / §3.4, DESIGN §1): critic targets, world-model loss, π_s loss with λ, prior losses, λ loss.

The presets' losses are checked against the spec's formulas on the same tensors, inside the algorithm's own update
(``POMPC._update`` / ``POMPC._policy_step``): the sampling noise of π is switched off (``torch.randn_like`` → 0) so
that the expected values can be written out by hand, and "2 random heads" is checked as "some pair of distinct
heads reproduces the whole batch", which does not depend on the order in which random numbers are drawn.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sb3_pompc import objectives as obj
from sb3_pompc.buffers import POMPCReplayBufferSamples
from sb3_pompc.world_model import WorldModel

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------- helpers
def _tiny_algo(preset: str, **kwargs: Any):
    from sb3_pompc import POMPC

    cfg = dict(model_size=None, latent_dim=16, mlp_dim=16, enc_dim=16, num_samples=32, num_elites=4, num_pi_trajs=2,
               iterations=2, batch_size=16, learning_starts=50, pretrain_updates=5, buffer_size=1000, device="cpu",
               seed=0)
    return POMPC("MlpPolicy", "Pendulum-v1", preset=preset, **{**cfg, **kwargs})


def _randomize(params, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, scale)


def _batch(H: int, B: int, obs_dim: int, A: int, seed: int = 0) -> POMPCReplayBufferSamples:
    g = torch.Generator().manual_seed(seed)
    return POMPCReplayBufferSamples(
        observations=torch.randn(H + 1, B, obs_dim, generator=g),
        actions=torch.rand(H, B, A, generator=g) * 2 - 1,
        rewards=torch.randn(H, B, 1, generator=g),
        terminated=torch.zeros(H, B, 1),
        plan_mean=torch.rand(H, B, A, generator=g) * 1.6 - 0.8,
        plan_std=torch.rand(H, B, A, generator=g) * 0.5 + 0.05,
        has_plan=torch.ones(H, B, 1),
        rows=np.zeros((H, B), dtype=np.int64),
        env_indices=np.zeros(B, dtype=np.int64),
    )


@pytest.fixture
def no_policy_noise(monkeypatch):
    """π samples without noise: ``ε = 0`` so ``a = tanh(μ_raw)`` (tanh) or ``clamp(tanh(μ_raw))`` (clamp)."""
    monkeypatch.setattr(torch, "randn_like", lambda t, *args, **kwargs: torch.zeros_like(t))


class _Stop(Exception):
    pass


def _capture_value_target(monkeypatch, algo, batch) -> torch.Tensor:
    """Run ``algo._update`` on ``batch`` until the world-model loss and return the value target it receives."""
    captured: dict[str, torch.Tensor] = {}

    def fake_world_model_loss(model, obs, actions, rewards, terminated, value_target, *args, **kwargs):
        captured["y"] = value_target.detach().clone()
        raise _Stop

    monkeypatch.setitem(algo._update_fns, "world_model", fake_world_model_loss)
    monkeypatch.setattr(algo.replay_buffer, "sample", lambda *args, **kwargs: batch)
    with pytest.raises(_Stop):
        algo._update(batch.actions.shape[1], pretrain=False)
    return captured["y"]


def _pi_by_hand(model: WorldModel, z: torch.Tensor, lo: float, hi: float, squash: str):
    """π(z) with ε = 0, from the spec §1.3: returns (action, mean, std, scaled_entropy)."""
    mu_raw, s_raw = model.pi.net(z).chunk(2, dim=-1)
    log_std = lo + 0.5 * (hi - lo) * (torch.tanh(s_raw) + 1)
    A = mu_raw.shape[-1]
    lp_g = (-log_std - LOG_SQRT_2PI).sum(-1, keepdim=True)  # ε = 0
    if squash == "tanh":
        action = torch.tanh(mu_raw)
        lp = lp_g - torch.log(torch.relu(1 - action**2) + 1e-6).sum(-1, keepdim=True)
    else:
        action = torch.clamp(torch.tanh(mu_raw), -1, 1)
        lp = lp_g
    ent = -lp * (A * lp_g) / (lp + 1e-8)
    return action, torch.tanh(mu_raw), log_std.exp(), ent


def _head_values(ref, net, x: torch.Tensor) -> torch.Tensor:
    """Every head of an ensemble decoded with the reference two-hot inverse: (num_q, N, 1), float64."""
    return ref.two_hot_inv(net(x))


def _assert_some_pair_matches(candidates: dict, actual: torch.Tensor, atol: float) -> tuple:
    errors = {pair: (c - actual.double()).abs().max().item() for pair, c in candidates.items()}
    best = min(errors, key=errors.get)
    assert errors[best] < atol, errors
    return best


# ---------------------------------------------------------------------------------------------------- small formulas
def test_td_target_uses_one_minus_terminated():
    r = torch.tensor([[1.0], [2.0], [-0.5]])
    term = torch.tensor([[0.0], [1.0], [0.0]])
    v = torch.tensor([[10.0], [10.0], [4.0]])
    torch.testing.assert_close(obj.td_target(r, term, v, 0.9), torch.tensor([[10.0], [2.0], [3.1]]))


def test_kl_value_target_formula():
    r, term = torch.tensor([[1.0], [0.5]]), torch.tensor([[0.0], [1.0]])
    q, kl = torch.tensor([[3.0], [3.0]]), torch.tensor([[0.5], [0.5]])
    y = obj.kl_value_target(r, term, q, kl, 2.0, 0.9)
    torch.testing.assert_close(y, torch.tensor([[1.0 + 0.9 * (3.0 - 1.0)], [0.5]]))


def test_rho_weights_and_time_weighted_mean(ref):
    torch.testing.assert_close(obj.rho_weights(4, 0.5, torch.device("cpu")).reshape(-1),
                               torch.tensor([1.0, 0.5, 0.25, 0.125]))
    x = torch.randn(4, 9, 1)
    torch.testing.assert_close(obj.time_weighted_mean(x, 0.5), ref.rho_mean(x, 0.5))


# ---------------------------------------------------------------------------------------------------- presets in the update
def test_tdmpc2_critic_target_is_reward_plus_gamma_min_of_two_random_target_heads(monkeypatch, no_policy_noise, ref):
    algo = _tiny_algo("tdmpc2")
    model = algo.policy.model
    assert model.num_q == 5 and algo.config.target_reduce == "min"
    _randomize(model.critic_target.parameters())  # distinct target heads, different from the online critic
    H, B, A = algo.horizon, 16, model.action_dim
    batch = _batch(H, B, model.obs_dim, A)
    y = _capture_value_target(monkeypatch, algo, batch)
    with torch.no_grad():
        model.eval()
        z_next = model.encode(batch.observations[1:].reshape(H * B, -1))
        a_next, _, _, _ = _pi_by_hand(model, z_next, -10.0, 2.0, "tanh")
        q = _head_values(ref, model.critic_target, torch.cat([z_next, a_next], -1)).reshape(5, H, B, 1)
    r = batch.rewards.double()
    candidates = {(i, j): r + algo.gamma * torch.minimum(q[i], q[j]) for i, j in itertools.combinations(range(5), 2)}
    _assert_some_pair_matches(candidates, y, atol=1e-3)
    # the mean of two heads (BMPC's reduction) or the online critic would not match
    avg = {(i, j): r + algo.gamma * (q[i] + q[j]) / 2 for i, j in itertools.combinations(range(5), 2)}
    assert min((c - y.double()).abs().max().item() for c in avg.values()) > 1e-2


def test_tdmpc2_policy_loss_is_spec_formula(no_policy_noise, ref):
    algo = _tiny_algo("tdmpc2")
    model, policy = algo.policy.model, algo.policy
    _randomize(model.critic.parameters())
    _randomize(model.pi.parameters(), 0.5)
    model.eval()  # no dropout: the formula is checked without the critic's dropout noise
    H, B, A, L = algo.horizon, 32, model.action_dim, model.latent_dim
    batch = _batch(H, B, model.obs_dim, A)
    zs = torch.softmax(torch.randn(H + 1, B, L), -1)
    with torch.no_grad():  # before the step (it moves π)
        action, _, _, ent = _pi_by_hand(model, zs, -10.0, 2.0, "tanh")  # all H + 1 latents
        q_all = _head_values(ref, model.critic, torch.cat([zs, action], -1).reshape((H + 1) * B, -1))
        q_all = q_all.reshape(model.num_q, H + 1, B, 1)
    candidates, scales = {}, {}
    for i, j in itertools.combinations(range(model.num_q), 2):
        q = (q_all[i] + q_all[j]) / 2  # Q_avg of 2 random online heads
        v = max(ref.percentile(q[0].numpy(), 95) - ref.percentile(q[0].numpy(), 5), 1.0)
        S = 1.0 + 0.01 * (v - 1.0)  # RunningScale updated once on q_0, before it is applied
        per = -(1e-4 * ent.double() + q / S)
        candidates[(i, j)] = sum(0.5**t * per[t].mean() for t in range(H + 1)) / (H + 1)
        scales[(i, j)] = S
    logs = algo._policy_step(zs, batch)
    pair = _assert_some_pair_matches(candidates, logs["policy_loss"], atol=1e-5)
    assert policy.q_scale.value.item() == pytest.approx(scales[pair], rel=1e-5)
    assert policy.kl_scale.value.item() == 1.0  # untouched with λ = 0


def test_bmpc_value_target_is_model_based_and_ignores_the_env_reward(monkeypatch, no_policy_noise, ref):
    algo = _tiny_algo("bmpc")
    model = algo.policy.model
    assert model.critic_type == "v" and model.num_q == 2
    _randomize(model.critic_target.parameters())
    _randomize(model.reward.parameters())
    H, B, A = algo.horizon, 16, model.action_dim
    batch = _batch(H, B, model.obs_dim, A)
    y1 = _capture_value_target(monkeypatch, algo, batch)
    other = batch._replace(rewards=batch.rewards * 5 + 3)
    y2 = _capture_value_target(monkeypatch, algo, other)
    torch.testing.assert_close(y1, y2)  # the environment reward is NOT used in the V target
    with torch.no_grad():
        model.eval()
        z = model.encode(batch.observations[:H].reshape(H * B, -1))  # real encoded z_t, t = 0..H−1
        a, _, _, _ = _pi_by_hand(model, z, -3.0, 1.0, "clamp")
        r_hat = ref.two_hot_inv(model.reward(torch.cat([z, a], -1)))
        z1 = model.dynamics(torch.cat([z, a], -1))
        v = _head_values(ref, model.critic_target, z1)  # (2, H·B, 1): V critic takes z only
        expected = (r_hat + algo.gamma * (v[0] + v[1]) / 2).reshape(H, B, 1)
    torch.testing.assert_close(y1.double(), expected, rtol=1e-4, atol=1e-4)


def test_bmpc_policy_loss_is_spec_formula(no_policy_noise, ref):
    algo = _tiny_algo("bmpc")
    model, policy = algo.policy.model, algo.policy
    _randomize(model.pi.parameters(), 0.5)
    H, B, A, L = algo.horizon, 32, model.action_dim, model.latent_dim
    batch = _batch(H, B, model.obs_dim, A, seed=3)
    zs = torch.softmax(torch.randn(H + 1, B, L), -1)
    with torch.no_grad():  # a model that ignores the return: the critic must not matter
        for p in model.critic.parameters():
            p.fill_(float("nan"))
    with torch.no_grad():  # computed before the step (it moves π)
        _, mean, std, ent = _pi_by_hand(model, zs[:H], -3.0, 1.0, "clamp")  # H latents, not H + 1
        kl = ref.gaussian_kl(mean, std, batch.plan_mean, batch.plan_std)  # KL(π ‖ expert), mean over dims
        v = max(ref.percentile(kl[0].numpy(), 95) - ref.percentile(kl[0].numpy(), 5), 1.0)
        S = 1.0 + 0.01 * (v - 1.0)
        per = kl / S - 1e-4 * ent.double()
        expected = sum(0.5**t * per[t].mean() for t in range(H)) / H
    logs = algo._policy_step(zs, batch)
    assert logs["policy_loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert policy.kl_scale.value.item() == pytest.approx(S, rel=1e-6)
    assert policy.q_scale.value.item() == 1.0


# ---------------------------------------------------------------------------------------------------- λ family
def _policy_terms(model: WorldModel, z: torch.Tensor, eps: torch.Tensor, heads: torch.Tensor, pm, ps):
    out = model.pi(z, eps=eps)
    T, B, _ = z.shape
    q = model.critic_value(z.reshape(T * B, -1), out.action.reshape(T * B, -1), reduce="avg", detach=True,
                           heads=heads).reshape(T, B, 1)
    from sb3_pompc.math import gaussian_kl

    kl = gaussian_kl(out.mean, out.std, pm, ps)
    return q, kl, out.scaled_entropy


def _pi_grad(model: WorldModel, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.pi.parameters()), retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, model.pi.parameters())])


def test_lambda_zero_infinite_and_finite_policy_gradients(make_tiny_model, ref):
    model = make_tiny_model(num_q=3, policy_squash="clamp", log_std_min=-3, log_std_max=1)
    _randomize(model.critic.parameters())
    _randomize(model.pi.parameters(), 0.4)
    model.eval()
    T, B, A = 3, 24, model.action_dim
    z = torch.softmax(torch.randn(T, B, model.latent_dim), -1)
    eps = torch.randn(T, B, A)
    pm, ps = torch.rand(T, B, A) - 0.5, torch.rand(T, B, A) * 0.4 + 0.05
    q, kl, ent = _policy_terms(model, z, eps, torch.tensor([0, 2]), pm, ps)
    S_q, S_kl, beta, rho = 1.7, 2.3, 1e-4, 0.5
    ret_obj = ref.rho_mean(-q / S_q - beta * ent, rho)  # return-only (TD-MPC2)
    kl_obj = ref.rho_mean(kl, rho)  # KL term alone
    pure_kl_obj = ref.rho_mean(kl / S_kl - beta * ent, rho)  # BMPC
    g_ret, g_kl, g_pure = _pi_grad(model, ret_obj), _pi_grad(model, kl_obj), _pi_grad(model, pure_kl_obj)
    assert g_ret.abs().max() > 1e-6 and g_kl.abs().max() > 1e-6
    # λ = 0 is exactly TD-MPC2's loss: the return-only objective, whether or not the KL is passed
    for kl_arg in (None, kl):
        loss0 = obj.policy_loss(q, kl_arg, ent, 0.0, rho, beta, q_scale=S_q, kl_scale=S_kl)
        torch.testing.assert_close(loss0, ret_obj)
        torch.testing.assert_close(_pi_grad(model, loss0), g_ret)
    # λ = ∞ is exactly BMPC's loss: the KL over its own scale and the entropy bonus; the return term is dropped
    for q_arg in (None, q):
        loss_inf = obj.policy_loss(q_arg, kl, ent, float("inf"), rho, beta, q_scale=S_q, kl_scale=S_kl)
        torch.testing.assert_close(loss_inf, pure_kl_obj)
        torch.testing.assert_close(_pi_grad(model, loss_inf), g_pure)
    # finite λ: the convex mix with α = λ/(1+λ) of the two normalised terms (float and tensor λ alike)
    for lam in (0.1, 1.0, 9.0, torch.tensor(4.0)):
        alpha = float(lam) / (1.0 + float(lam))
        expected = ref.rho_mean((1 - alpha) * (-q / S_q) + alpha * kl / S_kl - beta * ent, rho)
        loss = obj.policy_loss(q, kl, ent, lam, rho, beta, q_scale=S_q, kl_scale=S_kl)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(_pi_grad(model, loss), _pi_grad(model, expected), rtol=1e-4, atol=1e-7)
    # λ = 1 weighs the normalised return and the normalised KL equally
    loss_one = obj.policy_loss(q, kl, ent, 1.0, rho, beta, q_scale=S_q, kl_scale=S_kl)
    torch.testing.assert_close(loss_one, ref.rho_mean(0.5 * (-q / S_q) + 0.5 * kl / S_kl - beta * ent, rho))
    # continuous at both ends: λ = 1e8 is λ = ∞ and λ = 1e-8 is λ = 0, loss and gradient, to 1e-5 relative
    for lam_near, lam_end in ((1e-8, 0.0), (1e8, float("inf"))):
        near = obj.policy_loss(q, kl, ent, lam_near, rho, beta, q_scale=S_q, kl_scale=S_kl)
        end = obj.policy_loss(q, kl, ent, lam_end, rho, beta, q_scale=S_q, kl_scale=S_kl)
        assert abs(near.item() - end.item()) <= 1e-5 * abs(end.item())
        g_near, g_end = _pi_grad(model, near), _pi_grad(model, end)
        assert (g_near - g_end).norm() <= 1e-5 * g_end.norm()
    with pytest.raises(ValueError):
        obj.policy_loss(q, None, ent, float("inf"), rho)
    with pytest.raises(ValueError):
        obj.policy_loss(None, kl, ent, 1.0, rho)


def test_masked_kl_rows_add_nothing_and_the_rest_is_renormalised(ref):
    """Rows without a real plan (``has_plan = 0``) add no KL term; the mean runs over the planned rows only."""
    T, B = 3, 6
    kl = torch.rand(T, B, 1)
    mask = torch.ones(T, B, 1)
    mask[:, :2] = 0.0
    mask[2] = 0.0  # a step with no planned row adds 0
    kl_changed = kl.clone()
    kl_changed[:, :2] = 1e6  # what the masked rows hold does not matter
    expected = sum(0.5**t * kl[t, 2:].mean() for t in range(2)) / T
    for x in (kl, kl_changed):
        torch.testing.assert_close(obj.masked_time_weighted_mean(x, mask, 0.5), expected)
    torch.testing.assert_close(obj.masked_time_weighted_mean(kl, None, 0.5), obj.time_weighted_mean(kl, 0.5))
    ent, q = torch.zeros(T, B, 1), torch.zeros(T, B, 1)
    loss = obj.policy_loss(q, kl_changed, ent, float("inf"), 0.5, kl_scale=1.0, kl_mask=mask)
    torch.testing.assert_close(loss, expected)
    prior, _ = obj.prior_loss(torch.zeros(T, B, 2), torch.ones(T, B, 2), torch.ones(T, B, 2), torch.ones(T, B, 2),
                              "reverse", 0.5, mask)
    torch.testing.assert_close(prior, torch.tensor(0.5 * (1 + 0.5) / T))  # KL(N(0,1)‖N(1,1)) = 1/2 per dim


def test_kl_value_target_is_the_soft_bellman_backup_at_the_policy_losss_temperature() -> None:
    """``y = r + γ(1−term)(Q̃' − λ·(S_Q/S_KL)·KL')``: π_s's loss is (1−α)/S_Q·[−Q̃ + λ(S_Q/S_KL)·KL], so the
    target charges each future KL at the same temperature λ·S_Q/S_KL as the current one."""
    r, term = torch.tensor([[[1.0]], [[2.0]]]), torch.tensor([[[0.0]], [[1.0]]])
    q_next, kl_next = torch.tensor([[[10.0]], [[10.0]]]), torch.tensor([[[0.5]], [[0.5]]])
    y = obj.kl_value_target(r, term, q_next, kl_next, torch.tensor(2.0), 0.9, q_scale=3.0, kl_scale=1.5)
    torch.testing.assert_close(y, torch.tensor([[[1.0 + 0.9 * (10.0 - 2.0 * 2.0 * 0.5)]], [[2.0]]]))
    # the policy loss's minimiser at a fixed Q̃ balances −Q̃ and τ·KL with τ = λ·S_Q/S_KL
    lam, S_q, S_kl = 2.0, 3.0, 1.5
    alpha = lam / (1 + lam)
    q, kl, zero = torch.tensor([[[4.0]]]), torch.tensor([[[0.7]]]), torch.zeros(1, 1, 1)
    loss = obj.policy_loss(q, kl, zero, lam, 1.0, 0.0, q_scale=S_q, kl_scale=S_kl)
    torch.testing.assert_close(loss, (1 - alpha) / S_q * (-q + lam * S_q / S_kl * kl).reshape(()))


def test_critic_gradient_does_not_reach_the_critic_through_the_policy_loss(make_tiny_model):
    model = make_tiny_model(num_q=3)
    _randomize(model.critic.parameters())
    z = torch.softmax(torch.randn(2, 8, model.latent_dim), -1)
    q, kl, ent = _policy_terms(model, z, torch.randn(2, 8, 3), torch.tensor([1, 2]), torch.zeros(2, 8, 3),
                               torch.ones(2, 8, 3))
    obj.policy_loss(q, kl, ent, 0.5, 0.5).backward()
    assert all(p.grad is None for p in model.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pi.parameters())


# ---------------------------------------------------------------------------------------------------- prior losses
def _fit_single_gaussian(direction: str, steps: int = 600):
    """Fit one Gaussian (direct parameters, shared by the batch) to planner stats that are half N(−0.8, 0.1²),
    half N(+0.8, 0.1²) at the same latent."""
    T, B, A = 2, 64, 2
    plan_mean = torch.cat([torch.full((T, B // 2, A), -0.8), torch.full((T, B // 2, A), 0.8)], dim=1)
    plan_std = torch.full((T, B, A), 0.1)
    mean = torch.full((A,), 0.3, requires_grad=True)  # start off-centre, nearer the + mode
    log_std = torch.full((A,), math.log(0.3), requires_grad=True)
    opt = torch.optim.Adam([mean, log_std], lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = obj.prior_loss(mean.expand(T, B, A), log_std.exp().expand(T, B, A), plan_mean, plan_std,
                                 direction, 0.5)
        loss.backward()
        opt.step()
    return mean.detach(), log_std.exp().detach()


def test_prior_loss_values_and_directions(ref):
    T, B, A = 3, 10, 2
    pm, ps = torch.randn(T, B, A) * 0.3, torch.rand(T, B, A) + 0.1
    qm, qs = torch.randn(T, B, A) * 0.3, torch.rand(T, B, A) + 0.1
    loss_f, kl_f = obj.prior_loss(pm, ps, qm, qs, "forward", 0.5)
    loss_r, kl_r = obj.prior_loss(pm, ps, qm, qs, "reverse", 0.5)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_f.double(), ref.gaussian_kl(qm, qs, pm, ps), **tol)  # KL(π^P ‖ π_p)
    torch.testing.assert_close(kl_r.double(), ref.gaussian_kl(pm, ps, qm, qs), **tol)  # KL(π_p ‖ π^P)
    torch.testing.assert_close(loss_f.double(), ref.rho_mean(ref.gaussian_kl(qm, qs, pm, ps), 0.5), **tol)
    torch.testing.assert_close(loss_r.double(), ref.rho_mean(ref.gaussian_kl(pm, ps, qm, qs), 0.5), **tol)
    with pytest.raises(ValueError):
        obj.prior_loss(pm, ps, qm, qs, "both", 0.5)


def test_forward_prior_covers_both_modes_reverse_prior_is_narrow():
    """Closed-form optima of a single Gaussian (m, s) fitted to a 50/50 batch of N(±0.8, 0.1²):

    forward ``mean_b KL(p_b ‖ q)``: m = mean μ_b = 0, s² = mean(σ_b² + (μ_b − m)²) = 0.01 + 0.64 → s ≈ 0.806
    (moment matching: mass over both modes);
    reverse ``mean_b KL(q ‖ p_b)``: ∂/∂m ∝ mean_b (m − μ_b)/σ_b² = 0 → m = 0 as well (equal σ_b), and
    −1/s + s/σ_b² = 0 → s = 0.1: as narrow as one mode. (Averaging the reverse KL over the batch does not pick a
    mode when both modes share a latent: the learned prior stays narrow between them.)
    """
    m_f, s_f = _fit_single_gaussian("forward")
    m_r, s_r = _fit_single_gaussian("reverse")
    assert m_f.abs().max() < 0.03
    torch.testing.assert_close(s_f, torch.full_like(s_f, math.sqrt(0.65)), rtol=0.03, atol=0)
    torch.testing.assert_close(s_r, torch.full_like(s_r, 0.1), rtol=0.05, atol=0)
    assert m_r.abs().max() < 0.05
    assert torch.all(s_f > 5 * s_r)


# ---------------------------------------------------------------------------------------------------- λ dual loss
@pytest.mark.parametrize("kl_value,direction", [(2.0, 1), (0.1, -1)])
def test_kl_coef_loss_moves_lambda_toward_the_target(kl_value, direction):
    log_lam = torch.zeros(1, requires_grad=True)
    kl = torch.full((5, 4, 1), kl_value, requires_grad=True)
    loss = obj.kl_coef_loss(log_lam, kl, target_kl=0.5)
    loss.backward()
    assert log_lam.grad.item() == pytest.approx(-(kl_value - 0.5))
    assert kl.grad is None  # the KL is detached
    opt = torch.optim.SGD([log_lam], lr=0.1)
    opt.step()
    assert math.copysign(1, log_lam.item()) == direction  # λ grows while KL > target, shrinks otherwise


# ---------------------------------------------------------------------------------------------------- world model loss
@pytest.mark.parametrize("critic,episodic", [("q", True), ("v", False)])
def test_world_model_loss_equals_hand_computation(make_tiny_model, ref, critic, episodic):
    model = make_tiny_model(num_q=3, critic=critic, episodic=episodic)
    _randomize([*model.reward.parameters(), *model.critic.parameters()])
    if episodic:
        _randomize(model.termination.parameters())
    model.eval()
    H, B = 3, 6
    g = torch.Generator().manual_seed(5)
    obs = torch.randn(H + 1, B, 5, generator=g)
    actions = torch.rand(H, B, 3, generator=g) * 2 - 1
    rewards = torch.randn(H, B, 1, generator=g) * 3
    terminated = (torch.rand(H, B, 1, generator=g) < 0.3).float()
    value_target = torch.randn(H, B, 1, generator=g) * 5
    with torch.no_grad():
        next_z = model.encode(obs[1:])
    total, parts, zs = obj.world_model_loss(model, obs, actions, rewards, terminated, value_target, next_z, 0.5)
    # by hand (spec §3.3 steps 4–6), explicit loops over t and heads
    z = model.encode(obs[0])
    zh = [z]
    cons = rew = val = term = 0.0
    for t in range(H):
        r_logits = model.reward(torch.cat([z, actions[t]], -1))
        rew = rew + 0.5**t * ref.soft_ce(r_logits, rewards[t]).mean()
        x = torch.cat([z, actions[t]], -1) if critic == "q" else z
        q_logits = model.critic(x)
        for q in range(3):
            val = val + 0.5**t * ref.soft_ce(q_logits[q], value_target[t]).mean()
        z = model.dynamics(torch.cat([z, actions[t]], -1))
        zh.append(z)
        cons = cons + 0.5**t * ((z - next_z[t]) ** 2).mean()
        if episodic:
            term = term + F.binary_cross_entropy_with_logits(model.termination(z), terminated[t]) / H
    cons, rew, val = cons / H, rew / H, val / (H * 3)
    expected = 20 * cons + 0.1 * rew + 0.1 * val + (1.0 * term if episodic else 0.0)
    expected, cons, rew, val = (v.detach() for v in (expected, cons, rew, val))
    term = term.detach() if episodic else term
    assert total.detach().item() == pytest.approx(float(expected), rel=1e-5)
    assert parts["consistency_loss"].item() == pytest.approx(float(cons), rel=1e-5)
    assert parts["reward_loss"].item() == pytest.approx(float(rew), rel=1e-5)
    assert parts["value_loss"].item() == pytest.approx(float(val), rel=1e-5)
    if episodic:
        assert parts["termination_loss"].item() == pytest.approx(float(term), rel=1e-5)
    else:
        assert "termination_loss" not in parts
    torch.testing.assert_close(zs, torch.stack(zh))
    # gradients reach encoder, dynamics, reward and critic; the consistency target is not differentiated
    total.backward()
    for module in (model.encoder, model.dynamics, model.reward, model.critic):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in model.critic_target.parameters())
    assert all(p.grad is None for p in model.pi.parameters())
