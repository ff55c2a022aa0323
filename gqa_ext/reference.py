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
