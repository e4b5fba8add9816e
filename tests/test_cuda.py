"""The GPU checks, skipped without a CUDA device (the rest of the suite runs on the CPU, ``tiny_algo``'s device).

On a GPU the plan is compiled with CUDA graphs ("reduce-overhead"), a non-finite loss is caught on the device
(:class:`~sb3_pompc.update.NonFiniteGuard`) and the reanalyze write-back waits on a CUDA event: each is checked here
as it runs on the device. ``tests/test_compile.py``, ``tests/test_host_sync.py`` and ``tests/test_gpu_safety.py``
check the same code paths on the CPU.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import pytest
import torch

from sb3_pompc import POMPC, update
from sb3_pompc.benchmark import check_syncs, make_model
from sb3_pompc.reanalyze import record_copy_event

from conftest import tiny_algo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY_PLAN = dict(model_size=None, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2, num_samples=32, num_elites=4,
                 num_pi_trajs=2, iterations=2, horizon=2, learning_starts=10, pretrain_updates=0, device="cuda")


def _compiled_policy(randomize: Any, seed: int = 0):
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=seed, compile=True, **TINY_PLAN)
    randomize(model.policy.model, 0.3)  # non-zero rewards and values: elites and weights are not trivial
    return model.policy


def test_compiled_plan_equals_eager_on_cuda(randomize) -> None:
    """The compiled plan (Inductor, CUDA graphs) gives the eager numbers from the same noise, warm-started or not,
    for the first (recorded) and later (replayed) calls."""
    policy = _compiled_policy(randomize)
    obs = torch.randn(3, 3, device="cuda")
    warm = None
    for _ in range(4):  # compile and warm-up, recording, replays
        noise = policy.planner.draw_noise(3, 1, policy.model.num_q, obs.device)
        compiled = policy.plan(obs, warm, deterministic=False, noise=noise)
        eager = policy.plan(obs, warm, deterministic=False, noise=noise, eager=True)
        for name in ("action", "plan_mean", "plan_std", "mean", "value"):
            torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), atol=1e-3, rtol=1e-3,
                                       msg=lambda m: f"{name}: {m}")
        warm = compiled.mean


def test_compiled_plan_outputs_survive_the_next_replay(randomize) -> None:
    """A replay of the plan's CUDA graph overwrites the graph's outputs; ``plan`` returns copies, so a result kept
    by the caller (the warm start of ``learn``, an action) does not change when the next plan replays."""
    policy = _compiled_policy(randomize)
    obs = torch.randn(2, 3, device="cuda")
    warm = None
    for _ in range(3):  # compile and warm-up, recording, first replay
        warm = policy.plan(obs, warm).mean
    kept = policy.plan(obs, warm)
    before = [t.clone() for t in kept]
    policy.plan(torch.randn(2, 3, device="cuda") * 3, torch.rand_like(warm))  # a replay with other inputs
    torch.cuda.synchronize()
    for old, now in zip(before, kept):
        assert torch.equal(old, now)


def test_replayed_plan_and_update_never_sync() -> None:
    """The benchmark's ``--check-syncs`` on a compiled agent: replays of the plan's CUDA graph and updates (lazy
    reanalyze included) under ``torch.cuda.set_sync_debug_mode("error")``."""
    model = make_model(None, 2, device="cuda", compile=True, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2,
                       num_samples=32, num_elites=4, num_pi_trajs=2, iterations=2, horizon=2, reanalyze_interval=2,
                       reanalyze_batch_size=2)
    check_syncs(model, batch_size=8)


def test_non_finite_loss_keeps_the_last_finite_weights_on_cuda() -> None:
    """A NaN world-model loss in the 3rd update of the pretraining burst: no step after it changes a weight, and the
    log point raises naming the loss and the update."""
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0,
                  **tiny_algo(device="cuda", batch_size=8, learning_starts=20, pretrain_updates=6))
    original, calls, snapshot = model._update_fns["world_model"], [], {}

    def poisoned(*args: Any, **kwargs: Any):
        calls.append(1)
        if len(calls) == 3:
            snapshot.update({k: v.detach().clone() for k, v in model.policy.state_dict().items()})
        loss, *rest = original(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss, *rest)

    model._update_fns["world_model"] = poisoned
    with pytest.raises(FloatingPointError, match="non-finite world-model loss at update 2"):
        model.learn(30)
    assert update.nonfinite_guard(model.policy, active=True) is not None  # checked on the device, not the host
    for key, value in model.policy.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


def test_copy_event_waits_for_the_copy() -> None:
    """The write-back event of a non-blocking copy is recorded on the tensor's device and completes with it."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU, not necessarily the current one
    source = torch.randn(1000, device=device)
    host = source.to("cpu", non_blocking=True)
    event = record_copy_event(source)
    event.synchronize()
    assert event.query() and torch.equal(host, source.cpu())
