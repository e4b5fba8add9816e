"""Run a grid through an Optuna study: one trial is one training run, the storage is the only coordination.

The study uses :class:`optuna.samplers.GridSampler` over the grid's axes. Any number of ``run`` commands, on any
number of machines, pointed at the same storage and study name, share the grid: each trial takes a point nobody
has taken. Before it trains, a trial checks the storage for a finished or older running trial of the same point
(which the sampler can hand out again when every point is taken) and, if it finds one, ends as PRUNED without
training. A point whose trial is COMPLETE or FAIL is finished; starting the command again runs only what is left.

Dead workers: on RDB storages (``sqlite:///``, ``postgresql://``, ``mysql://``) every running trial records a
heartbeat; a trial whose heartbeat is older than the grace period is failed by the next worker that starts a
trial (or by the next ``run``) and queued again by Optuna's retry callback. Journal files have no heartbeat:
``--retry-running`` fails the running trials and queues them again, for use when no worker of the study is alive.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import optuna
from optuna.trial import FrozenTrial, TrialState

from sb3_pompc.sweep.grid import Grid, decode_value

__all__ = ["StudyMismatchError", "open_storage", "open_study", "grid_status", "train_run", "run_grid", "requeue"]

GRID_ATTR = "sweep_grid_fingerprint"
#: environment variables that set a worker's thread count before torch loads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class StudyMismatchError(ValueError):
    """The study exists and holds a different grid."""


# ---------------------------------------------------------------------------------------------- storage
def _retry_callback(max_retry: Optional[int]) -> Callable[[optuna.Study, FrozenTrial], None]:
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / deprecated-alias warnings
        return cls(max_retry=max_retry)


def open_storage(url: Union[str, Path], heartbeat: int = 60, grace: Optional[int] = None,
                 max_retry: Optional[int] = 3) -> optuna.storages.BaseStorage:
    """An Optuna storage for a journal file path or an RDB URL.

    :param url: a journal file path (created with its folder), or an SQLAlchemy URL (``sqlite:///sweep.db``,
        ``postgresql://user@host/db``, ``mysql+pymysql://...``)
    :param heartbeat: RDB only: seconds between a running trial's heartbeats (0 = no heartbeat, no retry)
    :param grace: RDB only: seconds without a heartbeat after which a running trial is failed (default 2×heartbeat)
    :param max_retry: RDB only: how often one point is queued again after its worker died (None = always)
    """
    url = str(url)
    if "://" in url:
        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # several writers wait for the file lock
        if heartbeat > 0:
            name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
                else "failed_trial_callback"
            kwargs.update(heartbeat_interval=int(heartbeat), grace_period=grace, **{name: _retry_callback(max_retry)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kwargs)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    journal = getattr(optuna.storages, "journal", None)
    backend = getattr(journal, "JournalFileBackend", None) or optuna.storages.JournalFileStorage  # optuna < 4
    return optuna.storages.JournalStorage(backend(url))


def open_study(grid: Grid, storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    """Create the study of a grid (or load it) with a ``GridSampler`` over the axes, maximising the final return.

    :param grid: the grid
    :param storage: see :func:`open_storage`
    :param name: the study name
    :raises StudyMismatchError: if the study exists and was created for a different grid
    """
    sampler = optuna.samplers.GridSampler(grid.search_space())
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    found = study.user_attrs.get(GRID_ATTR)
    if found is None:
        study.set_user_attr(GRID_ATTR, grid.fingerprint())
        study.set_user_attr("sweep_grid", json.loads(json.dumps(grid.to_dict(), default=repr)))
    elif found != grid.fingerprint():
        raise StudyMismatchError(f"study {name!r} was created for a different grid (fingerprint {found}, this grid "
                         f"{grid.fingerprint()}); use another --study name")
    return study


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# ---------------------------------------------------------------------------------------------- status
def grid_status(study: optuna.Study, grid: Grid) -> dict[tuple[str, ...], str]:
    """State of every grid point: ``complete``, ``failed``, ``running``, ``waiting`` (queued again) or
    ``pending`` (never taken, or taken only by pruned duplicates).

    :param study: the grid's study
    :param grid: the grid
    """
    trials: dict[tuple[str, ...], list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        key = grid.key(t.params)
        if key is not None:
            trials.setdefault(key, []).append(t)
    order = ((TrialState.COMPLETE, "complete"), (TrialState.WAITING, "waiting"), (TrialState.RUNNING, "running"),
             (TrialState.FAIL, "failed"))
    out = {}
    for point in grid.points():
        states = {t.state for t in trials.get(grid.point_key(point), [])}
        out[grid.point_key(point)] = next((label for state, label in order if state in states), "pending")
    return out


def _claimable(status: dict[tuple[str, ...], str]) -> int:
    return sum(s in ("pending", "waiting") for s in status.values())


def requeue(storage: optuna.storages.BaseStorage, study_name: str, grid: Grid, running: bool = False,
            failed: bool = False) -> int:
    """Queue points again with Optuna's retry callback.

    :param storage: see :func:`open_storage`
    :param study_name: the grid's study
    :param grid: the grid
    :param running: fail every RUNNING trial and queue its point again (only when no worker of the study is
        alive: a journal file has no heartbeat to tell a dead worker from a busy one)
    :param failed: queue every point whose trials all failed
    :return: the number of points queued
    """
    # the default sampler: ``tell`` runs the sampler's after_trial, and GridSampler's stops an optimize loop
    study = optuna.load_study(study_name=study_name, storage=storage)
    stale = set()
    if running:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            stale.add(t.number)
    status = grid_status(study, grid)
    retry, queued = _retry_callback(None), set()
    for t in reversed(study.get_trials(deepcopy=True, states=(TrialState.FAIL,))):  # the latest trial per point
        key = grid.key(t.params)
        if key is None or key in queued or status.get(key) != "failed" or not (failed or t.number in stale):
            continue
        retry(study, t)
        queued.add(key)
    return len(queued)


# ---------------------------------------------------------------------------------------------- one run
def train_run(config: dict[str, Any], run_dir: Union[str, Path]) -> float:
    """Train one POMPC run and write ``eval.csv``, ``progress.csv`` (SB3's CSV logger, one row per episode),
    ``settings.json`` and ``result.json`` into ``run_dir``.

    Evaluation runs every ``eval_every`` env steps and at the end (not at step 0), ``eval_episodes`` deterministic
    episodes on a separate env seeded with ``seed + 10_000``.

    :param config: :meth:`Grid.run_config` of the point (plus any extra keys to record)
    :param run_dir: the run's folder (created; an older content is removed)
    :return: the mean return of the final evaluation
    """
    import gymnasium as gym
    from stable_baselines3.common.logger import configure

    from sb3_pompc import POMPC
    from sb3_pompc.callbacks import EvalCurveCallback

    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "settings.json").write_text(json.dumps(config, indent=2, default=repr) + "\n")
    kwargs = dict(config["pompc"])
    policy = kwargs.pop("policy", "MlpPolicy")
    t0 = time.perf_counter()
    model = POMPC(policy, config["env"], seed=config["seed"], **kwargs)
    logger = configure(str(run_dir), ["csv"])
    model.set_logger(logger)
    limit = {"max_episode_steps": config["eval_max_steps"]} if config.get("eval_max_steps") else {}
    eval_env = gym.make(config["env"], **limit)
    callback = EvalCurveCallback(eval_env, eval_freq=config["eval_every"], n_eval_episodes=config["eval_episodes"],
                                 log_path=run_dir / "eval.csv", deterministic=True, eval_seed=config["seed"] + 10_000,
                                 eval_at_start=False, eval_at_end=True)
    try:
        model.learn(config["steps"], callback=callback, log_interval=1)
    finally:
        logger.close()
        callback.eval_env.close()
        model.env.close()
    final = float(callback.last_mean_return)
    result = dict(final_mean=final, final_step=int(model.num_timesteps), wall_time_s=time.perf_counter() - t0)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return final


# ---------------------------------------------------------------------------------------------- workers
def _duplicate_of(study: optuna.Study, trial: optuna.Trial, key: tuple[str, ...], grid: Grid) -> Optional[int]:
    """The number of a COMPLETE trial of the same point, or of an older RUNNING one (None if there is none)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number != trial.number and grid.key(t.params) == key \
                and (t.state == TrialState.COMPLETE or t.number < trial.number):
            return t.number
    return None


def _objective(grid: Grid, out: Path) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        params = {name: trial.suggest_categorical(name, choices) for name, choices in grid.search_space().items()}
        key = grid.key(params)
        point = {name: decode_value(params[name]) for name in grid.axes}
        run_name = grid.run_name(point)
        other = _duplicate_of(trial.study, trial, key, grid)
        if other is not None:
            trial.set_user_attr("duplicate_of", other)
            raise optuna.TrialPruned(f"{run_name} is taken by trial {other}")
        if trial.user_attrs.get("error"):  # a queued retry carries the failed trial's attributes
            trial.set_user_attr("error", None)
        config = grid.run_config(point)
        config.update(trial=trial.number, study=trial.study.study_name, host=socket.gethostname(), pid=os.getpid())
        for attr, value in (("worker_pid", os.getpid()), ("host", socket.gethostname()), ("run_name", run_name),
                            ("run_dir", str((out / run_name).resolve()))):
            trial.set_user_attr(attr, value)
        print(f"[sweep pid {os.getpid()}] trial {trial.number}: {run_name}", flush=True)
        try:
            return train_run(config, out / run_name)
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            trial.set_user_attr("error", message[:2000])
            print(f"[sweep pid {os.getpid()}] trial {trial.number} ({run_name}) FAILED: {message}", file=sys.stderr,
                  flush=True)
            if not isinstance(e, ValueError):
                traceback.print_exc()
            raise

    return objective


def _stop_when_nothing_left(grid: Grid) -> Callable[[optuna.Study, FrozenTrial], None]:
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        _fail_stale(study)
        if _claimable(grid_status(study, grid)) == 0:
            study.stop()

    return callback


def _worker(grid: Grid, storage_args: dict[str, Any], study_name: str, out: str, threads: int) -> None:
    """One worker: takes grid points from the study until none is left."""
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(**storage_args)
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.GridSampler(grid.search_space()))
    _fail_stale(study)
    if _claimable(grid_status(study, grid)) == 0:
        return
    study.optimize(_objective(grid, Path(out)), catch=(Exception,), callbacks=[_stop_when_nothing_left(grid)],
                   gc_after_trial=True)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _print_status(grid: Grid, status: dict[tuple[str, ...], str], study: optuna.Study) -> None:
    values = {}
    errors = {}
    for t in study.get_trials(deepcopy=False):
        key = grid.key(t.params)
        if t.state == TrialState.COMPLETE:
            values[key] = t.value
        elif t.state == TrialState.FAIL and t.user_attrs.get("error"):
            errors[key] = t.user_attrs["error"]
    for point in grid.points():
        key = grid.point_key(point)
        state = status[key]
        extra = f"{values[key]:.2f}" if state == "complete" else errors.get(key, "") if state == "failed" else ""
        print(f"  {grid.run_name(point):<40s} {state:<9s} {extra}")


def run_grid(grid: Grid, storage: Union[str, Path], study_name: str, out: Union[str, Path], workers: int = 1,
             threads: Optional[int] = None, heartbeat: int = 60, grace: Optional[int] = None,
             max_retry: Optional[int] = 3, retry_running: bool = False, retry_failed: bool = False) -> int:
    """Run what is left of a grid with ``workers`` local processes (the command ``python -m sb3_pompc.sweep run``).

    :param grid: the grid
    :param storage: journal file path or RDB URL (see :func:`open_storage`)
    :param study_name: the study holding the grid
    :param out: folder of the run folders
    :param workers: local worker processes (at most one per point left)
    :param threads: torch threads per worker (default: the cores this process may use // workers)
    :param heartbeat: see :func:`open_storage`
    :param grace: see :func:`open_storage`
    :param max_retry: see :func:`open_storage`
    :param retry_running: fail every RUNNING trial and queue its point again first (journal storage after a crash)
    :param retry_failed: queue the failed points again first
    :return: 0 if every point is complete or running elsewhere, 1 if a point failed
    """
    storage_args = dict(url=str(storage), heartbeat=heartbeat, grace=grace, max_retry=max_retry)
    storage_obj = open_storage(**storage_args)
    study = open_study(grid, storage_obj, study_name)
    _fail_stale(study)
    if retry_running or retry_failed:
        queued = requeue(storage_obj, study_name, grid, running=retry_running, failed=retry_failed)
        print(f"queued {queued} point(s) again")
    status = grid_status(study, grid)
    left = _claimable(status)
    n_points = len(status)
    if left == 0:
        running = sum(s == "running" for s in status.values())
        print(f"nothing to run: {n_points - running} of {n_points} points finished"
              + (f", {running} running in other workers" if running else ""))
    else:
        k = max(1, min(workers, left))
        n_threads = threads or max(1, _cores() // k)
        print(f"{left} of {n_points} points to run: {k} worker(s) × {n_threads} thread(s)", flush=True)
        args = (grid, storage_args, study_name, str(out), n_threads)
        Path(out).mkdir(parents=True, exist_ok=True)
        if k == 1:
            _worker(*args)
        else:
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_worker, args=args, daemon=False) for _ in range(k)]
            saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
            os.environ.update({name: str(n_threads) for name in THREAD_VARIABLES})  # read when torch loads
            try:
                for p in procs:
                    p.start()
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
            for p in procs:
                p.join()
        status = grid_status(study, grid)
    _print_status(grid, status, study)
    failed = sum(s == "failed" for s in status.values())
    if failed:
        print(f"{failed} point(s) failed; `run --retry-failed` queues them again", file=sys.stderr)
    return 1 if failed else 0
