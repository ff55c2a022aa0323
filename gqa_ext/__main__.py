"""``gqa-ext`` (``python -m gqa_ext``): build info and a demo, the benchmark, KV-cache sizes, MHA-to-GQA conversion.

    gqa-ext [info]          what this build contains, and a short demo
    gqa-ext bench [...]     gqa_ext against SDPA and FlexAttention on model shapes (gqa_ext.bench)
    gqa-ext memory [...]    KV-cache bytes of each model under MHA, GQA and MQA (gqa_ext.memory)
    gqa-ext convert [...]   a multi-head checkpoint to GQA by mean-pooling K/V heads (gqa_ext.convert)

The demo runs a LLaMA-3-8B-shaped attention layer (32 query heads sharing 8
KV heads) forward and backward on the CPU and checks it against the float64
reference and against PyTorch's SDPA.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch
import torch.nn.functional as F

import gqa_ext
from gqa_ext import bench, convert, memory


def info() -> int:
    """Print build_info() and run the demo; returns the exit status."""
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
    print("Speed against SDPA: gqa-ext bench --quick (all cases: gqa-ext bench); KV-cache sizes: gqa-ext memory")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``gqa-ext`` command; returns the exit status (the console script exits with it)."""
    parser = argparse.ArgumentParser(
        prog="gqa-ext", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,memory,convert}")
    sub.add_parser("info", help="what this build contains, and a short demo (the default)")
    bench_parser = sub.add_parser(
        "bench",
        help="benchmark against SDPA and FlexAttention",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    memory_parser = sub.add_parser("memory", help="KV-cache sizes under MHA, GQA and MQA", description=memory.__doc__)
    memory.add_arguments(memory_parser)
    convert_parser = sub.add_parser(
        "convert",
        help="convert a multi-head checkpoint to GQA",
        description=convert.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_arguments(convert_parser)

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run(args, command=shlex.join(["gqa-ext", *argv]))
    if args.command == "memory":
        return memory.run(args)
    if args.command == "convert":
        return convert.run(args)
    return info()


if __name__ == "__main__":
    sys.exit(main())
