"""Smoke test of the speed benchmark (``python -m sb3_pompc.benchmark``) on a tiny model: it runs end to end,
writes the documented JSON schema, and its counted FLOPs agree with the architecture. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sb3_pompc import benchmark as bm

TINY = [
    "--set", "latent_dim=32", "--set", "mlp_dim=32", "--set", "enc_dim=32", "--set", "num_q=2",
    "--set", "num_samples=32", "--set", "num_elites=4", "--set", "num_pi_trajs=2", "--set", "iterations=2",
    "--set", "reanalyze_batch_size=2",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_writes_schema(tmp_path, capsys):
    path = tmp_path / "bench.json"
    returned = bm.main([
        "--threads", "1", "--device", "cpu", "--sizes", "none", "--n-envs", "1,2", "--dtypes", "fp32,bf16",
        "--update-dtypes", "fp32", "--what", "plan,update,step,reanalyze", "--batch-size", "8", "--reps", "2",
        "--min-time", "0", "--warmup", "0", "--peak-size", "128", "--json", str(path), *TINY,
    ])
    records = json.loads(path.read_text())
    assert records == json.loads(json.dumps(returned))
    # 2 n_envs x 2 dtypes plans, 1 update, 1 step, 1 reanalyze
    kinds = sorted((r["what"], r["n_envs"], r["dtype"]) for r in records)
    assert kinds == [
        ("plan", 1, "bf16"), ("plan", 1, "fp32"), ("plan", 2, "bf16"), ("plan", 2, "fp32"),
        ("reanalyze", 1, "fp32"), ("step", 1, "fp32"), ("update", 1, "fp32"),
    ]
    for r in records:
        for key in bm.RECORD_KEYS:
            assert key in r, key
        assert r["device"] == "cpu" and r["model_size"] is None and r["threads"] == 1
        for key in ("ms", "gflops", "peak_gflops", "gflop", "layer_gflops"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["ms_min"] <= r["ms_q25"] <= r["ms"] <= r["ms_q75"] <= r["ms_max"] and r["reps"] >= 2
        # GFLOP/s is the counted FLOPs over the median time
        assert r["gflops"] == pytest.approx(r["gflop"] / (r["ms"] / 1e3), rel=1e-9)
        assert sum(r["flops_per_op"].values()) == pytest.approx(r["gflop"] * 1e9, rel=1e-9)
    plans = {(r["n_envs"], r["dtype"]): r for r in records if r["what"] == "plan"}
    # the counted FLOPs equal the analytic count from the architecture, and a plan is linear in n_envs
    for r in plans.values():
        assert r["gflop"] == pytest.approx(r["gflop_analytic"], rel=1e-12)
    assert plans[2, "fp32"]["gflop"] == pytest.approx(2 * plans[1, "fp32"]["gflop"], rel=1e-12)
    assert plans[1, "bf16"]["gflop"] == pytest.approx(plans[1, "fp32"]["gflop"], rel=1e-12)
    assert plans[2, "fp32"]["ms_per_env"] == pytest.approx(plans[2, "fp32"]["ms"] / 2)
    # the update counts backward matmuls too: more than one forward pass over its batch
    (update,) = [r for r in records if r["what"] == "update"]
    assert set(update["flops_per_op"]) >= {"mm", "addmm"} and update["batch_size"] == 8
    # reanalyze = one plan of horizon x reanalyze_batch_size states
    (rean,) = [r for r in records if r["what"] == "reanalyze"]
    # an env step = one plan of the first n_envs + one update, in the update's dtype, + 1/interval of a reanalyze
    (step,) = [r for r in records if r["what"] == "step"]
    assert step["gflop"] == pytest.approx(plans[1, "fp32"]["gflop"] + update["gflop"] + rean["gflop"] / 10, rel=1e-12)
    assert step["reanalyze_interval"] == 10 and 0 < step["reanalyze_amortized_ms"] < step["ms_min"]
    assert rean["states"] == 3 * 2
    assert rean["reanalyze_interval"] == 10 and rean["amortized_ms"] == pytest.approx(rean["ms"] / 10)
    assert rean["gflop"] == pytest.approx(rean["states"] * plans[1, "fp32"]["gflop"], rel=1e-12)
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and f"wrote {path}" in out and "step over" in out


def test_analytic_flops_size1_matches_counter():
    """The analytic plan count follows the real architecture (model size 1, smaller planner), in fp32."""
    torch.set_num_threads(1)
    model = bm.make_model(1, 2, num_samples=16, num_elites=4, num_pi_trajs=4, iterations=1)
    obs = torch.randn(2, 17)
    flops, per_op = bm.count_flops(lambda: model.policy.plan(obs, None))
    assert flops == bm.analytic_plan_flops(model.policy.model, model.policy.planner, 2)
    assert flops > 0 and set(per_op) <= {"mm", "addmm", "bmm", "baddbmm"}


def test_fill_replay_buffer_gives_valid_windows():
    torch.set_num_threads(1)
    model = bm.make_model(None, 2, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2, num_samples=8, num_elites=2,
                          num_pi_trajs=1, iterations=1)
    bm.fill_replay_buffer(model)
    rb = model.replay_buffer
    assert rb.full and rb.has_plan.all()
    batch = rb.sample(16)
    assert batch.observations.shape == (model.policy.planner.horizon + 1, 16, 17)
    assert torch.isfinite(batch.observations).all()


def test_profile_breakdown_categories():
    torch.set_num_threads(1)
    model = bm.make_model(None, 1, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2, num_samples=16, num_elites=2,
                          num_pi_trajs=1, iterations=1)
    obs = torch.randn(1, 17)
    prof = bm.profile_breakdown(lambda: model.policy.plan(obs, None), torch.device("cpu"), top=5, calls=2)
    cats = prof["categories"]
    assert prof["wall_ms"] > 0 and cats["matmul"] > 0 and cats["python+dispatch"] >= 0
    assert {"mish", "softmax", "layer_norm"} <= set(cats)
    assert len(prof["top_ops"]) == 5 and all(r["op"].startswith("aten::") for r in prof["top_ops"])
    assert [r["self_ms"] for r in prof["top_ops"]] == sorted((r["self_ms"] for r in prof["top_ops"]), reverse=True)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown --what"):
        bm.run_benchmark(what=("plan", "train"), verbose=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        bm.run_benchmark(dtypes=("fp16",), verbose=False)
    with pytest.raises(SystemExit, match="give the preset as --preset tdmpc2"):
        bm.main(["--device", "cpu", "--set", "preset=tdmpc2", "--json", ""])
    with pytest.raises(SystemExit, match="give the batch size as --batch-size 64"):  # --batch-size would win
        bm.main(["--device", "cpu", "--set", "batch_size=64", "--json", ""])
    with pytest.raises(SystemExit, match="give the plan dtype as --dtypes"):  # the rows would say fp32
        bm.main(["--device", "cpu", "--set", "planner_dtype=bfloat16", "--json", ""])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_check_syncs_without_cuda_says_what_to_run_instead():
    with pytest.raises(SystemExit, match="needs a CUDA device.*tests/test_host_sync.py"):
        bm.main(["--check-syncs", "--device", "cpu", "--json", ""])


def test_check_syncs_runs_plans_updates_and_reanalyzes_on_cpu(monkeypatch):
    """The --check-syncs routine (CUDA's sync debug mode) runs unchecked on CPU: 4 warm-up and 4 checked updates,
    a reanalyze every 2nd, and each reanalyze's write-back lands in the buffer, none left pending."""
    from sb3_pompc.buffers import POMPCReplayBuffer

    writes = []
    original = POMPCReplayBuffer.update_plans
    monkeypatch.setattr(POMPCReplayBuffer, "update_plans", lambda self, *a: writes.append(len(a[0])) or original(self, *a))
    model = bm.make_model(None, 2, "fp32", "cpu", 5, 2, reanalyze_interval=2, reanalyze_batch_size=2, batch_size=16,
                          latent_dim=16, mlp_dim=16, enc_dim=16, num_samples=16, num_elites=4, num_pi_trajs=2,
                          iterations=1)
    bm.check_syncs(model, batch_size=16)
    assert model._n_policy_updates == 8 and model.reanalyzer.pending == 0
    assert model.reanalyzer.interval == 2 and writes == [3 * 2] * 4  # 4 reanalyzes of H × 2 states


def test_cli_compile_rows(tmp_path):
    """``--compile``: agents built with compile=True; FLOPs are counted on the eager path (same count). Plans only:
    compiling an update takes about a minute on a CI core (the compiled update is checked in test_compile.py)."""
    path = tmp_path / "bench.json"
    common = ["--threads", "1", "--device", "cpu", "--sizes", "none", "--n-envs", "1", "--dtypes", "fp32",
              "--what", "plan", "--batch-size", "8", "--reps", "2", "--min-time", "0", "--warmup", "0",
              "--peak-size", "128", *TINY]
    compiled = bm.main([*common, "--compile", "--json", str(path)])
    eager = bm.main([*common, "--json", ""])
    assert [r["compiled"] for r in json.loads(path.read_text())] == [True]
    assert [r["compiled"] for r in eager] == [False]
    for c, e in zip(compiled, eager):
        assert (c["what"], c["n_envs"], c["dtype"]) == (e["what"], e["n_envs"], e["dtype"])
        assert c["gflop"] == pytest.approx(e["gflop"], rel=1e-12) and c["gflop"] > 0
        assert math.isfinite(c["ms"]) and c["ms"] > 0
