"""torch.ops.gqa.forward and gqa_ext.attention against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    GROUP_CASES,
    NONCONTIGUOUS_KINDS,
    OPTION_CASES,
    assert_lse_close,
    assert_rel_close,
    default_scale,
    make_qkv,
)

import gqa_ext
from gqa_ext.reference import attention_ref, visible_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def check_forward(q, k, v, **options):
    """Runs the op, checks out and lse against the reference; returns (out, lse)."""
    out, lse = torch.ops.gqa.forward(q, k, v, **options)
    ref_out, ref_lse = attention_ref(q, k, v, **options)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_rel_close(out, ref_out, q.dtype, "out")
    assert_lse_close(lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
def test_forward_group_sizes(heads_q, heads_kv, dtype):
    q, k, v = make_qkv(2, 130, 300, heads_q, heads_kv, 64, dtype)
    check_forward(q, k, v)


@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
def test_forward_group_sizes_causal_query_longer(heads_q, heads_kv):
    q, k, v = make_qkv(1, 300, 130, heads_q, heads_kv, 32)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
def test_forward_head_dims(head_dim, dtype):
    q, k, v = make_qkv(1, 130, 300, 8, 2, head_dim, dtype)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [1, 3, 17, 65])
def test_forward_odd_head_dims(head_dim, dtype):
    q, k, v = make_qkv(1, 130, 517, 4, 2, head_dim, dtype)
    check_forward(q, k, v, window_left=300)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_dtypes(dtype, causal):
    q, k, v = make_qkv(2, 130, 300, 10, 2, 64, dtype)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "seqlen_q, seqlen_k",
    [(1, 1), (1, 517), (1, 1100), (17, 300), (300, 17), (130, 130), (300, 517), (517, 130), (130, 1100), (33, 1)],
)
def test_forward_seqlens(seqlen_q, seqlen_k, causal):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 5, 1, 32)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(130, 300), (300, 130)])
@pytest.mark.parametrize("options", OPTION_CASES)
def test_forward_options(options, seqlen_q, seqlen_k):
    q, k, v = make_qkv(1, seqlen_q, seqlen_k, 8, 2, 64)
    check_forward(q, k, v, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {"causal": True, "window_left": 20},
        {"softcap": 0.5, "softmax_scale": 0.5, "window_left": 50, "window_right": 7},
    ],
    ids=["causal_window", "softcap_scale_window"],
)
def test_forward_options_half_precision(options, dtype):
    q, k, v = make_qkv(1, 300, 1100, 10, 2, 64, dtype)
    check_forward(q, k, v, **options)


def test_forward_causal_equals_window_right_zero():
    q, k, v = make_qkv(1, 130, 300, 8, 2, 64)
    out_causal, lse_causal = torch.ops.gqa.forward(q, k, v, causal=True, window_left=40)
    out_window, lse_window = torch.ops.gqa.forward(q, k, v, window_left=40, window_right=0)
    torch.testing.assert_close(out_causal, out_window, rtol=0, atol=0)
    torch.testing.assert_close(lse_causal, lse_window, rtol=0, atol=0)


def test_forward_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 17, 300, 4, 2, 80)
    out, lse = torch.ops.gqa.forward(q, k, v)
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=default_scale(80))
    assert_rel_close(out, ref_out, torch.float32, "out")
    assert_lse_close(lse, ref_lse)


def test_forward_online_softmax_rescales_across_key_tiles():
    # Scores grow with the key index (up to ~25 above the noise), so every
    # later K/V tile raises the row maximum and the running sums must be
    # rescaled; without the max shift, exp would also lose all precision.
    q, k, v = make_qkv(1, 130, 1100, 8, 2, 64)
    q[..., 0] = 1.0
    k[..., 0] = torch.linspace(0, 200, 1100).view(1, 1100, 1)
    check_forward(q, k, v)
    check_forward(q, k, v, causal=True, window_left=300)


@pytest.mark.parametrize("threads", [1, 3])
def test_forward_thread_counts(threads, num_threads):
    num_threads(threads)
    q, k, v = make_qkv(2, 300, 517, 10, 2, 32)
    check_forward(q, k, v, window_left=100, window_right=30)


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, options",
    [
        (300, 130, {"causal": True}),
        (517, 17, {"window_left": 5, "window_right": 100}),
        (517, 130, {"window_left": 0, "window_right": 0}),
        (300, 130, {"causal": True, "softcap": 2.0, "window_left": 3}),
    ],
    ids=["causal_query_longer", "window_both", "window_zero", "causal_softcap_window"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_rows_without_keys_give_zero_and_neg_inf(seqlen_q, seqlen_k, options, dtype):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 8, 2, 32, dtype)
    out, lse = check_forward(q, k, v, **options)
    mask = visible_mask(seqlen_q, seqlen_k, **{n: options[n] for n in options if n != "softcap"})
    empty = ~mask.any(dim=1)
    assert 0 < empty.sum() < seqlen_q, "the case must have rows with and without keys"
    assert (out[:, empty] == 0).all()
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    assert (out[:, ~empty].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", NONCONTIGUOUS_KINDS)
def test_forward_noncontiguous_inputs(kind, dtype):
    q, k, v = make_qkv(2, 130, 300, 8, 2, 64, dtype, kind=kind)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    out, lse = check_forward(q, k, v, causal=True, window_left=100)
    # Same result as on contiguous copies of the same values.
    out_c, lse_c = torch.ops.gqa.forward(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, window_left=100)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)


def test_forward_packed_qkv():
    # One (B, S, Hq + 2 Hkv, D) projection split into q, k and v.
    qkv = torch.randn(2, 130, 8 + 2 + 2, 64)
    q, k, v = qkv.split([8, 2, 2], dim=2)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("options", [{}, {"causal": True, "softcap": 3.0, "window_left": 40}], ids=["plain", "options"])
def test_attention_bhsd_layout_matches_bshd(options):
    q, k, v = make_qkv(2, 130, 300, 8, 2, 64, kind="bhsd")
    window = (options.get("window_left", -1), -1)
    kwargs = {"causal": options.get("causal", False), "softcap": options.get("softcap", 0.0), "window": window}
    out_bhsd, lse_bhsd = gqa_ext.attention(q, k, v, layout="bhsd", return_lse=True, **kwargs)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out_bshd, lse_bshd = gqa_ext.attention(qt, kt, vt, layout="bshd", return_lse=True, **kwargs)
    assert out_bhsd.shape == q.shape
    torch.testing.assert_close(out_bhsd, out_bshd.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(lse_bhsd, lse_bshd, rtol=0, atol=0)
    ref_out, ref_lse = attention_ref(qt, kt, vt, **options)
    assert_rel_close(out_bhsd.transpose(1, 2), ref_out, torch.float32, "out")
    assert_lse_close(lse_bhsd, ref_lse)


def test_attention_api_passes_options_to_op():
    q, k, v = make_qkv(1, 300, 130, 8, 2, 64)
    out, lse = gqa_ext.attention(q, k, v, causal=True, softmax_scale=0.2, window=(30, -1), softcap=4.0, return_lse=True)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, softmax_scale=0.2, window_left=30, softcap=4.0)
    assert_rel_close(out, ref_out, torch.float32, "out")
    assert_lse_close(lse, ref_lse)
    only_out = gqa_ext.attention(q, k, v, window=[10, 3])
    assert isinstance(only_out, torch.Tensor)
    assert_rel_close(only_out, attention_ref(q, k, v, window_left=10, window_right=3)[0], torch.float32, "out")


@pytest.mark.parametrize(
    "batch, seqlen_q, seqlen_k", [(0, 17, 33), (2, 0, 33), (2, 17, 0), (0, 0, 0)], ids=["B0", "Sq0", "Sk0", "all0"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_zero_size(batch, seqlen_q, seqlen_k, dtype):
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, 4, 2, 32, dtype)
    out, lse = torch.ops.gqa.forward(q, k, v, causal=True)
    assert out.shape == (batch, seqlen_q, 4, 32) and out.dtype == dtype
    assert lse.shape == (batch, 4, seqlen_q) and lse.dtype == torch.float32
    assert (out == 0).all()
    assert torch.isneginf(lse).all()
    out_api = gqa_ext.attention(q, k, v)
    assert out_api.shape == q.shape and (out_api == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["contiguous", "sliced", "kv_strides_differ"])
def test_forward_does_not_modify_inputs(kind, dtype):
    q, k, v = make_qkv(2, 130, 300, 8, 2, 64, dtype, kind=kind)
    # Compare the whole storage, so writes outside the views are caught too.
    bases = [t if t._base is None else t._base for t in (q, k, v)]
    saved = [b.clone() for b in bases]
    torch.ops.gqa.forward(q, k, v, causal=True, softcap=2.0, window_left=64)
    for b, s in zip(bases, saved, strict=True):
        assert torch.equal(b, s)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "seqlen_q, options",
    [
        (1, {}),
        (1, {"window_left": 700, "window_right": 0}),
        (3, {"causal": True, "softcap": 4.0}),
        (2, {"window_left": 0, "window_right": 0}),  # one key: most splits see nothing
    ],
    ids=["decode", "decode_window", "causal_softcap", "single_key"],
)
def test_forward_split_kv(threads, dtype, seqlen_q, options, num_threads):
    # One (batch, KV head) task and more threads: the kernel splits the key
    # tiles (512 keys each) across threads and merges the parts.
    num_threads(threads)
    q, k, v = make_qkv(1, seqlen_q, 1537, 7, 1, 64, dtype)
    out, lse = check_forward(q, k, v, **options)
    again, lse_again = torch.ops.gqa.forward(q, k, v, **options)
    assert torch.equal(out, again) and torch.equal(lse, lse_again)
