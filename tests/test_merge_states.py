"""torch.ops.gqa.merge_states and gqa_ext.merge_states against the float64 reference.

Partial attention results over disjoint key sets, (out_i, lse_i), merge into
the result over their union: lse = logsumexp_i lse_i, out = sum_i
exp(lse_i - lse) out_i. The parts come from random values and from running
gqa.forward over splits of the keys, whose merge must equal the forward over
all the keys.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import DEVICES, TOLERANCE, assert_lse_close, assert_rel_close, make_qkv, skip_unsupported

import gqa_ext
from gqa_ext.reference import attention_ref, merge_states_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_parts(num_parts, prefix, heads, head_dim, dtype, device, neg_inf_fraction=0.2):
    """Random outs (N, *prefix, H, D) and float32 lses (N, *prefix, H), some lses -inf."""
    outs = torch.randn(num_parts, *prefix, heads, head_dim, dtype=dtype, device=device)
    lses = 3 * torch.randn(num_parts, *prefix, heads, device=device)
    lses[torch.rand(lses.shape, device=device) < neg_inf_fraction] = float("-inf")
    return outs, lses


def merge(outs, lses):
    """The op's (out, lse), with the properties every output must have checked."""
    out, lse = torch.ops.gqa.merge_states(outs, lses)
    assert out.device == outs.device and lse.device == outs.device
    assert out.dtype == outs.dtype and lse.dtype == torch.float32
    assert out.shape == outs.shape[1:] and lse.shape == lses.shape[1:]
    return out, lse


def check_merge(outs, lses):
    """Runs merge_states and checks it against the reference; returns (out, lse)."""
    out, lse = merge(outs, lses)
    ref_out, ref_lse = merge_states_ref(outs, lses)
    assert_rel_close(out, ref_out, outs.dtype, "out")
    assert_lse_close(lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("num_parts", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_random(device, dtype, num_parts):
    outs, lses = make_parts(num_parts, (3, 37), 8, 64, dtype, device)
    check_merge(outs, lses)


@pytest.mark.parametrize(
    "prefix, heads, head_dim",
    [((), 5, 64), ((7,), 1, 1), ((2, 3, 5), 4, 17), ((2, 9), 3, 256), ((1, 1, 1, 2), 2, 80)],
    ids=["no_middle_dims", "one_middle_dim_d1", "three_middle_dims_d17", "d256", "four_middle_dims"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_shapes(device, prefix, heads, head_dim):
    outs, lses = make_parts(3, prefix, heads, head_dim, torch.float32, device)
    check_merge(outs, lses)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_noncontiguous(device):
    # outs (N, B, Sq, H, D) and lses (N, B, Sq, H) as views of (..., H, Sq, ...) tensors, as
    # gqa.forward's lse (B, H, Sq) gives them; outs sliced in D.
    outs = torch.randn(4, 2, 8, 37, 80, device=device)[..., 3:67].transpose(2, 3)
    lses = torch.randn(4, 2, 8, 37, device=device).transpose(2, 3)
    assert not (outs.is_contiguous() or lses.is_contiguous())
    out, lse = check_merge(outs, lses)
    out_c, lse_c = merge(outs.contiguous(), lses.contiguous())
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_rows_all_neg_inf_give_zero_and_neg_inf(device, dtype):
    outs, lses = make_parts(3, (4, 9), 6, 32, dtype, device, neg_inf_fraction=0.0)
    empty = torch.zeros(4, 9, 6, dtype=torch.bool, device=device)
    empty[1] = True
    empty[2, 3:5] = True
    empty[3, :, 0] = True
    lses[:, empty] = float("-inf")
    out, lse = check_merge(outs, lses)
    assert (out[empty] == 0).all()
    assert torch.isneginf(lse[empty]).all()
    assert torch.isfinite(lse[~empty]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_parts_neg_inf_are_left_out(device):
    outs, lses = make_parts(5, (3, 11), 4, 64, torch.float32, device, neg_inf_fraction=0.0)
    lses[1] = float("-inf")
    lses[3] = float("-inf")
    out, lse = check_merge(outs, lses)
    kept = torch.tensor([0, 2, 4], device=device)
    out_kept, lse_kept = merge(outs[kept], lses[kept])
    torch.testing.assert_close(out, out_kept)
    torch.testing.assert_close(lse, lse_kept)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_single_part_is_identity(device):
    outs, lses = make_parts(1, (5, 13), 4, 64, torch.float32, device)
    out, lse = check_merge(outs, lses)
    finite = torch.isfinite(lses[0])
    torch.testing.assert_close(out[finite], outs[0][finite])
    torch.testing.assert_close(lse[finite], lses[0][finite])
    assert (out[~finite] == 0).all()


@pytest.mark.parametrize("offset", [1000.0, -1000.0])
@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_large_lse(device, offset):
    # exp(lse_i) over- or underflows float32: the merge must shift by the max.
    outs, lses = make_parts(4, (3, 7), 4, 32, torch.float32, device)
    lses += offset
    out, lse = check_merge(outs, lses)
    assert torch.isfinite(out).all()


def merged_forward_splits(q, k, v, bounds, causal):
    """gqa.forward over keys[bounds[i]:bounds[i + 1]], stacked as merge_states' outs and lses.

    Causal over all the keys is, on the keys a:b of Sk, window_right = Sk - b
    (the split's own mask aligns to its own last key).
    """
    seqlen_k = k.shape[1]
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        options = {"window_right": seqlen_k - b} if causal else {"softcap": 4.0, "softmax_scale": 0.3}
        out, lse = torch.ops.gqa.forward(q, k[:, a:b], v[:, a:b], **options)
        outs.append(out)
        lses.append(lse.transpose(1, 2))  # (B, Hq, Sq) -> (B, Sq, Hq)
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("causal", [False, True], ids=["softcap_scale", "causal"])
@pytest.mark.parametrize(
    "seqlen_q, bounds",
    [
        (1, [0, 517]),
        (1, [0, 100, 100, 517]),  # an empty part
        (40, [0, 37, 300, 301, 517]),  # a part of one key
        (40, [0, 1, 2, 3, 4, 517]),
    ],
    ids=["decode_1_part", "decode_3_parts_one_empty", "prefill_4_parts", "prefill_5_parts"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_of_forward_splits_equals_forward(device, dtype, seqlen_q, bounds, causal):
    skip_unsupported(device, dtype)
    q, k, v = make_qkv(2, seqlen_q, 517, 4, 2, 64, dtype, device=device)
    outs, lses = merged_forward_splits(q, k, v, bounds, causal)
    out, lse = check_merge(outs, lses)
    full_options = {"causal": True} if causal else {"softcap": 4.0, "softmax_scale": 0.3}
    ref_out, ref_lse = attention_ref(q, k, v, **full_options)
    # The merge of rounded parts is within the tolerance of the full result.
    assert_rel_close(out, ref_out, dtype, "merged out")
    assert_lse_close(lse.transpose(1, 2), ref_lse)
    full_out, _ = torch.ops.gqa.forward(q, k, v, **full_options)
    err = (out.double() - full_out.double()).norm() / full_out.double().norm()
    assert err <= TOLERANCE[dtype], f"merged out differs from gqa.forward's by {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_api_equals_op(device):
    outs, lses = make_parts(3, (2, 5), 4, 16, torch.bfloat16, device)
    out, lse = gqa_ext.merge_states(outs, lses)
    out_op, lse_op = merge(outs, lses)
    torch.testing.assert_close(out, out_op, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_op, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_zero_size(device):
    outs, lses = make_parts(3, (0, 5), 4, 16, torch.float32, device)
    out, lse = merge(outs, lses)
    assert out.numel() == 0 and lse.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_does_not_modify_inputs(device):
    outs, lses = make_parts(3, (4, 9), 4, 16, torch.float32, device)
    saved = outs.clone(), lses.clone()
    merge(outs, lses)
    assert torch.equal(outs, saved[0]) and torch.equal(lses, saved[1])


@pytest.mark.parametrize(
    "outs_shape, outs_dtype, lses_shape, lses_dtype, exc, pattern",
    [
        pytest.param(
            (3, 16),
            torch.float32,
            (3,),
            torch.float32,
            ValueError,
            r"outs must be \(N, \.\.\., H, D\) with at least 3 dims, got shape \[3, 16\]",
            id="outs_rank2",
        ),
        pytest.param(
            (3, 4, 16),
            torch.float64,
            (3, 4),
            torch.float32,
            TypeError,
            r"outs must be float32, bfloat16 or float16, got Double",
            id="outs_float64",
        ),
        pytest.param(
            (3, 4, 16),
            torch.int32,
            (3, 4),
            torch.float32,
            TypeError,
            r"outs must be float32, bfloat16 or float16, got Int",
            id="outs_int",
        ),
        pytest.param(
            (3, 4, 16),
            torch.float32,
            (3, 4),
            torch.float64,
            TypeError,
            r"lses must be float32, got Double",
            id="lses_float64",
        ),
        pytest.param(
            (3, 4, 16),
            torch.bfloat16,
            (3, 4),
            torch.bfloat16,
            TypeError,
            r"lses must be float32, got BFloat16",
            id="lses_bfloat16",
        ),
        pytest.param(
            (3, 2, 4, 16),
            torch.float32,
            (3, 4, 2),
            torch.float32,
            ValueError,
            r"lses must have outs' shape without its last dim, \[3, 2, 4\], got \[3, 4, 2\]",
            id="lses_transposed",
        ),
        pytest.param(
            (3, 2, 4, 16),
            torch.float32,
            (2, 4),
            torch.float32,
            ValueError,
            r"lses must have outs' shape without its last dim",
            id="lses_without_parts",
        ),
        pytest.param(
            (0, 2, 4, 16),
            torch.float32,
            (0, 2, 4),
            torch.float32,
            ValueError,
            r"there must be at least one part to merge \(N >= 1\)",
            id="no_parts",
        ),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_merge_states_bad_arguments(device, outs_shape, outs_dtype, lses_shape, lses_dtype, exc, pattern):
    outs = torch.ones(outs_shape, dtype=outs_dtype, device=device)
    lses = torch.zeros(lses_shape, dtype=lses_dtype, device=device)
    with pytest.raises(exc, match=r"^gqa\.merge_states: ") as info:
        torch.ops.gqa.merge_states(outs, lses)
    assert re.search(pattern, str(info.value)), str(info.value)
    with pytest.raises(exc):
        gqa_ext.merge_states(outs, lses)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and gqa_ext's CUDA kernels")
def test_merge_states_device_mismatch():
    outs, lses = make_parts(2, (3,), 4, 16, torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"lses must be on outs' device cuda:0, got cpu"):
        torch.ops.gqa.merge_states(outs, lses.cpu())


@pytest.mark.parametrize(
    "num_parts, prefix, dtype, noncontiguous",
    [
        pytest.param(3, (2, 5), torch.float32, False, id="float32"),
        pytest.param(2, (4,), torch.bfloat16, True, id="bfloat16_noncontiguous"),
    ],
)
def test_opcheck_merge_states(num_parts, prefix, dtype, noncontiguous):
    outs, lses = make_parts(num_parts, prefix, 4, 16, dtype, "cpu")
    if noncontiguous:
        lses = lses.transpose(-1, -2).contiguous().transpose(-1, -2)
        outs = outs.transpose(-2, -3).contiguous().transpose(-2, -3)
    torch.library.opcheck(torch.ops.gqa.merge_states.default, (outs, lses))
