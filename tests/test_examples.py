"""Smoke tests of the training job (sb3_pompc.train), the published anchor curves (sb3_pompc.anchors), the
command-line helpers (sb3_pompc.cli), the callbacks and the example scripts (plot_kl_diagnostics, compare_family)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import gymnasium as gym
import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import plot_kl_diagnostics as pkl  # noqa: E402

import sb3_pompc.callbacks as callbacks_module  # noqa: E402
import sb3_pompc.train as job  # noqa: E402
from sb3_pompc import POMPC  # noqa: E402
from sb3_pompc.anchors import (  # noqa: E402
    AnchorCurve,
    draw_anchor_markers,
    env_to_task,
    load_anchor_curves,
    summarize_bmpc_results,
    summarize_tdmpc2_results,
)
from sb3_pompc.callbacks import EVAL_CSV_HEADER, EvalCurveCallback, TrainingProgressBar, read_eval_csv  # noqa: E402
from sb3_pompc.cli import parse_overrides, parse_value  # noqa: E402
from sb3_pompc.presets import CPU_SETTINGS  # noqa: E402

SHORT_ENV = "PendulumShort-v0"  # Pendulum with 50-step episodes: evaluations and logger dumps come quickly
if SHORT_ENV not in gym.registry:
    gym.register(id=SHORT_ENV, entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv", max_episode_steps=50)

TINY = dict(model_size=None, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2, num_samples=32, num_elites=4,
            num_pi_trajs=2, iterations=2, batch_size=16, learning_starts=50, pretrain_updates=5,
            reanalyze_batch_size=2, reanalyze_num_samples=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# the published result files the shipped tables are built from, when this checkout sits next to them
_SOURCES = (Path(__file__).resolve().parents[2] / "shared" / "anchors").resolve()
ANCHORS = _SOURCES if _SOURCES.is_dir() else None
needs_sources = pytest.mark.skipif(ANCHORS is None, reason="published result files (../shared/anchors) not here")


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def tiny_argv(**extra: str) -> list[str]:
    argv = [item for k, v in TINY.items() for item in ("--set", f"{k}={v}")]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", v]
    return argv


# ------------------------------------------------------------------------------------------------- task names
@pytest.mark.parametrize(
    "env_id, task",
    [
        ("dmc/cartpole-balance-v0", "cartpole-balance"),
        ("dmc/ball_in_cup-catch-v0", "cup-catch"),
        ("dmc/cup-catch-v0", "cup-catch"),
        ("dmc/finger-turn_easy-v0", "finger-turn-easy"),
        ("dmc/cartpole-balance_sparse-v0", "cartpole-balance-sparse"),
        ("Pendulum-v1", None),
        ("dmc/cartpole", None),
    ],
)
def test_env_to_task(env_id: str, task) -> None:
    assert env_to_task(env_id) == task


# ------------------------------------------------------------------------------------------------- anchors
def test_shipped_anchor_curves() -> None:
    curves = load_anchor_curves("dmc/cartpole-balance-v0")
    assert [c.algo for c in curves] == ["tdmpc2", "bmpc"]
    tdmpc2, bmpc = curves
    assert tdmpc2.label == "TD-MPC2 (published, 3 seeds)" and tdmpc2.n_seeds == 3
    assert bmpc.label == "BMPC (published)" and bmpc.n_seeds is None
    for c in curves:
        assert c.steps[0] == 0 and np.all(np.diff(c.steps) == 100_000)
        assert np.all((c.mean >= 0) & (c.mean <= 1000))
        assert np.all(c.lower <= c.mean + 1e-9) and np.all(c.mean <= c.upper + 1e-9)
    assert bmpc.steps[-1] == 1_000_000 and tdmpc2.steps[-1] >= 1_000_000
    assert 900 < tdmpc2.mean[tdmpc2.steps == 100_000][0] <= 1000  # TD-MPC2 solves cartpole-balance by 100k
    assert [c.algo for c in load_anchor_curves("dmc/ball_in_cup-catch-v0")] == ["tdmpc2", "bmpc"]
    assert load_anchor_curves("Pendulum-v1") == []
    assert load_anchor_curves("dmc/lqr-lqr_2_1-v0") == []  # a suite task that no paper reports


def test_tdmpc2_summary_on_synthetic_results(tmp_path: Path) -> None:
    rows = [(100000, 900.0, 1), (0, 100.0, 1), (0, 300.0, 2), (100000, 700.0, 2), (200000, 950.0, 1),
            (200000, 990.0, 2), (0, 200.0, 3), (100000, 800.0, 3)]
    (tmp_path / "walker-walk.csv").write_text("step,reward,seed\n" + "".join(f"{s},{r},{k}\n" for s, r, k in rows))
    (tmp_path / "walker-walk-backwards.csv").write_text("step,reward,seed\n0,1,1\n")  # not a suite task
    out = summarize_tdmpc2_results(tmp_path)
    assert [(r["task"], r["step"], r["n_seeds"]) for r in out] == [
        ("walker-walk", 0, 3), ("walker-walk", 100000, 3), ("walker-walk", 200000, 2)]
    np.testing.assert_allclose([r["mean"] for r in out], [200.0, 800.0, 970.0])
    for r, values in zip(out, ([100, 300, 200], [900, 700, 800], [950, 990])):
        assert min(values) <= r["lower"] < r["mean"] < r["upper"] <= max(values)


def test_bmpc_summary_on_synthetic_results(tmp_path: Path) -> None:
    entry = dict(steps=[100000, 0, 200000], values=[800.0, 200.0, 950.0], ucbs=[850.0, 260.0, 990.0],
                 lcbs=[750.0, 140.0, 900.0])
    longer = dict(steps=[0, 100000], values=[5.0, 6.0], ucbs=[6.0, 7.0], lcbs=[4.0, 5.0])
    (tmp_path / "a.json").write_text(json.dumps({"BMPC": {"cup-catch": entry, "dog-run": entry, "h1hand-stair": entry}}))
    (tmp_path / "b.json").write_text(json.dumps({"BMPC": {"dog-run": longer}, "tdmpc2": {"cup-catch": longer}}))
    out = summarize_bmpc_results([tmp_path / "a.json", tmp_path / "b.json"])
    cup = [r for r in out if r["task"] == "cup-catch"]
    assert [r["step"] for r in cup] == [0, 100000, 200000]  # sorted by step, arrays kept aligned
    assert [(r["mean"], r["lower"], r["upper"]) for r in cup] == [(200, 140, 260), (800, 750, 850), (950, 900, 990)]
    assert [r["mean"] for r in out if r["task"] == "dog-run"] == [5.0, 6.0]  # the later file wins
    assert {r["task"] for r in out} == {"cup-catch", "dog-run"}  # HumanoidBench is not a DMControl task


@needs_sources
def test_shipped_tables_match_the_published_files(tmp_path: Path) -> None:
    """The package's tables are what the published files give (to the 0.01 of the written tables)."""
    from sb3_pompc.anchors import write_anchor_table

    bmpc = ANCHORS / "bmpc"
    write_anchor_table(summarize_tdmpc2_results(ANCHORS / "tdmpc2" / "tdmpc2"), tmp_path / "tdmpc2.csv")
    write_anchor_table(summarize_bmpc_results([bmpc / "data_dmc_all_1M.json", bmpc / "data_dmc_hard_4M.json"]),
                       tmp_path / "bmpc.csv")
    shipped = Path(job.__file__).parent / "data" / "anchors"
    for name in ("tdmpc2.csv", "bmpc.csv"):
        assert (tmp_path / name).read_text() == (shipped / name).read_text(), f"{name} differs from the sources"
    # the TD-MPC2 means at step 0 and 100k, recomputed with the csv module
    for task in ("cartpole-balance", "cup-catch"):
        with open(ANCHORS / "tdmpc2" / "tdmpc2" / f"{task}.csv") as f:
            rows = list(csv.DictReader(f))
        curve = load_anchor_curves(f"dmc/{task}-v0")[0]
        for step in (0, 100000):
            rewards = [float(r["reward"]) for r in rows if int(float(r["step"])) == step]
            assert curve.mean[curve.steps == step][0] == pytest.approx(sum(rewards) / len(rewards), abs=0.006)


def test_draw_anchor_markers_draws_points_not_lines() -> None:
    import matplotlib.pyplot as plt

    curves = load_anchor_curves("dmc/cartpole-balance-v0")
    fig, ax = plt.subplots()
    labels = draw_anchor_markers(ax, curves, max_step=200_000)
    assert labels == [c.label for c in curves]
    for line in ax.lines:  # the data points and the caps of the error bars
        assert line.get_linestyle() == "None", "published points 100k apart must not be joined by a line"
        assert line.get_marker() not in (None, "", "None")
        np.testing.assert_array_equal(line.get_xdata(), [0, 100_000, 200_000])
    handles, legend = ax.get_legend_handles_labels()
    assert legend == labels
    caps = [c for c in ax.collections if len(c.get_segments()) == 3]  # one error bar per point
    assert len(caps) == len(curves)
    assert all(np.max(np.asarray(c.get_segments())[:, :, 1]) <= 1000 for c in caps)  # clipped to [0, 1000]
    empty = AnchorCurve("x", np.array([500_000]), np.array([1.0]), np.array([0.0]), np.array([2.0]))
    assert draw_anchor_markers(ax, [empty], max_step=100_000) == []
    plt.close(fig)


def test_plot_curve_with_published_anchors(tmp_path: Path) -> None:
    eval_csv = tmp_path / "eval.csv"
    eval_csv.write_text(",".join(EVAL_CSV_HEADER) + "\n0,150,20,0\n15000,600,80,100\n30000,950,10,200\n")
    labels = job.plot_curve(eval_csv, tmp_path / "curve.png", "dmc/cartpole-balance-v0", label="ours")
    assert labels[0] == "ours"
    assert any(lab.startswith("TD-MPC2") for lab in labels) and any(lab.startswith("BMPC") for lab in labels)
    assert_png(tmp_path / "curve.png")
    assert job.plot_curve(eval_csv, tmp_path / "c.png", "dmc/cartpole-balance-v0", label="ours", anchors=False) == [
        "ours"]


def test_plot_curve_without_anchors(tmp_path: Path) -> None:
    eval_csv = tmp_path / "eval.csv"
    eval_csv.write_text(",".join(EVAL_CSV_HEADER) + "\n0,150,20,0\n5000,300,50,10\n")
    assert job.plot_curve(eval_csv, tmp_path / "curve.png", "Pendulum-v1", label="ours") == ["ours"]
    assert_png(tmp_path / "curve.png")


def test_read_eval_csv_headers(tmp_path: Path) -> None:
    bad = tmp_path / "eval.csv"
    bad.write_text("timesteps,reward\n0,1\n")
    with pytest.raises(ValueError, match="header"):
        read_eval_csv(bad)
    other = tmp_path / "other.csv"
    other.write_text("step,mean_return,std_return,wall_time_s\n0,1.5,0.5,2\n")
    data = read_eval_csv(other)
    assert data["step"].tolist() == [0] and data["mean"].tolist() == [1.5] and data["std"].tolist() == [0.5]


# ------------------------------------------------------------------------------------------------- cli
def test_parse_overrides() -> None:
    assert parse_overrides(["kl_warmup=100", "critic=v", "reanalyze_num_samples=None", "kl-coef=inf",
                            "planner_dtype=bfloat16", "target_kl= 0.5"]) == dict(
        kl_warmup=100, critic="v", reanalyze_num_samples=None, kl_coef=float("inf"), planner_dtype="bfloat16",
        target_kl=0.5)
    assert parse_value("-inf") == float("-inf") and parse_value("(1, 2)") == (1, 2) and parse_value("True") is True
    for bad in (["num_samples"], ["=3"]):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_overrides(bad)


# ------------------------------------------------------------------------------------------------- the job
def test_eval_schedule() -> None:
    assert job.eval_schedule(30000, 5000, True) == [0, 5000, 10000, 15000, 20000, 25000, 30000]
    assert job.eval_schedule(30000, 5000, False)[0] == 5000
    assert job.eval_schedule(12000, 5000, False) == [5000, 10000, 12000]
    assert job.eval_schedule(3000, 5000, False) == [3000]


def test_train_job_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--env", SHORT_ENV, "--steps", "150", "--eval-freq", "75", "--eval-episodes", "2", "--out", str(out),
            "--quiet", "--prior", "forward", "--kl-coef", "0.5", *tiny_argv()]
    summary = job.main(argv)

    with open(out / "eval.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "step,mean,std,wall_time_s"
    curve = read_eval_csv(out / "eval.csv")
    np.testing.assert_array_equal(curve["step"], [0, 75, 150])  # step 0, every 75 steps, the end
    assert np.all(np.isfinite(curve["mean"])) and np.all(curve["std"] >= 0)
    assert np.all(np.diff(curve["wall_time_s"]) >= 0)
    assert summary["final_mean_return"] == pytest.approx(curve["mean"][-1], rel=1e-5)
    assert summary["steps"] == 150 and summary["prior"] == "forward" and float(summary["kl_coef"]) == 0.5
    assert not summary["warmup_only"]
    assert_png(out / "curve.png")
    assert (out / "model.zip").stat().st_size > 0
    progress = pkl.read_progress(out)
    assert "train/kl_mean" in progress and np.isfinite(progress["train/kl_mean"]).any()
    config = json.loads((out / "config.json").read_text())
    assert config["model_kwargs"]["num_samples"] == TINY["num_samples"] and config["eval_episodes"] == 2
    loaded = POMPC.load(out / "model.zip", device="cpu")
    assert loaded.prior == "forward"


def test_train_job_prints_its_plan_and_warns_inside_the_warm_up(tmp_path: Path, capsys) -> None:
    """--cpu: 3 evaluation episodes, no step-0 evaluation; --steps <= learning_starts: a warning, no update."""
    out = tmp_path / "run"
    summary = job.main(["--env", SHORT_ENV, "--steps", "40", "--eval-freq", "20", "--cpu", "--out", str(out),
                        "--no-progress", *tiny_argv()])
    captured = capsys.readouterr()
    assert "does not exceed the warm-up (learning_starts=50)" in captured.err
    assert "never updated" in captured.err
    for text in ("40 steps", "learning_starts=50", "evaluation: at steps 20, 40", "2 evaluations x 3 episodes x 50 "
                 "steps = 300 planned steps", "ms per plan", "no published curves", f"output:     {out}"):
        assert text in captured.out, f"{text!r} not in the printed plan:\n{captured.out}"
    assert summary["warmup_only"]
    assert read_eval_csv(out / "eval.csv")["step"].tolist() == [20, 40]
    config = json.loads((out / "config.json").read_text())
    assert config["eval_episodes"] == 3 and config["eval_at_start"] is False
    assert config["model_kwargs"]["reanalyze_interval"] == CPU_SETTINGS["reanalyze_interval"]  # --cpu, under --set
    assert config["model_kwargs"]["num_samples"] == TINY["num_samples"]


def test_build_model_kwargs_precedence() -> None:
    kw = job.build_model_kwargs("bmpc", None, None, cpu=True, seed=3, device=None, overrides={"num_samples": 64})
    assert kw["preset"] == "bmpc" and kw["seed"] == 3 and kw["device"] == "cpu"
    assert kw["num_samples"] == 64  # override wins over the CPU sizes
    assert kw["model_size"] == CPU_SETTINGS["model_size"]
    assert "kl_coef" not in kw and "prior" not in kw  # the preset decides
    kw = job.build_model_kwargs("pompc", job.parse_kl_coef_arg("inf"), "planner")
    assert kw["kl_coef"] == float("inf") and kw["device"] == "auto" and "model_size" not in kw


def test_examples_wrapper_runs_the_job() -> None:
    import subprocess

    res = subprocess.run([sys.executable, str(EXAMPLES / "train_dmc.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "sb3-pompc-train" in res.stdout and "--eval-at-start" in res.stdout


# ------------------------------------------------------------------------------------------------- callback
def _tiny_model(seed: int = 0) -> POMPC:
    return POMPC("MlpPolicy", SHORT_ENV, seed=seed, device="cpu", **TINY)


def test_evaluation_does_not_change_training(tmp_path: Path) -> None:
    """Evaluations run in a forked RNG: the trained parameters are those of a run without evaluation."""
    plain = _tiny_model().learn(100)
    model = _tiny_model()
    cb = EvalCurveCallback(gym.make(SHORT_ENV), eval_freq=40, n_eval_episodes=1, log_path=tmp_path / "e.csv",
                           eval_seed=7)
    model.learn(100, callback=cb)
    assert [r[0] for r in cb.rows] == [0, 40, 80, 100]
    assert cb.eval_time_s > 0
    for (name, p), q in zip(plain.policy.state_dict().items(), model.policy.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs: evaluating changed the training stream"
    # re-seeded evaluations of the same model give the same return
    before = cb.rows[-1][1]
    cb._evaluate()
    assert cb.rows[-1][1] == pytest.approx(before)


class _RecordingBar:
    """Stands in for tqdm: records the bars made, their totals and their updates."""

    made: list["_RecordingBar"] = []

    def __init__(self, total=None, desc=None, unit=None, initial=0, **kwargs) -> None:
        self.total, self.desc, self.unit, self.n, self.initial, self.closed = total, desc, unit, initial, initial, False
        _RecordingBar.made.append(self)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True

    @staticmethod
    def write(text: str) -> None:
        print(text)


def test_progress_bars(monkeypatch) -> None:
    """The evaluation bar counts every evaluation step (2 episodes x 50 steps); the training bars count the warm-up
    (learning_starts=50 steps), then, after the pretraining burst, the planned steps up to the end."""
    monkeypatch.setattr(callbacks_module, "tqdm", _RecordingBar)
    _RecordingBar.made = []
    cb = EvalCurveCallback(gym.make(SHORT_ENV), eval_freq=60, n_eval_episodes=2, eval_seed=1, eval_at_start=False,
                           progress_bar=True)
    _tiny_model().learn(120, callback=[TrainingProgressBar(), cb])
    warmup, train, eval_60, eval_120 = _RecordingBar.made
    assert warmup.desc.startswith("warm-up") and (warmup.total, warmup.n, warmup.closed) == (50, 50, True)
    # opened after the burst (which runs after step 51), counting from there to the end
    assert (train.desc, train.unit, train.initial, train.total, train.n, train.closed) == (
        "training", "step", 52, 120, 120, True)
    assert [b.desc for b in (eval_60, eval_120)] == ["eval @ 60", "eval @ 120"]
    assert all(b.total == b.n == 100 and b.closed for b in (eval_60, eval_120))
    assert EvalCurveCallback(gym.make(SHORT_ENV))._make_bar(0) == (None, None)  # no bar unless asked


# ------------------------------------------------------------------------------------------------- KL diagnostics
def _write_progress(path: Path, steps, kl_mean, kl_std, prior_loss=None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    cols = {"time/total_timesteps": steps, "train/kl_mean": kl_mean, "train/kl_std": kl_std,
            "train/kl_planner_mean": [2 * x for x in kl_mean], "train/kl_planner_std": kl_std,
            "train/kl_coef": [1.0] * len(steps), "train/planner_std": [0.3] * len(steps),
            "rollout/ep_rew_mean": [1.0] * len(steps)}
    if prior_loss is not None:
        cols["train/prior_loss"] = prior_loss
    with open(path / "progress.csv", "w") as f:
        f.write(",".join(cols) + "\n")
        # an empty cell as SB3 writes when a key is missing from a dump
        for i in range(len(steps)):
            f.write(",".join("" if (k == "train/kl_mean" and i == 1) else str(v[i]) for k, v in cols.items()) + "\n")


def test_plot_kl_diagnostics_synthetic(tmp_path: Path) -> None:
    steps = [500, 1000, 1500, 2000, 2500, 3000]
    _write_progress(tmp_path / "planner", steps, [3.0, 2.5, 2.0, 1.5, 1.2, 1.0], [1.0] * 6)
    _write_progress(tmp_path / "reverse", steps, [0.5, 0.4, 0.3, 0.2, 0.2, 0.1], [0.2] * 6, prior_loss=[1.0] * 6)
    out = tmp_path / "kl.png"
    panels = pkl.main([f"planner={tmp_path / 'planner'}", f"reverse={tmp_path / 'reverse'}", "-o", str(out),
                       "--smooth", "2", "--logy"])
    assert_png(out)
    assert any("prior loss" in p for p in panels) and any("variance" in p for p in panels)
    assert not any("π_s std" in p for p in panels)  # train/policy_std was not logged by these runs


def test_kl_helpers() -> None:
    x = np.array([1.0, np.nan, 3.0, 5.0])
    np.testing.assert_allclose(pkl.smooth(x, 2), [1.0, np.nan, 3.0, 4.0])
    np.testing.assert_allclose(pkl.smooth(x, 1), x)
    prog = {"train/kl_mean": np.array([10.0, 8.0, np.nan, 2.0, 4.0])}
    assert pkl.kl_summary(prog, "train/kl_mean") == pytest.approx(3.0)  # last half of the 4 finite values
    assert pkl.kl_summary(prog, "train/kl_std") is None
    assert pkl.parse_run_arg("fwd=runs/a") == ("fwd", Path("runs/a"))
    assert pkl.parse_run_arg("runs/b") == ("b", Path("runs/b"))


def test_plot_kl_diagnostics_needs_kl_keys(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "progress.csv").write_text("time/total_timesteps,rollout/ep_rew_mean\n200,-1000\n")
    with pytest.raises(ValueError, match="KL diagnostics"):
        pkl.plot_kl_diagnostics([("r", tmp_path / "r")], tmp_path / "x.png")


def test_compare_family_table(tmp_path: Path) -> None:
    import compare_family

    steps = [500, 1000, 1500, 2000]
    for name, kl, ret in (("bmpc", [4.0, 3.0, 2.0, 1.0], 812.5), ("pompc-reverse", [0.4, 0.3, 0.2, 0.1], 640.0)):
        _write_progress(tmp_path / name, steps, kl, [0.5] * 4)
        (tmp_path / name / "summary.json").write_text(json.dumps(dict(
            preset=name.split("-")[0], kl_coef="1.0", prior="reverse", steps=2000, final_mean_return=ret,
            final_std_return=3.5, train_s_per_1k_steps=12.0)))
    table = compare_family.summary_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| bmpc") or line.startswith("| pompc-reverse")]
    assert [r.split("|")[1].strip() for r in rows] == ["bmpc", "pompc-reverse"]  # VARIANTS order
    bmpc = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert bmpc[5] == "812.5 ± 3.5"
    # KL(π_s‖π_ref) mean over the second half of the finite rows: row 1 is empty, so the rows are 4, 2, 1 -> (2+1)/2
    assert float(bmpc[7]) == pytest.approx(1.5)
    assert float(bmpc[9]) == pytest.approx(3.0)  # the planner KL is 2x in the synthetic logs, all 4 rows finite
