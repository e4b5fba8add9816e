"""The global random streams saved with a model, so that a seeded run that is saved, loaded and continued draws
exactly the numbers an uninterrupted run would."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

__all__ = ["get_rng_states", "set_rng_states"]


def get_rng_states(action_space: spaces.Space, device: torch.device) -> dict[str, Any]:
    """The RNG states of python, numpy, torch (CPU, and CUDA for a CUDA device) and of the action space (the
    random warm-up samples from it).

    :param action_space: the algorithm's action space
    :param device: the algorithm's device
    """
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "action_space": action_space.np_random.bit_generator.state,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], action_space: spaces.Space, device: torch.device) -> None:
    """Continue the streams of :func:`get_rng_states` (the env's own RNG cannot be saved in general).

    :param states: what :func:`get_rng_states` returned
    :param action_space: the algorithm's action space
    :param device: the algorithm's device
    """
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    action_space.np_random.bit_generator.state = states["action_space"]
    if "cuda" in states and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"], device)
