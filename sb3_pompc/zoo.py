"""rl-zoo3 integration: ``python -m rl_zoo3.train --algo pompc ...`` after a plain ``pip install sb3-pompc``.

rl-zoo3 is not edited. The wheel ships ``sb3_pompc_zoo.pth`` (one line: ``import sb3_pompc_zoo_hook``); the hook puts
an import finder on ``sys.meta_path`` that calls :func:`patch_module` right after rl-zoo3 has executed one of the
modules named in ``sb3_pompc_zoo_hook.TARGETS``:

- ``rl_zoo3.utils`` → ``ALGOS["pompc"]`` (importing ``sb3_pompc`` also registers the ``dmc/...`` env ids);
- ``rl_zoo3.hyperparams_opt`` → the Optuna sampler and converter below;
- ``rl_zoo3.exp_manager`` → :func:`patch_experiment_manager`: the default hyper-parameter file of ``--algo pompc`` is
  the packaged ``sb3_pompc/hyperparams/pompc.yml``, ``-conf pompc_cpu.yml`` names the packaged CPU-sized file, a new
  SQL storage is created safely when several workers start at once, and a diverged trial is pruned.

In a process where the ``.pth`` file is not active, ``import sb3_pompc.zoo`` (or :func:`register`) does the same.

Optuna search space of :func:`sample_pompc_params` (see ``docs/zoo.md``):

- ``kl_mode`` ∈ {"tdmpc2", "bmpc", "alpha", "auto"}: the TD-MPC2 preset (λ = 0), the BMPC preset (λ = ∞), the PO-MPC
  preset with λ = α/(1 − α) for ``kl_alpha`` = α on a uniform grid over [0, 1] (α = 0: λ = 0, α = 1: λ = ∞), or the
  PO-MPC preset with λ learned by dual descent toward ``target_kl`` (log-uniform in :data:`TARGET_KL_RANGE`). The two
  preset modes fill λ, the prior, the critic and the heads from the preset;
- ``prior`` ∈ :data:`PRIORS` for the PO-MPC modes with λ > 0 ("planner" for λ = 0, where π_ref plays no part);
- ``kl_value`` ∈ {False, True} for a finite λ > 0 or a learned λ (never with λ = ∞, where POMPC refuses it);
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
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from sb3_pompc.presets import PRESETS, PRIORS

__all__ = [
    "ALGO_NAME",
    "KL_MODES",
    "PRIORS",
    "KL_ALPHA_STEP",
    "TARGET_KL_RANGE",
    "HORIZON_RANGE",
    "LEARNING_RATE_RANGE",
    "ENTROPY_COEF_RANGE",
    "PACKAGED_CONFIGS",
    "default_config_path",
    "cpu_config_path",
    "packaged_config_path",
    "alpha_to_kl_coef",
    "sample_pompc_params",
    "convert_pompc_params",
    "create_storage",
    "patch_module",
    "patch_experiment_manager",
    "register",
]

#: the name of the algorithm in rl-zoo3 (``--algo pompc``)
ALGO_NAME = "pompc"
#: how the sampler chooses the algorithm and λ: the TD-MPC2 or BMPC preset, PO-MPC with λ from α, PO-MPC with λ learned
KL_MODES = ("tdmpc2", "bmpc", "alpha", "auto")
#: grid step of α = λ/(1 + λ) on [0, 1]; both ends are on the grid (λ = 0 and λ = ∞)
KL_ALPHA_STEP = 0.02
TARGET_KL_RANGE = (0.05, 2.0)
HORIZON_RANGE = (1, 5)
LEARNING_RATE_RANGE = (1e-4, 1e-3)
ENTROPY_COEF_RANGE = (1e-5, 1e-3)
#: the hyper-parameter files shipped in ``sb3_pompc/hyperparams``: the paper's (GPU-sized) and the CPU-sized one
PACKAGED_CONFIGS = ("pompc.yml", "pompc_cpu.yml")

# POMPC's defaults, used when the sampler runs without a zoo configuration (e.g. from a script)
_DEFAULT_BASE = {"batch_size": 256, "num_samples": 512, "num_elites": 64, "num_pi_trajs": 24}

#: the configuration of the ExperimentManager whose objective is running (set by the patched ``objective``)
_BASE_HYPERPARAMS: contextvars.ContextVar[Optional[dict[str, Any]]] = contextvars.ContextVar(
    "sb3_pompc_zoo_base_hyperparams", default=None
)


def packaged_config_path(name: str = f"{ALGO_NAME}.yml") -> str:
    """The path of a hyper-parameter file shipped with the package.

    :param name: one of :data:`PACKAGED_CONFIGS`
    :return: ``<site-packages>/sb3_pompc/hyperparams/<name>``
    """
    if name not in PACKAGED_CONFIGS:
        raise ValueError(f"no packaged hyper-parameter file {name!r}; packaged files: {PACKAGED_CONFIGS}")
    return str(Path(__file__).resolve().parent / "hyperparams" / name)


def default_config_path() -> str:
    """The packaged paper-sized hyper-parameter file, ``<site-packages>/sb3_pompc/hyperparams/pompc.yml``."""
    return packaged_config_path(f"{ALGO_NAME}.yml")


def cpu_config_path() -> str:
    """The packaged CPU-sized hyper-parameter file, ``<site-packages>/sb3_pompc/hyperparams/pompc_cpu.yml``."""
    return packaged_config_path("pompc_cpu.yml")


def _resolve_config(config: Optional[str]) -> str:
    """``-conf`` of a pompc run: none → the packaged ``pompc.yml``; the bare name of a packaged file that does not
    exist in the working directory → that packaged file; anything else is left to rl-zoo3."""
    if not config:
        return default_config_path()
    if config in PACKAGED_CONFIGS and not os.path.exists(config):
        return packaged_config_path(config)
    return config


# ------------------------------------------------------------------------------------------------ Optuna sampler
def alpha_to_kl_coef(alpha: float) -> float:
    """λ = α/(1 − α): α = 0 → λ = 0.0, α = 1 → λ = ``inf``, α = ½ → λ = 1.

    :param alpha: α ∈ [0, 1]
    :return: λ ∈ [0, ∞]
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kl_alpha must lie in [0, 1], got {alpha!r}")
    if alpha >= 1.0:
        return float("inf")
    return alpha / (1.0 - alpha)


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
    λ = ∞, and the ``tdmpc2``/``bmpc`` modes pass the preset with ``kl_coef``, ``prior`` and ``critic`` left to it.
    ``batch_size``/``num_samples`` are searched around the values of the running zoo configuration (or POMPC's
    defaults outside the zoo).

    :param trial: the Optuna trial
    :param n_actions: action dimension (rl-zoo3's signature; unused)
    :param n_envs: number of environments (rl-zoo3's signature; unused)
    :param additional_args: rl-zoo3's extra arguments (unused)
    :return: keyword arguments for ``POMPC(...)``, as :func:`convert_pompc_params` makes them from
        ``trial.params``
    """
    base = _BASE_HYPERPARAMS.get() or {}
    kl_mode = trial.suggest_categorical("kl_mode", list(KL_MODES))
    kl_coef: Any = None
    if kl_mode == "alpha":
        kl_coef = alpha_to_kl_coef(trial.suggest_float("kl_alpha", 0.0, 1.0, step=KL_ALPHA_STEP))
    elif kl_mode == "auto":
        kl_coef = "auto"
        trial.suggest_float("target_kl", *TARGET_KL_RANGE, log=True)
    if kl_coef is not None and kl_coef != 0.0:
        trial.suggest_categorical("prior", list(PRIORS))
    if kl_coef == "auto" or (isinstance(kl_coef, float) and 0.0 < kl_coef < float("inf")):
        trial.suggest_categorical("kl_value", [False, True])
    trial.suggest_int("horizon", *HORIZON_RANGE)
    trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True)
    trial.suggest_float("entropy_coef", *ENTROPY_COEF_RANGE, log=True)
    trial.suggest_categorical("batch_size", _scaled_choices(_base_value(base, "batch_size"), 1))
    min_samples = max(_base_value(base, "num_elites"), _base_value(base, "num_pi_trajs") + 1)
    trial.suggest_categorical("num_samples", _scaled_choices(_base_value(base, "num_samples"), min_samples))

    hyperparams = convert_pompc_params(trial.params)
    # where the trial ran (useful with a shared storage) and the effective λ, for the study's records
    effective = hyperparams["kl_coef"]
    if effective is None:
        effective = PRESETS[hyperparams["preset"]]["kl_coef"]
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("kl_coef", str(effective))
    return hyperparams


def convert_pompc_params(params: dict[str, Any]) -> dict[str, Any]:
    """Trial parameters → POMPC keyword arguments (the ``HYPERPARAMS_CONVERTER["pompc"]`` of rl-zoo3, used by
    ``--storage ... --study-name ... --trial-id N`` to train with a trial's parameters).

    ``kl_coef``, ``prior`` and ``critic`` are ``None`` where the preset fills them, so that a value of the zoo
    configuration cannot contradict the preset of the trial.

    :param params: ``trial.params`` of a trial sampled by :func:`sample_pompc_params`
    :return: keyword arguments for ``POMPC(...)``
    """
    kl_mode = params["kl_mode"]
    if kl_mode not in KL_MODES:
        raise ValueError(f"unknown kl_mode {kl_mode!r}; expected one of {KL_MODES}")
    out: dict[str, Any] = {"kl_coef": None, "prior": None, "critic": None, "kl_value": False}
    if kl_mode in ("tdmpc2", "bmpc"):
        out["preset"] = kl_mode
    else:
        out["preset"] = "pompc"
        if kl_mode == "auto":
            out.update(kl_coef="auto", target_kl=float(params["target_kl"]))
        else:
            out["kl_coef"] = alpha_to_kl_coef(params["kl_alpha"])
        out["prior"] = params["prior"] if out["kl_coef"] != 0.0 else "planner"
        out["kl_value"] = bool(params.get("kl_value", False))
    for key, cast in (("horizon", int), ("learning_rate", float), ("entropy_coef", float), ("batch_size", int),
                      ("num_samples", int)):
        if key in params:
            out[key] = cast(params[key])
    return out


# ------------------------------------------------------------------------------------------------ Optuna storage
def create_storage(url: str, attempts: int = 10, delay: float = 0.2) -> None:
    """Create Optuna's tables in a new SQL database, safely while other workers do the same.

    Workers that start together on a new database race to create the tables; the losers get an ``IntegrityError``
    (``alembic_version``) or "table already exists". This retries until the schema is there. An existing schema is
    left as it is. The patched rl-zoo3 experiment manager calls it before a ``pompc`` study is created or loaded.

    :param url: an SQLAlchemy URL that Optuna's ``RDBStorage`` accepts (``sqlite:///study.db``,
        ``postgresql+psycopg2://...``)
    :param attempts: tries before the last error is raised
    :param delay: base wait between tries in seconds (grows with each try, with jitter)
    """
    import optuna
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            optuna.storages.RDBStorage(url)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(delay * (attempt + 1) * (0.5 + random.random()))


# ------------------------------------------------------------------------------------------------ rl-zoo3 patches
def patch_experiment_manager(cls: type) -> None:
    """Patch rl-zoo3's ``ExperimentManager`` in place (idempotent; other algorithms are untouched):

    - ``__init__``: for ``algo == "pompc"`` without ``-conf``, read the packaged ``pompc.yml``; ``-conf pompc_cpu.yml``
      (a bare packaged name that is not a file in the working directory) reads the packaged CPU-sized file;
    - ``hyperparameters_optimization``: for ``algo == "pompc"`` with an SQL ``--storage``, create Optuna's tables
      first with :func:`create_storage`, so that workers started together on a new database do not crash;
    - ``objective``: for ``algo == "pompc"``, let the sampler see the run's configuration, and prune a trial whose
      losses became non-finite (``FloatingPointError``) instead of aborting the whole study.

    :param cls: ``rl_zoo3.exp_manager.ExperimentManager`` (or a subclass)
    """
    if cls.__dict__.get("_sb3_pompc_patched", False):
        return
    original_init = cls.__init__
    original_objective = cls.objective
    original_optimization = cls.hyperparameters_optimization
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
        self.config = _resolve_config(config)

    @functools.wraps(original_optimization)
    def hyperparameters_optimization(self) -> None:
        storage = getattr(self, "storage", None)
        if getattr(self, "algo", None) == ALGO_NAME and isinstance(storage, str) and "://" in storage:
            create_storage(storage)
        return original_optimization(self)

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
    cls.hyperparameters_optimization = hyperparameters_optimization  # type: ignore[method-assign]
    cls._sb3_pompc_patched = True  # type: ignore[attr-defined]


def patch_module(name: str, module: Any) -> None:
    """Register POMPC in one freshly imported rl-zoo3 module (called by the import hook; idempotent). Modules other
    than those of ``sb3_pompc_zoo_hook.TARGETS`` are left alone.

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


def register() -> None:
    """Make ``--algo pompc`` available to rl-zoo3 in this process (idempotent, does not import rl-zoo3).

    Installs the import hook (if the ``.pth`` file did not already) and patches the rl-zoo3 modules that are
    already imported; the others are patched when they are imported. Without the hook module (a vendored copy of
    the package), only the rl-zoo3 modules imported so far are patched.
    """
    try:
        import sb3_pompc_zoo_hook
    except ImportError:
        for name, module in list(sys.modules.items()):
            if name.startswith("rl_zoo3.") and module is not None:
                patch_module(name, module)
        return
    sb3_pompc_zoo_hook.install()


register()
