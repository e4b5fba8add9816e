"""DeepMind Control Suite tasks as Gymnasium environments, with TD-MPC2's evaluation protocol.

Every task of ``dm_control.suite`` is registered under the id ``dmc/<domain>-<task>-v0`` (for instance
``dmc/cartpole-balance-v0`` or ``dmc/walker-walk-v0``); ``ball_in_cup`` is also reachable under TD-MPC2's short name
``cup`` (``dmc/cup-catch-v0``). The protocol (spec §5) is:

- the task is loaded with ``suite.load(domain, task, task_kwargs={"random": seed})``;
- actions live in ``Box(-1, 1, (A,), float32)`` and are mapped linearly onto the task's true action bounds;
- **action repeat 2**: one agent step applies the same action to two control steps and returns the sum of both rewards;
- **500 agent steps per episode** (1000 control steps), ending with ``truncated=True``; ``terminated`` stays ``False``
  (a DMC episode never ends early, so value targets always bootstrap);
- the observation is the concatenation of every entry of the dm_control observation dict, each flattened, in dict
  order, as float32;
- no observation normalisation and no reward scaling.

Importing this module is cheap: ``dm_control`` (and MuJoCo) are imported only when an environment is built, and the
task list used for registration is written out below (``tests/test_envs.py`` checks it against
``dm_control.suite.ALL_TASKS``).

The episode length of a built environment is ``env.unwrapped.episode_length`` (agent steps). The environments are
registered with ``max_episode_steps=None`` because they truncate by themselves. :func:`get_episode_length` gives the
length of an episode of any environment, whichever way the length was set (see there).

Headless machines: importing this module imports :mod:`sb3_pompc.headless`, which, on Linux without
``DISPLAY``/``WAYLAND_DISPLAY`` and without ``MUJOCO_GL``, sets ``MUJOCO_GL=egl`` (``osmesa`` when EGL cannot be
loaded) before dm_control or MuJoCo is imported (an explicit ``MUJOCO_GL`` is never changed), and filters out GLFW's
"The DISPLAY environment variable is missing" warning.
"""

from __future__ import annotations

from typing import Any, Optional, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_pompc.episodes import get_episode_length
# sets MUJOCO_GL on import: it comes before any import of dm_control or MuJoCo (DMCEnv imports them when built)
from sb3_pompc.headless import HEADLESS_GL_BACKENDS, select_headless_mujoco_gl

#: Agent steps per episode in TD-MPC2's DMC protocol (= 1000 control steps with action repeat 2).
DMC_EPISODE_LENGTH: int = 500
#: Control steps per agent step in TD-MPC2's DMC protocol (the rewards of the repeated steps are summed).
DMC_ACTION_REPEAT: int = 2
#: Namespace of the registered Gymnasium ids (``dmc/<domain>-<task>-v0``).
DMC_NAMESPACE: str = "dmc"
#: Version suffix of the registered Gymnasium ids.
DMC_VERSION: int = 0

#: Every ``(domain, task)`` pair of ``dm_control.suite.ALL_TASKS`` (dm_control 1.0.x), in the suite's order. Written out
#: so that registering the ids does not import dm_control; ``tests/test_envs.py`` checks it against the installed suite.
DMC_TASKS: tuple[tuple[str, str], ...] = (
    ("acrobot", "swingup"), ("acrobot", "swingup_sparse"), ("ball_in_cup", "catch"), ("cartpole", "balance"),
    ("cartpole", "balance_sparse"), ("cartpole", "swingup"), ("cartpole", "swingup_sparse"),
    ("cartpole", "two_poles"), ("cartpole", "three_poles"), ("cheetah", "run"), ("dog", "stand"), ("dog", "walk"),
    ("dog", "trot"), ("dog", "run"), ("dog", "fetch"), ("finger", "spin"), ("finger", "turn_easy"),
    ("finger", "turn_hard"), ("fish", "upright"), ("fish", "swim"), ("hopper", "stand"), ("hopper", "hop"),
    ("humanoid", "stand"), ("humanoid", "walk"), ("humanoid", "run"), ("humanoid", "run_pure_state"),
    ("humanoid_CMU", "stand"), ("humanoid_CMU", "walk"), ("humanoid_CMU", "run"), ("lqr", "lqr_2_1"),
    ("lqr", "lqr_6_2"), ("manipulator", "bring_ball"), ("manipulator", "bring_peg"), ("manipulator", "insert_ball"),
    ("manipulator", "insert_peg"), ("pendulum", "swingup"), ("point_mass", "easy"), ("point_mass", "hard"),
    ("quadruped", "walk"), ("quadruped", "run"), ("quadruped", "escape"), ("quadruped", "fetch"),
    ("reacher", "easy"), ("reacher", "hard"), ("stacker", "stack_2"), ("stacker", "stack_4"),
    ("swimmer", "swimmer6"), ("swimmer", "swimmer15"), ("walker", "stand"), ("walker", "walk"), ("walker", "run"),
)

#: Short domain names used by TD-MPC2, mapped onto dm_control's domain names (each also gets registered ids).
DMC_DOMAIN_ALIASES: dict[str, str] = {"cup": "ball_in_cup"}

_KNOWN_TASKS = frozenset(DMC_TASKS)
#: Tasks named first in error messages (common TD-MPC2 benchmark tasks).
_EXAMPLE_TASKS: tuple[tuple[str, str], ...] = (
    ("cartpole", "balance"), ("cheetah", "run"), ("walker", "walk"), ("cup", "catch"), ("finger", "spin"),
    ("reacher", "easy"), ("hopper", "hop"), ("humanoid", "walk"), ("dog", "run"),
)


def dmc_env_id(domain: str, task: str) -> str:
    """The Gymnasium id of a DMC task, ``dmc/<domain>-<task>-v0``.

    :param domain: dm_control domain name (or an alias such as ``cup``), used as written
    :param task: dm_control task name
    :return: the registered id
    """
    return f"{DMC_NAMESPACE}/{domain}-{task}-v{DMC_VERSION}"


def _supported_hint(domain: Optional[str] = None, limit: int = 8) -> str:
    """A short, human-readable list of supported ids (those of ``domain`` when it is a known domain)."""
    if domain is not None:
        same = [dmc_env_id(d, t) for d, t in DMC_TASKS if d == domain]
        if same:
            return f"tasks of domain {domain!r}: " + ", ".join(same)
    shown = ", ".join(dmc_env_id(d, t) for d, t in _EXAMPLE_TASKS[:limit])
    aliases = ", ".join(f"{a} = {d}" for a, d in DMC_DOMAIN_ALIASES.items())
    return f"supported ids include {shown}, ... ({len(DMC_TASKS)} tasks; domain aliases: {aliases}; see sb3_pompc.envs.DMC_TASKS)"


def resolve_dmc_task(domain: str, task: str) -> tuple[str, str]:
    """Map ``(domain, task)`` onto a dm_control suite task, resolving domain aliases (``cup`` → ``ball_in_cup``).

    :param domain: dm_control domain name or alias
    :param task: dm_control task name
    :return: the dm_control ``(domain, task)`` pair
    :raises ValueError: when the pair is not a task of ``dm_control.suite``
    """
    if not isinstance(domain, str) or not isinstance(task, str):
        raise ValueError(f"DMC domain and task must be strings, got domain={domain!r}, task={task!r}")
    real_domain = DMC_DOMAIN_ALIASES.get(domain, domain)
    if (real_domain, task) not in _KNOWN_TASKS:
        raise ValueError(
            f"Unknown DMControl task {dmc_env_id(domain, task)!r} (domain={domain!r}, task={task!r}); "
            + _supported_hint(real_domain)
        )
    return real_domain, task


def parse_dmc_id(env_id: str) -> tuple[str, str]:
    """Split a DMC task name into dm_control's ``(domain, task)``.

    Accepts the registered id (``dmc/cartpole-balance-v0``) as well as TD-MPC2's bare names (``cartpole-balance``,
    ``cup-catch``); domain aliases are resolved.

    :param env_id: the id or name
    :return: the dm_control ``(domain, task)`` pair
    :raises ValueError: when the name is not one of a dm_control suite task
    """
    if not isinstance(env_id, str):
        raise ValueError(f"DMC env id must be a string, got {env_id!r}")
    name = env_id
    prefix = f"{DMC_NAMESPACE}/"
    if name.startswith(prefix):
        name = name[len(prefix):]
    suffix = f"-v{DMC_VERSION}"
    if name.endswith(suffix):
        name = name[: -len(suffix)]
    # domain names never contain "-" (task names neither), so the first "-" separates them
    domain, sep, task = name.partition("-")
    if not sep or not domain or not task:
        raise ValueError(f"Unknown DMControl task {env_id!r}: expected 'dmc/<domain>-<task>-v0'; " + _supported_hint())
    try:
        return resolve_dmc_task(domain, task)
    except ValueError:
        raise ValueError(
            f"Unknown DMControl task {env_id!r} (domain={domain!r}, task={task!r}); "
            + _supported_hint(DMC_DOMAIN_ALIASES.get(domain, domain))
        ) from None


class DMCEnv(gym.Env[np.ndarray, np.ndarray]):
    """A dm_control suite task behind TD-MPC2's DMC protocol (action repeat, fixed-length episodes, flat float32 obs).

    Seeding: ``seed`` seeds the task's ``RandomState`` exactly like ``suite.load(..., task_kwargs={"random": seed})``.
    ``reset(seed=s)`` re-seeds that ``RandomState`` with ``s`` (so it reproduces the episodes of an environment built
    with ``seed=s``); ``reset()`` without a seed continues the random stream.

    :param domain: dm_control domain name (``cartpole``) or alias (``cup``)
    :param task: dm_control task name (``balance``)
    :param seed: seed of the task's random state; ``None`` draws one from the OS
    :param action_repeat: control steps per agent step (the rewards are summed); 2 in TD-MPC2
    :param episode_length: agent steps per episode, after which the step returns ``truncated=True``; 500 in TD-MPC2
    :param render_mode: ``None`` or ``"rgb_array"`` (``physics.render``; needs an OpenGL backend, e.g.
        ``MUJOCO_GL=egl`` on a headless machine)
    :param render_height: height in pixels of rendered frames
    :param render_width: width in pixels of rendered frames
    :param camera_id: MuJoCo camera used to render
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(
        self,
        domain: str,
        task: str,
        seed: Optional[int] = None,
        action_repeat: int = DMC_ACTION_REPEAT,
        episode_length: int = DMC_EPISODE_LENGTH,
        render_mode: Optional[str] = None,
        render_height: int = 384,
        render_width: int = 384,
        camera_id: int = 0,
    ) -> None:
        super().__init__()
        self.domain, self.task = resolve_dmc_task(domain, task)
        if isinstance(action_repeat, bool) or not isinstance(action_repeat, (int, np.integer)) or action_repeat < 1:
            raise ValueError(f"action_repeat must be a positive integer, got {action_repeat!r}")
        if isinstance(episode_length, bool) or not isinstance(episode_length, (int, np.integer)) or episode_length < 1:
            raise ValueError(f"episode_length must be a positive integer, got {episode_length!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        if seed is not None:
            seed = self._check_seed(seed)
        self.action_repeat = int(action_repeat)
        self.episode_length = int(episode_length)
        self.render_mode = render_mode
        self.render_height, self.render_width, self.camera_id = int(render_height), int(render_width), int(camera_id)

        from dm_control import suite  # lazy: dm_control pulls in MuJoCo and (possibly) an OpenGL backend

        self._env = suite.load(self.domain, self.task, task_kwargs={"random": seed})

        spec = self._env.action_spec()
        shape = tuple(int(s) for s in spec.shape)
        self._act_low = np.broadcast_to(np.asarray(spec.minimum, dtype=np.float64), shape).copy()
        self._act_high = np.broadcast_to(np.asarray(spec.maximum, dtype=np.float64), shape).copy()
        self._unit_bounds = bool(np.all(self._act_low == -1.0) and np.all(self._act_high == 1.0))
        self.action_space = spaces.Box(-1.0, 1.0, shape=shape, dtype=np.float32)

        obs_dim = sum(int(np.prod(s.shape, dtype=np.int64)) for s in self._env.observation_spec().values())
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float32)

        self.metadata = {
            **self.metadata,
            "render_fps": max(1, round(1.0 / (self._env.control_timestep() * self.action_repeat))),
        }
        self._t = 0
        self._needs_reset = True

    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_seed(seed: Any) -> int:
        """A seed accepted by ``numpy.random.RandomState`` (an integer in [0, 2**32))."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
            raise ValueError(f"DMC seeds must be integers in [0, 2**32), got {seed!r}")
        return int(seed)

    @property
    def physics(self) -> Any:
        """The dm_control ``Physics`` of the task."""
        return self._env.physics

    @property
    def dm_env(self) -> Any:
        """The underlying ``dm_control.rl.control.Environment``."""
        return self._env

    @property
    def action_low(self) -> np.ndarray:
        """The task's true lower action bounds (what ``-1`` maps to)."""
        return self._act_low.copy()

    @property
    def action_high(self) -> np.ndarray:
        """The task's true upper action bounds (what ``+1`` maps to)."""
        return self._act_high.copy()

    def _flat_obs(self, observation: Any) -> np.ndarray:
        """Concatenate every entry of the observation dict, each flattened, in dict order, as float32."""
        return np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in observation.values()])

    def scale_action(self, action: np.ndarray) -> np.ndarray:
        """Map an action of ``[-1, 1]^A`` linearly onto the task's bounds (values outside ``[-1, 1]`` are clipped).

        :param action: agent action, shape (A,)
        :return: the control sent to dm_control, float64, shape (A,)
        """
        a = np.asarray(action, dtype=np.float64).reshape(self.action_space.shape)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"DMC action must be finite, got {action!r}")
        a = np.clip(a, -1.0, 1.0)
        if self._unit_bounds:
            return a
        return self._act_low + (a + 1.0) * 0.5 * (self._act_high - self._act_low)

    # ----------------------------------------------------------------------------------------------------------------
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode.

        :param seed: when given, re-seed the task's random state (reproducible episode); otherwise continue it
        :param options: unused
        :return: the first observation and an empty info dict
        """
        super().reset(seed=seed)
        if seed is not None:
            # same state as ``RandomState(seed)``, which ``suite.load(task_kwargs={"random": seed})`` builds; seeding in
            # place keeps every reference the task may hold on its RandomState valid
            self._env.task.random.seed(self._check_seed(seed))
        try:
            time_step = self._env.reset()
        except Exception as err:  # quadruped-escape builds its terrain with OpenGL at reset
            if "OpenGL" in str(err):
                raise RuntimeError(
                    f"{dmc_env_id(self.domain, self.task)} needs an OpenGL context at reset; on a headless machine set "
                    "MUJOCO_GL=egl (or osmesa) before dm_control is imported"
                ) from err
            raise
        self._t = 0
        self._needs_reset = False
        return self._flat_obs(time_step.observation), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Apply ``action`` for ``action_repeat`` control steps.

        :param action: action in ``[-1, 1]^A``
        :return: observation, summed reward, terminated (``False`` for every suite task except an ``lqr`` task that
            reaches its goal), truncated (``True`` at step ``episode_length``), info
        """
        if self._needs_reset:
            raise RuntimeError("DMCEnv.step() called before reset() or after the episode ended; call reset() first")
        control = self.scale_action(action)
        reward = 0.0
        time_step = None
        for _ in range(self.action_repeat):
            time_step = self._env.step(control)
            reward += float(time_step.reward or 0.0)
            if time_step.last():  # dm_control's own limit (1000 control steps) or an lqr goal: never step past it
                break
        assert time_step is not None
        self._t += 1
        terminated = False
        truncated = self._t >= self.episode_length
        if time_step.last() and not truncated:
            # only reachable with a longer episode_length / action_repeat than dm_control's time limit allows, or lqr
            terminated = time_step.discount is not None and float(time_step.discount) == 0.0
            truncated = not terminated
        self._needs_reset = terminated or truncated
        return self._flat_obs(time_step.observation), reward, terminated, truncated, {}

    def render(self) -> Optional[np.ndarray]:  # type: ignore[override]
        """Render the current frame with ``physics.render`` when ``render_mode="rgb_array"``.

        :return: an (H, W, 3) uint8 frame, or ``None`` without a render mode
        """
        if self.render_mode != "rgb_array":
            return None
        return self._env.physics.render(height=self.render_height, width=self.render_width, camera_id=self.camera_id)

    def close(self) -> None:
        """Close the environment (safe to call twice)."""
        self._needs_reset = True
        self._env.close()


def make_dmc_env(
    domain: str,
    task: str,
    seed: Optional[int] = None,
    action_repeat: int = DMC_ACTION_REPEAT,
    episode_length: int = DMC_EPISODE_LENGTH,
    render_mode: Optional[str] = None,
    **kwargs: Any,
) -> DMCEnv:
    """Build a DMC task with TD-MPC2's protocol (no Gymnasium wrappers; ``gym.make(dmc_env_id(domain, task))`` adds them).

    :param domain: dm_control domain name or alias (``cup``)
    :param task: dm_control task name
    :param seed: seed of the task's random state
    :param action_repeat: control steps per agent step
    :param episode_length: agent steps per episode
    :param render_mode: ``None`` or ``"rgb_array"``
    :param kwargs: further :class:`DMCEnv` arguments (``render_height``, ``render_width``, ``camera_id``)
    :return: the environment
    :raises ValueError: for a task that is not in ``dm_control.suite``
    """
    return DMCEnv(domain, task, seed=seed, action_repeat=action_repeat, episode_length=episode_length,
                  render_mode=render_mode, **kwargs)


def register_dmc_envs() -> list[str]:
    """Register every dm_control suite task (and the ``cup-*`` aliases) as ``dmc/<domain>-<task>-v0`` in Gymnasium.

    Idempotent, and does not import dm_control. ``gym.make("dmc/cartpole-balance-v0", seed=0)`` then builds a
    :class:`DMCEnv` (constructor arguments can be passed to ``gym.make``). The ids are registered with
    ``max_episode_steps=None`` since the environment truncates itself; read the episode length from
    ``env.unwrapped.episode_length`` (or :func:`get_episode_length`).

    :return: every DMC id (registered now or before)
    """
    pairs = list(DMC_TASKS)
    pairs += [(alias, t) for alias, real in DMC_DOMAIN_ALIASES.items() for d, t in DMC_TASKS if d == real]
    ids = []
    for domain, task in pairs:
        env_id = dmc_env_id(domain, task)
        ids.append(env_id)
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point=f"{__name__}:DMCEnv",
            kwargs={"domain": domain, "task": task},
            max_episode_steps=None,
        )
    return ids


__all__ = [
    "DMC_ACTION_REPEAT", "DMC_DOMAIN_ALIASES", "DMC_EPISODE_LENGTH", "DMC_NAMESPACE", "DMC_TASKS", "DMCEnv",
    "HEADLESS_GL_BACKENDS", "dmc_env_id", "get_episode_length", "make_dmc_env", "parse_dmc_id",
    "register_dmc_envs", "resolve_dmc_task", "select_headless_mujoco_gl",
]
