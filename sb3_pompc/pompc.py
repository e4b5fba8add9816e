"""POMPC: the PO-MPC algorithm as a Stable-Baselines3 off-policy algorithm.

The settings live in :class:`~sb3_pompc.config.POMPCConfig`, every equation in ``objectives.py``; this class holds
the SB3 hooks (acting, storing π^P next to each transition, saving) and the order of one update.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, ClassVar, Optional, TypeVar, Union

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule

from sb3_pompc.buffers import POMPCReplayBuffer, POMPCReplayBufferSamples
from sb3_pompc.checks import (RewardScaleCheck, check_model_file, check_replay_buffer_kwargs, check_spaces,
                              check_transition, prepare_env)
from sb3_pompc.config import FIELDS, POMPCConfig, resolve_config
from sb3_pompc.loading import update_loaded_attributes
from sb3_pompc.policies import MlpPolicy, POMPCPolicy
from sb3_pompc.reanalyze import Reanalyzer
from sb3_pompc.rng import get_rng_states, set_rng_states
from sb3_pompc.speedups import check_compile_backend, warn_if_bf16_is_emulated
from sb3_pompc.update import (UpdateSite, build_update_fns, kl_coef_now, kl_coef_step, kl_critic_step, kl_mode_now,
                              policy_step, prior_step, record_logs, soft_update, world_model_step)

__all__ = ["POMPC"]

SelfPOMPC = TypeVar("SelfPOMPC", bound="POMPC")


class POMPC(OffPolicyAlgorithm):
    """PO-MPC: planning with MPPI on a TD-MPC2 world model, with a sampling policy trained by a KL-regularised
    objective toward an adaptive prior (arXiv 2510.04280). λ = 0 is TD-MPC2, λ = ∞ is BMPC.

    :param policy: "MlpPolicy" or a :class:`~sb3_pompc.policies.POMPCPolicy` subclass
    :param env: the environment (Box actions, Box or flattenable Dict observations) or its id
    :param preset: "pompc" (paper default), "tdmpc2" or "bmpc"; explicit keyword arguments override it
    :param kl_coef: λ ≥ 0, ``float("inf")``, "auto" or "auto_<init>" (dual descent toward ``target_kl``)
    :param prior: π_ref: "planner" (the buffer's π^P), "forward" or "reverse" (a prior network π_p fitted by that KL)
    :param kl_value: also train a KL-regularised critic Q̃ that π_s maximises (the planner keeps Q)
    :param mask_unplanned: keep warm-up rows (no real plan) out of every KL and of π_p's fit
    :param target_kl: target KL (nats per action dim) of ``kl_coef="auto"``
    :param kl_warmup: updates with λ = 0 before the KL terms start (the paper's N_s); "auto" = the pretraining burst
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
    :param deterministic_action: ``predict(deterministic=True)``'s action: "elite", "mean" or "sample" (TD-MPC2's)
    :param model_size: 1, 5, 19, 48 or 317 (million parameters), or None to give the dims below
    :param latent_dim: overrides the preset's latent size
    :param mlp_dim: overrides the preset's hidden size
    :param enc_dim: overrides the preset's encoder hidden size
    :param num_enc_layers: overrides the preset's encoder depth
    :param simnorm_layout: "strided" or "contiguous" SimNorm groups (the same model, see :class:`~sb3_pompc.math.SimNorm`)
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
    :param episodic: termination head: True, False or "auto" (known terminating envs, or from the first termination)
    :param entropy_coef: β of the entropy bonus (1e-4)
    :param rho: temporal weight ρ (0.5)
    :param consistency_coef: latent consistency weight (20)
    :param reward_coef: reward loss weight (0.1)
    :param value_coef: value loss weight (0.1)
    :param termination_coef: termination loss weight (1)
    :param enc_lr_scale: encoder lr multiplier (0.3)
    :param grad_clip_norm: gradient clipping norm (20)
    :param planner_dtype: "float32" or "bfloat16" (mixed-precision planning)
    :param update_dtype: "float32" or "bfloat16" (the update's forward passes under autocast, fp32 weights)
    :param compile: plan and update through ``torch.compile`` (~1 min per shape on a CPU: for long runs)
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
    config: POMPCConfig
    reanalyzer: Reanalyzer

    def __init__(
        self,
        policy: Union[str, type[POMPCPolicy]],
        env: Union[GymEnv, str],
        preset: str = "pompc",
        kl_coef: Union[float, str, None] = None,
        prior: Optional[str] = None,
        kl_value: Optional[bool] = None,
        mask_unplanned: Optional[bool] = None,
        target_kl: float = 0.5,
        kl_warmup: Union[int, str] = "auto",
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
        temperature: float = 0.5, min_std: float = 0.05, max_std: float = 2.0,
        deterministic_action: str = "elite",
        model_size: Optional[int] = 5,
        latent_dim: Optional[int] = None, mlp_dim: Optional[int] = None,
        enc_dim: Optional[int] = None, num_enc_layers: Optional[int] = None,
        simnorm_layout: str = "strided",
        num_q: Optional[int] = None,
        critic: Optional[str] = None,
        target_reduce: Optional[str] = None,
        policy_squash: Optional[str] = None,
        log_std_min: Optional[float] = None, log_std_max: Optional[float] = None,
        critic_init: Optional[str] = None,
        pretrain_policy: Optional[bool] = None,
        reanalyze_interval: Optional[int] = None,
        reanalyze_batch_size: int = 20,
        reanalyze_horizon: Optional[int] = None,
        reanalyze_num_samples: Optional[int] = None,
        expl_log_std_min: float = -2.0, expl_log_std_max: float = 1.0,
        episodic: Union[bool, str] = "auto",
        entropy_coef: float = 1e-4,
        rho: float = 0.5,
        consistency_coef: float = 20.0, reward_coef: float = 0.1, value_coef: float = 0.1, termination_coef: float = 1.0,
        enc_lr_scale: float = 0.3,
        grad_clip_norm: float = 20.0,
        planner_dtype: str = "float32", update_dtype: str = "float32",
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
        # every POMPCConfig field among the arguments above, resolved in one place (sb3_pompc.config)
        settings = {name: value for name, value in locals().items() if name in FIELDS and name != "preset"}
        if action_noise is not None:
            raise ValueError("POMPC explores with the planner's own noise; action_noise is not supported")
        if replay_buffer_class is not None and not issubclass(replay_buffer_class, POMPCReplayBuffer):
            raise ValueError("replay_buffer_class must be a POMPCReplayBuffer (sub)class: it stores planner stats")
        env, self.dict_observation_space = prepare_env(env)
        self.config = config = resolve_config(preset, env, **settings)
        check_replay_buffer_kwargs(replay_buffer_kwargs, config.horizon)
        super().__init__(
            policy, env, config.learning_rate, config.buffer_size, learning_starts=config.learning_starts,
            batch_size=config.batch_size, tau=config.tau, gamma=config.gamma, train_freq=config.train_freq,
            gradient_steps=config.gradient_steps, action_noise=None,
            replay_buffer_class=replay_buffer_class or POMPCReplayBuffer, replay_buffer_kwargs=replay_buffer_kwargs,
            policy_kwargs=policy_kwargs, stats_window_size=stats_window_size, tensorboard_log=tensorboard_log,
            verbose=verbose, device=device, seed=seed, sde_support=False, support_multi_env=True,
            supported_action_spaces=(spaces.Box,),
        )
        self._plan_mean: Optional[torch.Tensor] = None  # the planner's warm start per env
        self._pending_plan: Optional[tuple[np.ndarray, np.ndarray]] = None  # π^P of the action being stored
        if self.env is None and not _init_setup_model:
            return  # ``POMPC.load(path)`` without an env: every setting comes from the saved data
        check_spaces(self.observation_space, self.action_space)
        if verbose >= 1:
            print(config.describe())
        for key, value in config.policy_kwargs().items():  # explicit policy_kwargs win
            self.policy_kwargs.setdefault(key, value)
        self.replay_buffer_kwargs.setdefault("horizon", config.horizon)
        self._n_policy_updates = 0  # updates after the pretraining burst (lazy reanalyze counts these)
        self._pretrained = False  # the pretraining burst has run
        self._saw_termination = False  # the env terminated an episode (``episodic="auto"``)
        self._has_plans = False  # the buffer holds a row produced by the planner
        self._episode_start: Optional[np.ndarray] = None
        self.log_kl_coef: Optional[torch.Tensor] = None
        self.kl_coef_optimizer: Optional[torch.optim.Optimizer] = None
        if _init_setup_model:
            self._setup_model()

    def __getattr__(self, name: str) -> Any:
        """Settings read as attributes (``model.horizon``, ``model.prior``) come from :attr:`config`."""
        config = self.__dict__.get("config")
        if config is not None and not name.startswith("_") and hasattr(config, name):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------------------------------ construction
    def _setup_model(self) -> None:
        update_loaded_attributes(self.__dict__)  # ``load``: older files, and settings given to ``load``
        super()._setup_model()
        self._reward_check = RewardScaleCheck(self.config.gamma)
        if self.config.kl_mode == "learned":
            self.log_kl_coef = torch.log(torch.ones(1, device=self.device) * self.config.kl_coef_init).requires_grad_(True)
            self.kl_coef_optimizer = torch.optim.Adam([self.log_kl_coef], lr=self.lr_schedule(1))
        self.policy.dict_observation_space = self.dict_observation_space
        self.reanalyzer = Reanalyzer(self.policy, self.config, lambda: self.replay_buffer)
        if self.policy.compile:
            check_compile_backend(self.device)
        warn_if_bf16_is_emulated(self.device, planner_dtype=self.config.planner_dtype,
                                 update_dtype=self.config.update_dtype)
        self._update_fns = build_update_fns(self.config, self.device, self.policy.compile)
        states = self.__dict__.pop("_rng_states", None)
        if states is not None and self.seed is not None:  # ``load``: continue the saved streams (seeded models)
            set_rng_states(states, self.action_space, self.device)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "reanalyzer", "_plan_mean", "_pending_plan", "_update_fns",
                "_reward_check"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        optimizers = ("optimizer", "pi_optimizer", "prior_optimizer", "kl_critic_optimizer")
        state_dicts = ["policy"] + [f"policy.{name}" for name in optimizers if getattr(self.policy, name) is not None]
        if self.kl_coef_optimizer is None:
            return state_dicts, []
        return [*state_dicts, "kl_coef_optimizer"], ["log_kl_coef"]

    def save(self, path: Any, exclude: Optional[list[str]] = None, include: Optional[list[str]] = None) -> None:
        """SB3's ``save`` plus the RNG states: a seeded model that is loaded (with its replay buffer) continues
        exactly like an uninterrupted run (given the same env state at the boundary, e.g. a new episode).

        :param path: file or file-like object
        :param exclude: extra attributes not to save
        :param include: attributes to save although excluded by default
        """
        self._rng_states = get_rng_states(self.action_space, self.device)
        try:
            super().save(path, exclude=exclude, include=include)
        finally:
            del self._rng_states

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
        :param kwargs: settings to change (they take effect; those that define the networks are refused)
        """
        check_model_file(path)
        kwargs["_load_settings"] = {key: kwargs.pop(key) for key in list(kwargs) if key in FIELDS}
        env = prepare_env(env, check=False)[0] if env is not None else None
        return super().load(path, env=env, device=device, custom_objects=custom_objects,  # type: ignore[return-value]
                            print_system_info=print_system_info, force_reset=force_reset, **kwargs)

    def _update_learning_rate(self, optimizers) -> None:  # type: ignore[override]
        """SB3's schedule update, keeping the encoder's lr scale."""
        lr = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    # ------------------------------------------------------------------------------------------ acting
    def learn(
        self: SelfPOMPC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "POMPC",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfPOMPC:
        return super().learn(total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar)

    def _setup_learn(self, total_timesteps: int, callback: MaybeCallback = None, reset_num_timesteps: bool = True,
                     tb_log_name: str = "run", progress_bar: bool = False):
        resets = reset_num_timesteps or self._last_obs is None  # SB3 resets the env then
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if resets:  # the stored episodes end here: no window may run into the new reset observation
            self.replay_buffer.mark_episode_break()
        self.learning_starts = 0 if self._pretrained else self.config.learning_starts  # the warm-up runs once
        if self._episode_start is None or reset_num_timesteps or self._plan_mean is None:
            self._episode_start = np.ones(self.n_envs, dtype=bool)
        return result

    def _sample_action(self, learning_starts: int, action_noise: Optional[ActionNoise] = None, n_envs: int = 1):
        if not self._pretrained:  # random warm-up until the first updates have run: no plan behind these rows
            unscaled = np.array([self.action_space.sample() for _ in range(n_envs)])
            scaled = self.policy.scale_action(unscaled)
            self._pending_plan = None
        else:  # one batched plan for every env, warm-started from the previous step's
            start = time.perf_counter()
            action, self._plan_mean, self._pending_plan = self.policy.act(self._last_obs, self._plan_mean,  # type: ignore[arg-type]
                                                                          self._episode_start)
            self.logger.record_mean("time/plan_ms", 1000.0 * (time.perf_counter() - start))
            scaled = action.reshape(n_envs, *self.action_space.shape)
        action = self.policy.unscale_action(scaled)
        return action, scaled

    def _store_transition(self, replay_buffer, buffer_action, new_obs, reward, dones, infos) -> None:  # type: ignore[override]
        check_transition(buffer_action, self._last_obs, new_obs, reward, dones, infos, self.num_timesteps)
        buffer_action = np.clip(buffer_action, -1.0, 1.0)  # a callback may have moved it out of the box
        replay_buffer.set_next_plan(*(self._pending_plan or (None, None)))  # type: ignore[attr-defined]
        self._has_plans = self._has_plans or self._pending_plan is not None
        self._reward_check.observe(reward)
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)
        self._episode_start = np.asarray(dones, dtype=bool).copy()
        if self.config.detect_termination and not self.config.episodic and any(
            done and not info.get("TimeLimit.truncated", False) for done, info in zip(dones, infos)
        ):
            self._saw_termination = True

    def current_kl_coef(self) -> float:
        """λ of the next update (0 during ``kl_warmup``, inf for λ = ∞)."""
        mode = self._kl_mode()
        return math.inf if mode == "infinite" else float(kl_coef_now(self.config, mode, self.log_kl_coef, self.device))

    # ------------------------------------------------------------------------------------------ learning
    def train(self, gradient_steps: int, batch_size: int = 256) -> None:
        if self.replay_buffer.num_rows() < self.config.horizon:
            return  # e.g. ``load`` without ``load_replay_buffer``: updates resume once a window of H steps exists
        if self._saw_termination and not self.config.episodic:  # ``episodic="auto"``: add the termination head
            self.config = dataclasses.replace(self.config, episodic=True)
            self.policy.enable_termination_head()
            self.policy_kwargs["model_kwargs"]["episodic"] = True  # a saved model rebuilds it
            if self.verbose >= 1:
                print("POMPC: the environment terminates episodes; termination head enabled (episodic=True)")
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizers() + ([self.kl_coef_optimizer] if self.kl_coef_optimizer else []))
        logs: list[dict[str, torch.Tensor]] = []
        start = time.perf_counter()
        if not self._pretrained:  # the pretraining burst, once, when learning starts
            self._reward_check.before_learning()
            logs += [self._update(batch_size, pretrain=True) for _ in range(self.config.pretrain_updates)]
            self._pretrained = True
        logs += [self._update(batch_size, pretrain=False) for _ in range(gradient_steps)]
        if logs:  # one host transfer, after every reanalyze copy queued
            kl_coef = self.log_kl_coef.detach().exp() if self._kl_mode() == "learned" else self.current_kl_coef()
            record_logs(self.logger, self.policy, logs, (time.perf_counter() - start) / len(logs), self._where(), kl_coef)
        self.reanalyzer.flush()

    def update(self, batch_size: Optional[int] = None, eager: bool = False) -> dict[str, torch.Tensor]:
        """One PO-MPC update with this agent's settings (what ``learn`` runs every ``train_freq`` steps after the
        pretraining burst), on a batch sampled from the replay buffer.

        :param batch_size: windows in the batch (None: ``batch_size``)
        :param eager: run the update's forward passes without ``torch.compile`` (same numbers; to count FLOPs)
        :return: the logged terms of this update, as tensors on the device
        """
        self.policy.set_training_mode(True)
        fns = build_update_fns(self.config, self.device, compile_=False) if eager else None
        return self._update(batch_size or self.batch_size, pretrain=False, fns=fns)

    def _update(self, batch_size: int, pretrain: bool, fns: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        """One PO-MPC update (DESIGN §3): targets → world model + critic → prior → π_s → λ → Q̃ → targets."""
        config, policy, model, fns = self.config, self.policy, self.policy.model, fns or self._update_fns
        batch = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
        # lazy reanalyze: re-plan a few windows with the current model (counted in policy updates)
        if not pretrain and self.reanalyzer.due(self._n_policy_updates):
            batch = self.reanalyzer.reanalyze(batch)
        where = self._where()
        # 1. value targets from the target critic (no grad, eval mode; true terminations only)
        model.eval()
        z_enc, value_target = fns["targets"](model, batch.observations, batch.rewards, batch.terminated, self.gamma,
                                             config.target_reduce)
        # 2. world model and critic: latent rollout, consistency, reward, value (and termination) losses
        logs, zs = world_model_step(policy, fns, batch, z_enc, value_target, config, where)
        # 3. prior π_p on the buffer's planner stats
        if model.prior is not None:
            logs.update(prior_step(policy, fns, zs, batch, config, where))
        # 4. sampling policy π_s with λ, then 5. λ by dual descent (kl_coef="auto", after kl_warmup)
        if not pretrain or config.pretrain_policy:
            logs.update(self._policy_step(zs, batch, fns))
        # 6. KL-regularised critic Q̃ (kl_value=True)
        if model.kl_critic is not None:
            lam = kl_coef_now(config, self._kl_mode(), self.log_kl_coef, self.device)
            logs.update(kl_critic_step(policy, zs, z_enc, batch, config, lam, self.gamma, where))
        # 7. soft update of the target critics
        soft_update(policy, self.tau)
        model.eval()
        self._n_updates += 1
        if not pretrain:
            self._n_policy_updates += 1
        return logs

    def _policy_step(self, zs: torch.Tensor, batch: POMPCReplayBufferSamples,
                     fns: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
        """Steps 4 and 5 of an update on the rollout latents ``zs``: π_s with this update's λ, then λ itself."""
        mode = self._kl_mode()
        lam = None if mode == "infinite" else kl_coef_now(self.config, mode, self.log_kl_coef, self.device)
        logs, kl = policy_step(self.policy, fns or self._update_fns, zs, batch, self.config, mode, lam, self._where())
        if mode == "learned":
            logs.update(kl_coef_step(self.log_kl_coef, self.kl_coef_optimizer, kl, self.config.target_kl, self.policy))  # type: ignore[arg-type]
        return logs

    def _kl_mode(self) -> str:
        return kl_mode_now(self.config, self._n_updates, self._has_plans)

    def _where(self) -> UpdateSite:
        return UpdateSite(self._n_updates, self.num_timesteps)
