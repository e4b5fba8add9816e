"""Lazy reanalyze (BMPC §4.4): every ``reanalyze_interval`` updates, re-plan the first H states of a few sampled
windows with the current model and overwrite their stored planner statistics π^P, in the batch and in the buffer.

The buffer lives on the host and the plan on the policy's device: the new statistics travel back with one
non-blocking copy, and are written into the buffer by :meth:`Reanalyzer.flush` once the copy has landed, so that a
reanalyze never waits for the device.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from sb3_pompc.buffers import POMPCReplayBuffer, POMPCReplayBufferSamples
from sb3_pompc.config import POMPCConfig
from sb3_pompc.planner import MPPIPlanner
from sb3_pompc.policies import POMPCPolicy

__all__ = ["Reanalyzer", "record_copy_event"]


def record_copy_event(tensor: torch.Tensor) -> Optional[Any]:
    """A CUDA event recorded on the current stream of ``tensor``'s device, i.e. behind a non-blocking copy of
    ``tensor`` queued just before (``event.query()`` is True once it has landed); None off CUDA. The stream is the
    tensor's device's, not the current device's: with the model on ``cuda:1`` and ``cuda:0`` current, an event on
    ``cuda:0``'s stream says nothing about the copy."""
    if tensor.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return event


class Reanalyzer:
    """Lazy reanalyze with its own planner and its pending write-backs.

    :param policy: the policy whose model plans
    :param config: the resolved settings (``reanalyze_*``, ``expl_log_std_*``, the planner's)
    :param buffer: returns the replay buffer to write into (it changes when a buffer is loaded)
    """

    def __init__(self, policy: POMPCPolicy, config: POMPCConfig, buffer: Callable[[], POMPCReplayBuffer]) -> None:
        self.policy = policy
        self.planner = MPPIPlanner(**config.reanalyze_planner_kwargs())
        self.interval = int(config.reanalyze_interval)  # type: ignore[arg-type]
        self.batch_size = config.reanalyze_batch_size
        self.horizon = config.horizon
        self.log_std_bounds = (config.expl_log_std_min, config.expl_log_std_max)
        self._buffer = buffer
        # re-planned π^P on its way to the host buffer: (rows, envs, host tensor, CUDA event or None)
        self._pending: list[tuple[np.ndarray, np.ndarray, torch.Tensor, Optional[Any]]] = []

    def due(self, n_policy_updates: int) -> bool:
        """Whether the update after ``n_policy_updates`` policy updates reanalyzes (every ``interval``-th one)."""
        return bool(self.interval) and (n_policy_updates + 1) % self.interval == 0

    def reanalyze(self, batch: POMPCReplayBufferSamples) -> POMPCReplayBufferSamples:
        """Re-plan obs[0..H−1] of the first windows of ``batch`` (no warm start, exploration log σ bounds for the
        policy trajectories) and return the batch with their new π^P; the buffer gets them at the next flush."""
        self.flush(wait=False)
        H, nb = self.horizon, min(self.batch_size, batch.observations.shape[1])
        obs = batch.observations[:H, :nb].reshape(H * nb, -1)
        self.policy.set_training_mode(False)
        res = self.policy.plan(obs, None, deterministic=False, planner=self.planner,
                               pi_log_std_bounds=self.log_std_bounds)
        self.policy.set_training_mode(True)
        mean, std = res.plan_mean.reshape(H, nb, -1), res.plan_std.reshape(H, nb, -1)
        rows = batch.rows[:, :nb]
        envs = np.broadcast_to(batch.env_indices[None, :nb], rows.shape)
        # to the host buffer without waiting: non-blocking copy now, written by ``flush`` later
        host = torch.cat([mean, std], dim=-1).reshape(H * nb, -1).to("cpu", non_blocking=True)
        self._pending.append((rows.reshape(-1), envs.reshape(-1), host, record_copy_event(mean)))
        plan_mean, plan_std, has_plan = batch.plan_mean.clone(), batch.plan_std.clone(), batch.has_plan.clone()
        plan_mean[:, :nb], plan_std[:, :nb], has_plan[:, :nb] = mean, std, 1.0
        return batch._replace(plan_mean=plan_mean, plan_std=plan_std, has_plan=has_plan)

    def flush(self, wait: bool = True) -> None:
        """Write the re-planned π^P into the replay buffer, oldest first.

        :param wait: wait for copies still running (for each copy only, not the whole device); False writes the
            finished ones and keeps the others pending (no host sync)
        """
        while self._pending:
            rows, envs, host, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            mean, std = np.split(host.numpy(), 2, axis=-1)
            self._buffer().update_plans(rows, envs, mean, std)
            self._pending.pop(0)

    @property
    def pending(self) -> int:
        """Write-backs not yet in the buffer."""
        return len(self._pending)
