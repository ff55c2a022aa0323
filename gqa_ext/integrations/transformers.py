"""gqa_ext as an attention backend of HF transformers: ``attn_implementation="gqa_ext"``.

Usage::

    import gqa_ext.integrations.transformers as gqa_hf

    gqa_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="gqa_ext")

:func:`register` adds :func:`attention_forward` to transformers' attention
interface and :func:`padding_mask` to its mask interface under one name.
Both are needed: a name with no mask function gets no mask at all from
transformers, and padded batches would be attended as if unpadded.

What the backend does with what transformers passes:

- Query, key and value arrive as ``(B, H, S, D)``; their ``(B, S, H, D)``
  transposes are views, which the ops take as they are. K/V are never
  repeated: each K/V head serves its group of query heads inside the kernel.
  The output is ``(B, S, Hq, D)``, the layout the model's ``o_proj`` reshape
  expects.
- Masks are kept as what the kernels can do exactly: causal (aligned
  bottom-right, which is where the new tokens sit after a KV cache's past),
  the models' sliding windows, softcap and scale. The mask interface gives the
  attention function only the 2-D padding mask, or None when nothing is
  padded, as for FlashAttention-2.
- Padded batches are unpadded to :func:`gqa_ext.attention_varlen`, attended
  and padded back, the way transformers' flash-attention-2 backend does:
  padded query rows come back as zeros. This gathers the valid rows (a
  copy); unpadded batches take no copy.
- Packed sequences (one row holding several sequences, marked by position ids
  that restart, or by ``cu_seq_lens_q``/``cu_seq_lens_k`` from a flattening
  collator) also go to the variable-length op.
- What it cannot do exactly is refused with an error, never approximated:
  attention dropout, 4-D custom masks, mask overlays such as image-token
  blocks or chunked attention, and attention sinks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

import gqa_ext

NAME = "gqa_ext"

# The parts of transformers' mask functions (masking_utils) that the kernels
# reproduce: causal or bidirectional attention, the causal sliding window
# (passed again to attention_forward as ``sliding_window``), the and-combinator
# that joins them, and packed sequences (handled from position ids). Anything
# else in a mask function is an overlay the kernels would silently drop.
_EXACT_MASK_PARTS = {
    "causal_mask_function",
    "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "and_masks.<locals>.and_mask",
    "packed_sequence_mask_function.<locals>.inner_mask",
    "remap_positions_for_packed_sequence.<locals>.inner_mask",
}


def register(name: str = NAME) -> None:
    """Register gqa_ext with transformers under ``name``, so that ``attn_implementation=name`` selects it.

    Registers :func:`attention_forward` with ``transformers.AttentionInterface``
    and :func:`padding_mask` with ``transformers.AttentionMaskInterface``.
    Calling it again is harmless.
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            'gqa_ext.integrations.transformers needs transformers: pip install "gqa_ext[transformers]"'
        ) from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)


def _mask_parts(fn: Callable) -> set[str]:
    """The qualified names of ``fn`` and of every function its closures hold, recursively."""
    names, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if isinstance(f, (tuple, list)):
            stack.extend(f)
        elif callable(f):
            names.add(getattr(f, "__qualname__", repr(f)))
            for cell in getattr(f, "__closure__", None) or ():
                stack.append(cell.cell_contents)
    return names


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """transformers' mask-interface function for gqa_ext: the 2-D padding mask, or None.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: the mask's shape
            and offsets as transformers computes them.
        mask_function: the mask pattern. Only causal, bidirectional, the causal
            sliding window and packed sequences are accepted: the attention
            function applies them itself.
        attention_mask: bool (B, past + q_length), True for real tokens.

    Returns:
        The last ``kv_length`` columns of ``attention_mask`` (a KV cache with a
        window keeps only those keys), or None when that has no padding and
        covers every key.

    Raises:
        NotImplementedError: for a mask pattern the kernels cannot reproduce.
    """
    if mask_function is not None:
        unsupported = _mask_parts(mask_function) - _EXACT_MASK_PARTS
        if unsupported or kwargs.get("use_vmap", False):
            raise NotImplementedError(
                "attn_implementation='gqa_ext' supports causal and bidirectional masks, sliding windows, padding and "
                f"packed sequences; this model's mask also uses {sorted(unsupported) or 'a custom mask function'}, "
                "which the kernels cannot apply. Use attn_implementation='sdpa' or 'eager' for this model."
            )
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _cu_seqlens(lengths: Tensor) -> Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _packed_cu_seqlens(position_ids: Tensor | None, batch: int, seqlen_q: int, seqlen_k: int) -> Tensor | None:
    """cu_seqlens of the sequences packed into one row, from position ids that restart; None if not packed."""
    if position_ids is None or batch != 1 or seqlen_q != seqlen_k or seqlen_q == 1:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != seqlen_q:
        return None
    starts = pos == pos.min()
    if not bool((pos[1:] != pos[:-1] + 1).any()):
        return None
    if not bool(starts[0]):
        raise ValueError("gqa_ext: packed position_ids must start a sequence at the first token")
    begin = starts.nonzero().reshape(-1).to(torch.int32)
    return torch.cat([begin, begin.new_tensor([seqlen_q])])


def _gather_rows(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of ``x`` (B, S, H, D) where ``mask`` (B, S) is True, as (T, H, D), and their (batch, position)."""
    b, s = mask.nonzero(as_tuple=True)
    return x[b, s], b, s


def _attend_padded(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, options: dict) -> Tensor:
    """Attention of a padded batch (q, k, v in (B, S, H, D)) through the variable-length op.

    The queries are the last ``Sq`` columns of the mask, as transformers lays
    them out with or without a KV cache. Within each sequence the valid
    queries are therefore the last valid keys, which is what the op's
    bottom-right alignment assumes, with padding on either side or in between.
    """
    batch, seqlen_q = q.shape[:2]
    seqlen_mask = mask.shape[1]
    if mask.shape[0] != batch or seqlen_mask < seqlen_q or seqlen_mask > k.shape[1]:
        raise ValueError(
            f"gqa_ext: attention_mask of shape {tuple(mask.shape)} does not fit queries of length {seqlen_q} "
            f"and keys of length {k.shape[1]} in a batch of {batch}"
        )
    # A static cache is longer than the mask: the slots past it are unused.
    k, v = k[:, :seqlen_mask], v[:, :seqlen_mask]
    mask_q = mask[:, seqlen_mask - seqlen_q :]
    lengths_q, lengths_k = mask_q.sum(1, dtype=torch.int32), mask.sum(1, dtype=torch.int32)
    q_rows, b_q, s_q = _gather_rows(q, mask_q)
    k_rows, b_k, s_k = _gather_rows(k, mask)
    v_rows = v[b_k, s_k]
    out_rows = gqa_ext.attention_varlen(
        q_rows,
        k_rows,
        v_rows,
        _cu_seqlens(lengths_q),
        _cu_seqlens(lengths_k),
        int(lengths_q.max()),
        int(lengths_k.max()),
        **options,
    )
    out = out_rows.new_zeros(batch, seqlen_q, *out_rows.shape[1:])
    return out.index_put((b_q, s_q), out_rows)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-interface function for gqa_ext.

    Args:
        module: the attention layer (its ``is_causal`` is the default for ``is_causal``).
        query: (B, Hq, Sq, D).
        key, value: (B, Hkv, Sk, D), Hq a multiple of Hkv, including any KV-cache past.
        attention_mask: None or the bool (B, L) padding mask of :func:`padding_mask`.
        dropout: must be 0: the kernels have no attention dropout.
        scaling: the softmax scale (default 1/sqrt(D)).
        sliding_window: a query sees itself and the ``sliding_window - 1`` keys before it.
        softcap: Gemma 2's logit softcap (None or 0: none).
        is_causal: overrides ``module.is_causal``.
        **kwargs: ``position_ids`` and ``cu_seq_lens_q``/``cu_seq_lens_k``/
            ``max_length_q``/``max_length_k`` mark packed sequences; the rest is ignored.

    Returns:
        ``(out, None)``: out (B, Sq, Hq, D); transformers has no attention weights from this backend.
    """
    if dropout:
        raise NotImplementedError(
            f"attn_implementation='gqa_ext' has no attention dropout (got dropout={dropout}); "
            "set the model's attention_dropout to 0"
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='gqa_ext' does not support attention sinks (s_aux)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"attn_implementation='gqa_ext' takes padding masks only; got a {attention_mask.dim()}-D attention mask. "
            "Pass a 2-D attention_mask (B, S) or use attn_implementation='sdpa' for custom masks."
        )
    if kwargs.get("output_attentions", False):
        warnings.warn("attn_implementation='gqa_ext' returns no attention weights", stacklevel=2)
    causal = module.is_causal if is_causal is None else is_causal
    if sliding_window is not None and not causal:
        raise NotImplementedError("attn_implementation='gqa_ext' supports sliding windows in causal attention only")
    options = dict(
        causal=causal,
        softmax_scale=scaling,
        window=(-1, -1) if sliding_window is None else (sliding_window - 1, -1),
        softcap=softcap or 0.0,
    )
    # (B, S, H, D) views of transformers' (B, H, S, D) tensors: no copies.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, seqlen_q = q.shape[:2]

    if attention_mask is not None:
        return _attend_padded(q, k, v, attention_mask, options), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        cu_q = cu_k = _packed_cu_seqlens(kwargs.get("position_ids"), batch, seqlen_q, k.shape[1])
    if cu_q is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        out = gqa_ext.attention_varlen(
            q.reshape(-1, *q.shape[2:]),
            k.reshape(-1, *k.shape[2:]),
            v.reshape(-1, *v.shape[2:]),
            cu_q.to(torch.int32),
            cu_k.to(torch.int32),
            int(cu_q.diff().max()) if max_q is None else int(max_q),
            int(cu_k.diff().max()) if max_k is None else int(max_k),
            **options,
        )
        return out.view(batch, seqlen_q, *out.shape[1:]), None

    return gqa_ext.attention(q, k, v, **options), None
