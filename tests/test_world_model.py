"""World model (spec §1): parameter counts, zero-init heads, ensemble, dropout, target critic, policy head."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sb3_pompc.policies import POMPCPolicy
from sb3_pompc.world_model import MODEL_SIZES, EnsembleMLP, WorldModel, model_size_config

K = 101


# ---------------------------------------------------------------------------------------------------- counts
def _lin(i: int, o: int) -> int:
    return i * o + o


def _nl(i: int, o: int) -> int:  # NormedLinear: Linear + LayerNorm(affine)
    return _lin(i, o) + 2 * o


def analytic_counts(obs: int, A: int, L: int, enc: int, M: int, num_enc_layers: int, num_q: int, critic: str):
    """Learnable parameters per component from the architecture of spec §1.1–1.2 (written independently)."""
    hidden = max(num_enc_layers - 1, 1) * [enc]
    dims = [obs, *hidden]
    encoder = sum(_nl(dims[i], dims[i + 1]) for i in range(len(dims) - 1)) + _nl(dims[-1], L)  # last: LN + SimNorm
    dynamics = _nl(L + A, M) + _nl(M, M) + _nl(M, L)
    reward = _nl(L + A, M) + _nl(M, M) + _lin(M, K)
    pi = _nl(L, M) + _nl(M, M) + _lin(M, 2 * A)
    c_in = L + A if critic == "q" else L
    crit = num_q * (_nl(c_in, M) + _nl(M, M) + _lin(M, K))
    return dict(encoder=encoder, dynamics=dynamics, reward=reward, pi=pi, critic=crit,
                total=encoder + dynamics + reward + pi + crit)


# spec §1.6, (obs, A): [T] 5×Q, [B] 2×V critic
SPEC_TABLE = {
    "dog-run": ((223, 38), dict(encoder=190_464, dynamics=810_496, reward=598_629, pi=566_348, critic=2_993_145,
                                total=5_159_082), dict(critic=1_158_346, total=3_324_283)),
    "cheetah-run": ((17, 6), dict(encoder=137_728, dynamics=794_112, reward=582_245, pi=533_516, critic=2_911_225,
                                  total=4_958_826), dict(critic=1_158_346, total=3_205_947)),
}


def _meta_model(obs: int, A: int, **kwargs) -> WorldModel:
    with torch.device("meta"):
        return WorldModel(obs, A, **kwargs)


@pytest.mark.parametrize("task", sorted(SPEC_TABLE))
def test_parameter_counts_match_spec_table(task):
    (obs, A), t_counts, b_counts = SPEC_TABLE[task]
    # TD-MPC2: 5 Q heads
    tdmpc2 = _meta_model(obs, A, num_q=5, critic="q", policy_squash="tanh", log_std_min=-10, log_std_max=2)
    counts = tdmpc2.component_parameter_counts()
    for key, value in t_counts.items():
        assert counts[key] == value, (task, key)
    assert counts["termination"] == 0
    assert counts == {**analytic_counts(obs, A, 512, 256, 512, 2, 5, "q"), "termination": 0}
    # the learnable parameters of the module (target critic excluded) are the same number
    assert sum(p.numel() for p in tdmpc2.parameters() if p.requires_grad) == t_counts["total"]
    # BMPC: 2 V heads
    bmpc = _meta_model(obs, A, num_q=2, critic="v", policy_squash="clamp", log_std_min=-3, log_std_max=1,
                       critic_init="default")
    counts_b = bmpc.component_parameter_counts()
    assert counts_b["critic"] == b_counts["critic"]
    assert counts_b["total"] == b_counts["total"]
    for key in ("encoder", "dynamics", "reward", "pi"):
        assert counts_b[key] == t_counts[key]
    # the target critic is an exact-size frozen copy, not counted
    n_target = sum(p.numel() for p in bmpc.critic_target.parameters())
    assert n_target == b_counts["critic"]
    assert not any(p.requires_grad for p in bmpc.critic_target.parameters())


def test_model_size_table_matches_spec():
    spec = {1: (256, 384, 128, 2), 5: (256, 512, 512, 2), 19: (1024, 1024, 768, 3), 48: (1792, 1792, 768, 4),
            317: (4096, 4096, 1376, 5)}
    assert sorted(MODEL_SIZES) == sorted(spec)
    for size, (enc, mlp_dim, latent, layers) in spec.items():
        cfg = model_size_config(size)
        assert (cfg["enc_dim"], cfg["mlp_dim"], cfg["latent_dim"], cfg["num_enc_layers"]) == (enc, mlp_dim, latent, layers)
    assert model_size_config(1)["num_q"] == 2 and model_size_config(317)["num_q"] == 8
    with pytest.raises(ValueError):
        model_size_config(7)


@pytest.mark.parametrize("size,nominal", [(1, 1.34e6), (5, 5.16e6), (19, 18.56e6), (48, 48.08e6), (317, 314.98e6)])
def test_model_sizes_on_dog_run(size, nominal):
    """dog-run (223, 38), single task; built on the meta device so that 317M allocates nothing."""
    cfg = model_size_config(size)
    num_q = cfg.pop("num_q", 5)
    model = _meta_model(223, 38, num_q=num_q, **cfg)
    assert next(model.parameters()).device.type == "meta"
    total = model.component_parameter_counts()["total"]
    assert abs(total - nominal) / nominal < 0.01
    expected = analytic_counts(223, 38, cfg["latent_dim"], cfg["enc_dim"], cfg["mlp_dim"], cfg["num_enc_layers"],
                               num_q, "q")["total"]
    assert total == expected


# ---------------------------------------------------------------------------------------------------- init
def test_zero_init_reward_and_critic_outputs(make_tiny_model):
    model = make_tiny_model(num_q=4)
    z = model.encode(torch.randn(32, 5) * 3)
    a = torch.rand(32, 3) * 2 - 1
    # reward head: last weight 0 and bias 0 → uniform logits → reward exactly 0
    torch.testing.assert_close(model.reward[-1].weight, torch.zeros_like(model.reward[-1].weight))
    logits = model.reward_logits(z, a)
    assert torch.all(logits == 0)
    assert torch.all(model.two_hot.decode(logits).abs() < 1e-6)
    # critic: every head predicts Q = 0 (trunc-normal init: all biases 0, last weight 0)
    q = model.two_hot.decode(model.critic_logits(z, a))
    assert q.shape == (4, 32, 1)
    assert torch.all(q.abs() < 1e-6)
    assert model.critic_value(z, a, reduce="min").abs().max().item() < 1e-6
    # hidden layers are not zero (trunc-normal 0.02), LayerNorm 1/0
    w0 = model.critic.weights[0]
    assert 0.01 < w0.std().item() < 0.03
    assert torch.all(model.critic.ln_weights[0] == 1) and torch.all(model.critic.ln_biases[0] == 0)
    assert 0.01 < model.dynamics[0].weight.std().item() < 0.03
    assert torch.all(model.dynamics[0].bias == 0)


def test_default_critic_init_is_input_independent(make_tiny_model):
    """BMPC's effective init: last weight 0 but bias U(±1/√fan_in) → each head constant, heads differ."""
    model = make_tiny_model(num_q=2, critic="v", critic_init="default")
    z1, z2 = (model.encode(torch.randn(16, 5)) for _ in range(2))
    v1, v2 = model.two_hot.decode(model.critic_logits(z1)), model.two_hot.decode(model.critic_logits(z2))
    torch.testing.assert_close(v1, v2)
    assert torch.all(model.critic.weights[-1] == 0)
    bound = 1 / math.sqrt(24)
    assert model.critic.biases[-1].abs().max().item() <= bound
    assert model.critic.biases[-1].abs().max().item() > 0
    assert model.critic.biases[0].abs().max().item() > 0  # hidden biases are not zero either
    with pytest.raises(ValueError):
        make_tiny_model(critic_init="xavier")


def test_constructor_validation(make_tiny_model):
    with pytest.raises(ValueError):
        make_tiny_model(critic="w")
    with pytest.raises(ValueError):
        make_tiny_model(num_q=1)
    with pytest.raises(ValueError):
        make_tiny_model(latent_dim=12)
    with pytest.raises(ValueError):
        make_tiny_model(policy_squash="sigmoid")


# ---------------------------------------------------------------------------------------------------- ensemble
def _reference_head(ens: EnsembleMLP, h: int, x: torch.Tensor) -> torch.Tensor:
    """Head ``h`` as an ordinary MLP: Linear → LN(affine) → Mish → Linear → LN → Mish → Linear."""
    n_layers = len(ens.weights)
    for i in range(n_layers):
        x = x @ ens.weights[i][h] + ens.biases[i][h].reshape(-1)
        if i < n_layers - 1:
            x = F.layer_norm(x, x.shape[-1:]) * ens.ln_weights[i][h].reshape(-1) + ens.ln_biases[i][h].reshape(-1)
            x = x * torch.tanh(F.softplus(x))
    return x


def test_ensemble_heads_equal_independent_mlps_and_selected_heads(randomize):
    ens = randomize(EnsembleMLP(5, 7, [16, 16], K, dropout=0.01), 0.3).eval()
    x = torch.randn(11, 7)
    full = ens(x)
    assert full.shape == (5, 11, K)
    for h in range(5):
        torch.testing.assert_close(full[h], _reference_head(ens, h, x), rtol=1e-5, atol=1e-5)
    heads = torch.tensor([3, 1])
    sel = ens(x, heads=heads)
    assert sel.shape == (2, 11, K)
    torch.testing.assert_close(sel, full[heads], rtol=1e-5, atol=1e-6)
    # heads really differ
    assert (full[0] - full[1]).abs().max() > 1e-3
    # detach: gradient only into the input
    xg = x.clone().requires_grad_(True)
    ens(xg, heads=heads, detach=True).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in ens.parameters())


def test_split_first_layer_equals_the_concatenated_input(make_tiny_model, randomize):
    """``x_tail``: ``x @ W[:k] + x_tail @ W[k:]`` is the layer on ``cat[x, x_tail]``, values and gradients."""
    ens = randomize(EnsembleMLP(5, 7, [16, 16], K), 0.3).eval()
    x, tail = torch.randn(11, 4), torch.randn(11, 3)
    heads = torch.tensor([3, 1])
    torch.testing.assert_close(ens(x, heads=heads, x_tail=tail), ens(torch.cat([x, tail], -1), heads=heads),
                               rtol=1e-5, atol=1e-6)
    # gradients into both parts (and into the parameters) equal those through the concatenated input
    xs, ts = x.clone().requires_grad_(True), tail.clone().requires_grad_(True)
    ens(xs, x_tail=ts).square().sum().backward()
    split_grads = [p.grad.clone() for p in ens.parameters()]
    ens.zero_grad()
    xc = torch.cat([x, tail], -1).requires_grad_(True)
    ens(xc).square().sum().backward()
    torch.testing.assert_close(torch.cat([xs.grad, ts.grad], -1), xc.grad, rtol=1e-5, atol=1e-6)
    for g, p in zip(split_grads, ens.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    # the policy step's use: detached critic, detached latent, gradient into the action only
    model = make_tiny_model(num_q=5)
    randomize(model.critic, 0.3)
    model.eval()  # no dropout masks: the two calls below compute the same function
    z = model.encode(torch.randn(9, 5)).detach()
    a = (torch.rand(9, 3) * 2 - 1).requires_grad_(True)
    ref_a = a.detach().clone().requires_grad_(True)
    q = model.critic_value(z, a, heads=heads, detach=True)
    q_ref = model.critic_value(z, ref_a, heads=heads)  # concatenated input, parameters with gradient
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-6)
    q.sum().backward()
    q_ref.sum().backward()
    torch.testing.assert_close(a.grad, ref_a.grad, rtol=1e-5, atol=1e-6)
    assert a.grad.abs().sum() > 0


def test_critic_value_reductions_over_given_heads(make_tiny_model, randomize, ref):
    model = make_tiny_model(num_q=5)
    randomize(model.critic, 0.3)
    model.eval()
    z = model.encode(torch.randn(9, 5))
    a = torch.rand(9, 3) * 2 - 1
    heads = torch.tensor([4, 2])
    values = ref.two_hot_inv(model.critic_logits(z, a))  # (5, 9, 1) all heads, reference decoder
    torch.testing.assert_close(model.critic_value(z, a, reduce="min", heads=heads).double(),
                               torch.minimum(values[4], values[2]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.critic_value(z, a, reduce="avg", heads=heads).double(),
                               (values[4] + values[2]) / 2, rtol=1e-4, atol=1e-5)
    # random heads: 2 distinct indices
    for _ in range(20):
        hs = model.random_heads(z.device)
        assert hs.shape == (2,) and hs[0] != hs[1] and 0 <= hs.min() and hs.max() < 5


# ---------------------------------------------------------------------------------------------------- dropout
def test_dropout_only_in_train_mode_and_only_in_the_critic(make_tiny_model, randomize):
    model = make_tiny_model(num_q=3, dropout=0.3)
    randomize(model, 0.3)
    # identical heads: any difference between heads comes from their own dropout masks
    with torch.no_grad():
        for plist in (model.critic.weights, model.critic.biases, model.critic.ln_weights, model.critic.ln_biases):
            for p in plist:
                p.copy_(p[:1].expand_as(p))
    obs = torch.randn(64, 5)
    a = torch.rand(64, 3) * 2 - 1
    model.train()
    z = model.encode(obs)
    q1, q2 = model.critic_logits(z, a), model.critic_logits(z, a)
    assert (q1 - q2).abs().max() > 1e-4  # fresh masks every call
    assert (q1[0] - q1[1]).abs().max() > 1e-4  # each head draws its own mask
    # every other head is deterministic in train mode
    torch.testing.assert_close(model.encode(obs), z)
    torch.testing.assert_close(model.next(z, a), model.next(z, a))
    torch.testing.assert_close(model.reward_logits(z, a), model.reward_logits(z, a))
    e = torch.randn(64, 3)
    torch.testing.assert_close(model.pi(z, eps=e).action, model.pi(z, eps=e).action)
    assert not any(isinstance(m, nn.Dropout) for name, m in model.named_modules() if not name.startswith("critic"))
    # the target critic never uses dropout, even when the model is in train mode
    assert not model.critic_target.training
    t1, t2 = model.critic_logits(z, a, target=True), model.critic_logits(z, a, target=True)
    torch.testing.assert_close(t1, t2)
    # eval mode: deterministic and identical heads agree
    model.eval()
    e1, e2 = model.critic_logits(z, a), model.critic_logits(z, a)
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(e1[0], e1[1])


# ---------------------------------------------------------------------------------------------------- target
def test_target_critic_is_a_frozen_copy_and_soft_update(make_tiny_model, randomize):
    model = make_tiny_model(num_q=3)
    online = list(model.critic.parameters())
    target = list(model.critic_target.parameters())
    assert len(online) == len(target)
    for p, t in zip(online, target):
        torch.testing.assert_close(p, t)
        assert p.data_ptr() != t.data_ptr()
        assert p.requires_grad and not t.requires_grad
    model.train()
    assert not model.critic_target.training
    # not optimised with the model
    group_ids = {id(p) for g in model.model_parameter_groups(3e-4, 0.3) for p in g["params"]}
    assert not group_ids & {id(t) for t in target}
    assert {id(p) for p in online} <= group_ids
    # changing the online critic leaves the target untouched
    before = [t.clone() for t in target]
    randomize(model.critic, 0.5)
    for t, b in zip(target, before):
        torch.testing.assert_close(t, b)
    # soft update θ̄ ← θ̄ + τ(θ − θ̄)
    model.soft_update_targets(0.1)
    for p, t, b in zip(online, target, before):
        torch.testing.assert_close(t, b + 0.1 * (p.detach() - b))
    online_copy = [p.detach().clone() for p in online]
    model.soft_update_targets(0.01)
    for p, c in zip(online, online_copy):
        torch.testing.assert_close(p.detach(), c)  # the online critic does not move


def test_kl_critic_has_its_own_target(make_tiny_model):
    model = make_tiny_model(kl_value=True)
    assert model.kl_critic is not None and model.kl_critic_target is not None
    assert not any(p.requires_grad for p in model.kl_critic_target.parameters())
    with torch.no_grad():
        for p in model.kl_critic.parameters():
            p.add_(1.0)
    model.soft_update_targets(0.5)
    for p, t in zip(model.kl_critic.parameters(), model.kl_critic_target.parameters()):
        torch.testing.assert_close(t, p.detach() - 0.5)


# ---------------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("squash,lo,hi", [("tanh", -10.0, 2.0), ("clamp", -3.0, 1.0)])
def test_policy_head_semantics(make_tiny_model, randomize, squash, lo, hi):
    model = make_tiny_model(policy_squash=squash, log_std_min=lo, log_std_max=hi)
    randomize(model.pi, 1.0)  # large raw outputs reach both ends of the log σ range
    z = torch.randn(400, 16) * 3  # spread-out inputs (not SimNorm latents) so that s_raw covers a wide range
    eps = torch.randn(400, 3) * 2
    out = model.pi(z, eps=eps)
    mu_raw, s_raw = model.pi.net(z).chunk(2, dim=-1)
    log_std = lo + 0.5 * (hi - lo) * (torch.tanh(s_raw) + 1)
    torch.testing.assert_close(out.log_std, log_std)
    assert out.log_std.min() >= lo and out.log_std.max() <= hi
    assert out.log_std.min() < lo + 0.5 and out.log_std.max() > hi - 0.5  # the range is actually used
    torch.testing.assert_close(out.std, log_std.exp())
    torch.testing.assert_close(out.mean, torch.tanh(mu_raw))
    lp_g = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
    if squash == "tanh":
        action = torch.tanh(mu_raw + log_std.exp() * eps)
        lp = lp_g - torch.log(torch.relu(1 - action**2) + 1e-6).sum(-1, keepdim=True)
    else:
        action = torch.clamp(torch.tanh(mu_raw) + log_std.exp() * eps, -1, 1)
        lp = lp_g
        assert (action.abs() == 1).any()  # clamping, not squashing
    torch.testing.assert_close(out.action, action)
    torch.testing.assert_close(out.log_prob, lp, rtol=1e-5, atol=1e-4)
    ok = lp.abs() > 1e-2
    torch.testing.assert_close(out.scaled_entropy[ok], (-3 * lp_g)[ok], rtol=1e-3, atol=1e-3)
    assert out.action.abs().max() <= 1
    # exploration bounds override (BMPC reanalyze)
    mean, std, log_std_e, _ = model.pi.gaussian(z, (-2.0, 1.0))
    assert log_std_e.min() >= -2.0 and log_std_e.max() <= 1.0
    torch.testing.assert_close(mean, torch.tanh(mu_raw))
    # without eps: a reparameterised sample (gradient reaches the head)
    model.pi.zero_grad()
    model.pi(z.detach()).action.sum().backward()
    assert model.pi.net[0].weight.grad.abs().sum() > 0


def test_learned_prior_head_has_the_policy_architecture(make_tiny_model):
    model = make_tiny_model(learned_prior=True, policy_squash="clamp", log_std_min=-3, log_std_max=1)
    assert model.prior is not None
    assert sum(p.numel() for p in model.prior.parameters()) == sum(p.numel() for p in model.pi.parameters())
    assert (model.prior.log_std_min, model.prior.log_std_max, model.prior.squash) == (-3.0, 1.0, "clamp")
    assert make_tiny_model().prior is None


# ------------------------------------------------------------------------------------ first step of a plan
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_step_from_shared_latents_equals_the_repeated_latent_step(make_tiny_model, randomize, autocast_dtype):
    """``step_from_shared(z, a)`` (the latent part of the first layers once per latent) gives the reward logits and
    next latents of ``reward_logits``/``next`` on each latent repeated N times, row i·N + j = (z_i, a_ij)."""
    model = randomize(make_tiny_model(), 0.3).eval()
    n, N = 3, 7
    z = model.encode(torch.randn(n, 5))
    a = torch.rand(n, N, 3) * 2 - 1
    z_rep = z.unsqueeze(1).expand(n, N, -1).reshape(n * N, -1)
    a_flat = a.reshape(n * N, 3)
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        r_shared, z_shared = model.step_from_shared(z, a)
        r_rep, z_next = model.reward_logits(z_rep, a_flat), model.next(z_rep, a_flat)
    tol = dict(rtol=0, atol=1e-5) if autocast_dtype is None else dict(rtol=0, atol=5e-2)
    torch.testing.assert_close(r_shared.float(), r_rep.float(), **tol)
    torch.testing.assert_close(z_shared.float(), z_next.float(), **tol)
    assert r_shared.shape == (n * N, r_rep.shape[-1]) and z_shared.shape == (n * N, z.shape[-1])
    # not vacuous: the rows differ from each other (random weights), so a wrong row order would not match
    assert (z_next[1:] - z_next[:-1]).abs().amax(dim=1).min() > 1e-4


# ---------------------------------------------------------------------------------------------------- SimNorm layout
def _latent_permutation(L: int, V: int) -> torch.Tensor:
    """``perm[s]`` = the contiguous-layout index of strided latent unit s: strided group g holds entries
    g, g + L/V, …; contiguous group g holds V·g, …, V·g + V − 1."""
    s = torch.arange(L)
    return V * (s % (L // V)) + s // (L // V)


def _relabel_latent(contiguous: WorldModel, strided: WorldModel, L: int, V: int) -> None:
    """Copy the contiguous model into the strided one with its latent units relabelled: the rows of the two layers
    that produce z (encoder and dynamics outputs, with their LayerNorm) and the latent columns of every layer that
    reads z (dynamics, reward, termination, policies, critics)."""
    perm = _latent_permutation(L, V)
    produce = {"encoder.1", "dynamics.2"}  # last NormedLinear of each: Linear(·, L) → LN(L) → SimNorm
    read_first = {"dynamics.0", "reward.0", "termination.0", "pi.net.0", "prior.net.0"}
    with torch.no_grad():
        for name, p in contiguous.named_parameters():
            q = p.clone()
            module = name.rsplit(".", 1)[0].removesuffix(".ln")
            if module in produce:
                q = q[perm]
            elif module in read_first and name.endswith(".weight") and ".ln" not in name:
                q[:, :L] = p[:, perm]
            elif name.startswith(("critic.weights.0", "critic_target.weights.0", "kl_critic.weights.0",
                                  "kl_critic_target.weights.0")):
                q[:, :L] = p[:, perm]
            strided.get_parameter(name).copy_(q)


@pytest.mark.parametrize("critic", ["q", "v"])
def test_strided_simnorm_is_the_contiguous_model_with_latent_units_relabelled(make_tiny_model, randomize, critic):
    L, V = 32, 8
    kw = dict(latent_dim=L, simnorm_dim=V, critic=critic, episodic=True, learned_prior=True, dropout=0.0)
    torch.manual_seed(0)
    contiguous = randomize(make_tiny_model(simnorm_layout="contiguous", **kw))
    strided = make_tiny_model(simnorm_layout="strided", **kw)
    _relabel_latent(contiguous, strided, L, V)
    perm = _latent_permutation(L, V)
    obs, a = torch.randn(16, 5), torch.rand(16, 3) * 2 - 1
    z_c, z_s = contiguous.encode(obs), strided.encode(obs)
    torch.testing.assert_close(z_s, z_c[:, perm])
    # groups: contiguous sums to one over consecutive entries, strided over entries L/V apart
    torch.testing.assert_close(z_c.reshape(16, L // V, V).sum(-1), torch.ones(16, L // V))
    torch.testing.assert_close(z_s.reshape(16, V, L // V).sum(1), torch.ones(16, L // V))
    torch.testing.assert_close(strided.next(z_s, a), contiguous.next(z_c, a)[:, perm])
    torch.testing.assert_close(strided.reward_logits(z_s, a), contiguous.reward_logits(z_c, a))
    torch.testing.assert_close(strided.termination_logits(z_s), contiguous.termination_logits(z_c))
    for target in (False, True):
        torch.testing.assert_close(strided.critic_logits(z_s, a, target=target),
                                   contiguous.critic_logits(z_c, a, target=target))
    for head in ("pi", "prior"):
        for x, y in zip(getattr(strided, head).gaussian(z_s), getattr(contiguous, head).gaussian(z_c)):
            torch.testing.assert_close(x, y)
    # and the two layouts differ as maps of the same weights (the option is not a no-op)
    strided.load_state_dict(contiguous.state_dict())
    assert not torch.allclose(strided.encode(obs), contiguous.encode(obs))


def test_simnorm_layout_is_validated(make_tiny_model):
    with pytest.raises(ValueError, match="layout must be one of"):
        make_tiny_model(simnorm_layout="blocked")


def test_new_models_are_strided_and_policies_without_the_key_contiguous(make_tiny_model):
    """``WorldModel`` builds strided SimNorm unless told otherwise; a policy rebuilt from model kwargs saved before
    ``simnorm_layout`` existed (no such key) builds contiguous groups, and records the layout it built."""
    model = make_tiny_model()
    assert model.encoder[-1].act.layout == model.dynamics[-1].act.layout == "strided"
    obs_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    kwargs = dict(latent_dim=16, enc_dim=16, mlp_dim=16, num_q=2)
    legacy = POMPCPolicy(obs_space, act_space, lambda _: 1e-3, model_kwargs=kwargs)
    assert legacy.model.encoder[-1].act.layout == legacy.model.dynamics[-1].act.layout == "contiguous"
    assert legacy.model_kwargs["simnorm_layout"] == "contiguous" and "simnorm_layout" not in kwargs
    new = POMPCPolicy(obs_space, act_space, lambda _: 1e-3, model_kwargs={**kwargs, "simnorm_layout": "strided"})
    assert new.model.encoder[-1].act.layout == new.model.dynamics[-1].act.layout == "strided"
