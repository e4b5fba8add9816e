"""No host synchronisation inside a plan or an update, and one transfer each way per env step and per ``predict``,
checked without a GPU.

The agent is built on PyTorch's ``meta`` device: tensors with shapes but no data, on a device that is not the host.
A ``TorchDispatchMode`` sees every op of one plan and of several updates and records each one that would make the
host wait for a GPU:

- reading a device value on the host: ``.item()``/``float()``/``bool()``/``if tensor`` (``_local_scalar_dense``),
  ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``equal``, ... (data-dependent shapes);
- a device → host copy that is not ``non_blocking`` (``.cpu()``, ``.numpy()``);
- a host → device copy that is not ``non_blocking`` (PyTorch synchronises the stream after a blocking one).

Non-blocking device → host copies (the lazy-reanalyze write-back) pass: the mode returns zeros for them, as the
meta device has no data to copy. Host-side scalars (the optimiser's step counters) are not device values.

The optimisers are rebuilt as ``foreach`` Adam because fused Adam has no meta kernel; on CUDA the agent uses fused
Adam, whose step counters live on the device. The meta device is not a host-checked device: the losses are checked
by the device-side :class:`~sb3_pompc.update.NonFiniteGuard`, as on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sb3_pompc import POMPC
from sb3_pompc.benchmark import SyntheticEnv, fill_replay_buffer

from conftest import tiny_algo

aten = torch.ops.aten
#: ops that read a device value on the host or whose output shape depends on device values
READS_DEVICE_VALUES = {
    aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select, aten._unique, aten._unique2,
    aten.unique_dim, aten.unique_consecutive, aten.is_nonzero, aten.equal, aten.allclose, aten.repeat_interleave,
    aten.argwhere, aten.masked_scatter,
}
COPIES = {aten._to_copy, aten.copy_, aten.to}


class HostSyncRecorder(TorchDispatchMode):
    """Records the ops that would synchronise the host with the (meta) device, with their Python call site."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.async_copies_to_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if t.device.type == "meta"]
        packet = func.overloadpacket
        if on_device and packet in READS_DEVICE_VALUES:
            self._flag(f"{func} reads a device value on the host")
        if packet is aten.index and any(t is not None and t.dtype == torch.bool for t in tree_leaves(args[1:])
                                        if isinstance(t, torch.Tensor)):
            self._flag(f"{func} with a boolean mask (data-dependent shape)")
        if packet in COPIES:
            non_blocking = bool(kwargs.get("non_blocking", False) or (len(args) > 2 and args[2] is True))
            src = args[1] if packet is aten.copy_ else args[0]
            dst_device = args[0].device if packet is aten.copy_ else kwargs.get("device", src.device)
            if src.device.type == "meta" and torch.device(dst_device).type == "cpu":
                if not non_blocking:
                    self._flag(f"{func}: blocking device -> host copy")
                self.async_copies_to_host += 1
                if packet is aten.copy_:
                    return args[0]
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device="cpu")
            if src.device.type == "cpu" and torch.device(dst_device).type == "meta" and not non_blocking:
                self._flag(f"{func}: blocking host -> device copy of shape {tuple(src.shape)}")
        return func(*args, **kwargs)

    def _flag(self, what: str) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack() if "sb3_pompc" in f.filename and "test_host_sync" not in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} ({frames[-1].line})" if frames else "?"
        self.syncs.append(f"{what} at {where} in {frames[-1].name if frames else '?'}")


class ForeachAdam(torch.optim.Adam):
    """Adam without ``fused`` (no meta kernel for it)."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        kwargs.pop("fused", None)
        super().__init__(params, foreach=True, **kwargs)


def meta_agent(monkeypatch: pytest.MonkeyPatch, n_envs: int = 2, **overrides: Any) -> POMPC:
    """A tiny agent whose every tensor lives on the meta device, with a full replay buffer."""
    env_fn = lambda: SyntheticEnv(5, 2)  # noqa: E731
    from stable_baselines3.common.vec_env import DummyVecEnv

    cfg = tiny_algo(num_q=5, learning_starts=0, pretrain_updates=0, buffer_size=512, device="meta", **overrides)
    model = POMPC("MlpPolicy", DummyVecEnv([env_fn] * n_envs), seed=0, **cfg)
    monkeypatch.setattr(torch.optim, "Adam", ForeachAdam)
    model.policy._build(model.lr_schedule)  # optimisers over the meta parameters
    if model.log_kl_coef is not None:
        model.kl_coef_optimizer = torch.optim.Adam([model.log_kl_coef], lr=model.lr_schedule(1))
    fill_replay_buffer(model)
    return model


def test_the_recorder_catches_every_kind_of_host_sync() -> None:
    """The check itself: each pattern that stalls a GPU is recorded; the same work done without it is not."""
    x = torch.zeros(4, 3, device="meta")
    caught = []
    for sync in (lambda: x.sum().item(), lambda: bool(x.max() > 0), lambda: x[x > 0], lambda: x.nonzero(),
                 lambda: x.cpu(), lambda: torch.as_tensor(np.ones(3), device="meta"),
                 lambda: torch.ones(3).to("meta")):
        with HostSyncRecorder() as rec:
            try:
                sync()
            except (NotImplementedError, RuntimeError):  # the meta device has no data to give: recorded before
                pass
        caught.append(len(rec.syncs))
    assert all(c >= 1 for c in caught), caught
    with HostSyncRecorder() as rec:
        y = torch.where(x > 0, x, 2 * x).sum(0)
        x.to("cpu", non_blocking=True)
        torch.ones(3).to("meta", non_blocking=True)
        x.topk(2, dim=0).indices.gather(0, torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert rec.syncs == [] and y.device.type == "meta" and rec.async_copies_to_host == 1


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(prior="forward", kl_value=True),
        dict(prior="reverse", kl_coef="auto"),
        dict(preset="tdmpc2", episodic=True),
        dict(preset="bmpc", reanalyze_interval=1, reanalyze_batch_size=3),
    ],
    ids=["pompc", "forward-kl_value", "reverse-auto", "tdmpc2-episodic", "bmpc-reanalyze"],
)
def test_plan_and_update_never_wait_for_the_device(monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    """One plan (cold and warm-started, stochastic and deterministic) and three updates: no op that would make the
    host wait for the device. The batch reaches the device in one non-blocking copy per update."""
    model = meta_agent(monkeypatch, **overrides)
    obs = torch.zeros(2, 5, device="meta")
    with HostSyncRecorder() as rec:
        first = model.policy.plan(obs, None, deterministic=False)
        model.policy.plan(obs, first.mean, deterministic=True)
    assert rec.syncs == [], rec.syncs
    assert first.action.device.type == "meta" and first.plan_std.shape == (2, 2)

    model.policy.set_training_mode(True)
    with HostSyncRecorder() as rec:
        logs = [model.update(16) for _ in range(3)]
    assert rec.syncs == [], rec.syncs
    assert all(v.device.type in ("meta", "cpu") for log in logs for v in log.values())
    assert "policy_loss" in logs[-1] and logs[-1]["policy_loss"].device.type == "meta"
    # the lazy-reanalyze write-back is the only device -> host copy, and it does not wait
    reanalyzes = overrides.get("reanalyze_interval", 0) and 3 // overrides["reanalyze_interval"]
    assert rec.async_copies_to_host == reanalyzes
    assert model.reanalyzer.pending == (1 if reanalyzes else 0)  # the last one waits for train()'s flush


def _blocking_reads(syncs: list[str]) -> list[str]:
    """The functions of the recorded syncs, each of which must be a blocking device -> host copy."""
    assert all("blocking device -> host copy" in s for s in syncs), syncs
    return sorted(s.rsplit(" in ", 1)[-1] for s in syncs)


@pytest.mark.parametrize("overrides", [dict(kl_coef="auto", prior="forward", kl_value=True),
                                       dict(preset="bmpc", reanalyze_interval=1, reanalyze_batch_size=3)],
                         ids=["auto-forward-kl_value", "bmpc-reanalyze"])
def test_one_env_step_of_learn_reads_the_device_twice(monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    """One whole env step of ``learn`` (``_sample_action``, the env, ``_store_transition``, ``train``) makes two
    transfers to the host and nothing else that waits: the action (with π^P) in ``act`` and the log point's means
    (with λ, the running scales and the non-finite guard) in ``mean_logs``."""
    model = meta_agent(monkeypatch, **overrides)
    model._setup_learn(total_timesteps=10)
    model.train(gradient_steps=0, batch_size=16)  # the (empty) pretraining burst: the next step plans
    for step in range(2):  # the first step plans cold, the second warm-started
        with HostSyncRecorder() as rec:
            action, buffer_action = model._sample_action(0, None, n_envs=2)
            new_obs, rewards, dones, infos = model.env.step(action)
            model.num_timesteps += 2
            model._store_transition(model.replay_buffer, buffer_action, new_obs, rewards, dones, infos)
            model.train(gradient_steps=1, batch_size=16)
        assert _blocking_reads(rec.syncs) == ["act", "mean_logs"], (step, rec.syncs)
    assert model._n_updates == 2 and model._plan_mean is not None and model._plan_mean.device.type == "meta"


def test_predict_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``predict`` (stochastic and deterministic, with and without a warm start) checks the observations on the
    host, sends them with the warm start in one non-blocking copy and reads action and state back in one copy."""
    model = meta_agent(monkeypatch)
    policy = model.policy
    obs = np.zeros((2, 5), dtype=np.float32)
    state = np.zeros((2, policy.planner.horizon, 2), dtype=np.float32)
    for deterministic in (False, True):
        for warm in (None, state):
            with HostSyncRecorder() as rec:
                actions, new_state = policy.predict(obs, warm, np.array([True, False]), deterministic=deterministic)
            assert _blocking_reads(rec.syncs) == ["predict"], (deterministic, warm is None, rec.syncs)
            assert actions.shape == (2, 2) and new_state.shape == state.shape
    with pytest.raises(ValueError, match="non-finite observation"):
        policy.predict(np.full((2, 5), np.nan, dtype=np.float32))
