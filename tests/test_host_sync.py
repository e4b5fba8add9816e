"""No host synchronisation inside a plan or an update, checked without a GPU.

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
Adam, whose step counters live on the device.
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
        self.syncs.append(f"{what} at {where}")


class ForeachAdam(torch.optim.Adam):
    """Adam without ``fused`` (no meta kernel for it)."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        kwargs.pop("fused", None)
        super().__init__(params, foreach=True, **kwargs)


_Generator = torch.Generator


def meta_generator(device: Any = "cpu") -> torch.Generator:
    """``torch.Generator(device)``, but a CPU generator for the meta device, which has none (a meta tensor has no
    values to draw; ``torch.randn(..., device="meta", generator=cpu_generator)`` gives its shape)."""
    return _Generator("cpu" if torch.device(device).type == "meta" else device)


def meta_agent(monkeypatch: pytest.MonkeyPatch, n_envs: int = 2, **overrides: Any) -> POMPC:
    """A tiny agent whose every tensor lives on the meta device, with a full replay buffer (and a CPU generator for
    the fixed-seed samples of deterministic plans, see :func:`meta_generator`)."""
    env_fn = lambda: SyntheticEnv(5, 2)  # noqa: E731
    from stable_baselines3.common.vec_env import DummyVecEnv

    cfg = tiny_algo(num_q=5, learning_starts=0, pretrain_updates=0, buffer_size=512, **overrides)
    model = POMPC("MlpPolicy", DummyVecEnv([env_fn] * n_envs), device="meta", seed=0, **cfg)
    monkeypatch.setattr(torch.optim, "Adam", ForeachAdam)
    monkeypatch.setattr(torch, "Generator", meta_generator)
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
