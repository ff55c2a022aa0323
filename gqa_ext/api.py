"""The Python API of gqa_ext."""

from __future__ import annotations

import torch
from torch import Tensor

_LAYOUTS = ("bshd", "bhsd")


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
    if not (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        raise TypeError(f"gqa_ext.attention: window must be a (left, right) pair of ints, got {window!r}")
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
