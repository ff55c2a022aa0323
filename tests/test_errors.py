"""Bad input raises a clear exception that names the argument; build_info()."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_qkv

import gqa_ext


def qkv(dtype=torch.float32):
    """Valid inputs: B = 2, Sq = 5, Sk = 7, Hq = 4, Hkv = 2, D = 16."""
    return make_qkv(2, 5, 7, 4, 2, 16, dtype)


def forward_error(q=None, k=None, v=None, **options):
    """(exception type, message) of torch.ops.gqa.forward with these args replacing valid ones."""
    q0, k0, v0 = qkv()
    args = (q0 if q is None else q, k0 if k is None else k, v0 if v is None else v)
    with pytest.raises((ValueError, TypeError)) as info:
        torch.ops.gqa.forward(*args, **options)
    return info.type, str(info.value)


# (replacement args, expected exception, message pattern)
FORWARD_CASES = [
    pytest.param(
        {"q": torch.randn(2, 5, 16)},
        ValueError,
        r"gqa\.forward: q must be a 4-D tensor \(B, Sq, Hq, D\), got a 3-D tensor of shape \[2, 5, 16\]",
        id="q_rank3",
    ),
    pytest.param(
        {"k": torch.randn(2, 7, 2, 16, 1)},
        ValueError,
        r"k must be a 4-D tensor \(B, Sk, Hkv, D\), got a 5-D tensor",
        id="k_rank5",
    ),
    pytest.param({"v": torch.randn(7, 2, 16)}, ValueError, r"v must be a 4-D tensor .* got a 3-D tensor", id="v_rank3"),
    pytest.param(
        {"k": torch.randn(3, 7, 2, 16), "v": torch.randn(3, 7, 2, 16)},
        ValueError,
        r"k and v must have q's batch size 2, got 3",
        id="batch_mismatch",
    ),
    pytest.param(
        {"k": torch.randn(2, 7, 2, 32), "v": torch.randn(2, 7, 2, 32)},
        ValueError,
        r"k and v must have q's head dim 16, got 32",
        id="head_dim_mismatch",
    ),
    pytest.param(
        {"k": torch.randn(2, 7, 2, 16, dtype=torch.float64)},
        TypeError,
        r"k must have q's dtype Float, got Double",
        id="k_dtype_mismatch",
    ),
    pytest.param(
        {"v": torch.randn(2, 7, 2, 16, dtype=torch.bfloat16)},
        TypeError,
        r"v must have q's dtype Float, got BFloat16",
        id="v_dtype_mismatch",
    ),
    pytest.param(
        {"k": torch.randn(2, 7, 3, 16), "v": torch.randn(2, 7, 3, 16)},
        ValueError,
        r"number of query heads Hq = 4 must be a multiple of the number of KV heads Hkv = 3",
        id="heads_not_multiple",
    ),
    pytest.param(
        {"q": torch.randn(2, 5, 2, 16), "k": torch.randn(2, 7, 4, 16), "v": torch.randn(2, 7, 4, 16)},
        ValueError,
        r"Hq = 2 must be a multiple of the number of KV heads Hkv = 4",
        id="fewer_query_heads_than_kv_heads",
    ),
    pytest.param(
        {"k": torch.randn(2, 7, 0, 16), "v": torch.randn(2, 7, 0, 16)},
        ValueError,
        r"q and k need at least one head, got Hq = 4 and Hkv = 0",
        id="zero_kv_heads",
    ),
    pytest.param(
        {"v": torch.randn(2, 8, 2, 16)},
        ValueError,
        r"k and v must have the same shape, got k \[2, 7, 2, 16\] and v \[2, 8, 2, 16\]",
        id="k_v_seqlen_mismatch",
    ),
    pytest.param(
        {"v": torch.randn(2, 7, 1, 16)},
        ValueError,
        r"k and v must have the same shape",
        id="k_v_heads_mismatch",
    ),
    pytest.param(
        {"q": torch.randn(2, 5, 4, 32)[..., ::2]},
        ValueError,
        r"q must have a contiguous last dim \(stride 1\), got strides",
        id="q_last_dim_strided",
    ),
    pytest.param(
        {"k": torch.randn(2, 7, 16, 2).transpose(2, 3)},
        ValueError,
        r"k must have a contiguous last dim",
        id="k_last_dim_transposed",
    ),
    pytest.param(
        {"v": torch.randn(2, 7, 2, 32)[..., 1::2]},
        ValueError,
        r"v must have a contiguous last dim",
        id="v_last_dim_strided",
    ),
    pytest.param(
        {"q": torch.empty(2, 5, 4, 0), "k": torch.empty(2, 7, 2, 0), "v": torch.empty(2, 7, 2, 0)},
        ValueError,
        r"the head dim D must be positive",
        id="head_dim_zero",
    ),
]


@pytest.mark.parametrize("args, exc, pattern", FORWARD_CASES)
def test_forward_bad_tensors(args, exc, pattern):
    exc_type, message = forward_error(**args)
    assert exc_type is exc, message
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    "dtype, name",
    [(torch.int32, "Int"), (torch.int64, "Long"), (torch.complex64, "ComplexFloat"), (torch.bool, "Bool")],
    ids=str,
)
def test_forward_unsupported_dtype(dtype, name):
    q, k, v = (
        torch.ones(2, 5, 4, 16, dtype=dtype),
        torch.ones(2, 7, 2, 16, dtype=dtype),
        torch.ones(2, 7, 2, 16, dtype=dtype),
    )
    with pytest.raises(TypeError, match=rf"q must be float32, bfloat16, float16 or float64, got {name}"):
        torch.ops.gqa.forward(q, k, v)


OPTION_CASES = [
    pytest.param({"window_left": -2}, r"window_left must be >= -1 \(-1 = unbounded\), got -2", id="window_left_-2"),
    pytest.param({"window_right": -5}, r"window_right must be >= -1 \(-1 = unbounded\), got -5", id="window_right_-5"),
    pytest.param(
        {"causal": True, "window_right": 3},
        r"causal=True means window_right = 0, got window_right = 3",
        id="causal_with_window_right",
    ),
    pytest.param({"softcap": -1.0}, r"softcap must be finite and >= 0 \(0 = off\), got -1", id="softcap_negative"),
    pytest.param({"softcap": float("inf")}, r"softcap must be finite and >= 0 .*got inf", id="softcap_inf"),
    pytest.param({"softcap": float("nan")}, r"softcap must be finite and >= 0 .*got nan", id="softcap_nan"),
    pytest.param({"softmax_scale": float("inf")}, r"softmax_scale must be finite, got inf", id="scale_inf"),
    pytest.param({"softmax_scale": float("-inf")}, r"softmax_scale must be finite, got -inf", id="scale_neg_inf"),
    pytest.param({"softmax_scale": float("nan")}, r"softmax_scale must be finite, got nan", id="scale_nan"),
]


@pytest.mark.parametrize("options, pattern", OPTION_CASES)
def test_forward_bad_options(options, pattern):
    exc_type, message = forward_error(**options)
    assert exc_type is ValueError, message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("options, pattern", OPTION_CASES)
def test_backward_bad_options(options, pattern):
    q, k, v = qkv()
    out, lse = torch.ops.gqa.forward(q, k, v)
    with pytest.raises(ValueError, match=r"^gqa\.backward: ") as info:
        torch.ops.gqa.backward(torch.randn_like(out), q, k, v, out, lse, **options)
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        pytest.param(
            {"layout": "bsdh"}, ValueError, r"layout must be one of \('bshd', 'bhsd'\), got 'bsdh'", id="layout"
        ),
        pytest.param({"layout": "BSHD"}, ValueError, r"layout must be one of .*got 'BSHD'", id="layout_case"),
        pytest.param(
            {"window": 3}, TypeError, r"window must be a \(left, right\) pair of ints, got 3", id="window_int"
        ),
        pytest.param({"window": (1, 2, 3)}, TypeError, r"window must be a \(left, right\) pair", id="window_triple"),
        pytest.param(
            {"window": (1.5, 2)}, TypeError, r"window must be a \(left, right\) pair of ints", id="window_float"
        ),
        pytest.param({"window": None}, TypeError, r"window must be a \(left, right\) pair of ints", id="window_none"),
        pytest.param(
            {"window": (True, False)}, TypeError, r"window must be a \(left, right\) pair of ints", id="window_bool"
        ),
        pytest.param({"window": (-2, 0)}, ValueError, r"window_left must be >= -1 .*got -2", id="window_left_-2"),
        pytest.param(
            {"causal": True, "window": (4, 2)}, ValueError, r"causal=True means window_right = 0", id="causal_window"
        ),
        pytest.param({"softcap": -0.5}, ValueError, r"softcap must be finite and >= 0", id="softcap"),
        pytest.param({"softmax_scale": float("nan")}, ValueError, r"softmax_scale must be finite", id="scale"),
    ],
)
def test_attention_bad_arguments(kwargs, exc, pattern):
    q, k, v = qkv()
    with pytest.raises(exc, match=pattern):
        gqa_ext.attention(q, k, v, **kwargs)


def test_attention_bhsd_wrong_rank():
    q, k, v = make_qkv(2, 5, 7, 4, 2, 16, kind="bhsd")
    with pytest.raises(ValueError, match=r"k must be a 4-D tensor \(B, H, S, D\) for layout='bhsd', got a 3-D"):
        gqa_ext.attention(q, k[0], v, layout="bhsd")


def test_attention_last_dim_not_contiguous():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have a contiguous last dim"):
        gqa_ext.attention(torch.randn(2, 5, 4, 32)[..., ::2], k, v)


def backward_args():
    q, k, v = qkv()
    out, lse = torch.ops.gqa.forward(q, k, v)
    return {"dout": torch.randn_like(out), "q": q, "k": k, "v": v, "out": out, "lse": lse}


@pytest.mark.parametrize(
    "replace, exc, pattern",
    [
        pytest.param(
            {"lse": torch.zeros(2, 5, 4)},
            ValueError,
            r"lse must have shape \(B, Hq, Sq\) = \[2, 4, 5\], got \[2, 5, 4\]",
            id="lse_transposed",
        ),
        pytest.param({"lse": torch.zeros(2, 4)}, ValueError, r"lse must have shape \(B, Hq, Sq\)", id="lse_rank2"),
        pytest.param(
            {"lse": torch.zeros(2, 4, 5, dtype=torch.float64)},
            TypeError,
            r"lse must be float32, got Double",
            id="lse_dtype",
        ),
        pytest.param(
            {"dout": torch.randn(2, 5, 4, 8)},
            ValueError,
            r"dout must have q's shape \[2, 5, 4, 16\], got",
            id="dout_shape",
        ),
        pytest.param({"dout": torch.randn(2, 5, 16)}, ValueError, r"dout must be a 4-D tensor", id="dout_rank"),
        pytest.param(
            {"dout": torch.randn(2, 5, 4, 16, dtype=torch.bfloat16)},
            TypeError,
            r"dout must have q's dtype Float, got BFloat16",
            id="dout_dtype",
        ),
        pytest.param(
            {"dout": torch.randn(2, 5, 4, 32)[..., ::2]},
            ValueError,
            r"dout must have a contiguous last dim",
            id="dout_last_dim_strided",
        ),
        pytest.param({"out": torch.randn(2, 6, 4, 16)}, ValueError, r"out must have q's shape", id="out_shape"),
        pytest.param(
            {"out": torch.randn(2, 5, 4, 16, dtype=torch.float64)},
            TypeError,
            r"out must have q's dtype",
            id="out_dtype",
        ),
        pytest.param(
            {"k": torch.randn(2, 7, 3, 16), "v": torch.randn(2, 7, 3, 16)},
            ValueError,
            r"must be a multiple of the number of KV heads",
            id="heads_not_multiple",
        ),
    ],
)
def test_backward_bad_tensors(replace, exc, pattern):
    args = {**backward_args(), **replace}
    with pytest.raises(exc, match=r"^gqa\.backward: ") as info:
        torch.ops.gqa.backward(*args.values())
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must be on q's device cpu, got cuda"):
        torch.ops.gqa.forward(q, k.cuda(), v)


def test_build_info():
    info = gqa_ext.build_info()
    expected_keys = {
        "version",
        "torch_version",
        "cuda_version",
        "cuda_archs",
        "cutlass_version",
        "cuda_kernels",
        "cpu_kernels",
    }
    assert expected_keys <= set(info), f"missing {expected_keys - set(info)}"
    assert info["version"] == gqa_ext.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert info["cpu_kernels"] in ("DEFAULT", "AVX2", "AVX512")
    assert isinstance(info["cuda_archs"], list)
    if info["cuda_version"] is None:
        assert info["cuda_archs"] == [] and not info["cuda_kernels"]
    else:
        assert info["cuda_version"] == torch.version.cuda
        assert info["cuda_archs"] and all(re.fullmatch(r"\d+\.\d", a) for a in info["cuda_archs"])
        assert isinstance(info["cutlass_version"], str) and re.fullmatch(r"\d+\.\d+\.\d+", info["cutlass_version"])
