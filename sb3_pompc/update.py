"""The optimiser steps of one PO-MPC update, each a function of the networks, the batch and the settings.

``POMPC._update`` calls them in the order of DESIGN §3 (targets → world model and critic → prior π_p → π_s → λ →
Q̃ → soft target update). The formulas live in ``objectives.py``; here they are fed, scaled and stepped. A loss is
checked before its step (:func:`check_finite`: on the host on a CPU, on the device by a :class:`NonFiniteGuard`
elsewhere), and :func:`record_logs` is the log point of a ``train()`` call: one host transfer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from sb3_pompc import objectives as obj
from sb3_pompc.buffers import POMPCReplayBufferSamples
from sb3_pompc.config import POMPCConfig
from sb3_pompc.policies import POMPCPolicy
from sb3_pompc.speedups import AUTOCAST_DTYPES, autocast, autocast_fn

__all__ = ["kl_mode_now", "kl_coef_now", "build_update_fns", "UpdateSite", "NonFiniteGuard", "check_finite",
           "optimizer_step", "world_model_step", "prior_step", "policy_step", "kl_coef_step", "kl_critic_step",
           "soft_update", "mean_logs", "record_logs"]

Logs = dict[str, torch.Tensor]

#: device types whose losses are checked on the host before each optimiser step (one sync per loss, cheap on a
#: CPU); on any other device :class:`NonFiniteGuard` skips the steps on the device and the error comes at the log point
HOST_CHECKED_DEVICES: tuple[str, ...] = ("cpu",)
#: the losses a :class:`NonFiniteGuard` names
LOSS_NAMES = ("world-model loss", "prior loss", "policy loss", "KL-critic loss")


class UpdateSite(NamedTuple):
    """Where an update runs, for error messages: ``str()`` is "update N (timestep T)" (N = updates done before)."""

    n_updates: int
    timestep: int

    def __str__(self) -> str:
        return f"update {self.n_updates} (timestep {self.timestep})"


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


class NonFiniteGuard:
    """The first non-finite loss of training, recorded on the device, and the optimiser steps it skips, without a
    host sync (the check of a device that is not in :data:`HOST_CHECKED_DEVICES`).

    ``flag`` (0-dim float32) becomes 1 at the first non-finite loss and stays 1 until :func:`mean_logs` reads it at
    the next log point and raises: every later step of that ``train()`` call is skipped, so the parameters stay the
    last finite ones. A fused Adam step gets ``flag`` as its ``found_inf`` argument (the one a ``GradScaler``
    passes: the kernel leaves parameters and moments as they are and the step count is taken back); any other
    optimiser step, the running scales and the soft target update are masked with ``torch.where`` on ``flag``.
    ``first`` holds ``(update + 1) · len(LOSS_NAMES) + loss index + 1`` of the first non-finite loss (0: none).
    ``tests/test_gpu_safety.py`` checks it on the CPU (with ``HOST_CHECKED_DEVICES`` emptied).
    """

    def __init__(self) -> None:
        self.flag: Optional[torch.Tensor] = None
        self.first: Optional[torch.Tensor] = None

    def observe(self, loss: torch.Tensor, name: str, where: Any) -> None:
        """Record whether ``loss`` is finite (device ops only).

        :param name: one of :data:`LOSS_NAMES`
        :param where: the :class:`UpdateSite` of the update (another value: the update is not named)
        """
        if self.flag is None or self.flag.device != loss.device:
            self.flag = torch.zeros((), device=loss.device)
            self.first = torch.zeros((), dtype=torch.int64, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all()
        update = where.n_updates if isinstance(where, UpdateSite) else -1
        code = (update + 1) * len(LOSS_NAMES) + LOSS_NAMES.index(name) + 1
        self.first.copy_(torch.where(bad & (self.flag == 0), code, self.first))  # type: ignore[union-attr]
        torch.maximum(self.flag, bad.float(), out=self.flag)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, skipped on the device once :attr:`flag` is set."""
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = self.flag  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        moments = [v for p in params for v in optimizer.state.get(p, {}).values()
                   if isinstance(v, torch.Tensor) and v.device == self.flag.device]  # type: ignore[union-attr]
        saved = [t.detach().clone() for t in params + moments]
        optimizer.step()
        self.restore(params + moments, saved)

    def restore(self, tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
        """Put ``saved`` back into ``tensors`` (in place) if :attr:`flag` is set."""
        tripped = self.flag > 0  # type: ignore[operator]
        with torch.no_grad():
            for tensor, old in zip(tensors, saved):
                tensor.copy_(torch.where(tripped, old, tensor))

    def error(self, code: int, where: Any) -> FloatingPointError:
        """The error of a non-finite loss recorded as ``code`` (:attr:`first`); resets the guard."""
        self.flag.zero_()  # type: ignore[union-attr]
        self.first.zero_()  # type: ignore[union-attr]
        update, loss = divmod(code - 1, len(LOSS_NAMES))
        at = f"update {update - 1}" if update > 0 else "an update"
        timestep = f" (timestep {where.timestep})" if isinstance(where, UpdateSite) else ""
        return FloatingPointError(
            f"non-finite {LOSS_NAMES[loss]} at {at}{timestep}; training stopped: that optimiser step and every later "
            "one were skipped, so the parameters are the last finite ones"
        )


def nonfinite_guard(policy: POMPCPolicy, active: bool = False) -> Optional[NonFiniteGuard]:
    """The policy's :class:`NonFiniteGuard` (made on first use); with ``active``, None unless it has checked a loss
    on the device (the host check of :data:`HOST_CHECKED_DEVICES` needs no guard)."""
    guard = policy.__dict__.setdefault("nonfinite_guard", NonFiniteGuard())
    return guard if not active or guard.flag is not None else None


def check_finite(loss: torch.Tensor, name: str, where: Any, policy: Optional[POMPCPolicy] = None
                 ) -> Optional[NonFiniteGuard]:
    """Check a loss before its optimiser step. On a device of :data:`HOST_CHECKED_DEVICES` (one host sync per
    loss) a non-finite loss raises here; on any other device the policy's :class:`NonFiniteGuard` records it
    without a sync, and that guard is returned (give it to :func:`optimizer_step`: it skips the step).

    :param name: one of :data:`LOSS_NAMES`
    :param where: the :class:`UpdateSite` of the update
    :param policy: the policy whose guard records a loss on the device (None: no device-side check)
    """
    if loss.device.type in HOST_CHECKED_DEVICES:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite {name} at {where}; training stopped before the optimiser step, so the parameters are "
                "the last finite ones"
            )
        return None
    if policy is None:
        return None
    guard = nonfinite_guard(policy)
    guard.observe(loss, name, where)  # type: ignore[union-attr]
    return guard


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Any, clip: Optional[float],
                   guard: Optional[NonFiniteGuard] = None) -> Optional[torch.Tensor]:
    """Backward, clip the gradient norm of ``params`` to ``clip`` (None: no clipping), step (skipped on the device
    once ``guard`` has seen a non-finite loss); returns the norm before clipping (None without clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None else None
    if guard is None:
        optimizer.step()
    else:
        guard.step(optimizer)
    return norm


def world_model_step(policy: POMPCPolicy, fns: dict[str, Callable[..., Any]], batch: POMPCReplayBufferSamples,
                     z_enc: torch.Tensor, value_target: torch.Tensor, config: POMPCConfig,
                     where: UpdateSite) -> tuple[Logs, torch.Tensor]:
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
    guard = check_finite(loss, "world-model loss", where, policy)
    params = [p for group in policy.optimizer.param_groups for p in group["params"]]
    logs["grad_norm"] = optimizer_step(loss, policy.optimizer, params, config.grad_clip_norm, guard)
    logs["value_target_mean"] = value_target.mean()
    return logs, zs.detach()


def prior_step(policy: POMPCPolicy, fns: dict[str, Callable[..., Any]], zs: torch.Tensor,
               batch: POMPCReplayBufferSamples, config: POMPCConfig, where: UpdateSite) -> Logs:
    """One step of the prior network π_p toward the buffer's planner stats, on the first H rollout latents (where
    π^P exists), by forward or reverse KL (``config.prior``)."""
    model = policy.model
    H = batch.actions.shape[0]
    mask = batch.has_plan if config.mask_unplanned else None  # fit real plans only, not warm-up placeholders
    loss = fns["prior"](model, zs[:H], batch.plan_mean, batch.plan_std, config.prior, config.rho, mask)
    guard = check_finite(loss, "prior loss", where, policy)
    optimizer_step(loss, policy.prior_optimizer, model.prior.parameters(), config.grad_clip_norm, guard)  # type: ignore[arg-type, union-attr]
    return {"prior_loss": loss.detach()}


def return_scale_sample(model: Any, z0: torch.Tensor, a0: torch.Tensor, q0: torch.Tensor) -> torch.Tensor:
    """The values S_Q is measured on: Q̂ at the first latent (TD-MPC2), or, when π_s maximises the KL-regularised
    critic Q̃, the planner's critic Q at the same latents and actions. Q̃'s target charges λ·(S_Q/S_KL)·KL, so a
    scale measured on Q̃ itself feeds back into Q̃'s penalty: Q̃ grows more negative, S_Q grows, and so on (a
    cartpole-balance run went from a mean Q̃ of −5 to −17,500 in 5k steps). Q's scale is the task's return scale.

    :param z0: (B, L) latents; :param a0: (B, A) π_s's actions there; :param q0: (B, 1) Q̂ at them
    """
    if model.kl_critic is None:
        return q0
    with torch.no_grad():
        return model.critic_value(z0, a0.detach(), reduce="avg", detach=True)


def policy_step(policy: POMPCPolicy, fns: dict[str, Callable[..., Any]], zs: torch.Tensor,
                batch: POMPCReplayBufferSamples, config: POMPCConfig, mode: str, kl_coef: Optional[torch.Tensor],
                where: UpdateSite) -> tuple[Logs, torch.Tensor]:
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
    scales = [policy.q_scale.value, policy.kl_scale.value]
    before = [s.clone() for s in scales] if zs.device.type not in HOST_CHECKED_DEVICES else None
    if q is not None:  # the running scales S_Q and S_KL of the two terms the loss mixes
        policy.q_scale.update(return_scale_sample(model, zs[0], out.action[0], q[0]))
        logs["q_mean"] = q.detach().mean()
    if mode != "zero":
        policy.kl_scale.update(kl[0])
    # windows without a real plan add no KL to the buffer's π^P (a learned prior is defined at every latent)
    mask = batch.has_plan[: kl.shape[0]] if config.mask_unplanned and config.kl_reference == "planner" else None
    lam = {"infinite": math.inf, "zero": 0.0}.get(mode, kl_coef)
    loss = obj.policy_loss(q, None if mode == "zero" else kl, out.scaled_entropy, lam, config.rho,  # type: ignore[arg-type]
                           config.entropy_coef, policy.q_scale.value, policy.kl_scale.value, mask)
    guard = check_finite(loss, "policy loss", where, policy)
    optimizer_step(loss, policy.pi_optimizer, model.pi.parameters(), config.grad_clip_norm, guard)
    if guard is not None and before is not None:  # the scales of a skipped step stay as they were
        guard.restore(scales, before)
    kl_d = kl.detach()
    logs.update(
        policy_loss=loss.detach(), kl_mean=kl_d.mean(), kl_std=kl_d.std(), kl_planner_mean=kl_raw.mean(),
        kl_planner_std=kl_raw.std(), policy_std=out.std.detach().mean(), planner_std=batch.plan_std.mean(),
        entropy=out.scaled_entropy.detach().mean(),
    )
    return logs, kl_d


def kl_coef_step(log_kl_coef: torch.Tensor, optimizer: torch.optim.Optimizer, kl: torch.Tensor,
                 target_kl: float, policy: Optional[POMPCPolicy] = None) -> Logs:
    """One dual-descent step on log λ toward ``target_kl`` (``kl_coef="auto"``), skipped on the device once the
    policy's :class:`NonFiniteGuard` has seen a non-finite loss."""
    loss = obj.kl_coef_loss(log_kl_coef, kl, target_kl)
    guard = nonfinite_guard(policy, active=True) if policy is not None else None
    optimizer_step(loss, optimizer, None, None, guard)
    return {"kl_coef_loss": loss.detach()}


def kl_critic_step(policy: POMPCPolicy, zs: torch.Tensor, z_enc: torch.Tensor, batch: POMPCReplayBufferSamples,
                   config: POMPCConfig, kl_coef: torch.Tensor, gamma: float, where: UpdateSite) -> Logs:
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
    guard = check_finite(loss, "KL-critic loss", where, policy)
    optimizer_step(loss, policy.kl_critic_optimizer, model.kl_critic.parameters(),  # type: ignore[arg-type, union-attr]
                   config.grad_clip_norm, guard)
    return {"kl_value_loss": loss.detach()}


def soft_update(policy: POMPCPolicy, tau: float) -> None:
    """The soft update of the target critics (:meth:`~sb3_pompc.world_model.WorldModel.soft_update_targets`); once
    the policy's :class:`NonFiniteGuard` has seen a non-finite loss the weight is ``τ (1 − flag)`` on the device,
    i.e. the targets keep their last finite weights."""
    guard = nonfinite_guard(policy, active=True)
    policy.model.soft_update_targets(tau if guard is None else (1.0 - guard.flag) * tau)  # type: ignore[operator]


def mean_logs(logs: list[Logs], where: Any, guard: Optional[NonFiniteGuard] = None,
              current: Optional[Logs] = None) -> dict[str, float]:
    """The mean of every logged term over ``logs`` (one entry per update), in ONE host transfer; raises if a loss
    is not finite: the first one a device-side ``guard`` recorded (its steps were skipped), else any loss whose mean
    is not finite.

    :param where: the :class:`UpdateSite` of the log point
    :param guard: the policy's :class:`NonFiniteGuard` (read in the same transfer)
    :param current: values to read as they are now (0-dim tensors), returned under their own keys
    """
    keys = sorted({k for log in logs for k in log})
    values = [torch.stack([log[k].float().reshape(()) for log in logs if k in log]).mean() for k in keys]
    values += [value.float().reshape(()) for value in (current or {}).values()]
    stacked = torch.stack(values)
    if guard is not None and guard.first is not None:
        stacked = torch.cat([stacked.double(), guard.first.double().reshape(1)])
    host = stacked.tolist()
    code = int(host.pop()) if guard is not None and guard.first is not None else 0
    if code > 0:
        raise guard.error(code, where)  # type: ignore[union-attr]
    means = host[: len(keys)]
    bad = [k for k, v in zip(keys, means) if not math.isfinite(v) and k.endswith("loss")]
    if bad:
        raise FloatingPointError(f"non-finite {', '.join(bad)} before {where}; training stopped")
    return {**dict(zip(keys, means)), **dict(zip(current or {}, host[len(keys):]))}


def record_logs(logger: Any, policy: POMPCPolicy, logs: list[Logs], seconds_per_update: float, where: UpdateSite,
                kl_coef: Union[float, torch.Tensor]) -> None:
    """Record the log point of a ``train()`` call: each term's mean over the updates since the last dump (each
    update logs its batch's statistics), and λ and the running scales as they are now, in ONE host transfer
    (:func:`mean_logs`, which raises on a non-finite loss).

    :param logger: the algorithm's SB3 logger
    :param policy: the :class:`~sb3_pompc.policies.POMPCPolicy` (running scales, non-finite guard)
    :param logs: one entry per update of the call
    :param seconds_per_update: wall-clock seconds per update of the call
    :param where: the site of the last update, for the message of a non-finite loss
    :param kl_coef: λ now: a float, or a device tensor (a learned λ) read in the same host transfer
    """
    current = {"q_scale": policy.q_scale.value, "kl_scale": policy.kl_scale.value}
    if isinstance(kl_coef, torch.Tensor):
        current["kl_coef"] = kl_coef
    means = mean_logs(logs, where, nonfinite_guard(policy, active=True), current)
    now = {key: means.pop(key) for key in current}
    for key, value in means.items():
        logger.record_mean(f"train/{key}", value)
    logger.record_mean("time/update_ms", 1000.0 * seconds_per_update)
    logger.record("train/n_updates", where.n_updates, exclude="tensorboard")
    logger.record("train/kl_coef", now.get("kl_coef", kl_coef))
    logger.record("train/q_scale", now["q_scale"])
    logger.record("train/kl_scale", now["kl_scale"])
