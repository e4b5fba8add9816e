"""Speed benchmark of PO-MPC: milliseconds per plan and per update, and the achieved matmul GFLOP/s next to a
dense matmul of the same dtype measured in the same run.

Run ``python -m sb3_pompc.benchmark --quick`` (a subset, a few minutes on a 2-core CPU) or
``python -m sb3_pompc.benchmark`` (model sizes 1 and 5, n_envs 1/4/8/16, fp32 and bf16, every device present).
See ``docs/benchmark.md`` for what is measured and how to read the numbers.

What is timed (median of several calls after a warm-up):

- ``plan``: ``model.policy.plan(obs, warm_mean)`` for a batch of ``n_envs`` observations (encoder + the full MPPI
  loop, noise drawn inside, exactly what one environment step of a ``VecEnv`` costs). The bf16 rows use
  ``POMPC(..., planner_dtype="bfloat16")``, i.e. autocast while planning.
- ``update``: ``model.update(batch_size)`` on a replay buffer filled with random transitions
  (window sampling, targets, world-model + critic step, prior step, policy step, soft target update), with
  lazy reanalyze switched off (timed separately as ``reanalyze``). The bf16 update rows use
  ``POMPC(..., update_dtype="bfloat16")`` (the update's forward passes under autocast, fp32 weights).
- ``--compile``: the same rows with ``POMPC(..., compile=True)`` (``torch.compile`` of the plan and of the
  update's forward passes); compilation happens in the untimed first calls, and FLOPs are counted on the eager
  path of the same model.
- ``step`` (not in the default set): one plan of the first ``n_envs`` followed by one update, timed together,
  plus the lazy reanalyze amortised over its interval (the median of a reanalyze call, and its FLOPs, divided by
  ``reanalyze_interval`` and added to every call: ``reanalyze_amortized_ms``), i.e. one environment step of
  training (plan and update in the row's dtype). Use ``--min-time`` to time it over a long stretch; the row also
  records ``ms_q25`` / ``ms_q75`` and prints min, quartiles and max.
- ``reanalyze`` (not in the default set): one lazy-reanalyze call and its write-back into the buffer
  (``model.reanalyzer.reanalyze(batch)``, ``flush()``), i.e. one plan of ``horizon · reanalyze_batch_size`` buffer
  states with ``reanalyze_num_samples`` samples. It runs every ``reanalyze_interval`` updates; ``amortized_ms`` is
  its cost per update.

GFLOP of a call are *counted*, not estimated: :class:`torch.utils.flop_counter.FlopCounterMode` records every
matmul (``mm``/``addmm``/``bmm``/``baddbmm``, forward and backward) that actually runs in one call. Element-wise
work (Mish, LayerNorm, softmax, Adam) is not counted, so ``gflops`` is the achieved *matmul* throughput and the
ratio ``gflops / peak_gflops`` says how much of the machine's dense-matmul speed a plan or an update turns into
useful work. ``peak_gflops`` is the median throughput of a square ``peak_size`` matmul of the same dtype on the
same device, measured right before each row (so both see the same machine load); ``layer_gflops`` is the same
for a matmul of the shape of the model's hidden layers at that batch (``rows × mlp_dim @ mlp_dim × mlp_dim``).

Modules: :mod:`~sb3_pompc.benchmark.agents` (synthetic env, agent, filled buffer), :mod:`~sb3_pompc.benchmark.rows`
(what each row runs, and the table), :mod:`~sb3_pompc.benchmark.timing`, :mod:`~sb3_pompc.benchmark.flops`,
:mod:`~sb3_pompc.benchmark.cli`. The benchmark drives the agent only through its public API (``policy.plan``,
``update``, ``reanalyzer``).
"""

from __future__ import annotations

from sb3_pompc.benchmark.agents import SyntheticEnv, fill_replay_buffer, make_model
from sb3_pompc.benchmark.cli import build_parser, check_syncs, main
from sb3_pompc.benchmark.flops import analytic_plan_flops, count_flops
from sb3_pompc.benchmark.rows import RECORD_KEYS, WHATS, format_table, run_benchmark
from sb3_pompc.benchmark.timing import contention_probe, matmul_gflops, profile_breakdown, time_calls

__all__ = [
    "SyntheticEnv",
    "make_model",
    "fill_replay_buffer",
    "time_calls",
    "count_flops",
    "matmul_gflops",
    "analytic_plan_flops",
    "profile_breakdown",
    "check_syncs",
    "contention_probe",
    "run_benchmark",
    "format_table",
    "build_parser",
    "main",
    "RECORD_KEYS",
    "WHATS",
]
