"""Replay buffer that stores the planner's π^P next to every transition and samples time-major windows."""

from __future__ import annotations

import logging
import warnings
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize

__all__ = ["POMPCReplayBuffer", "POMPCReplayBufferSamples", "available_memory_bytes"]

_logger = logging.getLogger(__name__)


def available_memory_bytes() -> Optional[int]:
    """Memory the system can give without swapping (psutil's ``available``, else ``MemAvailable`` of
    /proc/meminfo), or None where neither is readable."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class POMPCReplayBufferSamples(NamedTuple):
    """A batch of ``B`` windows, time-major.

    :param observations: (H+1, B, obs_dim) obs[0..H]
    :param actions: (H, B, A) action[t] taken at obs[t], scaled to [−1, 1]
    :param rewards: (H, B, 1)
    :param terminated: (H, B, 1) true terminations (time-limit truncations excluded)
    :param plan_mean: (H, B, A) π^P mean stored at obs[t] (0 for rows without a plan)
    :param plan_std: (H, B, A) π^P std stored at obs[t] (1 for rows without a plan)
    :param has_plan: (H, B, 1) 1 where the row was produced by the planner
    :param rows: (H, B) storage rows of the window (for reanalyze write-back)
    :param env_indices: (B,) env column of each window
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    plan_mean: torch.Tensor
    plan_std: torch.Tensor
    has_plan: torch.Tensor
    rows: np.ndarray
    env_indices: np.ndarray


class POMPCReplayBuffer(ReplayBuffer):
    """SB3 ``ReplayBuffer`` with planner statistics per transition and window sampling.

    A window of horizon H is H consecutive rows of one env: obs[t] = ``observations[row_t]`` for t < H and
    obs[H] = ``next_observations[row_{H−1}]``. Windows never cross an episode end (terminated or truncated),
    another env's column, or the write pointer (also after wrap-around). Rows written without a plan (random
    warm-up actions) carry π^P = N(0, 1) and ``has_plan = False``.

    :param buffer_size: max number of transitions (all envs together, as SB3: buffer_size // n_envs rows per env)
    :param observation_space: observation space
    :param action_space: action space (Box)
    :param device: torch device of the samples
    :param n_envs: number of parallel envs
    :param optimize_memory_usage: not supported (windows need next observations)
    :param handle_timeout_termination: keep time-limit truncations apart from terminations (must stay True)
    :param horizon: window horizon H
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: Union[torch.device, str] = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        horizon: int = 3,
    ) -> None:
        if optimize_memory_usage:
            raise ValueError("POMPCReplayBuffer does not support optimize_memory_usage=True (windows need next_obs)")
        if not handle_timeout_termination:
            raise ValueError("POMPCReplayBuffer needs handle_timeout_termination=True: truncations must bootstrap")
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"POMPCReplayBuffer supports Box action spaces only, got {action_space}")
        rows_per_env = max(buffer_size // n_envs, 1)  # as SB3 sizes its arrays
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if horizon > rows_per_env:  # checked before anything is allocated
            raise ValueError(
                f"horizon {horizon} exceeds the {rows_per_env} rows per env (buffer_size // n_envs): "
                "increase buffer_size"
            )
        self.memory_bytes = self.estimate_memory(buffer_size, observation_space, action_space, n_envs)
        available = available_memory_bytes()
        rows = max(buffer_size // n_envs, 1) * n_envs
        report = f"POMPCReplayBuffer: {rows} transitions need {self.memory_bytes / 1e9:.3f} GB"
        if available is not None:
            report += f" ({available / 1e9:.3f} GB available)"
        _logger.info(report)
        if available is not None and self.memory_bytes > available:
            raise MemoryError(
                f"{report}: the replay buffer does not fit in memory; lower buffer_size (about "
                f"{int(rows * available / self.memory_bytes):,} transitions would fit)"
            )
        if available is not None and self.memory_bytes > 0.5 * available:
            warnings.warn(f"{report}: more than half of the available memory", ResourceWarning, stacklevel=2)
        super().__init__(buffer_size, observation_space, action_space, device, n_envs, False, True)
        self.horizon = horizon
        a_dim = int(np.prod(action_space.shape))
        self.plan_means = np.zeros((self.buffer_size, self.n_envs, a_dim), dtype=np.float32)
        self.plan_stds = np.ones((self.buffer_size, self.n_envs, a_dim), dtype=np.float32)
        self.has_plan = np.zeros((self.buffer_size, self.n_envs), dtype=bool)
        self._next_plan: Optional[tuple[np.ndarray, np.ndarray]] = None

    @staticmethod
    def estimate_memory(buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space, n_envs: int = 1) -> int:
        """Bytes of the arrays a buffer of ``buffer_size`` transitions allocates (SB3 keeps ``buffer_size // n_envs``
        rows per env): obs and next obs (obs dtype), actions (float32 unless float16), rewards, dones and timeouts
        (float32), planner means and stds (float32), ``has_plan`` (bool).

        :param buffer_size: transitions in total (SB3 convention)
        :param observation_space: observation space
        :param action_space: Box action space
        :param n_envs: number of parallel envs
        """
        cells = max(buffer_size // n_envs, 1) * n_envs
        obs_item = int(np.prod(observation_space.shape)) * np.dtype(observation_space.dtype).itemsize
        a_dim = int(np.prod(action_space.shape))
        act_item = a_dim * (2 if np.dtype(action_space.dtype) == np.float16 else 4)
        return cells * (2 * obs_item + act_item + 3 * 4 + 2 * a_dim * 4 + 1)

    def set_next_plan(self, mean: Optional[np.ndarray], std: Optional[np.ndarray]) -> None:
        """Planner stats (n_envs, A) of the transition that the next :meth:`add` writes (None = no plan)."""
        self._next_plan = None if mean is None else (np.asarray(mean, np.float32), np.asarray(std, np.float32))

    def add(self, obs, next_obs, action, reward, done, infos: list[dict[str, Any]]) -> None:  # type: ignore[override]
        pos = self.pos
        if self._next_plan is None:
            self.plan_means[pos] = 0.0
            self.plan_stds[pos] = 1.0
            self.has_plan[pos] = False
        else:
            mean, std = self._next_plan
            self.plan_means[pos] = mean.reshape(self.n_envs, -1)
            self.plan_stds[pos] = std.reshape(self.n_envs, -1)
            self.has_plan[pos] = True
        self._next_plan = None
        super().add(obs, next_obs, action, reward, done, infos)

    def mark_episode_break(self) -> None:
        """End every env's episode at the last stored row, as a truncation (its value target still bootstraps):
        sampled windows never cross it. For an env reset that is not an episode end (a new ``learn`` call, a
        loaded model). Rows that already end an episode keep their flags."""
        if self.pos == 0 and not self.full:
            return
        last = (self.pos - 1) % self.buffer_size
        ended = self.dones[last] > 0
        self.timeouts[last] = np.where(ended, self.timeouts[last], 1.0)
        self.dones[last] = 1.0

    def update_plans(self, rows: np.ndarray, env_indices: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        """Overwrite π^P of the given (row, env) cells (lazy reanalyze)."""
        self.plan_means[rows, env_indices] = mean
        self.plan_stds[rows, env_indices] = std
        self.has_plan[rows, env_indices] = True

    def num_rows(self) -> int:
        return self.buffer_size if self.full else self.pos

    def _draw_starts(self, n: int) -> np.ndarray:
        H = self.horizon
        if self.full:
            return (self.pos + np.random.randint(0, self.buffer_size - H + 1, size=n)) % self.buffer_size
        return np.random.randint(0, self.pos - H + 1, size=n)

    def _window_rows(self, starts: np.ndarray) -> np.ndarray:
        return (starts[None, :] + np.arange(self.horizon)[:, None]) % self.buffer_size  # (H, n)

    def valid_windows(self, starts: np.ndarray, env_indices: np.ndarray) -> np.ndarray:
        """True where the window starting at ``starts`` in ``env_indices`` has no episode end before its last row."""
        if self.horizon == 1:
            return np.ones(len(starts), dtype=bool)
        rows = self._window_rows(starts)[:-1]
        return ~(self.dones[rows, env_indices[None, :]] > 0).any(axis=0)

    def sample_windows(self, batch_size: int, max_tries: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Uniform over valid windows by rejection sampling. :return: (rows (H, B), env_indices (B,))"""
        if self.num_rows() < self.horizon:
            raise ValueError(f"the buffer holds {self.num_rows()} rows, fewer than the horizon {self.horizon}")
        starts_out, envs_out, have = [], [], 0
        for _ in range(max_tries):
            m = 2 * (batch_size - have) + 16
            starts = self._draw_starts(m)
            envs = np.random.randint(0, self.n_envs, size=m)
            ok = self.valid_windows(starts, envs)
            starts_out.append(starts[ok])
            envs_out.append(envs[ok])
            have += int(ok.sum())
            if have >= batch_size:
                starts = np.concatenate(starts_out)[:batch_size]
                return self._window_rows(starts), np.concatenate(envs_out)[:batch_size]
        raise RuntimeError(
            f"could not sample {batch_size} windows of {self.horizon} steps that stay inside one episode: "
            "are the episodes shorter than the horizon?"
        )

    def sample(self, batch_size: int, env: Optional[VecNormalize] = None) -> POMPCReplayBufferSamples:  # type: ignore[override]
        rows, envs = self.sample_windows(batch_size)
        return self.get_windows(rows, envs, env)

    def get_windows(self, rows: np.ndarray, envs: np.ndarray, env: Optional[VecNormalize] = None):
        """Gather the windows at ``rows`` (H, B) of columns ``envs`` (B,) as a time-major batch."""
        e = envs[None, :]
        obs = self.observations[rows, e]  # (H, B, ...)
        last_next = self.next_observations[rows[-1], envs][None]
        observations = np.concatenate([obs, last_next], axis=0)
        observations = self._normalize_obs(observations.reshape(*observations.shape[:2], -1), env)
        rewards = self._normalize_reward(self.rewards[rows, e][..., None], env)
        terminated = (self.dones[rows, e] * (1.0 - self.timeouts[rows, e]))[..., None]
        data = (
            observations,
            self.actions[rows, e],
            rewards,
            terminated,
            self.plan_means[rows, e],
            self.plan_stds[rows, e],
            self.has_plan[rows, e][..., None],
        )
        return POMPCReplayBufferSamples(*self._to_device(data), rows, envs)

    def _to_device(self, arrays: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
        """The arrays as float32 tensors on ``self.device`` through ONE host → device copy.

        They are packed into one host array, copied and split into views on the device. A blocking copy to a GPU
        (SB3's ``to_torch``) waits for every kernel queued before it, once per array: seven stalls per update. On
        CUDA the packed array is page-locked memory from PyTorch's caching host allocator and the copy is
        ``non_blocking``: the allocator keeps the block until the copy has run, so nothing waits. On CPU the tensors
        share the packed array's memory (no copy).
        """
        sizes = [a.size for a in arrays]
        host = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=self.device.type == "cuda")
        packed = host.numpy()
        offset = 0
        for a, n in zip(arrays, sizes):
            packed[offset : offset + n] = a.reshape(-1)  # casts to float32 in the copy
            offset += n
        flat = host.to(self.device, non_blocking=True)
        return [chunk.view(a.shape) for chunk, a in zip(flat.split(sizes), arrays)]
