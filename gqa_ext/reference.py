"""Plain-PyTorch reference for gqa_ext's attention, in float64.

It states the semantics of ``torch.ops.gqa.forward`` exactly, and the tests
compare the kernels against it. It materializes the full score matrix, so it
is for small shapes only.
"""

from __future__ import annotations

import math

import torch


def visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return the (Sq, Sk) boolean mask of the keys each query sees.

    Masks align to the bottom-right corner: query ``i`` sees key ``j`` iff
    ``i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right``, where
    -1 means unbounded and ``causal`` means ``window_right = 0``.
    """
    if causal:
        window_right = 0
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    diag = i + seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        mask &= j >= diag - window_left
    if window_right >= 0:
        mask &= j <= diag + window_right
    return mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped query attention in float64, differentiable.

    Args:
        q: (B, Sq, Hq, D).
        k, v: (B, Sk, Hkv, D) with Hq a multiple of Hkv; query head ``h``
            uses KV head ``h // (Hq // Hkv)``.
        softmax_scale: multiplies the scores; default ``1 / sqrt(D)``.
        causal, window_left, window_right: the mask, see :func:`visible_mask`.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``
            after scaling.

    Returns:
        ``(out, lse)``: out (B, Sq, Hq, D) and lse (B, Hq, Sq), both float64.
        A query that sees no key gets out 0 and lse -inf.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    qd = q.double()
    kd = k.double().repeat_interleave(group, dim=2)
    vd = v.double().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visible_mask(
        seqlen_q, seqlen_k, causal=causal, window_left=window_left, window_right=window_right, device=q.device
    )
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows that see nothing: lse is -inf; shift by 0 instead so that exp gives
    # exact zeros and no NaN reaches the gradients.
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - shift.unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vd)
    return out, lse


def _options(
    softmax_scale: float | None, causal: bool, window_left: int, window_right: int, softcap: float
) -> dict[str, object]:
    return {
        "softmax_scale": softmax_scale,
        "causal": causal,
        "window_left": window_left,
        "window_right": window_right,
        "softcap": softcap,
    }


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences of different lengths, in float64, differentiable.

    Sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v; each is attended on its
    own with :func:`attention_ref` (masks aligned to that sequence's
    bottom-right corner). Rows of q after ``cu_seqlens_q[-1]`` are not covered.

    Args:
        q: (Tq, Hq, D).
        k, v: (Tk, Hkv, D).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) integer offsets, starting at 0.
        softmax_scale, causal, window_left, window_right, softcap: as for
            :func:`attention_ref`.

    Returns:
        ``(out, lse)``: out (Tq, Hq, D) and lse (Hq, Tq), both float64.
    """
    cq = [int(c) for c in cu_seqlens_q.tolist()]
    ck = [int(c) for c in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k differ in length: {len(cq)} and {len(ck)}")
    options = _options(softmax_scale, causal, window_left, window_right, softcap)
    heads_q = q.shape[1]
    # Empty seeds, so that a batch of no sequences gives (0, Hq, D) and (Hq, 0);
    # out's is q's rows 0:0, so that it is differentiable even then.
    outs = [q[:0].to(torch.float64)]
    lses = [q.new_zeros((heads_q, 0), dtype=torch.float64)]
    for b in range(len(cq) - 1):
        qb = q[cq[b] : cq[b + 1]].unsqueeze(0)
        kb = k[ck[b] : ck[b + 1]].unsqueeze(0)
        vb = v[ck[b] : ck[b + 1]].unsqueeze(0)
        out_b, lse_b = attention_ref(qb, kb, vb, **options)
        outs.append(out_b[0])
        lses.append(lse_b[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def kvcache_sequence(cache: torch.Tensor, b: int, length: int, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``length`` positions of sequence ``b`` of a KV cache, (length, Hkv, D).

    The cache is contiguous (B, Smax, Hkv, D), or paged (num_blocks,
    block_size, Hkv, D) with ``block_table`` (B, max_blocks): position ``p`` of
    sequence ``b`` is ``cache[block_table[b, p // block_size], p % block_size]``.
    The result is gathered (a copy for a paged cache, a view otherwise).
    """
    if block_table is None:
        return cache[b, :length]
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table[b].to(device=cache.device, dtype=torch.long)[pos // block_size]
    return cache[blocks, pos % block_size]


def attention_kvcache_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries over a KV cache, in float64; does not modify its inputs.

    Sequence ``b``'s keys are the first ``cache_seqlens[b]`` positions of its
    cache (see :func:`kvcache_sequence`), followed by ``k_new[b]`` (values
    likewise) when given; the queries attend over them with
    :func:`attention_ref`, so masks align to the bottom-right corner: the last
    query sits at the last key.

    Args:
        q: (B, Sq, Hq, D).
        k_cache, v_cache: (B, Smax, Hkv, D), or (num_blocks, block_size, Hkv, D)
            with ``block_table``.
        k_new, v_new: (B, Sq, Hkv, D) keys and values appended after the
            cached ones, or None.
        cache_seqlens: (B,) integer, positions already in the cache; default:
            all of them, Smax or ``max_blocks * block_size``.
        block_table: (B, max_blocks) integer block indices of a paged cache.
        softmax_scale, causal, window_left, window_right, softcap: as for
            :func:`attention_ref` (``causal`` defaults to True here).

    Returns:
        ``(out, lse)``: out (B, Sq, Hq, D) and lse (B, Hq, Sq), both float64.
    """
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    batch = q.shape[0]
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    lengths = [capacity] * batch if cache_seqlens is None else [int(n) for n in cache_seqlens.tolist()]
    options = _options(softmax_scale, causal, window_left, window_right, softcap)
    outs, lses = [], []
    for b in range(batch):
        kb = kvcache_sequence(k_cache, b, lengths[b], block_table)
        vb = kvcache_sequence(v_cache, b, lengths[b], block_table)
        if k_new is not None:
            kb = torch.cat([kb, k_new[b].to(kb.dtype)], dim=0)
            vb = torch.cat([vb, v_new[b].to(vb.dtype)], dim=0)
        out_b, lse_b = attention_ref(q[b : b + 1], kb.unsqueeze(0), vb.unsqueeze(0), **options)
        outs.append(out_b)
        lses.append(lse_b)
    if not outs:
        return q.new_zeros(q.shape, dtype=torch.float64), q.new_zeros((0, q.shape[2], q.shape[1]), dtype=torch.float64)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=0)


def merge_states_ref(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges attention results over disjoint key sets into the result over their union, in float64.

    Args:
        outs: (N, ..., H, D), part ``i``'s normalized output.
        lses: (N, ..., H), part ``i``'s log-sum-exp of scores (-inf for a part
            that saw no key).

    Returns:
        ``(out, lse)``: ``lse = logsumexp_i lses[i]`` and
        ``out = sum_i exp(lses[i] - lse) * outs[i]``, (..., H, D) and (..., H),
        float64. A row where every part is -inf gets out 0 and lse -inf.
    """
    if lses.shape != outs.shape[:-1]:
        raise ValueError(f"lses must have outs' shape without its last dim, got {tuple(lses.shape)}")
    lses = lses.double()
    lse = torch.logsumexp(lses, dim=0)
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - shift)
    out = (weights.unsqueeze(-1) * outs.double()).sum(dim=0)
    return out, lse
