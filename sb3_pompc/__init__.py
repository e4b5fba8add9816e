"""sb3-pompc: PO-MPC (KL-regularised learning to plan with adaptive priors) for Stable-Baselines3."""

from sb3_pompc.envs import register_dmc_envs
from sb3_pompc.policies import MlpPolicy, POMPCPolicy
from sb3_pompc.pompc import POMPC
from sb3_pompc.buffers import POMPCReplayBuffer, POMPCReplayBufferSamples

__version__ = "0.1.0"
__all__ = ["POMPC", "POMPCPolicy", "MlpPolicy", "POMPCReplayBuffer", "POMPCReplayBufferSamples", "register_dmc_envs"]

register_dmc_envs()
