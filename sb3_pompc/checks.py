"""Input checks of POMPC: the spaces it supports, Dict observations it flattens, saved-model files, and the
transitions an environment returns. Each raises a ValueError that names the problem and what is supported, before
anything reaches the networks or the replay buffer."""

from __future__ import annotations

import math
import pathlib
import warnings
import zipfile
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["check_spaces", "prepare_env", "flatten_dict_obs", "check_model_file", "check_transition",
           "check_replay_buffer_kwargs", "RewardScaleCheck"]


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """Raise a clear error for spaces POMPC does not support."""
    if not isinstance(action_space, spaces.Box):
        raise ValueError(
            f"POMPC supports continuous Box action spaces only, got {type(action_space).__name__} ({action_space}). "
            "Discrete, MultiDiscrete and MultiBinary actions are not supported."
        )
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        raise ValueError(f"POMPC needs finite action bounds, got low={action_space.low}, high={action_space.high}")
    width = np.asarray(action_space.high, np.float64) - np.asarray(action_space.low, np.float64)
    if not (np.all(width > 0) and np.all(np.isfinite(width.astype(action_space.dtype)))):
        raise ValueError(
            f"POMPC scales actions to [-1, 1] and needs low < high with a finite width in every dimension, got "
            f"low={action_space.low}, high={action_space.high}"
        )
    if isinstance(observation_space, spaces.Dict):
        raise ValueError(
            "POMPC needs a flat Box observation space; Dict observations are flattened automatically when a "
            "gymnasium.Env (not a VecEnv) of Box entries is passed, or wrap the env with "
            "gymnasium.wrappers.FlattenObservation. For DMControl use the 'dmc/<domain>-<task>-v0' ids."
        )
    if not isinstance(observation_space, spaces.Box):
        raise ValueError(f"POMPC supports Box observation spaces only, got {observation_space}")
    if len(observation_space.shape) > 2 or (observation_space.dtype == np.uint8 and len(observation_space.shape) == 2):
        raise ValueError(
            f"POMPC supports state (vector) observations only; got an image-like space {observation_space}. "
            "Use state observations (e.g. the 'dmc/<domain>-<task>-v0' ids)."
        )


def prepare_env(env: Any, check: bool = True) -> tuple[Any, Optional[spaces.Dict]]:
    """An env id made with ``gym.make``; a gymnasium.Env with Dict observations of Box entries flattened like
    ``FlattenObservation``; then the spaces checked.

    :param env: an env id, a gymnasium.Env, an SB3 VecEnv or None
    :param check: check the spaces (``load`` leaves that to SB3's comparison with the saved spaces)
    :return: the env to train on, and the Dict space it had if it is a ``FlattenObservation`` (``predict`` flattens such
        observations the same way)
    """
    if isinstance(env, str):
        env = gym.make(env)
    if isinstance(env, gym.Env) and isinstance(env.observation_space, spaces.Dict):
        if not all(isinstance(s, spaces.Box) for s in env.observation_space.spaces.values()):
            raise ValueError(f"POMPC can flatten Dict observations of Box entries only, got {env.observation_space}")
        env = gym.wrappers.FlattenObservation(env)
    if env is not None and check:  # before SB3's assert, so that the error is a ValueError
        check_spaces(env.observation_space, env.action_space)
    flattened = isinstance(env, gym.wrappers.FlattenObservation)
    return env, env.env.observation_space if flattened else None


def flatten_dict_obs(space: spaces.Dict, observation: dict[str, Any]) -> np.ndarray:
    """One Dict observation, or a batch of them, flattened like ``FlattenObservation`` (keys in the space's order)."""
    parts = [np.asarray(observation[key], dtype=sub.dtype) for key, sub in space.spaces.items()]
    if all(p.shape == sub.shape for p, sub in zip(parts, space.spaces.values())):
        return np.concatenate([p.reshape(-1) for p in parts])
    n = parts[0].shape[0]
    return np.concatenate([p.reshape(n, -1) for p in parts], axis=1)


def check_model_file(path: Any) -> None:
    """A clear ValueError for a file that is not a complete SB3 model archive (truncated or corrupted copy); SB3
    itself would report a truncated file as ``AssertionError: No data found``. Only reads the file."""
    if not isinstance(path, (str, pathlib.Path)):
        return
    file = pathlib.Path(path)
    if not file.exists() and pathlib.Path(f"{file}.zip").exists():  # SB3 adds the suffix the same way
        file = pathlib.Path(f"{file}.zip")
    if not file.is_file():
        return  # SB3 raises FileNotFoundError
    try:
        with zipfile.ZipFile(file) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile as e:
        raise ValueError(f"{file} is not a saved model (not a zip archive): is it truncated or corrupted?") from e
    missing = sorted({"data", "policy.pth"} - names)
    if missing:
        raise ValueError(f"{file} is not a complete saved model ({missing} missing): is it truncated or corrupted?")


def check_transition(action: np.ndarray, last_obs: Union[np.ndarray, Any], new_obs: np.ndarray, reward: np.ndarray,
                     dones: np.ndarray, infos: list[dict[str, Any]], timestep: int) -> None:
    """Refuse a transition that would put a non-finite number into the replay buffer.

    :param action: the action about to be stored (a callback may have changed it)
    :param last_obs: the observation the action was taken in
    :param new_obs: the next observations (n_envs, ...)
    :param reward: the rewards (n_envs,)
    :param dones: episode ends (n_envs,)
    :param infos: the env infos (terminal observations of finished episodes)
    :param timestep: the algorithm's timestep, for the message
    """
    if not np.all(np.isfinite(action)):
        raise ValueError(f"non-finite action {action} at timestep {timestep} (changed by a callback?)")
    if not np.all(np.isfinite(new_obs)):
        bad = np.where(~np.all(np.isfinite(np.asarray(new_obs).reshape(len(dones), -1)), axis=1))[0]
        raise ValueError(
            f"the environment returned a non-finite observation (NaN or inf) in env(s) {bad.tolist()} at "
            f"timestep {timestep}; training stopped before it reached the replay buffer"
        )
    if not np.all(np.isfinite(reward)):
        raise ValueError(f"the environment returned a non-finite reward {reward} at timestep {timestep}")
    # SB3 stores the terminal observation of a finished episode as next_obs, and the first obs comes from reset()
    for i, (done, info) in enumerate(zip(dones, infos)):
        terminal = info.get("terminal_observation") if done else None
        if terminal is not None and not np.all(np.isfinite(terminal)):
            raise ValueError(
                f"the environment returned a non-finite terminal observation (NaN or inf) in env {i} at timestep "
                f"{timestep}; training stopped before it reached the replay buffer"
            )
    if isinstance(last_obs, np.ndarray) and not np.all(np.isfinite(last_obs)):
        raise ValueError(
            f"the environment returned a non-finite observation (NaN or inf) from reset() before timestep "
            f"{timestep}; training stopped before it reached the replay buffer"
        )


def check_replay_buffer_kwargs(replay_buffer_kwargs: Optional[dict[str, Any]], horizon: int) -> None:
    """The buffer samples windows of the planning horizon: a different ``replay_buffer_kwargs["horizon"]`` would
    train on other windows than the planner plans, so it is refused."""
    given = (replay_buffer_kwargs or {}).get("horizon", horizon)
    if given != horizon:
        raise ValueError(
            f"replay_buffer_kwargs['horizon'] ({given}) differs from horizon ({horizon}): the buffer's windows must "
            "be the planning horizon; set horizon only"
        )


class RewardScaleCheck:
    """Warns, once each, when the rewards fall outside what the critics can represent. Values live on a two-hot
    support of ``num_bins`` bins over symlog([−symexp(vmax), symexp(vmax)]), ±22,025 for vmax = 10:

    - a return of up to ``max |r| / (1 − γ)`` beyond that range is clipped, and the reward head clips ``r`` itself,
      so the agent cannot tell large rewards apart (checked at every stored transition);
    - returns of at most 0.1 vanish: bins are 0.2 wide in symlog space, and MPPI weighs trajectories by
      ``exp(temperature · value)``, so the agent acts as with zero reward (checked when learning starts).

    :param gamma: the discount
    :param vmax: the support's symlog bound
    """

    def __init__(self, gamma: float, vmax: float = 10.0) -> None:
        self.horizon_scale = 1.0 / max(1.0 - gamma, 1e-3)
        self.limit = math.expm1(vmax)
        self.largest = 0.0
        self.warned: set[str] = set()

    def observe(self, reward: np.ndarray) -> None:
        """Record the rewards of one env step; warn at once if their returns leave the support."""
        self.largest = max(self.largest, float(np.max(np.abs(reward))))
        if self.largest * self.horizon_scale > self.limit and "large" not in self.warned:
            self.warned.add("large")
            warnings.warn(
                f"a reward of {self.largest:.3g} per step gives returns up to ~{self.largest * self.horizon_scale:.3g}"
                f", outside the value support (±{self.limit:,.0f}): rewards and values are clipped, and larger "
                "rewards look the same to the agent. Scale the rewards down, e.g. VecNormalize(env, norm_reward=True)"
                " or gymnasium.wrappers.TransformReward(env, lambda r: c * r).", UserWarning, stacklevel=3)

    def before_learning(self) -> None:
        """At the first update: warn if every reward so far is non-zero but too small to be seen."""
        if 0.0 < self.largest * self.horizon_scale < 0.1 and "small" not in self.warned:
            self.warned.add("small")
            warnings.warn(
                f"the rewards so far are at most {self.largest:.3g} per step, returns of at most "
                f"~{self.largest * self.horizon_scale:.3g}: too small for the value support (two-hot bins 0.2 wide "
                "in symlog space) and for MPPI's weights exp(temperature·value), so the agent would act as with "
                "zero reward. Scale the rewards up, e.g. VecNormalize(env, norm_reward=True) or "
                "gymnasium.wrappers.TransformReward(env, lambda r: c * r).", UserWarning, stacklevel=3)
