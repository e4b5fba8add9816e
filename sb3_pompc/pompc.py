"""POMPC: the PO-MPC algorithm as a Stable-Baselines3 off-policy algorithm.

SB3 plumbing (acting, storing π^P, saving, logging) lives here; every equation lives in ``objectives.py``.
"""

from __future__ import annotations

import functools
import math
import pathlib
import random
import zipfile
from typing import Any, Callable, ClassVar, Optional, TypeVar, Union

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.vec_env import VecEnv

from sb3_pompc import objectives as obj
from sb3_pompc.buffers import POMPCReplayBuffer, POMPCReplayBufferSamples
from sb3_pompc.math import SimNorm, discount_heuristic
from sb3_pompc.planner import MPPIPlanner
from sb3_pompc.policies import AUTOCAST_DTYPES, MlpPolicy, POMPCPolicy, autocast
from sb3_pompc.presets import resolve_preset
from sb3_pompc.world_model import model_size_config

__all__ = ["POMPC"]

SelfPOMPC = TypeVar("SelfPOMPC", bound="POMPC")

PRIORS = ("planner", "forward", "reverse")


def _autocast(fn: Callable[..., Any], device_type: str, dtype: str) -> Callable[..., Any]:
    """``fn`` run under :func:`~sb3_pompc.policies.autocast` (its backward runs outside, as autocast asks)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with autocast(device_type, dtype):
            return fn(*args, **kwargs)

    return wrapped


def check_compile_backend(device: torch.device) -> None:
    """``compile=True`` on a CPU needs a C++ compiler (torch.compile's inductor backend generates C++): raise a clear
    error before training rather than at the first plan."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or an inductor without this helper
        raise ValueError(
            f"compile=True on the CPU needs a C++ compiler for torch.compile's inductor backend, and none was found "
            f"({type(exc).__name__}: {exc}). Install g++ (or set CXX), or use compile=False."
        ) from exc


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


def _episode_length(env: VecEnv) -> Optional[int]:
    """The env's episode length: its ``episode_length`` attribute (dmc ids), else its TimeLimit, else None."""
    try:
        value = env.get_attr("episode_length")[0]
        if value:
            return int(value)
    except (AttributeError, KeyError):
        pass
    try:
        spec = env.get_attr("spec")[0]
        if spec is not None and spec.max_episode_steps:
            return int(spec.max_episode_steps)
    except (AttributeError, KeyError):
        pass
    return None


def _can_terminate(env: VecEnv) -> bool:
    """Environments known to terminate early (Gymnasium MuJoCo locomotion with healthy checks)."""
    try:
        spec = env.get_attr("spec")[0]
    except (AttributeError, KeyError):
        return False
    env_id = getattr(spec, "id", "") or ""
    return any(name in env_id for name in ("Hopper", "Walker2d", "Ant", "Humanoid", "InvertedPendulum", "InvertedDoublePendulum"))


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """Raise a clear error for spaces POMPC does not support."""
    if not isinstance(action_space, spaces.Box):
        raise ValueError(
            f"POMPC supports continuous Box action spaces only, got {type(action_space).__name__} ({action_space}). "
            "Discrete, MultiDiscrete and MultiBinary actions are not supported."
        )
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        raise ValueError(f"POMPC needs finite action bounds, got low={action_space.low}, high={action_space.high}")
    if isinstance(observation_space, spaces.Dict):
        raise ValueError(
            "POMPC needs a flat Box observation space; Dict observations are flattened automatically when a "
            "gymnasium.Env (not a VecEnv) of Box entries is passed, or wrap the env with "
            "gymnasium.wrappers.FlattenObservation. For DMControl use the 'dmc/<domain>-<task>-v0' ids."
        )
    if not isinstance(observation_space, spaces.Box):
        raise ValueError(f"POMPC supports Box observation spaces only, got {observation_space}")
    if observation_space.dtype == np.uint8 or len(observation_space.shape) > 2:
        raise ValueError(
            f"POMPC supports state (vector) observations only; got an image-like space {observation_space}. "
            "Use state observations (e.g. the 'dmc/<domain>-<task>-v0' ids)."
        )


def _check_model_file(path: Any) -> None:
    """A clear ValueError for a file that is not a complete SB3 model archive (truncated or corrupted copy); SB3
    itself would report a truncated file as ``AssertionError: No data found``. Only reads the file."""
    if not isinstance(path, (str, pathlib.Path)):
        return
    file = pathlib.Path(path)
    if not file.exists() and pathlib.Path(f"{file}.zip").exists():  # SB3 adds the suffix the same way
        file = pathlib.Path(f"{file}.zip")
    if not file.is_file():
        return  # SB3 raises FileNotFoundError
    try:
        with zipfile.ZipFile(file) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile as e:
        raise ValueError(f"{file} is not a saved model (not a zip archive): is it truncated or corrupted?") from e
    missing = sorted({"data", "policy.pth"} - names)
    if missing:
        raise ValueError(f"{file} is not a complete saved model ({missing} missing): is it truncated or corrupted?")


def _flatten_dict_obs(space: spaces.Dict, observation: dict[str, Any]) -> np.ndarray:
    """One Dict observation, or a batch of them, flattened like ``FlattenObservation`` (keys in the space's order)."""
    parts = [np.asarray(observation[key], dtype=sub.dtype) for key, sub in space.spaces.items()]
    if all(p.shape == sub.shape for p, sub in zip(parts, space.spaces.values())):
        return np.concatenate([p.reshape(-1) for p in parts])
    n = parts[0].shape[0]
    return np.concatenate([p.reshape(n, -1) for p in parts], axis=1)


def _flatten_dict_env(env: Union[GymEnv, str]) -> Union[GymEnv, str]:
    if isinstance(env, str):
        env = gym.make(env)
    if isinstance(env, gym.Env) and isinstance(env.observation_space, spaces.Dict):
        if not all(isinstance(s, spaces.Box) for s in env.observation_space.spaces.values()):
            raise ValueError(
                f"POMPC can flatten Dict observations of Box entries only, got {env.observation_space}"
            )
        env = gym.wrappers.FlattenObservation(env)
    return env


class POMPC(OffPolicyAlgorithm):
    """PO-MPC: planning with MPPI on a TD-MPC2 world model, with a sampling policy trained by a KL-regularised
    objective toward an adaptive prior (arXiv 2510.04280). λ = 0 is TD-MPC2, λ = ∞ is BMPC.

    :param policy: "MlpPolicy" or a :class:`~sb3_pompc.policies.POMPCPolicy` subclass
    :param env: the environment (Box actions, Box or flattenable Dict observations) or its id
    :param preset: "pompc" (paper default), "tdmpc2" or "bmpc"; explicit keyword arguments override it
    :param kl_coef: λ ≥ 0, ``float("inf")``, "auto" or "auto_<init>" (dual descent toward ``target_kl``)
    :param prior: π_ref: "planner" (raw buffer π^P), "forward" or "reverse" (learned prior π_p, fitted by forward
        KL(π^P‖π_p) or reverse KL(π_p‖π^P))
    :param kl_value: also train a KL-regularised critic Q̃ that π_s maximises (the planner keeps Q)
    :param target_kl: target KL (nats per action dim) of ``kl_coef="auto"``
    :param kl_warmup: updates with λ forced to 0 before the KL term starts (the paper's N_s)
    :param learning_rate: learning rate (3e-4)
    :param buffer_size: replay buffer size (rows per env)
    :param learning_starts: random warm-up steps; "auto" = max(1000, 5·episode_length)
    :param pretrain_updates: updates run once when learning starts; "auto" = learning_starts
    :param batch_size: windows per update
    :param tau: soft target update coefficient (0.01)
    :param gamma: discount, or "auto" (TD-MPC2's episode-length heuristic, 0.99 for 500-step episodes)
    :param train_freq: update the model every ``train_freq`` steps
    :param gradient_steps: updates per ``train_freq`` (UTD 1)
    :param horizon: planning and training horizon H
    :param iterations: MPPI iterations; "auto" = 6, +2 if the action dim ≥ 20
    :param num_samples: MPPI samples N (policy trajectories included)
    :param num_elites: MPPI elites
    :param num_pi_trajs: policy trajectories among the samples
    :param temperature: MPPI temperature (multiplies values)
    :param min_std: MPPI std lower clamp
    :param max_std: MPPI initial std and upper clamp
    :param model_size: 1, 5, 19, 48 or 317 (million parameters), or None to give the dims below
    :param latent_dim: overrides the preset's latent size
    :param mlp_dim: overrides the preset's hidden size
    :param enc_dim: overrides the preset's encoder hidden size
    :param num_enc_layers: overrides the preset's encoder depth
    :param simnorm_layout: "strided" (default) or "contiguous": which latent entries form a SimNorm group. The two
        are the same model with its latent units relabelled (dense layers in and out, i.i.d. init); "contiguous"
        is the spec's wording, "strided" lets the softmax vectorise (see :class:`~sb3_pompc.math.SimNorm`)
    :param num_q: critic heads (preset: 5, 2 for BMPC; model sizes 1 and 317 set 2 and 8)
    :param critic: "q" or "v" (BMPC's V critic with model-based target; needs λ = ∞)
    :param target_reduce: "min" (TD-MPC2) or "avg" (BMPC) over 2 random target heads
    :param policy_squash: "tanh" (TD-MPC2) or "clamp" (BMPC)
    :param log_std_min: policy log σ lower bound
    :param log_std_max: policy log σ upper bound
    :param critic_init: "trunc_normal" or "default" (BMPC's effective critic init)
    :param pretrain_policy: update π_s during the pretraining burst (TD-MPC2 yes, BMPC no)
    :param reanalyze_interval: re-plan buffer states every N updates (0 = off; BMPC 10)
    :param reanalyze_batch_size: windows re-planned each time (their first H states)
    :param reanalyze_horizon: planner horizon used by reanalyze
    :param reanalyze_num_samples: MPPI samples used by reanalyze (None = num_samples); a CPU knob
    :param expl_log_std_min: log σ lower bound of the policy trajectories in reanalyze (BMPC −2)
    :param expl_log_std_max: log σ upper bound of the policy trajectories in reanalyze (BMPC 1)
    :param episodic: termination head: True, False or "auto" (on for known terminating envs such as Gymnasium
        MuJoCo Hopper/Walker2d/Ant, and switched on as soon as the env produces a true termination)
    :param entropy_coef: β of the entropy bonus (1e-4)
    :param rho: temporal weight ρ (0.5)
    :param consistency_coef: latent consistency weight (20)
    :param reward_coef: reward loss weight (0.1)
    :param value_coef: value loss weight (0.1)
    :param termination_coef: termination loss weight (1)
    :param enc_lr_scale: encoder lr multiplier (0.3)
    :param grad_clip_norm: gradient clipping norm (20)
    :param planner_dtype: "float32" or "bfloat16" (mixed-precision planning)
    :param update_dtype: "float32" or "bfloat16": the update's forward passes under ``torch.autocast`` (matmuls in
        bf16; LayerNorm, softmax, two-hot, losses and all Gaussian/KL math in fp32; fp32 weights and optimisers)
    :param compile: plan and update through ``torch.compile`` (same numbers as eager up to float rounding; the
        plan uses CUDA graphs on GPU). Compilation takes about a minute per shape on a CPU at model size 5, so it
        pays off only for long runs
    :param replay_buffer_class: replay buffer class (a :class:`POMPCReplayBuffer` subclass)
    :param replay_buffer_kwargs: its keyword arguments
    :param policy_kwargs: extra policy keyword arguments
    :param stats_window_size: episodes averaged in the rollout logs
    :param tensorboard_log: tensorboard log folder
    :param verbose: 0, 1 or 2
    :param seed: random seed
    :param device: "cpu", "cuda" or "auto"
    :param _init_setup_model: build the networks at construction
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": MlpPolicy}
    policy: POMPCPolicy
    replay_buffer: POMPCReplayBuffer

    def __init__(
        self,
        policy: Union[str, type[POMPCPolicy]],
        env: Union[GymEnv, str],
        preset: str = "pompc",
        kl_coef: Union[float, str, None] = None,
        prior: Optional[str] = None,
        kl_value: bool = False,
        target_kl: float = 0.5,
        kl_warmup: int = 0,
        learning_rate: Union[float, Schedule] = 3e-4,
        buffer_size: int = 1_000_000,
        learning_starts: Union[int, str] = "auto",
        pretrain_updates: Union[int, str] = "auto",
        batch_size: int = 256,
        tau: float = 0.01,
        gamma: Union[float, str] = "auto",
        train_freq: Union[int, tuple[int, str]] = 1,
        gradient_steps: int = 1,
        horizon: int = 3,
        iterations: Union[int, str] = "auto",
        num_samples: int = 512,
        num_elites: int = 64,
        num_pi_trajs: int = 24,
        temperature: float = 0.5,
        min_std: float = 0.05,
        max_std: float = 2.0,
        model_size: Optional[int] = 5,
        latent_dim: Optional[int] = None,
        mlp_dim: Optional[int] = None,
        enc_dim: Optional[int] = None,
        num_enc_layers: Optional[int] = None,
        simnorm_layout: str = "strided",
        num_q: Optional[int] = None,
        critic: Optional[str] = None,
        target_reduce: Optional[str] = None,
        policy_squash: Optional[str] = None,
        log_std_min: Optional[float] = None,
        log_std_max: Optional[float] = None,
        critic_init: Optional[str] = None,
        pretrain_policy: Optional[bool] = None,
        reanalyze_interval: Optional[int] = None,
        reanalyze_batch_size: int = 20,
        reanalyze_horizon: Optional[int] = None,
        reanalyze_num_samples: Optional[int] = None,
        expl_log_std_min: float = -2.0,
        expl_log_std_max: float = 1.0,
        episodic: Union[bool, str] = "auto",
        entropy_coef: float = 1e-4,
        rho: float = 0.5,
        consistency_coef: float = 20.0,
        reward_coef: float = 0.1,
        value_coef: float = 0.1,
        termination_coef: float = 1.0,
        enc_lr_scale: float = 0.3,
        grad_clip_norm: float = 20.0,
        planner_dtype: str = "float32",
        update_dtype: str = "float32",
        compile: bool = False,
        action_noise: Optional[ActionNoise] = None,
        replay_buffer_class: Optional[type[ReplayBuffer]] = None,
        replay_buffer_kwargs: Optional[dict[str, Any]] = None,
        policy_kwargs: Optional[dict[str, Any]] = None,
        stats_window_size: int = 100,
        tensorboard_log: Optional[str] = None,
        verbose: int = 0,
        seed: Optional[int] = None,
        device: Union[torch.device, str] = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        cfg = resolve_preset(
            preset,
            kl_coef=kl_coef,
            prior=prior,
            critic=critic,
            num_q=num_q,
            target_reduce=target_reduce,
            policy_squash=policy_squash,
            log_std_min=log_std_min,
            log_std_max=log_std_max,
            critic_init=critic_init,
            pretrain_policy=pretrain_policy,
            reanalyze_interval=reanalyze_interval,
        )
        self.preset = preset
        if update_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"update_dtype must be one of {sorted(AUTOCAST_DTYPES)}, got {update_dtype!r}")
        self.update_dtype = update_dtype
        self._validate(cfg, kl_value, horizon, num_samples, num_elites, num_pi_trajs, target_kl, kl_warmup,
                       reanalyze_batch_size, learning_starts, pretrain_updates, gamma, batch_size, action_noise)
        if replay_buffer_class is not None and not issubclass(replay_buffer_class, POMPCReplayBuffer):
            raise ValueError("replay_buffer_class must be a POMPCReplayBuffer (sub)class: it stores planner stats")
        env = _flatten_dict_env(env)
        # the Dict space of an env flattened here: ``predict`` flattens such observations the same way
        self.dict_observation_space: Optional[spaces.Dict] = (
            env.env.observation_space if isinstance(env, gym.wrappers.FlattenObservation) else None
        )
        if env is not None and not isinstance(env, str):  # before SB3's assert, so that the error is a ValueError
            check_spaces(env.observation_space, env.action_space)
        super().__init__(
            policy,
            env,
            learning_rate,
            buffer_size,
            learning_starts=100,  # resolved below once the env is known
            batch_size=batch_size,
            tau=tau,
            gamma=0.99,  # resolved below
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            action_noise=None,
            replay_buffer_class=replay_buffer_class or POMPCReplayBuffer,
            replay_buffer_kwargs=replay_buffer_kwargs,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            sde_support=False,
            support_multi_env=True,
            supported_action_spaces=(spaces.Box,),
        )
        if self.env is None and not _init_setup_model:
            # ``POMPC.load(path)`` without an env: every setting below comes from the saved data
            self._plan_mean, self._pending_plan = None, None
            return
        check_spaces(self.observation_space, self.action_space)
        if simnorm_layout not in SimNorm.LAYOUTS:
            raise ValueError(f"simnorm_layout must be one of {SimNorm.LAYOUTS}, got {simnorm_layout!r}")
        self.kl_coef_init, self.kl_coef_auto = parse_kl_coef(cfg["kl_coef"])
        self.kl_coef = cfg["kl_coef"]
        self.prior = cfg["prior"]
        self.kl_value = kl_value
        self.target_kl = target_kl
        self.kl_warmup = kl_warmup
        self.cfg = cfg
        self.horizon = horizon
        self.entropy_coef, self.rho = entropy_coef, rho
        self.loss_coefs = dict(
            consistency_coef=consistency_coef, reward_coef=reward_coef, value_coef=value_coef,
            termination_coef=termination_coef,
        )
        self.enc_lr_scale, self.grad_clip_norm = enc_lr_scale, grad_clip_norm
        self.reanalyze_interval = int(cfg["reanalyze_interval"])
        self.reanalyze_batch_size = reanalyze_batch_size
        self.reanalyze_horizon = reanalyze_horizon or horizon
        self.reanalyze_num_samples = reanalyze_num_samples
        self.expl_log_std_bounds = (expl_log_std_min, expl_log_std_max)

        episode_length = _episode_length(self.env) if self.env is not None else None
        self.episode_length = episode_length
        self.gamma = discount_heuristic(episode_length) if gamma == "auto" and episode_length else (
            0.99 if gamma == "auto" else float(gamma)
        )
        self.learning_starts = (
            max(1000, 5 * (episode_length or 200)) if learning_starts == "auto" else int(learning_starts)
        )
        self.pretrain_updates = self.learning_starts if pretrain_updates == "auto" else int(pretrain_updates)
        self._episodic_auto = episodic == "auto"
        self._saw_termination = False
        self.episodic = _can_terminate(self.env) if episodic == "auto" and self.env is not None else bool(
            episodic if episodic != "auto" else False
        )
        action_dim = int(np.prod(self.action_space.shape))
        self.iterations = (6 + (2 if action_dim >= 20 else 0)) if iterations == "auto" else int(iterations)

        arch = model_size_config(model_size) if model_size is not None else dict(model_size_config(5))
        num_q_final = cfg["num_q"]
        if num_q is None and "num_q" in arch and preset != "bmpc":
            num_q_final = arch["num_q"]
        arch.pop("num_q", None)
        for key, value in dict(latent_dim=latent_dim, mlp_dim=mlp_dim, enc_dim=enc_dim, num_enc_layers=num_enc_layers).items():
            if value is not None:
                arch[key] = value
        self.model_size = model_size
        model_kwargs = dict(
            **arch,
            num_q=num_q_final,
            critic=cfg["critic"],
            episodic=self.episodic,
            policy_squash=cfg["policy_squash"],
            log_std_min=cfg["log_std_min"],
            log_std_max=cfg["log_std_max"],
            learned_prior=self.prior in ("forward", "reverse"),
            kl_value=kl_value,
            critic_init=cfg["critic_init"],
            simnorm_layout=simnorm_layout,
        )
        planner_kwargs = dict(
            horizon=horizon, iterations=self.iterations, num_samples=num_samples, num_elites=num_elites,
            num_pi_trajs=num_pi_trajs, temperature=temperature, min_std=min_std, max_std=max_std, gamma=self.gamma,
        )
        MPPIPlanner(**planner_kwargs)  # validate before anything is built
        self.policy_kwargs.setdefault("model_kwargs", model_kwargs)
        self.policy_kwargs.setdefault("planner_kwargs", planner_kwargs)
        self.policy_kwargs.setdefault("enc_lr_scale", enc_lr_scale)
        self.policy_kwargs.setdefault("scale_tau", tau)
        self.policy_kwargs.setdefault("planner_dtype", planner_dtype)
        self.policy_kwargs.setdefault("compile", compile)
        self.replay_buffer_kwargs.setdefault("horizon", horizon)

        self._n_policy_updates = 0
        self._pretrained = False
        self._plan_mean: Optional[torch.Tensor] = None
        self._episode_start: Optional[np.ndarray] = None
        self._pending_plan: Optional[tuple[np.ndarray, np.ndarray]] = None
        self.log_kl_coef: Optional[torch.Tensor] = None
        self.kl_coef_optimizer: Optional[torch.optim.Optimizer] = None
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _validate(cfg, kl_value, horizon, num_samples, num_elites, num_pi_trajs, target_kl, kl_warmup,
                  reanalyze_batch_size, learning_starts, pretrain_updates, gamma, batch_size, action_noise) -> None:
        lam, _ = parse_kl_coef(cfg["kl_coef"])
        if cfg["prior"] not in PRIORS:
            raise ValueError(f"unknown prior {cfg['prior']!r}; supported priors: {list(PRIORS)}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if num_elites > num_samples:
            raise ValueError(f"num_elites ({num_elites}) must be <= num_samples ({num_samples})")
        if num_pi_trajs >= num_samples:
            raise ValueError(f"num_pi_trajs ({num_pi_trajs}) must be < num_samples ({num_samples})")
        if cfg["critic"] not in ("q", "v"):
            raise ValueError(f"critic must be 'q' or 'v', got {cfg['critic']!r}")
        if cfg["critic"] == "v" and not math.isinf(lam):
            raise ValueError("critic='v' (BMPC's V critic) supports only kl_coef=inf; use critic='q' for finite or auto λ")
        if kl_warmup > 0 and cfg["critic"] == "v":
            raise ValueError("kl_warmup forces λ = 0, which needs a Q critic; critic='v' (BMPC) supports only λ = ∞")
        if kl_value and math.isinf(lam):
            raise ValueError("kl_value=True needs a finite (or 'auto') kl_coef: with λ = ∞ there is no return term")
        if cfg["target_reduce"] not in ("min", "avg"):
            raise ValueError(f"target_reduce must be 'min' or 'avg', got {cfg['target_reduce']!r}")
        if not (target_kl > 0 and math.isfinite(target_kl)):
            raise ValueError(f"target_kl must be finite and > 0, got {target_kl}")
        if kl_warmup < 0 or reanalyze_batch_size < 1 or cfg["reanalyze_interval"] < 0:
            raise ValueError("kl_warmup and reanalyze_interval must be >= 0 and reanalyze_batch_size >= 1")
        if learning_starts != "auto" and int(learning_starts) < 0:
            raise ValueError(f"learning_starts must be >= 0 or 'auto', got {learning_starts}")
        if pretrain_updates != "auto" and int(pretrain_updates) < 0:
            raise ValueError(f"pretrain_updates must be >= 0 or 'auto', got {pretrain_updates}")
        if gamma != "auto" and not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1] or 'auto', got {gamma}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if action_noise is not None:
            raise ValueError("POMPC explores with the planner's own noise; action_noise is not supported")

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.kl_coef_auto:
            self.log_kl_coef = torch.log(torch.ones(1, device=self.device) * self.kl_coef_init).requires_grad_(True)
            self.kl_coef_optimizer = torch.optim.Adam([self.log_kl_coef], lr=self.lr_schedule(1))
        acting = self.policy.planner_kwargs
        samples = self.reanalyze_num_samples or acting["num_samples"]
        self._reanalyze_planner = MPPIPlanner(
            **{
                **acting,
                "horizon": self.reanalyze_horizon,
                "num_samples": samples,
                "num_elites": min(acting["num_elites"], samples),
                "num_pi_trajs": min(acting["num_pi_trajs"], samples - 1),
            }
        )
        if self.policy.compile:
            check_compile_backend(self.device)
        self._update_fns = self._build_update_fns(self.policy.compile, self.device, self.update_dtype)
        # reanalyzed π^P on its way to the host buffer: (rows, envs, host tensor, CUDA event or None)
        self._plan_writes: list[tuple[np.ndarray, np.ndarray, torch.Tensor, Any]] = []
        self._restore_rng_states()

    @staticmethod
    def _build_update_fns(compile_: bool, device: torch.device, dtype: str) -> dict[str, Callable[..., Any]]:
        """The forward passes of an update (targets, world-model loss, prior loss, policy terms); with
        ``compile=True`` each goes through ``torch.compile`` (fused element-wise kernels, forward and backward).
        Backward passes and optimiser steps stay eager; so does the optional Q̃ step (``kl_value``). No CUDA
        graphs here: an update's outputs (logged losses) outlive the next replay of a graph."""
        fns: dict[str, Callable[..., Any]] = {
            "targets": obj.critic_targets,
            "world_model": obj.world_model_loss,
            "prior": obj.prior_fit_loss,
            "policy": obj.policy_terms,
        }
        if AUTOCAST_DTYPES[dtype] != torch.float32:
            fns = {name: _autocast(fn, device.type, dtype) for name, fn in fns.items()}
        if compile_:
            # on CPU the compiler's own dropout RNG is scalar code, ~4x slower than ATen's bernoulli: use ATen's
            options = {"fallback_random": True} if device.type == "cpu" else None
            fns = {name: torch.compile(fn, dynamic=False, options=options) for name, fn in fns.items()}
        return fns

    def _update_autocast(self) -> Any:
        """Autocast context of the update's eager forward passes (the Q̃ step), as ``update_dtype`` asks."""
        return autocast(self.device.type, self.update_dtype)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_reanalyze_planner", "_plan_mean", "_pending_plan", "_update_fns",
                "_plan_writes"]

    def _get_rng_states(self) -> dict[str, Any]:
        """The global RNG states (python, numpy, torch CPU and CUDA) and the action space's, saved with the model."""
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "action_space": self.action_space.np_random.bit_generator.state,
        }
        if self.device.type == "cuda" and torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _restore_rng_states(self) -> None:
        """At the end of ``load``: continue the random streams saved by :meth:`save` instead of SB3's re-seeding.
        Done for seeded models only (SB3 re-seeds only those); the env's own RNG cannot be saved in general."""
        states = self.__dict__.pop("_rng_states", None)
        if states is None or self.seed is None:
            return
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])
        self.action_space.np_random.bit_generator.state = states["action_space"]
        if "cuda" in states and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"], self.device)

    def save(self, path: Any, exclude: Optional[list[str]] = None, include: Optional[list[str]] = None) -> None:
        """SB3's ``save`` plus the RNG states: for a seeded model, ``load`` + ``load_replay_buffer`` +
        ``learn(n, reset_num_timesteps=False)`` then continues exactly like an uninterrupted run (given the same env
        state at the boundary, e.g. a new episode). :param path: file or file-like object :param exclude: extra
        attributes not to save :param include: attributes to save although excluded by default"""
        self._rng_states = self._get_rng_states()
        try:
            super().save(path, exclude=exclude, include=include)
        finally:
            del self._rng_states

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts = ["policy", "policy.optimizer", "policy.pi_optimizer"]
        if self.policy.prior_optimizer is not None:
            state_dicts.append("policy.prior_optimizer")
        if self.policy.kl_critic_optimizer is not None:
            state_dicts.append("policy.kl_critic_optimizer")
        variables: list[str] = []
        if self.kl_coef_optimizer is not None:
            state_dicts.append("kl_coef_optimizer")
            variables.append("log_kl_coef")
        return state_dicts, variables

    def _update_learning_rate(self, optimizers) -> None:  # type: ignore[override]
        """SB3's schedule update, keeping the encoder's lr scale."""
        lr = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    # ------------------------------------------------------------------------------------------ acting
    def _setup_learn(self, total_timesteps: int, callback: MaybeCallback = None, reset_num_timesteps: bool = True,
                     tb_log_name: str = "run", progress_bar: bool = False):
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if self._episode_start is None or reset_num_timesteps or self._plan_mean is None:
            self._episode_start = np.ones(self.n_envs, dtype=bool)
        return result

    def current_kl_coef(self) -> float:
        """λ now (forced to 0 during ``kl_warmup``)."""
        return float(self._kl_coef_tensor())

    def _sample_action(self, learning_starts: int, action_noise: Optional[ActionNoise] = None, n_envs: int = 1):
        if self.num_timesteps < learning_starts:
            unscaled = np.array([self.action_space.sample() for _ in range(n_envs)])
            scaled = self.policy.scale_action(unscaled)
            self._pending_plan = None
        else:
            obs, _ = self.policy.obs_to_flat_tensor(self._last_obs)  # type: ignore[arg-type]
            warm = self._plan_mean
            if warm is not None and self._episode_start is not None:
                keep = torch.as_tensor(~self._episode_start, dtype=torch.float32, device=self.device)
                warm = warm * keep.reshape(-1, 1, 1)
            self.policy.set_training_mode(False)
            result = self.policy.plan(obs, warm, deterministic=False)
            self._plan_mean = result.mean
            # one device → host transfer per env step: action and π^P together
            host = torch.cat([result.action, result.plan_mean, result.plan_std], dim=-1).float().cpu().numpy()
            action, plan_mean, plan_std = np.split(host, 3, axis=-1)
            scaled = action.reshape(n_envs, *self.action_space.shape)
            self._pending_plan = (plan_mean, plan_std)
        action = self.policy.unscale_action(scaled)
        return action, scaled

    def _store_transition(self, replay_buffer, buffer_action, new_obs, reward, dones, infos) -> None:  # type: ignore[override]
        # a callback may have changed ``buffer_actions`` in place: the buffer holds finite actions in [−1, 1] only
        if not np.all(np.isfinite(buffer_action)):
            raise ValueError(f"non-finite action {buffer_action} at timestep {self.num_timesteps} (changed by a callback?)")
        buffer_action = np.clip(buffer_action, -1.0, 1.0)
        if not np.all(np.isfinite(new_obs)):
            bad = np.where(~np.all(np.isfinite(np.asarray(new_obs).reshape(len(dones), -1)), axis=1))[0]
            raise ValueError(
                f"the environment returned a non-finite observation (NaN or inf) in env(s) {bad.tolist()} at "
                f"timestep {self.num_timesteps}; training stopped before it reached the replay buffer"
            )
        if not np.all(np.isfinite(reward)):
            raise ValueError(f"the environment returned a non-finite reward {reward} at timestep {self.num_timesteps}")
        # SB3 stores the terminal observation of a finished episode as next_obs, and the first obs comes from reset()
        for i, (done, info) in enumerate(zip(dones, infos)):
            terminal = info.get("terminal_observation") if done else None
            if terminal is not None and not np.all(np.isfinite(terminal)):
                raise ValueError(
                    f"the environment returned a non-finite terminal observation (NaN or inf) in env {i} at timestep "
                    f"{self.num_timesteps}; training stopped before it reached the replay buffer"
                )
        if isinstance(self._last_obs, np.ndarray) and not np.all(np.isfinite(self._last_obs)):
            raise ValueError(
                f"the environment returned a non-finite observation (NaN or inf) from reset() before timestep "
                f"{self.num_timesteps}; training stopped before it reached the replay buffer"
            )
        if self._pending_plan is None:
            replay_buffer.set_next_plan(None, None)  # type: ignore[attr-defined]
        else:
            replay_buffer.set_next_plan(*self._pending_plan)  # type: ignore[attr-defined]
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)
        self._episode_start = np.asarray(dones, dtype=bool).copy()
        if self._episodic_auto and not self.episodic and any(
            done and not info.get("TimeLimit.truncated", False) for done, info in zip(dones, infos)
        ):
            self._saw_termination = True

    # ------------------------------------------------------------------------------------------ learning
    def _enable_termination_head(self) -> None:
        """``episodic="auto"``: the env produced a true termination, so add the termination head (TD-MPC2's
        ``episodic``) before the next update; saved models keep it."""
        self.episodic = True
        self.policy.enable_termination_head()
        self.policy_kwargs["model_kwargs"]["episodic"] = True
        if self.verbose >= 1:
            print("POMPC: the environment terminates episodes; termination head enabled (episodic=True)")

    def train(self, gradient_steps: int, batch_size: int = 256) -> None:
        if self.replay_buffer.num_rows() < self.horizon:
            # e.g. ``load`` without ``load_replay_buffer``: no window of H steps yet, updates resume once there is one
            return
        if self._saw_termination and not self.episodic:
            self._enable_termination_head()
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizers() + ([self.kl_coef_optimizer] if self.kl_coef_optimizer else []))
        logs: list[dict[str, torch.Tensor]] = []
        if not self._pretrained:
            for _ in range(self.pretrain_updates):
                logs.append(self._update(batch_size, pretrain=True))
            self._pretrained = True
        for _ in range(gradient_steps):
            logs.append(self._update(batch_size, pretrain=False))
        self._n_updates += len(logs)
        self._record(logs)  # one host transfer: every reanalyze copy queued before it has run
        self._flush_plan_writes()

    def _record(self, logs: list[dict[str, torch.Tensor]]) -> None:
        """Log the mean of every term over this call's updates (ONE host transfer for all of them)."""
        if not logs:
            return
        keys = sorted({k for log in logs for k in log})
        means = torch.stack(
            [torch.stack([log[k].float().reshape(()) for log in logs if k in log]).mean() for k in keys]
        ).tolist()
        bad = [k for k, v in zip(keys, means) if not math.isfinite(v) and k.endswith("loss")]
        if bad:  # on CUDA the per-loss check is skipped to avoid host syncs: this is where it is caught
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} before update {self._n_updates} (timestep {self.num_timesteps}); "
                "training stopped"
            )
        for key, value in zip(keys, means):  # averaged over every train() call between two dumps
            self.logger.record_mean(f"train/{key}", value)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/kl_coef", self.current_kl_coef())
        self.logger.record("train/q_scale", self.policy.q_scale.value.item())
        self.logger.record("train/kl_scale", self.policy.kl_scale.value.item())

    def _reanalyze(self, batch: POMPCReplayBufferSamples) -> POMPCReplayBufferSamples:
        """Lazy reanalyze (BMPC §4.4): re-plan obs[0..H−1] of the first windows with the current model (no warm
        start, exploration log σ bounds for the policy trajectories) and write π^P into the buffer and the batch."""
        self._flush_plan_writes(wait=False)
        H, nb = self.horizon, min(self.reanalyze_batch_size, batch.observations.shape[1])
        obs = batch.observations[:H, :nb].reshape(H * nb, -1)
        self.policy.set_training_mode(False)
        res = self.policy.plan(obs, None, deterministic=False, planner=self._reanalyze_planner,
                               pi_log_std_bounds=self.expl_log_std_bounds)
        self.policy.set_training_mode(True)
        mean, std = res.plan_mean.reshape(H, nb, -1), res.plan_std.reshape(H, nb, -1)
        rows = batch.rows[:, :nb]
        envs = np.broadcast_to(batch.env_indices[None, :nb], rows.shape)
        # to the host buffer without waiting: non-blocking copy now, written by ``_flush_plan_writes`` later
        host = torch.cat([mean, std], dim=-1).reshape(H * nb, -1).to("cpu", non_blocking=True)
        event = None
        if mean.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._plan_writes.append((rows.reshape(-1), envs.reshape(-1), host, event))
        plan_mean, plan_std, has_plan = batch.plan_mean.clone(), batch.plan_std.clone(), batch.has_plan.clone()
        plan_mean[:, :nb], plan_std[:, :nb], has_plan[:, :nb] = mean, std, 1.0
        return batch._replace(plan_mean=plan_mean, plan_std=plan_std, has_plan=has_plan)

    def _flush_plan_writes(self, wait: bool = True) -> None:
        """Write the reanalyzed π^P copied by ``_reanalyze`` into the replay buffer, oldest first.

        :param wait: wait for copies still running (for each copy only, not the whole device); False writes the
            finished ones and keeps the others pending (no host sync)
        """
        while self._plan_writes:
            rows, envs, host, event = self._plan_writes[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            mean, std = np.split(host.numpy(), 2, axis=-1)
            self.replay_buffer.update_plans(rows, envs, mean, std)
            self._plan_writes.pop(0)

    def _kl_coef_tensor(self) -> Union[torch.Tensor, float]:
        if self._n_policy_updates < self.kl_warmup:
            return 0.0
        if self.log_kl_coef is not None:
            return self.log_kl_coef.detach().exp()
        return self.kl_coef_init

    def _update(self, batch_size: int, pretrain: bool) -> dict[str, torch.Tensor]:
        """One PO-MPC update (DESIGN §3): targets → world model + critic → prior → π_s → λ → Q̃ → targets."""
        model, policy = self.policy.model, self.policy
        batch = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
        logs: dict[str, torch.Tensor] = {}
        # during the j-th non-pretrain update the counter is j − 1 (λ is 0 for updates 1..kl_warmup)
        if not pretrain and self.reanalyze_interval and (self._n_policy_updates + 1) % self.reanalyze_interval == 0:
            batch = self._reanalyze(batch)
        obs, actions, rewards = batch.observations, batch.actions, batch.rewards
        terminated = batch.terminated  # true terminations only: time-limit truncations bootstrap
        H, B = actions.shape[:2]

        fns = self._update_fns
        # 1. targets (no grad, eval mode)
        model.eval()
        z_enc, value_target = fns["targets"](model, obs, rewards, terminated, self.gamma, self.cfg["target_reduce"])

        # 2. world model and critic
        model.train()
        wm_loss, parts, zs = fns["world_model"](
            model, obs, actions, rewards, terminated, value_target, z_enc[1:], self.rho, **self.loss_coefs
        )
        self._check_finite(wm_loss, "world-model loss")
        policy.optimizer.zero_grad(set_to_none=True)
        wm_loss.backward()
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(
            [p for g in policy.optimizer.param_groups for p in g["params"]], self.grad_clip_norm
        )
        policy.optimizer.step()
        logs.update(parts)
        logs["value_target_mean"] = value_target.mean()
        zs = zs.detach()

        # 3. prior π_p on buffer planner stats (its latents: the first H, where π^P exists)
        if model.prior is not None:
            p_loss = fns["prior"](model, zs[:H], batch.plan_mean, batch.plan_std, self.prior, self.rho)
            self._check_finite(p_loss, "prior loss")
            policy.prior_optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            p_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.prior.parameters(), self.grad_clip_norm)
            policy.prior_optimizer.step()  # type: ignore[union-attr]
            logs["prior_loss"] = p_loss.detach()

        # 4. sampling policy π_s with λ
        if not pretrain or self.cfg["pretrain_policy"]:
            logs.update(self._policy_step(zs, batch))

        # 5. KL-regularised critic Q̃
        if model.kl_critic is not None:
            logs.update(self._kl_critic_step(z_enc, batch, rewards, terminated))

        # 6. soft target update
        model.soft_update_targets(self.tau)
        model.eval()
        if not pretrain:
            self._n_policy_updates += 1
        return logs

    @property
    def _kl_reference(self) -> str:
        """π_ref of every KL: "planner" (the buffer's π^P) or "prior" (the learned π_p)."""
        return "planner" if self.prior == "planner" else "prior"

    def _policy_step(self, zs: torch.Tensor, batch: POMPCReplayBufferSamples) -> dict[str, torch.Tensor]:
        model, policy = self.policy.model, self.policy
        H = batch.actions.shape[0]
        lam = self._kl_coef_tensor()
        lam_is_zero = isinstance(lam, float) and lam == 0.0
        lam_is_inf = isinstance(lam, float) and math.isinf(lam)
        # with the planner prior the KL exists on the first H latents only (as BMPC); otherwise all H + 1 (TD-MPC2)
        uses_planner_kl = self.prior == "planner" and (self.kl_coef_auto or self.kl_coef_init != 0.0)
        T = H if uses_planner_kl else H + 1
        out, kl, q, kl_raw = self._update_fns["policy"](
            model, zs[:T], batch.plan_mean, batch.plan_std, self._kl_reference, not lam_is_inf,
        )
        logs: dict[str, torch.Tensor] = {}
        if q is not None:
            policy.q_scale.update(q[0])
            logs["q_mean"] = q.detach().mean()
        else:
            policy.kl_scale.update(kl[0])
        loss = obj.policy_loss(q, None if lam_is_zero else kl, out.scaled_entropy, lam, self.rho, self.entropy_coef,
                               policy.q_scale.value, policy.kl_scale.value)
        self._check_finite(loss, "policy loss")
        policy.pi_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.pi.parameters(), self.grad_clip_norm)
        policy.pi_optimizer.step()
        kl_d = kl.detach()
        logs.update(
            policy_loss=loss.detach(), kl_mean=kl_d.mean(), kl_std=kl_d.std(), kl_planner_mean=kl_raw.mean(),
            kl_planner_std=kl_raw.std(), policy_std=out.std.detach().mean(), planner_std=batch.plan_std.mean(),
            entropy=out.scaled_entropy.detach().mean(),
        )
        if self.kl_coef_optimizer is not None and self._n_policy_updates >= self.kl_warmup:
            lam_loss = obj.kl_coef_loss(self.log_kl_coef, kl_d, self.target_kl)  # type: ignore[arg-type]
            self.kl_coef_optimizer.zero_grad(set_to_none=True)
            lam_loss.backward()
            self.kl_coef_optimizer.step()
            logs["kl_coef_loss"] = lam_loss.detach()
        return logs

    def _kl_critic_step(self, z_enc: torch.Tensor, batch: POMPCReplayBufferSamples, rewards: torch.Tensor,
                        terminated: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train Q̃ on encoder latents with buffer actions toward the KL-regularised target."""
        model, policy = self.policy.model, self.policy
        H = batch.actions.shape[0]
        # π^P exists at obs[t+1] only for t + 1 <= H − 1 with the planner prior: drop the last step there
        T = H - 1 if self.prior == "planner" else H
        if T < 1:
            return {}
        lam = self._kl_coef_tensor()
        with torch.no_grad(), self._update_autocast():
            z_next = z_enc[1 : T + 1]
            out = model.pi(z_next)
            next_kl = obj.kl_to_reference(model, out, z_next, batch.plan_mean[1 : T + 1], batch.plan_std[1 : T + 1],
                                          self._kl_reference)
            q_next = model.critic_value(z_next.reshape(-1, z_next.shape[-1]), out.action.reshape(-1, out.action.shape[-1]),
                                        reduce=self.cfg["target_reduce"], target=True, kl=True).reshape(T, -1, 1)
            y = obj.kl_value_target(rewards[:T], terminated[:T], q_next, next_kl, lam, self.gamma)
        z = z_enc[:T].reshape(-1, z_enc.shape[-1])
        with self._update_autocast():
            logits = model.critic_logits(z, batch.actions[:T].reshape(-1, batch.actions.shape[-1]), kl=True)
        loss = obj.ensemble_soft_ce_loss(logits.reshape(model.num_q, T, -1, logits.shape[-1]), y, model.two_hot, self.rho)
        self._check_finite(loss, "KL-critic loss")
        policy.kl_critic_optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.kl_critic.parameters(), self.grad_clip_norm)  # type: ignore[union-attr]
        policy.kl_critic_optimizer.step()  # type: ignore[union-attr]
        return {"kl_value_loss": loss.detach()}

    def _check_finite(self, loss: torch.Tensor, name: str) -> None:
        # one host sync per loss on CPU is cheap; on GPU it is skipped (``_record`` checks once per train() call)
        if loss.device.type == "cpu" and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite {name} at update {self._n_updates} (timestep {self.num_timesteps}); training stopped "
                "before the optimiser step, so the parameters are the last finite ones"
            )

    def learn(
        self: SelfPOMPC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "POMPC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfPOMPC:
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)

    def predict(
        self,
        observation: Union[np.ndarray, dict[str, np.ndarray]],
        state: Optional[tuple[np.ndarray, ...]] = None,
        episode_start: Optional[np.ndarray] = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Optional[tuple[np.ndarray, ...]]]:
        """SB3's ``predict`` (``state`` = the planner's warm-start mean, see :meth:`POMPCPolicy.predict`). Dict
        observations of an env that POMPC flattened at construction are flattened the same way.

        :param observation: one observation or a batch
        :param state: the previous call's returned state, or None
        :param episode_start: (n_envs,) True where an episode starts
        :param deterministic: no exploration noise on the executed action
        :return: actions in the env's bounds and the new state
        """
        if isinstance(observation, dict) and self.dict_observation_space is not None:
            observation = _flatten_dict_obs(self.dict_observation_space, observation)
        return super().predict(observation, state, episode_start, deterministic)

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfPOMPC],
        path: Any,
        env: Optional[GymEnv] = None,
        device: Union[torch.device, str] = "auto",
        custom_objects: Optional[dict[str, Any]] = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfPOMPC:
        """SB3's ``load``; a gymnasium.Env with Dict observations of Box entries is flattened as at construction.

        :param path: the saved model (zip file or file-like object)
        :param env: the env to continue training with (None: predict only)
        :param device: device of the loaded model
        :param custom_objects: replacements for saved objects that cannot be deserialised
        :param print_system_info: print the saving and loading system information
        :param force_reset: reset the env before training (SB3 default; a new episode starts after loading)
        :param kwargs: attributes to change on the loaded model
        """
        _check_model_file(path)
        env = _flatten_dict_env(env) if env is not None else None
        return super().load(path, env=env, device=device, custom_objects=custom_objects,  # type: ignore[return-value]
                            print_system_info=print_system_info, force_reset=force_reset, **kwargs)
