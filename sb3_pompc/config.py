"""Every setting of POMPC in one frozen dataclass, and the one function that resolves it.

:func:`resolve_config` applies, in this order: the preset (``PRESETS``) → the model size (``MODEL_SIZES``) → the
explicit keyword arguments → the values that need the environment (gamma, learning_starts, pretrain_updates,
iterations, episodic) → every validation. After it, each field of :class:`POMPCConfig` holds a concrete value;
``auto_resolved`` says which ones came from "auto" or from a preset, so that ``verbose >= 1`` can show them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from sb3_pompc.envs import get_episode_length
from sb3_pompc.math import SimNorm, discount_heuristic
from sb3_pompc.planner import MPPIPlanner
from sb3_pompc.speedups import AUTOCAST_DTYPES
from sb3_pompc.presets import PRESETS, PRIORS
from sb3_pompc.world_model import model_size_config

__all__ = ["POMPCConfig", "resolve_config", "parse_kl_coef", "KL_MODES"]

#: How the π_s loss weighs its KL term: no KL, a fixed finite λ, λ = ∞ (no return term), λ learned by dual descent.
KL_MODES = ("zero", "finite", "infinite", "learned")
#: Gymnasium ids of environments that end episodes early (healthy checks): the termination head is on for them.
TERMINATING_ENVS = ("Hopper", "Walker2d", "Ant", "Humanoid", "InvertedPendulum", "InvertedDoublePendulum")


@dataclass(frozen=True)
class POMPCConfig:
    """The settings of one POMPC agent. ``None`` and ``"auto"`` are placeholders that :func:`resolve_config`
    replaces (from the preset, the model size or the environment); a resolved config holds none of them."""

    preset: str = "pompc"
    """the preset that filled the settings left at None: "pompc", "tdmpc2" (λ = 0) or "bmpc" (λ = ∞)"""
    kl_coef: Union[float, str, None] = None
    """λ ≥ 0, inf, "auto" or "auto_<init>" (dual descent toward ``target_kl``)"""
    prior: Optional[str] = None
    """π_ref: "planner" (the buffer's π^P), "forward" or "reverse" (a prior network π_p fitted by that KL)"""
    kl_value: Optional[bool] = None
    """train the KL-regularised critic Q̃ and let π_s maximise it (the planner keeps Q); PO-MPC yes, and never with
    λ = ∞ unless asked (then refused: there is no return term)"""
    mask_unplanned: Optional[bool] = None
    """rows without a real plan (random warm-up) add nothing to π_p's fit, to π_s's KL or to Q̃'s KL penalty, and
    the KL terms wait until the buffer holds a real plan (PO-MPC yes; BMPC uses the rows' N(0, 1))"""
    target_kl: float = 0.5
    """target KL (nats per action dimension) of ``kl_coef="auto"``"""
    kl_warmup: Union[int, str] = "auto"
    """updates (pretraining burst included) with λ = 0 before the KL terms start, the paper's N_s; "auto" = the
    pretraining burst with ``mask_unplanned``, else 0"""
    learning_rate: Union[float, Callable[[float], float]] = 3e-4
    """learning rate, or an SB3 schedule"""
    buffer_size: int = 1_000_000
    """replay buffer rows per env"""
    learning_starts: Union[int, str] = "auto"
    """random warm-up steps; "auto" = max(1000, 5·episode_length)"""
    pretrain_updates: Union[int, str] = "auto"
    """updates run once when learning starts; "auto" = learning_starts"""
    batch_size: int = 256
    """windows per update"""
    tau: float = 0.01
    """soft target update coefficient"""
    gamma: Union[float, str] = "auto"
    """discount; "auto" = TD-MPC2's episode-length heuristic (0.99 for 500-step episodes)"""
    train_freq: Union[int, tuple[int, str]] = 1
    """update every ``train_freq`` env steps (SB3's convention)"""
    gradient_steps: int = 1
    """updates per ``train_freq``"""
    horizon: int = 3
    """planning and training horizon H"""
    iterations: Union[int, str] = "auto"
    """MPPI iterations; "auto" = 6, +2 when the action has ≥ 20 dimensions"""
    num_samples: int = 512
    """MPPI samples N (policy trajectories included)"""
    num_elites: int = 64
    """MPPI elites"""
    num_pi_trajs: int = 24
    """policy trajectories among the samples"""
    temperature: float = 0.5
    """MPPI temperature (multiplies values)"""
    min_std: float = 0.05
    """MPPI std lower clamp"""
    max_std: float = 2.0
    """MPPI initial std and upper clamp"""
    deterministic_action: str = "elite"
    """action of ``predict(deterministic=True)``: "elite" (highest-weight elite), "mean" (MPPI mean) or "sample"
    (TD-MPC2's evaluation: an elite drawn by weight, so not a function of the observation)"""
    model_size: Optional[int] = 5
    """1, 5, 19, 48 or 317 (million parameters), or None to give the dimensions below"""
    latent_dim: Optional[int] = None
    """latent size (None: the model size's)"""
    mlp_dim: Optional[int] = None
    """hidden size (None: the model size's)"""
    enc_dim: Optional[int] = None
    """encoder hidden size (None: the model size's)"""
    num_enc_layers: Optional[int] = None
    """encoder depth (None: the model size's)"""
    simnorm_layout: str = "strided"
    """which latent entries form a SimNorm group: "strided" or "contiguous" (the same model, units relabelled)"""
    num_q: Optional[int] = None
    """critic heads (None: the preset's 5, or 2 / 8 for model sizes 1 / 317; BMPC 2)"""
    critic: Optional[str] = None
    """"q" or "v" (BMPC's V critic with a model-based target; needs λ = ∞)"""
    target_reduce: Optional[str] = None
    """"min" (TD-MPC2) or "avg" (BMPC) over 2 random target heads"""
    policy_squash: Optional[str] = None
    """policy head: "tanh" (TD-MPC2) or "clamp" (BMPC)"""
    log_std_min: Optional[float] = None
    """policy log σ lower bound"""
    log_std_max: Optional[float] = None
    """policy log σ upper bound"""
    critic_init: Optional[str] = None
    """critic initialisation: "trunc_normal" or "default" (BMPC's)"""
    pretrain_policy: Optional[bool] = None
    """update π_s during the pretraining burst (TD-MPC2 yes, BMPC no)"""
    reanalyze_interval: Optional[int] = None
    """re-plan buffer states every N updates (0 = off; BMPC 10)"""
    reanalyze_batch_size: int = 20
    """windows re-planned each time (their first H states)"""
    reanalyze_horizon: Optional[int] = None
    """planner horizon of reanalyze (None: ``horizon``)"""
    reanalyze_num_samples: Optional[int] = None
    """MPPI samples of reanalyze (None: ``num_samples``)"""
    expl_log_std_min: float = -2.0
    """log σ lower bound of reanalyze's policy trajectories (BMPC −2)"""
    expl_log_std_max: float = 1.0
    """log σ upper bound of reanalyze's policy trajectories (BMPC 1)"""
    episodic: Union[bool, str] = "auto"
    """termination head: True, False or "auto" (on for known terminating envs, and from the first termination)"""
    detect_termination: bool = False
    """switch the termination head on when the env first terminates an episode (set by ``episodic="auto"``)"""
    entropy_coef: float = 1e-4
    """β of the entropy bonus"""
    rho: float = 0.5
    """temporal weight ρ of the losses"""
    consistency_coef: float = 20.0
    """latent consistency loss weight"""
    reward_coef: float = 0.1
    """reward loss weight"""
    value_coef: float = 0.1
    """value loss weight"""
    termination_coef: float = 1.0
    """termination loss weight"""
    enc_lr_scale: float = 0.3
    """encoder learning-rate multiplier"""
    grad_clip_norm: float = 20.0
    """gradient clipping norm"""
    planner_dtype: str = "float32"
    """"float32" or "bfloat16" (autocast while planning)"""
    update_dtype: str = "float32"
    """"float32" or "bfloat16" (the update's forward passes under autocast; fp32 weights and optimisers)"""
    compile: bool = False
    """plan and update through ``torch.compile`` (the eager numbers up to float rounding)"""
    auto_resolved: tuple[str, ...] = field(default=(), compare=False)
    """the settings that came from "auto", a preset or the model size (printed at ``verbose >= 1``)"""

    # ------------------------------------------------------------------------------------------------ λ logic
    @property
    def kl_coef_init(self) -> float:
        """λ at the start: the fixed λ, or the initial λ of "auto"/"auto_<init>"."""
        return parse_kl_coef(self.kl_coef)[0]  # type: ignore[arg-type]

    @property
    def kl_mode(self) -> str:
        """How the π_s loss weighs its KL term (DESIGN §1): "zero" (λ = 0, TD-MPC2: no KL), "finite" (fixed λ),
        "infinite" (λ = ∞, BMPC: no return term) or "learned" (dual descent toward ``target_kl``)."""
        value, learned = parse_kl_coef(self.kl_coef)  # type: ignore[arg-type]
        if learned:
            return "learned"
        if value == 0.0:
            return "zero"
        return "infinite" if math.isinf(value) else "finite"

    @property
    def learned_prior(self) -> bool:
        """Whether π_ref is a prior network π_p (``prior`` "forward" or "reverse")."""
        return self.prior in ("forward", "reverse")

    @property
    def kl_reference(self) -> str:
        """π_ref of every KL term: "planner" (the buffer's π^P at that state) or "prior" (the network π_p)."""
        return "prior" if self.learned_prior else "planner"

    @property
    def policy_latents(self) -> int:
        """Latents of the π_s loss (DESIGN §1, "which latents carry which term"): a window holds π^P for its first H
        observations only, so a KL to the planner's stats runs over H latents (as BMPC); otherwise (λ = 0, or a
        learned prior) all H + 1 latents of the rollout (as TD-MPC2)."""
        uses_planner_kl = self.kl_reference == "planner" and self.kl_mode != "zero"
        return self.horizon if uses_planner_kl else self.horizon + 1

    @property
    def kl_value_steps(self) -> int:
        """Steps t of Q̃'s KL-regularised target: its KL at z'_t = z_{t+1} needs π^P at t + 1 with the planner prior
        (t + 1 ≤ H − 1, so H − 1 steps); a learned prior is defined at every latent (H steps)."""
        return self.horizon - 1 if self.kl_reference == "planner" else self.horizon

    # -------------------------------------------------------------------------------------- derived kwargs
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~sb3_pompc.world_model.WorldModel` (besides obs and action dims)."""
        return dict(
            enc_dim=self.enc_dim, mlp_dim=self.mlp_dim, latent_dim=self.latent_dim, num_enc_layers=self.num_enc_layers,
            num_q=self.num_q, critic=self.critic, episodic=self.episodic, policy_squash=self.policy_squash,
            log_std_min=self.log_std_min, log_std_max=self.log_std_max, learned_prior=self.learned_prior,
            kl_value=self.kl_value, critic_init=self.critic_init, simnorm_layout=self.simnorm_layout,
        )

    def policy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~sb3_pompc.policies.POMPCPolicy` that the settings decide."""
        return dict(model_kwargs=self.model_kwargs(), planner_kwargs=self.planner_kwargs(),
                    enc_lr_scale=self.enc_lr_scale, scale_tau=self.tau, planner_dtype=self.planner_dtype,
                    compile=self.compile)

    def loss_coefs(self) -> dict[str, float]:
        """Weights of the world-model loss terms (keyword arguments of ``objectives.world_model_loss``)."""
        return dict(consistency_coef=self.consistency_coef, reward_coef=self.reward_coef,
                    value_coef=self.value_coef, termination_coef=self.termination_coef)

    def planner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the acting :class:`~sb3_pompc.planner.MPPIPlanner`."""
        return dict(
            horizon=self.horizon, iterations=self.iterations, num_samples=self.num_samples,
            num_elites=self.num_elites, num_pi_trajs=self.num_pi_trajs, temperature=self.temperature,
            min_std=self.min_std, max_std=self.max_std, gamma=self.gamma,
            deterministic_action=self.deterministic_action,
        )

    def reanalyze_planner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of lazy reanalyze's planner: the acting planner's, with reanalyze's horizon and
        sample count (elites and policy trajectories capped to fit)."""
        samples = int(self.reanalyze_num_samples)  # type: ignore[arg-type]
        return {
            **self.planner_kwargs(),
            "horizon": self.reanalyze_horizon,
            "num_samples": samples,
            "num_elites": min(self.num_elites, samples),
            "num_pi_trajs": min(self.num_pi_trajs, samples - 1),
        }

    def describe(self) -> str:
        """One line per setting, those resolved from "auto", a preset or the model size marked with ``*``."""
        lines = [f"POMPC settings (* = from the preset, the model size or 'auto'):"]
        for f in dataclasses.fields(self):
            if f.name != "auto_resolved":
                mark = "*" if f.name in self.auto_resolved else " "
                lines.append(f"  {mark} {f.name:<22} {getattr(self, f.name)!r}")
        return "\n".join(lines)


def parse_kl_coef(kl_coef: Union[float, str]) -> tuple[float, bool]:
    """``kl_coef`` → (initial λ, learned). Accepts a float ≥ 0, ``float("inf")``, "inf", "auto" or "auto_<init>"."""
    if isinstance(kl_coef, str):
        if kl_coef in ("inf", "infinity"):
            return float("inf"), False
        if kl_coef.startswith("auto"):
            init = 1.0
            if "_" in kl_coef:
                try:
                    init = float(kl_coef.split("_", 1)[1])
                except ValueError:
                    raise ValueError(f"kl_coef {kl_coef!r}: the part after 'auto_' must be a number") from None
            if not (init > 0 and math.isfinite(init)):
                raise ValueError(f"kl_coef {kl_coef!r}: the initial λ of 'auto_<init>' must be finite and > 0")
            return init, True
        try:
            kl_coef = float(kl_coef)
        except ValueError:
            raise ValueError(f"kl_coef must be a float >= 0, inf, 'auto' or 'auto_<init>', got {kl_coef!r}") from None
    value = float(kl_coef)
    if math.isnan(value) or value < 0:
        raise ValueError(f"kl_coef (λ) must be >= 0 (0 = TD-MPC2, inf = BMPC) or 'auto', got {kl_coef!r}")
    return value, False


FIELDS = frozenset(f.name for f in dataclasses.fields(POMPCConfig)) - {"auto_resolved", "detect_termination"}


def _can_terminate(env: Any) -> bool:
    """Whether ``env`` (a gymnasium.Env or an SB3 VecEnv) is one of :data:`TERMINATING_ENVS`."""
    try:
        spec = env.get_attr("spec")[0] if hasattr(env, "get_attr") else getattr(env, "spec", None)
    except (AttributeError, KeyError):
        return False
    env_id = getattr(spec, "id", "") or ""
    return any(name in env_id for name in TERMINATING_ENVS)


def resolve_config(preset: str = "pompc", env: Any = None, action_dim: Optional[int] = None,
                   **overrides: Any) -> POMPCConfig:
    """Resolve every setting: preset → model size → ``overrides`` → values that need ``env`` → validation.

    :param preset: "pompc", "tdmpc2" or "bmpc"
    :param env: the environment (gymnasium.Env or SB3 VecEnv), or None when unknown (then gamma 0.99, a
        200-step episode for learning_starts, episodic False)
    :param action_dim: action dimensions (for ``iterations="auto"``; read from ``env`` when None)
    :param overrides: POMPCConfig fields given explicitly (None leaves the preset's value)
    :return: the resolved configuration
    """
    unknown = set(overrides) - FIELDS
    if unknown:
        raise ValueError(f"unknown POMPC settings {sorted(unknown)}; supported: {sorted(FIELDS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; supported presets: {sorted(PRESETS)}")
    auto: list[str] = []
    values: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(POMPCConfig) if f.name in FIELDS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    # 1. the preset fills what the user left at None
    for key, value in PRESETS[preset].items():
        if overrides.get(key) is None:
            values[key] = value
            auto.append(key)
    if isinstance(values["kl_coef"], str) and values["kl_coef"] in ("inf", "infinity"):
        values["kl_coef"] = float("inf")
    # 2. the model size fills the architecture (num_q only for sizes 1 and 317, and never for BMPC)
    arch = model_size_config(values["model_size"]) if values["model_size"] is not None else model_size_config(5)
    size_num_q = arch.pop("num_q", None)
    if overrides.get("num_q") is None and size_num_q is not None and preset != "bmpc":
        values["num_q"] = size_num_q
    for key, value in arch.items():
        if overrides.get(key) is None:
            values[key] = value
            auto.append(key)
    # 3. what needs the environment
    episode_length = get_episode_length(env) if env is not None else None
    if values["gamma"] == "auto":
        values["gamma"] = discount_heuristic(episode_length) if episode_length else 0.99
        auto.append("gamma")
    values["gamma"] = _float(values["gamma"], "gamma")
    if values["learning_starts"] == "auto":
        values["learning_starts"] = max(1000, 5 * (episode_length or 200))
        auto.append("learning_starts")
    values["learning_starts"] = _non_negative_int(values["learning_starts"], "learning_starts")
    if values["pretrain_updates"] == "auto":
        values["pretrain_updates"] = values["learning_starts"]
        auto.append("pretrain_updates")
    values["pretrain_updates"] = _non_negative_int(values["pretrain_updates"], "pretrain_updates")
    if values["iterations"] == "auto":
        if action_dim is None and env is not None:
            action_dim = int(np.prod(env.action_space.shape))
        values["iterations"] = 6 + (2 if (action_dim or 0) >= 20 else 0)
        auto.append("iterations")
    values["iterations"] = int(values["iterations"])
    values["reanalyze_interval"] = int(values["reanalyze_interval"])
    values["detect_termination"] = values["episodic"] == "auto"
    if values["episodic"] == "auto":
        values["episodic"] = _can_terminate(env) if env is not None else False
        auto.append("episodic")
    if overrides.get("kl_value") is None and parse_kl_coef(values["kl_coef"]) == (math.inf, False):
        values["kl_value"] = False  # the preset's Q̃ needs a return term: λ = ∞ has none
    if values["kl_warmup"] == "auto":
        values["kl_warmup"] = values["pretrain_updates"] if values["mask_unplanned"] else 0
        auto.append("kl_warmup")
    values["kl_warmup"] = _non_negative_int(values["kl_warmup"], "kl_warmup")
    if values["reanalyze_horizon"] is None:
        values["reanalyze_horizon"] = values["horizon"]
    if values["reanalyze_num_samples"] is None:
        values["reanalyze_num_samples"] = values["num_samples"]
    config = POMPCConfig(**values, auto_resolved=tuple(dict.fromkeys(auto)))
    validate(config)
    return config


def _float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or 'auto', got {value!r}") from None


def _non_negative_int(value: Any, name: str) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer >= 0 or 'auto', got {value!r}") from None
    if result < 0:
        raise ValueError(f"{name} must be >= 0 or 'auto', got {value}")
    return result


def validate(c: POMPCConfig) -> None:
    """Every check of a resolved config, with an error that names the setting and what is supported."""
    lam, _ = parse_kl_coef(c.kl_coef)  # type: ignore[arg-type]
    if c.prior not in PRIORS:
        raise ValueError(f"unknown prior {c.prior!r}; supported priors: {list(PRIORS)}")
    if c.horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {c.horizon}")
    if c.num_elites > c.num_samples:
        raise ValueError(f"num_elites ({c.num_elites}) must be <= num_samples ({c.num_samples})")
    if c.num_pi_trajs >= c.num_samples:
        raise ValueError(f"num_pi_trajs ({c.num_pi_trajs}) must be < num_samples ({c.num_samples})")
    if c.critic not in ("q", "v"):
        raise ValueError(f"critic must be 'q' or 'v', got {c.critic!r}")
    if c.critic == "v" and not math.isinf(lam):
        raise ValueError("critic='v' (BMPC's V critic) supports only kl_coef=inf; use critic='q' for finite or auto λ")
    if c.kl_warmup > 0 and c.critic == "v":
        raise ValueError("kl_warmup forces λ = 0, which needs a Q critic; critic='v' (BMPC) supports only λ = ∞")
    if c.kl_value and math.isinf(lam):
        raise ValueError("kl_value=True needs a finite (or 'auto') kl_coef: with λ = ∞ there is no return term")
    if c.target_reduce not in ("min", "avg"):
        raise ValueError(f"target_reduce must be 'min' or 'avg', got {c.target_reduce!r}")
    if not (c.target_kl > 0 and math.isfinite(c.target_kl)):
        raise ValueError(f"target_kl must be finite and > 0, got {c.target_kl}")
    if c.kl_warmup < 0 or c.reanalyze_batch_size < 1 or c.reanalyze_interval < 0:  # type: ignore[operator]
        raise ValueError("kl_warmup and reanalyze_interval must be >= 0 and reanalyze_batch_size >= 1")
    if not 0.0 <= float(c.gamma) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"gamma must be in [0, 1] or 'auto', got {c.gamma}")
    if c.buffer_size < 2 * c.horizon:
        raise ValueError(
            f"buffer_size ({c.buffer_size}) must be at least 2·horizon = {2 * c.horizon} rows per env: updates sample "
            f"windows of {c.horizon} steps inside one episode, which a smaller buffer cannot always hold"
        )
    if c.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {c.batch_size}")
    if c.simnorm_layout not in SimNorm.LAYOUTS:
        raise ValueError(f"simnorm_layout must be one of {SimNorm.LAYOUTS}, got {c.simnorm_layout!r}")
    for name in ("planner_dtype", "update_dtype"):
        if getattr(c, name) not in AUTOCAST_DTYPES:
            raise ValueError(f"{name} must be one of {sorted(AUTOCAST_DTYPES)}, got {getattr(c, name)!r}")
    MPPIPlanner(**c.planner_kwargs())  # the planner's own checks, before anything is built
