"""Math utilities (spec §2): two-hot regression, soft-CE, SimNorm, Gaussian KL, RunningScale, discount, entropy;
and the element-wise speed tricks of ``sb3_pompc.speedups`` (hashed dropout, compile-friendly Mish).

Expected values come from the reference formulas in ``conftest.py`` (written from the spec) or from numpy, never
from the function under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sb3_pompc.math import (
    RunningScale,
    SimNorm,
    TwoHot,
    discount_heuristic,
    gaussian_kl,
    gaussian_log_prob,
    percentile,
    scaled_entropy,
    soft_ce,
    symexp,
    symlog,
)
from sb3_pompc.speedups import hashed_dropout, mish


# ---------------------------------------------------------------------------------------------------- symlog
def test_symlog_symexp_values_and_inverse():
    x = torch.tensor([-1e4, -3.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 7.0, 1e4], dtype=torch.float64)
    expected = torch.tensor([math.copysign(math.log(1 + abs(v)), v) if v != 0 else 0.0 for v in x.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(symlog(x), expected)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-9, atol=1e-12)
    # symexp(1) = e − 1, symexp(−2) = −(e² − 1)
    torch.testing.assert_close(symexp(torch.tensor([1.0, -2.0], dtype=torch.float64)),
                               torch.tensor([math.e - 1, -(math.e**2 - 1)], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- two-hot
def test_two_hot_bin_geometry():
    th = TwoHot()
    assert th.num_bins == 101
    assert th.bin_size == pytest.approx(0.2)
    torch.testing.assert_close(th.centres, torch.tensor([-10.0 + 0.2 * k for k in range(101)]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [0, 1, 37, 50, 63, 99, 100])
def test_two_hot_at_bin_centres_is_one_hot(k):
    """x whose symlog is exactly centre k → all the mass on bin k."""
    centre = -10.0 + 0.2 * k
    x = torch.tensor([[math.copysign(math.expm1(abs(centre)), centre)]], dtype=torch.float32)  # (1, 1)
    target = TwoHot().encode(x)
    assert target.shape == (1, 101)
    expected = torch.zeros(1, 101)
    expected[0, k] = 1.0
    torch.testing.assert_close(target, expected, atol=2e-4, rtol=0)
    assert target.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("y,idx,off", [(0.05, 50, 0.25), (-0.13, 49, 0.35), (3.37, 66, 0.85), (-9.99, 0, 0.05)])
def test_two_hot_between_bins_exact_weights(y, idx, off):
    """symlog(x) = y between centres idx and idx+1 → weights (1 − off, off) with off = (y − c_idx)/0.2."""
    x = torch.tensor([[math.copysign(math.expm1(abs(y)), y)]], dtype=torch.float64)  # (1, 1)
    target = TwoHot().encode(x)
    assert target[0, idx].item() == pytest.approx(1.0 - off, abs=1e-4)
    assert target[0, idx + 1].item() == pytest.approx(off, abs=1e-4)
    others = torch.ones(101, dtype=torch.bool)
    others[[idx, idx + 1]] = False
    assert target[0, others].abs().max().item() == 0.0


def test_two_hot_matches_reference_and_shapes(ref):
    x = torch.tensor([-5e5, -200.0, -3.3, -0.7, 0.0, 1e-4, 0.42, 1.0, 12.0, 2e4, 5e6])
    torch.testing.assert_close(TwoHot().encode(x).double(), ref.two_hot(x), atol=1e-4, rtol=0)
    # (..., 1) and (...) inputs give (..., K)
    batch = torch.randn(4, 3, 1) * 10
    assert TwoHot().encode(batch).shape == (4, 3, 101)
    assert TwoHot().encode(batch.squeeze(-1)).shape == (4, 3, 101)
    torch.testing.assert_close(TwoHot().encode(batch), TwoHot().encode(batch.squeeze(-1)))


def test_two_hot_beyond_range_clamps_to_edge_bins():
    big = torch.tensor([math.expm1(10.0) * 5, 1e30])  # symlog > vmax
    small = -big
    t_big, t_small = TwoHot().encode(big), TwoHot().encode(small)
    assert torch.all(t_big[:, 100] == 1.0) and torch.all(t_big[:, :100] == 0.0)
    assert torch.all(t_small[:, 0] == 1.0) and torch.all(t_small[:, 1:] == 0.0)


def test_two_hot_round_trip_over_a_wide_range(ref):
    """decode(log(encode(x))) ≈ x for x ∈ [−e^10+1, e^10−1] (negative, 0, large); beyond vmax it clamps."""
    th = TwoHot()
    y = torch.linspace(-9.99, 9.99, 801, dtype=torch.float64)
    x = symexp(y).float()
    x = torch.cat([x, torch.tensor([0.0, 1.0, -1.0, 0.3, -250.0])])
    logits = torch.log(th.encode(x) + 1e-30)
    decoded = th.decode(logits).squeeze(-1)
    torch.testing.assert_close(decoded.double(), x.double(), rtol=2e-4, atol=1e-5)
    # same round trip through the independent reference decoder
    torch.testing.assert_close(ref.two_hot_inv(logits).squeeze(-1), x.double(), rtol=2e-4, atol=1e-5)
    # beyond the range: the value saturates at symexp(±10)
    edge = math.expm1(10.0)
    out = th.decode(torch.log(th.encode(torch.tensor([1e6, -1e7, 3e5])) + 1e-30)).squeeze(-1)
    torch.testing.assert_close(out, torch.tensor([edge, -edge, edge]), rtol=1e-4, atol=0)


def test_decode_matches_reference(ref):
    logits = torch.randn(7, 5, 101) * 3
    out = TwoHot().decode(logits)
    assert out.shape == (7, 5, 1)
    torch.testing.assert_close(out.double(), ref.two_hot_inv(logits), rtol=1e-4, atol=1e-5)
    # uniform logits: the expectation of symmetric centres is 0
    assert TwoHot().decode(torch.zeros(3, 101)).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------------- soft-CE
def test_soft_ce_matches_reference(ref):
    logits = torch.randn(6, 101)
    x = torch.tensor([[-40.0], [-1.0], [0.0], [0.37], [5.0], [900.0]])
    ce = TwoHot().soft_ce(logits, x)
    assert ce.shape == (6, 1)
    torch.testing.assert_close(ce.double(), ref.soft_ce(logits, x), rtol=1e-5, atol=1e-5)
    # the free function takes probabilities
    torch.testing.assert_close(soft_ce(logits, ref.two_hot(x).float()).double(), ref.soft_ce(logits, x),
                               rtol=1e-5, atol=1e-5)


def test_soft_ce_is_minimised_at_the_target(ref):
    target = torch.tensor([[3.7], [-0.4], [120.0]])
    th = TwoHot()
    # CE at the target's own log-probabilities is below any perturbation of them
    best = torch.log(ref.two_hot(target).float() + 1e-12)
    ce_best = th.soft_ce(best, target)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        perturbed = best + 0.5 * torch.randn(best.shape, generator=gen)
        assert torch.all(th.soft_ce(perturbed, target) > ce_best)
    # gradient descent on the logits from uniform converges to logits that decode to the target
    logits = torch.zeros(3, 101, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        th.soft_ce(logits, target).sum().backward()
        opt.step()
    decoded = th.decode(logits.detach())
    torch.testing.assert_close(decoded, target, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------- SimNorm
def test_simnorm_groups_of_8_sum_to_one():
    x = torch.randn(5, 4, 64) * 4
    y = SimNorm(8)(x)
    assert y.shape == x.shape
    groups = y.reshape(5, 4, 8, 8)
    torch.testing.assert_close(groups.sum(-1), torch.ones(5, 4, 8))
    assert torch.all(y > 0)
    # softmax within each group of 8 consecutive entries, computed independently
    expected = torch.exp(x.reshape(5, 4, 8, 8))
    expected = (expected / expected.sum(-1, keepdim=True)).reshape(5, 4, 64)
    torch.testing.assert_close(y, expected)
    # per group, not over the whole vector: the 64 entries sum to 8 (one per group)
    torch.testing.assert_close(y.sum(-1), torch.full((5, 4), 8.0))
    with pytest.raises(ValueError):
        SimNorm(8)(torch.randn(3, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_simnorm_groups_entries_l_over_v_apart(dtype):
    x = (torch.randn(5, 4, 64) * 4).to(dtype)
    y = SimNorm(8, layout="strided")(x)
    assert y.shape == x.shape and y.dtype == dtype
    # group g = entries g, g + 8, ..., g + 56: the softmax of the (8, 8) view's columns, in fp32
    expected = torch.softmax(x.float().reshape(5, 4, 8, 8), dim=-2).reshape(5, 4, 64).to(dtype)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y.float().reshape(5, 4, 8, 8).sum(-2), torch.ones(5, 4, 8), atol=2e-2, rtol=0)
    # the same values as the contiguous layout applied to the relabelled vector
    perm = 8 * (torch.arange(64) % 8) + torch.arange(64) // 8
    torch.testing.assert_close(y, SimNorm(8)(x[..., perm.argsort()])[..., perm])
    with pytest.raises(ValueError, match="layout must be one of"):
        SimNorm(8, layout="rows")


# ---------------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.01, 0.3])
def test_hashed_dropout_is_bernoulli_inverted_dropout(p):
    torch.manual_seed(0)
    x = torch.randn(4, 256, 512)
    n = x.numel()
    ys = [hashed_dropout(x, p) for _ in range(3)]
    masks = [(y != 0) for y in ys]
    for y, m in zip(ys, masks):
        # kept entries are scaled by 1/(1-p), dropped ones are 0
        torch.testing.assert_close(y[m], x[m] / (1 - p))
        rate = 1 - m.float().mean().item()
        assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5, f"drop rate {rate} for p={p}"
    # a new mask at every call, independent of the previous one: joint drop rate p², not p
    both = (~masks[0] & ~masks[1]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5 + 1e-6, f"joint drop rate {both} for p={p}"
    # independent along the flat index too (neighbours, rows, the next 512-block)
    d = (~masks[0]).flatten().float()
    for lag in (1, 2, 512, 256 * 512):
        joint = (d[:-lag] * d[lag:]).mean().item()
        assert abs(joint - p * p) < 5 * (p * p / n) ** 0.5 + 1e-6, f"lag {lag}: {joint}"
    # the seed comes from torch's generator: reproducible under manual_seed
    torch.manual_seed(7)
    a = hashed_dropout(x, p)
    torch.manual_seed(7)
    assert torch.equal(a, hashed_dropout(x, p))
    assert hashed_dropout(x.bfloat16(), p).dtype == torch.bfloat16


def test_hashed_dropout_compiled_equals_eager():
    x = torch.randn(3, 64, 32)
    compiled = torch.compile(hashed_dropout, dynamic=False, options={"fallback_random": True})
    torch.manual_seed(3)
    eager = hashed_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(compiled(x, 0.2), eager)


# ---------------------------------------------------------------------------------------------------- KL
def _mc_kl(mu_p, std_p, mu_q, std_q, n=400_000, seed=0):
    """Monte-Carlo ``mean_i E_{x~p}[log p_i(x) − log q_i(x)]`` (per-dim mean reduction)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, mu_p.shape[-1], generator=gen, dtype=torch.float64)
    x = mu_p + std_p * eps
    lp = -0.5 * ((x - mu_p) / std_p) ** 2 - torch.log(std_p)
    lq = -0.5 * ((x - mu_q) / std_q) ** 2 - torch.log(std_q)
    return (lp - lq).mean(0).mean()


def test_gaussian_kl_closed_form_both_directions_against_monte_carlo(ref):
    mu_p = torch.tensor([0.3, -0.5, 0.0], dtype=torch.float64)
    std_p = torch.tensor([0.2, 0.7, 1.3], dtype=torch.float64)
    mu_q = torch.tensor([-0.1, 0.4, 0.25], dtype=torch.float64)
    std_q = torch.tensor([0.5, 0.3, 1.0], dtype=torch.float64)
    pq = gaussian_kl(mu_p, std_p, mu_q, std_q)
    qp = gaussian_kl(mu_q, std_q, mu_p, std_p)
    assert pq.shape == (1,)
    mc_pq = _mc_kl(mu_p, std_p, mu_q, std_q)
    mc_qp = _mc_kl(mu_q, std_q, mu_p, std_p)
    assert pq.item() == pytest.approx(mc_pq.item(), rel=2e-2)
    assert qp.item() == pytest.approx(mc_qp.item(), rel=2e-2)
    # exact against the reference closed form (mean over dims, NOT sum)
    assert pq.item() == pytest.approx(ref.gaussian_kl(mu_p, std_p, mu_q, std_q).item(), rel=1e-6)
    per_dim_sum = 3 * ref.gaussian_kl(mu_p, std_p, mu_q, std_q).item()
    assert pq.item() != pytest.approx(per_dim_sum, rel=1e-3)
    # asymmetry
    assert abs(pq.item() - qp.item()) > 0.1


def test_gaussian_kl_self_is_zero_and_nonnegative():
    mu = torch.randn(10, 4)
    std = torch.rand(10, 4) + 0.05
    kl = gaussian_kl(mu, std, mu, std)
    assert kl.shape == (10, 1)
    assert kl.abs().max().item() < 1e-6
    other = gaussian_kl(mu, std, torch.randn(10, 4), torch.rand(10, 4) + 0.05)
    assert torch.all(other > 0)


# ---------------------------------------------------------------------------------------------------- RunningScale
def test_percentile_equals_numpy_linear(ref):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 1)).astype(np.float32)
    p = percentile(torch.from_numpy(x), torch.tensor([5.0, 95.0]))
    np_p = np.percentile(x[:, 0].astype(np.float64), [5, 95], method="linear")
    np.testing.assert_allclose(p.reshape(-1).numpy(), np_p, rtol=1e-5, atol=1e-6)
    # n = 256: positions 12.75 and 242.25 between sorted neighbours
    xs = np.sort(x[:, 0].astype(np.float64))
    assert p[0].item() == pytest.approx(0.25 * xs[12] + 0.75 * xs[13], abs=1e-5)
    assert p[1].item() == pytest.approx(0.75 * xs[242] + 0.25 * xs[243], abs=1e-5)
    assert p[0].item() == pytest.approx(ref.percentile(x, 5), abs=1e-5)


def test_running_scale_update_rule(ref):
    rs = RunningScale(tau=0.01)
    assert rs.value.item() == 1.0
    rng = np.random.default_rng(0)
    S = 1.0
    for scale in (10.0, 10.0, 30.0, 0.1, 5.0):
        x = rng.normal(size=(256, 1)).astype(np.float32) * scale
        rs.update(torch.from_numpy(x))
        v = max(ref.percentile(x, 95) - ref.percentile(x, 5), 1.0)
        S = S + 0.01 * (v - S)
        assert rs.value.item() == pytest.approx(S, rel=1e-5)
    # forward divides by S
    y = torch.randn(8, 1)
    torch.testing.assert_close(rs(y), y / S, rtol=1e-5, atol=1e-7)


def test_running_scale_clamps_at_one():
    rs = RunningScale(tau=0.01)
    for _ in range(20):
        rs.update(torch.rand(256, 1) * 0.01)  # spread ≪ 1 → v = 1
    assert rs.value.item() == pytest.approx(1.0, abs=1e-7)
    rs.update(torch.full((256, 1), 3.0))  # zero spread
    assert rs.value.item() >= 1.0 - 1e-7
    # one update from S = 1 with a spread of 11: S = 1 + 0.01·(11 − 1) = 1.1
    rs2 = RunningScale(tau=0.01)
    x = torch.cat([torch.full((128, 1), 0.0), torch.full((128, 1), 11.0)])
    rs2.update(x)
    assert rs2.value.item() == pytest.approx(1.1, rel=1e-6)
    assert "value" in rs2.state_dict()


# ---------------------------------------------------------------------------------------------------- discount
@pytest.mark.parametrize(
    "length,gamma",
    [(500, 0.99), (1000, 0.995), (250, 0.98), (100, 0.95), (10, 0.95), (5, 0.95), (100_000, 0.995)],
)
def test_discount_heuristic(length, gamma):
    assert discount_heuristic(length) == pytest.approx(gamma, abs=1e-12)


# ---------------------------------------------------------------------------------------------------- entropy
def test_gaussian_log_prob_and_scaled_entropy():
    A = 6
    eps = torch.randn(1000, A)
    log_std = torch.rand(1000, A) * 3 - 2
    lp_g = gaussian_log_prob(eps, log_std)
    expected = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
    torch.testing.assert_close(lp_g, expected)
    # tanh-squashed log-prob: lp = lp_g − Σ log(relu(1 − a²) + 1e-6)
    a = torch.tanh(torch.randn(1000, A) * 0.5)
    lp = lp_g - torch.log(torch.relu(1 - a**2) + 1e-6).sum(-1, keepdim=True)
    ent = scaled_entropy(lp, lp_g, A)
    ok = lp.abs() > 1e-2  # away from the 1e-8 guard's spike
    torch.testing.assert_close(ent[ok], (-A * lp_g)[ok], rtol=1e-4, atol=1e-4)
    # exact formula −lp·(A·lp_g)/(lp + 1e-8)
    torch.testing.assert_close(ent, -lp * (A * lp_g) / (lp + 1e-8))


def test_mish_compiled_form_matches_native() -> None:
    """Eager ``mish`` is ``F.mish``; the form traced under torch.compile, ``x·n/(n+2)`` with ``n = eᵘ(eᵘ+2)``,
    ``u = min(x, 20)``, agrees with it over the whole range (large |x| included) and has the same gradient."""
    import torch.nn.functional as F

    x = torch.cat([torch.linspace(-60.0, 60.0, 2001), torch.tensor([-1e4, -88.0, 19.9, 20.0, 20.1, 1e4])])
    assert torch.equal(mish(x), F.mish(x))
    compiled = torch.compile(mish, backend="aot_eager", dynamic=False)  # traces the compiled form, no C++ needed
    xc = x.clone().requires_grad_(True)
    xe = x.clone().requires_grad_(True)
    yc, ye = compiled(xc), F.mish(xe)
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    yc.sum().backward()
    ye.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
