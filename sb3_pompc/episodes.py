"""The episode length of an environment, whichever way it was set (:func:`get_episode_length`).

Only Gymnasium-style attributes are read: nothing here imports dm_control, MuJoCo or Stable-Baselines3.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def _positive_int(value: Any) -> Optional[int]:
    """``value`` as a positive int, or ``None`` (missing, ``None``, zero, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or not value > 0:
        return None
    return int(value)


def _gym_episode_length(env: Any) -> Optional[int]:
    """The smallest limit along a Gymnasium wrapper chain (see :func:`get_episode_length`)."""
    limits, node = [], env
    for _ in range(1000):  # the chain of ``.env`` attributes of the wrappers, outermost first
        own = getattr(node, "__dict__", {})
        limits.append(_positive_int(own.get("_max_episode_steps")))  # a TimeLimit wrapper
        inner = own.get("env")
        if inner is None or inner is node:
            break
        node = inner
    limits.append(_positive_int(getattr(getattr(env, "unwrapped", node), "episode_length", None)))
    active = [n for n in limits if n is not None]
    if active:
        return min(active)
    return _positive_int(getattr(getattr(env, "spec", None), "max_episode_steps", None))


def _remote_attr(venv: Any, name: str) -> Any:
    """``name`` of the first sub-environment of an SB3 VecEnv (``get_wrapper_attr`` semantics), or ``None``."""
    try:
        if hasattr(venv, "has_attr") and not venv.has_attr(name):
            return None
        return venv.get_attr(name, indices=[0])[0]
    except (AttributeError, KeyError, IndexError):
        return None


def get_episode_length(env: Any) -> Optional[int]:
    """The number of agent steps after which an episode of ``env`` is truncated, or ``None`` when unknown.

    Every way of setting the length is read: the ``episode_length`` of the unwrapped environment (the ``dmc/...``
    ids, ``gym.make("dmc/...", episode_length=N)``), the ``TimeLimit`` of ``gym.make(id, max_episode_steps=N)`` or of
    a registered default, and ``gymnasium.wrappers.TimeLimit(env, N)`` applied by hand, through any other wrappers.
    When several are active, the smallest wins: it is the one that truncates episodes first (a hand-applied
    ``TimeLimit(env, 500)`` around Pendulum's registered 200-step limit gives 200, ``TimeLimit(env, 50)`` gives 50).
    ``env.spec.max_episode_steps`` is the fallback when the wrapper chain shows no limit.

    Stable-Baselines3 ``VecEnv`` objects are read through their wrappers (``VecNormalize``, ``VecMonitor``, ...) at
    their first sub-environment: in-process ones (``DummyVecEnv``) completely; for ``SubprocVecEnv`` only what
    ``get_attr`` can reach: the outermost ``TimeLimit``, the ``episode_length`` and the spec.

    :param env: a Gymnasium environment (possibly wrapped) or a ``VecEnv``
    :return: the episode length
    """
    venv = env
    for _ in range(100):  # VecEnvWrapper → wrapped VecEnv
        inner = getattr(venv, "venv", None)
        if inner is None or inner is venv:
            break
        venv = inner
    envs = getattr(venv, "envs", None)
    if isinstance(envs, (list, tuple)) and envs:  # DummyVecEnv (and Gymnasium's SyncVectorEnv)
        return _gym_episode_length(envs[0])
    if hasattr(venv, "get_attr") and hasattr(venv, "num_envs"):  # SubprocVecEnv and other out-of-process VecEnvs
        active = [n for n in (_positive_int(_remote_attr(venv, "_max_episode_steps")),
                              _positive_int(_remote_attr(venv, "episode_length"))) if n is not None]
        if active:
            return min(active)
        return _positive_int(getattr(_remote_attr(venv, "spec"), "max_episode_steps", None))
    return _gym_episode_length(env)


__all__ = ["get_episode_length"]
