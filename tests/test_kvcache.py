"""Decoding from a KV cache: torch.ops.gqa.forward_kvcache and gqa_ext.attention_kvcache.

Caches are contiguous (B, Smax, Hkv, D) or paged (num_blocks, block_size,
Hkv, D) with a shuffled block table and blocks no sequence uses. Every
position of a cache holds random values, so a kernel that reads past
cache_seqlens or through the wrong block reads wrong (finite) values; the
outputs are compared with the float64 reference on the sequences gathered in
plain PyTorch (gqa_ext.reference.attention_kvcache_ref). With k_new and v_new
the op writes them into the caches in place: every check compares the whole
storage of the caches with the expected one, so a write to any other
position fails.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
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
from gqa_ext.reference import attention_kvcache_ref, kvcache_sequence

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# How far two runs that differ only in how the work is cut (num_splits) may
# be apart, as ||a - b|| / ||b||: tighter than the error allowed against the
# reference.
ROUNDING_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 5e-3}

BLOCK_SIZES = [16, 24, 32, 64, 128, 256]


class Cache(NamedTuple):
    """The caches and, for a paged one, the block table (else None)."""

    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor | None


def make_cache(
    batch: int,
    capacity: int,
    heads_kv: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    block_size: int | None = None,
    extra_blocks: int = 3,
    kind: str = "contiguous",
    device: torch.device | str = "cpu",
) -> Cache:
    """Random caches of at least ``capacity`` positions per sequence, standard normal.

    ``block_size`` None: contiguous (B, capacity, Hkv, D) caches. Otherwise
    paged: ceil(capacity / block_size) + 1 blocks per sequence (the last
    column of the table is past every sequence used here), the table a random
    permutation of the blocks, ``extra_blocks`` blocks in no table.

    ``kind``: ``"contiguous"`` tensors, or ``"packed_kv"``: k and v
    interleaved in one (..., 2, Hkv, D) tensor, as [..., 0, :, :] and [..., 1, :, :].
    """
    if block_size is None:
        shape = (batch, capacity)
        table = None
    else:
        max_blocks = -(-capacity // block_size) + 1
        num_blocks = batch * max_blocks + extra_blocks
        shape = (num_blocks, block_size)
        perm = torch.randperm(num_blocks)[: batch * max_blocks]
        table = perm.view(batch, max_blocks).to(device=device, dtype=torch.int32)
    if kind == "contiguous":
        k = torch.randn(*shape, heads_kv, head_dim, dtype=dtype, device=device)
        v = torch.randn(*shape, heads_kv, head_dim, dtype=dtype, device=device)
    elif kind == "packed_kv":
        kv = torch.randn(*shape, 2, heads_kv, head_dim, dtype=dtype, device=device)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return Cache(k, v, table)


def capacity_of(cache: Cache) -> int:
    if cache.block_table is None:
        return cache.k.shape[1]
    return cache.block_table.shape[1] * cache.k.shape[1]


def i32(values, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def make_new(batch, seqlen_q, heads_q, heads_kv, head_dim, dtype, device, append=True):
    """q (B, Sq, Hq, D) and, if append, k_new, v_new (B, Sq, Hkv, D); else None, None."""
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype, device=device)
    if not append:
        return q, None, None
    k_new = torch.randn(batch, seqlen_q, heads_kv, head_dim, dtype=dtype, device=device)
    v_new = torch.randn(batch, seqlen_q, heads_kv, head_dim, dtype=dtype, device=device)
    return q, k_new, v_new


def written_positions(cache: torch.Tensor, block_table, b: int, positions: range):
    """Indices of ``cache`` of sequence b's logical positions: (batch or block index, row index) pairs."""
    if block_table is None:
        return [(b, p) for p in positions]
    block_size = cache.shape[1]
    return [(int(block_table[b, p // block_size]), p % block_size) for p in positions]


def expected_after_append(cache: torch.Tensor, new, block_table, cache_seqlens) -> torch.Tensor:
    """The cache with new[b, i] written at position cache_seqlens[b] + i of every sequence b."""
    expected = cache.clone()
    if new is None:
        return expected
    seqlen_q = new.shape[1]
    for b, start in enumerate(cache_seqlens.tolist()):
        for i, (row, pos) in enumerate(written_positions(cache, block_table, b, range(start, start + seqlen_q))):
            expected[row, pos] = new[b, i]
    return expected


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits as integers: compares NaN equal to the same NaN, and -0.0 unequal to 0.0."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def storage_mask(base: torch.Tensor, views) -> torch.Tensor:
    """A boolean tensor of base's shape, True on the elements the views of base among ``views`` cover."""
    mask = torch.zeros(base.numel(), dtype=torch.bool, device=base.device)
    flat_offset = base.storage_offset()
    for view in views:
        if view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            continue
        mask.as_strided(view.shape, view.stride(), view.storage_offset() - flat_offset).fill_(True)
    return mask.view(base.shape)


def base_of(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def run_kvcache(q, cache: Cache, k_new=None, v_new=None, cache_seqlens=None, **options):
    """The op's (out, lse), with the properties every output must have checked."""
    out, lse = torch.ops.gqa.forward_kvcache(
        q, cache.k, cache.v, k_new, v_new, cache_seqlens, cache.block_table, **options
    )
    batch, seqlen_q, heads_q, head_dim = q.shape
    assert out.device == q.device and lse.device == q.device
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == (batch, seqlen_q, heads_q, head_dim)
    assert lse.shape == (batch, heads_q, seqlen_q)
    return out, lse


def check_kvcache(q, cache: Cache, k_new=None, v_new=None, cache_seqlens=None, **options):
    """Runs forward_kvcache; checks out and lse against the reference and the caches' whole storage.

    The caches must hold k_new and v_new at the appended positions afterwards
    and be unchanged everywhere else (and anywhere else in their storage);
    cache_seqlens and block_table must be unchanged. Returns (out, lse).
    """
    saved_bases = [base_of(t).clone() for t in (cache.k, cache.v)]
    saved_index = [None if t is None else t.clone() for t in (cache_seqlens, cache.block_table)]
    ref_options = {n: options[n] for n in options if n != "num_splits"}
    ref_out, ref_lse = attention_kvcache_ref(
        q,
        cache.k,
        cache.v,
        k_new,
        v_new,
        cache_seqlens=cache_seqlens,
        block_table=cache.block_table,
        **ref_options,
    )
    expected_k = expected_after_append(cache.k, k_new, cache.block_table, cache_seqlens)
    expected_v = expected_after_append(cache.v, v_new, cache.block_table, cache_seqlens)

    out, lse = run_kvcache(q, cache, k_new, v_new, cache_seqlens, **options)

    assert_rel_close(out, ref_out, q.dtype, "out")
    assert_lse_close(lse, ref_lse)
    for name, t, expected in (("k_cache", cache.k, expected_k), ("v_cache", cache.v, expected_v)):
        if not same_bits(t, expected):
            wrong = (bits(t) != bits(expected)).flatten(2).any(dim=-1).nonzero().tolist()
            raise AssertionError(f"{name} differs from the expected one at (block or batch, row) {wrong[:10]}")
    for base, saved in zip((base_of(cache.k), base_of(cache.v)), saved_bases, strict=True):
        outside = ~storage_mask(base, (cache.k, cache.v))
        assert same_bits(base[outside], saved[outside]), "the caches' storage changed outside the caches"
    for t, saved in zip((cache_seqlens, cache.block_table), saved_index, strict=True):
        assert t is None or torch.equal(t, saved), "cache_seqlens or block_table changed"
    return out, lse


def cache_case(block_size, device, dtype, seqlen_q, heads_q=8, heads_kv=2, head_dim=64, append=True, kind="contiguous"):
    """(q, cache, k_new, v_new, cache_seqlens) for 4 sequences of 0, 1, bs - 1 and 2 bs + 5 cached positions.

    bs is the block size (64 for a contiguous cache): appending crosses a
    block boundary in the third sequence when Sq > 1.
    """
    bs = 64 if block_size is None else block_size
    lens = [0, 1, bs - 1, 2 * bs + 5]
    cache = make_cache(
        4, max(lens) + seqlen_q + 3, heads_kv, head_dim, dtype, block_size=block_size, kind=kind, device=device
    )
    q, k_new, v_new = make_new(4, seqlen_q, heads_q, heads_kv, head_dim, dtype, device, append)
    return q, cache, k_new, v_new, i32(lens, device)


# -- layouts, block sizes, query counts -------------------------------------


# With Hq / Hkv = 4: Sq = 1 and 3 run the CPU decode kernel (Sq * G <= 16 rows
# per KV head), Sq = 5 the tile kernel.
@pytest.mark.parametrize("seqlen_q, append", [(1, True), (1, False), (3, True), (3, False), (5, True)], ids=str)
@pytest.mark.parametrize("block_size", [None, *BLOCK_SIZES], ids=lambda b: "contiguous" if b is None else f"bs{b}")
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_layouts(device, block_size, seqlen_q, append):
    q, cache, k_new, v_new, lens = cache_case(block_size, device, default_dtype(device), seqlen_q, append=append)
    check_kvcache(q, cache, k_new, v_new, lens)


@pytest.mark.parametrize("append", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_chunked_prefill(device, block_size, append):
    # 37 queries per sequence (the tile kernel), appended after 0, 5 and 100
    # cached positions, or the last 37 of 37, 50 and 130 cached positions.
    dtype = default_dtype(device)
    lens = i32([0, 5, 100] if append else [37, 50, 130], device)
    cache = make_cache(3, 140, 2, 64, dtype, block_size=block_size, device=device)
    q, k_new, v_new = make_new(3, 37, 8, 2, 64, dtype, device, append)
    check_kvcache(q, cache, k_new, v_new, lens)
    check_kvcache(q, cache, k_new, v_new, lens, window_left=50)


@pytest.mark.parametrize("block_size", [None, 32], ids=["contiguous", "bs32"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_default_cache_seqlens_is_capacity(device, block_size):
    dtype = default_dtype(device)
    cache = make_cache(3, 70, 2, 64, dtype, block_size=block_size, device=device)
    q = torch.randn(3, 2, 8, 64, dtype=dtype, device=device)
    out, lse = check_kvcache(q, cache)
    # The same as giving every sequence the whole capacity.
    full = i32([capacity_of(cache)] * 3, device)
    out_full, lse_full = run_kvcache(q, cache, cache_seqlens=full)
    torch.testing.assert_close(out, out_full, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_full, rtol=0, atol=0)


@pytest.mark.parametrize("num_extra", [0, 5])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_paged_equals_contiguous(device, num_extra):
    # The same logical sequences in a contiguous cache and in a paged one.
    dtype = default_dtype(device)
    paged = make_cache(3, 200, 2, 64, dtype, block_size=32, extra_blocks=num_extra, device=device)
    k = torch.stack([kvcache_sequence(paged.k, b, capacity_of(paged), paged.block_table) for b in range(3)])
    v = torch.stack([kvcache_sequence(paged.v, b, capacity_of(paged), paged.block_table) for b in range(3)])
    contiguous = Cache(k, v, None)
    lens = i32([0, 77, 190], device)
    q, k_new, v_new = make_new(3, 2, 8, 2, 64, dtype, device)
    out_p, lse_p = check_kvcache(q, paged, k_new, v_new, lens)
    out_c, lse_c = check_kvcache(q, contiguous, k_new, v_new, lens)
    assert rel_err(out_p, out_c) <= ROUNDING_TOLERANCE[dtype]
    torch.testing.assert_close(lse_p, lse_c, atol=LSE_ATOL, rtol=LSE_RTOL)


# -- append then attend -------------------------------------------------------


@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_append_equals_writing_by_hand(device, block_size, seqlen_q):
    dtype = default_dtype(device)
    options = {"window_left": 40, "softcap": 3.0}
    q, cache, k_new, v_new, lens = cache_case(block_size, device, dtype, seqlen_q)
    by_hand = Cache(
        expected_after_append(cache.k, k_new, cache.block_table, lens),
        expected_after_append(cache.v, v_new, cache.block_table, lens),
        cache.block_table,
    )
    out, lse = check_kvcache(q, cache, k_new, v_new, lens, **options)
    # The keys written by hand, attended with cache_seqlens + Sq.
    out_hand, lse_hand = check_kvcache(q, by_hand, None, None, lens + seqlen_q, **options)
    assert rel_err(out, out_hand) <= ROUNDING_TOLERANCE[dtype]
    torch.testing.assert_close(lse, lse_hand, atol=LSE_ATOL, rtol=LSE_RTOL)
    # And gqa.forward over each sequence's keys concatenated by hand.
    for b, n in enumerate(lens.tolist()):
        k = torch.cat([kvcache_sequence(by_hand.k, b, n, cache.block_table), k_new[b]]).unsqueeze(0)
        v = torch.cat([kvcache_sequence(by_hand.v, b, n, cache.block_table), v_new[b]]).unsqueeze(0)
        out_b, lse_b = torch.ops.gqa.forward(q[b : b + 1], k, v, causal=True, **options)
        err = rel_err(out[b], out_b[0])
        assert err <= TOLERANCE[dtype], f"sequence {b}: out differs from gqa.forward's by {err:.3g}"
        torch.testing.assert_close(lse[b], lse_b[0], atol=LSE_ATOL, rtol=LSE_RTOL)


@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_decode_steps(device, block_size):
    # Token by token: each step appends one key and attends; the caller moves
    # cache_seqlens on (the op does not).
    dtype = default_dtype(device)
    cache = make_cache(3, 60, 2, 32, dtype, block_size=block_size, device=device)
    lens = i32([0, 15, 40], device)
    for _ in range(5):
        q, k_new, v_new = make_new(3, 1, 6, 2, 32, dtype, device)
        check_kvcache(q, cache, k_new, v_new, lens, softcap=5.0)
        lens = lens + 1


@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_query_rows_without_keys(device, block_size):
    # Causal, bottom-right: 4 queries over 2 cached keys (no append) see
    # nothing at positions 0 and 1; over 0 keys, nothing at all.
    dtype = default_dtype(device)
    cache = make_cache(2, 20, 2, 32, dtype, block_size=block_size, device=device)
    q = torch.randn(2, 4, 8, 32, dtype=dtype, device=device)
    out, lse = check_kvcache(q, cache, cache_seqlens=i32([2, 0], device))
    assert (out[0, :2] == 0).all() and torch.isneginf(lse[0, :, :2]).all()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 2:]).all() and (out[0, 2:].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("append", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_ignores_nan_past_cache_seqlens(device, block_size, append):
    # Caches from torch.empty may hold anything past the sequences: NaN and
    # inf there must not reach the output (0 * NaN is NaN).
    dtype = default_dtype(device)
    q, cache, k_new, v_new, lens = cache_case(block_size, device, dtype, 3, append=append)
    for t in (cache.k, cache.v):
        garbage = torch.full_like(t, float("nan"))
        garbage[..., 0] = float("inf")
        valid = torch.zeros(t.shape[:2], dtype=torch.bool, device=device)
        for b, n in enumerate(lens.tolist()):
            for row, pos in written_positions(t, cache.block_table, b, range(n)):
                valid[row, pos] = True
        t.copy_(torch.where(valid[:, :, None, None], t, garbage))
    check_kvcache(q, cache, k_new, v_new, lens)


@pytest.mark.parametrize("append", [True, False], ids=["append", "no_append"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_unused_block_table_entries_are_not_read(device, append):
    # Entries of the table past the blocks a sequence uses may be anything
    # (the argument checks skip them too): -1 and past num_blocks here.
    dtype = default_dtype(device)
    q, cache, k_new, v_new, lens = cache_case(16, device, dtype, 2, append=append)
    table = cache.block_table.clone()
    for b, n in enumerate(lens.tolist()):
        used = -(-(n + (2 if append else 0)) // 16)
        table[b, used:] = -1 if b % 2 else 1 << 30
    check_kvcache(q, cache._replace(block_table=table), k_new, v_new, lens)


# -- num_splits -----------------------------------------------------------------


@pytest.mark.parametrize("block_size, seqlen_q", [(None, 1), (32, 3)], ids=["contiguous_decode", "paged_speculative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_num_splits(device, dtype, block_size, seqlen_q):
    skip_unsupported(device, dtype)
    lens = i32([1100, 0, 1, 300], device)
    cache = make_cache(4, 1100 + seqlen_q, 2, 64, dtype, block_size=block_size, device=device)
    q, k_new, v_new = make_new(4, seqlen_q, 8, 2, 64, dtype, device)
    results = {}
    for num_splits in [1, 0, 2, 3, 64]:
        fresh = Cache(cache.k.clone(), cache.v.clone(), cache.block_table)
        results[num_splits] = check_kvcache(q, fresh, k_new, v_new, lens, num_splits=num_splits, window_left=700)
    out_1, lse_1 = results[1]
    for num_splits, (out, lse) in results.items():
        err = rel_err(out, out_1)
        assert err <= ROUNDING_TOLERANCE[dtype], f"num_splits={num_splits} differs from 1 split by {err:.3g}"
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_1))
        finite = ~torch.isneginf(lse_1)
        torch.testing.assert_close(lse[finite], lse_1[finite], atol=LSE_ATOL, rtol=LSE_RTOL)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("seqlen_q", [1, 5])
def test_kvcache_thread_counts(seqlen_q, threads, num_threads):
    # The decode kernel splits long caches across threads (Sq = 1); the tile
    # kernel runs the sequences one by one (Sq = 5).
    num_threads(threads)
    lens = i32([1100, 0, 1, 300])
    cache = make_cache(4, 1110, 2, 64, torch.bfloat16, block_size=16)
    q, k_new, v_new = make_new(4, seqlen_q, 8, 2, 64, torch.bfloat16, "cpu")
    check_kvcache(q, cache, k_new, v_new, lens, window_left=600)


# -- options, groups, dtypes, head dims ---------------------------------------


@pytest.mark.parametrize(
    "seqlen_q, append, block_size",
    [(1, True, 16), (4, False, None), (5, True, 24), (5, False, 16)],
    ids=["decode_paged", "sq4_contiguous", "sq5_append_paged", "sq5_paged"],
)
@pytest.mark.parametrize("options", OPTION_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_options(device, options, seqlen_q, append, block_size):
    # The op defaults to causal=True; these cases spell causal out.
    options = {"causal": False, **options}
    q, cache, k_new, v_new, lens = cache_case(block_size, device, default_dtype(device), seqlen_q, append=append)
    check_kvcache(q, cache, k_new, v_new, lens, **options)


@pytest.mark.parametrize(
    "seqlen_q, append, block_size", [(1, True, 32), (2, False, None)], ids=["decode_paged", "sq2_contiguous"]
)
@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_group_sizes(device, heads_q, heads_kv, seqlen_q, append, block_size):
    q, cache, k_new, v_new, lens = cache_case(
        block_size, device, default_dtype(device), seqlen_q, heads_q=heads_q, heads_kv=heads_kv, append=append
    )
    check_kvcache(q, cache, k_new, v_new, lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_dtypes(device, dtype):
    skip_unsupported(device, dtype)
    q, cache, k_new, v_new, lens = cache_case(16, device, dtype, 2)
    check_kvcache(q, cache, k_new, v_new, lens, window_left=30)
    q, cache, k_new, v_new, lens = cache_case(None, device, dtype, 1)
    check_kvcache(q, cache, k_new, v_new, lens, softcap=3.0)


@pytest.mark.parametrize("head_dim", [1, 17, 128, 256])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_head_dims(device, head_dim):
    q, cache, k_new, v_new, lens = cache_case(32, device, default_dtype(device), 2, head_dim=head_dim)
    check_kvcache(q, cache, k_new, v_new, lens)


@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_noncontiguous(device, block_size):
    # k and v interleaved in one cache tensor (and k_new, v_new in one
    # tensor), q a transposed view, the block table a slice of a wider one.
    dtype = default_dtype(device)
    q, cache, _, _, lens = cache_case(block_size, device, dtype, 2, kind="packed_kv")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    kv_new = torch.randn(4, 2, 2, 2, 64, dtype=dtype, device=device)
    k_new, v_new = kv_new[:, :, 0], kv_new[:, :, 1]
    if block_size is not None:
        wide = torch.full((4, cache.block_table.shape[1] + 3), -7, dtype=torch.int32, device=device)
        wide[:, : cache.block_table.shape[1]] = cache.block_table
        cache = cache._replace(block_table=wide[:, : cache.block_table.shape[1]])
        assert not cache.block_table.is_contiguous()
    assert not (q.is_contiguous() or cache.k.is_contiguous() or k_new.is_contiguous())
    out, lse = check_kvcache(q, cache, k_new, v_new, lens, window_left=50)
    # The same as contiguous copies (of the caches before the append).
    fresh = Cache(cache.k.contiguous(), cache.v.contiguous(), None if block_size is None else cache.block_table.clone())
    out_c, lse_c = run_kvcache(q.contiguous(), fresh, None, None, lens + 2, window_left=50)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_kvcache_api_passes_options_to_op(device):
    dtype = default_dtype(device)
    q, cache, k_new, v_new, lens = cache_case(16, device, dtype, 2)
    options = {"causal": True, "softmax_scale": 0.2, "window_left": 30, "softcap": 4.0}
    ref_out, ref_lse = attention_kvcache_ref(
        q, cache.k, cache.v, k_new, v_new, cache_seqlens=lens, block_table=cache.block_table, **options
    )
    out, lse = gqa_ext.attention_kvcache(
        q,
        cache.k,
        cache.v,
        k_new,
        v_new,
        cache_seqlens=lens,
        block_table=cache.block_table,
        num_splits=2,
        return_lse=True,
        **api_kwargs(options),
    )
    assert_rel_close(out, ref_out, dtype, "out")
    assert_lse_close(lse, ref_lse)
    # Defaults: causal, no append (the keys just written are in the cache now).
    only_out = gqa_ext.attention_kvcache(q, cache.k, cache.v, cache_seqlens=lens + 2, block_table=cache.block_table)
    assert isinstance(only_out, torch.Tensor)
    ref_only, _ = attention_kvcache_ref(q, cache.k, cache.v, cache_seqlens=lens + 2, block_table=cache.block_table)
    assert_rel_close(only_out, ref_only, dtype, "out")


# -- errors -----------------------------------------------------------------


def error_args(device: str, paged: bool) -> dict:
    """Valid arguments: B = 2, Sq = 1, Hq = 4, Hkv = 2, D = 16; cache_seqlens [3, 9].

    Contiguous caches (2, 10, 2, 16); paged: 7 blocks of 4 rows and the table
    [[5, 0, 2], [1, 6, 3]] (12 positions per sequence).
    """
    dtype = default_dtype(device)

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    cache_shape = (7, 4, 2, 16) if paged else (2, 10, 2, 16)
    return {
        "q": randn(2, 1, 4, 16),
        "k_cache": randn(*cache_shape),
        "v_cache": randn(*cache_shape),
        "k_new": randn(2, 1, 2, 16),
        "v_new": randn(2, 1, 2, 16),
        "cache_seqlens": i32([3, 9], device),
        "block_table": i32([[5, 0, 2], [1, 6, 3]], device) if paged else None,
    }


# (paged, replacements of error_args, expected exception, message pattern);
# a callable replacement gets the device and the dtype.
KVCACHE_ERROR_CASES = [
    pytest.param(
        False,
        {"cache_seqlens": lambda d, t: torch.tensor([3, 9], device=d)},
        TypeError,
        r"cache_seqlens must be int32, got Long",
        id="cache_seqlens_int64",
    ),
    pytest.param(
        True,
        {"block_table": lambda d, t: torch.tensor([[5, 0, 2], [1, 6, 3]], device=d)},
        TypeError,
        r"block_table must be int32, got Long",
        id="block_table_int64",
    ),
    pytest.param(
        False,
        {"cache_seqlens": lambda d, t: i32([[3, 9]], d)},
        ValueError,
        r"cache_seqlens must be a 1-D tensor, got shape \[1, 2\]",
        id="cache_seqlens_2d",
    ),
    pytest.param(
        False,
        {"cache_seqlens": lambda d, t: i32([3, 9, 1], d)},
        ValueError,
        r"cache_seqlens must have q's batch size 2, got 3",
        id="cache_seqlens_batch",
    ),
    pytest.param(
        True,
        {"block_table": lambda d, t: i32([5, 0, 2], d)},
        ValueError,
        r"block_table must be a 2-D tensor, got shape \[3\]",
        id="block_table_1d",
    ),
    pytest.param(
        True,
        {"block_table": lambda d, t: i32([[5, 0, 2], [1, 6, 3], [4, 4, 4]], d)},
        ValueError,
        r"block_table must have q's batch size 2 rows, got shape \[3, 3\]",
        id="block_table_batch",
    ),
    pytest.param(
        True,
        {"block_table": lambda d, t: i32([[5, 1], [0, 6], [2, 3]], d).t()},
        ValueError,
        r"block_table must have a contiguous last dim, got strides \[1, 2\]",
        id="block_table_transposed",
    ),
    pytest.param(
        False,
        {"cache_seqlens": lambda d, t: i32([3, 10], d)},
        IndexError,
        r"sequence 1 would hold 11 positions \(cache_seqlens\[1\] = 10 plus the new keys\), past the cache's 10 "
        r"\(Smax\)",
        id="append_past_contiguous_cache",
    ),
    pytest.param(
        False,
        {"cache_seqlens": lambda d, t: i32([11, 9], d), "k_new": None, "v_new": None},
        IndexError,
        r"sequence 0 would hold 11 positions \(cache_seqlens\[0\] = 11\), past the cache's 10 \(Smax\)",
        id="cache_seqlens_past_contiguous_cache",
    ),
    pytest.param(
        True,
        {"cache_seqlens": lambda d, t: i32([3, 12], d)},
        IndexError,
        r"sequence 1 would hold 13 positions \(cache_seqlens\[1\] = 12 plus the new keys\), past the cache's 12 "
        r"\(block_table columns \* block_size\)",
        id="append_past_paged_cache",
    ),
    pytest.param(
        True,
        {"block_table": lambda d, t: i32([[5, 0, 2], [1, 7, 3]], d)},
        IndexError,
        r"block_table\[1, 1\] = 7 is not a block of the cache \(num_blocks = 7\)",
        id="block_index_past_end",
    ),
    pytest.param(
        True,
        {"block_table": lambda d, t: i32([[-1, 0, 2], [1, 6, 3]], d)},
        IndexError,
        r"block_table\[0, 0\] = -1 is not a block of the cache",
        id="block_index_negative",
    ),
    pytest.param(
        True,
        # Sequence 1 holds 8 positions (columns 0, 1) and appends at position 8, in column 2.
        {"cache_seqlens": lambda d, t: i32([3, 8], d), "block_table": lambda d, t: i32([[5, 0, 2], [1, 6, 30]], d)},
        IndexError,
        r"block_table\[1, 2\] = 30 is not a block of the cache",
        id="block_of_appended_key_past_end",
    ),
    pytest.param(
        False,
        {"cache_seqlens": lambda d, t: i32([-1, 9], d)},
        ValueError,
        r"cache_seqlens\[0\] must be >= 0, got -1",
        id="cache_seqlens_negative",
    ),
    pytest.param(
        False,
        {"cache_seqlens": None},
        ValueError,
        r"appending k_new and v_new needs cache_seqlens, the positions to write them at",
        id="append_without_cache_seqlens",
    ),
    pytest.param(
        False, {"v_new": None}, ValueError, r"k_new and v_new must be given together", id="k_new_without_v_new"
    ),
    pytest.param(
        False,
        {"k_new": lambda d, t: torch.randn(2, 2, 2, 16, dtype=t, device=d)},
        ValueError,
        r"k_new must have shape \(B, Sq, Hkv, D\) = \[2, 1, 2, 16\], got \[2, 2, 2, 16\]",
        id="k_new_seqlen",
    ),
    pytest.param(
        False,
        {"v_new": lambda d, t: torch.randn(2, 1, 1, 16, dtype=t, device=d)},
        ValueError,
        r"v_new must have shape \(B, Sq, Hkv, D\) = \[2, 1, 2, 16\], got \[2, 1, 1, 16\]",
        id="v_new_heads",
    ),
    pytest.param(
        False,
        {"k_new": lambda d, t: torch.randn(2, 2, 16, dtype=t, device=d)},
        ValueError,
        r"k_new must be a 4-D tensor \(B, Sq, Hkv, D\)",
        id="k_new_rank3",
    ),
    pytest.param(
        False,
        {"v_new": lambda d, t: torch.randn(2, 1, 2, 16, dtype=torch.float64, device=d)},
        TypeError,
        r"v_new must have q's dtype",
        id="v_new_dtype",
    ),
    pytest.param(
        False,
        {
            "k_cache": lambda d, t: torch.randn(3, 10, 2, 16, dtype=t, device=d),
            "v_cache": lambda d, t: torch.randn(3, 10, 2, 16, dtype=t, device=d),
        },
        ValueError,
        r"k_cache and v_cache must have q's batch size 2 \(or pass block_table for a paged cache\)",
        id="cache_batch",
    ),
    pytest.param(
        False,
        {"k_cache": lambda d, t: torch.randn(2, 10, 32, dtype=t, device=d)},
        ValueError,
        r"k_cache must be a 4-D tensor \(B, Smax, Hkv, D\)",
        id="k_cache_rank3",
    ),
    pytest.param(
        True,
        {"v_cache": lambda d, t: torch.randn(7, 4, 32, dtype=t, device=d)},
        ValueError,
        r"v_cache must be a 4-D tensor \(num_blocks, block_size, Hkv, D\)",
        id="paged_v_cache_rank3",
    ),
    pytest.param(
        False,
        {"v_cache": lambda d, t: torch.randn(2, 11, 2, 16, dtype=t, device=d)},
        ValueError,
        r"k_cache and v_cache must have the same shape",
        id="k_v_cache_shapes_differ",
    ),
    pytest.param(
        False,
        {"k_cache": lambda d, t: torch.randn(2, 10, 2, 16, dtype=torch.float64, device=d)},
        TypeError,
        r"k_cache must have q's dtype",
        id="k_cache_dtype",
    ),
    pytest.param(
        True,
        {
            "k_cache": lambda d, t: torch.randn(7, 0, 2, 16, dtype=t, device=d),
            "v_cache": lambda d, t: torch.randn(7, 0, 2, 16, dtype=t, device=d),
        },
        ValueError,
        r"block_size \(dim 1\) must be positive",
        id="paged_block_size_0",
    ),
    pytest.param(
        False,
        {
            "k_cache": lambda d, t: torch.randn(2, 10, 3, 16, dtype=t, device=d),
            "v_cache": lambda d, t: torch.randn(2, 10, 3, 16, dtype=t, device=d),
            "k_new": None,
            "v_new": None,
        },
        ValueError,
        r"Hq = 4 must be a multiple of the number of KV heads Hkv = 3",
        id="heads_not_multiple",
    ),
    pytest.param(
        False, {"num_splits": -1}, ValueError, r"num_splits must be >= 0 \(0 = heuristic\), got -1", id="splits"
    ),
    # causal defaults to True here.
    pytest.param(
        False, {"window_right": 3}, ValueError, r"causal=True means window_right = 0, got window_right = 3", id="causal"
    ),
    pytest.param(False, {"softcap": -1.0}, ValueError, r"softcap must be finite and >= 0", id="softcap_negative"),
]


@pytest.mark.parametrize("paged, replace, exc, pattern", KVCACHE_ERROR_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_kvcache_bad_arguments(device, paged, replace, exc, pattern):
    args = error_args(device, paged)
    dtype = args["q"].dtype
    args.update({n: r(device, dtype) if callable(r) else r for n, r in replace.items()})
    saved = [args[n].clone() for n in ("k_cache", "v_cache")]
    with pytest.raises(exc, match=r"^gqa\.forward_kvcache: ") as info:
        torch.ops.gqa.forward_kvcache(**args)
    assert re.search(pattern, str(info.value)), str(info.value)
    # Nothing was written before the error.
    for t, s in zip((args["k_cache"], args["v_cache"]), saved, strict=True):
        assert same_bits(t, s)


def test_forward_kvcache_unused_block_table_entries_are_not_checked():
    # Sequence 1 holds 9 + 1 positions: blocks in columns 0-2; sequence 0
    # holds 3 + 1: column 0 only.
    args = error_args("cpu", paged=True)
    args["block_table"] = i32([[5, -1, 99], [1, 6, 3]], "cpu")
    torch.ops.gqa.forward_kvcache(**args)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        pytest.param({"window": 3}, TypeError, r"window must be a \(left, right\) pair of ints", id="window_int"),
        pytest.param({"window": (1.5, 2)}, TypeError, r"window must be a \(left, right\) pair", id="window_float"),
        pytest.param(
            {"causal": True, "window": (4, 2)}, ValueError, r"causal=True means window_right = 0", id="causal"
        ),
        pytest.param({"num_splits": -2}, ValueError, r"num_splits must be >= 0", id="num_splits"),
    ],
)
def test_attention_kvcache_bad_arguments(kwargs, exc, pattern):
    args = error_args("cpu", paged=False)
    q, k_cache, v_cache, k_new, v_new, lens, _ = args.values()
    with pytest.raises(exc, match=pattern):
        gqa_ext.attention_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, **kwargs)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and gqa_ext's CUDA kernels")
def test_forward_kvcache_index_tensors_on_other_device():
    args = error_args("cuda", paged=True)
    args["block_table"] = args["block_table"].cpu()
    with pytest.raises(ValueError, match=r"block_table must be on q's device cuda:0, got cpu"):
        torch.ops.gqa.forward_kvcache(**args)


# -- torch.compile, opcheck -------------------------------------------------------


@pytest.fixture
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_decode_step_matches_eager(device, reset_dynamo):
    def step(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
        out, lse = gqa_ext.attention_kvcache(
            q * 0.5,
            k_cache,
            v_cache,
            k_new,
            v_new,
            cache_seqlens=cache_seqlens,
            block_table=block_table,
            softcap=5.0,
            return_lse=True,
        )
        return out * 2.0, lse, cache_seqlens + 1

    q, cache, k_new, v_new, lens = cache_case(16, device, default_dtype(device), 1)
    eager_cache = Cache(cache.k.clone(), cache.v.clone(), cache.block_table)
    expected_k = expected_after_append(cache.k, k_new, cache.block_table, lens)
    expected_v = expected_after_append(cache.v, v_new, cache.block_table, lens)
    expected = step(q, eager_cache.k, eager_cache.v, k_new, v_new, lens, eager_cache.block_table)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    got = compiled(q, cache.k, cache.v, k_new, v_new, lens, cache.block_table)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert same_bits(cache.k, eager_cache.k) and same_bits(cache.v, eager_cache.v)
    assert same_bits(cache.k, expected_k) and same_bits(cache.v, expected_v)
    assert counter.frame_count == 1


OPCHECK_SAMPLES = [
    pytest.param(None, False, torch.float32, {}, id="contiguous"),
    pytest.param(None, True, torch.float32, {"softcap": 2.0, "window_left": 9}, id="contiguous_append"),
    pytest.param(16, True, torch.bfloat16, {"causal": False, "num_splits": 2}, id="paged_append"),
    pytest.param(24, False, torch.float64, {"softmax_scale": 0.3}, id="paged"),
]


@pytest.mark.parametrize("block_size, append, dtype, options", OPCHECK_SAMPLES)
def test_opcheck_forward_kvcache(block_size, append, dtype, options):
    q, cache, k_new, v_new, lens = cache_case(block_size, "cpu", dtype, 2, heads_q=4, head_dim=16, append=append)
    args = (q, cache.k, cache.v, k_new, v_new, lens, cache.block_table)
    torch.library.opcheck(torch.ops.gqa.forward_kvcache.default, args, options)
