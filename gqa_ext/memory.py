"""``gqa-ext memory``: the KV cache of each model in gqa_ext.models under MHA, its GQA, and MQA.

A decoder caches K and V of every past token in every layer, so the cache
grows with ``layers * 2 * Hkv * D * bytes`` per token: sharing KV heads
(GQA, MQA) divides it, and the memory traffic of each decode step with it.
"""

from __future__ import annotations

import argparse
import json
import sys

from gqa_ext.models import MODELS

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


def kv_cache_report(dtype: str = "bf16", context: int = 1024) -> list[dict]:
    """Per model: KV-cache bytes per token and per ``context`` tokens under MHA, GQA and MQA.

    MHA gives every query head its own KV head (Hkv = Hq), GQA is the model's
    own Hkv, MQA is Hkv = 1. The saving factors are the ratios of the sizes.
    """
    nbytes = DTYPE_BYTES[dtype]
    rows = []
    for m in MODELS.values():
        per_token = {
            "mha": m.kv_bytes_per_token(nbytes, heads_kv=m.heads_q),
            "gqa": m.kv_bytes_per_token(nbytes),
            "mqa": m.kv_bytes_per_token(nbytes, heads_kv=1),
        }
        rows.append(
            dict(
                model=m.name,
                num_layers=m.num_layers,
                heads_q=m.heads_q,
                heads_kv=m.heads_kv,
                head_dim=m.head_dim,
                dtype=dtype,
                context=context,
                bytes_per_token=per_token,
                bytes_per_sequence={k: v * context for k, v in per_token.items()},
                saving_gqa_vs_mha=per_token["mha"] / per_token["gqa"],
                saving_mqa_vs_gqa=per_token["gqa"] / per_token["mqa"],
            )
        )
    return rows


def format_bytes(n: float) -> str:
    """Binary units: 131072 -> '128 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(rows: list[dict]) -> str:
    """The report as a fixed-width table."""
    dtype, context = rows[0]["dtype"], rows[0]["context"]
    lines = [
        f"KV cache (K and V, all layers), {dtype}: per token, and per sequence of {context} tokens",
        f"{'model':<12}{'layers':>7}{'Hq':>4}{'Hkv':>4}{'D':>5} |"
        f"{'MHA/token':>11}{'GQA/token':>11}{'MQA/token':>11} |"
        f"{'MHA/seq':>11}{'GQA/seq':>11}{'MQA/seq':>11} |{'MHA/GQA':>8}{'GQA/MQA':>8}",
    ]
    for r in rows:
        tok, seq = r["bytes_per_token"], r["bytes_per_sequence"]
        lines.append(
            f"{r['model']:<12}{r['num_layers']:>7}{r['heads_q']:>4}{r['heads_kv']:>4}{r['head_dim']:>5} |"
            + "".join(f"{format_bytes(tok[k]):>11}" for k in ("mha", "gqa", "mqa"))
            + " |"
            + "".join(f"{format_bytes(seq[k]):>11}" for k in ("mha", "gqa", "mqa"))
            + f" |{r['saving_gqa_vs_mha']:>7.3g}x{r['saving_mqa_vs_gqa']:>7.3g}x"
        )
    lines.append(
        "MHA: Hkv = Hq; GQA: the model's Hkv; MQA: Hkv = 1. Every layer caches the whole context "
        "(gemma2-9b's local layers could keep only their 4096-token window)."
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gqa-ext memory``."""
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="cache dtype (default bf16)")
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    """Prints the report; returns the exit status."""
    if args.context < 1:
        print("error: --context must be >= 1", file=sys.stderr)
        return 2
    rows = kv_cache_report(args.dtype, args.context)
    print(json.dumps(rows, indent=1) if args.json else format_report(rows))
    return 0
