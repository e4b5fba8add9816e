"""Input checks of POMPC: the spaces it supports, Dict observations it flattens, saved-model files, and the
transitions an environment returns. Each raises a ValueError that names the problem and what is supported, before
anything reaches the networks or the replay buffer."""

from __future__ import annotations

import pathlib
import zipfile
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["check_spaces", "prepare_env", "flatten_dict_obs", "check_model_file", "check_transition"]


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """Raise a clear error for spaces POMPC does not support."""
    if not isinstance(action_space, spaces.Box):
        raise ValueError(
            f"POMPC supports continuous Box action spaces only, got {type(action_space).__name__} ({action_space}). "
            "Discrete, MultiDiscrete and MultiBinary actions are not supported."
        )
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        raise ValueError(f"POMPC needs finite action bounds, got low={action_space.low}, high={action_space.high}")
    if isinstance(observation_space, spaces.Dict):
        raise ValueError(
            "POMPC needs a flat Box observation space; Dict observations are flattened automatically when a "
            "gymnasium.Env (not a VecEnv) of Box entries is passed, or wrap the env with "
            "gymnasium.wrappers.FlattenObservation. For DMControl use the 'dmc/<domain>-<task>-v0' ids."
        )
    if not isinstance(observation_space, spaces.Box):
        raise ValueError(f"POMPC supports Box observation spaces only, got {observation_space}")
    if observation_space.dtype == np.uint8 or len(observation_space.shape) > 2:
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
