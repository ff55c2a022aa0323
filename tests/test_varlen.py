"""Packed sequences: torch.ops.gqa.forward_varlen, backward_varlen and gqa_ext.attention_varlen.

Every sequence is checked against the float64 reference on that sequence
alone (gqa_ext.reference.attention_varlen_ref). The batches are ragged and
hold sequences with no queries or no keys, Sq < Sk and Sq > Sk side by side.
The lengths run both CPU kernels: the decode kernel (max_seqlen_q * G <= 16,
keys in chunks of 8, splits of >= 256 keys) and the tile kernel (256 rows by
256 keys), ending off their multiples (and off the CUDA tiles' 64/128 rows by
16/64/128 keys).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest
import torch
from conftest import (
    DEVICES,
    GROUP_CASES,
    LSE_ATOL,
    LSE_RTOL,
    OPTION_CASES,
    TOLERANCE,
    api_kwargs,
    assert_lse_close,
    assert_rel_close,
    default_dtype,
    rel_err,
    skip_unsupported,
)

import gqa_ext
from gqa_ext.reference import attention_varlen_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (seqlens_q, seqlens_k), one entry per sequence.
LENGTH_CASES = [
    # One query per sequence (max_seqlen_q * G <= 16 up to G = 16): the CPU
    # decode kernel; 517 and 1100 keys make it split the key range.
    pytest.param([1, 0, 1, 1, 1], [517, 9, 0, 1, 1100], id="decode"),
    # A few queries, Sq > Sk in some sequences: the decode kernel up to G = 5.
    pytest.param([2, 1, 0, 3, 3, 1], [300, 2, 7, 1, 33, 0], id="speculative"),
    # The tile kernel: more rows than a 256-row tile, more keys than a 256-key
    # tile, Sq > Sk, an empty sequence.
    pytest.param([70, 0, 1, 17, 260, 20], [100, 5, 0, 17, 40, 300], id="tile"),
]


# The backward's ragged batch: a sequence of more than 128 rows, one of more
# than 256 keys, Sq > Sk, Sq < Sk, empty sequences.
BACKWARD_LENGTHS = ([40, 0, 1, 17, 130, 5], [70, 5, 0, 17, 40, 300])


class Varlen(NamedTuple):
    """The op's tensor arguments: packed q, k, v, the offsets, the maximum lengths."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def cu_seqlens(seqlens: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(B + 1,) int32 offsets of sequences with these lengths."""
    offsets = [0]
    for n in seqlens:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def make_varlen(
    seqlens_q: list[int],
    seqlens_k: list[int],
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    kind: str = "contiguous",
    device: torch.device | str = "cpu",
) -> Varlen:
    """Random packed q (Tq, Hq, D) and k, v (Tk, Hkv, D) on ``device``, standard normal.

    ``kind``: ``"contiguous"``; ``"sliced"`` (slices of bigger tensors: a
    storage offset, padded rows and heads); ``"packed_qkv"`` (q, k and v split
    from one (T, Hq + 2 Hkv, D) projection; needs seqlens_q == seqlens_k).
    """
    total_q, total_k = sum(seqlens_q), sum(seqlens_k)

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    if kind == "contiguous":
        q, k, v = (
            randn(total_q, heads_q, head_dim),
            randn(total_k, heads_kv, head_dim),
            randn(total_k, heads_kv, head_dim),
        )
    elif kind == "sliced":
        q, k, v = (
            randn(t + 3, h + 2, head_dim + 8)[2 : 2 + t, 1 : 1 + h, 4 : 4 + head_dim]
            for t, h in ((total_q, heads_q), (total_k, heads_kv), (total_k, heads_kv))
        )
    elif kind == "packed_qkv":
        assert seqlens_q == seqlens_k
        q, k, v = randn(total_q, heads_q + 2 * heads_kv, head_dim).split([heads_q, heads_kv, heads_kv], dim=1)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return Varlen(
        q,
        k,
        v,
        cu_seqlens(seqlens_q, device),
        cu_seqlens(seqlens_k, device),
        max(seqlens_q, default=0),
        max(seqlens_k, default=0),
    )


def forward_varlen(x: Varlen, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's (out, lse), with the properties every output must have checked."""
    out, lse = torch.ops.gqa.forward_varlen(*x, **options)
    total_q, heads_q, head_dim = x.q.shape
    assert out.device == x.q.device and lse.device == x.q.device
    assert out.dtype == x.q.dtype and lse.dtype == torch.float32
    assert out.shape == (total_q, heads_q, head_dim)
    assert lse.shape == (heads_q, total_q)
    return out, lse


def check_varlen(x: Varlen, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs forward_varlen and checks out and lse against the reference; returns (out, lse)."""
    out, lse = forward_varlen(x, **options)
    ref_out, ref_lse = attention_varlen_ref(x.q, x.k, x.v, x.cu_seqlens_q, x.cu_seqlens_k, **options)
    assert_rel_close(out, ref_out, x.q.dtype, "out")
    assert_lse_close(lse, ref_lse.to(lse.device))
    return out, lse


def sequences(x: Varlen):
    """(b, rows of q, rows of k) for every sequence b."""
    cq, ck = x.cu_seqlens_q.tolist(), x.cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        yield b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])


# -- forward ----------------------------------------------------------------


@pytest.mark.parametrize("seqlens_q, seqlens_k", LENGTH_CASES)
@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_group_sizes(device, heads_q, heads_kv, seqlens_q, seqlens_k):
    x = make_varlen(seqlens_q, seqlens_k, heads_q, heads_kv, 64, default_dtype(device), device=device)
    check_varlen(x, causal=True)


@pytest.mark.parametrize("seqlens_q, seqlens_k", LENGTH_CASES)
@pytest.mark.parametrize("options", OPTION_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_options(device, options, seqlens_q, seqlens_k):
    x = make_varlen(seqlens_q, seqlens_k, 8, 2, 64, default_dtype(device), device=device)
    check_varlen(x, **options)


@pytest.mark.parametrize("seqlens_q, seqlens_k", LENGTH_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_dtypes(device, dtype, seqlens_q, seqlens_k):
    skip_unsupported(device, dtype)
    x = make_varlen(seqlens_q, seqlens_k, 10, 2, 64, dtype, device=device)
    check_varlen(x, causal=True, window_left=200, softcap=4.0)


@pytest.mark.parametrize("head_dim", [1, 17, 80, 128, 256])
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_head_dims(device, head_dim):
    x = make_varlen([3, 0, 70, 1], [40, 5, 200, 0], 4, 2, head_dim, default_dtype(device), device=device)
    check_varlen(x, causal=True)


@pytest.mark.parametrize("seqlens_q, seqlens_k", LENGTH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_each_sequence_equals_forward_alone(device, dtype, seqlens_q, seqlens_k):
    skip_unsupported(device, dtype)
    options = {"causal": True, "window_left": 100, "softcap": 3.0}
    x = make_varlen(seqlens_q, seqlens_k, 8, 2, 64, dtype, device=device)
    out, lse = forward_varlen(x, **options)
    for b, rows_q, rows_k in sequences(x):
        alone_out, alone_lse = torch.ops.gqa.forward(
            x.q[rows_q].unsqueeze(0), x.k[rows_k].unsqueeze(0), x.v[rows_k].unsqueeze(0), **options
        )
        err = rel_err(out[rows_q], alone_out[0])
        assert err <= TOLERANCE[dtype], f"sequence {b}: out differs from gqa.forward's by {err:.3g} (relative)"
        seq_lse, alone = lse[:, rows_q], alone_lse[0]
        assert torch.equal(torch.isneginf(seq_lse), torch.isneginf(alone)), f"sequence {b}: lse -inf rows differ"
        finite = ~torch.isneginf(alone)
        torch.testing.assert_close(seq_lse[finite], alone[finite], atol=LSE_ATOL, rtol=LSE_RTOL)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_empty_sequences_give_zero_and_neg_inf(device):
    # Sequence 1 has queries and no keys; sequence 3's first queries see no
    # key (causal, Sq > Sk); sequence 2 has keys and no queries.
    x = make_varlen([4, 3, 0, 5], [6, 0, 9, 2], 8, 2, 32, default_dtype(device), device=device)
    out, lse = check_varlen(x, causal=True)
    no_keys = torch.zeros(x.q.shape[0], dtype=torch.bool)
    no_keys[4:7] = True  # sequence 1
    no_keys[7:10] = True  # sequence 3, queries 0-2 (bottom-right: queries 3, 4 see keys 0, 1)
    no_keys = no_keys.to(device)
    assert (out[no_keys] == 0).all()
    assert torch.isneginf(lse[:, no_keys]).all()
    assert torch.isfinite(lse[:, ~no_keys]).all()
    assert (out[~no_keys].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_larger_max_seqlen_gives_same_result(device):
    # max_seqlen_* only bound the lengths; larger values change nothing.
    x = make_varlen([3, 0, 70, 1], [40, 5, 200, 0], 8, 2, 64, default_dtype(device), device=device)
    out, lse = check_varlen(x, causal=True)
    bigger = x._replace(max_seqlen_q=x.max_seqlen_q + 300, max_seqlen_k=x.max_seqlen_k + 1000)
    out_b, lse_b = check_varlen(bigger, causal=True)
    assert rel_err(out_b, out) <= TOLERANCE[x.q.dtype]
    torch.testing.assert_close(lse_b, lse, atol=LSE_ATOL, rtol=LSE_RTOL)


@pytest.mark.parametrize("kind", ["sliced", "packed_qkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_noncontiguous_inputs(device, dtype, kind):
    skip_unsupported(device, dtype)
    lengths = [130, 0, 1, 17, 65]
    x = make_varlen(lengths, lengths, 8, 2, 64, dtype, kind=kind, device=device)
    assert not (x.q.is_contiguous() or x.k.is_contiguous() or x.v.is_contiguous())
    out, lse = check_varlen(x, causal=True, window_left=50)
    # The same as on contiguous copies of the same values.
    contiguous = x._replace(q=x.q.contiguous(), k=x.k.contiguous(), v=x.v.contiguous())
    out_c, lse_c = forward_varlen(contiguous, causal=True, window_left=50)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)


@pytest.mark.parametrize("threads", [1, 3])
def test_varlen_thread_counts(threads, num_threads):
    num_threads(threads)
    x = make_varlen([70, 0, 1, 17, 260, 20], [100, 5, 0, 17, 40, 300], 10, 2, 32)
    check_varlen(x, window_left=100, window_right=30)
    x = make_varlen([1, 0, 1, 1], [1100, 3, 0, 517], 10, 2, 32)
    check_varlen(x, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_does_not_modify_inputs(device):
    x = make_varlen([3, 0, 70, 1], [40, 5, 200, 0], 8, 2, 64, default_dtype(device), kind="sliced", device=device)
    bases = [t if t._base is None else t._base for t in x[:5]]
    saved = [b.clone() for b in bases]
    forward_varlen(x, causal=True, softcap=2.0)
    for b, s in zip(bases, saved, strict=True):
        assert torch.equal(b, s)


@pytest.mark.parametrize(
    "seqlens_q, seqlens_k",
    [([], []), ([0, 0], [0, 0]), ([0, 0, 0], [5, 0, 2]), ([3, 2], [0, 0])],
    ids=["B0", "all_empty", "no_queries", "no_keys"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_varlen_zero_size(device, seqlens_q, seqlens_k):
    x = make_varlen(seqlens_q, seqlens_k, 4, 2, 32, default_dtype(device), device=device)
    out, lse = forward_varlen(x, causal=True)
    assert (out == 0).all()
    assert torch.isneginf(lse).all()
    out_api = gqa_ext.attention_varlen(*x)
    assert out_api.shape == x.q.shape and (out_api == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_varlen_api_passes_options_to_op(device):
    x = make_varlen([3, 0, 70, 1], [40, 5, 20, 0], 8, 2, 64, default_dtype(device), device=device)
    options = {"causal": True, "softmax_scale": 0.2, "window_left": 30, "softcap": 4.0}
    out, lse = gqa_ext.attention_varlen(*x, return_lse=True, **api_kwargs(options))
    ref_out, ref_lse = attention_varlen_ref(x.q, x.k, x.v, x.cu_seqlens_q, x.cu_seqlens_k, **options)
    assert_rel_close(out, ref_out, x.q.dtype, "out")
    assert_lse_close(lse, ref_lse)
    only_out = gqa_ext.attention_varlen(*x, window=[10, 3])
    assert isinstance(only_out, torch.Tensor)
    ref_only = attention_varlen_ref(x.q, x.k, x.v, x.cu_seqlens_q, x.cu_seqlens_k, window_left=10, window_right=3)
    assert_rel_close(only_out, ref_only[0], x.q.dtype, "out")


# -- backward (CPU: there is no CUDA backward) -------------------------------


def leaves(x: Varlen) -> Varlen:
    """The same values and strides, q, k, v as leaves that require grad."""
    return x._replace(**{n: getattr(x, n).detach().requires_grad_() for n in ("q", "k", "v")})


def check_varlen_backward(x: Varlen, dout: torch.Tensor | None = None, **options):
    """Autograd through gqa_ext.attention_varlen vs through the reference; returns (dq, dk, dv)."""
    x = leaves(x)
    out = gqa_ext.attention_varlen(*x, **api_kwargs(options))
    if dout is None:
        dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x.q, x.k, x.v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (x.q, x.k, x.v))
    ref_out, _ = attention_varlen_ref(q64, k64, v64, x.cu_seqlens_q, x.cu_seqlens_k, **options)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    for name, g, ref, t in zip(("dq", "dk", "dv"), grads, ref_grads, (x.q, x.k, x.v), strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        if ref.any():
            assert_rel_close(g, ref, t.dtype, name)
        else:
            # Exactly 0 by cancellation (every row sees one key at most), so
            # the rounding is measured against dv's scale instead.
            assert g.abs().max() <= TOLERANCE[t.dtype] * ref_grads[2].abs().max(), name
    return grads


@pytest.mark.parametrize("seqlens_q, seqlens_k", [LENGTH_CASES[1], pytest.param(*BACKWARD_LENGTHS, id="ragged")])
@pytest.mark.parametrize("options", OPTION_CASES)
def test_varlen_backward_options(options, seqlens_q, seqlens_k):
    x = make_varlen(seqlens_q, seqlens_k, 4, 2, 32)
    check_varlen_backward(x, **options)


@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
def test_varlen_backward_group_sizes(heads_q, heads_kv):
    x = make_varlen(*BACKWARD_LENGTHS, heads_q, heads_kv, 32)
    check_varlen_backward(x, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_backward_dtypes(dtype):
    x = make_varlen(*BACKWARD_LENGTHS, 10, 2, 64, dtype)
    check_varlen_backward(x, causal=True, softcap=5.0)


@pytest.mark.parametrize("head_dim", [1, 17, 128])
def test_varlen_backward_head_dims(head_dim):
    x = make_varlen([3, 0, 70, 1], [40, 5, 200, 0], 4, 2, head_dim)
    check_varlen_backward(x, window_left=50)


@pytest.mark.parametrize("threads", [1, 3])
def test_varlen_backward_thread_counts(threads, num_threads):
    num_threads(threads)
    x = make_varlen(*BACKWARD_LENGTHS, 10, 2, 32)
    check_varlen_backward(x, window_left=100, window_right=30)


# Lengths (queries, keys) for the empty-sequence gradient tests, run causal
# with a window of 3: query i of a sequence sees keys [i + Sk - Sq - 3,
# i + Sk - Sq]. Sequence 1 has queries but no keys, sequence 2 keys but no
# queries; sequence 3 (9 queries, 7 keys): queries 0, 1 see no key; sequence 4
# (3 queries, 9 keys): keys 0-2 are seen by none.
EMPTY_SEQUENCE_LENGTHS = ([4, 3, 0, 9, 3], [6, 0, 5, 7, 9])
EMPTY_SEQUENCE_OPTIONS = {"causal": True, "window_left": 3}


def assert_empty_sequence_gradients(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Zero gradients exactly where EMPTY_SEQUENCE_LENGTHS leaves rows unseen, and nonzero ones elsewhere."""
    assert (dq[4:7] == 0).all() and (dq[7:9] == 0).all()
    assert (dk[6:11] == 0).all() and (dv[6:11] == 0).all()
    assert (dk[18:21] == 0).all() and (dv[18:21] == 0).all()
    # Rows that see 2 keys or more, and keys that some query sees.
    seen_by_two = torch.cat([torch.arange(0, 4), torch.arange(10, 19)])
    assert (dq[seen_by_two].abs().sum(dim=-1) > 0).all()
    seen = torch.cat([torch.arange(0, 6), torch.arange(11, 18), torch.arange(21, 27)])
    assert (dv[seen].abs().sum(dim=-1) > 0).all() and (dk[seen].abs().sum(dim=-1) > 0).all()


def test_varlen_backward_empty_sequences_give_zero_gradients():
    x = make_varlen(*EMPTY_SEQUENCE_LENGTHS, 8, 2, 32)
    assert_empty_sequence_gradients(*check_varlen_backward(x, **EMPTY_SEQUENCE_OPTIONS))


def test_varlen_backward_noncontiguous_inputs():
    lengths = [70, 0, 1, 17, 65]
    x = make_varlen(lengths, lengths, 8, 2, 64, kind="packed_qkv")
    dout = torch.randn(x.q.shape)
    grads = check_varlen_backward(x, dout, causal=True, window_left=50)
    contiguous = x._replace(q=x.q.contiguous(), k=x.k.contiguous(), v=x.v.contiguous())
    grads_c = check_varlen_backward(contiguous, dout, causal=True, window_left=50)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g, g_c)
    # A (Tq, D, Hq) dout viewed as (Tq, Hq, D) does not have a contiguous last dim.
    dout_t = dout.transpose(1, 2).contiguous().transpose(1, 2)
    grads_t = check_varlen_backward(x, dout_t, causal=True, window_left=50)
    for g, g_t in zip(grads, grads_t, strict=True):
        torch.testing.assert_close(g, g_t)


@pytest.mark.parametrize(
    "seqlens_q, seqlens_k", [([], []), ([0, 0, 0], [5, 0, 2]), ([3, 2], [0, 0])], ids=["B0", "no_queries", "no_keys"]
)
def test_varlen_backward_zero_size(seqlens_q, seqlens_k):
    x = leaves(make_varlen(seqlens_q, seqlens_k, 4, 2, 32))
    out = gqa_ext.attention_varlen(*x, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (x.q, x.k, x.v), torch.randn_like(out))
    assert dq.shape == x.q.shape and dk.shape == x.k.shape and dv.shape == x.v.shape
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


GRADCHECK_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"window": (2, 1), "softcap": 1.5, "softmax_scale": 0.8}, id="window_softcap_scale"),
]


@pytest.mark.parametrize("options", GRADCHECK_CASES)
def test_varlen_gradcheck(options):
    x = leaves(make_varlen([2, 0, 3, 1], [3, 2, 0, 2], 4, 2, 4, torch.float64))
    rest = x[3:]
    assert torch.autograd.gradcheck(
        lambda q, k, v: gqa_ext.attention_varlen(q, k, v, *rest, **options), x[:3], fast_mode=True
    )


def run_backward_varlen(x: Varlen, dout: torch.Tensor, deterministic: bool, **options):
    out, lse = torch.ops.gqa.forward_varlen(*x, **options)
    return torch.ops.gqa.backward_varlen(dout, x.q, x.k, x.v, out, lse, *x[3:], **options, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_varlen_op_equals_autograd(deterministic):
    options = {"causal": True, "window_left": 64, "softcap": 2.0, "softmax_scale": 0.2}
    x = leaves(make_varlen(*BACKWARD_LENGTHS, 10, 2, 32))
    dout = torch.randn(x.q.shape)
    out = gqa_ext.attention_varlen(*x, **api_kwargs(options))
    grads_autograd = torch.autograd.grad(out, (x.q, x.k, x.v), dout)
    with torch.no_grad():
        grads_op = run_backward_varlen(x, dout, deterministic, **options)
    for a, b in zip(grads_autograd, grads_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [2, 4])
def test_backward_varlen_deterministic_is_bitwise_repeatable(threads, num_threads):
    num_threads(threads)
    x = make_varlen([130, 0, 1, 300], [517, 5, 0, 130], 10, 1, 64)
    dout = torch.randn(x.q.shape)
    first = run_backward_varlen(x, dout, True, window_left=200)
    again = run_backward_varlen(x, dout, True, window_left=200)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_attention_varlen_lse_does_not_require_grad():
    x = leaves(make_varlen([3, 0, 5], [4, 2, 7], 4, 2, 16))
    out, lse = gqa_ext.attention_varlen(*x, return_lse=True)
    assert out.requires_grad
    assert not lse.requires_grad and lse.grad_fn is None
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert x.q.grad is not None and torch.isfinite(x.q.grad).all()


def test_backward_varlen_does_not_modify_inputs():
    x = make_varlen([3, 0, 70, 1], [40, 5, 200, 0], 8, 2, 64, kind="sliced")
    out, lse = forward_varlen(x, causal=True, softcap=2.0)
    dout = torch.randn(x.q.shape)
    tensors = [dout, x.q, x.k, x.v, out, lse, x.cu_seqlens_q, x.cu_seqlens_k]
    bases = [t if t._base is None else t._base for t in tensors]
    saved = [b.clone() for b in bases]
    torch.ops.gqa.backward_varlen(*tensors, x.max_seqlen_q, x.max_seqlen_k, causal=True, softcap=2.0)
    for b, s in zip(bases, saved, strict=True):
        assert torch.equal(b, s)


# -- errors -----------------------------------------------------------------


def error_args(device: str) -> dict:
    """Valid arguments: Hq = 4, Hkv = 2, D = 16; seqlens_q [2, 3, 4], seqlens_k [3, 5, 1]."""
    x = make_varlen([2, 3, 4], [3, 5, 1], 4, 2, 16, default_dtype(device), device=device)
    return x._asdict()


def i32(*values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


# (replacements of error_args, expected exception, message pattern); a
# callable replacement gets the device.
VARLEN_ERROR_CASES = [
    pytest.param(
        {"cu_seqlens_q": lambda d: torch.tensor([0, 2, 5, 9], device=d)},
        TypeError,
        r"cu_seqlens_q must be int32, got Long",
        id="cu_seqlens_q_int64",
    ),
    pytest.param(
        {"cu_seqlens_k": lambda d: torch.tensor([0.0, 3, 8, 9], device=d)},
        TypeError,
        r"cu_seqlens_k must be int32, got Float",
        id="cu_seqlens_k_float",
    ),
    pytest.param(
        {"cu_seqlens_q": lambda d: i32(0, 2, 5, 9, device=d).view(2, 2)},
        ValueError,
        r"cu_seqlens_q must be a 1-D tensor, got shape \[2, 2\]",
        id="cu_seqlens_q_2d",
    ),
    pytest.param(
        {"cu_seqlens_k": lambda d: i32(0, 3, 9, device=d)},
        ValueError,
        r"cu_seqlens_q and cu_seqlens_k must both hold B \+ 1 >= 1 offsets, got 4 and 3",
        id="cu_seqlens_lengths_differ",
    ),
    pytest.param(
        {"cu_seqlens_q": lambda d: i32(device=d), "cu_seqlens_k": lambda d: i32(device=d)},
        ValueError,
        r"must both hold B \+ 1 >= 1 offsets, got 0 and 0",
        id="cu_seqlens_empty",
    ),
    pytest.param(
        {"cu_seqlens_q": lambda d: i32(1, 2, 5, 9, device=d)},
        ValueError,
        r"cu_seqlens_q\[0\] must be 0, got 1",
        id="cu_seqlens_q_not_from_0",
    ),
    pytest.param(
        {"cu_seqlens_k": lambda d: i32(0, 5, 3, 9, device=d)},
        ValueError,
        r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[1\] = 5 > cu_seqlens_k\[2\] = 3",
        id="cu_seqlens_k_decreasing",
    ),
    pytest.param(
        {"cu_seqlens_q": lambda d: i32(0, 2, 5, 8, device=d)},
        ValueError,
        r"cu_seqlens_q\[-1\] must be the number of rows 9, got 8",
        id="cu_seqlens_q_last_short",
    ),
    pytest.param(
        {"cu_seqlens_k": lambda d: i32(0, 3, 8, 10, device=d)},
        ValueError,
        r"cu_seqlens_k\[-1\] must be the number of rows 9, got 10",
        id="cu_seqlens_k_last_past_end",
    ),
    pytest.param(
        {"max_seqlen_q": 3},
        ValueError,
        r"sequence 2 has 4 rows \(cu_seqlens_q\[3\] - cu_seqlens_q\[2\]\), more than max_seqlen_q = 3",
        id="longer_than_max_seqlen_q",
    ),
    pytest.param(
        {"max_seqlen_k": 4},
        ValueError,
        r"sequence 1 has 5 rows \(cu_seqlens_k\[2\] - cu_seqlens_k\[1\]\), more than max_seqlen_k = 4",
        id="longer_than_max_seqlen_k",
    ),
    pytest.param(
        {"max_seqlen_k": -1},
        ValueError,
        r"max_seqlen_q and max_seqlen_k must be >= 0, got 4 and -1",
        id="max_seqlen_negative",
    ),
    pytest.param(
        {"q": lambda d: torch.randn(1, 9, 4, 16, device=d)},
        ValueError,
        r"q must be a 3-D tensor \(Tq, Hq, D\), got a 4-D tensor",
        id="q_rank4",
    ),
    pytest.param(
        {"k": lambda d: torch.randn(9, 16, device=d)},
        ValueError,
        r"k must be a 3-D tensor \(Tk, Hkv, D\), got a 2-D tensor",
        id="k_rank2",
    ),
    pytest.param(
        {"v": lambda d: torch.randn(9, 2, 16, dtype=torch.float64, device=d)},
        TypeError,
        r"v must have q's dtype",
        id="v_dtype",
    ),
    pytest.param(
        {"v": lambda d: torch.randn(8, 2, 16, device=d)},
        ValueError,
        r"k and v must have the same shape",
        id="k_v_rows_differ",
    ),
    pytest.param(
        {"k": lambda d: torch.randn(9, 3, 16, device=d), "v": lambda d: torch.randn(9, 3, 16, device=d)},
        ValueError,
        r"Hq = 4 must be a multiple of the number of KV heads Hkv = 3",
        id="heads_not_multiple",
    ),
    pytest.param(
        {"q": lambda d: torch.randn(9, 4, 32, device=d)[..., ::2]},
        ValueError,
        r"q must have a contiguous last dim",
        id="q_last_dim_strided",
    ),
    pytest.param({"window_left": -2}, ValueError, r"window_left must be >= -1", id="window_left_-2"),
    pytest.param(
        {"causal": True, "window_right": 3}, ValueError, r"causal=True means window_right = 0", id="causal_window_right"
    ),
    pytest.param({"softcap": -1.0}, ValueError, r"softcap must be finite and >= 0", id="softcap_negative"),
]


def resolve(replace: dict, device: str, dtype: torch.dtype) -> dict:
    """The replacements: callables called with the device, float32 q, k, v cast to dtype."""
    out = {}
    for name, value in replace.items():
        value = value(device) if callable(value) else value
        if name in ("q", "k", "v") and value.dtype == torch.float32:
            value = value.to(dtype)
        out[name] = value
    return out


@pytest.mark.parametrize("replace, exc, pattern", VARLEN_ERROR_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_varlen_bad_arguments(device, replace, exc, pattern):
    args = error_args(device)
    dtype = args["q"].dtype
    args.update(resolve(replace, device, dtype))
    tensors = [args.pop(n) for n in Varlen._fields]
    with pytest.raises(exc, match=r"^gqa\.forward_varlen: ") as info:
        torch.ops.gqa.forward_varlen(*tensors, **args)
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize("replace, exc, pattern", VARLEN_ERROR_CASES)
def test_backward_varlen_bad_arguments(replace, exc, pattern):
    args = error_args("cpu")
    x = Varlen(**args)
    out, lse = forward_varlen(x)
    args.update(resolve(replace, "cpu", torch.float32))
    tensors = [args.pop(n) for n in Varlen._fields]
    q, k, v = tensors[:3]
    dout = torch.randn(out.shape)
    with pytest.raises(exc, match=r"^gqa\.backward_varlen: ") as info:
        torch.ops.gqa.backward_varlen(dout, q, k, v, out, lse, *tensors[3:], **args)
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "replace, exc, pattern",
    [
        pytest.param(
            {"lse": torch.zeros(9, 4)},
            ValueError,
            r"lse must have shape \(Hq, Tq\) = \[4, 9\], got \[9, 4\]",
            id="lse_transposed",
        ),
        pytest.param({"lse": torch.zeros(1, 4, 9)}, ValueError, r"lse must have shape \(Hq, Tq\)", id="lse_rank3"),
        pytest.param(
            {"lse": torch.zeros(4, 9, dtype=torch.float64)},
            TypeError,
            r"lse must be float32, got Double",
            id="lse_dtype",
        ),
        pytest.param(
            {"dout": torch.randn(9, 4, 8)}, ValueError, r"dout must have q's shape \[9, 4, 16\], got", id="dout_shape"
        ),
        pytest.param({"dout": torch.randn(1, 9, 4, 16)}, ValueError, r"dout must be a 3-D tensor", id="dout_rank4"),
        pytest.param(
            {"out": torch.randn(9, 4, 16, dtype=torch.bfloat16)}, TypeError, r"out must have q's dtype", id="out_dtype"
        ),
        pytest.param({"out": torch.randn(8, 4, 16)}, ValueError, r"out must have q's shape", id="out_shape"),
    ],
)
def test_backward_varlen_bad_tensors(replace, exc, pattern):
    x = Varlen(**error_args("cpu"))
    out, lse = forward_varlen(x)
    args = {"dout": torch.randn(out.shape), "q": x.q, "k": x.k, "v": x.v, "out": out, "lse": lse, **replace}
    with pytest.raises(exc, match=r"^gqa\.backward_varlen: ") as info:
        torch.ops.gqa.backward_varlen(*args.values(), *x[3:])
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        pytest.param({"window": 3}, TypeError, r"window must be a \(left, right\) pair of ints", id="window_int"),
        pytest.param({"window": (1.5, 2)}, TypeError, r"window must be a \(left, right\) pair", id="window_float"),
        pytest.param({"window": (-2, 0)}, ValueError, r"window_left must be >= -1", id="window_left_-2"),
        pytest.param({"softcap": -0.5}, ValueError, r"softcap must be finite and >= 0", id="softcap"),
    ],
)
def test_attention_varlen_bad_arguments(kwargs, exc, pattern):
    x = Varlen(**error_args("cpu"))
    with pytest.raises(exc, match=pattern):
        gqa_ext.attention_varlen(*x, **kwargs)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and gqa_ext's CUDA kernels")
def test_forward_varlen_cu_seqlens_on_other_device():
    x = make_varlen([2, 3, 4], [3, 5, 1], 4, 2, 16, torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be on q's device cuda:0, got cpu"):
        torch.ops.gqa.forward_varlen(*x._replace(cu_seqlens_q=x.cu_seqlens_q.cpu()))


# -- opcheck ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, kind, requires_grad, options",
    [
        pytest.param(torch.float32, "contiguous", True, {"causal": True}, id="requires_grad_causal"),
        pytest.param(
            torch.float64,
            "sliced",
            False,
            {"window_left": 4, "window_right": 2, "softcap": 2.0, "softmax_scale": 0.3},
            id="noncontiguous_options",
        ),
    ],
)
def test_opcheck_forward_varlen(dtype, kind, requires_grad, options):
    x = make_varlen([5, 0, 17, 1], [5, 3, 9, 0], 4, 2, 16, dtype, kind=kind)
    x = x._replace(**{n: getattr(x, n).detach().requires_grad_(requires_grad) for n in ("q", "k", "v")})
    torch.library.opcheck(torch.ops.gqa.forward_varlen.default, tuple(x), options)


def test_opcheck_backward_varlen():
    x = make_varlen([5, 0, 17, 1], [5, 3, 9, 0], 6, 2, 16)
    options = {"causal": True, "window_left": 3}
    out, lse = forward_varlen(x, **options)
    dout = torch.randn(out.shape)
    torch.library.opcheck(
        torch.ops.gqa.backward_varlen.default,
        (dout, x.q, x.k, x.v, out, lse, *x[3:]),
        {**options, "deterministic": True},
    )


def test_varlen_double_backward_raises():
    x = leaves(make_varlen([2, 0, 3], [3, 2, 4], 2, 1, 8, torch.float64))
    (dq,) = torch.autograd.grad(gqa_ext.attention_varlen(*x).pow(2).sum(), x.q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward\) are not supported"):
        torch.autograd.grad(dq.sum(), x.q)
