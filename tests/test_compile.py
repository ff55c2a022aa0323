"""torch.compile(fullgraph=True) through gqa_ext.attention, forward and backward.

Compiling is slow on a small machine, so this file compiles three times in all.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import make_qkv

import gqa_ext


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def forward_backward(fn, q, k, v, dout):
    """fn's output and the gradients of (output * dout).sum() for q, k, v."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    lse = None
    if isinstance(out, tuple):
        out, lse = out
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse, grads


def assert_same_results(got, expected):
    (out, lse, grads), (out_e, lse_e, grads_e) = got, expected
    torch.testing.assert_close(out, out_e)
    if lse_e is not None:
        torch.testing.assert_close(lse, lse_e)
    for g, g_e in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, g_e)


def test_compile_fullgraph_inductor_forward_backward_matches_eager():
    def fn(q, k, v):
        return gqa_ext.attention(q * 0.5, k, v, causal=True, window=(40, -1), softcap=5.0) * 2.0

    q, k, v = make_qkv(2, 130, 300, 10, 2, 32)
    dout = torch.randn(q.shape)
    expected = forward_backward(fn, q, k, v, dout)
    got = forward_backward(torch.compile(fn, fullgraph=True), q, k, v, dout)
    assert_same_results(got, expected)


def test_compile_fullgraph_bhsd_layout_and_lse_matches_eager():
    def fn(q, k, v):
        return gqa_ext.attention(q, k, v, layout="bhsd", softmax_scale=0.3, window=(5, 2), return_lse=True)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    q, k, v = make_qkv(1, 17, 33, 8, 1, 64, kind="bhsd")
    dout = torch.randn(q.shape)
    got = forward_backward(compiled, q, k, v, dout)
    assert_same_results(got, forward_backward(fn, q, k, v, dout))
    assert got[1].shape == (1, 8, 17) and not got[1].requires_grad
    assert counter.frame_count == 1


def test_compile_dynamic_does_not_recompile_for_new_seqlen():
    def fn(q, k, v):
        return gqa_ext.attention(q, k, v, causal=True)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    # Sq < Sk first, then longer sequences with Sq > Sk. Sizes all differ, so
    # that dynamo's duck sizing does not tie Sq and Sk (or B and Hkv) together.
    compiles = []
    for seqlen_q, seqlen_k in [(17, 33), (130, 300), (300, 130)]:
        q, k, v = make_qkv(3, seqlen_q, seqlen_k, 8, 2, 32)
        dout = torch.randn(q.shape)
        got = forward_backward(compiled, q, k, v, dout)
        assert_same_results(got, forward_backward(fn, q, k, v, dout))
        compiles.append(counter.frame_count)
    # The first call may take two backend calls (dynamo restarts the analysis
    # once to turn the float softcap into a tensor); later calls take none.
    assert compiles[0] >= 1
    assert compiles[1:] == [compiles[0]] * 2, f"recompiled for a new sequence length: {compiles}"
