"""rl-zoo3 integration: ``python -m rl_zoo3.train --algo pompc ...`` after a plain ``pip install sb3-pompc``.

rl-zoo3 is not edited. The wheel ships ``sb3_pompc_zoo.pth`` (one line: ``import sb3_pompc_zoo_hook``); the hook puts
an import finder on ``sys.meta_path`` that calls :func:`patch_module` right after rl-zoo3 has executed
``rl_zoo3.utils`` (→ ``ALGOS["pompc"]``; importing ``sb3_pompc`` also registers the ``dmc/...`` env ids),
``rl_zoo3.hyperparams_opt`` (→ the Optuna sampler/converter below) and ``rl_zoo3.exp_manager`` (→ the default
hyper-parameter file of ``--algo pompc`` is the packaged ``sb3_pompc/hyperparams/pompc.yml``; ``-conf`` still wins).
In a process where the ``.pth`` file is not active, ``import sb3_pompc.zoo`` (or :func:`register`) does the same.

Optuna search space of :func:`sample_pompc_params` (see ``docs/zoo.md``):

- ``kl_mode`` ∈ {"zero", "finite", "inf", "auto"}: λ = 0 (TD-MPC2), λ log-uniform in :data:`KL_COEF_RANGE`
  (parameter ``kl_coef``), λ = ∞ (BMPC), or λ learned by dual descent toward ``target_kl`` (log-uniform in
  :data:`TARGET_KL_RANGE`);
- ``prior`` ∈ {"planner", "forward", "reverse"} (not sampled for λ = 0, where π_ref plays no part: "planner");
- ``kl_value`` ∈ {False, True} for finite or learned λ (always False for λ = 0 and λ = ∞);
- ``critic`` ∈ {"q", "v"} for λ = ∞ only (the V critic needs λ = ∞; "q" otherwise);
- ``horizon`` ∈ [1, 5], ``learning_rate`` log-uniform in [1e-4, 1e-3], ``entropy_coef`` log-uniform in
  [1e-5, 1e-3];
- ``batch_size`` and ``num_samples`` ∈ {½, 1, 2} × the value of the run's own configuration (yml plus
  ``--hyperparams``), so that a CPU-sized configuration is searched around CPU sizes and the paper's around 512
  samples; ``num_samples`` choices below ``num_elites`` or ``num_pi_trajs + 1`` are left out.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import os
import socket
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "ALGO_NAME",
    "KL_MODES",
    "PRIORS",
    "KL_COEF_RANGE",
    "TARGET_KL_RANGE",
    "HORIZON_RANGE",
    "LEARNING_RATE_RANGE",
    "ENTROPY_COEF_RANGE",
    "default_config_path",
    "sample_pompc_params",
    "convert_pompc_params",
    "patch_module",
    "patch_experiment_manager",
    "register",
]

#: the name of the algorithm in rl-zoo3 (``--algo pompc``)
ALGO_NAME = "pompc"
#: how λ is chosen by the sampler: 0, a finite log-uniform value, ∞, or learned ("auto")
KL_MODES = ("zero", "finite", "inf", "auto")
PRIORS = ("planner", "forward", "reverse")
KL_COEF_RANGE = (0.01, 100.0)
TARGET_KL_RANGE = (0.05, 2.0)
HORIZON_RANGE = (1, 5)
LEARNING_RATE_RANGE = (1e-4, 1e-3)
ENTROPY_COEF_RANGE = (1e-5, 1e-3)

# POMPC's defaults, used when the sampler runs without a zoo configuration (e.g. from a script)
_DEFAULT_BASE = {"batch_size": 256, "num_samples": 512, "num_elites": 64, "num_pi_trajs": 24}

#: the configuration of the ExperimentManager whose objective is running (set by the patched ``objective``)
_BASE_HYPERPARAMS: contextvars.ContextVar[Optional[dict[str, Any]]] = contextvars.ContextVar(
    "sb3_pompc_zoo_base_hyperparams", default=None
)


def default_config_path() -> str:
    """The packaged hyper-parameter file, ``<site-packages>/sb3_pompc/hyperparams/pompc.yml``."""
    return str(Path(__file__).resolve().parent / "hyperparams" / f"{ALGO_NAME}.yml")


# ------------------------------------------------------------------------------------------------ Optuna sampler
def _scaled_choices(base: int, minimum: int) -> list[int]:
    """{base/2, base, 2·base} (integers ≥ ``minimum``), sorted; ``base`` itself is always kept."""
    base = max(1, int(base))
    choices = {max(1, base // 2), base, 2 * base}
    return sorted(c for c in choices if c >= minimum or c == base)


def _base_value(base: dict[str, Any], key: str) -> int:
    value = base.get(key, _DEFAULT_BASE[key])
    return int(value) if value is not None else _DEFAULT_BASE[key]


def sample_pompc_params(
    trial: Any, n_actions: int = 1, n_envs: int = 1, additional_args: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    """Sample POMPC keyword arguments for one Optuna trial (the ``HYPERPARAMS_SAMPLER["pompc"]`` of rl-zoo3).

    Every combination it returns is accepted by :class:`~sb3_pompc.POMPC`: ``kl_value`` is never combined with
    λ = ∞ and ``critic`` is "q" unless λ = ∞. ``batch_size``/``num_samples`` are searched around the values of the
    running zoo configuration (or POMPC's defaults outside the zoo).

    :param trial: the Optuna trial
    :param n_actions: action dimension (rl-zoo3's signature; unused)
    :param n_envs: number of environments (rl-zoo3's signature; unused)
    :param additional_args: rl-zoo3's extra arguments (unused)
    :return: keyword arguments for ``POMPC(...)``, as :func:`convert_pompc_params` makes them from
        ``trial.params``
    """
    base = _BASE_HYPERPARAMS.get() or {}
    kl_mode = trial.suggest_categorical("kl_mode", list(KL_MODES))
    if kl_mode == "finite":
        trial.suggest_float("kl_coef", *KL_COEF_RANGE, log=True)
    elif kl_mode == "auto":
        trial.suggest_float("target_kl", *TARGET_KL_RANGE, log=True)
    if kl_mode != "zero":
        trial.suggest_categorical("prior", list(PRIORS))
    if kl_mode in ("finite", "auto"):
        trial.suggest_categorical("kl_value", [False, True])
    if kl_mode == "inf":
        trial.suggest_categorical("critic", ["q", "v"])
    trial.suggest_int("horizon", *HORIZON_RANGE)
    trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True)
    trial.suggest_float("entropy_coef", *ENTROPY_COEF_RANGE, log=True)
    trial.suggest_categorical("batch_size", _scaled_choices(_base_value(base, "batch_size"), 1))
    min_samples = max(_base_value(base, "num_elites"), _base_value(base, "num_pi_trajs") + 1)
    trial.suggest_categorical("num_samples", _scaled_choices(_base_value(base, "num_samples"), min_samples))

    hyperparams = convert_pompc_params(trial.params)
    # where the trial ran (useful with a shared storage) and the effective λ, for the study's records
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("kl_coef", str(hyperparams["kl_coef"]))
    return hyperparams


def convert_pompc_params(params: dict[str, Any]) -> dict[str, Any]:
    """Trial parameters → POMPC keyword arguments (the ``HYPERPARAMS_CONVERTER["pompc"]`` of rl-zoo3, used by
    ``--storage ... --study-name ... --trial-id N`` to train with a trial's parameters).

    :param params: ``trial.params`` of a trial sampled by :func:`sample_pompc_params`
    :return: keyword arguments for ``POMPC(...)``
    """
    kl_mode = params["kl_mode"]
    if kl_mode not in KL_MODES:
        raise ValueError(f"unknown kl_mode {kl_mode!r}; expected one of {KL_MODES}")
    out: dict[str, Any] = {}
    if kl_mode == "zero":
        out.update(kl_coef=0.0, prior="planner", kl_value=False, critic="q")
    elif kl_mode == "finite":
        out.update(kl_coef=float(params["kl_coef"]), prior=params["prior"], kl_value=bool(params["kl_value"]),
                   critic="q")
    elif kl_mode == "auto":
        out.update(kl_coef="auto", target_kl=float(params["target_kl"]), prior=params["prior"],
                   kl_value=bool(params["kl_value"]), critic="q")
    else:
        out.update(kl_coef=math.inf, prior=params["prior"], kl_value=False, critic=params["critic"])
    for key, cast in (("horizon", int), ("learning_rate", float), ("entropy_coef", float), ("batch_size", int),
                      ("num_samples", int)):
        if key in params:
            out[key] = cast(params[key])
    return out


# ------------------------------------------------------------------------------------------------ rl-zoo3 patches
def patch_experiment_manager(cls: type) -> None:
    """Patch rl-zoo3's ``ExperimentManager`` in place (idempotent; other algorithms are untouched):

    - ``__init__``: for ``algo == "pompc"`` without ``-conf``, read the packaged ``pompc.yml``;
    - ``objective``: for ``algo == "pompc"``, let the sampler see the run's configuration, and prune a trial whose
      losses became non-finite (``FloatingPointError``) instead of aborting the whole study.

    :param cls: ``rl_zoo3.exp_manager.ExperimentManager`` (or a subclass)
    """
    if cls.__dict__.get("_sb3_pompc_patched", False):
        return
    original_init = cls.__init__
    original_objective = cls.objective
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if getattr(self, "algo", None) != ALGO_NAME:
            return
        try:
            config = signature.bind(self, *args, **kwargs).arguments.get("config")
        except TypeError:
            config = None
        if not config:
            self.config = default_config_path()

    @functools.wraps(original_objective)
    def objective(self, trial: Any) -> float:
        if getattr(self, "algo", None) != ALGO_NAME:
            return original_objective(self, trial)
        token = _BASE_HYPERPARAMS.set(dict(getattr(self, "_hyperparams", {}) or {}))
        try:
            return original_objective(self, trial)
        except FloatingPointError as exc:
            import optuna

            print(f"Trial {trial.number} pruned: {exc}")
            raise optuna.TrialPruned(str(exc)) from exc
        finally:
            _BASE_HYPERPARAMS.reset(token)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.objective = objective  # type: ignore[method-assign]
    cls._sb3_pompc_patched = True  # type: ignore[attr-defined]


def patch_module(name: str, module: Any) -> None:
    """Register POMPC in one freshly imported rl-zoo3 module (called by the import hook; idempotent).

    :param name: "rl_zoo3.utils", "rl_zoo3.hyperparams_opt" or "rl_zoo3.exp_manager"
    :param module: the module object
    """
    if name == "rl_zoo3.utils":
        from sb3_pompc.pompc import POMPC  # importing sb3_pompc registers the dmc/... env ids too

        module.ALGOS[ALGO_NAME] = POMPC
    elif name == "rl_zoo3.hyperparams_opt":
        module.HYPERPARAMS_SAMPLER[ALGO_NAME] = sample_pompc_params
        module.HYPERPARAMS_CONVERTER[ALGO_NAME] = convert_pompc_params
    elif name == "rl_zoo3.exp_manager":
        patch_experiment_manager(module.ExperimentManager)


_TARGETS = ("rl_zoo3.utils", "rl_zoo3.hyperparams_opt", "rl_zoo3.exp_manager")


def register() -> None:
    """Make ``--algo pompc`` available to rl-zoo3 in this process (idempotent, does not import rl-zoo3).

    Installs the import hook (if the ``.pth`` file did not already) and patches the rl-zoo3 modules that are
    already imported; the others are patched when they are imported.
    """
    try:
        import sb3_pompc_zoo_hook
    except ImportError:  # the hook module is missing (vendored package): patch what is imported now
        import sys

        for name in _TARGETS:
            if name in sys.modules:
                patch_module(name, sys.modules[name])
        return
    sb3_pompc_zoo_hook.install()


register()
