"""gqa_ext's CUDA forward side by side with SDPA's CUDA backends and FlexAttention.

Every case runs all implementations alternately in one process, on the same
inputs, after checking each one's output against a float64 reference on a
slice of the problem (a wrong output is reported WRONG and not timed). It
reports median times, TFLOP/s for prefill, K/V read bandwidth for decode, the
percentage of ceilings measured in the same run, and the ratio of the best
SDPA backend's time to ours. The short table is printed last.

    python benchmarks/gpu_vs_sdpa.py [--quick] [--case SUBSTRING] [--json out.json]

Exit status: 0 if our op ran and was right in every case run, 1 if it raised
or was wrong in some case (the others still run) or no case ran at all, 2 if
the benchmark could not start (no CUDA device, gqa_ext not importable).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPE = torch.bfloat16
HEAD_DIM = 128
# K/V bigger than this are skipped: B=64 with 65536 keys would need 17 GB.
MAX_KV_BYTES = 16e9
# Written between timed decode calls: more than the H200's 60 MB L2, so a
# small K/V cache is read from HBM, as it would be in a model with many layers.
L2_FLUSH_BYTES = 256 << 20
# Relative error ||out - ref|| / ||ref|| allowed on the checked slices. bf16
# outputs of a correct kernel land near 3e-3; a wrong one lands near 1.
REL_TOL = 2e-2
# With --time-budget, FlexAttention is left out of the cases started after
# this share of the budget.
FLEX_BUDGET_SHARE = 0.6
# Our lse is float32 from the same inputs; a correct kernel is within ~1e-5.
LSE_ATOL = 1e-2

OURS = "ours"
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}
FLEX = "flex"
IMPLS = [OURS, *SDPA_BACKENDS, FLEX]
# Column titles of the short table.
SHORT = {OURS: "ours", "sdpa_flash": "flash", "sdpa_efficient": "effic", "sdpa_cudnn": "cudnn", FLEX: "flex"}

# Status of an implementation in a case.
OK, WRONG, UNSUPPORTED, ERROR, NOT_RUN = "ok", "WRONG", "unsupported", "error", "not run"


@dataclass(frozen=True)
class Case:
    """One problem shape. Masks align bottom-right, as in gqa_ext."""

    name: str
    kind: str  # "prefill" or "decode"
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    quick: bool = False

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def flops(self) -> float:
        """Matmul FLOPs of the forward: 4 * B * Hq * D per visible (query, key) pair."""
        pairs = self.seqlen_q * self.seqlen_k
        if self.causal:
            # Bottom-right alignment: row i sees i + Sk - Sq + 1 keys (at most Sk).
            off = self.seqlen_k - self.seqlen_q
            pairs = sum(min(self.seqlen_k, max(0, i + off + 1)) for i in range(self.seqlen_q))
        return 4.0 * self.batch * self.heads_q * self.head_dim * pairs

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V, each read once: the floor of a decode step's traffic."""
        return 2 * self.batch * self.seqlen_k * self.heads_kv * self.head_dim * torch.finfo(DTYPE).bits // 8


def make_cases(device: str) -> list[Case]:
    """The benchmark's cases; tiny shapes on the CPU, which only checks the script's own logic."""
    if device == "cpu":
        prefill = dict(batch=1, seq=256, heads=(8, 2))
        decode_heads, decode_lens, decode_batches = [(8, 2), (16, 2)], [512, 2048], [1, 4]
        quick_decode = {(8, 2, 2048, 1), (16, 2, 512, 4)}
    else:
        prefill = dict(batch=4, seq=4096, heads=(32, 8))
        decode_heads, decode_lens, decode_batches = [(32, 8), (64, 8)], [4096, 16384, 65536], [1, 8, 64]
        # The latency-bound end (one sequence, 8 KV heads: few work items for 132 SMs)
        # and the bandwidth-bound end.
        quick_decode = {(32, 8, 65536, 1), (64, 8, 16384, 64)}
    cases = []
    hq, hkv = prefill["heads"]
    b, s = prefill["batch"], prefill["seq"]
    for causal in (True, False):
        # "full", not "noncausal": --case causal must not pick both.
        mask = "causal" if causal else "full"
        name = f"prefill {mask} {hq}/{hkv} S{s} B{b}"
        cases.append(Case(name, "prefill", b, s, s, hq, hkv, HEAD_DIM, causal, quick=causal))
    for hq, hkv in decode_heads:
        for sk in decode_lens:
            for b in decode_batches:
                name = f"decode {hq}/{hkv} Sk{sk} B{b}"
                quick = (hq, hkv, sk, b) in quick_decode
                case = Case(name, "decode", b, 1, sk, hq, hkv, HEAD_DIM, False, quick=quick)
                if case.kv_bytes <= MAX_KV_BYTES:
                    cases.append(case)
    return cases


# ---------------------------------------------------------------- timing


class Timer:
    """Times one call: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def start(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start: object) -> Callable[[], float]:
        """Returns a function giving the elapsed ms once the device is synchronized."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: start.elapsed_time(end)  # type: ignore[attr-defined]
        elapsed = (time.perf_counter() - start) * 1e3  # type: ignore[operator]
        return lambda: elapsed

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _median_ms(timer: Timer, fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    timer.sync()
    times = []
    for _ in range(reps):
        t = timer.start()
        fn()
        times.append(timer.stop(t))
    timer.sync()
    return statistics.median(t() for t in times)


def _copy_gbps(timer: Timer, device: str, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.int32, device=device).random_()
    dst = torch.empty_like(src)
    ms = _median_ms(timer, lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / ms / 1e6  # bytes read + bytes written


def _read_gbps(timer: Timer, device: str, nbytes: int) -> float:
    # Reading K/V is a read-only stream; a reduction is the closest plain kernel.
    x = torch.randn(nbytes // 2, dtype=DTYPE, device=device)
    ms = _median_ms(timer, lambda: x.sum(), reps=10)
    return nbytes / ms / 1e6


def _matmul_tflops(timer: Timer, device: str, n: int) -> float:
    a = torch.randn(n, n, dtype=DTYPE, device=device)
    b = torch.randn(n, n, dtype=DTYPE, device=device)
    ms = _median_ms(timer, lambda: a @ b, reps=10)
    return 2 * n**3 / ms / 1e9


def measure_ceilings(device: str) -> dict[str, float]:
    """Copy and read bandwidth (GB/s) and the bf16 matmul rate (TFLOP/s), measured now on this device."""
    timer = Timer(device)
    big = device == "cuda"
    n = 8192 if big else 512
    out = dict(
        copy_gbps=_copy_gbps(timer, device, (2 << 30) if big else (32 << 20)),
        read_gbps=_read_gbps(timer, device, (4 << 30) if big else (64 << 20)),
        matmul_tflops=_matmul_tflops(timer, device, n),
        matmul_n=n,
    )
    if big:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- implementations


def ours_forward(q: Tensor, k: Tensor, v: Tensor, case: Case, scale: float) -> tuple[Tensor, Tensor]:
    """Our op on (B, S, H, D) tensors: (out, lse)."""
    return torch.ops.gqa.forward(q, k, v, softmax_scale=scale, causal=case.causal)


def _ours(q: Tensor, k: Tensor, v: Tensor, case: Case, scale: float) -> Callable[[], Tensor]:
    def run() -> Tensor:
        return ours_forward(q, k, v, case, scale)[0]

    return run


def _sdpa(backend_name: str, q: Tensor, k: Tensor, v: Tensor, case: Case, scale: float) -> Callable[[], Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    # Views of the same (B, S, H, D) tensors; a backend that wants another
    # layout pays for its copy inside its time, as a user of this layout would.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # SDPA's is_causal aligns top-left: the same as ours for Sq == Sk, and
    # decode cases (Sq = 1) have no mask.
    assert not case.causal or case.seqlen_q == case.seqlen_k

    def run() -> Tensor:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=case.causal, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    return run


_flex_compiled: Callable | None = None


def _flex(q: Tensor, k: Tensor, v: Tensor, case: Case, scale: float) -> Callable[[], Tensor]:
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        # Uncompiled flex_attention materializes the scores: never time that.
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    block_mask = None
    if case.causal:
        offset = case.seqlen_k - case.seqlen_q  # bottom-right alignment

        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        block_mask = create_block_mask(causal_mask, None, None, case.seqlen_q, case.seqlen_k, device=q.device)
    compiled = _flex_compiled

    def run() -> Tensor:
        return compiled(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=True).transpose(1, 2)

    return run


def make_impl(name: str, q: Tensor, k: Tensor, v: Tensor, case: Case, scale: float) -> Callable[[], Tensor]:
    """A zero-argument callable running implementation ``name``; returns (B, Sq, Hq, D)."""
    if name == OURS:
        return _ours(q, k, v, case, scale)
    if name in SDPA_BACKENDS:
        return _sdpa(SDPA_BACKENDS[name], q, k, v, case, scale)
    if name == FLEX:
        return _flex(q, k, v, case, scale)
    raise ValueError(name)


# ---------------------------------------------------------------- checking


def reference_slices(
    q: Tensor, k: Tensor, v: Tensor, case: Case, scale: float
) -> list[tuple[int, int, Tensor, Tensor]]:
    """float64 out and lse for the first and last batch element x the first and last KV head.

    Returns (batch, kv_head, out (G, Sq, D), lse (G, Sq)) tuples; the whole
    problem in float64 would not fit for the big cases.
    """
    G = case.group
    refs = []
    for b in sorted({0, case.batch - 1}):
        for h in sorted({0, case.heads_kv - 1}):
            qs = q[b, :, h * G : (h + 1) * G].permute(1, 0, 2).double()  # (G, Sq, D)
            ks, vs = k[b, :, h].double(), v[b, :, h].double()  # (Sk, D)
            s = (qs @ ks.T) * scale  # (G, Sq, Sk)
            if case.causal:
                i = torch.arange(case.seqlen_q, device=q.device)[:, None]
                j = torch.arange(case.seqlen_k, device=q.device)[None, :]
                s = s.masked_fill(j > i + case.seqlen_k - case.seqlen_q, -math.inf)
            lse = torch.logsumexp(s, dim=-1)
            out = torch.softmax(s, dim=-1) @ vs
            refs.append((b, h, out, lse))
            del s
    return refs


def check_output(out: Tensor, refs: list[tuple[int, int, Tensor, Tensor]], case: Case) -> tuple[bool, float, str]:
    """(right, worst relative error over the slices, why not) for one (B, Sq, Hq, D) output."""
    expected = (case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    if tuple(out.shape) != expected:
        return False, math.nan, f"shape {tuple(out.shape)} != {expected}"
    if not bool(torch.isfinite(out).all()):
        return False, math.nan, "non-finite values in the output"
    G = case.group
    worst = 0.0
    for b, h, ref, _ in refs:
        got = out[b, :, h * G : (h + 1) * G].permute(1, 0, 2).double()
        err = (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item()
        worst = max(worst, err)
    if not worst <= REL_TOL:
        return False, worst, f"relative error {worst:.3g} > {REL_TOL:g} against the float64 reference"
    return True, worst, ""


def check_lse(lse: Tensor, refs: list[tuple[int, int, Tensor, Tensor]], case: Case) -> tuple[bool, float, str]:
    """Our lse (B, Hq, Sq) against the reference on the same slices."""
    expected = (case.batch, case.heads_q, case.seqlen_q)
    if tuple(lse.shape) != expected:
        return False, math.nan, f"lse shape {tuple(lse.shape)} != {expected}"
    G = case.group
    worst = 0.0
    for b, h, _, ref in refs:
        got = lse[b, h * G : (h + 1) * G].double()
        worst = max(worst, (got - ref).abs().max().item())
    if not worst <= LSE_ATOL:
        return False, worst, f"lse off by {worst:.3g} > {LSE_ATOL:g}"
    return True, worst, ""


# ---------------------------------------------------------------- one case


class DeviceLost(RuntimeError):
    """The CUDA context is unusable (a sticky error such as an illegal address)."""


def _cuda_alive(device: str) -> bool:
    if device != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device=device).add_(1).item()
        return True
    except Exception:
        return False


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def run_case(case: Case, args: argparse.Namespace, ceilings: dict[str, float], skip_flex: str = "") -> dict:
    """Checks, warms up and times every implementation on one case; returns the case's record.

    ``skip_flex``, if not empty, is why FlexAttention is left out.
    """
    device = args.device
    timer = Timer(device)
    torch.manual_seed(0)
    q = torch.randn(case.batch, case.seqlen_q, case.heads_q, case.head_dim, dtype=DTYPE, device=device)
    k = torch.randn(case.batch, case.seqlen_k, case.heads_kv, case.head_dim, dtype=DTYPE, device=device)
    v = torch.randn_like(k)
    scale = 1.0 / math.sqrt(case.head_dim)
    refs = reference_slices(q, k, v, case, scale)

    impls = [n for n in IMPLS if not (n == FLEX and skip_flex)]
    rec: dict[str, dict] = {n: {"status": NOT_RUN} for n in IMPLS}
    fns: dict[str, Callable[[], Tensor]] = {}
    if skip_flex:
        rec[FLEX] = {"status": NOT_RUN, "message": skip_flex}
    if FLEX in impls:
        # A fresh cache per case: each shape compiles anew anyway, and dynamo
        # would fall back to (slow, uncompiled) flex after its recompile limit.
        torch._dynamo.reset()

    for name in impls:
        failed = ERROR if name == OURS else UNSUPPORTED
        try:
            with warnings.catch_warnings():
                # Backends that refuse a case warn why before raising; the message is kept below.
                warnings.simplefilter("ignore")
                fn = make_impl(name, q, k, v, case, scale)
                if name == OURS:
                    out, lse = ours_forward(q, k, v, case, scale)
                else:
                    out, lse = fn(), None
                timer.sync()
        except Exception as e:
            if not _cuda_alive(device):
                raise DeviceLost(f"{name}: {_one_line(e)}") from e
            rec[name] = {"status": failed, "message": _one_line(e)}
            if name == OURS and args.verbose:
                traceback.print_exc()
            continue
        right, err, why = check_output(out, refs, case)
        rec[name] = {"rel_err": err}
        if right and lse is not None:
            right, lse_err, why = check_lse(lse, refs, case)
            rec[name]["lse_err"] = lse_err
        del out, lse
        if not right:
            rec[name].update(status=WRONG, message=why)
            continue
        rec[name]["status"] = OK
        fns[name] = fn
    del refs

    flush = None
    if case.kind == "decode" and device == "cuda":
        flush_buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        flush = flush_buf.zero_

    times: dict[str, list[Callable[[], float]]] = {n: [] for n in fns}
    for name in list(fns):
        try:
            for _ in range(args.warmup):
                fns[name]()
            timer.sync()
        except Exception as e:
            if not _cuda_alive(device):
                raise DeviceLost(f"{name} (warm-up): {_one_line(e)}") from e
            rec[name] = {**rec[name], "status": ERROR if name == OURS else UNSUPPORTED, "message": _one_line(e)}
            del fns[name], times[name]
    for r in range(args.rounds):
        # Rotated each round so that no implementation always follows the same one.
        order = list(fns)[r % max(1, len(fns)) :] + list(fns)[: r % max(1, len(fns))]
        for name in order:
            if name not in fns:
                continue
            if flush is not None:
                flush()
            try:
                t = timer.start()
                fns[name]()
                times[name].append(timer.stop(t))
            except Exception as e:
                if not _cuda_alive(device):
                    raise DeviceLost(f"{name} (timed): {_one_line(e)}") from e
                rec[name] = {**rec[name], "status": ERROR, "message": _one_line(e)}
                del fns[name], times[name]
        timer.sync()

    for name, ts in times.items():
        ms = [t() for t in ts]
        st = rec[name]
        st["median_ms"] = statistics.median(ms)
        st["min_ms"] = min(ms)
        st["times_ms"] = ms
        sec = st["median_ms"] / 1e3
        if case.kind == "prefill":
            st["tflops"] = case.flops / sec / 1e12
            st["pct_ceiling"] = 100 * st["tflops"] / ceilings["matmul_tflops"]
        else:
            st["kv_gbps"] = case.kv_bytes / sec / 1e9
            st["pct_ceiling"] = 100 * st["kv_gbps"] / ceilings["read_gbps"]

    sdpa_ms = {n: rec[n]["median_ms"] for n in SDPA_BACKENDS if rec[n]["status"] == OK}
    other_ms = {n: rec[n]["median_ms"] for n in IMPLS if n != OURS and rec[n]["status"] == OK}
    row: dict = {
        "case": case.name,
        "kind": case.kind,
        "shape": dict(
            batch=case.batch,
            seqlen_q=case.seqlen_q,
            seqlen_k=case.seqlen_k,
            heads_q=case.heads_q,
            heads_kv=case.heads_kv,
            head_dim=case.head_dim,
            causal=case.causal,
            dtype=str(DTYPE),
        ),
        "flops": case.flops,
        "kv_bytes": case.kv_bytes,
        "impls": rec,
        "best_sdpa": min(sdpa_ms, key=sdpa_ms.get) if sdpa_ms else None,
        "best_other": min(other_ms, key=other_ms.get) if other_ms else None,
    }
    ours_ms = rec[OURS].get("median_ms") if rec[OURS]["status"] == OK else None
    row["speedup_vs_best_sdpa"] = min(sdpa_ms.values()) / ours_ms if ours_ms and sdpa_ms else None
    row["speedup_vs_best_other"] = min(other_ms.values()) / ours_ms if ours_ms and other_ms else None
    return row


# ---------------------------------------------------------------- reporting


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _cell(st: dict) -> str:
    s = st["status"]
    if s == OK:
        return f"{st['median_ms']:.4g}"
    return {WRONG: "WRONG", UNSUPPORTED: "unsup", ERROR: "ERR", NOT_RUN: "-"}.get(s, s)


def format_table(meta: dict, ceilings: dict[str, float], rows: list[dict]) -> str:
    """The short fixed-width summary printed at the end."""
    dev = meta.get("device", {}).get("name", "?")
    head = [
        f"gqa_ext vs SDPA: {dev}, torch {meta['torch']}, commit {str(meta.get('commit') or '?')[:10]}, "
        f"bf16 D{HEAD_DIM}, median of {meta['rounds']} alternating rounds, ms",
        f"ceilings: copy {_num(ceilings['copy_gbps'])} GB/s (read+write), read {_num(ceilings['read_gbps'])} GB/s, "
        f"bf16 matmul {_num(ceilings['matmul_tflops'])} TFLOP/s",
    ]
    cols = "".join(f"{SHORT[n]:>8}" for n in IMPLS)
    lines = [*head, f"{'case':<29}{cols} | {'ours':>11} {'%ceil':>5} {'xSDPA':>6}"]
    for row in rows:
        if "impls" not in row:
            lines.append(f"{row['case']:<29} {row.get('status', '?')}: {row.get('message', '')}"[:110])
            continue
        cells = "".join(f"{_cell(row['impls'][n]):>8}" for n in IMPLS)
        ours = row["impls"][OURS]
        if ours["status"] == OK:
            perf = f"{_num(ours['tflops'])} TF/s" if "tflops" in ours else f"{_num(ours['kv_gbps'])} GB/s"
            pct = f"{ours['pct_ceiling']:.0f}%"
        else:
            perf = pct = "-"
        ratio = row["speedup_vs_best_sdpa"]
        lines.append(f"{row['case']:<29}{cells} | {perf:>11} {pct:>5} {(f'{ratio:.2f}' if ratio else '-'):>6}")
    lines.append(
        "unsup: refused the case; WRONG: differs from the float64 reference; ERR: raised; "
        "%ceil: of matmul (prefill) or read (decode); xSDPA: best SDPA ms / ours"
    )
    problems = [
        f"  {row['case']}: {n} {row['impls'][n]['status']}: {row['impls'][n].get('message', '')}"
        for row in rows
        if "impls" in row
        for n in (OURS,)
        if row["impls"][n]["status"] in (ERROR, WRONG)
    ]
    if problems:
        lines.append("ours failed:")
        lines.extend(p[:200] for p in problems[:8])
    return "\n".join(lines)


def _git(*cmd: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", *cmd], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def collect_meta(args: argparse.Namespace) -> dict:
    """Date, commit, command, versions and device of this run."""
    import gqa_ext

    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta: dict = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=_git("rev-parse", "HEAD"),
        dirty=None if status is None else bool(status),
        command=" ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), repo), *sys.argv[1:]]),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        build=gqa_ext.build_info(),
        rounds=args.rounds,
        warmup=args.warmup,
        l2_flush_bytes=L2_FLUSH_BYTES if args.device == "cuda" else 0,
        rel_tol=REL_TOL,
    )
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta["device"] = dict(
            name=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_bytes=getattr(p, "L2_cache_size", None),
        )
        meta["cudnn"] = torch.backends.cudnn.version()
    else:
        meta["device"] = dict(name=f"CPU ({os.cpu_count()} cores)", threads=torch.get_num_threads())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return meta


def write_outputs(args: argparse.Namespace, meta: dict, ceilings: dict, rows: list[dict], complete: bool) -> str:
    """Writes --json and --table (after every case, so a killed run leaves what it measured)."""
    table = format_table(meta, ceilings, rows)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(meta=meta, ceilings=ceilings, cases=rows, complete=complete), f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="one prefill and two decode cases")
    parser.add_argument("--case", default="", help="run only the cases whose name contains this")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per case (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation first")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take time)")
    parser.add_argument(
        "--time-budget", type=float, default=0, help="seconds; cases not started by then are skipped (0: no limit)"
    )
    parser.add_argument("--json", default="", help="write everything measured to this file")
    parser.add_argument("--table", default="", help="also write the short table to this file")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of our op's errors")
    # Runs the same logic on tiny CPU shapes, to check the script without a GPU.
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    args = parse_args(argv)
    cases = [c for c in make_cases(args.device) if args.case in c.name and (c.quick or not args.quick)]
    if args.list:
        for c in cases:
            print(f"{c.name:<29} K/V {c.kv_bytes / 1e9:6.2f} GB  {c.flops / 1e12:8.3f} TFLOP")
        return 0
    if not cases:
        print(f"error: no case matches --case {args.case!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "this benchmark needs a GPU",
            file=sys.stderr,
        )
        return 2
    try:
        import gqa_ext
    except ImportError as e:
        print(f"error: cannot import gqa_ext: {e}", file=sys.stderr)
        return 2
    info = gqa_ext.build_info()
    if args.device == "cuda" and not info.get("cuda_kernels"):
        print(f"warning: this gqa_ext build has no CUDA kernels ({info}); our op will fail", file=sys.stderr)

    meta = collect_meta(args)
    print(f"device: {meta['device']}; torch {meta['torch']}; gqa_ext {info}", flush=True)
    t0 = time.monotonic()
    ceilings = measure_ceilings(args.device)
    print(
        f"ceilings ({time.monotonic() - t0:.1f} s): copy {ceilings['copy_gbps']:.0f} GB/s, "
        f"read {ceilings['read_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.1f} TFLOP/s",
        flush=True,
    )

    # Rows in the cases' order; the --quick cases run first, so that a run cut
    # short by --time-budget still has them.
    slots: list[dict | None] = [None] * len(cases)

    def rows() -> list[dict]:
        return [r for r in slots if r is not None]

    failed = False
    for n_done, i in enumerate(sorted(range(len(cases)), key=lambda i: (not cases[i].quick, i))):
        case = cases[i]
        elapsed = time.monotonic() - t0
        if args.time_budget and elapsed > args.time_budget:
            for j, c in enumerate(cases):
                if slots[j] is None:
                    slots[j] = dict(case=c.name, status="skipped", message=f"time budget of {args.time_budget:g} s")
            print(f"time budget spent: skipped {len(cases) - n_done} cases", flush=True)
            break
        skip_flex = "--no-flex" if args.no_flex else ""
        if args.time_budget and elapsed > FLEX_BUDGET_SHARE * args.time_budget:
            # Its compiles are the slow part; ours and SDPA matter more.
            skip_flex = "time budget"
        tc = time.monotonic()
        try:
            row = run_case(case, args, ceilings, skip_flex)
        except DeviceLost as e:
            slots[i] = dict(case=case.name, status="device lost", message=str(e))
            print(f"{case.name}: CUDA context lost ({e}); stopping", file=sys.stderr, flush=True)
            print(write_outputs(args, meta, ceilings, rows(), complete=False))
            return 1
        except torch.OutOfMemoryError as e:
            row = dict(case=case.name, status="out of memory", message=_one_line(e))
        finally:
            if args.device == "cuda":
                # Raises in a lost context; the report must still be written.
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        slots[i] = row
        if "impls" in row:
            failed |= row["impls"][OURS]["status"] != OK
            parts = [f"{n} {_cell(row['impls'][n])}" for n in IMPLS]
            print(f"{case.name} ({time.monotonic() - tc:.1f} s): " + ", ".join(parts), flush=True)
            for n in IMPLS:
                if row["impls"][n].get("message"):
                    print(f"    {n}: {row['impls'][n]['status']}: {row['impls'][n]['message']}", flush=True)
        else:
            failed = True
            print(f"{case.name}: {row['status']}: {row['message']}", flush=True)
        write_outputs(args, meta, ceilings, rows(), complete=False)

    table = write_outputs(args, meta, ceilings, rows(), complete=True)
    print(f"total {time.monotonic() - t0:.1f} s\n")
    print(table)
    if not any("impls" in r for r in rows()):
        print("error: no case was measured", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
