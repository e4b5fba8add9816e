"""``compile=True`` plans through torch.compile and gives the eager numbers (same pre-drawn noise)."""

from __future__ import annotations

import gymnasium as gym
import torch

from sb3_pompc import POMPC

TINY = dict(model_size=None, latent_dim=16, mlp_dim=16, enc_dim=16, num_q=2, num_samples=16, num_elites=4,
            num_pi_trajs=2, iterations=2, horizon=2, learning_starts=10, pretrain_updates=0)


def test_compiled_plan_equals_eager(randomize) -> None:
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, compile=True, **TINY)
    policy = model.policy
    randomize(policy.model, 0.3)  # non-zero rewards and values, so elites and weights are not trivial
    obs = torch.randn(3, 3)
    warm = torch.rand(3, 2, 1) * 2 - 1
    noise = policy.planner.draw_noise(3, 1, policy.model.num_q, obs.device)
    compiled = policy.plan(obs, warm, deterministic=False, noise=noise)
    assert policy._compiled_plan is not None
    eager = policy._plan_core(obs, warm, False, noise, policy.planner, None)
    assert eager.value.abs().max() > 1e-3, "the randomised model should give non-zero plan values"
    for name in ("action", "plan_mean", "plan_std", "mean", "value"):
        a, b = getattr(compiled, name), getattr(eager, name)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"{name}: compiled {a} != eager {b}"
