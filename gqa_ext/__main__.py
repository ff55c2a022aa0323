"""``python -m gqa_ext``: what this build contains, and a short demo.

The demo runs a LLaMA-3-8B-shaped attention layer (32 query heads sharing 8
KV heads) forward and backward on the CPU and checks it against the float64
reference and against PyTorch's SDPA.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import gqa_ext


def main() -> None:
    """Print build_info() and run the demo (the ``gqa-ext`` command)."""
    print("gqa_ext build:", json.dumps(gqa_ext.build_info(), indent=2))
    torch.manual_seed(0)
    batch, seqlen, heads_q, heads_kv, head_dim = 1, 333, 32, 8, 128
    q = torch.randn(batch, seqlen, heads_q, head_dim, requires_grad=True)
    k = torch.randn(batch, seqlen, heads_kv, head_dim, requires_grad=True)
    v = torch.randn(batch, seqlen, heads_kv, head_dim, requires_grad=True)

    out = gqa_ext.attention(q, k, v, causal=True)
    out.sum().backward()
    ref, _ = gqa_ext.attention_ref(q.detach(), k.detach(), v.detach(), causal=True)
    sdpa = F.scaled_dot_product_attention(
        q.detach().transpose(1, 2),
        k.detach().transpose(1, 2),
        v.detach().transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
    ).transpose(1, 2)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    print(f"causal GQA {heads_q}/{heads_kv} heads, S={seqlen}, D={head_dim}, float32 on CPU:")
    print(f"  relative error vs float64 reference: {rel(out.detach(), ref):.2e}")
    print(f"  relative difference vs torch SDPA:   {rel(out.detach(), sdpa):.2e}")
    print(f"  gradients: dq {tuple(q.grad.shape)}, dk {tuple(k.grad.shape)}, dv {tuple(v.grad.shape)}")
    print("Speed against SDPA: python benchmarks/cpu_vs_sdpa.py")


if __name__ == "__main__":
    main()
