"""Smoke tests of the examples (train_dmc, plot_kl_diagnostics, compare_family helpers) and of the evaluation
callback; the anchor readers are checked on synthetic files and on the published anchor files."""

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
import train_dmc  # noqa: E402

from sb3_pompc import POMPC  # noqa: E402
from sb3_pompc.callbacks import EVAL_CSV_HEADER, EvalCurveCallback, read_eval_csv  # noqa: E402

SHORT_ENV = "PendulumShort-v0"  # Pendulum with 50-step episodes: evaluations and logger dumps come quickly
if SHORT_ENV not in gym.registry:
    gym.register(id=SHORT_ENV, entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv", max_episode_steps=50)

TINY = dict(model_size=None, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2, num_samples=32, num_elites=4,
            num_pi_trajs=2, iterations=2, batch_size=16, learning_starts=50, pretrain_updates=5,
            reanalyze_batch_size=2, reanalyze_num_samples=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ANCHORS = train_dmc.default_anchors_dir()
needs_anchors = pytest.mark.skipif(ANCHORS is None, reason="published anchors (../shared/anchors) not on this machine")


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


# ------------------------------------------------------------------------------------------------- task names
@pytest.mark.parametrize(
    "env_id, task",
    [
        ("dmc/cartpole-balance-v0", "cartpole-balance"),
        ("dmc/ball_in_cup-catch-v0", "cup-catch"),
        ("dmc/finger-turn_easy-v0", "finger-turn-easy"),
        ("dmc/cartpole-balance_sparse-v0", "cartpole-balance-sparse"),
        ("Pendulum-v1", None),
        ("dmc/cartpole", None),
    ],
)
def test_env_to_task(env_id: str, task) -> None:
    assert train_dmc.env_to_task(env_id) == task


# ------------------------------------------------------------------------------------------------- anchor readers
def test_tdmpc2_reader_on_synthetic_csv(tmp_path: Path) -> None:
    d = tmp_path / "tdmpc2" / "tdmpc2"
    d.mkdir(parents=True)
    rows = [(100000, 900.0, 1), (0, 100.0, 1), (0, 300.0, 2), (100000, 700.0, 2), (200000, 950.0, 1),
            (200000, 990.0, 2)]
    with open(d / "walker-walk.csv", "w") as f:
        f.write("step,reward,seed\n" + "".join(f"{s},{r},{k}\n" for s, r, k in rows))
    c = train_dmc.load_tdmpc2_curve(tmp_path, "walker-walk")
    assert c is not None and c.n_seeds == 2
    np.testing.assert_array_equal(c.steps, [0, 100000, 200000])
    np.testing.assert_allclose(c.mean, [200.0, 800.0, 970.0])
    half = np.array([np.std([100, 300], ddof=1), np.std([900, 700], ddof=1), np.std([950, 990], ddof=1)])
    np.testing.assert_allclose(c.upper - c.mean, half)
    np.testing.assert_allclose(c.mean - c.lower, half)
    assert train_dmc.load_tdmpc2_curve(tmp_path, "no-such-task") is None
    clipped = c.clipped(100000)
    np.testing.assert_array_equal(clipped.steps, [0, 100000])


def test_bmpc_reader_on_synthetic_json(tmp_path: Path) -> None:
    (tmp_path / "bmpc").mkdir()
    entry = dict(steps=[100000, 0, 200000], values=[800.0, 200.0, 950.0], ucbs=[850.0, 260.0, 990.0],
                 lcbs=[750.0, 140.0, 900.0])
    with open(tmp_path / "bmpc" / "data_dmc_all_1M.json", "w") as f:
        json.dump({"BMPC": {"cup-catch": entry}, "tdmpc2": {}}, f)
    c = train_dmc.load_bmpc_curve(tmp_path, "cup-catch")
    assert c is not None
    np.testing.assert_array_equal(c.steps, [0, 100000, 200000])  # sorted by step, arrays kept aligned
    np.testing.assert_allclose(c.mean, [200.0, 800.0, 950.0])
    np.testing.assert_allclose(c.lower, [140.0, 750.0, 900.0])
    np.testing.assert_allclose(c.upper, [260.0, 850.0, 990.0])
    assert train_dmc.load_bmpc_curve(tmp_path, "cartpole-balance") is None
    assert train_dmc.load_bmpc_curve(tmp_path, "cup-catch", algo="sac") is None
    assert train_dmc.load_anchor_curves(tmp_path / "missing", "cup-catch") == []


@needs_anchors
@pytest.mark.parametrize("task", ["cartpole-balance", "cup-catch"])
def test_anchor_readers_on_published_files(task: str) -> None:
    tc = train_dmc.load_tdmpc2_curve(ANCHORS, task)
    bc = train_dmc.load_bmpc_curve(ANCHORS, task)
    for c in (tc, bc):
        assert c is not None and len(c.steps) >= 2
        assert np.all(np.diff(c.steps) > 0)
        assert c.steps[0] == 0
        assert np.all((c.mean >= 0) & (c.mean <= 1000))
        assert np.all(c.lower <= c.mean + 1e-9) and np.all(c.mean <= c.upper + 1e-9)
    # the TD-MPC2 mean at step 0 and 100k, recomputed with the csv module
    with open(ANCHORS / "tdmpc2" / "tdmpc2" / f"{task}.csv") as f:
        rows = list(csv.DictReader(f))
    for step in (0, 100000):
        rewards = [float(r["reward"]) for r in rows if int(float(r["step"])) == step]
        assert rewards, f"no rows at step {step}"
        i = int(np.where(tc.steps == step)[0][0])
        assert tc.mean[i] == pytest.approx(sum(rewards) / len(rewards))
    # the BMPC values are the json's own, in step order
    with open(ANCHORS / "bmpc" / "data_dmc_all_1M.json") as f:
        raw = json.load(f)["BMPC"][task]
    assert dict(zip(raw["steps"], raw["values"]))[100000] == pytest.approx(float(bc.mean[bc.steps == 100000][0]))


@needs_anchors
def test_plot_curve_with_published_anchors(tmp_path: Path) -> None:
    eval_csv = tmp_path / "eval.csv"
    eval_csv.write_text(",".join(EVAL_CSV_HEADER) + "\n0,150,20,0\n15000,600,80,100\n30000,950,10,200\n")
    labels = train_dmc.plot_curve(eval_csv, tmp_path / "curve.png", "cartpole-balance", ANCHORS, label="ours")
    assert labels[0] == "ours"
    assert any(lab.startswith("TD-MPC2") for lab in labels) and any(lab.startswith("BMPC") for lab in labels)
    assert_png(tmp_path / "curve.png")


def test_plot_curve_without_anchors(tmp_path: Path) -> None:
    eval_csv = tmp_path / "eval.csv"
    eval_csv.write_text(",".join(EVAL_CSV_HEADER) + "\n0,150,20,0\n5000,300,50,10\n")
    labels = train_dmc.plot_curve(eval_csv, tmp_path / "curve.png", "cartpole-balance", tmp_path / "none",
                                  label="ours")
    assert labels == ["ours"]
    assert_png(tmp_path / "curve.png")


def test_read_eval_csv_rejects_other_headers(tmp_path: Path) -> None:
    bad = tmp_path / "eval.csv"
    bad.write_text("timesteps,reward\n0,1\n")
    with pytest.raises(ValueError, match="header"):
        read_eval_csv(bad)


# ------------------------------------------------------------------------------------------------- train_dmc
def test_train_dmc_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["--env", SHORT_ENV, "--steps", "150", "--eval-freq", "75", "--eval-episodes", "2", "--out", str(out),
            "--anchors", str(tmp_path / "no_anchors"), "--quiet", "--prior", "forward", "--kl-coef", "0.5"]
    for k, v in TINY.items():
        argv += ["--set", f"{k}={v}"]
    summary = train_dmc.main(argv)

    with open(out / "eval.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "step,mean_return,std_return,wall_time_s"
    curve = read_eval_csv(out / "eval.csv")
    np.testing.assert_array_equal(curve["step"], [0, 75, 150])  # step 0, every 75 steps, the end
    assert np.all(np.isfinite(curve["mean_return"])) and np.all(curve["std_return"] >= 0)
    assert np.all(np.diff(curve["wall_time_s"]) >= 0)
    assert summary["final_mean_return"] == pytest.approx(curve["mean_return"][-1], rel=1e-5)
    assert summary["steps"] == 150 and summary["prior"] == "forward" and float(summary["kl_coef"]) == 0.5
    assert_png(out / "curve.png")
    assert (out / "model.zip").stat().st_size > 0
    progress = pkl.read_progress(out)
    assert "train/kl_mean" in progress and np.isfinite(progress["train/kl_mean"]).any()
    config = json.loads((out / "config.json").read_text())
    assert config["model_kwargs"]["num_samples"] == TINY["num_samples"]
    loaded = POMPC.load(out / "model.zip", device="cpu")
    assert loaded.prior == "forward"


def test_build_model_kwargs_precedence() -> None:
    kw = train_dmc.build_model_kwargs("bmpc", None, None, cpu=True, seed=3, device=None,
                                      overrides={"num_samples": 64})
    assert kw["preset"] == "bmpc" and kw["seed"] == 3 and kw["device"] == "cpu"
    assert kw["num_samples"] == 64  # override wins over the CPU sizes
    assert kw["model_size"] == train_dmc.CPU_PRESET["model_size"]
    assert "kl_coef" not in kw and "prior" not in kw  # the preset decides
    kw = train_dmc.build_model_kwargs("pompc", train_dmc.parse_kl_coef_arg("inf"), "planner")
    assert kw["kl_coef"] == float("inf") and kw["device"] == "auto" and "model_size" not in kw
    assert train_dmc.parse_overrides(["kl_warmup=100", "critic=v", "reanalyze_num_samples=None"]) == dict(
        kl_warmup=100, critic="v", reanalyze_num_samples=None
    )


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
