"""Speed benchmark of PO-MPC: milliseconds per plan and per update, and the achieved matmul GFLOP/s next to a
dense matmul of the same dtype measured in the same run.

Run ``python -m sb3_pompc.benchmark --quick`` (a subset, a few minutes on a 2-core CPU) or
``python -m sb3_pompc.benchmark`` (model sizes 1 and 5, n_envs 1/4/8/16, fp32 and bf16, every device present).
See ``docs/benchmark.md`` for what is measured and how to read the numbers.

What is timed (median of several calls after a warm-up):

- ``plan``: ``model.policy.plan(obs, warm_mean)`` for a batch of ``n_envs`` observations (encoder + the full MPPI
  loop, noise drawn inside, exactly what one environment step of a ``VecEnv`` costs). The bf16 rows use
  ``POMPC(..., planner_dtype="bfloat16")``, i.e. autocast while planning.
- ``update``: ``model._update(batch_size, pretrain=False)`` on a replay buffer filled with random transitions
  (window sampling, targets, world-model + critic step, prior step, policy step, soft target update), with
  lazy reanalyze switched off (timed separately as ``reanalyze``). The bf16 update rows use
  ``POMPC(..., update_dtype="bfloat16")`` (the update's forward passes under autocast, fp32 weights).
- ``--compile``: the same rows with ``POMPC(..., compile=True)`` (``torch.compile`` of the plan and of the
  update's forward passes); compilation happens in the untimed first calls, and FLOPs are counted on the eager
  path of the same model.
- ``step`` (not in the default set): one plan of the first ``n_envs`` followed by one update, timed together,
  i.e. one environment step of training (plan and update in the row's dtype). Use ``--min-time`` to time it over
  a long stretch; the row also records ``ms_q25`` / ``ms_q75`` and prints min, quartiles and max.
- ``reanalyze`` (not in the default set): one lazy-reanalyze call, i.e. one plan of ``horizon ·
  reanalyze_batch_size`` buffer states with ``reanalyze_num_samples`` samples. It runs every
  ``reanalyze_interval`` updates; ``amortized_ms`` is its cost per update.

GFLOP of a call are *counted*, not estimated: :class:`torch.utils.flop_counter.FlopCounterMode` records every
matmul (``mm``/``addmm``/``bmm``/``baddbmm``, forward and backward) that actually runs in one call. Element-wise
work (Mish, LayerNorm, softmax, Adam) is not counted, so ``gflops`` is the achieved *matmul* throughput and the
ratio ``gflops / peak_gflops`` says how much of the machine's dense-matmul speed a plan or an update turns into
useful work. ``peak_gflops`` is the median throughput of a square ``peak_size`` matmul of the same dtype on the
same device, measured right before each row (so both see the same machine load); ``layer_gflops`` is the same
for a matmul of the shape of the model's hidden layers at that batch (``rows × mlp_dim @ mlp_dim × mlp_dim``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv
from torch.utils.flop_counter import FlopCounterMode

from sb3_pompc.pompc import POMPC
from sb3_pompc.presets import resolve_preset
from sb3_pompc.world_model import WorldModel

__all__ = [
    "SyntheticEnv",
    "make_model",
    "fill_replay_buffer",
    "time_calls",
    "count_flops",
    "matmul_gflops",
    "analytic_plan_flops",
    "profile_breakdown",
    "check_syncs",
    "contention_probe",
    "run_benchmark",
    "format_table",
    "main",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
PLANNER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
WHATS = ("plan", "update", "step", "reanalyze")
RECORD_KEYS = ("what", "model_size", "n_envs", "dtype", "device", "ms", "gflops", "peak_gflops")


class SyntheticEnv(gym.Env):
    """A tiny random environment with Box observations and actions of the requested sizes (cheetah-run's 17/6 by
    default): observations are standard normal, rewards uniform in [0, 1], episodes are truncated after
    ``episode_length`` steps. Only its spaces matter to the benchmark.

    :param obs_dim: observation size
    :param action_dim: action size (actions in [−1, 1])
    :param episode_length: steps before truncation
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, obs_dim: int = 17, action_dim: int = 6, episode_length: int = 500) -> None:
        super().__init__()
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
        self.episode_length = episode_length
        self._t = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._t = 0
        return self.np_random.standard_normal(self.observation_space.shape).astype(np.float32), {}

    def step(self, action: np.ndarray):
        self._t += 1
        obs = self.np_random.standard_normal(self.observation_space.shape).astype(np.float32)
        return obs, float(self.np_random.uniform()), False, self._t >= self.episode_length, {}


def make_model(
    model_size: Optional[int],
    n_envs: int,
    dtype: str = "fp32",
    device: str = "cpu",
    obs_dim: int = 17,
    action_dim: int = 6,
    preset: str = "pompc",
    seed: int = 0,
    **overrides: Any,
) -> POMPC:
    """Build a POMPC agent through the public API on a ``DummyVecEnv`` of ``n_envs`` :class:`SyntheticEnv`.

    :param model_size: 1, 5, 19, 48 or 317 (None: give ``latent_dim``/``mlp_dim``/... in ``overrides``)
    :param n_envs: number of environments (= states planned per call)
    :param dtype: "fp32" or "bf16" (the ``planner_dtype``)
    :param device: torch device
    :param obs_dim: observation size
    :param action_dim: action size
    :param preset: POMPC preset
    :param seed: random seed
    :param overrides: any other POMPC keyword argument (``num_samples=256``, ``reanalyze_batch_size=2``, ...)
    :return: the agent, with ``learning_starts=0``, no pretraining burst and a 4096-row buffer
    """
    env = DummyVecEnv([lambda: SyntheticEnv(obs_dim, action_dim) for _ in range(n_envs)])
    kwargs: dict[str, Any] = dict(
        model_size=model_size,
        learning_starts=0,
        pretrain_updates=0,
        buffer_size=max(4096, 64 * n_envs),
        planner_dtype=PLANNER_DTYPES[dtype],
        device=device,
        seed=seed,
    )
    kwargs.update(overrides)
    return POMPC("MlpPolicy", env, preset=preset, **kwargs)


def fill_replay_buffer(model: POMPC, seed: int = 0) -> None:
    """Fill the whole replay buffer with random transitions (no episode ends, every row with a planner
    Gaussian), writing its arrays directly: much faster than stepping the environment."""
    rb = model.replay_buffer
    rng = np.random.default_rng(seed)
    rb.observations[:] = rng.standard_normal(rb.observations.shape)
    rb.next_observations[:] = rng.standard_normal(rb.next_observations.shape)
    rb.actions[:] = rng.uniform(-1.0, 1.0, rb.actions.shape)
    rb.rewards[:] = rng.uniform(0.0, 1.0, rb.rewards.shape)
    rb.dones[:] = 0.0
    rb.timeouts[:] = 0.0
    rb.plan_means[:] = rng.uniform(-1.0, 1.0, rb.plan_means.shape)
    rb.plan_stds[:] = rng.uniform(0.05, 2.0, rb.plan_stds.shape)
    rb.has_plan[:] = True
    rb.pos, rb.full = 0, True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int = 1,
    min_reps: int = 5,
    min_time: float = 2.0,
    max_reps: int = 100,
) -> list[float]:
    """Wall-clock seconds of repeated calls of ``fn`` after ``warmup`` untimed calls: at least ``min_reps`` calls
    and until ``min_time`` seconds have been spent (at most ``max_reps`` calls). CUDA is synchronised around
    every call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _plan_calls(model: POMPC, obs: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two ways to plan ``obs`` (n, obs_dim) with the agent's own planner, warm-started from the previous call:
    ``model.policy.plan`` (compiled if the agent is) and the same computation without ``torch.compile`` (to
    count FLOPs). The first plan (no warm start) runs here."""
    policy, planner = model.policy, model.policy.planner
    state = {"warm": policy.plan(obs, None).mean}

    def plan_once() -> None:
        state["warm"] = policy.plan(obs, state["warm"]).mean

    def plan_eager() -> None:
        noise = planner.draw_noise(obs.shape[0], policy.model.action_dim, policy.model.num_q, obs.device)
        with torch.no_grad():
            policy._plan_core(obs, state["warm"], False, noise, planner, None)

    return plan_once, plan_eager


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run ``fn`` once under :class:`FlopCounterMode`: (total FLOPs, FLOPs per aten op)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op).replace("aten.", ""): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def matmul_gflops(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, reps: int = 5, min_time: float = 0.2
) -> float:
    """Median GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` on ``device`` (2·m·k·n FLOPs per call)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    times = time_calls(lambda: torch.mm(a, b), device, warmup=2, min_reps=reps, min_time=min_time, max_reps=1000)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def _linear_flops(rows: int, dims: Sequence[int]) -> int:
    return sum(2 * rows * dims[i] * dims[i + 1] for i in range(len(dims) - 1))


def _mlp_dims(net: torch.nn.Module) -> list[int]:
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    return [linears[0].in_features, *(m.out_features for m in linears)]


def analytic_plan_flops(model: WorldModel, planner: Any, n: int) -> int:
    """Matmul FLOPs of one plan of ``n`` states, from the architecture (a cross-check of the counted number).

    encoder(n) + policy trajectories [H · π(n·P) + (H − 1) · d(n·P)] + iterations · [H · (R + d)(n·N) + π(n·N)
    (Q critic) + 2 critic heads (n·N)] (+ termination head H · (n·N) per iteration when episodic); a linear layer
    of a batch of ``r`` rows costs ``2·r·in·out``. At the first step of the rollout the first layers of R and d
    take the latent part once per state: ``2·n·L·M + 2·n·N·A·M`` instead of ``2·n·N·(L + A)·M``.
    """
    H, I, N, P = planner.horizon, planner.iterations, planner.num_samples, planner.num_pi_trajs
    enc, dyn, rew, pi = (_mlp_dims(m) for m in (model.encoder, model.dynamics, model.reward, model.pi.net))
    critic = [model.critic.weights[0].shape[1], *(w.shape[2] for w in model.critic.weights)]
    flops = _linear_flops(n, enc)
    if P > 0:
        flops += H * _linear_flops(n * P, pi) + (H - 1) * _linear_flops(n * P, dyn)
    per_iter = H * (_linear_flops(n * N, rew) + _linear_flops(n * N, dyn)) + 2 * _linear_flops(n * N, critic)
    L, A = model.latent_dim, model.action_dim
    for net in (rew, dyn):  # first step: shared latent part of the first layer
        per_iter += _linear_flops(n, [L, net[1]]) + _linear_flops(n * N, [A, net[1]]) - _linear_flops(n * N, net[:2])
    if model.critic_type == "q":
        per_iter += _linear_flops(n * N, pi)
    if model.termination is not None:
        per_iter += H * _linear_flops(n * N, _mlp_dims(model.termination))
    return flops + I * per_iter


# --------------------------------------------------------------------------------------------------- profiling
_CATEGORIES = (
    ("matmul", ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "einsum")),
    ("mish", ("mish", "mish_backward")),
    ("layer_norm", ("layer_norm", "native_layer_norm", "native_layer_norm_backward")),
    ("softmax", ("softmax", "_softmax", "log_softmax", "_log_softmax", "_softmax_backward_data",
                 "_log_softmax_backward_data")),
    ("dtype casts/copies", ("copy_", "to", "_to_copy", "clone", "contiguous")),
    ("optimizer (foreach)", ()),
)


def _category(name: str) -> str:
    op = name.split("::", 1)[-1]
    if op.startswith("_foreach") or op.startswith("_fused_adam"):
        return "optimizer (foreach)"
    for cat, ops in _CATEGORIES:
        if op in ops:
            return cat
    return "other ops"


def profile_breakdown(fn: Callable[[], Any], device: torch.device, top: int = 15, calls: int = 3) -> dict[str, Any]:
    """Profile ``calls`` calls of ``fn`` with :mod:`torch.profiler` (after two untimed calls); every number is per
    call (the average over the profiled calls).

    Only ``aten::`` ops are categorised (by self time, so a composite op such as ``linear`` counts only its own
    overhead and its ``addmm`` counts as matmul); everything else of the wall time — Python, autograd and
    dispatcher bookkeeping, and profiler overhead — is reported as ``python+dispatch`` (CPU only).

    :return: ``wall_ms`` (per call, under the profiler), ``categories`` (self ms per call of matmul / mish /
        layer_norm / softmax / casts / optimizer / other aten ops and ``python+dispatch``) and ``top_ops`` (the
        ``top`` aten ops by self time: name, calls per call, self ms per call)
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    _sync(device)
    use_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        wall = (time.perf_counter() - t0) / calls
    cats: dict[str, float] = defaultdict(float)
    rows = []
    for evt in prof.key_averages():
        if not evt.key.startswith("aten::"):
            continue
        self_us = evt.self_device_time_total if use_cuda else evt.self_cpu_time_total  # CUDA: kernel time
        cats[_category(evt.key)] += self_us / 1e3 / calls
        rows.append((evt.key, evt.count // calls, self_us / 1e3 / calls))
    wall_ms = wall * 1e3
    if not use_cuda:
        cats["python+dispatch"] = max(wall_ms - sum(cats.values()), 0.0)
    rows.sort(key=lambda r: -r[2])
    return {
        "wall_ms": wall_ms,
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": k, "calls": c, "self_ms": ms} for k, c, ms in rows[:top]],
    }


# --------------------------------------------------------------------------------------------------- benchmark
def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def contention_probe(reps: int = 50) -> float:
    """Median microseconds of ``x + 1`` on a 512×512 fp32 CPU tensor with the current thread count.

    Unloaded, this takes ~20–50 µs. When another process shares the cores, every OpenMP parallel region waits
    for a descheduled worker thread and this jumps to milliseconds (a scheduler time slice): the timings of that
    run then measure the machine's load more than the code (use ``--threads 1`` or a quiet machine)."""
    x = torch.randn(512, 512)
    times = time_calls(lambda: x + 1, torch.device("cpu"), warmup=3, min_reps=reps, min_time=0.0, max_reps=reps)
    return 1e6 * statistics.median(times)


def _devices(spec: str) -> list[str]:
    if spec == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {d!r} requested but CUDA is not available")
    return devices


def run_benchmark(
    sizes: Sequence[Optional[int]] = (1, 5),
    n_envs: Sequence[int] = (1, 4, 8, 16),
    dtypes: Sequence[str] = ("fp32", "bf16"),
    devices: Sequence[str] = ("cpu",),
    what: Sequence[str] = ("plan", "update"),
    update_dtypes: Optional[Sequence[str]] = None,
    obs_dim: int = 17,
    action_dim: int = 6,
    batch_size: int = 256,
    preset: str = "pompc",
    overrides: Optional[dict[str, Any]] = None,
    warmup: int = 1,
    min_reps: int = 5,
    min_time: float = 2.0,
    max_reps: int = 100,
    peak_size: int = 2048,
    threads: Optional[int] = None,
    compile: bool = False,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Time plans and updates over the grid and return one record per measured row.

    The first (FLOP-counting) call of each row doubles as a warm-up; ``warmup`` more untimed calls follow.
    Updates do not depend on ``n_envs`` (a batch of ``batch_size`` windows), so they are measured once per
    (device, size, dtype), on the first ``n_envs``; reanalyze likewise.

    :param sizes: model sizes (None = architecture from ``overrides``)
    :param n_envs: numbers of environments planned in one batch
    :param dtypes: "fp32" and/or "bf16" for plans
    :param devices: torch devices
    :param what: any of "plan", "update", "step" (one plan of the first n_envs + one update, timed together: one
        environment step of training), "reanalyze"
    :param update_dtypes: dtypes of the update and reanalyze rows (default: ``dtypes``); bf16 =
        ``update_dtype="bfloat16"`` (and ``planner_dtype`` for reanalyze)
    :param obs_dim: observation size of the synthetic env
    :param action_dim: action size of the synthetic env
    :param batch_size: windows per update
    :param preset: POMPC preset
    :param overrides: extra POMPC keyword arguments (e.g. ``num_samples``)
    :param warmup: untimed calls after the counting call
    :param min_reps: timed calls at least
    :param min_time: keep timing until this many seconds have passed
    :param max_reps: timed calls at most
    :param peak_size: side of the square reference matmul
    :param threads: ``torch.set_num_threads`` (None: leave as is)
    :param compile: build the agents with ``compile=True`` (torch.compile of plan and update)
    :param verbose: print each row as it is measured
    :return: list of records (see ``RECORD_KEYS``, plus extra keys)
    """
    unknown = set(what) - set(WHATS)
    if unknown:
        raise ValueError(f"unknown --what {sorted(unknown)}; choose from {WHATS}")
    for d in list(dtypes) + list(update_dtypes or []):
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    if threads is not None:
        torch.set_num_threads(threads)
    update_dtypes = list(dtypes) if update_dtypes is None else list(update_dtypes)
    overrides = dict(overrides or {})
    if compile:
        overrides["compile"] = True
    meta = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "preset": preset,
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "compiled": compile,
    }
    if overrides:
        meta["overrides"] = {k: repr(v) for k, v in overrides.items()}
    records: list[dict[str, Any]] = []

    def measure(what_: str, fn: Callable[[], Any], size, n, dtype: str, device: torch.device, rows: int,
                mlp_dim: int, extra: dict[str, Any], count_fn: Optional[Callable[[], Any]] = None) -> dict[str, Any]:
        flops, per_op = count_flops(count_fn or fn)  # also the first warm-up call (eager path if compiled)
        if count_fn is not None:
            for _ in range(2):  # compiles (the first call of a compiled plan has no warm start, the rest do)
                fn()
        times = time_calls(fn, device, warmup, min_reps, min_time, max_reps)
        ms = 1e3 * statistics.median(times)
        side = peak_size if device.type == "cpu" else max(peak_size, 8192)  # a GPU needs a bigger matmul to peak
        peak = matmul_gflops(side, side, side, DTYPES[dtype], device)
        rows = min(rows, 8192)  # beyond this the layer-shaped matmul is as efficient as it gets
        layer = matmul_gflops(rows, mlp_dim, mlp_dim, DTYPES[dtype], device)
        gflops = flops / 1e9 / (ms / 1e3)
        rec = {
            "busy_probe_us": contention_probe(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "what": what_, "model_size": size, "n_envs": n, "dtype": dtype, "device": str(device), "ms": ms,
            "gflops": gflops, "peak_gflops": peak,
            "ratio": gflops / peak, "gflop": flops / 1e9, "flops_per_op": per_op, "peak_size": side,
            "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times), "reps": len(times),
            "ms_q25": 1e3 * float(np.quantile(times, 0.25)), "ms_q75": 1e3 * float(np.quantile(times, 0.75)),
            "layer_gflops": layer, "layer_shape": [rows, mlp_dim, mlp_dim], **extra, **meta,
        }
        if what_ == "plan":
            rec["ms_per_env"] = ms / n
        records.append(rec)
        if verbose:
            print(_format_row(rec), flush=True)
            if what_ == "step":
                print(f"#   step over {len(times)} calls: min {rec['ms_min']:.1f}, 25% {rec['ms_q25']:.1f}, median "
                      f"{ms:.1f}, 75% {rec['ms_q75']:.1f}, max {rec['ms_max']:.1f} ms", flush=True)
        return rec

    if verbose:
        print(_HEADER, flush=True)
    for dev_name in devices:
        device = torch.device(dev_name)
        for size in sizes:
            for dtype in dtypes if "plan" in what else []:
                for n in n_envs:
                    model = make_model(size, n, dtype, dev_name, obs_dim, action_dim, preset, **overrides)
                    planner = model.policy.planner
                    obs = torch.randn(n, obs_dim, device=device)
                    plan_once, plan_eager = _plan_calls(model, obs)
                    mlp_dim = model.policy.model.dynamics[1].out_features
                    measure("plan", plan_once, size, n, dtype, device, n * planner.num_samples, mlp_dim, {
                        "num_samples": planner.num_samples, "iterations": planner.iterations,
                        "horizon": planner.horizon, "num_q": model.policy.model.num_q,
                        "gflop_analytic": analytic_plan_flops(model.policy.model, planner, n) / 1e9,
                    }, count_fn=plan_eager if compile else None)
                    del model
            n0 = n_envs[0]
            for dtype in update_dtypes if {"update", "step", "reanalyze"} & set(what) else []:
                model = make_model(size, n0, dtype, dev_name, obs_dim, action_dim, preset,
                                   **{**overrides, "reanalyze_interval": 0, "batch_size": batch_size,
                                      "update_dtype": PLANNER_DTYPES[dtype]})
                fill_replay_buffer(model)
                model.policy.set_training_mode(True)
                mlp_dim = model.policy.model.dynamics[1].out_features
                H = model.horizon

                def update_once() -> None:
                    model._update(batch_size, pretrain=False)

                def update_eager() -> None:  # the same update without torch.compile (to count FLOPs)
                    fns = model._update_fns
                    model._update_fns = model._build_update_fns(False, device, PLANNER_DTYPES[dtype])
                    try:
                        model._update(batch_size, pretrain=False)
                    finally:
                        model._update_fns = fns

                update_extra = {"batch_size": batch_size, "num_q": model.policy.model.num_q, "horizon": H,
                                "update_dtype": PLANNER_DTYPES[dtype]}
                if "update" in what:
                    measure("update", update_once, size, n0, dtype, device, H * batch_size, mlp_dim, {
                        **update_extra, "note": "reanalyze off (see the reanalyze rows)",
                    }, count_fn=update_eager if compile else None)
                if "step" in what:  # planner in the update's dtype (make_model's dtype sets both)
                    step_plan, step_plan_eager = _plan_calls(model, torch.randn(n0, obs_dim, device=device))

                    def step_once() -> None:
                        step_plan()
                        update_once()

                    def step_eager() -> None:  # the same step without torch.compile (to count FLOPs)
                        step_plan_eager()
                        update_eager()

                    measure("step", step_once, size, n0, dtype, device, H * batch_size, mlp_dim, {
                        **update_extra, "num_samples": model.policy.planner.num_samples,
                        "note": "one plan + one update (reanalyze off)",
                    }, count_fn=step_eager if compile else None)
                if "reanalyze" in what:
                    batch = model.replay_buffer.sample(model.reanalyze_batch_size)
                    rp = model._reanalyze_planner
                    n_states = rp.horizon * min(model.reanalyze_batch_size, batch.observations.shape[1])
                    # the update rows run with reanalyze off: its interval is the preset's (or the user's)
                    interval = int(overrides.get("reanalyze_interval", resolve_preset(preset)["reanalyze_interval"]))

                    def reanalyze_once() -> None:  # the reanalyze planner is never compiled
                        model._reanalyze(batch)

                    rec = measure("reanalyze", reanalyze_once, size, n0, dtype, device, n_states * rp.num_samples,
                                  mlp_dim, {
                                      "states": n_states, "num_samples": rp.num_samples, "iterations": rp.iterations,
                                      "reanalyze_interval": interval,
                                  })
                    rec["amortized_ms"] = rec["ms"] / interval if interval else 0.0
                del model
    return records


_HEADER = (
    f"{'what':<9} {'size':>4} {'envs':>4} {'dtype':<5} {'device':<6} {'ms':>9} {'ms/env':>8} {'GFLOP':>8} "
    f"{'GFLOP/s':>8} {'peak':>7} {'ratio':>6} {'layer':>7} {'probe':>6}"
)


def _format_row(r: dict[str, Any]) -> str:
    per_env = f"{r['ms_per_env']:8.1f}" if r.get("ms_per_env") else f"{'':8}"
    size = "-" if r["model_size"] is None else str(r["model_size"])
    return (
        f"{r['what']:<9} {size:>4} {r['n_envs']:>4} {r['dtype']:<5} {r['device']:<6} {r['ms']:9.1f} {per_env} "
        f"{r['gflop']:8.2f} {r['gflops']:8.1f} {r['peak_gflops']:7.1f} {100 * r['ratio']:5.1f}% "
        f"{r['layer_gflops']:7.1f} {r.get('busy_probe_us', float('nan')):6.0f}"
    )


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The records as a plain-text table (ms = median per call; GFLOP/s = counted matmul FLOPs / median time;
    peak = square dense matmul of the same dtype; layer = a matmul of the hidden-layer shape at that batch;
    probe = :func:`contention_probe` in µs, ~30 on a quiet machine)."""
    return "\n".join([_HEADER, *(_format_row(r) for r in records)])


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _size(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "custom") else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sb3_pompc.benchmark",
        description="ms per plan / update of PO-MPC and achieved matmul GFLOP/s vs a dense matmul "
        "(see docs/benchmark.md)",
    )
    csv = lambda f: (lambda s: [f(x) for x in s.split(",") if x.strip()])  # noqa: E731
    p.add_argument("--quick", action="store_true",
                   help="subset: model size 5, n_envs 1 and 8, fp32 and bf16, plan and update, 3 timed calls, "
                        "no extra warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="auto", help="'auto' (cpu, + cuda if present) or a comma list")
    p.add_argument("--json", default="benchmark.json", help="where to write the records ('' = do not write)")
    p.add_argument("--sizes", type=csv(_size), default=None, help="model sizes, e.g. 1,5 ('none' = from --set)")
    p.add_argument("--n-envs", type=csv(int), default=None, help="numbers of envs planned per call, e.g. 1,4,8,16")
    p.add_argument("--dtypes", type=csv(str), default=None, help="fp32,bf16 (bf16 plan = planner_dtype='bfloat16')")
    p.add_argument("--update-dtypes", type=csv(str), default=None,
                   help="dtypes of update/reanalyze rows (default = --dtypes); bf16 = update_dtype='bfloat16'")
    p.add_argument("--compile", action="store_true",
                   help="agents built with compile=True (torch.compile of plan and update; compiling is untimed)")
    p.add_argument("--what", type=csv(str), default=None,
                   help="plan,update[,step][,reanalyze] (step = one plan + one update, timed together)")
    p.add_argument("--obs-dim", type=int, default=17, help="observation size (17 = cheetah-run)")
    p.add_argument("--action-dim", type=int, default=6, help="action size (6 = cheetah-run)")
    p.add_argument("--batch-size", type=int, default=256, help="windows per update")
    p.add_argument("--preset", default="pompc", help="POMPC preset (pompc, tdmpc2, bmpc)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra POMPC keyword argument, repeatable (e.g. --set num_samples=256)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the FLOP-counting call")
    p.add_argument("--reps", type=int, default=None, help="timed calls at least")
    p.add_argument("--min-time", type=float, default=None, help="keep timing a row for at least this many seconds")
    p.add_argument("--max-reps", type=int, default=100, help="timed calls at most")
    p.add_argument("--peak-size", type=int, default=2048,
                   help="side of the square reference matmul (at least 8192 on CUDA)")
    p.add_argument("--profile", action="store_true",
                   help="also print a torch.profiler breakdown (fp32, per call, mean of 3) of one plan and one update "
                        "of the first size and n_envs")
    p.add_argument("--profile-only", action="store_true", help="only the --profile breakdown, no timing table")
    p.add_argument("--check-syncs", action="store_true",
                   help="CUDA only: run plans and updates (lazy reanalyze included) of the first size and n_envs, "
                        "for each dtype, under torch.cuda.set_sync_debug_mode('error'), then the timing table")
    return p


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Command-line entry point; returns the records."""
    args = build_parser().parse_args(argv)
    quick = args.quick
    sizes = args.sizes or ([5] if quick else [1, 5])
    n_envs = args.n_envs or ([1, 8] if quick else [1, 4, 8, 16])
    dtypes = args.dtypes or ["fp32", "bf16"]
    what = args.what or ["plan", "update"]
    warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    reps = args.reps if args.reps is not None else (3 if quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.0 if quick else 2.0)
    overrides = _parse_overrides(args.overrides)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}, obs {args.obs_dim} act {args.action_dim}, "
          f"preset {args.preset}" + (", compile=True" if args.compile else "")
          + (f", overrides {overrides}" if overrides else ""),
          flush=True)
    if args.check_syncs:
        if "cuda" not in _devices(args.device):
            raise SystemExit(
                "--check-syncs needs a CUDA device (torch.cuda.set_sync_debug_mode); without one, "
                "`pytest tests/test_host_sync.py` checks plan and update for host syncs on the meta device"
            )
        for dtype in dtypes:
            model = make_model(sizes[0], n_envs[0], dtype, "cuda", args.obs_dim, args.action_dim, args.preset, **{
                "reanalyze_interval": 2, "reanalyze_batch_size": 2, **overrides, "batch_size": args.batch_size,
                "update_dtype": PLANNER_DTYPES[dtype], "compile": args.compile})
            check_syncs(model, args.batch_size)
            print(f"# no host sync: 2 plans and 4 updates (2 reanalyzes), size {sizes[0]}, n_envs {n_envs[0]}, "
                  f"{dtype}" + (", compiled" if args.compile else ""), flush=True)
    if args.profile_only:
        _print_profiles(sizes[0], n_envs[0], args, overrides)
        return []
    t0 = time.perf_counter()
    records = run_benchmark(
        sizes=sizes, n_envs=n_envs, dtypes=dtypes, devices=_devices(args.device), what=what,
        update_dtypes=args.update_dtypes, obs_dim=args.obs_dim, action_dim=args.action_dim,
        batch_size=args.batch_size, preset=args.preset, overrides=overrides, warmup=warmup, min_reps=reps,
        min_time=min_time, max_reps=args.max_reps, peak_size=args.peak_size, threads=args.threads,
        compile=args.compile,
    )
    busy = [r["busy_probe_us"] for r in records]
    if busy and max(busy) > 1000:
        print(f"# WARNING: the contention probe (x + 1 on 512x512, {torch.get_num_threads()} threads) took up to "
              f"{max(busy) / 1e3:.1f} ms (unloaded: ~0.03 ms): another process shares the cores and every parallel "
              "region stalls; these timings measure the load. Re-run on a quiet machine or with --threads 1.",
              flush=True)
    print(f"# {len(records)} rows in {time.perf_counter() - t0:.0f} s. ms = median per call; GFLOP = counted matmul "
          "FLOPs per call; peak = dense square matmul, same dtype; layer = hidden-layer-shaped matmul; "
          "bf16 update = update_dtype='bfloat16'" + (", compiled" if args.compile else ", eager"), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"# wrote {args.json}", flush=True)
    if args.profile:
        _print_profiles(sizes[0], n_envs[0], args, overrides)
    return records


def check_syncs(model: POMPC, batch_size: int = 256) -> None:
    """Fill ``model``'s replay buffer, then run 2 plans (one state per env) and 4 updates with CUDA's sync debug
    mode set to "error": any synchronising CUDA call inside them (``.item()``, a blocking copy, ``nonzero``, ...)
    raises. Build the model with lazy reanalyze on (e.g. ``reanalyze_interval=2``) to check its write-back too.

    Compiling, the first plan and updates (allocations) and the final flush of the reanalyze write-back run outside
    the check. On a device other than CUDA the same calls run unchecked (``tests/test_host_sync.py`` is the check
    without a GPU).

    :param model: an agent from :func:`make_model`
    :param batch_size: windows per update
    """
    fill_replay_buffer(model)
    obs = torch.randn(model.n_envs, *model.observation_space.shape, device=model.device)
    warm = model.policy.plan(obs, None).mean
    model.policy.set_training_mode(True)
    for _ in range(4):
        model._update(batch_size, pretrain=False)
    model._flush_plan_writes()
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            warm = model.policy.plan(obs, warm).mean.clone()
        model.policy.set_training_mode(True)
        for _ in range(4):
            model._update(batch_size, pretrain=False)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    model._flush_plan_writes()


def _print_profiles(size: Optional[int], n: int, args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """Print :func:`profile_breakdown` of one fp32 plan of ``n`` states and one update (reanalyze off)."""
    device = torch.device(_devices(args.device)[0])
    model = make_model(size, n, "fp32", str(device), args.obs_dim, args.action_dim, args.preset,
                       **{**overrides, "reanalyze_interval": 0, "batch_size": args.batch_size})
    obs = torch.randn(n, args.obs_dim, device=device)
    warm = model.policy.plan(obs, None).mean
    fill_replay_buffer(model)
    for name, fn in (
        (f"plan (size {size or 'custom'}, n_envs {n}, fp32)", lambda: model.policy.plan(obs, warm)),
        (f"update (size {size or 'custom'}, batch {args.batch_size}, fp32)",
         lambda: model._update(args.batch_size, pretrain=False)),
    ):
        if name.startswith("update"):
            model.policy.set_training_mode(True)
        prof = profile_breakdown(fn, device)
        print(f"\n## profile of one {name}: {prof['wall_ms']:.1f} ms per call under the profiler (mean of 3)")
        total = sum(prof["categories"].values()) or 1.0
        for cat, ms in prof["categories"].items():
            print(f"  {cat:<22} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
        print("  top ops by self time:")
        for row in prof["top_ops"]:
            print(f"    {row['op']:<40} {row['calls']:6d} calls {row['self_ms']:9.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
