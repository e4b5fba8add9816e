"""Run the same short experiment for members of the PO-MPC family and tabulate them.

Variants (same env, seed, steps and CPU-friendly sizes):

- ``tdmpc2``: ``preset="tdmpc2"`` (λ = 0)
- ``bmpc``: ``preset="bmpc"`` (λ = ∞, prior = buffer π^P, V critic, lazy reanalyze)
- ``pompc-forward``: ``preset="pompc", prior="forward"`` (λ = 1, learned prior fitted by KL(π^P ‖ π_p))
- ``pompc-reverse``: ``preset="pompc", prior="reverse"`` (λ = 1, learned prior fitted by KL(π_p ‖ π^P))

Each variant trains with :func:`sb3_pompc.train.train` into ``<out>/<variant>/`` (eval.csv, curve.png,
progress.csv from an SB3 CSV logger, summary.json, model.zip). Then ``<out>/summary.md`` tabulates every variant
folder found in ``<out>`` (so ``--only`` runs done one at a time add up), and ``<out>/kl_diagnostics.png`` compares
their KL logs (examples/plot_kl_diagnostics.py).

Table columns: final eval return (mean ± std over the eval episodes of the last evaluation); training wall time
per 1k env steps (evaluation excluded); KL(π_s ‖ π_ref) and KL(π_s ‖ π^P buffer) statistics = the mean of the
logged ``train/kl_mean``, ``train/kl_std``, ``train/kl_planner_mean``, ``train/kl_planner_std`` over the second
half of the logged rows.

Usage::

    python examples/compare_family.py --env dmc/cartpole-balance-v0 --steps 10000 --out runs/family
    python examples/compare_family.py --only bmpc,pompc-reverse --steps 10000 --out runs/family
    python examples/compare_family.py --table-only --out runs/family
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_kl_diagnostics import kl_summary, plot_kl_diagnostics, read_progress  # noqa: E402

from sb3_pompc.cli import parse_overrides  # noqa: E402
from sb3_pompc.train import build_model_kwargs, train  # noqa: E402

# the presets that refresh stale π^P keep lazy reanalyze on the CPU, in a cheap form (the CPU sizes switch it off)
_CHEAP_REANALYZE = dict(reanalyze_interval=10, reanalyze_batch_size=4, reanalyze_num_samples=32)
VARIANTS: dict[str, dict[str, Any]] = {
    "tdmpc2": dict(preset="tdmpc2"),
    "bmpc": dict(preset="bmpc", cpu_extra=_CHEAP_REANALYZE),
    "pompc-forward": dict(preset="pompc", prior="forward", cpu_extra=_CHEAP_REANALYZE),
    "pompc-reverse": dict(preset="pompc", prior="reverse", cpu_extra=_CHEAP_REANALYZE),
}


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def summary_table(out: Path, variants: Sequence[str] = tuple(VARIANTS)) -> str:
    """Markdown table of every ``<out>/<variant>`` that has a summary.json (variants in the given order first,
    then any other folder).

    :param out: the comparison folder
    :param variants: preferred row order
    """
    found = [v for v in variants if (out / v / "summary.json").is_file()]
    found += sorted(
        p.name for p in out.iterdir() if p.is_dir() and (p / "summary.json").is_file() and p.name not in found
    )
    lines = [
        "| variant | preset | λ | prior | steps | final return | train s / 1k steps | KL(π_s‖π_ref) mean | "
        "KL(π_s‖π_ref) std | KL(π_s‖π^P) mean | KL(π_s‖π^P) std |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in found:
        with open(out / name / "summary.json") as f:
            s = json.load(f)
        try:
            prog = read_progress(out / name)
        except (FileNotFoundError, ValueError):
            prog = {}
        kl = [kl_summary(prog, k) for k in ("train/kl_mean", "train/kl_std", "train/kl_planner_mean",
                                            "train/kl_planner_std")]
        lines.append(
            f"| {name} | {s.get('preset', '?')} | {s.get('kl_coef', '?')} | {s.get('prior', '?')} | {s['steps']} | "
            f"{s['final_mean_return']:.1f} ± {s['final_std_return']:.1f} | {s['train_s_per_1k_steps']:.1f} | "
            + " | ".join(_fmt(x) for x in kl) + " |"
        )
    lines.append("")
    lines.append("KL columns: mean of the logged train/kl_* values over the second half of the logged rows "
                 "(π_ref = buffer π^P for tdmpc2/bmpc, the learned prior π_p for pompc-*; with λ = 0 the KL is "
                 "logged, not optimised).")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="dmc/cartpole-balance-v0")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--out", default="runs/family")
    p.add_argument("--eval-freq", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation (each is 500 plans on DMC)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full", action="store_true", help="the paper's sizes instead of the CPU-friendly ones")
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="POMPC keyword argument applied to every variant (repeatable)")
    p.add_argument("--no-anchors", action="store_true", help="do not draw the published curves")
    p.add_argument("--skip-existing", action="store_true", help="do not rerun variants that have a summary.json")
    p.add_argument("--table-only", action="store_true", help="only rebuild summary.md and kl_diagnostics.png")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(VARIANTS) if not args.only else [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    overrides = parse_overrides(args.set)
    if not args.table_only:
        for name in names:
            if args.skip_existing and (out / name / "summary.json").is_file():
                print(f"[{name}] exists, skipped")
                continue
            v = VARIANTS[name]
            extra = {} if args.full else dict(v.get("cpu_extra", {}))
            kwargs = build_model_kwargs(v["preset"], v.get("kl_coef"), v.get("prior"), not args.full, args.seed,
                                        args.device, {**extra, **overrides})
            print(f"[{name}] training {args.steps} steps on {args.env}", flush=True)
            train(args.env, args.steps, out / name, kwargs, args.eval_freq, args.eval_episodes, True,
                  not args.no_anchors, label=name, verbose=0 if args.quiet else 1, cpu=not args.full)
    table = summary_table(out)
    (out / "summary.md").write_text(table)
    dirs = [out / v for v in VARIANTS] + sorted(p for p in out.iterdir() if p.name not in VARIANTS)
    runs = [(p.name, p) for p in dirs if (p / "progress.csv").is_file()]
    try:
        plot_kl_diagnostics(runs, out / "kl_diagnostics.png", title=f"KL diagnostics: {args.env}")
    except ValueError as e:  # no KL logged yet (runs shorter than learning_starts)
        print(f"no KL diagnostics plot: {e}")
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
