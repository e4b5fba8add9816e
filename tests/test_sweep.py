"""The sweep runner: grid files, Optuna-shared grids (two workers, resume, retry of a dead worker) and the plot."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sb3_pompc.callbacks import EVAL_CSV_HEADER, read_eval_csv
from sb3_pompc.sweep.__main__ import main
from sb3_pompc.sweep.grid import GridError, decode_value, encode_value, load_grid, parse_grid
from sb3_pompc.sweep.plot import bootstrap_band
from sb3_pompc.sweep.runner import grid_status, open_storage, open_study

TINY = dict(model_size=None, latent_dim=16, mlp_dim=32, enc_dim=16, num_q=2, num_samples=16, num_elites=4,
            num_pi_trajs=2, iterations=1, batch_size=8, learning_starts=50, pretrain_updates=5,
            reanalyze_interval=0, buffer_size=1000)


def write_grid(path: Path, axes: dict, steps: int = 120, **extra) -> Path:
    data = dict(env="Pendulum-v1", steps=steps, eval_every=60, eval_episodes=1, eval_max_steps=10,
                settings=dict(TINY), axes=axes)
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_cmd(grid: Path, storage: str, study: str, out: Path, *more: str) -> list[str]:
    return ["run", str(grid), "--storage", storage, "--study", study, "--out", str(out), "--threads", "1", *more]


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def trials_per_point(study: optuna.Study, state: TrialState) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for t in study.get_trials(states=(state,)):
        key = tuple(sorted(t.params.items()))
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------- grid files
@pytest.mark.parametrize("change, message", [
    (dict(learning_rate_typo=1), "unknown top-level key"),
    (dict(axes={}), "axes must be a non-empty"),
    (dict(axes={"kl_coef": []}), "non-empty list"),
    (dict(axes={"kl_cof": [1]}), "unknown POMPC keyword"),
    (dict(settings={"num_sample": 8}), "unknown POMPC keyword"),
    (dict(overrides=[{"when": {"kl_coef": 1}, "set": {"kl_valu": False}}]), "unknown POMPC keyword"),
    (dict(overrides=[{"when": {"kl_coef": 5}, "set": {"kl_value": False}}]), "not a value of that axis"),
    (dict(overrides=[{"when": {"prior": "forward"}, "set": {"kl_value": False}}]), "not an axis"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(env=None), "env must be"),
    (dict(axes={"kl_coef": [1, 1.0]}), None),  # 1 and 1.0 are distinct values (int and float)
    (dict(axes={"kl_coef": [1, 1]}), "repeats a value"),
    (dict(settings={"kl_coef": 1}), "both in settings and as axes"),
])
def test_grid_validation(tmp_path: Path, change: dict, message: str) -> None:
    data = dict(env="Pendulum-v1", steps=100, eval_every=50, settings={}, axes={"kl_coef": [1, "inf"], "seed": [0]})
    data.update(change)
    if message is None:
        assert len(parse_grid(data).points()) == 2
        return
    with pytest.raises(GridError, match=message):
        parse_grid(data)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GridError, match="bad.yml"):
        load_grid(path)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_grid_values_runs_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "g.yml"
    path.write_text("env: dmc/cartpole-swingup-v0\nsteps: 10\neval_every: 5\n"
                    "settings: {kl_value: true, target_kl: .inf, learning_starts: auto}\n"
                    "axes:\n  kl_coef: [0, 0.1, inf, auto]\n  seed: [3]\n"
                    "overrides:\n  - when: {kl_coef: inf}\n    set: {kl_value: false}\n")
    grid = load_grid(path)
    assert grid.axes["kl_coef"][2] == math.inf and grid.settings["target_kl"] == math.inf
    points = grid.points()
    assert [grid.run_name(p) for p in points] == ["kl_coef=0_seed=3", "kl_coef=0.1_seed=3", "kl_coef=inf_seed=3",
                                                  "kl_coef=auto_seed=3"]
    # every categorical choice is JSON and decodes to the value itself
    space = grid.search_space()
    json.dumps(space, allow_nan=False)
    assert [decode_value(v) for v in space["kl_coef"]] == [0, 0.1, math.inf, "auto"]
    assert encode_value("inf") != encode_value(math.inf)
    configs = [grid.run_config(p) for p in points]
    assert [c["pompc"]["kl_value"] for c in configs] == [True, True, False, True]
    assert configs[1]["pompc"]["kl_coef"] == 0.1 and configs[3]["pompc"]["learning_starts"] == "auto"
    assert {c["env"] for c in configs} == {"dmc/cartpole-swingup-v0"} and {c["seed"] for c in configs} == {3}
    assert "kl_coef" not in grid.settings  # axis values go into each run's settings only


def test_example_grids_are_valid() -> None:
    folder = Path(__file__).resolve().parents[1] / "examples" / "grids"
    paths = sorted(folder.glob("*.yml"))
    assert len(paths) >= 6
    for path in paths:
        grid = load_grid(path)
        assert grid.points()


# ---------------------------------------------------------------------------------------------- running
def test_two_workers_share_a_grid_then_resume_and_plot(tmp_path: Path, capsys) -> None:
    grid_path = write_grid(tmp_path / "grid.yml", {"kl_coef": [1, "inf"], "seed": [0, 1]}, steps=200,
                           eval_every=100)
    storage, out = str(tmp_path / "study.journal"), tmp_path / "runs"
    cmd = [sys.executable, "-m", "sb3_pompc.sweep", *sweep_cmd(grid_path, storage, "two", out)]
    procs = [subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs

    study = optuna.load_study(study_name="two", storage=open_storage(storage))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(trials_per_point(study, TrialState.COMPLETE).values()) == [1, 1, 1, 1], logs
    assert {t.user_attrs["worker_pid"] for t in complete} == {p.pid for p in procs}, logs
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["kl_coef=1_seed=0", "kl_coef=1_seed=1", "kl_coef=inf_seed=0", "kl_coef=inf_seed=1"]
    for t in complete:
        run = out / t.user_attrs["run_name"]
        curve = read_eval_csv(run / "eval.csv")
        assert list(curve["step"]) == [100, 200]  # no evaluation at step 0
        mean = curve["mean"] if "mean" in curve else curve["mean_return"]
        assert t.value == pytest.approx(float(mean[-1]), abs=1e-3)
        settings = json.loads((run / "settings.json").read_text())
        assert settings["pompc"]["latent_dim"] == 16 and settings["trial"] == t.number
        with open(run / "progress.csv", newline="") as f:
            assert [int(float(r["time/total_timesteps"])) for r in csv.DictReader(f)] == [200]

    # the grid is finished: starting the command again runs nothing
    n_trials = len(study.get_trials())
    capsys.readouterr()
    assert main(sweep_cmd(grid_path, storage, "two", out)) == 0
    assert "nothing to run: 4 of 4 points finished" in capsys.readouterr().out
    assert len(study.get_trials()) == n_trials

    # the plot's summary is the mean over seeds of the final evaluations
    assert main(["plot", str(out), "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "fig.csv", newline="") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"kl_coef=1", "kl_coef=inf"}
    for setting, row in rows.items():
        finals = [t.value for t in complete if t.user_attrs["run_name"].startswith(setting + "_")]
        assert int(row["n_seeds"]) == 2 and int(row["final_step"]) == 200
        assert float(row["final_mean"]) == pytest.approx(np.mean(finals), abs=1e-3)


def test_dead_worker_is_retried_on_rdb_storage(tmp_path: Path, capsys) -> None:
    grid_path = write_grid(tmp_path / "grid.yml", {"kl_coef": [1], "seed": [0]}, steps=200)
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "runs"
    args = sweep_cmd(grid_path, storage, "dead", out, "--heartbeat", "1", "--grace", "2")
    proc = subprocess.Popen([sys.executable, "-m", "sb3_pompc.sweep", *args], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    settings = out / "kl_coef=1_seed=0" / "settings.json"
    deadline = time.monotonic() + 120
    while not settings.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    assert proc.poll() is None, "the worker finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="dead", storage=storage)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]

    time.sleep(3)  # the grace period passes without a heartbeat
    assert main(args) == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert trials[1].user_attrs["worker_pid"] == os.getpid()
    assert (out / "kl_coef=1_seed=0" / "result.json").exists()


def test_journal_running_trial_is_left_alone_until_retry_running(tmp_path: Path, capsys) -> None:
    grid_path = write_grid(tmp_path / "grid.yml", {"kl_coef": [0], "seed": [1]})
    storage, out = str(tmp_path / "study.journal"), tmp_path / "runs"
    # a worker that took the point and died: the trial stays RUNNING (journal files have no heartbeat)
    grid = load_grid(grid_path)
    study = open_study(grid, open_storage(storage), "journal")
    trial = study.ask()
    for name, choices in grid.search_space().items():
        trial.suggest_categorical(name, choices)
    assert set(grid_status(study, grid).values()) == {"running"}

    capsys.readouterr()
    assert main(sweep_cmd(grid_path, storage, "journal", out)) == 0
    assert "1 running in other workers" in capsys.readouterr().out
    assert len(study.get_trials()) == 1 and not out.joinpath("kl_coef=0_seed=1").exists()

    assert main(sweep_cmd(grid_path, storage, "journal", out, "--retry-running")) == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and (out / "kl_coef=0_seed=1" / "eval.csv").exists()


def test_invalid_combination_fails_its_trial_only(tmp_path: Path, capsys) -> None:
    grid_path = write_grid(tmp_path / "grid.yml", {"kl_coef": ["inf", 2], "seed": [0]},
                           settings=dict(TINY, kl_value=True, learning_starts=10 ** 6))
    storage, out = str(tmp_path / "study.journal"), tmp_path / "runs"
    assert main(sweep_cmd(grid_path, storage, "bad", out)) == 1  # exit status 1: a point failed
    captured = capsys.readouterr()
    assert "kl_value" in captured.err and "failed" in captured.out
    study = optuna.load_study(study_name="bad", storage=open_storage(storage))
    by_coef = {t.params["kl_coef"]: t for t in study.get_trials()}
    assert by_coef["inf"].state == TrialState.FAIL and "kl_value" in by_coef["inf"].user_attrs["error"]
    assert by_coef["2"].state == TrialState.COMPLETE  # the worker went on to the next point
    # another grid under the same study name is refused
    other = write_grid(tmp_path / "other.yml", {"kl_coef": [3], "seed": [0]})
    assert main(sweep_cmd(other, storage, "bad", out)) == 2
    assert "different grid" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- plot
def _fake_run(folder: Path, axes: dict, steps: list[int], means: list[float], progress: list[tuple]) -> None:
    name = "_".join(f"{k}={v}" for k, v in axes.items())
    run = folder / name
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps(dict(run_name=name, env="Pendulum-v1", seed=axes["seed"],
                                                       axes=axes)))
    with open(run / "eval.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(EVAL_CSV_HEADER)
        for s, m in zip(steps, means):
            writer.writerow([s, m, 0.0, 1.0])
    with open(run / "progress.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time/total_timesteps", "train/kl_mean", "train/other"])
        for s, v in progress:
            writer.writerow([s, "" if v is None else v, 1])


def test_plot_means_bands_and_metric(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    finals: dict[str, list[float]] = {"0": [], "inf": []}
    for coef in ("0", "inf"):
        for seed in range(3):
            means = list(rng.normal(-500, 100, size=3))
            finals[coef].append(means[-1])
            _fake_run(tmp_path, {"kl_coef": coef, "seed": seed}, [100, 200, 300], means,
                      [(200, 0.1 * seed), (150, None), (400, 0.3 * seed + (coef == "inf"))])
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "curves.csv", newline="") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    for coef, values in finals.items():
        row = rows[f"kl_coef={coef}"]
        assert int(row["n_seeds"]) == 3 and int(row["final_step"]) == 300
        assert float(row["final_mean"]) == pytest.approx(np.mean(values), rel=1e-5)
        assert min(values) - 1e-3 <= float(row["ci_low"]) < float(row["final_mean"]) < float(row["ci_high"]) \
            <= max(values) + 1e-3

    # a progress.csv column: rows without a value are skipped, x = time/total_timesteps
    assert main(["plot", str(tmp_path), "--metric", "train/kl_mean"]) == 0
    with open(tmp_path / "train_kl_mean.csv", newline="") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert int(rows["kl_coef=inf"]["final_step"]) == 400
    assert float(rows["kl_coef=0"]["final_mean"]) == pytest.approx(np.mean([0.0, 0.3, 0.6]))
    assert float(rows["kl_coef=inf"]["final_mean"]) == pytest.approx(np.mean([1.0, 1.3, 1.6]))
    assert main(["plot", str(tmp_path / "nothing")]) == 2

    # --log-y draws the same curves on a logarithmic axis and leaves the summary as it is
    import matplotlib.pyplot as plt

    axes_scales = []
    original = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = original(*args, **kwargs)
        axes_scales.append(axes)
        return fig, axes

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "subplots", spy)
        assert main(["plot", str(tmp_path), "--metric", "train/kl_mean", "--log-y", "--out",
                     str(tmp_path / "log.png")]) == 0
    assert axes_scales[0][0][0].get_yscale() == "log"
    with open(tmp_path / "log.csv", newline="") as f:
        log_rows = {r["setting"]: r["final_mean"] for r in csv.DictReader(f)}
    assert log_rows == {k: v["final_mean"] for k, v in rows.items()}


def test_bootstrap_band() -> None:
    values = np.array([[0.0, 10.0], [2.0, 10.0], [4.0, 10.0]])
    mean, low, high = bootstrap_band(values)
    np.testing.assert_allclose(mean, [2.0, 10.0])
    np.testing.assert_allclose([low[1], high[1]], [10.0, 10.0])  # identical seeds: no band
    assert 0.0 <= low[0] < 2.0 < high[0] <= 4.0
    # the same stream every call, and a narrower band for a lower level
    np.testing.assert_array_equal(bootstrap_band(values)[1], low)
    assert bootstrap_band(values, level=0.5)[2][0] < high[0]
