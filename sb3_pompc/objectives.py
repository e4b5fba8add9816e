"""The equations of PO-MPC, one function each (TD-MPC2 §3.3 and BMPC §3.4 of the spec, DESIGN §1).

Shapes are time-major: T steps, B batch, A action dims. Values and losses of one sample are (…, 1).
No SB3 plumbing here: the algorithm (``pompc.py``) decides what to feed and when to step which optimiser.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from sb3_pompc.math import TwoHot, gaussian_kl
from sb3_pompc.world_model import PolicyOutput, WorldModel

__all__ = [
    "rho_weights",
    "time_weighted_mean",
    "masked_time_weighted_mean",
    "td_target",
    "model_based_v_target",
    "kl_value_target",
    "ensemble_soft_ce_loss",
    "critic_targets",
    "world_model_loss",
    "prior_loss",
    "prior_fit_loss",
    "kl_to_reference",
    "policy_terms",
    "kl_weight",
    "policy_loss",
    "kl_coef_loss",
]


def rho_weights(T: int, rho: float, device: torch.device) -> torch.Tensor:
    """``ρ^t`` for t = 0..T−1, shape (T, 1, 1)."""
    return torch.pow(torch.full((T,), rho, device=device), torch.arange(T, device=device)).reshape(T, 1, 1)


def time_weighted_mean(x: torch.Tensor, rho: float) -> torch.Tensor:
    """``(1/T) Σ_t ρ^t · mean_b x_t`` for x of shape (T, B, 1)."""
    T = x.shape[0]
    return (rho_weights(T, rho, x.device) * x).mean(dim=(1, 2)).sum() / T


def masked_time_weighted_mean(x: torch.Tensor, mask: Optional[torch.Tensor], rho: float) -> torch.Tensor:
    """``(1/T) Σ_t ρ^t · Σ_b m_tb x_tb / max(Σ_b m_tb, 1)``: :func:`time_weighted_mean` over the samples with
    ``m = 1`` only (a step whose samples are all masked adds 0). ``mask=None`` is :func:`time_weighted_mean`.

    :param x: (T, B, 1); :param mask: (T, B, 1) of 0/1, or None
    """
    if mask is None:
        return time_weighted_mean(x, rho)
    T = x.shape[0]
    per_step = (mask * x).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1.0)
    return (rho_weights(T, rho, x.device).reshape(T) * per_step).sum() / T


def td_target(reward: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor, gamma: float) -> torch.Tensor:
    """TD-MPC2 critic target ``y_t = r_t + γ (1 − term_t) · Q̄(z'_t, a'_t)`` (term ≡ 0 for DMC; time-limit
    truncations bootstrap)."""
    return reward + gamma * (1.0 - terminated) * next_value


@torch.no_grad()
def model_based_v_target(model: WorldModel, z: torch.Tensor, gamma: float) -> torch.Tensor:
    """BMPC's V target with td_horizon 1 from encoded real latents: ``a ~ π(z_t)``,
    ``y_t = two_hot_inv(R(z_t, a)) + γ · V̄_avg(d(z_t, a))`` (the environment reward is not used).

    :param z: (T, B, L) encoder latents of obs[0..H−1]
    :return: (T, B, 1)
    """
    T, B, L = z.shape
    zf = z.reshape(T * B, L)
    a = model.pi(zf).action
    r = model.two_hot.decode(model.reward_logits(zf, a))
    v = model.critic_value(model.next(zf, a), reduce="avg", target=True)
    return (r + gamma * v).reshape(T, B, 1)


@torch.no_grad()
def critic_targets(
    model: WorldModel, obs: torch.Tensor, rewards: torch.Tensor, terminated: torch.Tensor, gamma: float, reduce: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder latents of a window and the critic targets of its H steps (no gradient):

    Q critic (TD-MPC2): ``y_t = r_t + γ (1 − term_t) · Q̄_reduce(z_{t+1}, a')``, ``a' ~ π(z_{t+1})``, 2 random
    target heads (:func:`td_target`); V critic (BMPC): :func:`model_based_v_target` on z_0..z_{H−1}.

    :param obs: (H+1, B, obs_dim); :param rewards, terminated: (H, B, 1); :param reduce: "min" or "avg"
    :return: encoder latents (H+1, B, L) and targets (H, B, 1)
    """
    H, B = rewards.shape[:2]
    z_enc = model.encode(obs.reshape((H + 1) * B, -1)).reshape(H + 1, B, -1)
    if model.critic_type == "q":
        next_a = model.pi(z_enc[1:]).action
        next_q = model.critic_value(z_enc[1:].reshape(H * B, -1), next_a.reshape(H * B, -1), reduce=reduce,
                                    target=True).reshape(H, B, 1)
        return z_enc, td_target(rewards, terminated, next_q, gamma)
    return z_enc, model_based_v_target(model, z_enc[:-1], gamma)


def kl_value_target(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    next_q_tilde: torch.Tensor,
    next_kl: torch.Tensor,
    kl_coef: torch.Tensor,
    gamma: float,
    q_scale: torch.Tensor | float = 1.0,
    kl_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """KL-regularised critic target (DESIGN §1, ``kl_value=True``), in the unit of :func:`policy_loss`:

    ``y_t = r_t + γ (1 − term_t) · (Q̃_targ(z'_t, a'_t) − λ · (S_Q / S_KL) · KL(π_s(·|z'_t) ‖ π_ref(·|z'_t)))``,
    ``a' ~ π_s(z')``.

    Why this unit: for finite λ, :func:`policy_loss` is ``(1 − α)/S_Q · [−Q̃ + λ (S_Q/S_KL) KL] − β H`` with
    α = λ/(1+λ), so π_s minimises ``−Q̃ + τ·KL`` with temperature ``τ = λ·S_Q/S_KL`` (up to the entropy bonus): it
    is the soft-greedy policy of Q̃ at τ. The soft Bellman backup of that objective charges every future step the
    same ``τ·KL``, which is the target above; the current step and the future ones are weighed alike.

    :param next_kl: (T, B, 1) KL at the next latents (0 where it is masked out)
    :param kl_coef: λ (a tensor: fixed, learned, or 0 during the warm-up)
    :param q_scale, kl_scale: the running scales S_Q and S_KL of the π_s loss
    """
    return reward + gamma * (1.0 - terminated) * (next_q_tilde - kl_coef * (q_scale / kl_scale) * next_kl)


def ensemble_soft_ce_loss(logits: torch.Tensor, target: torch.Tensor, two_hot: TwoHot, rho: float) -> torch.Tensor:
    """``Σ_t Σ_q ρ^t · mean_b soft_ce(logits_{q,t}, y_t) / (T · num_q)``.

    :param logits: (num_q, T, B, K); :param target: (T, B, 1)
    """
    num_q, T = logits.shape[0], logits.shape[1]
    ce = two_hot.soft_ce(logits, target.unsqueeze(0).expand(num_q, *target.shape))  # (num_q, T, B, 1)
    w = rho_weights(T, rho, logits.device)
    return (w * ce).mean(dim=(2, 3)).sum() / (T * num_q)


def world_model_loss(
    model: WorldModel,
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    value_target: torch.Tensor,
    next_z_target: torch.Tensor,
    rho: float,
    consistency_coef: float = 20.0,
    reward_coef: float = 0.1,
    value_coef: float = 0.1,
    termination_coef: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """TD-MPC2 world-model loss on a latent rollout with buffer actions:

    ``ẑ_0 = enc(o_0)``, ``ẑ_{t+1} = d(ẑ_t, a_t)``;
    ``consistency = Σ_t ρ^t MSE(ẑ_{t+1}, sg(z'_t)) / H``; ``reward = Σ_t ρ^t CE(R(ẑ_t, a_t), r_t) / H``;
    ``value = Σ_t Σ_q ρ^t CE(Q_q(ẑ_t, a_t), y_t) / (H·num_q)`` (V critic: ``V_q(ẑ_t)``);
    ``termination = BCE(T(ẑ_{t+1}), term_t)`` averaged over t (episodic only);
    ``total = 20·consistency + 0.1·reward + 0.1·value (+ 1·termination)``.

    :param obs: (H+1, B, obs_dim); :param actions: (H, B, A); :param rewards, terminated: (H, B, 1)
    :param value_target: (H, B, 1) critic targets; :param next_z_target: (H, B, L) encoder latents of obs[1..H]
    :return: total loss, the parts (detached), and the latents ẑ_0..ẑ_H (H+1, B, L) with grad
    """
    H, B, _ = actions.shape
    z = model.encode(obs[0])
    zs = [z]
    consistency = obs.new_zeros(())
    for t in range(H):
        z = model.next(z, actions[t])
        consistency = consistency + rho**t * F.mse_loss(z, next_z_target[t])
        zs.append(z)
    zs_t = torch.stack(zs)  # (H+1, B, L)
    z_flat = zs_t[:-1].reshape(H * B, -1)
    a_flat = actions.reshape(H * B, -1)
    reward_logits = model.reward_logits(z_flat, a_flat).reshape(H, B, -1)
    w = rho_weights(H, rho, obs.device)
    reward_loss = (w * model.two_hot.soft_ce(reward_logits, rewards)).mean(dim=(1, 2)).sum() / H
    q_logits = model.critic_logits(z_flat, a_flat if model.critic_type == "q" else None)
    value_loss = ensemble_soft_ce_loss(q_logits.reshape(model.num_q, H, B, -1), value_target, model.two_hot, rho)
    consistency = consistency / H
    total = consistency_coef * consistency + reward_coef * reward_loss + value_coef * value_loss
    parts = {"consistency_loss": consistency, "reward_loss": reward_loss, "value_loss": value_loss}
    if model.termination is not None:
        term_logits = model.termination_logits(zs_t[1:].reshape(H * B, -1)).reshape(H, B, 1)
        term_loss = F.binary_cross_entropy_with_logits(term_logits, terminated)
        total = total + termination_coef * term_loss
        parts["termination_loss"] = term_loss
    parts = {k: v.detach() for k, v in parts.items()}
    return total, parts, zs_t


def prior_loss(
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
    plan_mean: torch.Tensor,
    plan_std: torch.Tensor,
    direction: str,
    rho: float,
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of the intermediate prior π_p fitted to the buffer's planner stats π^P:

    forward ``L_p = (1/T) Σ_t ρ^t mean_b KL(π^P_t ‖ π_p(·|z_t))`` (mode covering) or
    reverse ``L_p = (1/T) Σ_t ρ^t mean_b KL(π_p(·|z_t) ‖ π^P_t)`` (mode seeking);
    with ``mask`` the mean over b runs over the rows that hold a real plan (:func:`masked_time_weighted_mean`).

    :param mask: (T, B, 1) ``has_plan``, or None to fit every row (BMPC-style placeholders included)
    :return: (loss, per-sample KL of shape (T, B, 1))
    """
    if direction == "forward":
        kl = gaussian_kl(plan_mean, plan_std, prior_mean, prior_std)
    elif direction == "reverse":
        kl = gaussian_kl(prior_mean, prior_std, plan_mean, plan_std)
    else:
        raise ValueError(f"prior direction must be 'forward' or 'reverse', got {direction!r}")
    return masked_time_weighted_mean(kl, mask, rho), kl


def prior_fit_loss(
    model: WorldModel, z: torch.Tensor, plan_mean: torch.Tensor, plan_std: torch.Tensor, direction: str, rho: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`prior_loss` of the prior head π_p evaluated on latents ``z`` (T, B, L) against π^P (T, B, A)."""
    assert model.prior is not None
    prior_mean, prior_std, _, _ = model.prior.gaussian(z)
    return prior_loss(prior_mean, prior_std, plan_mean, plan_std, direction, rho, mask)[0]


def kl_to_reference(
    model: WorldModel, out: PolicyOutput, z: torch.Tensor, plan_mean: torch.Tensor, plan_std: torch.Tensor,
    reference: str,
) -> torch.Tensor:
    """``KL(π_s(·|z_t) ‖ π_ref)`` per latent: π_ref = the buffer's π^P (``reference="planner"``, on the first
    min(T, T_P) latents, where π^P exists) or the learned prior π_p(·|z_t) (no gradient into π_p).

    :param out: π_s on ``z`` (T, B, L); :param plan_mean, plan_std: (T_P, B, A) buffer π^P
    :return: (min(T, T_P), B, 1) or (T, B, 1)
    """
    if reference == "planner":
        T = min(z.shape[0], plan_mean.shape[0])
        return gaussian_kl(out.mean[:T], out.std[:T], plan_mean[:T], plan_std[:T])
    assert model.prior is not None
    with torch.no_grad():
        pm, ps, _, _ = model.prior.gaussian(z)
    return gaussian_kl(out.mean, out.std, pm, ps)


def policy_terms(
    model: WorldModel,
    z: torch.Tensor,
    plan_mean: torch.Tensor,
    plan_std: torch.Tensor,
    reference: str,
    need_q: bool,
) -> tuple[PolicyOutput, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The terms of :func:`policy_loss` on latents ``z`` (T, B, L), ``a_t ~ π_s(z_t)`` reparameterised:

    ``KL_t = KL(π_s(·|z_t) ‖ π_ref)`` with π_ref = the buffer's π^P (``reference="planner"``, first min(T, H)
    latents) or the learned prior π_p(·|z_t) (no gradient into π_p);
    ``Q̂_t = Q_avg(z_t, a_t)`` with 2 random heads and detached critic parameters (Q̃ if the model has it);
    ``KL^P_t = KL(π_s ‖ π^P)`` (no gradient), the diagnostic against the raw planner stats.

    :param plan_mean, plan_std: (H, B, A) buffer π^P
    :param need_q: compute Q̂ (every finite λ)
    :return: (π_s sample, KL (T', B, 1), Q̂ (T, B, 1) or None, KL^P (H, B, 1))
    """
    T, H = z.shape[0], plan_mean.shape[0]
    out = model.pi(z)
    kl = kl_to_reference(model, out, z, plan_mean, plan_std, reference)  # λ = 0 rolls H + 1 latents: KL on H
    q = None
    if need_q:
        L, A = z.shape[-1], out.action.shape[-1]
        q = model.critic_value(z.reshape(-1, L), out.action.reshape(-1, A), reduce="avg", detach=True,
                               kl=model.kl_critic is not None).reshape(T, -1, 1)
    with torch.no_grad():
        kl_planner = gaussian_kl(out.mean[:H], out.std[:H], plan_mean, plan_std)
    return out, kl, q, kl_planner


def kl_weight(kl_coef: torch.Tensor | float) -> torch.Tensor | float:
    """The convex weight ``α = λ / (1 + λ)`` of the KL term: 0 at λ = 0, 1/2 at λ = 1, 1 at λ = ∞ (computed in
    double precision for a float λ, so that ``1 − α`` stays exact for large λ)."""
    if isinstance(kl_coef, float):
        return 1.0 if math.isinf(kl_coef) else kl_coef / (1.0 + kl_coef)
    return kl_coef / (1.0 + kl_coef)


def policy_loss(
    q: Optional[torch.Tensor],
    kl: Optional[torch.Tensor],
    scaled_entropy: torch.Tensor,
    kl_coef: torch.Tensor | float,
    rho: float,
    entropy_coef: float = 1e-4,
    q_scale: torch.Tensor | float = 1.0,
    kl_scale: torch.Tensor | float = 1.0,
    kl_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PO-MPC sampling-policy loss with KL strength λ (DESIGN §1), both terms normalised by their running scales
    and mixed convexly with ``α = λ/(1+λ)``:

    ``L_π = (1/T) Σ_t ρ^t mean_b [ (1 − α)·(−Q̂(ẑ_t, a_t)/S_Q) + α·KL(π_s ‖ π_ref)_t / S_KL − β·H_t ]``.

    λ = 0 (α = 0, ``kl=None``) is TD-MPC2's update; λ = ∞ (α = 1, ``q=None``) is BMPC's
    ``(1/T) Σ_t ρ^t mean_b [KL_t/S_KL − β·H_t]``; in between the loss is continuous in λ, and λ = 1 weighs the
    normalised return and the normalised KL equally. ``a_t ~ π_s`` reparameterised; ``H_t`` = scaled entropy;
    β = entropy_coef. The KL may cover fewer latents than Q̂ (π^P exists on the first H only): each term is
    averaged over its own steps. With ``kl_mask`` (rows that hold a real plan), the KL's mean over b runs over
    those rows only (:func:`masked_time_weighted_mean`).

    :param q: (T, B, 1) Q̂, or None for λ = ∞; :param kl: (T', B, 1) KL, or None for λ = 0
    :param scaled_entropy: (T, B, 1) of the latents of the longer term
    """
    alpha = kl_weight(kl_coef)
    if q is None and kl is None:
        raise ValueError("policy_loss needs Q values (λ < ∞), the KL term (λ > 0), or both")
    if q is None and not (isinstance(alpha, float) and alpha == 1.0):
        raise ValueError("policy_loss with a finite kl_coef needs Q values")
    if kl is None and not (isinstance(alpha, float) and alpha == 0.0):
        raise ValueError("policy_loss with kl_coef > 0 needs the KL term")
    loss = -entropy_coef * time_weighted_mean(scaled_entropy, rho)
    if q is not None:
        loss = loss + (1.0 - alpha) * time_weighted_mean(-q / q_scale, rho)
    if kl is not None:
        loss = loss + alpha * masked_time_weighted_mean(kl / kl_scale, kl_mask, rho)
    return loss


def kl_coef_loss(log_kl_coef: torch.Tensor, kl: torch.Tensor, target_kl: float) -> torch.Tensor:
    """Dual descent on λ toward a target KL (as SAC's entropy coefficient):
    ``L_λ = −log λ · (mean KL − KL_target)`` with the KL detached, so λ grows while KL > target."""
    return -(log_kl_coef * (kl.detach().mean() - target_kl))
