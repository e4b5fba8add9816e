"""Wall-clock measurements: repeated timed calls, the throughput of a dense matmul, a probe of the machine's load,
and a :mod:`torch.profiler` breakdown of a call by op category."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any, Callable

import torch

__all__ = ["time_calls", "matmul_gflops", "contention_probe", "profile_breakdown"]


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


def matmul_gflops(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, reps: int = 5, min_time: float = 0.2
) -> float:
    """Median GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` on ``device`` (2·m·k·n FLOPs per call)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    times = time_calls(lambda: torch.mm(a, b), device, warmup=2, min_reps=reps, min_time=min_time, max_reps=1000)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def contention_probe(reps: int = 50) -> float:
    """Median microseconds of ``x + 1`` on a 512×512 fp32 CPU tensor with the current thread count.

    Unloaded, this takes ~20–50 µs. When another process shares the cores, every OpenMP parallel region waits
    for a descheduled worker thread and this jumps to milliseconds (a scheduler time slice): the timings of that
    run then measure the machine's load more than the code (use ``--threads 1`` or a quiet machine)."""
    x = torch.randn(512, 512)
    times = time_calls(lambda: x + 1, torch.device("cpu"), warmup=3, min_reps=reps, min_time=0.0, max_reps=reps)
    return 1e6 * statistics.median(times)


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
