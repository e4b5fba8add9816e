"""Command line of the sweep runner.

Usage::

    python -m sb3_pompc.sweep run GRID.yml [--storage URL] [--study NAME] [--workers K] [--threads N] [--out DIR]
    python -m sb3_pompc.sweep plot DIR [--out FIG.png] [--metric train/kl_mean] [--summary FILE.csv] [--log-y]

``run`` defaults: study = the grid file's stem, out = ``runs/<study>``, storage = ``<out>/optuna.journal``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    """The ``run`` / ``plot`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m sb3_pompc.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run what is left of a grid (resumes; several commands share one grid)")
    run.add_argument("grid", help="the grid YAML file")
    run.add_argument("--storage", default=None,
                     help="journal file path or RDB URL (sqlite:///f.db, postgresql://...); "
                          "default <out>/optuna.journal")
    run.add_argument("--study", default=None, help="study name (default: the grid file's stem)")
    run.add_argument("--out", default=None, help="folder of the run folders (default runs/<study>)")
    run.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    run.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores // workers)")
    run.add_argument("--heartbeat", type=int, default=60,
                     help="RDB storages: seconds between heartbeats of a running trial; 0 = off (default 60)")
    run.add_argument("--grace", type=int, default=None,
                     help="RDB storages: seconds without heartbeat before a trial is dead (default 2×heartbeat)")
    run.add_argument("--max-retry", type=int, default=3, help="RDB storages: retries of a point whose worker died")
    run.add_argument("--retry-running", action="store_true",
                     help="fail every RUNNING trial and queue it again (journal files, when no worker is alive)")
    run.add_argument("--retry-failed", action="store_true", help="queue the failed points again")

    plot = sub.add_parser("plot", help="draw the learning curves of a sweep folder")
    plot.add_argument("folder", help="the sweep's --out folder")
    plot.add_argument("--out", default=None, help="the PNG (default <folder>/curves.png or <folder>/<metric>.png)")
    plot.add_argument("--metric", default=None, help="a progress.csv column (e.g. train/kl_mean) instead of eval")
    plot.add_argument("--summary", default=None, help="the summary CSV (default: the PNG's path with .csv)")
    plot.add_argument("--log-y", action="store_true", help="a logarithmic y axis (for KL terms that span decades)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status.

    :param argv: the arguments (default ``sys.argv[1:]``)
    """
    args = build_parser().parse_args(argv)
    if args.command == "plot":
        from sb3_pompc.sweep.plot import plot_sweep

        try:
            png, csv_path = plot_sweep(args.folder, out=args.out, metric=args.metric, summary=args.summary,
                                       log_y=args.log_y)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {png} and {csv_path}")
        return 0

    from sb3_pompc.sweep.grid import GridError, load_grid

    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        print("error: --workers and --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        grid = load_grid(args.grid)
    except (GridError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sb3_pompc.sweep.runner import StudyMismatchError, run_grid

    study = args.study or Path(args.grid).stem
    out = Path(args.out) if args.out else Path("runs") / study
    storage = args.storage or str(out / "optuna.journal")
    try:
        return run_grid(grid, storage, study, out, workers=args.workers, threads=args.threads,
                        heartbeat=args.heartbeat, grace=args.grace, max_retry=args.max_retry,
                        retry_running=args.retry_running, retry_failed=args.retry_failed)
    except StudyMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
