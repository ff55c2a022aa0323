"""Gradients of gqa_ext against autograd through the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import GROUP_CASES, NONCONTIGUOUS_KINDS, OPTION_CASES, TOLERANCE, assert_rel_close, make_qkv

import gqa_ext
from gqa_ext.reference import attention_ref, visible_mask


def leaves(*tensors):
    """The same values and strides, as leaves that require grad."""
    return tuple(t.detach().requires_grad_() for t in tensors)


def check_backward(q, k, v, dout=None, **options):
    """Autograd through torch.ops.gqa.forward vs through attention_ref; returns (dq, dk, dv)."""
    q, k, v = leaves(q, k, v)
    out, lse = torch.ops.gqa.forward(q, k, v, **options)
    if dout is None:
        dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = leaves(*(t.double() for t in (q, k, v)))
    ref_out, _ = attention_ref(q64, k64, v64, **options)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    for name, g, ref, t in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v), strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape
        if ref.any():
            assert_rel_close(g, ref, q.dtype, name)
        else:
            # Exactly 0 by cancellation (e.g. Sk = 1: the softmax is constant),
            # so the kernel's rounding is measured against dv's scale instead.
            assert g.abs().max() <= TOLERANCE[q.dtype] * ref_grads[2].abs().max(), name
    return grads


@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
def test_backward_group_sizes(heads_q, heads_kv):
    q, k, v = make_qkv(1, 130, 300, heads_q, heads_kv, 64)
    check_backward(q, k, v)


@pytest.mark.parametrize("heads_q, heads_kv", [pytest.param(10, 2, id="group5"), pytest.param(7, 1, id="mqa_group7")])
def test_backward_group_sizes_causal_query_longer(heads_q, heads_kv):
    q, k, v = make_qkv(2, 300, 130, heads_q, heads_kv, 32)
    check_backward(q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [32, 80, 128, 256])
def test_backward_head_dims(head_dim):
    q, k, v = make_qkv(1, 130, 300, 8, 2, head_dim)
    check_backward(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [1, 17, 65])
def test_backward_odd_head_dims(head_dim, dtype):
    q, k, v = make_qkv(1, 130, 300, 4, 2, head_dim, dtype)
    check_backward(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("options", [{}, {"causal": True, "softcap": 5.0}], ids=["plain", "causal_softcap"])
def test_backward_dtypes(dtype, options):
    q, k, v = make_qkv(2, 130, 300, 10, 2, 64, dtype)
    check_backward(q, k, v, **options)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "seqlen_q, seqlen_k", [(1, 1), (1, 517), (17, 300), (300, 17), (130, 130), (517, 130), (130, 1100), (33, 1)]
)
def test_backward_seqlens(seqlen_q, seqlen_k, causal):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 5, 1, 32)
    check_backward(q, k, v, causal=causal)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(130, 300), (300, 130)])
@pytest.mark.parametrize("options", OPTION_CASES)
def test_backward_options(options, seqlen_q, seqlen_k):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 8, 2, 32)
    check_backward(q, k, v, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_backward_options_other_dtypes(dtype):
    q, k, v = make_qkv(1, 300, 517, 10, 2, 64, dtype)
    check_backward(q, k, v, softcap=0.5, softmax_scale=0.5, window_left=50, window_right=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", NONCONTIGUOUS_KINDS)
def test_backward_noncontiguous_inputs(kind, dtype):
    q, k, v = make_qkv(2, 130, 300, 8, 2, 64, dtype, kind=kind)
    # Same gradients as from contiguous copies of the same values.
    dout = torch.randn(q.shape, dtype=dtype)
    grads = check_backward(q, k, v, dout, causal=True, window_left=100)
    grads_c = check_backward(q.contiguous(), k.contiguous(), v.contiguous(), dout, causal=True, window_left=100)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g, g_c)


@pytest.mark.parametrize("dout_kind", ["bhsd_transposed", "last_dim_strided", "expanded"])
def test_backward_noncontiguous_grad_output(dout_kind):
    q, k, v = make_qkv(2, 130, 300, 8, 2, 64)
    shape = q.shape
    if dout_kind == "bhsd_transposed":
        dout = torch.randn(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2)
    elif dout_kind == "last_dim_strided":
        dout = torch.randn(*shape[:3], 2 * shape[3])[..., ::2]
    else:
        dout = torch.randn(1, 1, shape[2], shape[3]).expand(shape)
    assert not dout.is_contiguous()
    grads = check_backward(q, k, v, dout, causal=True)
    grads_c = check_backward(q, k, v, dout.contiguous(), causal=True)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g, g_c)


def test_backward_through_bhsd_layout():
    q, k, v = leaves(*make_qkv(2, 130, 300, 8, 2, 64, kind="bhsd"))
    out = gqa_ext.attention(q, k, v, layout="bhsd", causal=True, softcap=3.0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = check_backward(*(t.transpose(1, 2) for t in (q, k, v)), dout.transpose(1, 2), causal=True, softcap=3.0)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.shape == ref.transpose(1, 2).shape
        torch.testing.assert_close(g, ref.transpose(1, 2))


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_backward_thread_counts(threads, num_threads):
    # The backward splits the key tiles of each (batch, KV head) into chunks
    # by thread count and sums their dQ parts; 5 key tiles over 3 or 5
    # threads gives uneven and single-tile chunks.
    num_threads(threads)
    q, k, v = make_qkv(1, 130, 517, 5, 1, 32)
    check_backward(q, k, v, window_left=200, window_right=3)


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, options",
    [
        (300, 130, {"causal": True}),
        (130, 300, {"window_left": 10, "window_right": 0}),
        (517, 17, {"window_left": 5, "window_right": 100}),
    ],
    ids=["causal_query_longer", "window_keys_unseen", "window_both"],
)
def test_backward_rows_without_keys_give_zero_gradients(seqlen_q, seqlen_k, options):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 8, 2, 32)
    dq, dk, dv = check_backward(q, k, v, **options)
    mask = visible_mask(seqlen_q, seqlen_k, **options)
    empty_rows, unseen_keys = ~mask.any(dim=1), ~mask.any(dim=0)
    assert empty_rows.any() or unseen_keys.any()
    assert (dq[:, empty_rows] == 0).all()
    assert (dk[:, unseen_keys] == 0).all() and (dv[:, unseen_keys] == 0).all()
    # A row that sees a single key has dq = 0 too (its softmax is constant).
    assert (dq[:, mask.sum(dim=1) > 1].abs().sum(dim=-1) > 0).all()
    assert (dv[:, ~unseen_keys].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize(
    "batch, seqlen_q, seqlen_k", [(0, 17, 33), (2, 0, 33), (2, 17, 0), (0, 0, 0)], ids=["B0", "Sq0", "Sk0", "all0"]
)
def test_backward_zero_size(batch, seqlen_q, seqlen_k):
    q, k, v = leaves(*make_qkv(batch, seqlen_q, seqlen_k, 4, 2, 32))
    out = gqa_ext.attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


GRADCHECK_CASES = [
    pytest.param(5, 7, {}, id="plain"),
    pytest.param(5, 7, {"causal": True}, id="causal"),
    pytest.param(7, 4, {"causal": True}, id="causal_query_longer"),
    pytest.param(6, 9, {"window": (2, 1)}, id="window"),
    pytest.param(6, 9, {"softcap": 1.5, "softmax_scale": 0.8}, id="softcap_scale"),
    pytest.param(6, 9, {"causal": True, "window": (3, 0), "softcap": 2.0}, id="causal_window_softcap"),
]


@pytest.mark.parametrize("seqlen_q, seqlen_k, options", GRADCHECK_CASES)
def test_gradcheck(seqlen_q, seqlen_k, options):
    q, k, v = leaves(*make_qkv(2, seqlen_q, seqlen_k, 6, 2, 8, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: gqa_ext.attention(q, k, v, **options), (q, k, v))


def test_gradcheck_bhsd_layout_noncontiguous():
    q, k, v = leaves(*make_qkv(1, 5, 7, 4, 1, 8, torch.float64, kind="bhsd"))
    assert torch.autograd.gradcheck(
        lambda q, k, v: gqa_ext.attention(q, k, v, layout="bhsd", window=(2, -1)), (q, k, v)
    )


def run_backward_op(q, k, v, dout, deterministic, **options):
    out, lse = torch.ops.gqa.forward(q, k, v, **options)
    return torch.ops.gqa.backward(dout, q, k, v, out, lse, **options, deterministic=deterministic)


@pytest.mark.parametrize("threads", [2, 4])
def test_backward_deterministic_is_bitwise_repeatable(threads, num_threads):
    num_threads(threads)
    q, k, v = make_qkv(1, 130, 517, 10, 1, 64)
    dout = torch.randn(q.shape)
    first = run_backward_op(q, k, v, dout, True, window_left=200)
    for _ in range(2):
        again = run_backward_op(q, k, v, dout, True, window_left=200)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


def test_backward_bitwise_repeatable_under_use_deterministic_algorithms(num_threads):
    num_threads(4)
    q, k, v = leaves(*make_qkv(1, 130, 517, 10, 2, 64))
    dout = torch.randn(q.shape)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(gqa_ext.attention(q, k, v, softcap=3.0), (q, k, v), dout) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(saved)
    for again in runs[1:]:
        for a, b in zip(runs[0], again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_op_equals_autograd(deterministic):
    options = {"causal": True, "window_left": 64, "softcap": 2.0, "softmax_scale": 0.2}
    q, k, v = leaves(*make_qkv(2, 300, 130, 10, 2, 32))
    dout = torch.randn(q.shape)
    grads_autograd = torch.autograd.grad(torch.ops.gqa.forward(q, k, v, **options)[0], (q, k, v), dout)
    with torch.no_grad():
        grads_op = run_backward_op(q, k, v, dout, deterministic, **options)
    for a, b in zip(grads_autograd, grads_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_op_accepts_noncontiguous_out_and_lse():
    q, k, v = make_qkv(2, 130, 300, 8, 2, 32)
    dout = torch.randn(q.shape)
    out, lse = torch.ops.gqa.forward(q, k, v, causal=True)
    expected = torch.ops.gqa.backward(dout, q, k, v, out, lse, causal=True)
    # The same values under other strides.
    out_nc = out.transpose(1, 2).contiguous().transpose(1, 2)
    lse_nc = lse.transpose(1, 2).contiguous().transpose(1, 2)
    dout_nc = dout.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (out_nc.is_contiguous() or lse_nc.is_contiguous() or dout_nc.is_contiguous())
    got = torch.ops.gqa.backward(dout_nc, q, k, v, out_nc, lse_nc, causal=True)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attention_lse_does_not_require_grad():
    q, k, v = leaves(*make_qkv(1, 17, 33, 4, 2, 32))
    out, lse = gqa_ext.attention(q, k, v, return_lse=True)
    assert out.requires_grad
    assert not lse.requires_grad and lse.grad_fn is None
    # A loss that also reads lse still gets gradients through out only.
    (out.sum() + lse.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_does_not_modify_inputs(dtype):
    q, k, v = make_qkv(2, 130, 300, 8, 2, 64, dtype, kind="kv_strides_differ")
    out, lse = torch.ops.gqa.forward(q, k, v, causal=True, softcap=2.0)
    dout = torch.randn(q.shape, dtype=dtype)
    tensors = [dout, q, k, v, out, lse]
    bases = [t if t._base is None else t._base for t in tensors]
    saved = [b.clone() for b in bases]
    torch.ops.gqa.backward(*tensors, causal=True, softcap=2.0)
    for b, s in zip(bases, saved, strict=True):
        assert torch.equal(b, s)


def test_double_backward_raises():
    q, k, v = leaves(*make_qkv(1, 5, 7, 2, 1, 8, dtype=torch.float64))
    (dq,) = torch.autograd.grad(gqa_ext.attention(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward\) are not supported"):
        torch.autograd.grad(dq.sum(), q)
