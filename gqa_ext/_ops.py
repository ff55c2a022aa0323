"""Fake kernels and autograd for the ops that gqa_ext._C defines."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.register_fake("gqa::forward")
def _forward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, heads_q, head_dim = q.shape
    torch._check(k.shape[2] > 0 and heads_q % k.shape[2] == 0, lambda: "Hq must be a multiple of Hkv")
    out = q.new_empty((batch, seqlen_q, heads_q, head_dim))
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("gqa::backward")
def _backward_fake(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("gqa::forward_varlen")
def _forward_varlen_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    total_q, heads_q, _ = q.shape
    torch._check(k.shape[1] > 0 and heads_q % k.shape[1] == 0, lambda: "Hq must be a multiple of Hkv")
    return q.new_empty(q.shape), q.new_empty((heads_q, total_q), dtype=torch.float32)


@torch.library.register_fake("gqa::backward_varlen")
def _backward_varlen_fake(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("gqa::forward_kvcache")
def _forward_kvcache_fake(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    cache_seqlens: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    num_splits: int = 0,
) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, heads_q, head_dim = q.shape
    torch._check(k_cache.shape[2] > 0 and heads_q % k_cache.shape[2] == 0, lambda: "Hq must be a multiple of Hkv")
    out = q.new_empty((batch, seqlen_q, heads_q, head_dim))
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("gqa::merge_states")
def _merge_states_fake(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:])


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, softmax_scale, causal, window_left, window_right, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    # lse is returned for callers that merge partial results; gradients flow
    # through out only.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.gqa.backward(
        grad_out, q, k, v, out, lse, *ctx.options, torch.are_deterministic_algorithms_enabled()
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("gqa::forward", _backward, setup_context=_setup_context)


def _setup_varlen_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.options = (max_seqlen_q, max_seqlen_k, *options)
    ctx.mark_non_differentiable(lse)


def _backward_varlen(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.gqa.backward_varlen(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        *ctx.options,
        torch.are_deterministic_algorithms_enabled(),
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("gqa::forward_varlen", _backward_varlen, setup_context=_setup_varlen_context)


def _double_backward(ctx, *grads: Tensor):
    raise RuntimeError(
        "gqa_ext: gradients of the attention gradients (double backward) are not supported; "
        "gqa.backward is differentiable only once"
    )


def _setup_backward_context(ctx, inputs, output) -> None:
    pass


# Without this, autograd would treat gqa.backward as constant and a double
# backward would silently return zeros.
torch.library.register_autograd("gqa::backward", _double_backward, setup_context=_setup_backward_context)
torch.library.register_autograd("gqa::backward_varlen", _double_backward, setup_context=_setup_backward_context)
