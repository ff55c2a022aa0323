"""torch.library.opcheck on every gqa op: schema, fake kernel, autograd registration, AOT dispatch."""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv

FORWARD_SAMPLES = [
    pytest.param((2, 17, 33, 4, 2, 16), torch.float32, "contiguous", False, {}, id="float32"),
    pytest.param((1, 33, 17, 6, 2, 16), torch.float32, "contiguous", True, {"causal": True}, id="requires_grad_causal"),
    pytest.param(
        (2, 17, 33, 5, 1, 32),
        torch.float64,
        "bhsd_transposed",
        True,
        {"window_left": 4, "window_right": 2, "softcap": 2.0, "softmax_scale": 0.3},
        id="requires_grad_noncontiguous_options",
    ),
    pytest.param((1, 17, 33, 8, 1, 16), torch.bfloat16, "sliced", False, {"softcap": 1.0}, id="bfloat16_sliced"),
    pytest.param((1, 7, 9, 4, 4, 80), torch.float16, "contiguous", True, {"window_left": 0}, id="requires_grad_fp16"),
    pytest.param((2, 5, 0, 4, 2, 16), torch.float32, "contiguous", False, {}, id="empty_keys"),
]


@pytest.mark.parametrize("shape, dtype, kind, requires_grad, options", FORWARD_SAMPLES)
def test_opcheck_forward(shape, dtype, kind, requires_grad, options):
    q, k, v = (t.detach().requires_grad_(requires_grad) for t in make_qkv(*shape, dtype, kind=kind))
    torch.library.opcheck(torch.ops.gqa.forward.default, (q, k, v), options)


BACKWARD_SAMPLES = [
    pytest.param((2, 17, 33, 4, 2, 16), torch.float32, "contiguous", {}, False, id="float32"),
    pytest.param((1, 33, 17, 6, 2, 16), torch.float32, "contiguous", {"causal": True}, True, id="causal_deterministic"),
    pytest.param(
        (2, 17, 33, 5, 1, 32),
        torch.float64,
        "kv_strides_differ",
        {"window_left": 4, "window_right": 2, "softcap": 2.0, "softmax_scale": 0.3},
        False,
        id="noncontiguous_options",
    ),
    pytest.param((1, 17, 33, 8, 1, 16), torch.bfloat16, "sliced", {"softcap": 1.0}, False, id="bfloat16_sliced"),
    pytest.param((2, 0, 9, 4, 2, 16), torch.float32, "contiguous", {}, False, id="empty_queries"),
]


@pytest.mark.parametrize("shape, dtype, kind, options, deterministic", BACKWARD_SAMPLES)
def test_opcheck_backward(shape, dtype, kind, options, deterministic):
    q, k, v = make_qkv(*shape, dtype, kind=kind)
    out, lse = torch.ops.gqa.forward(q, k, v, **options)
    dout = torch.randn(q.shape, dtype=dtype)
    torch.library.opcheck(
        torch.ops.gqa.backward.default,
        (dout, q, k, v, out, lse),
        {**options, "deterministic": deterministic},
    )
