"""Matmul FLOPs of a call: counted by :class:`~torch.utils.flop_counter.FlopCounterMode` and, for a plan, derived
from the architecture as a cross-check."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from sb3_pompc.world_model import WorldModel

__all__ = ["count_flops", "analytic_plan_flops"]


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run ``fn`` once under :class:`FlopCounterMode`: (total FLOPs, FLOPs per aten op)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op).replace("aten.", ""): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def _linear_flops(rows: int, dims: Sequence[int]) -> int:
    return sum(2 * rows * dims[i] * dims[i + 1] for i in range(len(dims) - 1))


def _mlp_dims(net: torch.nn.Module) -> list[int]:
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    return [linears[0].in_features, *(m.out_features for m in linears)]


def analytic_plan_flops(model: WorldModel, planner: Any, n: int) -> int:
    """Matmul FLOPs of one plan of ``n`` states, from the architecture (a cross-check of the counted number).

    encoder(n) + policy trajectories [H · π(n·P) + (H − 1) · d(n·P)] + iterations · [H · (R + d)(n·N) + π(n·N)
    (Q critic) + 2 critic heads (n·N)] (+ termination head H · (n·N) per iteration when episodic); a linear layer
    of a batch of ``r`` rows costs ``2·r·in·out``. At the first step of the rollout the first layers of R and d
    take the latent part once per state: ``2·n·L·M + 2·n·N·A·M`` instead of ``2·n·N·(L + A)·M``.
    """
    H, I, N, P = planner.horizon, planner.iterations, planner.num_samples, planner.num_pi_trajs
    enc, dyn, rew, pi = (_mlp_dims(m) for m in (model.encoder, model.dynamics, model.reward, model.pi.net))
    critic = [model.critic.weights[0].shape[1], *(w.shape[2] for w in model.critic.weights)]
    flops = _linear_flops(n, enc)
    if P > 0:
        flops += H * _linear_flops(n * P, pi) + (H - 1) * _linear_flops(n * P, dyn)
    per_iter = H * (_linear_flops(n * N, rew) + _linear_flops(n * N, dyn)) + 2 * _linear_flops(n * N, critic)
    L, A = model.latent_dim, model.action_dim
    for net in (rew, dyn):  # first step: shared latent part of the first layer
        per_iter += _linear_flops(n, [L, net[1]]) + _linear_flops(n * N, [A, net[1]]) - _linear_flops(n * N, net[:2])
    if model.critic_type == "q":
        per_iter += _linear_flops(n * N, pi)
    if model.termination is not None:
        per_iter += H * _linear_flops(n * N, _mlp_dims(model.termination))
    return flops + I * per_iter
