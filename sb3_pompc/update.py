"""The optimiser steps of one PO-MPC update, each a function of the networks, the batch and the settings.

``POMPC._update`` calls them in the order of DESIGN §3 (targets → world model and critic → prior π_p → π_s → λ →
Q̃ → soft target update). The formulas live in ``objectives.py``; here they are fed, scaled and stepped.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from sb3_pompc import objectives as obj
from sb3_pompc.buffers import POMPCReplayBufferSamples
from sb3_pompc.config import POMPCConfig
from sb3_pompc.policies import POMPCPolicy
from sb3_pompc.speedups import AUTOCAST_DTYPES, autocast, autocast_fn

__all__ = ["kl_mode_now", "kl_coef_now", "build_update_fns", "optimizer_step", "world_model_step", "prior_step", "policy_step", "kl_coef_step", "kl_critic_step", "mean_logs"]

Logs = dict[str, torch.Tensor]


def kl_mode_now(config: POMPCConfig, n_updates: int, has_plans: bool) -> str:
    """The KL mode of the next update: "zero" during the first ``kl_warmup`` updates (the paper's N_s: the critic
    learns before the KL-regularised updates start) and, with ``mask_unplanned``, until the buffer holds a real
    plan; else ``config.kl_mode``.

    :param n_updates: updates done so far, pretraining burst included
    :param has_plans: whether the replay buffer holds a row produced by the planner
    """
    if n_updates < config.kl_warmup or (config.mask_unplanned and not has_plans):
        return "zero"
    return config.kl_mode


def kl_coef_now(config: POMPCConfig, mode: str, log_kl_coef: Optional[torch.Tensor],
                device: torch.device) -> torch.Tensor:
    """λ for a mode that weighs the KL by it: 0 ("zero"), the fixed λ ("finite") or exp(log λ) ("learned").

    :param mode: from :func:`kl_mode_now`; "infinite" has no finite weight and raises
    :param log_kl_coef: the learned log λ (``kl_coef="auto"``), else None
    :param device: where the tensor goes
    """
    if mode == "learned":
        return log_kl_coef.detach().exp()  # type: ignore[union-attr]
    if mode == "infinite":
        raise ValueError("λ = ∞ has no finite weight: the π_s loss drops its return term instead")
    return torch.tensor(0.0 if mode == "zero" else config.kl_coef_init, device=device)


def build_update_fns(config: POMPCConfig, device: torch.device, compile_: bool) -> dict[str, Callable[..., Any]]:
    """The forward passes of an update (targets, world-model loss, prior loss, policy terms), under autocast for
    ``update_dtype="bfloat16"``; with ``compile_`` each goes through ``torch.compile`` (fused element-wise kernels,
    forward and backward). Backward passes and optimiser steps stay eager; so does the optional Q̃ step. No CUDA
    graphs here: an update's outputs (logged losses) outlive the next replay of a graph.

    :param config: the resolved settings (``update_dtype``)
    :param device: the policy's device
    :param compile_: wrap each function in ``torch.compile``
    """
    fns: dict[str, Callable[..., Any]] = {
        "targets": obj.critic_targets,
        "world_model": obj.world_model_loss,
        "prior": obj.prior_fit_loss,
        "policy": obj.policy_terms,
    }
    if AUTOCAST_DTYPES[config.update_dtype] != torch.float32:
        fns = {name: autocast_fn(fn, device.type, config.update_dtype) for name, fn in fns.items()}
    if compile_:
        # on CPU the compiler's own dropout RNG is scalar code, ~4x slower than ATen's bernoulli: use ATen's
        options = {"fallback_random": True} if device.type == "cpu" else None
        fns = {name: torch.compile(fn, dynamic=False, options=options) for name, fn in fns.items()}
    return fns


def check_finite(loss: torch.Tensor, name: str, where: str) -> None:
    """Raise before the optimiser step of a non-finite loss (one host sync per loss on CPU, where it is cheap; on
    GPU skipped, and :func:`mean_logs` catches it once per ``train()`` call)."""
    if loss.device.type == "cpu" and not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite {name} at {where}; training stopped before the optimiser step, so the parameters are the "
            "last finite ones"
        )


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Any, clip: float) -> torch.Tensor:
    """Backward, clip the gradient norm to ``clip``, step; returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return norm


def world_model_step(policy: POMPCPolicy, fns: dict[str, Callable[..., Any]], batch: POMPCReplayBufferSamples,
                     z_enc: torch.Tensor, value_target: torch.Tensor, config: POMPCConfig,
                     where: str) -> tuple[Logs, torch.Tensor]:
    """One step of the world model and its critic (encoder, dynamics, reward, critic, termination).

    :param z_enc: encoder latents of the window (H + 1, B, L), no gradient (the consistency targets)
    :param value_target: the critic's targets (H, B, 1)
    :param where: update and timestep, for error messages
    :return: the logged terms, and the rollout latents ẑ (H + 1, B, L), detached
    """
    model = policy.model
    policy.model.train()
    loss, logs, zs = fns["world_model"](model, batch.observations, batch.actions, batch.rewards, batch.terminated,
                                        value_target, z_enc[1:], config.rho, **config.loss_coefs())
    check_finite(loss, "world-model loss", where)
    params = [p for group in policy.optimizer.param_groups for p in group["params"]]
    logs["grad_norm"] = optimizer_step(loss, policy.optimizer, params, config.grad_clip_norm)
    logs["value_target_mean"] = value_target.mean()
    return logs, zs.detach()


def prior_step(policy: POMPCPolicy, fns: dict[str, Callable[..., Any]], zs: torch.Tensor,
               batch: POMPCReplayBufferSamples, config: POMPCConfig, where: str) -> Logs:
    """One step of the prior network π_p toward the buffer's planner stats, on the first H rollout latents (where
    π^P exists), by forward or reverse KL (``config.prior``)."""
    model = policy.model
    H = batch.actions.shape[0]
    mask = batch.has_plan if config.mask_unplanned else None  # fit real plans only, not warm-up placeholders
    loss = fns["prior"](model, zs[:H], batch.plan_mean, batch.plan_std, config.prior, config.rho, mask)
    check_finite(loss, "prior loss", where)
    optimizer_step(loss, policy.prior_optimizer, model.prior.parameters(), config.grad_clip_norm)  # type: ignore[arg-type, union-attr]
    return {"prior_loss": loss.detach()}


def policy_step(policy: POMPCPolicy, fns: dict[str, Callable[..., Any]], zs: torch.Tensor,
                batch: POMPCReplayBufferSamples, config: POMPCConfig, mode: str, kl_coef: Optional[torch.Tensor],
                where: str) -> tuple[Logs, torch.Tensor]:
    """One step of the sampling policy π_s on the rollout latents ``zs`` (H + 1, B, L), detached.

    :param mode: the KL mode of this update ("zero" during ``kl_warmup``, see ``POMPCConfig.kl_mode``)
    :param kl_coef: λ for the modes "zero", "finite" and "learned" (None for "infinite")
    :param where: update and timestep, for error messages
    :return: the logged terms, and the detached per-sample KL (for the λ step)
    """
    model = policy.model
    T = config.policy_latents
    out, kl, q, kl_raw = fns["policy"](model, zs[:T], batch.plan_mean, batch.plan_std, config.kl_reference,
                                       mode != "infinite")
    logs: Logs = {}
    if q is not None:  # the running scales S_Q and S_KL of the two terms the loss mixes
        policy.q_scale.update(q[0])
        logs["q_mean"] = q.detach().mean()
    if mode != "zero":
        policy.kl_scale.update(kl[0])
    # windows without a real plan add no KL to the buffer's π^P (a learned prior is defined at every latent)
    mask = batch.has_plan[: kl.shape[0]] if config.mask_unplanned and config.kl_reference == "planner" else None
    lam = {"infinite": math.inf, "zero": 0.0}.get(mode, kl_coef)
    loss = obj.policy_loss(q, None if mode == "zero" else kl, out.scaled_entropy, lam, config.rho,  # type: ignore[arg-type]
                           config.entropy_coef, policy.q_scale.value, policy.kl_scale.value, mask)
    check_finite(loss, "policy loss", where)
    optimizer_step(loss, policy.pi_optimizer, model.pi.parameters(), config.grad_clip_norm)
    kl_d = kl.detach()
    logs.update(
        policy_loss=loss.detach(), kl_mean=kl_d.mean(), kl_std=kl_d.std(), kl_planner_mean=kl_raw.mean(),
        kl_planner_std=kl_raw.std(), policy_std=out.std.detach().mean(), planner_std=batch.plan_std.mean(),
        entropy=out.scaled_entropy.detach().mean(),
    )
    return logs, kl_d


def kl_coef_step(log_kl_coef: torch.Tensor, optimizer: torch.optim.Optimizer, kl: torch.Tensor,
                 target_kl: float) -> Logs:
    """One dual-descent step on log λ toward ``target_kl`` (``kl_coef="auto"``)."""
    loss = obj.kl_coef_loss(log_kl_coef, kl, target_kl)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"kl_coef_loss": loss.detach()}


def kl_critic_step(policy: POMPCPolicy, zs: torch.Tensor, z_enc: torch.Tensor, batch: POMPCReplayBufferSamples,
                   config: POMPCConfig, kl_coef: torch.Tensor, gamma: float, where: str) -> Logs:
    """One step of the KL-regularised critic Q̃ toward :func:`~sb3_pompc.objectives.kl_value_target`
    (``kl_value=True``). Q̃ is trained where π_s queries it, on the rollout latents ẑ_t with the buffer actions; its
    target bootstraps from the encoder latents of the next observations, as the critic Q does.

    :param zs: rollout latents ẑ (H + 1, B, L), detached
    :param z_enc: encoder latents of the window (H + 1, B, L), no gradient
    :param kl_coef: λ of this update (0 while the KL terms wait)
    :param gamma: discount
    :param where: update and timestep, for error messages
    """
    model = policy.model
    T = config.kl_value_steps
    if T < 1:
        return {}
    with torch.no_grad(), autocast(z_enc.device.type, config.update_dtype):
        z_next = z_enc[1 : T + 1]
        out = model.pi(z_next)
        next_kl = obj.kl_to_reference(model, out, z_next, batch.plan_mean[1 : T + 1], batch.plan_std[1 : T + 1],
                                      config.kl_reference)
        if config.mask_unplanned and config.kl_reference == "planner":
            next_kl = next_kl * batch.has_plan[1 : T + 1]  # no penalty where the buffer holds no real plan
        q_next = model.critic_value(z_next.reshape(-1, z_next.shape[-1]), out.action.reshape(-1, out.action.shape[-1]),
                                    reduce=config.target_reduce, target=True, kl=True).reshape(T, -1, 1)
        y = obj.kl_value_target(batch.rewards[:T], batch.terminated[:T], q_next, next_kl, kl_coef, gamma,
                                policy.q_scale.value, policy.kl_scale.value)
    z = zs[:T].reshape(-1, zs.shape[-1])
    with autocast(z_enc.device.type, config.update_dtype):
        logits = model.critic_logits(z, batch.actions[:T].reshape(-1, batch.actions.shape[-1]), kl=True)
    loss = obj.ensemble_soft_ce_loss(logits.reshape(model.num_q, T, -1, logits.shape[-1]), y, model.two_hot, config.rho)
    check_finite(loss, "KL-critic loss", where)
    optimizer_step(loss, policy.kl_critic_optimizer, model.kl_critic.parameters(),  # type: ignore[arg-type, union-attr]
                   config.grad_clip_norm)
    return {"kl_value_loss": loss.detach()}


def mean_logs(logs: list[Logs], where: str) -> dict[str, float]:
    """The mean of every logged term over ``logs`` (one entry per update), in ONE host transfer; raises if a loss
    is not finite (on GPU the per-loss check is skipped to avoid host syncs: this is where it is caught)."""
    keys = sorted({k for log in logs for k in log})
    means = torch.stack(
        [torch.stack([log[k].float().reshape(()) for log in logs if k in log]).mean() for k in keys]
    ).tolist()
    bad = [k for k, v in zip(keys, means) if not math.isfinite(v) and k.endswith("loss")]
    if bad:
        raise FloatingPointError(f"non-finite {', '.join(bad)} before {where}; training stopped")
    return dict(zip(keys, means))
