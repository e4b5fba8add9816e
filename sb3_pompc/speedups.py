"""Speed tricks of sb3-pompc, each equal to a plain PyTorch expression (torch only).

Every function here computes what a one-line reference computes (same distribution for the dropout mask); its
docstring names the reference and the test that checks the two agree. The models and losses call these instead
of the references because they are faster on a CPU, under ``torch.compile``, or both.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "hashed_dropout",
    "mish",
    "linear_of_shared_latent",
    "AUTOCAST_DTYPES",
    "autocast",
    "autocast_fn",
    "check_compile_backend",
    "warn_if_bf16_is_emulated",
]

# 32-bit constants as signed int32 (torch has no uint32 arithmetic); products wrap modulo 2^32
_GOLDEN = -1640531527  # 0x9E3779B9
_LOWBIAS_1, _LOWBIAS_2 = 0x21F0AAAD, -749064809  # 0x21F0AAAD, 0xD35A2D97


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    """32-bit integer mixing function ("lowbias32"): ``h ^= h >> 16; h *= 0x21F0AAAD; h ^= h >> 15;
    h *= 0xD35A2D97; h ^= h >> 15`` with logical shifts, on int32 (a bijection of the 2^32 values)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _LOWBIAS_1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _LOWBIAS_2
    return h ^ ((h >> 15) & 0x1FFFF)


def hashed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout ``x ⊙ m / (1 − p)`` with ``m_i = [u_i ≥ p]``, ``u_i = ⌊h_i / 2^8⌋ / 2^24`` and
    ``h_i = lowbias32((i · 0x9E3779B9) ⊕ s)``: the mask of element i (flat index) is a hash of i and of a seed s
    drawn from torch's generator at every call. ``u`` has the 24-bit resolution of ``torch.rand`` in float32, so
    ``P(m_i = 0) = ⌈p · 2^24⌉ / 2^24`` (p rounded up to a multiple of 2^-24 ≈ 6e-8).

    Equivalent to ``F.dropout(x, p, training=True)`` in distribution (different draws); tested by
    tests/test_math.py::test_hashed_dropout_is_bernoulli_inverted_dropout.

    On a CPU, ATen's dropout draws each element from one single-threaded mt19937 stream (3–8 ns per element on AMD
    CPUs, where ATen does not use MKL's generator); this mask is element-wise integer work, ~2× faster eager and
    fused into the neighbouring kernels under ``torch.compile``, with identical masks eager and compiled
    (tests/test_math.py::test_hashed_dropout_compiled_equals_eager).

    :param x: input (fewer than 2^31 elements)
    :param p: drop probability in [0, 1)
    """
    if x.numel() >= 2**31:
        raise ValueError(f"hashed_dropout: {x.numel()} elements, at most 2^31 - 1 are supported")
    seed = torch.randint(-(2**31), 2**31 - 1, (), dtype=torch.int32, device=x.device)
    i = torch.arange(x.numel(), dtype=torch.int32, device=x.device).view(x.shape)
    h = _lowbias32((i * _GOLDEN) ^ seed)
    keep = ((h >> 8) & 0xFFFFFF) >= math.ceil(p * 2**24)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


def mish(x: torch.Tensor) -> torch.Tensor:
    """``Mish(x) = x · tanh(softplus(x)) = x · tanh(ln(1 + eˣ))``.

    Equivalent to ``F.mish(x)`` (identical eager, within 1e-5 compiled); tested by
    tests/test_math.py::test_mish_compiled_form_matches_native.

    Eager PyTorch runs its native ``F.mish`` kernel. Under ``torch.compile`` the algebraically identical form
    ``x · n / (n + 2)`` with ``n = eᵘ(eᵘ + 2)`` and ``u = min(x, 20)`` is traced instead (``tanh(ln(1+e)) = ((1+e)² −
    1)/((1+e)² + 1)``): one ``exp`` instead of ``exp``, ``log1p`` and ``tanh``, which the compiler fuses with the
    LayerNorm before it (~3× faster on CPU; for x > 20, n/(n+2) = 1 in float32, so the clamp changes nothing).
    """
    if torch.compiler.is_compiling():
        e = torch.exp(x.clamp(max=20.0))
        n = e * (e + 2.0)
        return x * (n / (n + 2.0))
    return F.mish(x)


def linear_of_shared_latent(layer: nn.Linear, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``layer(concat[z_i, a_ij])`` for N actions per latent, with the latent's part computed once per latent:
    ``W·[z; a] + b = W_z·z + (W_a·a + b)``, without N copies of ``W_z·z``.

    Equivalent to ``layer(torch.cat([z_rep, a_flat], -1))`` with each latent repeated N times (up to rounding);
    tested by tests/test_world_model.py::test_step_from_shared_latents_equals_the_repeated_latent_step.

    :param layer: a Linear over ``concat[z, a]`` (latent first)
    :param z: (n, L) latents
    :param a: (n, N, A) N actions per latent
    :return: (n·N, out), fp32 (the two parts are added in fp32 under autocast)
    """
    L = z.shape[-1]
    hz = F.linear(z, layer.weight[:, :L])  # (n, out)
    ha = F.linear(a, layer.weight[:, L:], layer.bias)  # (n, N, out)
    return (hz.float().unsqueeze(1) + ha.float()).reshape(-1, hz.shape[-1])


AUTOCAST_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def autocast(device_type: str, dtype: str) -> Any:
    """Mixed precision by name: a context that runs matmuls in ``dtype`` on ``device_type``.

    Equivalent to ``torch.autocast(device_type, AUTOCAST_DTYPES[dtype])``, and to no autocast at all for float32
    (a no-op context); tested by tests/test_compile.py::test_autocast_helpers_by_dtype_name.

    :param device_type: "cpu", "cuda", ...
    :param dtype: a key of :data:`AUTOCAST_DTYPES` ("float32", "fp32", "bfloat16", "bf16")
    """
    if AUTOCAST_DTYPES[dtype] == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[dtype])


def autocast_fn(fn: Callable[..., Any], device_type: str, dtype: str) -> Callable[..., Any]:
    """``fn`` run under :func:`autocast` (a backward of its outputs runs outside, as autocast asks).

    Equivalent to calling ``fn`` inside ``with autocast(device_type, dtype):``; tested by
    tests/test_compile.py::test_autocast_helpers_by_dtype_name.

    :param fn: the function to wrap (its name and docstring are kept)
    :param device_type: "cpu", "cuda", ...
    :param dtype: a key of :data:`AUTOCAST_DTYPES`
    :return: the wrapped function
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with autocast(device_type, dtype):
            return fn(*args, **kwargs)

    return wrapped


def check_compile_backend(device: torch.device) -> None:
    """``compile=True`` on a CPU needs a C++ compiler (torch.compile's inductor backend generates C++): raise a
    clear error before training rather than at the first plan.

    Equivalent to the error ``torch.compile`` raises at its first call without a C++ compiler, raised up front;
    tested by tests/test_compile.py::test_compile_without_cxx_compiler_fails_before_training.

    :param device: the device the compiled functions will run on (only "cpu" needs the check)
    """
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler, or an inductor without this helper
        raise ValueError(
            f"compile=True on the CPU needs a C++ compiler for torch.compile's inductor backend, and none was found "
            f"({type(exc).__name__}: {exc}). Install g++ (or set CXX), or use compile=False."
        ) from exc


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), as oneDNN reports it; ``True``
    when this torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def warn_if_bf16_is_emulated(device: torch.device, **dtypes: str) -> None:
    """Warn before training when bf16 is asked for on a CPU without native bf16 matmuls: there autocast emulates
    them, and a bf16 step is slower than an fp32 one (a 256 × 256 matmul ran about 50× slower on an AVX2 host, see
    docs/benchmark.md).

    Tested by tests/test_compile.py::test_bf16_on_a_cpu_without_native_bf16_warns.

    :param device: the device the model runs on (only "cpu" is checked)
    :param dtypes: the settings by name (``planner_dtype=..., update_dtype=...``), keys of :data:`AUTOCAST_DTYPES`
    """
    asked = [f"{name}={value!r}" for name, value in dtypes.items() if AUTOCAST_DTYPES[value] == torch.bfloat16]
    if device.type != "cpu" or not asked or cpu_has_native_bf16():
        return
    warnings.warn(
        f"{', '.join(asked)} on a CPU without native bf16 matmuls "
        f"(capability {torch.backends.cpu.get_cpu_capability()}): they are emulated and much slower than float32. "
        "Use 'float32' on this CPU.",
        stacklevel=4,  # the caller of POMPC(...)
    )
