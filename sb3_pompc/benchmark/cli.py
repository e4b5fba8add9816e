"""Command line of the benchmark (``python -m sb3_pompc.benchmark``), its check for host syncs on CUDA and its
profiler printout."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any, Iterator, Optional, Sequence

import torch

from sb3_pompc.benchmark.agents import PLANNER_DTYPES, fill_replay_buffer, make_model
from sb3_pompc.benchmark.rows import run_benchmark
from sb3_pompc.benchmark.timing import profile_breakdown
from sb3_pompc.cli import parse_overrides
from sb3_pompc.pompc import POMPC

__all__ = ["build_parser", "main", "check_syncs", "sync_check"]


#: POMPC settings that one of the benchmark's own flags sets (key → what it is, the flag): a ``--set`` of one of
#: them would be overridden or would run rows that their labels misdescribe, so it is refused
OWN_FLAGS = {
    "preset": ("preset", "--preset {}"),
    "device": ("device", "--device {}"),
    "model_size": ("model size", "--sizes {}"),
    "batch_size": ("batch size", "--batch-size {}"),
    "planner_dtype": ("plan dtype", "--dtypes fp32|bf16"),
    "update_dtype": ("update dtype", "--update-dtypes fp32|bf16"),
    "compile": ("compile setting", "--compile"),
}


def _devices(spec: str) -> list[str]:
    if spec == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {d!r} requested but CUDA is not available")
    return devices


def _size(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "custom") else int(text)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command-line options (``python -m sb3_pompc.benchmark --help``)."""
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
    """Command-line entry point; returns the records.

    :param argv: command-line arguments (None: ``sys.argv[1:]``)
    """
    args = build_parser().parse_args(argv)
    quick = args.quick
    sizes = args.sizes or ([5] if quick else [1, 5])
    n_envs = args.n_envs or ([1, 8] if quick else [1, 4, 8, 16])
    dtypes = args.dtypes or ["fp32", "bf16"]
    what = args.what or ["plan", "update"]
    warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    reps = args.reps if args.reps is not None else (3 if quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.0 if quick else 2.0)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    for key in OWN_FLAGS.keys() & overrides.keys():
        what, flag = OWN_FLAGS[key]
        raise SystemExit(f"--set {key}={overrides[key]}: give the {what} as {flag.format(overrides[key])}")
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
            print(f"# no host sync: 3 plans and 4 updates (2 reanalyzes), size {sizes[0]}, n_envs {n_envs[0]}, "
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


@contextlib.contextmanager
def sync_check(device: torch.device) -> Iterator[None]:
    """The checked window of :func:`check_syncs`: ``torch.cuda.set_sync_debug_mode("error")`` on CUDA (any
    synchronising CUDA call raises), nothing elsewhere."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")


def check_syncs(model: POMPC, batch_size: int = 256, plans: int = 3, updates: int = 4) -> None:
    """Fill ``model``'s replay buffer, then run ``plans`` warm-started plans (one state per env) and ``updates``
    updates inside :func:`sync_check`: on CUDA any synchronising call inside them (``.item()``, a blocking copy,
    ``nonzero``, ...) raises. Build the model with lazy reanalyze on (e.g. ``reanalyze_interval=2``) to check its
    write-back too.

    Outside the window run the first plans and updates (compiling, allocations) and the final flush of the
    reanalyze write-back: 3 plans, so that a compiled plan has been warmed up and recorded as a CUDA graph and
    every plan in the window is a replay of that graph. On a device other than CUDA the same calls run unchecked
    (``tests/test_host_sync.py`` is the check without a GPU).

    :param model: an agent from :func:`make_model`
    :param batch_size: windows per update
    :param plans: plans in the window (at least 3: replays of the compiled plan)
    :param updates: updates in the window
    """
    fill_replay_buffer(model)
    obs = torch.randn(model.n_envs, *model.observation_space.shape, device=model.device)
    warm = None
    for _ in range(3):  # compile, warm-up run, CUDA-graph recording
        warm = model.policy.plan(obs, warm).mean
    model.policy.set_training_mode(True)
    for _ in range(updates):
        model.update(batch_size)
    model.reanalyzer.flush()
    with sync_check(model.device):
        for _ in range(plans):
            warm = model.policy.plan(obs, warm).mean
        model.policy.set_training_mode(True)
        for _ in range(updates):
            model.update(batch_size)
    model.reanalyzer.flush()


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
         lambda: model.update(args.batch_size)),
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
