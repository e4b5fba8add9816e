"""MPPI planner (spec §4): finds a known optimum, batching = one by one, warm start, std bounds, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sb3_pompc.planner import MPPIPlanner, PlannerNoise, PlanResult
from sb3_pompc.world_model import WorldModel

A, L = 2, 8


def two_hot_logits(value: torch.Tensor) -> torch.Tensor:
    """Logits (log of the two-hot target, spec §2) whose expectation decodes to ``value`` (N, 1) → (N, 101)."""
    y = (torch.sign(value) * torch.log1p(value.abs())).clamp(-10.0, 10.0).squeeze(-1)
    pos = (y + 10.0) / 0.2
    idx = pos.floor().clamp(max=100)
    off = pos - idx
    probs = torch.zeros(value.shape[0], 101)
    rows = torch.arange(value.shape[0])
    probs[rows, idx.long()] += 1.0 - off
    probs[rows, (idx.long() + 1) % 101] += off
    return torch.log(probs + 1e-30)


class QuadraticModel(WorldModel):
    """Identity dynamics, reward ``−‖a − a*(z)‖²`` with ``a* = z[:, :A]``, zero terminal value: the best plan
    repeats a* at every step. The reward reaches the planner through the two-hot head's logits."""

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return z

    def reward_logits(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        r = -((a - z[:, :A]) ** 2).sum(-1, keepdim=True)
        return two_hot_logits(r)

    def critic_value(self, z, a=None, reduce="avg", target=False, detach=False, kl=False, heads=None):
        return torch.zeros(z.shape[0], 1)


def quadratic_model() -> QuadraticModel:
    return QuadraticModel(4, A, latent_dim=L, enc_dim=8, mlp_dim=16, num_q=2)


def latents_with_targets(targets: torch.Tensor) -> torch.Tensor:
    z = torch.zeros(targets.shape[0], L)
    z[:, :A] = targets
    return z


def test_mppi_finds_the_known_optimum():
    model = quadratic_model()
    planner = MPPIPlanner(horizon=3, iterations=6, num_samples=256, num_elites=32, num_pi_trajs=8,
                          temperature=0.5, min_std=0.05, max_std=2.0, gamma=0.99)
    targets = torch.tensor([[0.6, -0.3], [-0.7, 0.2], [0.0, 0.9]])
    res = planner.plan(model, latents_with_targets(targets))
    assert (res.mean[:, 0] - targets).abs().max() < 0.1  # MPPI mean of the first step
    assert (res.mean - targets[:, None]).abs().max() < 0.15  # every step: a* is the best action at every step
    assert (res.plan_mean - targets).abs().max() < 0.2  # the selected elite's first action
    # the chosen elite's value is close to the optimum 0 and never above it
    assert torch.all(res.value <= 1e-4) and torch.all(res.value > -0.3)
    # the planner std shrinks from max_std
    assert torch.all(res.plan_std < 0.5)


def _random_model(**kwargs) -> WorldModel:
    model = WorldModel(4, A, latent_dim=L, enc_dim=8, mlp_dim=16, num_q=3, **kwargs)
    with torch.no_grad():
        for p in [*model.reward.parameters(), *model.critic.parameters(), *model.dynamics.parameters(),
                  *model.pi.parameters()]:
            p.normal_(0.0, 0.5)
    return model


def _small_planner(**kwargs) -> MPPIPlanner:
    cfg = dict(horizon=3, iterations=3, num_samples=48, num_elites=8, num_pi_trajs=4, temperature=0.5,
               min_std=0.05, max_std=2.0, gamma=0.95)
    return MPPIPlanner(**{**cfg, **kwargs})


@pytest.mark.parametrize("critic", ["q", "v"])
def test_batched_planning_equals_planning_one_by_one(critic):
    model = _random_model(critic=critic)
    planner = _small_planner()
    n = 3
    z = model.encode(torch.randn(n, 4)).detach()
    warm = torch.rand(n, 3, A) * 2 - 1
    noise = planner.draw_noise(n, A, model.num_q, torch.device("cpu"))
    batched = planner.plan(model, z, warm, noise=noise)
    for i in range(n):
        single = planner.plan(model, z[i : i + 1], warm[i : i + 1], noise=noise.select(slice(i, i + 1)))
        for field in PlanResult._fields:
            torch.testing.assert_close(getattr(single, field), getattr(batched, field)[i : i + 1],
                                       rtol=1e-5, atol=1e-5, msg=field)
    # the states really are planned differently (not a trivially identical batch)
    assert (batched.plan_mean[0] - batched.plan_mean[1]).abs().max() > 1e-3


def test_shapes_determinism_and_exploration_noise():
    model = _random_model()
    planner = _small_planner()
    n = 4
    z = model.encode(torch.randn(n, 4)).detach()
    noise = planner.draw_noise(n, A, model.num_q, torch.device("cpu"))
    res = planner.plan(model, z, None, deterministic=False, noise=noise)
    assert res.action.shape == res.plan_mean.shape == res.plan_std.shape == (n, A)
    assert res.mean.shape == (n, 3, A) and res.value.shape == (n, 1)
    assert res.action.abs().max() <= 1 and res.plan_mean.abs().max() <= 1
    # exploring: a = clamp(elite first action + σ0 · ε)
    torch.testing.assert_close(res.action, (res.plan_mean + res.plan_std * noise.explore).clamp(-1, 1))
    assert (res.action - res.plan_mean).abs().max() > 1e-3
    # deterministic: no exploration noise, the same MPPI run, and the action ``deterministic_action`` names
    for how in ("elite", "mean", "sample"):
        planner.deterministic_action = how
        det = planner.plan(model, z, None, deterministic=True, noise=noise)
        torch.testing.assert_close(det.action, det.plan_mean)
        torch.testing.assert_close(det.mean, res.mean)
        if how == "sample":  # TD-MPC2's protocol: the exploring plan's Gumbel-drawn elite, without the noise
            torch.testing.assert_close(det.plan_mean, res.plan_mean)
        if how == "mean":
            torch.testing.assert_close(det.plan_mean, res.mean[:, 0])
        if how == "elite":  # the highest-weight elite: no drawn elite has a higher value
            assert torch.all(det.value >= res.value - 1e-6)
    planner.deterministic_action = "elite"
    # without given noise: fresh noise each call
    a1 = planner.plan(model, z).plan_mean
    a2 = planner.plan(model, z).plan_mean
    assert not torch.equal(a1, a2)


def test_planning_uses_eval_mode_and_restores_the_mode():
    model = _random_model(dropout=0.5)
    planner = _small_planner()
    z = model.encode(torch.randn(2, 4)).detach()
    noise = planner.draw_noise(2, A, model.num_q, torch.device("cpu"))
    model.train()
    r1 = planner.plan(model, z, noise=noise)
    r2 = planner.plan(model, z, noise=noise)
    assert model.training and model.critic.training  # restored
    for field in PlanResult._fields:  # no dropout while planning → identical
        torch.testing.assert_close(getattr(r1, field), getattr(r2, field))
    model.eval()
    planner.plan(model, z, noise=noise)
    assert not model.training


def _zero_noise(planner: MPPIPlanner, n: int) -> PlannerNoise:
    noise = planner.draw_noise(n, A, 2, torch.device("cpu"))
    return dataclasses.replace(noise, act_eps=torch.zeros_like(noise.act_eps), explore=torch.zeros_like(noise.explore))


def test_warm_start_shifts_the_mean_and_std_restarts_at_max():
    """With zero sampling noise and no policy trajectories every sample equals the initial mean, so the MPPI
    mean returned is the initial mean: the previous mean shifted one step, last step 0."""
    model = quadratic_model()
    planner = _small_planner(num_pi_trajs=0, iterations=2, min_std=0.07)
    n = 2
    warm = torch.tensor([[[0.1, 0.2], [0.3, -0.4], [0.5, 0.6]], [[-0.9, 0.8], [-0.7, 0.65], [-0.5, 0.45]]])
    z = latents_with_targets(torch.zeros(n, A))
    res = planner.plan(model, z, warm, noise=_zero_noise(planner, n))
    expected = torch.zeros(n, 3, A)
    expected[:, :2] = warm[:, 1:]
    torch.testing.assert_close(res.mean, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.plan_mean, warm[:, 1])
    # all elites identical → std collapses to the lower clamp
    torch.testing.assert_close(res.plan_std, torch.full((n, A), 0.07))
    # no warm start → mean 0
    cold = planner.plan(model, z, None, noise=_zero_noise(planner, n))
    torch.testing.assert_close(cold.mean, torch.zeros(n, 3, A), rtol=0, atol=1e-6)


def test_std_stays_within_bounds():
    model = _random_model()
    z = model.encode(torch.randn(5, 4)).detach()
    for lo, hi in ((0.05, 2.0), (0.1, 0.3), (0.4, 0.5)):
        planner = _small_planner(min_std=lo, max_std=hi, iterations=2)
        res = planner.plan(model, z)
        assert res.plan_std.min() >= lo - 1e-7 and res.plan_std.max() <= hi + 1e-7
    # every sample an elite, uniform scores, samples at mean ± 10·σ: the spread (0.2) exceeds max_std → clamped
    planner = _small_planner(min_std=0.01, max_std=0.02, iterations=1, temperature=0.0, num_pi_trajs=0,
                             num_elites=48)
    noise = planner.draw_noise(5, A, model.num_q, torch.device("cpu"))
    signs = torch.where(torch.arange(48) % 2 == 0, 10.0, -10.0)
    noise = dataclasses.replace(noise, act_eps=signs.reshape(1, 1, 1, 48, 1).expand_as(noise.act_eps).clone())
    res = planner.plan(model, z, noise=noise)
    torch.testing.assert_close(res.plan_std, torch.full_like(res.plan_std, 0.02))
    torch.testing.assert_close(res.mean, torch.zeros_like(res.mean), rtol=0, atol=1e-6)


def test_policy_trajectories_are_candidates():
    """Gaussian samples stuck far from a* (zero noise, warm mean at the wrong corner) and a policy whose
    trajectories hit a*: the elites (and the plan) come from the policy trajectories."""
    model = quadratic_model()
    target = torch.tensor([[0.4, -0.4]])
    with torch.no_grad():  # π(z) = N(tanh(μ_raw) = a*, σ = e^-10): deterministic at a*
        last = model.pi.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.cat([torch.atanh(target[0]), torch.full((A,), -1e3)]))
    planner = _small_planner(num_pi_trajs=4, iterations=2)
    bad_warm = torch.full((1, 3, A), -1.0)
    bad_warm[:, :, 1] = 1.0
    res = planner.plan(model, latents_with_targets(target), bad_warm, deterministic=True,
                       noise=_zero_noise(planner, 1))
    torch.testing.assert_close(res.plan_mean, target, rtol=0, atol=1e-3)
    # the same setting without policy trajectories stays at the (bad) shifted warm start
    planner0 = _small_planner(num_pi_trajs=0, iterations=2)
    res0 = planner0.plan(model, latents_with_targets(target), bad_warm, deterministic=True,
                         noise=_zero_noise(planner0, 1))
    torch.testing.assert_close(res0.plan_mean, bad_warm[:, 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_elites=65, num_samples=64),
        dict(horizon=0),
        dict(horizon=-2),
        dict(iterations=0),
        dict(num_pi_trajs=64, num_samples=64),
        dict(num_elites=0),
        dict(min_std=0.5, max_std=0.1),
        dict(min_std=0.0),
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        MPPIPlanner(**kwargs)


def test_draw_noise_shapes_and_distinct_heads():
    planner = _small_planner()
    noise = planner.draw_noise(5, A, 4, torch.device("cpu"))
    assert noise.pi_eps.shape == (3, 5, 4, A)
    assert noise.act_eps.shape == (3, 3, 5, 44, A)
    assert noise.term_eps.shape == (3, 5, 48, A)
    assert noise.gumbel.shape == (5, 8) and noise.explore.shape == (5, A)
    assert noise.heads.shape == (3, 2)
    assert torch.all(noise.heads[:, 0] != noise.heads[:, 1]) and noise.heads.max() < 4
    sub = noise.select(slice(1, 3))
    torch.testing.assert_close(sub.act_eps, noise.act_eps[:, :, 1:3])
    torch.testing.assert_close(sub.gumbel, noise.gumbel[1:3])


@pytest.mark.parametrize("horizon,num_pi_trajs", [(1, 3), (1, 0), (5, 2)])
def test_other_horizons(horizon, num_pi_trajs):
    model = quadratic_model()
    planner = _small_planner(horizon=horizon, num_pi_trajs=num_pi_trajs, iterations=4)
    targets = torch.tensor([[0.5, -0.5], [-0.2, 0.3]])
    warm = torch.rand(2, horizon, A) * 2 - 1
    res = planner.plan(model, latents_with_targets(targets), warm, deterministic=True)
    assert res.mean.shape == (2, horizon, A) and res.plan_mean.shape == (2, A)
    assert (res.mean[:, 0] - targets).abs().max() < 0.3
