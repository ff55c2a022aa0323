"""The Python API of gqa_ext."""

from __future__ import annotations

import torch
from torch import Tensor

_LAYOUTS = ("bshd", "bhsd")


def _check_window(fn: str, window: tuple[int, int]) -> None:
    if not (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        raise TypeError(f"{fn}: window must be a (left, right) pair of ints, got {window!r}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    layout: str = "bshd",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Grouped query attention, differentiable.

    Args:
        q: queries, (B, Sq, Hq, D) for ``layout="bshd"`` or (B, Hq, Sq, D) for
            ``layout="bhsd"`` (SDPA's layout, taken through a view, no copy).
        k, v: keys and values, (B, Sk, Hkv, D) or (B, Hkv, Sk, D), with Hq a
            multiple of Hkv. Query head ``h`` attends with KV head
            ``h // (Hq // Hkv)``. Any strides work if the last dim is contiguous.
        causal: mask future keys, aligned to the bottom-right corner (as
            FlashAttention >= 2.1; SDPA's ``is_causal`` aligns top-left, which
            differs when Sq != Sk). Same as ``window=(window[0], 0)``.
        softmax_scale: multiplies the scores; default ``1 / sqrt(D)``.
        window: ``(left, right)``: query ``i`` sees key ``j`` iff
            ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; -1 is unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``
            after scaling (Gemma 2).
        layout: ``"bshd"`` or ``"bhsd"``, for q, k, v and the output alike.
        return_lse: also return the log-sum-exp of each query's scores,
            (B, Hq, Sq) float32 in natural log, -inf for a query that sees no
            key (its output is 0). lse carries no gradient.

    Returns:
        The output in q's layout and dtype, and the lse if ``return_lse``.

    The backward is bitwise repeatable under
    ``torch.use_deterministic_algorithms(True)``.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"gqa_ext.attention: layout must be one of {_LAYOUTS}, got {layout!r}")
    _check_window("gqa_ext.attention", window)
    if layout == "bhsd":
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(
                    f"gqa_ext.attention: {name} must be a 4-D tensor (B, H, S, D) for layout='bhsd', "
                    f"got a {t.dim()}-D tensor of shape {tuple(t.shape)}"
                )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = torch.ops.gqa.forward(q, k, v, softmax_scale, causal, window[0], window[1], softcap)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Grouped query attention over packed sequences of different lengths, differentiable.

    Args:
        q: (Tq, Hq, D), the queries of all sequences one after another.
        k, v: (Tk, Hkv, D), likewise, with Hq a multiple of Hkv.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1) offsets on q's device:
            sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``. Empty
            sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence's lengths.
        causal, softmax_scale, window, softcap: as in :func:`attention`;
            masks align to the bottom-right corner of each sequence.
        return_lse: also return the lse, (Hq, Tq) float32.

    Returns:
        The output (Tq, Hq, D), and the lse if ``return_lse``.
    """
    _check_window("gqa_ext.attention_varlen", window)
    out, lse = torch.ops.gqa.forward_varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        causal,
        window[0],
        window[1],
        softcap,
    )
    return (out, lse) if return_lse else out


def attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    *,
    cache_seqlens: Tensor | None = None,
    block_table: Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    num_splits: int = 0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of new queries over a KV cache, appending new keys and values first.

    For decoding (Sq = 1), speculative decoding and chunked prefill. There is
    no backward.

    Args:
        q: (B, Sq, Hq, D).
        k_cache, v_cache: the cache, contiguous ``(B, Smax, Hkv, D)`` or paged
            ``(num_blocks, block_size, Hkv, D)`` with ``block_table``.
        k_new, v_new: (B, Sq, Hkv, D), written in place into the caches at
            positions ``cache_seqlens[b] + i`` before attending.
        cache_seqlens: int32 (B,): tokens already cached per sequence (not
            changed). Default: the whole cache (Smax, or the block table's
            ``max_blocks * block_size``).
        block_table: int32 (B, max_blocks): position ``p`` of sequence ``b``
            is row ``p % block_size`` of block ``block_table[b, p // block_size]``.
        causal, softmax_scale, window, softcap: as in :func:`attention`,
            aligned bottom-right: sequence ``b`` has ``cache_seqlens[b]`` keys,
            plus Sq when ``k_new`` is given.
        num_splits: key splits per sequence; 0 chooses, 1 means none.
        return_lse: also return the lse, (B, Hq, Sq) float32.

    Returns:
        The output (B, Sq, Hq, D), and the lse if ``return_lse``.
    """
    _check_window("gqa_ext.attention_kvcache", window)
    out, lse = torch.ops.gqa.forward_kvcache(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens,
        block_table,
        softmax_scale,
        causal,
        window[0],
        window[1],
        softcap,
        num_splits,
    )
    return (out, lse) if return_lse else out


def merge_states(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge attention results computed over disjoint sets of keys.

    Part ``i`` is ``outs[i]`` with its log-sum-exp ``lses[i]``; the result is
    what attention over the union of the key sets gives:
    ``lse = log(sum_i exp(lses[i]))`` and ``out = sum_i exp(lses[i] - lse) * outs[i]``,
    computed in float32. Rows where every part is -inf get 0 and -inf.

    Args:
        outs: (N, ..., H, D), float32, bfloat16 or float16.
        lses: (N, ..., H) float32, outs' shape without its last dim. The
            attention ops return lse as (B, H, S); for outputs (B, S, H, D)
            pass ``lse.transpose(-1, -2)``.

    Returns:
        ``(out, lse)``: out (..., H, D) in outs' dtype, lse (..., H) float32.
    """
    return torch.ops.gqa.merge_states(outs, lses)
