"""``compile=True`` plans through torch.compile and gives the eager numbers (same pre-drawn noise)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from sb3_pompc import POMPC
from sb3_pompc.benchmark import fill_replay_buffer
from sb3_pompc.policies import POMPCPolicy
from sb3_pompc.speedups import AUTOCAST_DTYPES, autocast, autocast_fn

# on the CPU: a GPU compiles with other options (CUDA graphs, no fallback_random), see tests/test_cuda.py
TINY = dict(model_size=None, latent_dim=16, mlp_dim=16, enc_dim=16, num_q=2, num_samples=16, num_elites=4,
            num_pi_trajs=2, iterations=2, horizon=2, learning_starts=10, pretrain_updates=0, device="cpu")


def test_compiled_plan_equals_eager(randomize) -> None:
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, compile=True, **TINY)
    policy = model.policy
    randomize(policy.model, 0.3)  # non-zero rewards and values, so elites and weights are not trivial
    obs = torch.randn(3, 3)
    warm = torch.rand(3, 2, 1) * 2 - 1
    noise = policy.planner.draw_noise(3, 1, policy.model.num_q, obs.device)
    compiled = policy.plan(obs, warm, deterministic=False, noise=noise)
    assert policy._compiled_plan is not None
    eager = policy.plan(obs, warm, deterministic=False, noise=noise, eager=True)
    assert eager.value.abs().max() > 1e-3, "the randomised model should give non-zero plan values"
    for name in ("action", "plan_mean", "plan_std", "mean", "value"):
        a, b = getattr(compiled, name), getattr(eager, name)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"{name}: compiled {a} != eager {b}"


def test_each_policy_compiles_its_own_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo keys its graph cache, and its ``recompile_limit``, on the code object of the compiled function; past
    the limit a plan runs eagerly with one warning. Each policy compiles its own copy of the plan and a cold start is
    a zero warm start (the same numbers), so each policy takes one graph per batch size and ``deterministic``:
    policies of different sizes (whose graphs differ), each planning 2 batch sizes cold and warm-started,
    deterministic or not, stay within a limit of 4 graphs (Dynamo's tracing and caching with the "eager" backend,
    no Inductor)."""
    import torch._dynamo

    monkeypatch.setattr(POMPCPolicy, "plan_compile_backend", "eager")
    # Dynamo's own patch (monkeypatch would delete the settings on undo: they live outside the module's __dict__)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=4):
        _plan_with_several_policies()


def _plan_with_several_policies() -> None:
    for num_samples in (16, 24):
        kwargs = dict(TINY, iterations=1, num_samples=num_samples)
        policy = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, compile=True, **kwargs).policy
        for n in (1, 2):
            for deterministic in (False, True):
                obs = torch.randn(n, 3)
                noise = policy.planner.draw_noise(n, 1, policy.model.num_q, obs.device)
                cold = policy.plan(obs, None, deterministic, noise=noise)
                eager = policy.plan(obs, None, deterministic, noise=noise, eager=True)
                for name in ("action", "plan_mean", "plan_std", "mean", "value"):  # zero warm start == none
                    torch.testing.assert_close(getattr(cold, name), getattr(eager, name), atol=1e-6, rtol=1e-6)
                policy.plan(obs, cold.mean, deterministic)


@pytest.mark.parametrize("update_dtype", ["float32", "bfloat16"])
def test_compiled_update_equals_eager(update_dtype) -> None:
    """``compile=True`` compiles the update's forward passes: one update from the same parameters, batch and RNG
    state gives the eager losses and parameters (float tolerance), in fp32 and under bf16 autocast."""
    kwargs = dict(TINY, seed=0, batch_size=8, learning_starts=0, update_dtype=update_dtype)
    env = gym.make("Pendulum-v1")
    eager = POMPC("MlpPolicy", env, compile=False, **kwargs)
    compiled = POMPC("MlpPolicy", env, compile=True, **kwargs)
    compiled.policy.load_state_dict(eager.policy.state_dict())
    before = {k: v.detach().clone() for k, v in eager.policy.state_dict().items()}
    results = []
    for model in (eager, compiled):
        fill_replay_buffer(model, seed=0)
        model.policy.set_training_mode(True)
        np.random.seed(0)
        torch.manual_seed(0)
        logs = [model.update(8) for _ in range(2)]
        results.append((logs, {k: v.detach().clone() for k, v in model.policy.state_dict().items()}))
    (logs_e, params_e), (logs_c, params_c) = results
    tol = dict(atol=1e-4, rtol=1e-4) if update_dtype == "float32" else dict(atol=2e-2, rtol=2e-2)
    for log_e, log_c in zip(logs_e, logs_c):
        assert sorted(log_e) == sorted(log_c)
        for key in log_e:
            torch.testing.assert_close(log_c[key].float(), log_e[key].float(), **tol, msg=lambda m: f"{key}: {m}")
    for key, value in params_e.items():
        torch.testing.assert_close(params_c[key], value, **tol, msg=lambda m: f"{key}: {m}")
    moved = [k for k in ("model.pi.net.0.weight", "model.dynamics.0.weight", "model.prior.net.0.weight")
             if not torch.equal(params_e[k], before[k])]
    assert len(moved) == 3, f"the updates should change π_s, the dynamics and the prior, changed: {moved}"


def test_update_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match="update_dtype must be one of"):
        POMPC("MlpPolicy", gym.make("Pendulum-v1"), update_dtype="float16", **TINY)


def test_autocast_helpers_by_dtype_name() -> None:
    """``autocast(device, name)`` is ``torch.autocast`` with the named dtype (nothing for float32);
    ``autocast_fn(fn, device, name)`` is ``fn`` called inside it, with ``fn``'s name and docstring."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    for name, dtype in AUTOCAST_DTYPES.items():
        with autocast("cpu", name):
            inside = (a @ b).dtype
            assert torch.is_autocast_enabled("cpu") == (dtype != torch.float32)
        assert inside == dtype, name
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            expected = a @ b

        def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            """x @ y"""
            return x @ y

        wrapped = autocast_fn(matmul, "cpu", name)
        assert (wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__) == ("matmul", "x @ y", matmul)
        out = wrapped(a, y=b)
        assert out.dtype == dtype and torch.equal(out, expected) and not torch.is_autocast_enabled("cpu")
    with pytest.raises(KeyError):
        autocast("cpu", "float16")


def test_compile_without_cxx_compiler_fails_before_training(monkeypatch) -> None:
    import torch._inductor.cpp_builder as cpp_builder

    def missing() -> str:
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        POMPC("MlpPolicy", gym.make("Pendulum-v1"), compile=True, **TINY)
    POMPC("MlpPolicy", gym.make("Pendulum-v1"), compile=False, **TINY)  # eager needs none


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch) -> None:
    """bf16 on a CPU that emulates it warns before training and names the setting; fp32, or a CPU with native
    bf16, does not warn."""
    import warnings

    import sb3_pompc.speedups as speedups

    assert isinstance(speedups.cpu_has_native_bf16(), bool)  # this CPU's answer, whichever it is
    env = gym.make("Pendulum-v1")
    monkeypatch.setattr(speedups, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="update_dtype='bfloat16' on a CPU without native bf16") as record:
        POMPC("MlpPolicy", env, update_dtype="bfloat16", **TINY)
    assert not any("planner_dtype" in str(w.message) for w in record)  # only the setting that asks for bf16
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*native bf16")
        POMPC("MlpPolicy", env, **TINY)  # fp32
        monkeypatch.setattr(speedups, "cpu_has_native_bf16", lambda: True)
        POMPC("MlpPolicy", env, planner_dtype="bf16", update_dtype="bfloat16", **TINY)


def test_compiled_plan_returns_copies_that_survive_a_replay() -> None:
    """On CUDA the compiled plan runs as a CUDA graph whose outputs are overwritten by its next replay (e.g. an
    ``EvalCallback``'s ``predict`` between two env steps). ``plan`` returns copies, so the warm start kept by
    ``learn`` and the action of ``policy(obs)`` survive: here a "replay" overwrites every tensor the compiled
    function returned, and what the callers kept must not change."""
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, compile=True, **dict(TINY, learning_starts=0))
    policy = model.policy
    returned = []

    def compiled_plan(*args):  # stands in for torch.compile's function (nothing is compiled in this test)
        result = policy._plan_core(*args)
        returned.append(result)
        return result

    policy._compiled_plan = compiled_plan
    model._setup_learn(total_timesteps=2)  # resets the env: _last_obs
    fill_replay_buffer(model)
    model.train(gradient_steps=0, batch_size=8)  # the pretraining burst (no updates here): planning starts
    model._sample_action(learning_starts=0)
    kept = model._plan_mean.clone()
    assert len(returned) == 1 and returned[-1].mean.abs().max() > 0
    for tensor in returned[-1]:
        tensor.fill_(123.0)  # what a replay of the graph does to the previous outputs
    torch.testing.assert_close(model._plan_mean, kept)
    # SB3's stateless path, policy(obs)
    action = policy(torch.zeros(1, 3))
    before = action.clone()
    assert len(returned) == 2
    for tensor in returned[-1]:
        tensor.fill_(0.5)
    torch.testing.assert_close(action, before)
