"""Shared fixtures of the test suite.

Every test process runs torch on ONE thread (the CI machine has 2 shared cores; two torch threads next to another
busy process make small matmuls ~10x slower). The ``ref`` fixture holds reference formulas written from the spec
(``/work/shared/reference/tdmpc2-bmpc-spec.md``), independently of the package, so that tests never compute an
expected value with the function under test.
"""

from __future__ import annotations

import math
import os
import random
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Run the learning checks first. They are the suite's longest tests (minutes each, the bf16 one longest on a
    CPU without native bf16 matmuls). The README's command runs the suite on two xdist workers that take tests two
    at a time (``-n 2 --maxschedchunk 2``): with these tests first, one worker starts with the two fp32 checks and the
    other with the bf16 check, and the short tests fill in behind them. Left where they are collected, they could
    end up one after the other on one worker. The order changes nothing else: every test sets up its own state."""
    items.sort(key=lambda item: item.path.name != "test_learning.py")  # a stable sort keeps the order within each part


# ---------------------------------------------------------------------------------------------------------------
# reference formulas (spec §2), plain torch, written without looking at sb3_pompc.math
# ---------------------------------------------------------------------------------------------------------------
NUM_BINS, VMIN, VMAX = 101, -10.0, 10.0
BIN_SIZE = (VMAX - VMIN) / (NUM_BINS - 1)


def ref_symlog(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)·ln(1 + |x|)``."""
    return torch.sign(x) * torch.log(1.0 + torch.abs(x))


def ref_symexp(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)·(e^{|x|} − 1)``."""
    return torch.sign(x) * (torch.exp(torch.abs(x)) - 1.0)


def ref_two_hot(x: torch.Tensor) -> torch.Tensor:
    """two_hot of a flat tensor of scalars, one python loop per sample (spec §2), shape (n, K), float64."""
    out = torch.zeros(x.numel(), NUM_BINS, dtype=torch.float64)
    for i, v in enumerate(x.reshape(-1).tolist()):
        y = min(max(math.copysign(math.log1p(abs(v)), v), VMIN), VMAX)
        pos = (y - VMIN) / BIN_SIZE
        idx = int(math.floor(pos))
        idx = min(idx, NUM_BINS - 1)
        off = pos - idx
        out[i, idx] += 1.0 - off
        out[i, (idx + 1) % NUM_BINS] += off
    return out


def ref_two_hot_inv(logits: torch.Tensor) -> torch.Tensor:
    """``symexp(Σ_k softmax(logits)_k · centre_k)``, shape (..., 1)."""
    centres = torch.linspace(VMIN, VMAX, NUM_BINS, dtype=torch.float64)
    p = torch.softmax(logits.double(), dim=-1)
    return ref_symexp((p * centres).sum(-1, keepdim=True))


def ref_soft_ce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``−Σ_k two_hot(x)_k · log_softmax(logits)_k`` per sample; logits (..., K), x (..., 1) → (..., 1), float64."""
    target = ref_two_hot(x.reshape(-1)).reshape(*x.shape[:-1], NUM_BINS)
    return -(target * torch.log_softmax(logits.double(), dim=-1)).sum(-1, keepdim=True)


def ref_logits_for(value: torch.Tensor) -> torch.Tensor:
    """Logits whose two-hot expectation decodes to ``value`` (log of the two-hot target, tiny floor), (..., K)."""
    target = ref_two_hot(value.reshape(-1)).reshape(*value.shape[:-1], NUM_BINS)
    return torch.log(target + 1e-30).float()


def ref_gaussian_kl(mu_p, std_p, mu_q, std_q) -> torch.Tensor:
    """Per-dim ``KL(N(μp, σp²) ‖ N(μq, σq²))`` averaged over the last dim, (..., 1), float64."""
    mu_p, std_p, mu_q, std_q = (t.double() for t in (mu_p, std_p, mu_q, std_q))
    per_dim = torch.log(std_q) - torch.log(std_p) + (std_p**2 + (mu_p - mu_q) ** 2) / (2 * std_q**2) - 0.5
    return per_dim.mean(-1, keepdim=True)


def ref_percentile_linear(x: np.ndarray, p: float) -> float:
    """numpy "linear" percentile written out: position ``p·(n−1)/100`` between sorted neighbours."""
    xs = np.sort(np.asarray(x, dtype=np.float64).reshape(-1))
    pos = p * (len(xs) - 1) / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    w = pos - lo
    return float(xs[lo] * (1 - w) + xs[hi] * w)


def ref_rho_mean(x: torch.Tensor, rho: float) -> torch.Tensor:
    """``(1/T) Σ_t ρ^t · mean_b x_t`` with an explicit python loop over t; x (T, B, 1)."""
    T = x.shape[0]
    total = x.new_zeros(())
    for t in range(T):
        total = total + (rho**t) * x[t].mean()
    return total / T


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """Reference formulas of the spec, independent of the package."""
    return SimpleNamespace(
        symlog=ref_symlog,
        symexp=ref_symexp,
        two_hot=ref_two_hot,
        two_hot_inv=ref_two_hot_inv,
        soft_ce=ref_soft_ce,
        logits_for=ref_logits_for,
        gaussian_kl=ref_gaussian_kl,
        percentile=ref_percentile_linear,
        rho_mean=ref_rho_mean,
        NUM_BINS=NUM_BINS,
        VMIN=VMIN,
        VMAX=VMAX,
    )


@pytest.fixture(scope="session", autouse=True)
def _sb3_logdir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SB3 makes a log folder per ``learn`` (``$SB3_LOGDIR``, else a new ``/tmp/SB3-<date>``): keep the suite's in
    pytest's temporary directory instead of leaving hundreds of empty folders in /tmp."""
    os.environ.setdefault("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3_logs")))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same seeds (tests are deterministic and independent of their order)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


TINY_MODEL = dict(latent_dim=16, enc_dim=24, mlp_dim=24, num_enc_layers=2, num_q=3)


@pytest.fixture
def make_tiny_model() -> Callable[..., "torch.nn.Module"]:
    """Factory of a tiny CPU world model (obs 5, action 3 unless given); keyword arguments override."""
    from sb3_pompc.world_model import WorldModel

    def factory(obs_dim: int = 5, action_dim: int = 3, **kwargs) -> WorldModel:
        cfg = {**TINY_MODEL, **kwargs}
        return WorldModel(obs_dim, action_dim, **cfg)

    return factory


def randomize_(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Fill every parameter with N(0, scale²) (so zero-initialised heads produce non-trivial outputs)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)
    return module


@pytest.fixture
def randomize() -> Callable[..., torch.nn.Module]:
    """``randomize(module, scale)``: N(0, scale²) parameters in place."""
    return randomize_


#: the tiny POMPC configuration shared by the algorithm-level tests (one thread, a few seconds per learn)
TINY_ALGO: dict = dict(
    model_size=None, latent_dim=32, mlp_dim=32, enc_dim=32, num_q=2, num_samples=32, num_elites=4, num_pi_trajs=2,
    iterations=2, batch_size=16, learning_starts=50, pretrain_updates=5, buffer_size=10_000,
)


def tiny_algo(**overrides) -> dict:
    """:data:`TINY_ALGO` on the CPU (``device="cpu"``: the CPU tests' numbers, e.g. compiled == eager, are CPU ones;
    ``tests/test_cuda.py`` holds the GPU checks) with ``overrides``; a ``None`` value removes the key (leaves it to
    the preset). :data:`TINY_ALGO` itself has no device: rl-zoo3 passes its own next to a zoo entry's settings."""
    cfg = {**TINY_ALGO, "device": "cpu", **overrides}
    return {k: v for k, v in cfg.items() if v is not None}


@pytest.fixture(autouse=True)
def _auto_device_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``device="auto"`` means the CPU in this suite, on a CUDA machine too: the CPU tests compare with eager CPU
    numbers (the compiled update uses ``fallback_random`` on the CPU only). ``tests/test_cuda.py`` asks for "cuda"."""
    from stable_baselines3.common import base_class, utils

    get_device = utils.get_device
    monkeypatch.setattr(base_class, "get_device", lambda device="auto": get_device("cpu" if device == "auto" else device))
