"""Shared helpers, fixtures and case lists for the gqa_ext tests.

The test modules import the helpers from here (``from conftest import ...``):
pytest puts this directory on ``sys.path``.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import gqa_ext  # noqa: F401  (registers torch.ops.gqa.*)

# The ops fill their outputs with NaN before the kernels run (read at the
# first op call), so an element a kernel fails to write fails the comparisons
# instead of passing with what the allocator left there.
os.environ["GQA_EXT_POISON_OUTPUTS"] = "1"

# Relative error ||actual - ref|| / ||ref|| allowed against the float64
# reference. float64 is 1e-6, not ~1e-15: lse is float32 by contract and the
# backward recomputes the probabilities from it.
TOLERANCE = {
    torch.float64: 1e-6,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}

# lse is float32 computed with float32 accumulation from the same (rounded)
# inputs as the reference, whatever q's dtype, so it is tight for every dtype.
LSE_ATOL = 1e-4
LSE_RTOL = 1e-5

# (heads_q, heads_kv): group sizes 1, 2, 4, 5, 7, 8, 16, and MQA (Hkv = 1).
GROUP_CASES = [
    pytest.param(3, 3, id="group1"),
    pytest.param(4, 2, id="group2"),
    pytest.param(8, 2, id="group4"),
    pytest.param(10, 2, id="group5"),
    pytest.param(14, 2, id="group7"),
    pytest.param(16, 2, id="group8"),
    pytest.param(32, 2, id="group16"),
    pytest.param(7, 1, id="mqa_group7"),
    pytest.param(16, 1, id="mqa_group16"),
]

# Every option of the op, alone and combined; keyword names of the op and of
# attention_ref alike.
OPTION_CASES = [
    pytest.param({}, id="defaults"),
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"causal": True, "window_right": -1}, id="causal_window_right_unbounded"),
    pytest.param({"window_left": 37}, id="window_left_only"),
    pytest.param({"window_right": 5}, id="window_right_only"),
    pytest.param({"window_left": 50, "window_right": 7}, id="window_both"),
    pytest.param({"window_left": 0, "window_right": 0}, id="window_zero"),
    pytest.param({"window_left": 0}, id="window_left_zero"),
    pytest.param({"causal": True, "window_left": 20}, id="causal_window_left"),
    pytest.param({"softcap": 5.0}, id="softcap"),
    pytest.param({"softcap": 0.5, "causal": True, "window_left": 64}, id="softcap_causal_window"),
    pytest.param({"softmax_scale": 0.3}, id="scale"),
    pytest.param({"softmax_scale": -0.2}, id="negative_scale"),
    pytest.param({"softmax_scale": 1.5, "softcap": 3.0}, id="scale_softcap"),
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the absolute error if expected is 0)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    return num / den if den > 0 else num


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """actual is finite everywhere and within TOLERANCE[dtype] of expected."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]:g} ({dtype})"


def assert_lse_close(lse: torch.Tensor, expected: torch.Tensor) -> None:
    """lse is float32; -inf exactly where expected is -inf, close elsewhere."""
    assert lse.dtype == torch.float32
    assert lse.shape == expected.shape
    empty = torch.isneginf(expected)
    assert torch.equal(torch.isneginf(lse), empty), "lse is -inf on other rows than the reference"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    torch.testing.assert_close(lse[~empty].double(), expected[~empty], atol=LSE_ATOL, rtol=LSE_RTOL)


def make_qkv(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    kind: str = "contiguous",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, Sq, Hq, D) and k, v (B, Sk, Hkv, D), standard normal, on ``device``.

    ``kind`` picks the memory layout; the last dim is always contiguous:
      - ``"contiguous"``: plain contiguous tensors;
      - ``"bhsd"``: contiguous (B, H, S, D) tensors (SDPA's layout, NOT bshd);
      - ``"bhsd_transposed"``: (B, H, S, D) tensors viewed as bshd by transpose(1, 2);
      - ``"sliced"``: slices of bigger tensors (storage offset, padded rows);
      - ``"kv_strides_differ"``: k transposed from bhsd, v a slice, q contiguous;
      - ``"packed_kv"``: k and v interleaved in one (B, Sk, 2, Hkv, D) tensor;
      - ``"expanded_batch"``: k and v broadcast over the batch (stride 0).

    Every tensor is created on ``device`` and then sliced or viewed there, so
    the layout is the one described above on any device (``.to(device)`` of a
    strided tensor could make it contiguous).
    """

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    def sliced(*shape):
        b, s, h, d = shape
        return randn(b + 1, s + 3, h + 2, d + 8)[1:, 2 : 2 + s, 1 : 1 + h, 4 : 4 + d]

    def bhsd_t(*shape):
        b, s, h, d = shape
        return randn(b, h, s, d).transpose(1, 2)

    q_shape = (batch, seqlen_q, heads_q, head_dim)
    kv_shape = (batch, seqlen_k, heads_kv, head_dim)
    if kind == "contiguous":
        return randn(*q_shape), randn(*kv_shape), randn(*kv_shape)
    if kind == "bhsd":
        return (
            randn(batch, heads_q, seqlen_q, head_dim),
            randn(batch, heads_kv, seqlen_k, head_dim),
            randn(batch, heads_kv, seqlen_k, head_dim),
        )
    if kind == "bhsd_transposed":
        return bhsd_t(*q_shape), bhsd_t(*kv_shape), bhsd_t(*kv_shape)
    if kind == "sliced":
        return sliced(*q_shape), sliced(*kv_shape), sliced(*kv_shape)
    if kind == "kv_strides_differ":
        return randn(*q_shape), bhsd_t(*kv_shape), sliced(*kv_shape)
    if kind == "packed_kv":
        kv = randn(batch, seqlen_k, 2, heads_kv, head_dim)
        return bhsd_t(*q_shape), kv[:, :, 0], kv[:, :, 1]
    if kind == "expanded_batch":
        k = randn(1, seqlen_k, heads_kv, head_dim).expand(*kv_shape)
        v = randn(1, seqlen_k, heads_kv, head_dim).expand(*kv_shape)
        return sliced(*q_shape), k, v
    raise ValueError(f"unknown kind {kind!r}")


NONCONTIGUOUS_KINDS = ["bhsd_transposed", "sliced", "kv_strides_differ", "packed_kv", "expanded_batch"]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed for every test (and parametrization)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def num_threads():
    """Lets a test change torch's thread count; restores it afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


# Index values (cu_seqlens, cache_seqlens, block tables) are checked on CUDA
# tensors too, not only on CPU ones, so that the error tests run on both. The
# ops read this once, at the first call that could check them.
os.environ["GQA_EXT_CHECK_INDICES"] = "1"


def cuda_kernels_available() -> bool:
    """A GPU is there and gqa_ext was built with its CUDA kernels."""
    return torch.cuda.is_available() and bool(gqa_ext.build_info()["cuda_kernels"])


# The devices of the device-parametrized tests: "cpu", and "cuda" where
# cuda_kernels_available().
DEVICES = ["cpu"] + (["cuda"] if cuda_kernels_available() else [])

# The CUDA attention kernels take these dtypes only.
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def skip_unsupported(device: str, dtype: torch.dtype) -> None:
    """Skips the test for a dtype the device's attention kernels do not take."""
    if device == "cuda" and dtype not in CUDA_DTYPES:
        pytest.skip(f"the CUDA kernels take float16 and bfloat16, not {dtype}")


def default_dtype(device: str) -> torch.dtype:
    """float32 on the CPU, bfloat16 on CUDA: the dtype of tests about something else than dtypes."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def api_kwargs(options: dict) -> dict:
    """The op's keyword options (window_left, window_right) as the Python API's (window=(left, right))."""
    kwargs = {name: value for name, value in options.items() if name not in ("window_left", "window_right")}
    if "window_left" in options or "window_right" in options:
        kwargs["window"] = (options.get("window_left", -1), options.get("window_right", -1))
    return kwargs
