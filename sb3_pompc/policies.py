"""POMPC policy: the world model, the MPPI planner and the optimisers, behind SB3's ``BasePolicy`` API.

``predict(obs, state, episode_start, deterministic)`` follows SB3's recurrent convention: ``state`` is the
planner's warm-start mean per env (n_envs, H, A), so ``evaluate_policy`` and user loops work unchanged.
"""

from __future__ import annotations

import types
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.utils import is_vectorized_observation

from sb3_pompc.checks import flatten_dict_obs
from sb3_pompc.math import RunningScale
from sb3_pompc.planner import MPPIPlanner, PlannerNoise, PlanResult
from sb3_pompc.speedups import AUTOCAST_DTYPES, autocast
from sb3_pompc.world_model import WorldModel

__all__ = ["POMPCPolicy", "MlpPolicy", "host_to_device", "row_major"]


def host_to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The arrays as float32 tensors on ``device`` through ONE non-blocking host → device copy: packed into one
    host array (page-locked on CUDA, so the copy waits for nothing) and split into views on the device. On CPU the
    tensors are views of the packed array (no copy); the values are the arrays' cast to float32 either way."""
    sizes = [a.size for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=device.type == "cuda")
    packed = host.numpy()
    offset = 0
    for a, n in zip(arrays, sizes):
        packed[offset : offset + n] = np.asarray(a).reshape(-1)  # casts to float32 in the copy
        offset += n
    flat = host.to(device, non_blocking=True)
    return [chunk.view(np.shape(a)) for chunk, a in zip(flat.split(sizes), arrays)]


def row_major(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the row-major strides of its shape: a view of it if it is contiguous (a size-1 dim's stride
    makes no difference to the layout), else a contiguous copy. Dynamo guards on every stride, so a warm start of
    shape (1, H, A) with stride 1 in its first dim would otherwise take a graph of its own
    (``tests/test_compile.py::test_each_policy_compiles_its_own_plan``)."""
    tensor = tensor.contiguous()
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.insert(0, step)
        step *= max(size, 1)
    return tensor.as_strided(tensor.shape, strides)


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
        drawn eagerly, so the compiled plan gives the eager numbers up to float rounding. Each policy compiles its
        own copy of the plan (see :meth:`plan`). (:class:`POMPC` also compiles its update's forward passes when this
        is set.)
    :param normalize_images: unused (image observations are not supported); accepted because SB3's
        ``BaseModel._get_constructor_parameters`` saves it and ``POMPCPolicy.load`` passes it back
    """

    #: ``torch.compile`` backend of the plan ("inductor"; the tests use "eager": Dynamo's tracing and caching alone)
    plan_compile_backend: str = "inductor"

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
        self._fixed_generators: dict[str, torch.Generator] = {}  # deterministic plans' generators, per device
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
        obs, vectorized = self.obs_to_host(observation)
        return host_to_device([obs], self.device)[0], vectorized

    def obs_to_host(self, observation: np.ndarray) -> tuple[np.ndarray, bool]:
        """Observation(s) → float32 array (n, obs_dim) on the host, and whether the input was batched (SB3's
        ``obs_to_tensor`` without the copy to the device)."""
        observation = np.array(observation)
        vectorized = is_vectorized_observation(observation, self.observation_space)
        observation = observation.reshape((-1, *self.observation_space.shape))  # type: ignore[misc]
        return observation.reshape(observation.shape[0], -1).astype(np.float32, copy=False), vectorized

    def fixed_generator(self, device: torch.device) -> torch.Generator:
        """The generator of deterministic plans, seeded 0 for each plan: one per device, made once. The meta device
        has no generator: its (shape-only) draws take a CPU one."""
        device = torch.device(device)
        generator = self._fixed_generators.get(str(device))
        if generator is None:
            generator = torch.Generator("cpu" if device.type == "meta" else device)
            self._fixed_generators[str(device)] = generator
        return generator.manual_seed(0)

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
        memory that the next call overwrites (e.g. an ``EvalCallback``'s ``predict`` between two env steps). The
        compiled plan is this policy's own function (:meth:`_compiled_plan_fn`), and a cold start goes through it as a
        zero warm start, so each batch size takes one graph per value of ``deterministic``."""
        planner = self.planner if planner is None else planner
        if noise is None:  # drawn eagerly, so the compiled plan uses the very same random numbers as eager
            # a deterministic plan draws its samples from a fixed seed: the same observations (and warm start) give
            # the same actions, and evaluating leaves the global random stream of training untouched
            fixed = deterministic and planner.deterministic_action != "sample"
            generator = self.fixed_generator(obs.device) if fixed else None
            noise = planner.draw_noise(obs.shape[0], self.model.action_dim, self.model.num_q, obs.device, generator)
        if self.compile and planner is self.planner and not eager:
            # the planner shifts a zero mean into zeros: the numbers of no warm start, in the warm start's graph
            # (tests/test_compile.py::test_each_policy_compiles_its_own_plan compares it with an eager cold start)
            if warm_mean is None:
                warm_mean = torch.zeros(obs.shape[0], planner.horizon, self.model.action_dim, device=obs.device)
            obs, warm_mean = row_major(obs), row_major(warm_mean)
            result = self._compiled_plan_fn()(obs, warm_mean, deterministic, noise, planner, pi_log_std_bounds)
            return PlanResult(*(t.clone() for t in result))
        return self._plan_core(obs, warm_mean, deterministic, noise, planner, pi_log_std_bounds)

    def _compiled_plan_fn(self) -> Any:
        """``torch.compile`` of :meth:`_plan_core` through a copy of its code object, made once per policy.

        Dynamo keys its cache, and its ``recompile_limit`` (8 graphs), on the code object: through the shared
        ``_plan_core`` every policy of the process whose graphs differ (sizes, planner settings, dtype) would add
        them to one list, and past the limit every plan would run eagerly with one warning.
        ``tests/test_compile.py`` plans with several policies under ``fail_on_recompile_limit_hit``."""
        if self._compiled_plan is None:
            fn = type(self)._plan_core
            code = fn.__code__.replace()  # an equal code object that is not the shared one
            own = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
            backend = self.plan_compile_backend
            mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
            self._compiled_plan = torch.compile(types.MethodType(own, self), backend=backend, mode=mode, dynamic=False)
        return self._compiled_plan

    def _plan_core(self, obs, warm_mean, deterministic, noise, planner, pi_log_std_bounds) -> PlanResult:
        with autocast(self.device.type, self.planner_dtype):
            z = self.model.encode(obs)
            return planner.plan(self.model, z, warm_mean, deterministic, noise, pi_log_std_bounds)

    def act(self, observation: np.ndarray, warm_mean: Optional[torch.Tensor],
            episode_start: Optional[np.ndarray]) -> tuple[np.ndarray, torch.Tensor, tuple[np.ndarray, np.ndarray]]:
        """One exploring plan per env while training: the warm start of envs whose episode starts is dropped. One
        non-blocking copy to the device (observations and episode starts) and one back (action and π^P).

        :param observation: the envs' last observations (n_envs, ...)
        :param warm_mean: the previous plan's MPPI mean (n_envs, H, A), or None
        :param episode_start: (n_envs,) True where an episode starts
        :return: actions in [−1, 1] (n_envs, A), the new MPPI mean (the next warm start, on the device), and
            π^P's mean and std (n_envs, A) for the replay buffer
        """
        obs_host, _ = self.obs_to_host(observation)
        if warm_mean is not None and episode_start is not None:
            keep_host = (~np.asarray(episode_start, dtype=bool)).astype(np.float32)
            obs, keep = host_to_device([obs_host, keep_host], self.device)
            warm_mean = warm_mean * keep.reshape(-1, 1, 1)
        else:
            obs = host_to_device([obs_host], self.device)[0]
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
        state = self.warm_start_host(state, episode_start, n)
        return None if state is None else host_to_device([state], self.device)[0]

    def warm_start_host(self, state: Optional[np.ndarray], episode_start: Optional[np.ndarray],
                        n: int) -> Optional[np.ndarray]:
        """:meth:`warm_start` on the host: the float32 array (n, H, A), or None."""
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
        return state

    def predict(
        self,
        observation: Union[np.ndarray, dict[str, np.ndarray]],
        state: Optional[tuple[np.ndarray, ...]] = None,
        episode_start: Optional[np.ndarray] = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Plan an action per observation: the observations are checked on the host, go to the device with the warm
        start in one non-blocking copy, and the action comes back with the new state in one copy.

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
        obs_host, vectorized = self.obs_to_host(observation)  # type: ignore[arg-type]
        if not np.isfinite(obs_host).all():
            raise ValueError("predict got a non-finite observation (NaN or inf); the planner needs finite inputs")
        n = obs_host.shape[0]
        warm_host = self.warm_start_host(state, episode_start, n)  # type: ignore[arg-type]
        obs, *warm = host_to_device([obs_host] + ([] if warm_host is None else [warm_host]), self.device)
        result = self.plan(obs, warm[0] if warm else None, deterministic)
        host = torch.cat([result.action, result.mean.reshape(n, -1)], dim=-1).float().cpu().numpy()
        A = result.action.shape[-1]
        actions = self.unscale_action(host[:, :A].reshape((-1, *self.action_space.shape)))  # type: ignore[misc]
        if not vectorized:
            actions = actions.squeeze(axis=0)
        return actions, host[:, A:].reshape(result.mean.shape)


MlpPolicy = POMPCPolicy
