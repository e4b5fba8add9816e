"""MPPI planner over the latent world model (spec §4), batched over environments.

All random numbers of one plan are drawn up front (:class:`PlannerNoise`), so planning a batch of states is
exactly the same computation as planning each state on its own with the matching noise slice, and the MPPI
loop itself never synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from sb3_pompc.world_model import WorldModel

__all__ = ["MPPIPlanner", "PlannerNoise", "PlanResult"]


class PlanResult(NamedTuple):
    """Output of one plan for ``n`` states.

    :param action: executed action (n, A) in [−1, 1] (elite first action, plus σ0 noise when exploring)
    :param plan_mean: π^P mean (n, A): the pre-noise first action of the Gumbel-selected elite (BMPC §4.3)
    :param plan_std: π^P std (n, A): the final MPPI std of the first step, in [min_std, max_std]
    :param mean: final MPPI mean (n, H, A), the next call's warm start
    :param value: value of the selected elite (n, 1)
    """

    action: torch.Tensor
    plan_mean: torch.Tensor
    plan_std: torch.Tensor
    mean: torch.Tensor
    value: torch.Tensor


@dataclass
class PlannerNoise:
    """Every random number of one plan of ``n`` states (leading env dim after the time/iteration dims)."""

    pi_eps: torch.Tensor  # (H, n, P, A) policy-trajectory samples
    term_eps: torch.Tensor  # (iters, n, N, A) π(z_H) samples of the terminal value
    act_eps: torch.Tensor  # (iters, H, n, N − P, A) Gaussian action samples
    heads: torch.Tensor  # (iters, 2) random critic heads, shared over the batch
    gumbel: torch.Tensor  # (n, K) Gumbel noise of the elite draw
    explore: torch.Tensor  # (n, A) exploration noise of the executed action

    def select(self, idx: slice) -> "PlannerNoise":
        """The noise of a subset of the states (for checking batched against one-by-one planning)."""
        return PlannerNoise(
            self.pi_eps[:, idx], self.term_eps[:, idx], self.act_eps[:, :, idx], self.heads, self.gumbel[idx],
            self.explore[idx],
        )


class MPPIPlanner:
    """Model predictive path integral control with policy trajectories (TD-MPC2 / BMPC planner).

    :param horizon: planning horizon H
    :param iterations: MPPI iterations
    :param num_samples: trajectories per iteration N (policy trajectories included)
    :param num_elites: elites K used for the MPPI update
    :param num_pi_trajs: policy trajectories P among the N samples
    :param temperature: multiplies values in ``exp(temperature · (v − max v))``
    :param min_std: lower clamp of the MPPI std
    :param max_std: initial std and upper clamp
    :param gamma: discount used for the planned return
    :param deterministic_action: the action of a ``deterministic=True`` plan: "elite" (the first action of the
        highest-weight elite), "mean" (the MPPI mean's first action) or "sample" (TD-MPC2's evaluation protocol: an
        elite drawn by its weight, without exploration noise; the same observation may give different actions)
    """

    DETERMINISTIC_ACTIONS = ("elite", "mean", "sample")

    def __init__(
        self,
        horizon: int = 3,
        iterations: int = 6,
        num_samples: int = 512,
        num_elites: int = 64,
        num_pi_trajs: int = 24,
        temperature: float = 0.5,
        min_std: float = 0.05,
        max_std: float = 2.0,
        gamma: float = 0.99,
        deterministic_action: str = "elite",
    ) -> None:
        if deterministic_action not in self.DETERMINISTIC_ACTIONS:
            raise ValueError(f"deterministic_action must be one of {self.DETERMINISTIC_ACTIONS}, got {deterministic_action!r}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not 0 <= num_pi_trajs < num_samples:
            raise ValueError(f"num_pi_trajs must be in [0, num_samples), got {num_pi_trajs} with num_samples={num_samples}")
        if not 1 <= num_elites <= num_samples:
            raise ValueError(f"num_elites must be in [1, num_samples={num_samples}], got {num_elites}")
        if not 0 < min_std <= max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got {min_std}, {max_std}")
        self.horizon, self.iterations = horizon, iterations
        self.num_samples, self.num_elites, self.num_pi_trajs = num_samples, num_elites, num_pi_trajs
        self.temperature, self.min_std, self.max_std, self.gamma = temperature, min_std, max_std, gamma
        self.deterministic_action = deterministic_action

    def draw_noise(self, n: int, action_dim: int, num_q: int, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> PlannerNoise:
        """Draw every random number of one plan of ``n`` states (from ``generator``, else torch's global one)."""
        H, I, N, P, K, A = self.horizon, self.iterations, self.num_samples, self.num_pi_trajs, self.num_elites, action_dim
        g = dict(device=device, generator=generator)
        u = torch.rand(n, K, **g).clamp_(1e-20, 1.0 - 1e-7)
        return PlannerNoise(
            pi_eps=torch.randn(H, n, P, A, **g),
            term_eps=torch.randn(I, n, N, A, **g),
            act_eps=torch.randn(I, H, n, N - P, A, **g),
            heads=torch.rand(I, num_q, **g).argsort(dim=-1)[:, :2],
            gumbel=-torch.log(-torch.log(u)),
            explore=torch.randn(n, A, **g),
        )

    def _rollout_value(
        self, model: WorldModel, z: torch.Tensor, actions: torch.Tensor, term_eps: torch.Tensor, heads: torch.Tensor
    ) -> torch.Tensor:
        """``G = Σ_t γ^t r̂(z_t, a_t)`` + ``γ^H · V(z_H)`` (Q critic: ``Q_avg(z_H, π(z_H))``; V critic: ``V_avg(z_H)``),
        with a (1 − terminated) mask when the model has a termination head.

        :param z: (n, L) start latents, shared by the N action sequences of each; :param actions: (H, n, N, A);
        :return: (n·N, 1)
        """
        H, n, N, A = actions.shape
        G = torch.zeros(n * N, 1, device=z.device)
        alive = torch.ones_like(G) if model.termination is not None else None
        discount = 1.0
        for t in range(H):
            if t == 0:  # every sequence of a state starts from its latent: its part of the first layers once
                r_logits, z = model.step_from_shared(z, actions[0])
            else:
                a = actions[t].reshape(n * N, A)
                r_logits, z = model.reward_logits(z, a), model.next(z, a)
            r = model.two_hot.decode(r_logits)
            if alive is not None:
                G = G + discount * alive * r
                alive = alive * (model.termination_logits(z) <= 0).float()
            else:
                G = G + discount * r
            discount *= self.gamma
        a_term = model.pi(z, eps=term_eps, need_log_prob=False).action if model.critic_type == "q" else None
        v = model.critic_value(z, a_term, reduce="avg", heads=heads)
        if alive is not None:
            v = alive * v
        return G + discount * v.float()

    @torch.no_grad()
    def plan(
        self,
        model: WorldModel,
        z: torch.Tensor,
        warm_mean: Optional[torch.Tensor] = None,
        deterministic: bool = False,
        noise: Optional[PlannerNoise] = None,
        pi_log_std_bounds: Optional[tuple[float, float]] = None,
    ) -> PlanResult:
        """Plan from latents ``z`` (n, L), all states in one batch.

        :param model: world model (switched to eval mode while planning)
        :param z: (n, L) encoded observations
        :param warm_mean: (n, H, A) previous MPPI mean per state, already zeroed where an episode starts;
            it is shifted one step (``mean[0..H−2] = prev[1..H−1]``, last step 0). None = no warm start.
        :param deterministic: no exploration noise, and the action ``deterministic_action`` says (the same
            observation and warm start give the same action unless it is "sample")
        :param noise: pre-drawn noise (drawn here if None)
        :param pi_log_std_bounds: log σ bounds of the policy trajectories (reanalyze uses exploration bounds)
        """
        was_training = model.training
        model.eval()
        n, A, H = z.shape[0], model.action_dim, self.horizon
        N, P, K = self.num_samples, self.num_pi_trajs, self.num_elites
        if noise is None:
            noise = self.draw_noise(n, A, model.num_q, z.device)

        # policy trajectories, rolled once per plan: (H, n, P, A). The planner asks π for actions only
        # (``need_log_prob=False``: the same actions without the log-prob and entropy ops, see
        # tests/test_gpu_safety.py::test_plans_compute_no_log_prob)
        pi_actions = torch.empty(H, n, P, A, device=z.device)
        if P > 0:
            zp = z.unsqueeze(1).expand(n, P, -1).reshape(n * P, -1)
            for t in range(H):
                a = model.pi(zp, eps=noise.pi_eps[t].reshape(n * P, A), log_std_bounds=pi_log_std_bounds,
                             need_log_prob=False).action
                pi_actions[t] = a.reshape(n, P, A)
                if t < H - 1:
                    zp = model.next(zp, a)

        mean = torch.zeros(H, n, A, device=z.device)
        if warm_mean is not None:
            mean[:-1] = warm_mean.transpose(0, 1)[1:]
        std = torch.full((H, n, A), self.max_std, device=z.device)
        actions = torch.empty(H, n, N, A, device=z.device)
        actions[:, :, :P] = pi_actions

        for i in range(self.iterations):
            actions[:, :, P:] = (mean.unsqueeze(2) + std.unsqueeze(2) * noise.act_eps[i]).clamp_(-1.0, 1.0)
            value = self._rollout_value(model, z, actions, noise.term_eps[i].reshape(n * N, A), noise.heads[i])
            value = torch.nan_to_num(value.reshape(n, N), nan=0.0)
            elite_value, elite_idx = torch.topk(value, K, dim=1)  # (n, K)
            elite_actions = torch.gather(actions, 2, elite_idx[None, :, :, None].expand(H, n, K, A))  # (H, n, K, A)
            score = torch.exp(self.temperature * (elite_value - elite_value.max(dim=1, keepdim=True).values))
            score = score / score.sum(dim=1, keepdim=True)
            w = score[None, :, :, None]
            denom = score.sum(dim=1)[None, :, None] + 1e-9
            mean = (w * elite_actions).sum(dim=2) / denom
            std = ((w * (elite_actions - mean.unsqueeze(2)).square()).sum(dim=2) / denom).sqrt()
            std = std.clamp(self.min_std, self.max_std)

        if deterministic and self.deterministic_action == "elite":
            choice = torch.argmax(score, dim=1)  # the highest-weight elite
        else:
            choice = torch.argmax(torch.log(score) + noise.gumbel, dim=1)  # Gumbel-max draw of one elite per state
        rows = torch.arange(n, device=z.device)
        first = elite_actions[0, rows, choice]  # (n, A)
        if deterministic and self.deterministic_action == "mean":
            first = mean[0]
        std0 = std[0]
        action = first if deterministic else first + std0 * noise.explore
        model.train(was_training)
        return PlanResult(
            action=action.clamp(-1.0, 1.0),
            plan_mean=first,
            plan_std=std0,
            mean=mean.transpose(0, 1).contiguous(),
            value=elite_value[rows, choice].unsqueeze(-1),
        )
