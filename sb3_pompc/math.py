"""Math utilities of TD-MPC2 / BMPC / PO-MPC (torch only).

Every function states the formula it implements. Nothing here knows about networks, buffers or SB3.
"""

from __future__ import annotations

import math as _math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "symlog",
    "symexp",
    "TwoHot",
    "soft_ce",
    "SimNorm",
    "hashed_dropout",
    "mish",
    "Mish",
    "gaussian_kl",
    "squashed_gaussian_kl",
    "RunningScale",
    "percentile",
    "discount_heuristic",
    "gaussian_log_prob",
    "scaled_entropy",
]

LOG_SQRT_2PI = 0.5 * _math.log(2 * _math.pi)


def symlog(x: torch.Tensor) -> torch.Tensor:
    """``symlog(x) = sign(x) · ln(1 + |x|)``."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """``symexp(x) = sign(x) · (exp(|x|) − 1)``, the inverse of :func:`symlog`."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


class TwoHot(nn.Module):
    """Discrete regression in symlog space (TD-MPC2 §2 of the spec).

    ``K`` bin centres ``linspace(vmin, vmax, K)`` in symlog space (default 101 bins on [−10, 10], width 0.2).

    :param num_bins: number of bins K
    :param vmin: lowest bin centre (symlog space)
    :param vmax: highest bin centre (symlog space)
    """

    def __init__(self, num_bins: int = 101, vmin: float = -10.0, vmax: float = 10.0) -> None:
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_bins = num_bins
        self.vmin = float(vmin)
        self.vmax = float(vmax)
        self.bin_size = (self.vmax - self.vmin) / (num_bins - 1)
        self.register_buffer("centres", torch.linspace(vmin, vmax, num_bins), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """two_hot(x): ``y = clamp(symlog(x), vmin, vmax)``, ``idx = ⌊(y − vmin)/Δ⌋``, ``off = (y − vmin)/Δ − idx``;
        ``target[idx] = 1 − off``, ``target[(idx + 1) mod K] = off``.

        :param x: values of shape (..., 1) or (...)
        :return: targets of shape (..., K)
        """
        if x.shape[-1:] == (1,):
            x = x.squeeze(-1)
        x = torch.nan_to_num(x.float(), nan=0.0)
        y = symlog(x).clamp(self.vmin, self.vmax)
        pos = (y - self.vmin) / self.bin_size
        idx = torch.floor(pos).clamp(0, self.num_bins - 1)
        off = (pos - idx).unsqueeze(-1)
        idx = idx.long().unsqueeze(-1)
        target = torch.zeros(*x.shape, self.num_bins, device=x.device, dtype=torch.float32)
        target.scatter_(-1, idx, 1.0 - off)
        target.scatter_add_(-1, (idx + 1) % self.num_bins, off)
        return target

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """two_hot_inv(logits) = ``symexp(Σ_k softmax(logits)_k · centre_k)`` (expectation in symlog space, fp32).

        :param logits: (..., K)
        :return: scalars of shape (..., 1)
        """
        probs = F.softmax(logits.float(), dim=-1)
        return symexp((probs * self.centres).sum(-1, keepdim=True))

    def soft_ce(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """See :func:`soft_ce`."""
        return soft_ce(logits, self.encode(x))


def soft_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy ``−Σ_k p_k · log_softmax(logits)_k`` per sample, shape (..., 1)."""
    return -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(-1, keepdim=True)


def mish(x: torch.Tensor) -> torch.Tensor:
    """``Mish(x) = x · tanh(softplus(x)) = x · tanh(ln(1 + eˣ))``.

    Eager PyTorch runs its native ``F.mish`` kernel. Under ``torch.compile`` the algebraically identical form
    ``x · n / (n + 2)`` with ``n = eᵘ(eᵘ + 2)`` and ``u = min(x, 20)`` is traced instead (``tanh(ln(1+e)) = ((1+e)² −
    1)/((1+e)² + 1)``): one ``exp`` instead of ``exp``, ``log1p`` and ``tanh``, which the compiler fuses with the
    LayerNorm before it (~3× faster on CPU; for x > 20, n/(n+2) = 1 in float32, so the clamp changes nothing).
    """
    if torch.compiler.is_compiling():
        e = torch.exp(x.clamp(max=20.0))
        n = e * (e + 2.0)
        return x * (n / (n + 2.0))
    return F.mish(x)


class Mish(nn.Module):
    """Module form of :func:`mish`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class SimNorm(nn.Module):
    """Simplicial normalisation: partition the last dim (size L) into L/V groups of ``dim`` = V entries and take a
    softmax within each group.

    Two partitions of the same map, equal up to a fixed permutation of the L coordinates:

    - ``"contiguous"`` (the spec's wording, TD-MPC2's code): group g = entries ``[V·g, V·g + V)``;
    - ``"strided"``: group g = entries ``{g, g + L/V, g + 2·L/V, …}``, i.e. the softmax runs over dim −2 of the
      ``(…, V, L/V)`` view. Inside a network (dense layers in and out, i.i.d. init) it is the same model with its
      latent units relabelled; it is what :class:`~sb3_pompc.world_model.WorldModel` uses in new agents because
      a softmax over 8 contiguous entries cannot be vectorised (~3× slower compiled, ~2.4× eager on a CPU).

    :param dim: group size V (8 in TD-MPC2)
    :param layout: "contiguous" or "strided"
    """

    LAYOUTS = ("contiguous", "strided")

    def __init__(self, dim: int = 8, layout: str = "contiguous") -> None:
        super().__init__()
        if layout not in self.LAYOUTS:
            raise ValueError(f"SimNorm layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.dim = dim
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shp = x.shape
        if shp[-1] % self.dim != 0:
            raise ValueError(f"SimNorm: last dim {shp[-1]} is not a multiple of the group size {self.dim}")
        if self.layout == "strided":
            return F.softmax(x.reshape(-1, self.dim, shp[-1] // self.dim).float(), dim=1).to(x.dtype).reshape(shp)
        # softmax over a strided view: a softmax over a contiguous last dim of 8 is ~8x slower on CPU
        x = x.reshape(-1, shp[-1] // self.dim, self.dim).transpose(1, 2)
        return F.softmax(x.float(), dim=1).to(x.dtype).transpose(1, 2).reshape(shp)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layout={self.layout!r}"


# 32-bit constants as signed int32 (torch has no uint32 arithmetic); products wrap modulo 2^32
_GOLDEN = -1640531527  # 0x9E3779B9
_LOWBIAS_1, _LOWBIAS_2 = 0x21F0AAAD, -749064809  # 0x21F0AAAD, 0xD35A2D97


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    """32-bit integer mixing function ("lowbias32"): ``h ^= h >> 16; h *= 0x21F0AAAD; h ^= h >> 15;
    h *= 0xD35A2D97; h ^= h >> 15`` with logical shifts, on int32 (a bijection of the 2^32 values)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _LOWBIAS_1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _LOWBIAS_2
    return h ^ ((h >> 15) & 0x1FFFF)


def hashed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout ``x ⊙ m / (1 − p)`` with ``m_i = [u_i ≥ p]``, ``u_i = ⌊h_i / 2^8⌋ / 2^24`` and
    ``h_i = lowbias32((i · 0x9E3779B9) ⊕ s)``: the mask of element i (flat index) is a hash of i and of a seed s
    drawn from torch's generator at every call. ``u`` has the 24-bit resolution of ``torch.rand`` in float32, so
    ``P(m_i = 0) = ⌈p · 2^24⌉ / 2^24`` (p rounded up to a multiple of 2^-24 ≈ 6e-8).

    Same distribution as ``F.dropout(x, p, training=True)``, different draws. On a CPU, ATen's dropout draws each
    element from one single-threaded mt19937 stream (3–8 ns per element on AMD CPUs, where ATen does not use MKL's
    generator); this mask is element-wise integer work, ~2× faster eager and fused into the neighbouring kernels
    under ``torch.compile``, with identical masks eager and compiled.

    :param x: input (fewer than 2^31 elements)
    :param p: drop probability in [0, 1)
    """
    if x.numel() >= 2**31:
        raise ValueError(f"hashed_dropout: {x.numel()} elements, at most 2^31 - 1 are supported")
    seed = torch.randint(-(2**31), 2**31 - 1, (), dtype=torch.int32, device=x.device)
    i = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape)
    h = _lowbias32((i * _GOLDEN) ^ seed)
    keep = ((h >> 8) & 0xFFFFFF) >= _math.ceil(p * 2**24)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


def gaussian_kl(mu_p: torch.Tensor, std_p: torch.Tensor, mu_q: torch.Tensor, std_q: torch.Tensor) -> torch.Tensor:
    """Closed-form KL between diagonal Gaussians, **averaged over action dims** (BMPC's reduction):

    ``KL(N(μ_p, σ_p²) ‖ N(μ_q, σ_q²)) = mean_i [ log(σ_q/σ_p) + (σ_p² + (μ_p − μ_q)²) / (2σ_q²) − ½ ]``.

    The first distribution is the one the expectation is taken under. Computed in fp32.

    :return: tensor of shape (..., 1)
    """
    mu_p, std_p, mu_q, std_q = (t.float() for t in (mu_p, std_p, mu_q, std_q))
    var_q = std_q.square()
    kl = torch.log(std_q / std_p) + (std_p.square() + (mu_p - mu_q).square()) / (2.0 * var_q) - 0.5
    return kl.mean(-1, keepdim=True)


def squashed_gaussian_kl(
    mu_p: torch.Tensor, std_p: torch.Tensor, mu_q: torch.Tensor, std_q: torch.Tensor, direction: str = "reverse"
) -> torch.Tensor:
    """KL between a policy head and a reference in the chosen direction (both as Gaussians on the action box).

    ``direction="reverse"``: ``KL(p ‖ q)`` (mode seeking in p); ``"forward"``: ``KL(q ‖ p)`` (mode covering in p).
    """
    if direction == "reverse":
        return gaussian_kl(mu_p, std_p, mu_q, std_q)
    if direction == "forward":
        return gaussian_kl(mu_q, std_q, mu_p, std_p)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


def gaussian_log_prob(eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Pre-squash Gaussian log-prob of a reparameterised sample:
    ``lp_g = Σ_i (−½ ε_i² − log σ_i − ½ log 2π)``, shape (..., 1)."""
    return (-0.5 * eps.square() - log_std - LOG_SQRT_2PI).sum(-1, keepdim=True)


def scaled_entropy(lp: torch.Tensor, lp_g: torch.Tensor, action_dim: int) -> torch.Tensor:
    """TD-MPC2's entropy term, reproduced exactly: ``scaled_entropy = −lp · (A · lp_g) / (lp + 1e-8)``
    (≈ A × the pre-squash Gaussian entropy estimate ``−A·lp_g``)."""
    return -lp * (action_dim * lp_g) / (lp + 1e-8)


def percentile(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Percentiles over dim 0 with linear interpolation (numpy "linear"): position ``p·(n−1)/100``.

    :param x: (n, ...) values
    :param q: 1-D tensor of percentiles in [0, 100]
    :return: (len(q), ...)
    """
    x_sorted, _ = torch.sort(x.float(), dim=0)
    n = x_sorted.shape[0]
    pos = q.to(x_sorted.device, torch.float32) * (n - 1) / 100.0
    lo = torch.floor(pos).long()
    hi = torch.clamp(lo + 1, max=n - 1)
    w = (pos - lo.float()).reshape(-1, *([1] * (x_sorted.dim() - 1)))
    return x_sorted[lo] * (1.0 - w) + x_sorted[hi] * w


class RunningScale(nn.Module):
    """Running scale S (init 1): ``v = max(P95(x) − P5(x), 1)``, ``S ← S + τ (v − S)``; ``forward(x) = x / S``.

    Stored as a buffer so that it is saved with the policy's state dict. Updated without host synchronisation.

    :param tau: smoothing coefficient (0.01)
    """

    def __init__(self, tau: float = 0.01) -> None:
        super().__init__()
        self.tau = tau
        self.register_buffer("value", torch.ones(1))
        self.register_buffer("_pct", torch.tensor([5.0, 95.0]), persistent=False)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = torch.nan_to_num(x.detach().float().reshape(x.shape[0], -1), nan=0.0, posinf=1e30, neginf=-1e30)
        p = percentile(x, self._pct)
        v = torch.clamp((p[1] - p[0]).mean(), min=1.0, max=1e30)
        self.value.lerp_(v.reshape(1), self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.value

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


def discount_heuristic(episode_length: int, denom: float = 5.0, gmin: float = 0.95, gmax: float = 0.995) -> float:
    """TD-MPC2's discount: ``frac = T_ep / denom``; ``γ = clip((frac − 1)/frac, gmin, gmax)`` (0.99 for T_ep = 500)."""
    frac = episode_length / denom
    return float(min(max((frac - 1) / frac, gmin), gmax))
