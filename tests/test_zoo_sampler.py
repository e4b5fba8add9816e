"""The rl-zoo3 plugin's in-process parts (``sb3_pompc.zoo``): creating an Optuna storage from several workers at once,
the hyperparameter sampler and converter, the hook's patch targets, and the packaged ``hyperparams/*.yml`` files read
through rl-zoo3's ``ExperimentManager``. The zoo commands themselves run from a built wheel in ``test_zoo.py``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import gymnasium as gym
import optuna
import pytest
import torch
import yaml
from conftest import TINY_ALGO

from sb3_pompc import POMPC, zoo
from sb3_pompc.presets import CPU_SETTINGS, PRESETS

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
PACKAGED_YML = REPO / "sb3_pompc" / "hyperparams" / "pompc.yml"
TOP_LEVEL_YML = REPO / "hyperparams" / "pompc.yml"
TINY: dict[str, Any] = TINY_ALGO
# keys of a zoo yml entry that rl-zoo3 consumes itself (not POMPC keyword arguments)
ZOO_KEYS = {"n_timesteps", "policy", "n_envs", "normalize", "env_wrapper", "vec_env_wrapper", "frame_stack",
            "callback", "env_kwargs", "monitor_kwargs", "noise_type", "noise_std"}


# ------------------------------------------------------------------------------------------------ optuna storage
def _create_storage_at_a_barrier(url: str, barrier: Any, queue: Any) -> None:
    barrier.wait()
    try:
        zoo.create_storage(url)
        queue.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put(f"{type(exc).__name__}: {exc}")


def test_create_storage_is_safe_for_simultaneous_workers(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'fresh{attempt}.db'}"
        barrier, queue = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_create_storage_at_a_barrier, args=(url, barrier, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [queue.get(timeout=5) for _ in procs] == ["ok"] * 4
        assert optuna.create_study(storage=url, study_name="s").study_name == "s"  # a usable schema


# ------------------------------------------------------------------------------------------------ sampler (in-process)
def _sample(trial: Any, base: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    token = zoo._BASE_HYPERPARAMS.set(base if base is not None else dict(TINY))
    try:
        return zoo.sample_pompc_params(trial, 1, 1, {})
    finally:
        zoo._BASE_HYPERPARAMS.reset(token)


def _expected_lambda(params: dict[str, Any]) -> Any:
    """λ of a trial, written out: the preset's for the preset modes, α/(1 − α) for "alpha"."""
    mode = params["kl_mode"]
    if mode in ("tdmpc2", "bmpc"):
        return {"tdmpc2": 0.0, "bmpc": math.inf}[mode]
    if mode == "auto":
        return "auto"
    alpha = params["kl_alpha"]
    return math.inf if alpha == 1.0 else alpha / (1.0 - alpha)


def _check_invariants(kwargs: dict[str, Any], params: dict[str, Any]) -> None:
    mode, lam = params["kl_mode"], _expected_lambda(params)
    if mode in ("tdmpc2", "bmpc"):  # the preset fills λ, the prior and the critic
        assert kwargs["preset"] == mode and kwargs["kl_coef"] is kwargs["prior"] is kwargs["critic"] is None
    else:
        assert kwargs["preset"] == "pompc" and kwargs["critic"] is None and kwargs["prior"] in zoo.PRIORS
        assert kwargs["kl_coef"] == lam or (lam != "auto" and math.isclose(kwargs["kl_coef"], lam))
        assert lam != 0.0 or kwargs["prior"] == "planner"
    assert not (kwargs["kl_value"] and lam in (0.0, math.inf))  # never with λ = ∞ (invalid), nor λ = 0 (pointless)
    assert zoo.convert_pompc_params(params) == kwargs  # what --trial-id rebuilds from the stored params


def test_alpha_is_uniform_on_zero_one_with_both_ends() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"kl_mode": "alpha"})
    trial = study.ask()
    _sample(trial)
    dist = trial.distributions["kl_alpha"]
    assert (dist.low, dist.high, dist.log) == (0.0, 1.0, False) and dist.step is not None
    assert math.isclose(round(1.0 / dist.step) * dist.step, 1.0)  # both ends lie on the grid
    assert zoo.alpha_to_kl_coef(0.0) == 0.0 and zoo.alpha_to_kl_coef(1.0) == float("inf")
    assert zoo.alpha_to_kl_coef(0.5) == 1.0 and math.isclose(zoo.alpha_to_kl_coef(0.8), 4.0)
    with pytest.raises(ValueError):
        zoo.alpha_to_kl_coef(1.5)


def test_sampler_gives_valid_pompc_kwargs_for_many_trials() -> None:
    env = gym.make("Pendulum-v1")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen_modes, seen_critics = set(), set()
    for _ in range(40):
        trial = study.ask()
        kwargs = _sample(trial)
        _check_invariants(kwargs, trial.params)
        model = POMPC("MlpPolicy", env, **{**TINY, **kwargs}, seed=0)
        lam = _expected_lambda(trial.params)
        assert model.preset == kwargs["preset"] and model.horizon == kwargs["horizon"]
        assert model.kl_coef_init == (1.0 if lam == "auto" else lam)
        assert (model.policy.model.kl_critic is not None) == kwargs["kl_value"]
        assert model.policy.model.critic_type == ("v" if kwargs["preset"] == "bmpc" else "q")
        seen_modes.add(trial.params["kl_mode"])
        seen_critics.add(model.policy.model.critic_type)
        study.tell(trial, 0.0)
    assert seen_modes == set(zoo.KL_MODES) and seen_critics == {"q", "v"}


@pytest.mark.parametrize(
    "params",
    [
        dict(kl_mode="tdmpc2", horizon=1),
        dict(kl_mode="bmpc", horizon=3),
        dict(kl_mode="alpha", kl_alpha=0.0, horizon=2),
        dict(kl_mode="alpha", kl_alpha=0.02, prior="planner", kl_value=True, horizon=1),
        dict(kl_mode="alpha", kl_alpha=0.98, prior="forward", kl_value=True, horizon=5),
        dict(kl_mode="alpha", kl_alpha=1.0, prior="reverse", horizon=2),
        dict(kl_mode="auto", target_kl=0.05, prior="reverse", kl_value=False, horizon=2),
    ],
    ids=["tdmpc2-H1", "bmpc", "alpha0", "alpha-lo-kl_value-H1", "alpha-hi-forward-H5", "alpha1-reverse", "auto"],
)
def test_sampled_extremes_train(params: dict[str, Any]) -> None:
    """Every mode, and both ends of α, give kwargs that train, also over a zoo configuration whose λ, prior and
    critic contradict the trial's preset (the trial's None lets the preset fill them)."""
    fixed = optuna.trial.FixedTrial({**params, "learning_rate": 3e-4, "entropy_coef": 1e-4, "batch_size": 16,
                                     "num_samples": 32})
    kwargs = _sample(fixed)
    _check_invariants(kwargs, fixed.params)
    env = gym.make("Pendulum-v1", max_episode_steps=30)
    base = {**TINY, "pretrain_updates": 2, "kl_coef": 10.0, "prior": "forward", "critic": "v"}
    model = POMPC("MlpPolicy", env, **{**base, **kwargs}, seed=0)
    model.learn(60)
    assert model._n_updates == 2 + 10
    lam = _expected_lambda(params)
    assert model.kl_coef_init == (1.0 if lam == "auto" else lam)
    assert model.policy.model.critic_type == ("v" if params["kl_mode"] == "bmpc" else "q")
    if params["kl_mode"] in ("tdmpc2", "bmpc"):  # the preset's own settings, not PO-MPC's
        assert model.policy_squash == PRESETS[params["kl_mode"]]["policy_squash"]


def test_sampler_scales_compute_knobs_with_the_configuration() -> None:
    paper = {"num_samples": 512, "batch_size": 256, "num_elites": 64, "num_pi_trajs": 24}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    samples, batches = set(), set()
    for _ in range(30):
        kwargs = _sample(study.ask(), base=paper)
        samples.add(kwargs["num_samples"])
        batches.add(kwargs["batch_size"])
    assert samples == {256, 512, 1024} and batches == {128, 256, 512}
    # choices that would break num_elites <= num_samples or num_pi_trajs < num_samples are left out
    tight = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(10):
        kwargs = _sample(tight.ask(), base={"num_samples": 64, "batch_size": 8, "num_elites": 64, "num_pi_trajs": 24})
        assert kwargs["num_samples"] in (64, 128) and kwargs["batch_size"] in (4, 8, 16)
    # outside the zoo (no configuration) the sampler searches around POMPC's defaults: 1024 is a valid choice there
    fixed = optuna.trial.FixedTrial(dict(kl_mode="tdmpc2", horizon=3, learning_rate=3e-4, entropy_coef=1e-4,
                                         batch_size=512, num_samples=1024))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial warns about a value outside the choices
        assert zoo.sample_pompc_params(fixed)["num_samples"] == 1024


def test_converter_rejects_unknown_mode_and_priors_have_one_home() -> None:
    from sb3_pompc import presets

    with pytest.raises(ValueError, match="kl_mode"):
        zoo.convert_pompc_params({"kl_mode": "huge"})
    assert zoo.PRIORS is presets.PRIORS


def test_patch_module_handles_every_hook_target() -> None:
    """The hook's TARGETS is the one list of patched modules: patch_module acts on each of them."""
    import sb3_pompc_zoo_hook

    assert not hasattr(zoo, "_TARGETS")
    for name in sb3_pompc_zoo_hook.TARGETS:
        module = SimpleNamespace(ALGOS={}, HYPERPARAMS_SAMPLER={}, HYPERPARAMS_CONVERTER={},
                                 ExperimentManager=type("ExperimentManager", (), {
                                     "__init__": lambda self: None, "objective": lambda self, trial: 0.0,
                                     "hyperparameters_optimization": lambda self: None}))
        zoo.patch_module(name, module)
        assert ("pompc" in module.ALGOS) + ("pompc" in module.HYPERPARAMS_SAMPLER) + \
            module.ExperimentManager.__dict__.get("_sb3_pompc_patched", False) == 1, name


# ------------------------------------------------------------------------------------------------ hyperparams yml
def test_hyperparams_yml_entries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT (a deprecation warning of HalfCheetah's XML) to the cwd
    assert TOP_LEVEL_YML.read_text() == PACKAGED_YML.read_text()
    assert Path(zoo.default_config_path()).resolve() == PACKAGED_YML.resolve()
    entries = yaml.safe_load(PACKAGED_YML.read_text())
    required = {"default", "Pendulum-v1", "HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5",
                "dmc/cartpole-balance-v0", "dmc/cheetah-run-v0", "dmc/walker-walk-v0", "dmc/humanoid-walk-v0",
                "dmc/dog-run-v0"}
    assert required <= set(entries)
    import inspect

    pompc_args = set(inspect.signature(POMPC.__init__).parameters) - {"self", "env"}
    registry = set(gym.envs.registry)
    for env_id, entry in entries.items():
        assert {"n_timesteps", "policy", "preset"} <= set(entry), env_id
        assert set(entry) - ZOO_KEYS <= pompc_args, (env_id, set(entry) - ZOO_KEYS - pompc_args)
        assert not any(v == "auto" for v in entry.values()), env_id  # "auto" breaks rl-zoo3's -i (set as attribute)
        if env_id != "default":
            assert env_id in registry, f"{env_id} is not a registered Gymnasium id"
        if env_id.startswith("dmc/") or env_id.endswith("-v5") or env_id == "default":
            assert entry["model_size"] == 5 and entry["num_samples"] == 512, env_id  # the paper's defaults
    # a few entries construct (validation only, no networks)
    for env_id in ("Pendulum-v1", "HalfCheetah-v5", "dmc/cartpole-balance-v0"):
        kwargs = {k: v for k, v in entries[env_id].items() if k not in ZOO_KEYS}
        model = POMPC("MlpPolicy", env_id, **kwargs, _init_setup_model=False)
        assert model.preset == "pompc" and model.kl_coef_init == 1.0 and model.prior == "reverse"


def test_cpu_yml_through_the_experiment_manager(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``-conf pompc_cpu.yml`` reads the packaged CPU-sized file from any directory; each entry is the paper file's
    entry with ``presets.CPU_SETTINGS``, and POMPC is built with those settings."""
    import argparse

    from rl_zoo3.exp_manager import ExperimentManager

    monkeypatch.chdir(tmp_path)
    cpu_yml = PACKAGED_YML.with_name("pompc_cpu.yml")
    assert (REPO / "hyperparams" / "pompc_cpu.yml").read_text() == cpu_yml.read_text()
    assert Path(zoo.cpu_config_path()).resolve() == cpu_yml.resolve()
    paper, cpu = yaml.safe_load(PACKAGED_YML.read_text()), yaml.safe_load(cpu_yml.read_text())
    assert set(cpu) == set(paper) and all(cpu[k] == {**paper[k], **CPU_SETTINGS} for k in paper)
    for env_id in ("dmc/walker-walk-v0", "Pendulum-v1", "Humanoid-v5"):
        manager = ExperimentManager(argparse.Namespace(), "pompc", env_id, "logs", config="pompc_cpu.yml")
        assert Path(manager.config).resolve() == cpu_yml.resolve()
        hyperparams, _ = manager.read_hyperparameters()
        assert {k: hyperparams[k] for k in CPU_SETTINGS} == CPU_SETTINGS, env_id
    kwargs = {k: v for k, v in hyperparams.items() if k not in ZOO_KEYS}
    model = POMPC("MlpPolicy", "Pendulum-v1", **kwargs, _init_setup_model=False)
    assert (model.model_size, model.num_samples, model.iterations, model.batch_size, model.reanalyze_interval,
            model.pretrain_updates) == (1, 64, 3, 64, 0, 500)
    # a file of that name in the working directory wins, and without -conf the paper's file is read
    (tmp_path / "pompc_cpu.yml").write_text(yaml.safe_dump({"default": {"policy": "MlpPolicy"}}))
    assert ExperimentManager(argparse.Namespace(), "pompc", "Pendulum-v1", "logs", config="pompc_cpu.yml").config \
        == "pompc_cpu.yml"
    assert ExperimentManager(argparse.Namespace(), "pompc", "Pendulum-v1", "logs").config == zoo.default_config_path()
