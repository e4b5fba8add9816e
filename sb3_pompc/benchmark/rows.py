"""The benchmark's rows: what one plan, update, environment step or lazy reanalyze is, how each is timed and
counted, and the table that shows them."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sb3_pompc.benchmark.agents import DTYPES, PLANNER_DTYPES, fill_replay_buffer, make_model
from sb3_pompc.benchmark.flops import analytic_plan_flops, count_flops
from sb3_pompc.benchmark.timing import contention_probe, matmul_gflops, time_calls
from sb3_pompc.pompc import POMPC
from sb3_pompc.presets import resolve_preset

__all__ = ["WHATS", "RECORD_KEYS", "run_benchmark", "format_table"]

WHATS = ("plan", "update", "step", "reanalyze")
RECORD_KEYS = ("what", "model_size", "n_envs", "dtype", "device", "ms", "gflops", "peak_gflops")

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
    probe = :func:`~sb3_pompc.benchmark.timing.contention_probe` in µs, ~30 on a quiet machine).

    :param records: records of :func:`run_benchmark`
    """
    return "\n".join([_HEADER, *(_format_row(r) for r in records)])


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def plan_calls(model: POMPC, obs: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two ways to plan ``obs`` (n, obs_dim) with the agent's own planner, warm-started from the previous call:
    ``model.policy.plan`` (compiled if the agent is) and the same plan without ``torch.compile`` (to count
    FLOPs). The first plan (no warm start) runs here.

    :param model: the agent
    :param obs: flat observations on the agent's device
    :return: (plan once, plan once eagerly)
    """
    policy = model.policy
    state = {"warm": policy.plan(obs, None).mean}

    def plan_once() -> None:
        state["warm"] = policy.plan(obs, state["warm"]).mean

    def plan_eager() -> None:
        policy.plan(obs, state["warm"], eager=True)

    return plan_once, plan_eager


@dataclass
class _Rows:
    """How each row is timed (the arguments of :func:`run_benchmark`) and the records measured so far."""

    warmup: int
    min_reps: int
    min_time: float
    max_reps: int
    peak_size: int
    meta: dict[str, Any]
    verbose: bool
    records: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, what: str, fn: Callable[[], Any], size: Optional[int], n: int, dtype: str,
                device: torch.device, rows: int, mlp_dim: int, extra: dict[str, Any],
                count_fn: Optional[Callable[[], Any]] = None,
                amortized: tuple[float, dict[str, float]] = (0.0, {})) -> dict[str, Any]:
        """Count the FLOPs of one call (``count_fn``, the eager path of a compiled ``fn``), time ``fn``, measure
        the reference matmuls and append the row's record. ``amortized`` (seconds, FLOPs per op) is added to every
        call: the share of work that runs every few calls and is measured on its own (the step row's reanalyze)."""
        flops, per_op = count_flops(count_fn or fn)  # also the first warm-up call (eager path if compiled)
        if count_fn is not None:
            for _ in range(2):  # compiles, warms up and records a compiled plan's CUDA graph
                fn()
        times = time_calls(fn, device, self.warmup, self.min_reps, self.min_time, self.max_reps)
        times = [t + amortized[0] for t in times]
        flops += sum(amortized[1].values())
        per_op = {op: per_op.get(op, 0) + amortized[1].get(op, 0) for op in {**per_op, **amortized[1]}}
        ms = 1e3 * statistics.median(times)
        side = self.peak_size if device.type == "cpu" else max(self.peak_size, 8192)  # a GPU peaks on bigger ones
        peak = matmul_gflops(side, side, side, DTYPES[dtype], device)
        rows = min(rows, 8192)  # beyond this the layer-shaped matmul is as efficient as it gets
        layer = matmul_gflops(rows, mlp_dim, mlp_dim, DTYPES[dtype], device)
        gflops = flops / 1e9 / (ms / 1e3)
        rec = {
            "busy_probe_us": contention_probe(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "what": what, "model_size": size, "n_envs": n, "dtype": dtype, "device": str(device), "ms": ms,
            "gflops": gflops, "peak_gflops": peak,
            "ratio": gflops / peak, "gflop": flops / 1e9, "flops_per_op": per_op, "peak_size": side,
            "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times), "reps": len(times),
            "ms_q25": 1e3 * float(np.quantile(times, 0.25)), "ms_q75": 1e3 * float(np.quantile(times, 0.75)),
            "layer_gflops": layer, "layer_shape": [rows, mlp_dim, mlp_dim], **extra, **self.meta,
        }
        if what == "plan":
            rec["ms_per_env"] = ms / n
        self.records.append(rec)
        if self.verbose:
            print(_format_row(rec), flush=True)
            if what == "step":
                print(f"#   step over {len(times)} calls: min {rec['ms_min']:.1f}, 25% {rec['ms_q25']:.1f}, median "
                      f"{ms:.1f}, 75% {rec['ms_q75']:.1f}, max {rec['ms_max']:.1f} ms", flush=True)
        return rec


def _plan_row(out: _Rows, model: POMPC, size: Optional[int], n: int, dtype: str, device: torch.device,
              obs_dim: int, compile: bool) -> None:
    planner = model.policy.planner
    plan_once, plan_eager = plan_calls(model, torch.randn(n, obs_dim, device=device))
    mlp_dim = model.policy.model.dynamics[1].out_features
    out.measure("plan", plan_once, size, n, dtype, device, n * planner.num_samples, mlp_dim, {
        "num_samples": planner.num_samples, "iterations": planner.iterations,
        "horizon": planner.horizon, "num_q": model.policy.model.num_q,
        "gflop_analytic": analytic_plan_flops(model.policy.model, planner, n) / 1e9,
    }, count_fn=plan_eager if compile else None)


def _update_rows(out: _Rows, model: POMPC, what: Sequence[str], size: Optional[int], n0: int, dtype: str,
                 device: torch.device, obs_dim: int, batch_size: int, preset: str, overrides: dict[str, Any],
                 compile: bool) -> None:
    """The update, step and reanalyze rows of an agent built with lazy reanalyze off."""
    fill_replay_buffer(model)
    model.policy.set_training_mode(True)
    mlp_dim = model.policy.model.dynamics[1].out_features
    H = model.policy.planner.horizon

    def update_once() -> None:
        model.update(batch_size)

    def update_eager() -> None:  # the same update without torch.compile (to count FLOPs)
        model.update(batch_size, eager=True)

    update_extra = {"batch_size": batch_size, "num_q": model.policy.model.num_q, "horizon": H,
                    "update_dtype": PLANNER_DTYPES[dtype]}
    if "update" in what:
        out.measure("update", update_once, size, n0, dtype, device, H * batch_size, mlp_dim, {
            **update_extra, "note": "reanalyze off (see the reanalyze rows)",
        }, count_fn=update_eager if compile else None)
    # the update rows run with reanalyze off: its interval is the preset's (or the user's)
    interval = int(overrides.get("reanalyze_interval", resolve_preset(preset)["reanalyze_interval"]))
    reanalyzer = model.reanalyzer
    batch = model.replay_buffer.sample(reanalyzer.batch_size)

    def reanalyze_once() -> None:  # the reanalyze planner is never compiled
        reanalyzer.reanalyze(batch)
        reanalyzer.flush()

    if "step" in what:  # planner in the update's dtype (make_model's dtype sets both)
        amortized: tuple[float, dict[str, float]] = (0.0, {})
        if interval:  # one lazy reanalyze every `interval` updates: its time and FLOPs over `interval` steps
            per_op = count_flops(reanalyze_once)[1]
            seconds = statistics.median(time_calls(reanalyze_once, device, out.warmup, out.min_reps, 0.0, out.min_reps))
            amortized = (seconds / interval, {op: n / interval for op, n in per_op.items()})
        step_plan, step_plan_eager = plan_calls(model, torch.randn(n0, obs_dim, device=device))

        def step_once() -> None:
            step_plan()
            update_once()

        def step_eager() -> None:  # the same step without torch.compile (to count FLOPs)
            step_plan_eager()
            update_eager()

        out.measure("step", step_once, size, n0, dtype, device, H * batch_size, mlp_dim, {
            **update_extra, "num_samples": model.policy.planner.num_samples, "reanalyze_interval": interval,
            "reanalyze_amortized_ms": 1e3 * amortized[0],
            "note": "one plan + one update + 1/reanalyze_interval of a lazy reanalyze (timed on its own)",
        }, count_fn=step_eager if compile else None, amortized=amortized)
    if "reanalyze" in what:
        rp = reanalyzer.planner
        n_states = rp.horizon * min(reanalyzer.batch_size, batch.observations.shape[1])
        rec = out.measure("reanalyze", reanalyze_once, size, n0, dtype, device, n_states * rp.num_samples, mlp_dim, {
            "states": n_states, "num_samples": rp.num_samples, "iterations": rp.iterations,
            "reanalyze_interval": interval,
        })
        rec["amortized_ms"] = rec["ms"] / interval if interval else 0.0


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
    out = _Rows(warmup, min_reps, min_time, max_reps, peak_size, meta, verbose)

    if verbose:
        print(_HEADER, flush=True)
    for dev_name in devices:
        device = torch.device(dev_name)
        for size in sizes:
            for dtype in dtypes if "plan" in what else []:
                for n in n_envs:
                    model = make_model(size, n, dtype, dev_name, obs_dim, action_dim, preset, **overrides)
                    _plan_row(out, model, size, n, dtype, device, obs_dim, compile)
                    del model
            n0 = n_envs[0]
            for dtype in update_dtypes if {"update", "step", "reanalyze"} & set(what) else []:
                model = make_model(size, n0, dtype, dev_name, obs_dim, action_dim, preset,
                                   **{**overrides, "reanalyze_interval": 0, "batch_size": batch_size,
                                      "update_dtype": PLANNER_DTYPES[dtype]})
                _update_rows(out, model, what, size, n0, dtype, device, obs_dim, batch_size, preset, overrides,
                             compile)
                del model
    return out.records
