"""gqa_ext's CPU kernels side by side with SDPA's CPU flash kernel.

Each case runs both implementations alternately in one process and reports
median times and their ratio, since the machine's speed drifts between runs.

    python benchmarks/cpu_vs_sdpa.py [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import gqa_ext


def _sdpa(q, k, v, causal):
    # SDPA's is_causal aligns top-left; every case here has Sq == Sk or Sq == 1
    # (where no mask is needed), so both mean the same thing.
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)


def _ours(q, k, v, causal):
    return gqa_ext.attention(q, k, v, causal=causal)


def _case(name, B, Sq, Sk, Hq, Hkv, D, dtype, causal, backward):
    def make():
        q = torch.randn(B, Sq, Hq, D, dtype=dtype, requires_grad=backward)
        k = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=backward)
        v = torch.randn(B, Sk, Hkv, D, dtype=dtype, requires_grad=backward)
        return q, k, v

    pairs = Sq * Sk - (Sq * (Sq - 1) // 2 if causal and Sq == Sk else 0)
    flops = 4 * B * Hq * D * pairs * (3.5 if backward else 1.0)
    kv_bytes = 2 * B * Sk * Hkv * D * torch.finfo(dtype).bits // 8
    return dict(name=name, make=make, causal=causal, backward=backward, flops=flops, kv_bytes=kv_bytes)


CASES = [
    _case("prefill fp32 causal S2048 32/8 D128", 1, 2048, 2048, 32, 8, 128, torch.float32, True, False),
    _case("prefill bf16 causal S2048 32/8 D128", 1, 2048, 2048, 32, 8, 128, torch.bfloat16, True, False),
    _case("fwd+bwd fp32 causal S1024 32/8 D128", 1, 1024, 1024, 32, 8, 128, torch.float32, True, True),
    _case("fwd+bwd bf16 causal S1024 32/8 D128", 1, 1024, 1024, 32, 8, 128, torch.bfloat16, True, True),
    _case("decode fp32 Sk4096 32/8 D128", 1, 1, 4096, 32, 8, 128, torch.float32, False, False),
    _case("decode bf16 Sk4096 32/8 D128", 1, 1, 4096, 32, 8, 128, torch.bfloat16, False, False),
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn, case, inputs) -> float:
    q, k, v = inputs
    t0 = time.perf_counter()
    out = fn(q, k, v, case["causal"])
    if case["backward"]:
        out.backward(torch.ones_like(out))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--case", default="", help="substring of the case names to run")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        if args.case not in case["name"]:
            continue
        inputs = case["make"]()
        times = {"gqa_ext": [], "sdpa": []}
        fns = {"gqa_ext": _ours, "sdpa": _sdpa}
        for fn in fns.values():
            _time(fn, case, inputs)  # warm-up
        for _ in range(args.reps):
            for name, fn in fns.items():
                times[name].append(_time(fn, case, inputs))
        med = {n: statistics.median(t) for n, t in times.items()}
        row = dict(
            case=case["name"],
            gqa_ext_ms=med["gqa_ext"] * 1e3,
            sdpa_ms=med["sdpa"] * 1e3,
            speedup=med["sdpa"] / med["gqa_ext"],
            gqa_ext_gflops=case["flops"] / med["gqa_ext"] / 1e9,
            gqa_ext_kv_gbps=case["kv_bytes"] / med["gqa_ext"] / 1e9,
        )
        rows.append(row)
        print(
            f"{row['case']:<40} gqa_ext {row['gqa_ext_ms']:9.2f} ms  sdpa {row['sdpa_ms']:9.2f} ms  "
            f"x{row['speedup']:5.2f}  {row['gqa_ext_gflops']:7.1f} GFLOP/s  {row['gqa_ext_kv_gbps']:6.2f} GB/s K/V",
            flush=True,
        )
    if args.json:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
        ).stdout.strip()
        meta = dict(
            date=datetime.date.today().isoformat(),
            commit=commit,
            command=" ".join(
                ["python", os.path.relpath(sys.argv[0], os.path.join(os.path.dirname(__file__), "..")), *sys.argv[1:]]
            ),
            device=f"CPU: {_cpu_name()}, {os.cpu_count()} cores",
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            build=gqa_ext.build_info(),
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
