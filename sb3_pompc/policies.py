"""POMPC policy: the world model, the MPPI planner and the optimisers, behind SB3's ``BasePolicy`` API.

``predict(obs, state, episode_start, deterministic)`` follows SB3's recurrent convention: ``state`` is the
planner's warm-start mean per env (n_envs, H, A), so ``evaluate_policy`` and user loops work unchanged.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule

from sb3_pompc.checks import flatten_dict_obs
from sb3_pompc.math import RunningScale
from sb3_pompc.planner import MPPIPlanner, PlannerNoise, PlanResult
from sb3_pompc.speedups import AUTOCAST_DTYPES, autocast
from sb3_pompc.world_model import WorldModel

__all__ = ["POMPCPolicy", "MlpPolicy"]


class POMPCPolicy(BasePolicy):
    """World model + MPPI planner + optimisers of PO-MPC.

    :param observation_space: flat Box observation space
    :param action_space: Box action space
    :param lr_schedule: learning-rate schedule (constant in TD-MPC2)
    :param model_kwargs: keyword arguments of :class:`~sb3_pompc.world_model.WorldModel`; without
        ``simnorm_layout`` (a model saved before the option existed) the SimNorm groups are "contiguous"
    :param planner_kwargs: keyword arguments of :class:`~sb3_pompc.planner.MPPIPlanner`
    :param enc_lr_scale: encoder learning-rate multiplier (0.3)
    :param scale_tau: running-scale smoothing (0.01)
    :param planner_dtype: "float32" or "bfloat16" (autocast while planning; LayerNorm, softmax, two-hot
        expectations and MPPI statistics stay in fp32)
    :param compile: wrap the plan in ``torch.compile`` (CUDA graphs via "reduce-overhead" on GPU); the noise is
        drawn eagerly, so the compiled plan gives the eager numbers up to float rounding. (:class:`POMPC` also
        compiles its update's forward passes when this is set.)
    :param normalize_images: unused (image observations are not supported); accepted because SB3's
        ``BaseModel._get_constructor_parameters`` saves it and ``POMPCPolicy.load`` passes it back
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        model_kwargs: Optional[dict[str, Any]] = None,
        planner_kwargs: Optional[dict[str, Any]] = None,
        enc_lr_scale: float = 0.3,
        scale_tau: float = 0.01,
        planner_dtype: str = "float32",
        compile: bool = False,
        normalize_images: bool = False,
    ) -> None:
        super().__init__(observation_space, action_space, squash_output=True, normalize_images=False)
        if planner_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"planner_dtype must be one of {sorted(AUTOCAST_DTYPES)}, got {planner_dtype!r}")
        self.model_kwargs = dict(model_kwargs or {})
        self.model_kwargs.setdefault("simnorm_layout", "contiguous")  # saved before the option: contiguous groups
        self.planner_kwargs = dict(planner_kwargs or {})
        self.enc_lr_scale = enc_lr_scale
        self.scale_tau = scale_tau
        self.planner_dtype = planner_dtype
        self.compile = compile
        self._compiled_plan = None
        #: the Dict space of an env that POMPC flattened (set by the algorithm); ``predict`` flattens such input
        self.dict_observation_space: Optional[spaces.Dict] = None
        obs_dim = int(np.prod(observation_space.shape))
        act_dim = int(np.prod(action_space.shape))
        self.model = WorldModel(obs_dim, act_dim, **self.model_kwargs)
        self.planner = MPPIPlanner(**self.planner_kwargs)
        self.q_scale = RunningScale(scale_tau)
        self.kl_scale = RunningScale(scale_tau)
        self._build(lr_schedule)

    def _build(self, lr_schedule: Schedule) -> None:
        lr = lr_schedule(1)
        groups = self.model.model_parameter_groups(lr, self.enc_lr_scale)
        # fused Adam: one kernel for all parameters (~3x faster optimiser step on CPU, same maths)
        adam = dict(fused=True)
        self.optimizer = torch.optim.Adam(groups, lr=lr, **adam)
        self.pi_optimizer = torch.optim.Adam(self.model.pi.parameters(), lr=lr, eps=1e-5, **adam)
        self.prior_optimizer = (
            torch.optim.Adam(self.model.prior.parameters(), lr=lr, eps=1e-5, **adam)
            if self.model.prior is not None
            else None
        )
        self.kl_critic_optimizer = (
            torch.optim.Adam(self.model.kl_critic.parameters(), lr=lr, **adam)
            if self.model.kl_critic is not None
            else None
        )

    def enable_termination_head(self) -> None:
        """Add the termination head to the model and to the world-model optimiser (``episodic="auto"``)."""
        if self.model.termination is not None:
            return
        self.model.add_termination_head()
        self.model_kwargs["episodic"] = True
        self.optimizer.add_param_group(
            {"params": list(self.model.termination.parameters()), "lr": self.optimizer.param_groups[1]["lr"], "lr_scale": 1.0}
        )

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimiser of the policy (for learning-rate updates and saving)."""
        opts = [self.optimizer, self.pi_optimizer, self.prior_optimizer, self.kl_critic_optimizer]
        return [o for o in opts if o is not None]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            model_kwargs=self.model_kwargs,
            planner_kwargs=self.planner_kwargs,
            enc_lr_scale=self.enc_lr_scale,
            scale_tau=self.scale_tau,
            planner_dtype=self.planner_dtype,
            compile=self.compile,
            lr_schedule=self._dummy_schedule,  # type: ignore[attr-defined]
        )
        return data

    def obs_to_flat_tensor(self, observation: np.ndarray) -> tuple[torch.Tensor, bool]:
        """Observation(s) → float tensor (n, obs_dim) on the policy's device, and whether the input was batched."""
        obs_tensor, vectorized = self.obs_to_tensor(observation)
        assert isinstance(obs_tensor, torch.Tensor)
        return obs_tensor.float().reshape(obs_tensor.shape[0], -1), vectorized

    @torch.no_grad()
    def plan(
        self,
        obs: torch.Tensor,
        warm_mean: Optional[torch.Tensor] = None,
        deterministic: bool = False,
        noise: Optional[PlannerNoise] = None,
        planner: Optional[MPPIPlanner] = None,
        pi_log_std_bounds: Optional[tuple[float, float]] = None,
        eager: bool = False,
    ) -> PlanResult:
        """Plan for a batch of flat observations (n, obs_dim) in one call. See :meth:`MPPIPlanner.plan`.

        :param eager: run without ``torch.compile`` even when the policy compiles (same numbers; used to count FLOPs)

        With ``compile=True`` the result is a copy of the compiled function's outputs: on CUDA those are CUDA-graph
        memory that the next call overwrites (e.g. an ``EvalCallback``'s ``predict`` between two env steps)."""
        planner = self.planner if planner is None else planner
        if noise is None:  # drawn eagerly, so the compiled plan uses the very same random numbers as eager
            # a deterministic plan draws its samples from a fixed seed: the same observations (and warm start) give
            # the same actions, and evaluating leaves the global random stream of training untouched
            fixed = deterministic and planner.deterministic_action != "sample"
            generator = torch.Generator(obs.device).manual_seed(0) if fixed else None
            noise = planner.draw_noise(obs.shape[0], self.model.action_dim, self.model.num_q, obs.device, generator)
        if self.compile and planner is self.planner and not eager:
            if self._compiled_plan is None:
                mode = "reduce-overhead" if self.device.type == "cuda" else None
                self._compiled_plan = torch.compile(self._plan_core, mode=mode, dynamic=False)
            result = self._compiled_plan(obs, warm_mean, deterministic, noise, planner, pi_log_std_bounds)
            return PlanResult(*(t.clone() for t in result))
        return self._plan_core(obs, warm_mean, deterministic, noise, planner, pi_log_std_bounds)

    def _plan_core(self, obs, warm_mean, deterministic, noise, planner, pi_log_std_bounds) -> PlanResult:
        with autocast(self.device.type, self.planner_dtype):
            z = self.model.encode(obs)
            return planner.plan(self.model, z, warm_mean, deterministic, noise, pi_log_std_bounds)

    def act(self, observation: np.ndarray, warm_mean: Optional[torch.Tensor],
            episode_start: Optional[np.ndarray]) -> tuple[np.ndarray, torch.Tensor, tuple[np.ndarray, np.ndarray]]:
        """One exploring plan per env while training: the warm start of envs whose episode starts is dropped.

        :param observation: the envs' last observations (n_envs, ...)
        :param warm_mean: the previous plan's MPPI mean (n_envs, H, A), or None
        :param episode_start: (n_envs,) True where an episode starts
        :return: actions in [−1, 1] (n_envs, A), the new MPPI mean (the next warm start, on the device), and
            π^P's mean and std (n_envs, A) for the replay buffer
        """
        obs, _ = self.obs_to_flat_tensor(observation)
        if warm_mean is not None and episode_start is not None:
            keep = torch.as_tensor(~episode_start, dtype=torch.float32, device=self.device)
            warm_mean = warm_mean * keep.reshape(-1, 1, 1)
        self.set_training_mode(False)
        result = self.plan(obs, warm_mean, deterministic=False)
        # one device → host transfer per env step: action and π^P together
        host = torch.cat([result.action, result.plan_mean, result.plan_std], dim=-1).float().cpu().numpy()
        action, plan_mean, plan_std = np.split(host, 3, axis=-1)
        return action, result.mean, (plan_mean, plan_std)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> torch.Tensor:
        return self._predict(obs, deterministic)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> torch.Tensor:
        """Plan without warm start (SB3's stateless path); prefer :meth:`predict` with ``state``."""
        assert isinstance(observation, torch.Tensor)
        return self.plan(observation.float().reshape(observation.shape[0], -1), None, deterministic).action

    def warm_start(self, state: Optional[np.ndarray], episode_start: Optional[np.ndarray], n: int) -> Optional[torch.Tensor]:
        """Planner state (n, H, A) → tensor with the rows of starting episodes zeroed (None = no warm start)."""
        if state is None:
            return None
        state = np.asarray(state, dtype=np.float32)
        H, A = self.planner.horizon, self.model.action_dim
        if state.shape != (n, H, A):
            raise ValueError(f"state must be the planner mean of shape (n_envs, horizon, action_dim) = {(n, H, A)}, got {state.shape}")
        if episode_start is not None:
            episode_start = np.asarray(episode_start, dtype=np.float32)
            if episode_start.size != n:
                raise ValueError(f"episode_start must hold one flag per observation ({n}), got shape {episode_start.shape}")
            state = state * (1.0 - episode_start.reshape(n, 1, 1))
        return torch.as_tensor(state, device=self.device)

    def predict(
        self,
        observation: Union[np.ndarray, dict[str, np.ndarray]],
        state: Optional[tuple[np.ndarray, ...]] = None,
        episode_start: Optional[np.ndarray] = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Plan an action per observation.

        :param observation: one observation or a batch (n_envs, ...); Dict observations of an env that POMPC
            flattened are flattened the same way (``dict_observation_space``)
        :param state: the previous call's returned state (the planner's MPPI mean per env), or None
        :param episode_start: (n_envs,) True where an episode starts (its warm start is dropped)
        :param deterministic: no exploration noise on the executed action
        :return: actions in the env's bounds, and the new state (n_envs, H, A)
        """
        if isinstance(observation, dict) and self.dict_observation_space is not None:
            observation = flatten_dict_obs(self.dict_observation_space, observation)
        self.set_training_mode(False)
        obs, vectorized = self.obs_to_flat_tensor(observation)  # type: ignore[arg-type]
        if not bool(torch.isfinite(obs).all()):
            raise ValueError("predict got a non-finite observation (NaN or inf); the planner needs finite inputs")
        n = obs.shape[0]
        warm = self.warm_start(state, episode_start, n)  # type: ignore[arg-type]
        result = self.plan(obs, warm, deterministic)
        actions = result.action.cpu().numpy().reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        actions = self.unscale_action(actions)
        if not vectorized:
            actions = actions.squeeze(axis=0)
        return actions, result.mean.cpu().numpy()


MlpPolicy = POMPCPolicy
