"""TD-MPC2 world model: encoder, latent dynamics, reward, termination, critic ensemble, policy heads.

Architecture exactly as the spec (§1): ``NormedLinear = Linear → Dropout → LayerNorm → Mish``, SimNorm latents,
two-hot heads with 101 bins, trunc-normal(0.02) init with zeroed last layers of reward and critic. The critic ensemble
is ONE module with stacked weights (one batched matmul per layer for all heads); speed tricks: :mod:`sb3_pompc.speedups`.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from sb3_pompc.math import Mish, SimNorm, TwoHot, gaussian_log_prob, scaled_entropy
from sb3_pompc.speedups import hashed_dropout, linear_of_shared_latent, mish

__all__ = ["MODEL_SIZES", "model_size_config", "NormedLinear", "mlp", "EnsembleMLP", "PolicyHead", "PolicyOutput",
           "WorldModel"]

# model_size -> architecture (spec §1.5). num_q is set by the preset only for sizes 1 and 317.
MODEL_SIZES: dict[int, dict[str, int]] = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}


def model_size_config(model_size: int) -> dict[str, int]:
    """Architecture of a model-size preset (1, 5, 19, 48 or 317 million parameters)."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {sorted(MODEL_SIZES)}, got {model_size!r}")
    return dict(MODEL_SIZES[model_size])


class NormedLinear(nn.Linear):
    """``Linear(in, out) → Dropout(p) (only if p > 0) → LayerNorm(out) → act`` (default act Mish).

    :param in_features: input size
    :param out_features: output size
    :param dropout: dropout probability after the linear layer
    :param act: activation module (Mish by default)
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, act: Optional[nn.Module] = None):
        super().__init__(in_features, out_features)
        self.ln = nn.LayerNorm(out_features)
        self.act = Mish() if act is None else act
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(super().forward(x))

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the linear map: dropout, LayerNorm, activation."""
        if self.dropout is not None:
            x = self.dropout(x)
        return self.act(self.ln(x.float()))  # LayerNorm (and what follows) in fp32 under autocast, a no-op otherwise


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, act: Optional[nn.Module] = None, dropout: float = 0.0):
    """``NormedLinear(in, h1, dropout) → NormedLinear(h1, h2) → … → last``; the last layer is a plain Linear when
    ``act`` is None, else ``NormedLinear(h_last, out, act=act)``. Dropout only in the first layer."""
    dims = [in_dim, *hidden]
    layers: list[nn.Module] = [
        NormedLinear(dims[i], dims[i + 1], dropout=dropout if i == 0 else 0.0) for i in range(len(dims) - 1)
    ]
    layers.append(nn.Linear(dims[-1], out_dim) if act is None else NormedLinear(dims[-1], out_dim, act=act))
    return nn.Sequential(*layers)


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class EnsembleMLP(nn.Module):
    """``num`` independent MLP heads with stacked weights (one batched matmul per layer for all heads).

    Each head is ``NormedLinear(in, h1, dropout) → NormedLinear(h1, h2) → Linear(h2, out)``. Selecting heads
    (e.g. 2 random of 5) indexes the stacked weights, so only the selected heads are computed.

    :param num: number of heads
    :param in_dim: input size
    :param hidden: hidden sizes
    :param out_dim: output size (K logits)
    :param dropout: dropout after the first linear layer (each head draws its own mask)
    :param init: "trunc_normal" (TD-MPC2 HEAD) or "default" (PyTorch Linear init, BMPC's effective init)
    """

    def __init__(
        self, num: int, in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0, init: str = "trunc_normal"
    ) -> None:
        super().__init__()
        if init not in ("trunc_normal", "default"):
            raise ValueError(f"critic init must be 'trunc_normal' or 'default', got {init!r}")
        self.num = num
        self.dropout = dropout
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ln_weights = nn.ParameterList()
        self.ln_biases = nn.ParameterList()
        for i in range(len(dims) - 1):
            w = torch.empty(num, dims[i], dims[i + 1])
            b = torch.zeros(num, 1, dims[i + 1])
            for h in range(num):
                if init == "trunc_normal":
                    nn.init.trunc_normal_(w[h], std=0.02)
                else:  # nn.Linear default: U(±1/sqrt(fan_in)) for weight and bias
                    bound = 1.0 / dims[i] ** 0.5
                    nn.init.uniform_(w[h], -bound, bound)
                    nn.init.uniform_(b[h], -bound, bound)
            if i == len(dims) - 2:
                w.zero_()  # zero-init of the last layer's weight
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
            if i < len(dims) - 2:
                self.ln_weights.append(nn.Parameter(torch.ones(num, 1, dims[i + 1])))
                self.ln_biases.append(nn.Parameter(torch.zeros(num, 1, dims[i + 1])))

    def forward(
        self,
        x: torch.Tensor,
        heads: Optional[torch.Tensor] = None,
        detach: bool = False,
        x_tail: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:param x: (N, in) input shared by all heads
        :param heads: indices of the heads to evaluate (None = all)
        :param detach: use detached parameters (gradient flows only into ``x``)
        :param x_tail: (N, in − x.shape[-1]): the input is ``cat[x, x_tail]``, but the first layer computes
            ``x @ W[:k] + x_tail @ W[k:]``, so autograd forms the input gradient only of the part that needs one
            (the policy step: π's action carries the gradient, not the detached latent)
        :return: (num_heads, N, out)"""
        n_layers = len(self.weights)
        h = x
        for i in range(n_layers):
            w, b = self.weights[i], self.biases[i]
            if heads is not None:
                w, b = w[heads], b[heads]
            if detach:
                w, b = w.detach(), b.detach()
            if i == 0:
                # input shared by all heads: ONE GEMM (N, in) @ (in, E*out)
                e, d_in, d_out = w.shape
                w = w.permute(1, 0, 2).reshape(d_in, e * d_out)
                if x_tail is None:
                    h = h @ w
                else:
                    k = h.shape[-1]
                    h = torch.addmm(h @ w[:k], x_tail, w[k:])
                h = h.reshape(-1, e, d_out).transpose(0, 1) + b
            else:
                h = torch.baddbmm(b, h, w)
            if i < n_layers - 1:
                if self.dropout > 0 and i == 0 and self.training:
                    # off CUDA: the same dropout with a hashed mask (see sb3_pompc.speedups)
                    cuda = h.device.type == "cuda"
                    h = F.dropout(h, self.dropout, training=True) if cuda else hashed_dropout(h, self.dropout)
                g, beta = self.ln_weights[i], self.ln_biases[i]
                if heads is not None:
                    g, beta = g[heads], beta[heads]
                if detach:
                    g, beta = g.detach(), beta.detach()
                h = mish(torch.addcmul(beta, F.layer_norm(h.float(), h.shape[-1:]), g))  # fp32 under autocast
        return h


class PolicyOutput(NamedTuple):
    """A reparameterised sample of a Gaussian policy head and its statistics (all (..., A) or (..., 1))."""

    action: torch.Tensor
    mean: torch.Tensor  # tanh(mu_raw): the Gaussian on the action box used in every KL
    std: torch.Tensor
    log_std: torch.Tensor
    log_prob: torch.Tensor
    scaled_entropy: torch.Tensor


class PolicyHead(nn.Module):
    """Gaussian policy ``π(z) = mlp(L, [mlp, mlp], 2A)`` split into ``(μ_raw, s_raw)``, with
    ``log σ = lo + ½ (hi − lo)(tanh(s_raw) + 1)``. ``squash="tanh"`` (TD-MPC2): ``a = tanh(μ_raw + σε)``, log-prob
    with the tanh Jacobian. ``squash="clamp"`` (BMPC): ``a = clamp(tanh(μ_raw) + σε, −1, 1)``, no Jacobian. In every
    KL the head is represented by ``N(tanh(μ_raw), σ²)``.

    :param latent_dim: latent size L
    :param mlp_dim: hidden size
    :param action_dim: action size A
    :param log_std_min: lower log σ bound
    :param log_std_max: upper log σ bound
    :param squash: "tanh" or "clamp"
    """

    def __init__(
        self, latent_dim: int, mlp_dim: int, action_dim: int, log_std_min: float, log_std_max: float, squash: str
    ) -> None:
        super().__init__()
        if squash not in ("tanh", "clamp"):
            raise ValueError(f"policy squash must be 'tanh' or 'clamp', got {squash!r}")
        self.net = mlp(latent_dim, [mlp_dim, mlp_dim], 2 * action_dim)
        self.action_dim = action_dim
        self.log_std_min = float(log_std_min)
        self.log_std_max = float(log_std_max)
        self.squash = squash

    def gaussian(self, z: torch.Tensor, log_std_bounds: Optional[tuple[float, float]] = None):
        """:return: (mean = tanh(μ_raw), std, log_std, μ_raw)"""
        mu_raw, s_raw = self.net(z).float().chunk(2, dim=-1)  # Gaussian math in fp32 under autocast
        lo, hi = log_std_bounds if log_std_bounds is not None else (self.log_std_min, self.log_std_max)
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(s_raw) + 1.0)
        return torch.tanh(mu_raw), log_std.exp(), log_std, mu_raw

    def forward(
        self,
        z: torch.Tensor,
        eps: Optional[torch.Tensor] = None,
        log_std_bounds: Optional[tuple[float, float]] = None,
        need_log_prob: bool = True,
    ) -> PolicyOutput:
        """Reparameterised sample (``eps`` ~ N(0, I) may be given); ``need_log_prob=False``: log_prob/entropy None."""
        mean, std, log_std, mu_raw = self.gaussian(z, log_std_bounds)
        if eps is None:
            eps = torch.randn_like(mean)
        action = torch.tanh(mu_raw + std * eps) if self.squash == "tanh" else torch.clamp(mean + std * eps, -1.0, 1.0)
        if not need_log_prob:
            return PolicyOutput(action, mean, std, log_std, None, None)  # type: ignore[arg-type]
        lp = lp_g = gaussian_log_prob(eps, log_std)
        if self.squash == "tanh":
            lp = lp_g - torch.log(F.relu(1.0 - action.square()) + 1e-6).sum(-1, keepdim=True)
        return PolicyOutput(action, mean, std, log_std, lp, scaled_entropy(lp, lp_g, self.action_dim))


class WorldModel(nn.Module):
    """TD-MPC2 world model with PO-MPC's extra heads.

    :param obs_dim: flat observation size
    :param action_dim: action size A
    :param latent_dim: latent size L (multiple of ``simnorm_dim``)
    :param enc_dim: encoder hidden size
    :param mlp_dim: hidden size of dynamics, reward, critic and policy heads
    :param num_enc_layers: encoder layers (hidden layers = max(num_enc_layers − 1, 1))
    :param num_q: critic ensemble size
    :param critic: "q" (Q(z, a), TD-MPC2) or "v" (V(z), BMPC)
    :param simnorm_dim: SimNorm group size
    :param simnorm_layout: which entries form a SimNorm group: "strided" (entries L/V apart) or "contiguous"
        (the spec's wording; the same model with its latent units relabelled), see :class:`~sb3_pompc.math.SimNorm`
    :param num_bins: two-hot bins K
    :param vmin: lowest bin (symlog space)
    :param vmax: highest bin (symlog space)
    :param dropout: critic dropout (first layer)
    :param episodic: build a termination head
    :param policy_squash: "tanh" or "clamp"
    :param log_std_min: policy log σ lower bound
    :param log_std_max: policy log σ upper bound
    :param learned_prior: build the prior policy head π_p (same architecture as π_s)
    :param kl_value: build the KL-regularised critic Q̃ and its target
    :param critic_init: "trunc_normal" or "default" (see :class:`EnsembleMLP`)
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        latent_dim: int = 512,
        enc_dim: int = 256,
        mlp_dim: int = 512,
        num_enc_layers: int = 2,
        num_q: int = 5,
        critic: str = "q",
        simnorm_dim: int = 8,
        simnorm_layout: str = "strided",
        num_bins: int = 101,
        vmin: float = -10.0,
        vmax: float = 10.0,
        dropout: float = 0.01,
        episodic: bool = False,
        policy_squash: str = "tanh",
        log_std_min: float = -10.0,
        log_std_max: float = 2.0,
        learned_prior: bool = False,
        kl_value: bool = False,
        critic_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if critic not in ("q", "v"):
            raise ValueError(f"critic must be 'q' or 'v', got {critic!r}")
        if num_q < 2:
            raise ValueError(f"num_q must be >= 2 (two random heads are drawn), got {num_q}")
        if latent_dim % simnorm_dim != 0:
            raise ValueError(f"latent_dim {latent_dim} must be a multiple of simnorm_dim {simnorm_dim}")
        self.obs_dim, self.action_dim, self.latent_dim = obs_dim, action_dim, latent_dim
        self.num_q, self.critic_type, self.episodic = num_q, critic, episodic
        L, A, M = latent_dim, action_dim, mlp_dim
        enc_hidden = max(num_enc_layers - 1, 1) * [enc_dim]
        self.encoder = mlp(obs_dim, enc_hidden, L, act=SimNorm(simnorm_dim, simnorm_layout))
        self.dynamics = mlp(L + A, [M, M], L, act=SimNorm(simnorm_dim, simnorm_layout))
        self.reward = mlp(L + A, [M, M], num_bins)
        self.mlp_dim = M
        self.termination = mlp(L, [M, M], 1) if episodic else None
        self.pi = PolicyHead(L, M, A, log_std_min, log_std_max, policy_squash)
        self.prior = PolicyHead(L, M, A, log_std_min, log_std_max, policy_squash) if learned_prior else None
        self.apply(_trunc_normal_init)
        nn.init.zeros_(self.reward[-1].weight)
        critic_in = L + A if critic == "q" else L
        self.critic = EnsembleMLP(num_q, critic_in, [M, M], num_bins, dropout, init=critic_init)
        self.critic_target = self._frozen_copy(self.critic)
        if kl_value:
            self.kl_critic = EnsembleMLP(num_q, L + A, [M, M], num_bins, dropout, init=critic_init)
            self.kl_critic_target = self._frozen_copy(self.kl_critic)
        else:
            self.kl_critic = self.kl_critic_target = None
        self.two_hot = TwoHot(num_bins, vmin, vmax)

    def add_termination_head(self) -> None:
        """Build the termination head (trunc-normal init) on the model's device."""
        device = next(self.parameters()).device
        self.termination = mlp(self.latent_dim, [self.mlp_dim, self.mlp_dim], 1).to(device)
        self.termination.apply(_trunc_normal_init)
        self.episodic = True

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        target = copy.deepcopy(module)
        target.requires_grad_(False)
        target.eval()
        return target

    def train(self, mode: bool = True) -> "WorldModel":
        super().train(mode)
        for target in (self.critic_target, self.kl_critic_target):
            if target is not None:
                target.eval()  # target critics never use dropout
        return self

    # ---- core model ------------------------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(obs)

    def next(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.dynamics(torch.cat([z, a], dim=-1))

    def reward_logits(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.reward(torch.cat([z, a], dim=-1))

    def step_from_shared(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward logits and next latents of N actions from each of n latents: ``reward_logits(z', a')`` and
        ``next(z', a')`` with ``z'`` = each latent repeated N times (a plan's first step), but the first layers'
        latent part is computed once per latent (:func:`~sb3_pompc.speedups.linear_of_shared_latent`).

        :param z: (n, L); :param a: (n, N, A); :return: reward logits (n·N, K), next latents (n·N, L)
        """
        cls = type(self)
        if cls.next is not WorldModel.next or cls.reward_logits is not WorldModel.reward_logits:
            # a subclass with its own dynamics or reward: use them on the repeated latents
            n, N = a.shape[:2]
            z_rep = z.unsqueeze(1).expand(n, N, -1).reshape(n * N, -1)
            a_flat = a.reshape(n * N, -1)
            return self.reward_logits(z_rep, a_flat), self.next(z_rep, a_flat)
        # both first layers are NormedLinear (mlp with hidden layers): linear map, then its activate()
        r, d = (net[1:](net[0].activate(linear_of_shared_latent(net[0], z, a))) for net in (self.reward, self.dynamics))
        return r, d

    def termination_logits(self, z: torch.Tensor) -> torch.Tensor:
        assert self.termination is not None
        return self.termination(z)

    def random_heads(self, device: torch.device) -> torch.Tensor:
        """2 distinct random critic heads (one randperm per call, shared over the batch)."""
        return torch.randperm(self.num_q, device=device)[:2]

    # ---- critics ---------------------------------------------------------------------------------------------
    def critic_logits(
        self,
        z: torch.Tensor,
        a: Optional[torch.Tensor] = None,
        heads: Optional[torch.Tensor] = None,
        target: bool = False,
        detach: bool = False,
        kl: bool = False,
    ) -> torch.Tensor:
        """Logits of the selected heads, (num_heads, N, K). Q critics take concat[z, a]; the V critic takes z.

        :param kl: use the KL-regularised critic Q̃ instead of the ordinary critic
        """
        if kl:
            net = self.kl_critic_target if target else self.kl_critic
        else:
            net = self.critic_target if target else self.critic
            if self.critic_type == "v":
                return net(z, heads=heads, detach=detach)
        if detach:  # gradient into the action only (policy step): z @ W_z + a @ W_a, no input gradient for z
            return net(z, heads=heads, detach=True, x_tail=a)
        return net(torch.cat([z, a], dim=-1), heads=heads, detach=detach)

    def critic_value(
        self,
        z: torch.Tensor,
        a: Optional[torch.Tensor] = None,
        reduce: str = "avg",
        target: bool = False,
        detach: bool = False,
        kl: bool = False,
        heads: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Scalar value from 2 random heads reduced by "min" or "avg" (spec §1.2), shape (N, 1). With exactly 2
        heads both are used without drawing (min and avg do not depend on their order)."""
        if heads is None and self.num_q > 2:
            heads = self.random_heads(z.device)
        values = self.two_hot.decode(self.critic_logits(z, a, heads, target, detach, kl))
        return values.min(0).values if reduce == "min" else values.mean(0)

    def soft_update_targets(self, tau: Union[float, torch.Tensor]) -> None:
        """``θ̄ ← θ̄ + τ (θ − θ̄)`` on the critic ensembles; ``tau`` may be a 0-dim tensor on the device (no sync)."""
        pairs = [(self.critic_target, self.critic), (self.kl_critic_target, self.kl_critic)]
        with torch.no_grad():
            for targets, onlines in ((list(t.parameters()), list(o.parameters())) for t, o in pairs if o is not None):
                if isinstance(tau, torch.Tensor):  # lerp takes a Python weight only: θ̄ += τ·(θ − θ̄) in 3 kernels
                    torch._foreach_add_(targets, torch._foreach_mul(torch._foreach_sub(onlines, targets), tau))
                else:
                    torch._foreach_lerp_(targets, onlines, tau)

    # ---- parameter groups --------------------------------------------------------------------------------------
    def model_parameter_groups(self, lr: float, enc_lr_scale: float) -> list[dict[str, Any]]:
        """Optimiser groups of the world-model step: encoder at ``lr·enc_lr_scale``; dynamics, reward, critic
        (and termination) at ``lr``."""
        rest = [*self.dynamics.parameters(), *self.reward.parameters(), *self.critic.parameters()]
        groups = [
            {"params": list(self.encoder.parameters()), "lr": lr * enc_lr_scale, "lr_scale": enc_lr_scale},
            {"params": rest, "lr": lr, "lr_scale": 1.0},
        ]
        if self.termination is not None:  # its own group, so a head added later (episodic="auto") saves alike
            groups.append({"params": list(self.termination.parameters()), "lr": lr, "lr_scale": 1.0})
        return groups

    def component_parameter_counts(self) -> dict[str, int]:
        """Learnable parameters per component, as the spec's table (§1.6)."""

        parts = dict(encoder=self.encoder, dynamics=self.dynamics, reward=self.reward, termination=self.termination,
                     pi=self.pi, critic=self.critic)
        counts = {name: 0 if m is None else sum(p.numel() for p in m.parameters() if p.requires_grad)
                  for name, m in parts.items()}
        counts["total"] = sum(counts.values())
        return counts
