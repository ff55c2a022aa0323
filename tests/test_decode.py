"""The CPU forward on decode shapes: a few query rows (Sq * G <= 16) per KV head.

These run the streaming decode kernel (csrc/cpu/attention_fwd_decode_cpu.cpp)
rather than the tile-GEMM one: key ranges split into tasks that the threads
claim from a queue, keys in chunks of 8, query rows in register blocks of 4,
head dims in blocks of two vectors plus tails. Sizes are chosen to end off
every one of those multiples.
"""

from __future__ import annotations

import pytest
import torch
from conftest import GROUP_CASES, NONCONTIGUOUS_KINDS, OPTION_CASES, make_qkv
from test_forward import check_forward

from gqa_ext.reference import visible_mask

REDUCED = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
def test_decode_group_sizes(heads_q, heads_kv, dtype):
    q, k, v = make_qkv(3, 1, 1100, heads_q, heads_kv, 128, dtype)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("seqlen_q, heads_q", [(2, 8), (3, 4), (5, 6)], ids=["sq2_g4", "sq3_g2", "sq5_g3"])
@pytest.mark.parametrize("options", OPTION_CASES)
def test_decode_several_queries_options(options, seqlen_q, heads_q):
    # Speculative decoding: each query position has its own key range.
    q, k, v = make_qkv(2, seqlen_q, 517, heads_q, 2, 64)
    check_forward(q, k, v, **options)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("head_dim", [1, 3, 8, 17, 40, 65, 72, 200, 256])
def test_decode_head_dims(head_dim, dtype):
    q, k, v = make_qkv(2, 1, 300, 8, 2, head_dim, dtype)
    check_forward(q, k, v, window_left=250)


@pytest.mark.parametrize("seqlen_k", [1, 2, 7, 8, 9, 255, 257, 1031])
def test_decode_key_counts(seqlen_k):
    q, k, v = make_qkv(2, 1, seqlen_k, 12, 4, 64, torch.bfloat16)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2)], ids=["group4", "group8"])
def test_decode_bfloat16_groups_of_four(heads, head_dim):
    # Blocks of 4 bfloat16 rows over whole 8-key chunks take their own path
    # (attend_rows4_chunk, with D a constant at 128); 1031 keys leave a short last
    # chunk to the general one.
    q, k, v = make_qkv(3, 1, 1031, heads[0], heads[1], head_dim, torch.bfloat16)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_decode_thread_counts_and_splits(batch, threads, num_threads):
    num_threads(threads)
    q, k, v = make_qkv(batch, 1, 2100, 16, 4, 128, torch.bfloat16)
    out, lse = check_forward(q, k, v, softcap=10.0)
    # The heuristic's splits shrink as the queue drains: unequal here except
    # for 3 threads on batch 1 and 1 thread on batch 5. They are merged in
    # split order whichever thread claimed each: repeatable to the bit.
    for _ in range(4):
        out2, lse2 = torch.ops.gqa.forward(q, k, v, softcap=10.0)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", NONCONTIGUOUS_KINDS)
def test_decode_noncontiguous_inputs(kind, dtype):
    q, k, v = make_qkv(2, 1, 600, 8, 2, 64, dtype, kind=kind)
    out, lse = check_forward(q, k, v, window_left=400)
    out_c, lse_c = torch.ops.gqa.forward(q.contiguous(), k.contiguous(), v.contiguous(), window_left=400)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_rows_without_keys_give_zero_and_neg_inf(dtype):
    # 4 queries over 2 keys, bottom-right causal: positions 0 and 1 see none.
    q, k, v = make_qkv(2, 4, 2, 8, 2, 32, dtype)
    out, lse = check_forward(q, k, v, causal=True)
    empty = ~visible_mask(4, 2, causal=True).any(dim=1)
    assert empty.tolist() == [True, True, False, False]
    assert (out[:, empty] == 0).all()
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()


def test_decode_no_keys():
    q, k, v = make_qkv(2, 1, 0, 8, 2, 32)
    out, lse = torch.ops.gqa.forward(q, k, v)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scores", ["rising", "one_far_above", "just_below_the_lag"])
def test_decode_online_softmax_max_moves(scores, head_dim, dtype):
    # The vectorized softmax takes a chunk's exponentials against the rows'
    # stored max until a score lies more than 2^8 (8 ln 2 in the scaled
    # score) above it. Scaled scores of about k[..., 0] / sqrt(D) here: they
    # rise by 25 over the keys (the max moves every few chunks), jump by 100
    # at one key, or sit at 5.4 after a first chunk at about 0, so that the
    # exponentials reach about 2^7.8.
    seqlen = 1100
    q, k, v = make_qkv(1, 1, seqlen, 8, 2, head_dim, dtype)
    q[..., 0] = 1.0
    q[..., 1:] *= 0.01
    root_d = head_dim**0.5
    if scores == "rising":
        k[..., 0] = torch.linspace(0, 25 * root_d, seqlen).view(1, seqlen, 1)
    elif scores == "one_far_above":
        k[..., 0] *= 0.01
        k[:, 900, :, 0] += 100 * root_d
    else:
        k[..., 0] *= 0.01
        k[:, 8:, :, 0] += 5.4 * root_d
    check_forward(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(8, 2), (7, 1), (2, 1)], ids=["group4", "group7", "group2"])
def test_decode_scores_far_below_the_max(heads, dtype):
    # Scores with a spread of about 40: within most chunks some exponentials
    # fall below 2^-125, where the vectorized softmax's exp2 clamps, and the
    # result is close to one value row.
    q, k, v = make_qkv(2, 1, 1100, heads[0], heads[1], 64, dtype)
    check_forward(q * 40, k, v)


@pytest.mark.parametrize("heads_q", [16, 17], ids=["16_rows_decode_kernel", "17_rows_tile_kernel"])
def test_decode_kernel_boundary(heads_q):
    q, k, v = make_qkv(2, 1, 700, heads_q, 1, 64, torch.bfloat16)
    check_forward(q, k, v, causal=True)
