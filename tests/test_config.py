"""POMPCConfig: one resolved, saved configuration; the λ logic as named properties; models saved by older code."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import TINY_ALGO

from sb3_pompc import POMPC
from sb3_pompc.config import POMPCConfig, resolve_config

DATA = Path(__file__).parent / "data"
PACKAGE = Path(__file__).parents[1] / "sb3_pompc"


def test_constructor_defaults_are_the_config_defaults() -> None:
    """Each setting has one default: POMPC's keyword arguments repeat POMPCConfig's, and cannot drift apart."""
    params = inspect.signature(POMPC.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(POMPCConfig) if f.name in params}
    assert len(fields) == len(dataclasses.fields(POMPCConfig)) - 2  # all but detect_termination and auto_resolved
    for name, default in fields.items():
        assert params[name].default == default, name


def test_resolution_order_preset_then_size_then_arguments_then_env() -> None:
    env = gym.make("Pendulum-v1")  # 200-step episodes, 1-D action
    c = resolve_config("bmpc", env, model_size=1, num_q=None, mlp_dim=64)
    assert c.critic == "v" and c.kl_mode == "infinite" and c.prior == "planner"  # the preset
    assert c.num_q == 2 and c.latent_dim == 128 and c.enc_dim == 256  # the size (num_q: BMPC's, not the size's)
    assert c.mlp_dim == 64  # the explicit argument wins over the size
    assert c.gamma == pytest.approx(0.975) and c.learning_starts == 1000 and c.pretrain_updates == 1000
    assert c.iterations == 6 and c.episodic is False and c.detect_termination
    assert {"gamma", "learning_starts", "critic", "latent_dim"} <= set(c.auto_resolved)
    assert "mlp_dim" not in c.auto_resolved
    c5 = resolve_config("tdmpc2", env, model_size=1)
    assert c5.num_q == 2 and c5.policy_squash == "tanh"  # model size 1 sets 2 heads for TD-MPC2
    explicit = resolve_config("pompc", env, gamma=0.9, learning_starts=7, iterations=2, episodic=True)
    assert (explicit.gamma, explicit.learning_starts, explicit.pretrain_updates, explicit.iterations) == (0.9, 7, 7, 2)
    assert explicit.episodic is True and not explicit.detect_termination


@pytest.mark.parametrize("kwargs, message", [
    (dict(prior="nope"), "unknown prior"),
    (dict(horizon=0), "horizon must be"),
    (dict(kl_coef="inf", kl_value=True), "kl_value=True needs"),
    (dict(gamma=1.5), "gamma must be"),
    (dict(learning_starts=-1), "learning_starts must be"),
    (dict(update_dtype="float16"), "update_dtype must be one of"),
    (dict(num_elites=1000), "num_elites"),
    (dict(not_a_setting=1), "unknown POMPC settings"),
])
def test_every_check_lives_in_resolve_config(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_config("pompc", None, **kwargs)


@pytest.mark.parametrize("kl_coef, prior, mode, latents, kl_steps", [
    (0.0, "planner", "zero", 4, 2),  # TD-MPC2: all H + 1 latents
    (1.0, "planner", "finite", 3, 2),  # π^P on the first H latents only
    (math.inf, "planner", "infinite", 3, 2),
    ("auto", "planner", "learned", 3, 2),
    (1.0, "reverse", "finite", 4, 3),  # a learned prior is defined at every latent
    ("auto_0.5", "forward", "learned", 4, 3),
])
def test_kl_mode_and_latent_ranges(kl_coef, prior, mode, latents, kl_steps) -> None:
    c = resolve_config("pompc", None, kl_coef=kl_coef, prior=prior, horizon=3)
    assert (c.kl_mode, c.policy_latents, c.kl_value_steps) == (mode, latents, kl_steps)
    assert c.kl_reference == ("planner" if prior == "planner" else "prior")


def test_config_is_public_printed_and_round_trips(tmp_path: Path, capsys) -> None:
    model = POMPC("MlpPolicy", "Pendulum-v1", verbose=1, **TINY_ALGO)
    printed = capsys.readouterr().out
    assert "POMPC settings" in printed and "* gamma" in printed and "0.975" in printed
    assert isinstance(model.config, POMPCConfig) and model.horizon == model.config.horizon
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.horizon = 5  # type: ignore[misc]
    model.save(tmp_path / "m")
    loaded = POMPC.load(tmp_path / "m")
    assert isinstance(loaded.config, POMPCConfig) and loaded.config == model.config


def test_model_saved_by_earlier_code_loads_and_predicts_the_same() -> None:
    """A model saved when each setting was an attribute of the algorithm: its config is rebuilt from them, and it
    predicts what it predicted when it was saved (same planner noise)."""
    expected = np.load(DATA / "legacy_pompc_pendulum_expected.npz")
    model = POMPC.load(DATA / "legacy_pompc_pendulum.zip", device="cpu")
    c = model.config
    assert (c.horizon, c.num_samples, c.latent_dim, c.prior, c.kl_mode) == (3, 16, 16, "reverse", "finite")
    assert c.simnorm_layout == "strided" and "cfg" not in model.__dict__
    with torch.no_grad():
        z = model.policy.model.encode(torch.as_tensor(expected["obs"])).numpy()
    np.testing.assert_array_equal(z, expected["latent"])
    torch.manual_seed(123)
    action, state = model.predict(expected["obs"], deterministic=False)
    np.testing.assert_allclose(action, expected["action"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state, expected["state"], rtol=1e-6, atol=1e-6)


def test_files_stay_small_and_the_constructor_only_delegates() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 450, {k: v for k, v in sizes.items() if v > 450}
    source = inspect.getsource(POMPC.__init__).splitlines()
    body = len(source) - next(i for i, line in enumerate(source) if line.strip().startswith(") -> None:")) - 1
    assert body <= 80


def test_the_suite_runs_on_the_cpu_even_where_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest maps ``device="auto"`` to the CPU, so that a CUDA machine runs the CPU tests where they are meant."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert POMPC("MlpPolicy", "Pendulum-v1", **TINY_ALGO).device.type == "cpu"
