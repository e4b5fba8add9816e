"""What a GPU run relies on, checked on the CPU: a non-finite loss skips its optimiser step on the device (no host
sync) and keeps the last finite weights; the reanalyze write-back event waits on the model's device; the benchmark's
``--check-syncs`` window holds replays of the compiled plan; a plan launches no log-prob or entropy kernels."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import pytest
import torch

from sb3_pompc import POMPC, update, world_model
from sb3_pompc.benchmark import cli, make_model
from sb3_pompc.reanalyze import record_copy_event

from conftest import tiny_algo


def _state(model: POMPC) -> dict[str, torch.Tensor]:
    """Every tensor that training changes: the policy's state dict, the moments of every optimiser, log λ."""
    state = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
    optimizers = [*model.policy.optimizers(), model.kl_coef_optimizer]
    for i, opt in enumerate(optimizers):
        for j, per_param in enumerate(opt.state.values()):
            state.update({f"opt{i}.{j}.{k}": v.detach().clone() for k, v in per_param.items()})
    state["log_kl_coef"] = model.log_kl_coef.detach().clone()
    return state


@pytest.mark.parametrize("fn, loss", [("world_model", "world-model loss"), ("policy", "policy loss")])
def test_non_finite_loss_on_the_device_keeps_the_last_finite_weights(monkeypatch: pytest.MonkeyPatch, fn: str,
                                                                      loss: str) -> None:
    """With the device-side check (what a GPU runs: no host sync per loss), a NaN in the 5th update of the
    pretraining burst skips every later optimiser step, running-scale update and soft target update: after the
    burst the weights, optimiser moments, running scales and log λ are those before that update (all finite), and
    the log point raises naming the loss and the update."""
    monkeypatch.setattr(update, "HOST_CHECKED_DEVICES", ())
    cfg = tiny_algo(batch_size=8, learning_starts=20, pretrain_updates=8, prior="forward", kl_value=True,
                    kl_coef="auto", kl_warmup=0, mask_unplanned=False)
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, **cfg)
    initial = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
    initial["log_kl_coef"] = model.log_kl_coef.detach().clone()
    original, calls, snapshot = model._update_fns[fn], [], {}

    def poisoned(*args: Any, **kwargs: Any):
        calls.append(1)
        if len(calls) == 5:
            snapshot.update(_state(model))
        out = original(*args, **kwargs)
        if len(calls) != 5:
            return out
        if fn == "world_model":  # (loss, logs, latents)
            return (out[0] * float("nan"), *out[1:])
        q = out[2] * 1e3  # a wide spread moves the running scale S_Q, one NaN makes the policy loss NaN
        q.view(-1)[0] = float("nan")
        return (out[0], out[1], q, out[3])

    model._update_fns[fn] = poisoned
    with pytest.raises(FloatingPointError, match=f"non-finite {loss} at update 4 \\(timestep \\d+\\)"):
        model.learn(40)
    assert len(calls) == 9  # the whole burst and the first update ran: the error comes at the log point
    after = _state(model)
    assert sorted(after) == sorted(snapshot)
    for key, value in snapshot.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(after[key], value), key
    for key in ("model.pi.net.0.weight", "model.prior.net.0.weight", "model.critic_target.weights.0",
                "model.kl_critic_target.weights.0", "log_kl_coef"):  # the first 4 updates moved each of them
        assert not torch.equal(snapshot[key], initial[key]), key
    # the guard is reset by the error: training may go on from the last finite weights
    assert float(update.nonfinite_guard(model.policy).flag) == 0.0  # type: ignore[union-attr, arg-type]


def test_host_check_still_raises_before_the_step_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU (the default host check) the same NaN raises at once, before the step, with the same wording."""
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, **tiny_algo(batch_size=8, learning_starts=20))
    original = model._update_fns["world_model"]

    def poisoned(*args: Any, **kwargs: Any):
        loss, *rest = original(*args, **kwargs)
        return (loss * float("nan"), *rest)

    model._update_fns["world_model"] = poisoned
    with pytest.raises(FloatingPointError, match="non-finite world-model loss at update 0 \\(timestep \\d+\\)"):
        model.learn(25)
    assert model._n_updates == 0


def test_reanalyze_copy_event_waits_on_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The write-back event of a tensor on ``cuda:1`` is recorded on ``cuda:1``'s current stream, whichever
    device is current (a non-blocking copy runs on the stream of its source's device)."""
    recorded: list[Any] = []

    class FakeEvent:
        def record(self, stream: Any = None) -> None:
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {torch.device(device)}")
    event = record_copy_event(SimpleNamespace(device=torch.device("cuda:1")))  # type: ignore[arg-type]
    assert isinstance(event, FakeEvent) and recorded == ["stream of cuda:1"]
    assert record_copy_event(torch.zeros(2)) is None and len(recorded) == 1  # no event off CUDA


def test_check_syncs_window_holds_replays_of_the_compiled_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--check-syncs``: at least 2 plans (warm-up and CUDA-graph recording of a compiled plan) run before the
    checked window, and at least 3 inside it (replays), then the updates."""
    events: list[str] = []

    @contextlib.contextmanager
    def window(device: torch.device):
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(cli, "sync_check", window)
    model = make_model(None, 2, latent_dim=16, mlp_dim=16, enc_dim=16, num_q=2, num_samples=16, num_elites=4,
                       num_pi_trajs=2, iterations=1, horizon=2, reanalyze_interval=2, reanalyze_batch_size=2)
    plan, upd = model.policy.plan, model.update
    # the agent's own plans (a reanalyze inside an update plans with the reanalyze planner)
    monkeypatch.setattr(model.policy, "plan", lambda *a, **k: (k.get("planner") or events.append("plan")) and None
                        or plan(*a, **k))
    monkeypatch.setattr(model, "update", lambda *a, **k: events.append("update") or upd(*a, **k))
    cli.check_syncs(model, batch_size=4)
    enter, leave = events.index("enter"), events.index("exit")
    assert events[:enter].count("plan") >= 2
    inside = events[enter:leave]
    assert inside.count("plan") >= 3 and inside.count("update") >= 1, inside
    assert inside.index("plan") < inside.index("update")  # the plans replay right after the recorded ones


def test_plans_compute_no_log_prob(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner uses only the policy head's actions: a plan computes no log-prob and no entropy (about 15
    element-wise kernels per policy call, (H + iterations) calls per plan), and ``need_log_prob=False`` gives the
    full head's action bit for bit, for both squashes."""
    calls: list[int] = []
    log_prob = world_model.gaussian_log_prob
    monkeypatch.setattr(world_model, "gaussian_log_prob", lambda *a: calls.append(1) or log_prob(*a))
    model = POMPC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, **tiny_algo())
    result = model.policy.plan(torch.randn(2, 3), None)
    model.policy.plan(torch.randn(2, 3), result.mean, deterministic=True)
    assert calls == []
    head, z, eps = model.policy.model.pi, torch.randn(64, 32) * 3, torch.randn(64, 1) * 2
    for squash in ("tanh", "clamp"):
        monkeypatch.setattr(head, "squash", squash)
        full, fast = head(z, eps), head(z, eps, need_log_prob=False)
        assert torch.equal(full.action, fast.action) and torch.equal(full.std, fast.std)
        assert fast.log_prob is None and fast.scaled_entropy is None and full.log_prob is not None
