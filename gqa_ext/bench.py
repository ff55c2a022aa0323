"""``gqa-ext bench``: gqa_ext side by side with SDPA and FlexAttention on real model shapes.

Cases are model x mode x length (gqa_ext.models): ``prefill`` (causal forward,
Sq = Sk = S), ``train`` (causal forward and backward), ``backward`` (the
backward alone, causal, and without a mask in the ``backward-full`` cases) and
``decode`` (one query over a K/V cache of length L). ``backward`` is not in
the default modes. Every implementation runs on the same inputs, alternately,
in one process. Before any timing each one's output (and in train and backward
mode dq, dk, dv) is checked against the float64 reference on slices of the
problem; a wrong one is reported WRONG and not timed. Each case reports median
times; our TFLOP/s or K/V GB/s, whichever bounds the case, as a percentage of
that ceiling measured in the same run (a roofline); the speedup of ours over the best other
implementation, and each one's peak extra memory.

In backward mode each implementation's forward runs once, untimed, and the
timed call is its backward on the forward's saved state: ours is
``torch.ops.gqa.backward(dout, q, k, v, out, lse, ...)`` on the out and lse of
one ``torch.ops.gqa.forward``; the others are
``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)`` through
their forward's graph (for SDPA after repeat_interleave that includes summing
the expanded dK and dV back to the KV heads). The peak memory is the
backward's alone: what the forward saved was allocated before it. FLOPs count
the matmuls over the visible (query, key) pairs: 4 * B * Hq * D a pair for the
forward's two (QK^T, PV), 2.5 times that for the backward's five (QK^T again,
dV, dP, dQ, dK), 3.5 times it for train.

    gqa-ext bench [--device cpu|cuda] [--quick] [--model M,..] [--mode M,..] [--dtype D,..]
                  [--case SUBSTR,..] [--out DIR]

Writes DIR/results.json (after every case, so a killed run keeps what it
measured), DIR/table.txt and, with matplotlib, DIR/*.png. The table is
printed last, on stdout; progress goes to stderr.

Exit status: 0 if our op ran and was right in every case run; 1 if it raised
or was wrong in some case (the other cases still run) or no case was
measured; 2 if the benchmark could not start (no CUDA device for
--device cuda, no case selected, bad options).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

import gqa_ext
from gqa_ext.models import MODELS, ModelShape
from gqa_ext.reference import attention_ref, visible_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PREFILL, TRAIN, BACKWARD, DECODE = "prefill", "train", "backward", "decode"
MODES = (PREFILL, TRAIN, BACKWARD, DECODE)
# Without --mode. The backward alone is a part of train, asked for by name.
DEFAULT_MODES = (PREFILL, TRAIN, DECODE)
# Modes with dq, dk, dv, checked against the reference.
GRAD_MODES = (TRAIN, BACKWARD)
# Modes that run each length twice: causal, and with no mask (kind "<mode>-full").
FULL_MODES = (BACKWARD,)
FULL = "-full"

# Lengths per mode: S for prefill, train and backward, the K/V cache length L for decode.
CPU_LENGTHS = {
    PREFILL: [512, 1024, 2048],
    TRAIN: [256, 512, 1024],
    BACKWARD: [256, 512, 1024],
    DECODE: [1024, 4096, 16384],
}
# Two decode lengths, so that --quick draws one plot.
CPU_QUICK_LENGTHS = {PREFILL: [256], TRAIN: [128], BACKWARD: [128], DECODE: [512, 1024]}
CUDA_LENGTHS = {
    PREFILL: [1024, 2048, 4096, 8192, 16384],
    TRAIN: [1024, 2048, 4096, 8192, 16384],
    BACKWARD: [1024, 2048, 4096, 8192, 16384],
    DECODE: [4096, 16384, 65536],
}
CUDA_DECODE_BATCHES = [1, 8]
# CUDA prefill, train and backward keep B * S at this many tokens.
CUDA_TOKENS = 16384
# CUDA --quick: (model, kind, length, batch), kind being the mode or, for a
# case without a causal mask, "<mode>-full". The latency-bound decode end (one
# sequence) and the bandwidth-bound end, MQA, and Gemma 2's softcap + window,
# which only ours and flex run; the backward alone causal and not.
CUDA_QUICK = {
    ("llama3-8b", PREFILL, 4096, 4),
    ("llama3-8b", TRAIN, 4096, 4),
    ("llama3-8b", BACKWARD, 4096, 4),
    ("llama3-8b", BACKWARD + FULL, 4096, 4),
    ("llama3-8b", DECODE, 65536, 1),
    ("llama3-70b", DECODE, 16384, 8),
    ("gemma2-9b", PREFILL, 8192, 2),
    ("falcon-7b", DECODE, 16384, 8),
}
# Cases whose K/V cache is bigger than this are left out.
MAX_KV_BYTES = {"cuda": 16e9, "cpu": 2e9}
# Written between timed CUDA decode calls: more than an H200's 60 MB L2, so
# a small K/V cache is read from HBM, as it would be in a model with many layers.
L2_FLUSH_BYTES = 256 << 20
# On the CPU a timed decode call is one step of a model: the case's attention
# over this many bytes of K/V caches, one per layer, so that each layer's
# cache comes from memory (as in a real model, and unlike a repeated call on
# one cache that fits the last-level cache) while the code stays warm. Writing
# a flush buffer instead would also evict the code and the threads' state,
# which costs every implementation a fixed ~0.3 ms here.
CPU_DECODE_STEP_BYTES = 256 << 20
# Relative Frobenius error ||x - ref|| / ||ref|| allowed on the checked
# slices. Correct kernels land near 1e-6 (fp32) and 3e-3 (bf16); wrong ones
# near 1e-2 to 1.
REL_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Our lse is float32 from the same inputs; a correct kernel is within ~1e-5.
LSE_ATOL = 1e-2
# The float64 reference materializes (G, rows, Sk) scores per slice: the
# checked query rows are capped so that this stays under this many elements.
REF_ELEMENTS = 1 << 23
# With --time-budget, FlexAttention is left out of the cases started after
# this share of the budget: its compiles are the slow part.
FLEX_BUDGET_SHARE = 0.6

# Without --rounds, a case's timed rounds stop near this many seconds (but
# run at least MIN_ROUNDS): SDPA's bf16 backward on a CPU without native
# bf16 takes seconds a call.
TIMED_SECONDS = {"cpu": 20.0, "cuda": 10.0}
MIN_ROUNDS = 3

OURS = "ours"
# Decode from a paged cache (PAGE_BLOCK_SIZE rows per block, blocks shuffled),
# beside ours from a contiguous one; not a baseline.
OURS_PAGED = "ours_paged"
PAGE_BLOCK_SIZE = 16
SDPA = "sdpa"
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}
SDPA_REPEAT = "sdpa_repeat"
FLEX = "flex"
IMPLS = {
    "cpu": [OURS, OURS_PAGED, SDPA, SDPA_REPEAT],
    "cuda": [OURS, OURS_PAGED, *SDPA_BACKENDS, SDPA_REPEAT, FLEX],
}
OURS_IMPLS = (OURS, OURS_PAGED)
# Column titles of the table.
SHORT = {
    OURS: "ours",
    OURS_PAGED: "paged",
    SDPA: "sdpa",
    "sdpa_flash": "flash",
    "sdpa_efficient": "effic",
    "sdpa_cudnn": "cudnn",
    SDPA_REPEAT: "repeat",
    FLEX: "flex",
}

# Status of an implementation in a case.
OK, WRONG, UNSUPPORTED, ERROR, NOT_RUN = "ok", "WRONG", "unsupported", "error", "not run"

T = TypeVar("T")


@dataclass(frozen=True)
class Case:
    """One benchmark problem. Masks align bottom-right, as in gqa_ext."""

    model: ModelShape
    mode: str
    dtype: torch.dtype
    batch: int
    seqlen_q: int
    seqlen_k: int
    quick: bool = False
    # No causal mask (a model's window still applies); make_cases sets it in FULL_MODES only.
    full: bool = False

    @property
    def kind(self) -> str:
        """The mode, or "<mode>-full" without the causal mask."""
        return self.mode + FULL if self.full and self.mode != DECODE else self.mode

    @property
    def name(self) -> str:
        length = f"L{self.seqlen_k}" if self.mode == DECODE else f"S{self.seqlen_q}"
        return f"{self.model.name} {self.kind} {DTYPE_NAMES[self.dtype]} {length} B{self.batch}"

    @property
    def heads_q(self) -> int:
        return self.model.heads_q

    @property
    def heads_kv(self) -> int:
        return self.model.heads_kv

    @property
    def head_dim(self) -> int:
        return self.model.head_dim

    @property
    def group(self) -> int:
        return self.model.group

    @property
    def causal(self) -> bool:
        # A decode query is the last position: causal or not, it sees the whole cache.
        return self.mode != DECODE and not self.full

    @property
    def window_left(self) -> int:
        return self.model.window

    @property
    def window_right(self) -> int:
        return 0 if self.causal else -1

    @property
    def softcap(self) -> float:
        return self.model.softcap

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def _visible_keys(self, i: int) -> tuple[int, int]:
        """[lo, hi) of the keys query row ``i`` sees."""
        diag = i + self.seqlen_k - self.seqlen_q
        lo = max(0, diag - self.window_left) if self.window_left >= 0 else 0
        hi = min(self.seqlen_k, diag + self.window_right + 1) if self.window_right >= 0 else self.seqlen_k
        return lo, max(lo, hi)

    @property
    def visible_pairs(self) -> int:
        """(query, key) pairs the mask lets through."""
        return sum(hi - lo for lo, hi in map(self._visible_keys, range(self.seqlen_q)))

    @property
    def flops(self) -> float:
        """Matmul FLOPs over the visible pairs: 4 * B * Hq * D each forward (QK^T, PV).

        The backward's five matmuls (QK^T recomputed, dV, dP, dQ, dK) are 2.5
        times the forward's: backward mode counts 2.5 times the forward, train
        3.5 times.
        """
        fwd = 4.0 * self.batch * self.heads_q * self.head_dim * self.visible_pairs
        return {TRAIN: 3.5, BACKWARD: 2.5}.get(self.mode, 1.0) * fwd

    @property
    def kv_bytes(self) -> int:
        """Bytes of the K and V rows some query sees, each read once: the floor of a decode step's traffic."""
        lo = self._visible_keys(0)[0]
        hi = self._visible_keys(self.seqlen_q - 1)[1]
        return 2 * self.batch * (hi - lo) * self.heads_kv * self.head_dim * self.dtype.itemsize

    @property
    def cache_bytes(self) -> int:
        """Bytes of the whole K and V tensors."""
        return 2 * self.batch * self.seqlen_k * self.heads_kv * self.head_dim * self.dtype.itemsize

    @property
    def check_rows(self) -> int:
        """How many of the last query rows the float64 check covers."""
        return min(self.seqlen_q, max(1, REF_ELEMENTS // (self.group * self.seqlen_k)))


def make_cases(
    device: str,
    dtypes: list[torch.dtype],
    models: list[str],
    modes: list[str],
    *,
    lengths: list[int] | None = None,
    batch: int | None = None,
    quick: bool = False,
) -> list[Case]:
    """The cases of a run, model by model. ``lengths`` and ``batch`` replace the defaults of every mode.

    ``quick`` on the CPU takes short lengths; on CUDA, the cases of CUDA_QUICK.
    A mode of FULL_MODES gives its causal cases, then the same without the mask.
    """
    cases = []
    for model in models:
        for mode in modes:
            for dtype in dtypes:
                if device == "cpu":
                    default = (CPU_QUICK_LENGTHS if quick else CPU_LENGTHS)[mode]
                else:
                    default = CUDA_LENGTHS[mode]
                for full in (False, True) if mode in FULL_MODES else (False,):
                    for length in lengths or default:
                        if batch is not None:
                            batches = [batch]
                        elif device == "cpu":
                            batches = [1]
                        elif mode == DECODE:
                            batches = CUDA_DECODE_BATCHES
                        else:
                            batches = [max(1, CUDA_TOKENS // length)]
                        for b in batches:
                            seqlen_q = 1 if mode == DECODE else length
                            case = Case(MODELS[model], mode, dtype, b, seqlen_q, length, full=full)
                            in_quick = device == "cuda" and (model, case.kind, length, b) in CUDA_QUICK
                            if device == "cuda" and quick and not in_quick:
                                continue
                            if case.cache_bytes <= MAX_KV_BYTES[device]:
                                cases.append(replace(case, quick=quick or in_quick))
    return cases


# ---------------------------------------------------------------- timing and memory


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


def _best_ms(timer: Timer, fn: Callable[[], object], reps: int, warmup: int) -> float:
    # A ceiling is the most the device gives: the best time, not the median.
    for _ in range(warmup):
        fn()
    timer.sync()
    times = []
    for _ in range(reps):
        t = timer.start()
        fn()
        times.append(timer.stop(t))
    timer.sync()
    return min(t() for t in times)


def _copy_gbps(timer: Timer, device: str, nbytes: int, reps: int, warmup: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.int32, device=device).random_()
    dst = torch.empty_like(src)
    ms = _best_ms(timer, lambda: dst.copy_(src), reps, warmup)
    return 2 * nbytes / ms / 1e6  # bytes read + bytes written


def _read_gbps(timer: Timer, device: str, nbytes: int, reps: int, warmup: int) -> float:
    # Reading K/V is a read-only stream; a reduction is the closest plain kernel.
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    ms = _best_ms(timer, lambda: x.sum(), reps, warmup)
    return nbytes / ms / 1e6


def _matmul_tflops(timer: Timer, device: str, dtype: torch.dtype, n: int, reps: int, warmup: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = _best_ms(timer, lambda: a @ b, reps, warmup)
    return 2 * n**3 / ms / 1e9


def measure_ceilings(device: str, dtypes: list[torch.dtype]) -> dict:
    """Copy and read bandwidth (GB/s) and matmul rates (TFLOP/s), the best of a few calls on this device now.

    The matmul runs in each case dtype on CUDA and in float32 on the CPU,
    where gqa_ext computes in float32 whatever the input dtype.
    """
    timer = Timer(device)
    cuda = device == "cuda"
    reps, warmup = (10, 3) if cuda else (5, 2)
    nbytes = (2 << 30) if cuda else (256 << 20)
    n = 8192 if cuda else 2048
    out = dict(
        copy_gbps=_copy_gbps(timer, device, nbytes, reps, warmup),
        read_gbps=_read_gbps(timer, device, 2 * nbytes, reps, warmup),
        matmul_tflops={
            DTYPE_NAMES[dt]: _matmul_tflops(timer, device, dt, n, reps, warmup)
            for dt in (dtypes if cuda else [torch.float32])
        },
        matmul_n=n,
        matmul_note="" if cuda else "float32: the CPU kernels compute in float32 for every dtype",
    )
    if cuda:
        torch.cuda.empty_cache()
    return out


def matmul_ceiling(ceilings: dict, dtype: torch.dtype) -> float:
    """The matmul rate that bounds a case in ``dtype``."""
    rates = ceilings["matmul_tflops"]
    return rates.get(DTYPE_NAMES[dtype], rates.get("fp32", math.nan))


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silences file descriptor 2: the CPU profiler's library logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def measure_peak(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """Calls ``fn``; returns its result and the peak memory it allocated beyond what was allocated before, in MB.

    CUDA: the caching allocator's peak statistic. CPU: the allocation and
    free events torch.profiler records on the calling thread, summed in
    order; allocations inside worker threads of the kernels' parallel
    regions, and memory not from torch's allocator, are not seen.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - base) / 1e6
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return result, peak / 1e6


# ---------------------------------------------------------------- implementations


class Unsupported(Exception):
    """An implementation cannot express the case."""


def _ours(q: Tensor, k: Tensor, v: Tensor, case: Case) -> Callable[[], Tensor]:
    if case.mode == DECODE:
        return _ours_decode(q, k, v, case, paged=False)

    def run() -> Tensor:
        return gqa_ext.attention(
            q,
            k,
            v,
            causal=case.causal,
            softmax_scale=case.scale,
            window=(case.window_left, -1),  # causal sets the right edge
            softcap=case.softcap,
        )

    return run


def _ours_decode(q: Tensor, k: Tensor, v: Tensor, case: Case, paged: bool) -> Callable[[], Tensor]:
    """A decode step as a server runs it: append the newest token's K/V to the cache, then attend.

    The cache holds L - 1 tokens plus room for the new one, which is k's last
    row: each call writes the same values to the same place, so the calls stay
    identical and the result is attention over k and v.
    """
    batch, seqlen = k.shape[:2]
    k_new, v_new = k[:, -1:].clone(), v[:, -1:].clone()
    cache_seqlens = torch.full((batch,), seqlen - 1, dtype=torch.int32, device=k.device)
    block_table = None
    k_cache, v_cache = k, v
    if paged:
        # Blocks in a shuffled order, as a server's allocator leaves them.
        per_seq = -(-seqlen // PAGE_BLOCK_SIZE)
        block_table = torch.randperm(batch * per_seq, device=k.device).view(batch, per_seq).to(torch.int32)

        def to_pages(t: Tensor) -> Tensor:
            padded = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, per_seq * PAGE_BLOCK_SIZE - seqlen))
            blocks = padded.reshape(batch * per_seq, PAGE_BLOCK_SIZE, *t.shape[2:])
            pages = torch.empty_like(blocks)
            pages[block_table.flatten().long()] = blocks
            return pages

        k_cache, v_cache = to_pages(k), to_pages(v)

    def run() -> Tensor:
        return gqa_ext.attention_kvcache(
            q,
            k_cache,
            v_cache,
            k_new,
            v_new,
            cache_seqlens=cache_seqlens,
            block_table=block_table,
            causal=case.causal,
            softmax_scale=case.scale,
            window=(case.window_left, case.window_right),
            softcap=case.softcap,
        )

    return run


def _sdpa_mask(case: Case, device: torch.device) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA, whose is_causal aligns top-left: ours only where Sq == Sk."""
    if case.window_left < 0 and (not case.causal or case.seqlen_q == case.seqlen_k):
        return None, case.causal
    mask = visible_mask(
        case.seqlen_q,
        case.seqlen_k,
        causal=case.causal,
        window_left=case.window_left,
        window_right=case.window_right,
        device=device,
    )
    return mask, False


def _sdpa(q: Tensor, k: Tensor, v: Tensor, case: Case, backend: str | None, repeat: bool) -> Callable[[], Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if case.softcap > 0:
        raise Unsupported("SDPA has no softcap")
    mask, is_causal = _sdpa_mask(case, q.device)
    # Views of the same (B, S, H, D) tensors; a backend that wants another
    # layout pays for its copy inside its time, as a user of this layout would.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    pick = getattr(SDPBackend, backend) if backend else None
    group = case.group

    def run() -> Tensor:
        kk, vv = kt, vt
        if repeat:
            # What a model without enable_gqa does; the copy is part of the cost.
            kk, vv = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
        with sdpa_kernel(pick) if pick is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                qt, kk, vv, attn_mask=mask, is_causal=is_causal, scale=case.scale, enable_gqa=not repeat
            )
        return out.transpose(1, 2)

    return run


# One torch.compile of flex_attention for backward mode (True), one for the others.
_flex_compiled: dict[bool, Callable] = {}


def _flex(q: Tensor, k: Tensor, v: Tensor, case: Case) -> Callable[[], Tensor]:
    import torch._functorch.config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Backward mode calls the backward again and again on one forward
    # (retain_graph), which a compiled backward that reuses ("donates") the
    # forward's saved buffers refuses. A train case of the same shape compiles
    # such a backward, and torch.compile would reuse it: its cache is per code
    # object, and AOTAutograd's cache keys on the donation setting. So backward
    # mode compiles a function of its own, with donation off.
    retain = case.mode == BACKWARD
    if retain not in _flex_compiled:
        # Every shape and mask compiles anew; past the recompile limit torch
        # would run flex_attention uncompiled, which materializes the scores:
        # raise instead, and allow the benchmark's number of shapes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        if retain:

            def flex_retained(*args, **kwargs):
                return flex_attention(*args, **kwargs)

            _flex_compiled[retain] = torch.compile(flex_retained, dynamic=False)
        else:
            _flex_compiled[retain] = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    score_mod = None
    if case.softcap > 0:
        cap = case.softcap

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

    block_mask = None
    if case.causal or case.window_left >= 0:
        offset, left, causal = case.seqlen_k - case.seqlen_q, case.window_left, case.causal

        def mask_mod(b, h, q_idx, kv_idx):
            diag = q_idx + offset  # bottom-right alignment
            seen = kv_idx <= diag if causal else kv_idx >= 0
            if left >= 0:
                seen = seen & (kv_idx >= diag - left)
            return seen

        block_mask = create_block_mask(mask_mod, None, None, case.seqlen_q, case.seqlen_k, device=q.device)
    compiled = _flex_compiled[retain]
    # Compiles (in the first call of a shape and mask) without donated buffers in backward mode.
    options = functorch_config.patch(donated_buffer=False) if retain else contextlib.nullcontext()

    def run() -> Tensor:
        with options:
            out = compiled(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, scale=case.scale, enable_gqa=True)
        return out.transpose(1, 2)

    return run


def make_impl(name: str, q: Tensor, k: Tensor, v: Tensor, case: Case) -> Callable[[], Tensor]:
    """A zero-argument callable running implementation ``name`` on (B, S, H, D) tensors; returns (B, Sq, Hq, D).

    Raises Unsupported if the implementation cannot express the case.
    """
    if name == OURS:
        return _ours(q, k, v, case)
    if name == OURS_PAGED:
        if case.mode != DECODE:
            raise Unsupported("paged caches are for decoding")
        return _ours_decode(q, k, v, case, paged=True)
    if name == SDPA:
        return _sdpa(q, k, v, case, backend=None, repeat=False)
    if name in SDPA_BACKENDS:
        return _sdpa(q, k, v, case, backend=SDPA_BACKENDS[name], repeat=False)
    if name == SDPA_REPEAT:
        return _sdpa(q, k, v, case, backend=None, repeat=True)
    if name == FLEX:
        return _flex(q, k, v, case)
    raise ValueError(f"unknown implementation {name!r}")


Backward = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def _ours_backward(q: Tensor, k: Tensor, v: Tensor, case: Case) -> tuple[Tensor, Backward]:
    """Our forward op once; returns its out and dout -> (dq, dk, dv) by our backward op on out and lse."""
    q, k, v = q.detach(), k.detach(), v.detach()
    options = (case.scale, case.causal, case.window_left, case.window_right, case.softcap)
    out, lse = torch.ops.gqa.forward(q, k, v, *options)
    deterministic = torch.are_deterministic_algorithms_enabled()

    def backward(dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.gqa.backward(dout, q, k, v, out, lse, *options, deterministic)

    return out, backward


def make_backward(name: str, q: Tensor, k: Tensor, v: Tensor, case: Case) -> tuple[Tensor, Backward]:
    """Runs implementation ``name``'s forward once; returns its output and a function dout -> (dq, dk, dv).

    The function is the backward alone, repeatable: ours is torch.ops.gqa.backward
    on the out and lse of one torch.ops.gqa.forward, as its autograd runs it;
    the others are torch.autograd.grad through the graph of their forward on
    ``q``, ``k``, ``v`` (which must require grad), kept for the next call.
    Raises Unsupported as make_impl does.
    """
    if name == OURS:
        return _ours_backward(q, k, v, case)
    out = make_impl(name, q, k, v, case)()

    def backward(dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return dq, dk, dv

    return out, backward


# ---------------------------------------------------------------- checking


@dataclass
class RefSlice:
    """The float64 reference on one batch element x one KV head with its query group, last rows from ``row0``."""

    batch: int
    kv_head: int
    row0: int
    out: Tensor  # (1, rows, G, D)
    lse: Tensor  # (1, G, rows)
    grads: dict[str, Tensor] = field(default_factory=dict)  # dq (1, rows, G, D), dk and dv (1, Sk, 1, D)


def reference_slices(q: Tensor, k: Tensor, v: Tensor, case: Case, dout: Tensor | None) -> list[RefSlice]:
    """The reference on the first and last batch element x the first and last KV head.

    Only the last ``case.check_rows`` query rows are computed: with masks
    aligned bottom-right, those rows against the whole K/V are exact. With
    ``dout`` (zero outside those rows), the gradients too: rows with zero
    dout add nothing to dk and dv, and a slice keeps its whole query group.
    """
    G, row0 = case.group, case.seqlen_q - case.check_rows
    train = dout is not None
    refs = []
    for b in sorted({0, case.batch - 1}):
        for h in sorted({0, case.heads_kv - 1}):
            qs = q.detach()[b : b + 1, row0:, h * G : (h + 1) * G].double().requires_grad_(train)
            ks = k.detach()[b : b + 1, :, h : h + 1].double().requires_grad_(train)
            vs = v.detach()[b : b + 1, :, h : h + 1].double().requires_grad_(train)
            with torch.set_grad_enabled(train):
                out, lse = attention_ref(
                    qs,
                    ks,
                    vs,
                    softmax_scale=case.scale,
                    causal=case.causal,
                    window_left=case.window_left,
                    window_right=case.window_right,
                    softcap=case.softcap,
                )
            ref = RefSlice(b, h, row0, out.detach(), lse.detach())
            if train:
                out.backward(dout[b : b + 1, row0:, h * G : (h + 1) * G].double())
                ref.grads = dict(dq=qs.grad, dk=ks.grad, dv=vs.grad)
            refs.append(ref)
    return refs


def _rel_err(got: Tensor, ref: Tensor) -> float:
    return (torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref)).item()


def _slice_of(t: Tensor, name: str, ref: RefSlice, group: int) -> Tensor:
    """The part of out, dq, dk or dv (B, S, H, D) that ``ref`` covers."""
    b = slice(ref.batch, ref.batch + 1)
    if name in ("out", "dq"):
        return t[b, ref.row0 :, ref.kv_head * group : (ref.kv_head + 1) * group]
    return t[b, :, ref.kv_head : ref.kv_head + 1]


def check_result(got: dict[str, Tensor], refs: list[RefSlice], case: Case) -> tuple[dict[str, float], str]:
    """Worst relative error of each of out (and dq, dk, dv) over the slices, and why it is wrong ('' if right)."""
    tol = REL_TOL[case.dtype]
    errors: dict[str, float] = {}
    for name, t in got.items():
        q_like = name in ("out", "dq")
        want = (
            case.batch,
            case.seqlen_q if q_like else case.seqlen_k,
            case.heads_q if q_like else case.heads_kv,
            case.head_dim,
        )
        if t is None or tuple(t.shape) != want:
            return errors, f"{name}: shape {None if t is None else tuple(t.shape)} != {want}"
        if not bool(torch.isfinite(t).all()):
            return errors, f"{name}: non-finite values"
        errors[name] = max(
            _rel_err(_slice_of(t, name, ref, case.group), ref.out if name == "out" else ref.grads[name]) for ref in refs
        )
        if not errors[name] <= tol:
            return errors, f"{name}: relative error {errors[name]:.3g} > {tol:g} against the float64 reference"
    return errors, ""


def check_lse(q: Tensor, k: Tensor, v: Tensor, case: Case, refs: list[RefSlice]) -> tuple[float, str]:
    """Our lse against the reference on the same slices: (worst absolute error, why wrong or '')."""
    _, lse = torch.ops.gqa.forward(
        q.detach(), k.detach(), v.detach(), case.scale, case.causal, case.window_left, case.window_right, case.softcap
    )
    G = case.group
    worst = 0.0
    for ref in refs:
        got = lse[ref.batch : ref.batch + 1, ref.kv_head * G : (ref.kv_head + 1) * G, ref.row0 :].double()
        worst = max(worst, (got - ref.lse).abs().max().item())
    if not worst <= LSE_ATOL:
        return worst, f"lse off by {worst:.3g} > {LSE_ATOL:g}"
    return worst, ""


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


def _clear_grads(*ts: Tensor) -> None:
    for t in ts:
        t.grad = None


@dataclass
class Options:
    """What a run does, resolved from the command line."""

    device: str
    rounds: int  # at most, see timed_seconds
    warmup: int
    impls: list[str]
    # Fewer rounds (at least MIN_ROUNDS) where they would take longer than this; 0: always ``rounds``.
    timed_seconds: float = 0.0
    verbose: bool = False


def run_case(case: Case, opts: Options, ceilings: dict, skip_flex: str = "") -> dict:
    """Checks, measures the memory of, warms up and times every implementation on one case; returns its record.

    ``skip_flex``, if not empty, is why FlexAttention is left out. In backward
    mode each implementation's forward runs once before its check, and the
    check, the memory and the timed calls are of its backward (make_backward).
    """
    device = opts.device
    timer = Timer(device)
    train = case.mode == TRAIN
    backward = case.mode == BACKWARD
    torch.manual_seed(0)
    q = torch.randn(case.batch, case.seqlen_q, case.heads_q, case.head_dim, dtype=case.dtype, device=device)
    k = torch.randn(case.batch, case.seqlen_k, case.heads_kv, case.head_dim, dtype=case.dtype, device=device)
    v = torch.randn_like(k)
    dout = check_dout = None
    if case.mode in GRAD_MODES:
        q.requires_grad_()
        k.requires_grad_()
        v.requires_grad_()
        dout = torch.randn_like(q)
        # Non-zero only on the rows the reference computes (see reference_slices).
        check_dout = dout.clone()
        check_dout[:, : case.seqlen_q - case.check_rows] = 0
    refs = reference_slices(q, k, v, case, check_dout)

    def step_of(run: Callable[[], Tensor]) -> Callable[[], Tensor]:
        if not train:
            return run

        def step() -> Tensor:
            out = run()
            out.backward(dout)
            return out

        return step

    def check_call(run: Callable[[], Tensor]) -> dict[str, Tensor]:
        """One call with the check's dout: out (and dq, dk, dv)."""
        try:
            out = run()
            got = {"out": out.detach()}
            if train:
                out.backward(check_dout)
                got.update(dq=q.grad, dk=k.grad, dv=v.grad)
            timer.sync()
            return got
        finally:
            _clear_grads(q, k, v)

    def check_backward(out: Tensor, bwd: Backward) -> dict[str, Tensor]:
        """The backward with the check's dout, and the output of the forward it follows."""
        dq, dk, dv = bwd(check_dout)
        timer.sync()
        return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}

    rec: dict[str, dict] = {}
    steps: dict[str, Callable[[], object]] = {}
    call_s: dict[str, float] = {}  # seconds of one untimed call, to size the rounds
    for name in opts.impls:
        if name == FLEX and skip_flex:
            rec[name] = {"status": NOT_RUN, "message": f"skipped: {skip_flex}"}
            continue
        rec[name] = {}
        try:
            if backward:
                # The forward, untimed: what it saves is allocated before the
                # backward's peak memory is measured, so not counted in it.
                out, bwd = make_backward(name, q, k, v, case)
                timer.sync()
                check = functools.partial(check_backward, out, bwd)
                step = functools.partial(bwd, dout)
                del out, bwd
            else:
                run = make_impl(name, q, k, v, case)
                check = functools.partial(check_call, run)
                step = step_of(run)
            t = time.perf_counter()
            if device == "cpu":
                # No compiling or autotuning on the CPU: the first call's memory is every call's.
                got, rec[name]["peak_mb"] = measure_peak(check, device)
            else:
                got = check()
            call_s[name] = time.perf_counter() - t
        except Unsupported as e:
            rec[name] = {"status": UNSUPPORTED, "message": str(e)}
            continue
        except Exception as e:
            if not _cuda_alive(device):
                raise DeviceLost(f"{name}: {_one_line(e)}") from e
            rec[name] = {"status": ERROR if name in OURS_IMPLS else UNSUPPORTED, "message": _one_line(e)}
            if name in OURS_IMPLS and opts.verbose:
                traceback.print_exc()
            continue
        errors, why = check_result(got, refs, case)
        rec[name]["errors"] = errors
        del got
        if not why and name == OURS:
            rec[name]["lse_err"], why = check_lse(q, k, v, case, refs)
        if why:
            rec[name].update(status=WRONG, message=why)
            rec[name].pop("peak_mb", None)
            continue
        rec[name]["status"] = OK
        steps[name] = step
    del refs

    flush = None
    layers = 1
    if case.mode == DECODE and device == "cuda":
        flush_buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        flush = flush_buf.zero_
    elif case.mode == DECODE and steps:
        layers = max(1, -(-CPU_DECODE_STEP_BYTES // case.kv_bytes))
        caches = [(k, v)] + [(torch.randn_like(k), torch.randn_like(v)) for _ in range(layers - 1)]
        for name in list(steps):
            runs = [make_impl(name, q, kl, vl, case) for kl, vl in caches]

            def decode_step(runs: list[Callable[[], Tensor]] = runs) -> Tensor:
                for run in runs:
                    out = run()
                return out

            steps[name] = decode_step

    def drop(name: str, e: Exception, when: str) -> None:
        if not _cuda_alive(device):
            raise DeviceLost(f"{name} ({when}): {_one_line(e)}") from e
        status = ERROR if name in OURS_IMPLS or when == "timed" else UNSUPPORTED
        rec[name].update(status=status, message=f"{when}: {_one_line(e)}")
        del steps[name]

    for name in list(steps):
        try:
            if "peak_mb" not in rec[name]:
                # After the check call: compiling and autotuning allocate too.
                t = time.perf_counter()
                _, rec[name]["peak_mb"] = measure_peak(steps[name], device)
                call_s[name] = time.perf_counter() - t
                _clear_grads(q, k, v)
            for _ in range(opts.warmup):
                steps[name]()
                _clear_grads(q, k, v)
            timer.sync()
        except Exception as e:
            _clear_grads(q, k, v)
            drop(name, e, "warm-up")

    rounds = opts.rounds
    if opts.timed_seconds and steps:
        per_round = sum(call_s[n] for n in steps) * layers
        rounds = min(rounds, max(MIN_ROUNDS, int(opts.timed_seconds / per_round)))
    times: dict[str, list[Callable[[], float]]] = {n: [] for n in steps}
    names = list(times)
    for r in range(rounds if names else 0):
        # Rotated each round so that no implementation always follows the same one.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name not in steps:
                continue
            if flush is not None:
                flush()
            try:
                t = timer.start()
                steps[name]()
                times[name].append(timer.stop(t))
            except Exception as e:
                drop(name, e, "timed")
            finally:
                _clear_grads(q, k, v)
        timer.sync()

    # The ceiling that bounds the case is the slower of its two floors (a
    # roofline): its matmul FLOPs at the matmul rate, or its K/V bytes at the
    # read bandwidth. Decode is usually the second, but not for a large group
    # on a CPU (falcon-7b's 71 query heads per KV head).
    matmul_floor_s = case.flops / (matmul_ceiling(ceilings, case.dtype) * 1e12)
    read_floor_s = case.kv_bytes / (ceilings["read_gbps"] * 1e9)
    bound = "read" if read_floor_s > matmul_floor_s else "matmul"
    floor_s = max(matmul_floor_s, read_floor_s)
    for name, ts in times.items():
        if name not in steps:
            continue
        ms = [t() / layers for t in ts]
        st = rec[name]
        st["median_ms"] = statistics.median(ms)
        st["min_ms"] = min(ms)
        st["times_ms"] = ms
        sec = st["median_ms"] / 1e3
        st["tflops"] = case.flops / sec / 1e12
        st["kv_gbps"] = case.kv_bytes / sec / 1e9
        st["pct_ceiling"] = 100 * floor_s / sec

    others = {n: st["median_ms"] for n, st in rec.items() if n not in OURS_IMPLS and "median_ms" in st}
    best = min(others, key=others.__getitem__) if others else None
    ours_ms = rec[OURS].get("median_ms")
    return {
        "case": case.name,
        "model": case.model.name,
        "mode": case.mode,
        # The mode, or "<mode>-full" without the causal mask.
        "kind": case.kind,
        "dtype": DTYPE_NAMES[case.dtype],
        "shape": dict(
            batch=case.batch,
            seqlen_q=case.seqlen_q,
            seqlen_k=case.seqlen_k,
            heads_q=case.heads_q,
            heads_kv=case.heads_kv,
            head_dim=case.head_dim,
            causal=case.causal,
            window_left=case.window_left,
            window_right=case.window_right,
            softcap=case.softcap,
        ),
        "length": case.seqlen_k,
        "batch": case.batch,
        "flops": case.flops,
        "kv_bytes": case.kv_bytes,
        "checked_rows": case.check_rows,
        "rounds": rounds,
        # Timed calls each ran the case on this many K/V caches (CPU decode); times are per cache.
        "layers": layers,
        "bound": bound,
        "impls": rec,
        "best_baseline": best,
        "speedup": others[best] / ours_ms if best and ours_ms else None,
    }


# ---------------------------------------------------------------- reporting


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _cell(st: dict) -> str:
    s = st["status"]
    if s == OK:
        return _num(st["median_ms"]) if "median_ms" in st else "ok"
    return {WRONG: "WRONG", UNSUPPORTED: "unsup", ERROR: "ERR", NOT_RUN: "-"}.get(s, s)


def _mb(st: dict | None) -> str:
    return _num(st["peak_mb"]) if st and st.get("peak_mb") is not None else "-"


def format_table(meta: dict, ceilings: dict, rows: list[dict], impls: list[str]) -> str:
    """The fixed-width summary printed at the end of a run."""
    rev = meta.get("commit")
    rev = f"commit {rev[:10]}{'+' if meta.get('dirty') else ''}" if rev else f"gqa_ext {meta.get('version')}"
    mm = ", ".join(f"{k} {_num(v)}" for k, v in ceilings["matmul_tflops"].items())
    note = f" ({ceilings['matmul_note']})" if ceilings.get("matmul_note") else ""
    width = max([28, *(len(r["case"]) for r in rows)]) + 1
    lines = [
        f"gqa_ext bench: {meta['device']['name']}, torch {meta['torch']}, {rev}; "
        f"median of {'up to ' if meta['timed_seconds'] else ''}{meta['rounds']} alternating rounds, ms",
        f"ceilings: copy {_num(ceilings['copy_gbps'])} GB/s (read+write), read {_num(ceilings['read_gbps'])} GB/s, "
        f"matmul TFLOP/s: {mm}{note}",
        f"{'case':<{width}}"
        + "".join(f"{SHORT[n]:>8}" for n in impls)
        + f" | {'ours rate':>12} {'%ceil':>5} {'speedup':>7} | {'MB ours':>8} {'MB best':>8}",
    ]
    skipped: dict[str, int] = {}
    for row in rows:
        if "impls" not in row:
            if row.get("status") == "skipped":
                skipped[row.get("message", "")] = skipped.get(row.get("message", ""), 0) + 1
            else:
                lines.append(f"{row['case']:<{width}} {row.get('status', '?')}: {row.get('message', '')}"[:140])
            continue
        impl = row["impls"]
        ours = impl[OURS]
        if "median_ms" in ours:
            perf = f"{_num(ours['tflops'])} TF/s" if row["bound"] == "matmul" else f"{_num(ours['kv_gbps'])} GB/s"
            pct = f"{ours['pct_ceiling']:.0f}%"
        else:
            perf = pct = "-"
        speedup = f"{row['speedup']:.2f}" if row.get("speedup") else "-"
        best = impl.get(row["best_baseline"]) if row.get("best_baseline") else None
        lines.append(
            f"{row['case']:<{width}}"
            + "".join(f"{_cell(impl[n]) if n in impl else '':>8}" for n in impls)
            + f" | {perf:>12} {pct:>5} {speedup:>7} | {_mb(ours):>8} {_mb(best):>8}"
        )
    for why, n in skipped.items():
        lines.append(f"{n} case{'s' if n > 1 else ''} skipped: {why}")
    lines.append(
        "unsup: cannot run the case; WRONG: differs from the float64 reference (not timed); ERR: raised; "
        "-: not run. %ceil: the case's floor time / ours, the floor being its FLOPs at the matmul rate or its K/V "
        "bytes at the read bandwidth, whichever is longer (the rate shown is that one's); "
        "speedup: best other ms / ours; MB: peak extra memory of one call (ours, best other). "
        "train: forward + backward; backward: the backward alone, after an untimed forward whose saved "
        "tensors its MB leave out, FLOPs 2.5x the forward's; -full: no causal mask"
    )
    problems = [
        f"  {row['case']}: {n} {row['impls'][n]['status']}: {row['impls'][n].get('message', '')}"
        for row in rows
        if "impls" in row
        for n in row["impls"]
        if row["impls"][n]["status"] in (ERROR, WRONG)
    ]
    if problems:
        lines.append("errors and wrong results:")
        lines.extend(p[:200] for p in problems[:12])
        if len(problems) > 12:
            lines.append(f"  ... {len(problems) - 12} more in results.json")
    return "\n".join(lines)


def write_plots(rows: list[dict], out_dir: str) -> list[str] | None:
    """One PNG per model x kind x dtype (x batch, for decode) with several lengths: time and speedup vs length.

    Returns the files written, or None if matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "impls" in row:
            kind = row.get("kind", row["mode"])
            key = (row["model"], kind, row["dtype"], row["batch"] if row["mode"] == DECODE else None)
            groups.setdefault(key, []).append(row)
    written = []
    for (model, kind, dtype, batch), group in groups.items():
        mode = group[0]["mode"]
        group.sort(key=lambda r: r["length"])
        if len({r["length"] for r in group}) < 2:
            continue
        fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
        impls = list(group[0]["impls"])
        for name in impls:
            pts = [(r["length"], r["impls"][name]["median_ms"]) for r in group if "median_ms" in r["impls"][name]]
            if pts:
                ax_t.plot(*zip(*pts, strict=True), marker="o", label=name)
            if name in OURS_IMPLS:
                continue
            pts = [
                (r["length"], r["impls"][name]["median_ms"] / r["impls"][OURS]["median_ms"])
                for r in group
                if "median_ms" in r["impls"][name] and "median_ms" in r["impls"][OURS]
            ]
            if pts:
                ax_s.plot(*zip(*pts, strict=True), marker="o", label=f"vs {name}")
        xlabel = "K/V cache length L" if mode == DECODE else "sequence length S"
        if mode != DECODE and len({r["batch"] for r in group}) > 1:
            xlabel += " (batch x S fixed)"
        ax_t.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median time (ms)", title="time")
        ax_s.set(xscale="log", xlabel=xlabel, ylabel="other ms / ours ms", title="speedup of ours")
        ax_s.axhline(1.0, color="gray", linewidth=0.8)
        lengths = sorted({r["length"] for r in group})
        for ax in (ax_t, ax_s):
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_xticks([], minor=True)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        title = f"{model} {kind} {dtype}" + (f" B{batch}" if batch is not None else "")
        fig.suptitle(title)
        fig.tight_layout()
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, title.replace(" ", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


class Progress:
    """A one-line progress bar on a terminal, redrawn every second; otherwise one plain line per finished case."""

    def __init__(self, total: int, stream=None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.current: tuple[int, str] | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if self.tty:
            # A case can take a minute on a CPU: keep the elapsed time moving.
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self._draw()

    def _draw(self) -> None:
        with self.lock:
            if self.current is None or self.stop.is_set():
                return
            i, name = self.current
            s = int(time.monotonic() - self.t0)
            bar = "#" * (20 * i // max(1, self.total))
            line = f"[{bar:<20}] {i + 1}/{self.total} {s // 60}:{s % 60:02d} {name}"
            self.stream.write("\r\x1b[K" + line[: shutil.get_terminal_size().columns - 1])
            self.stream.flush()

    def start(self, i: int, name: str) -> None:
        """Case ``i`` (0-based) begins."""
        self.current = (i, name)
        if self.tty:
            self._draw()

    def done(self, i: int, line: str, details: list[str]) -> None:
        """Case ``i`` finished: its summary line and indented details, when not on a terminal."""
        if not self.tty:
            for text in [f"[{i + 1}/{self.total}] {line}", *(f"    {d}" for d in details)]:
                print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line that stays, above the bar."""
        with self.lock:
            if self.tty:
                self.stream.write("\r\x1b[K")
            print(text, file=self.stream, flush=True)
        if self.tty:
            self._draw()

    def close(self) -> None:
        """Removes the bar."""
        with self.lock:
            self.stop.set()
            if self.tty:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def _git(*cmd: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        res = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=here, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_meta(opts: Options, command: str) -> dict:
    """Date, source revision, command, versions and device of this run."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    top = _git("rev-parse", "--show-toplevel")
    # Installed into a directory inside some other repository: not our commit.
    in_checkout = top is not None and os.path.realpath(top) == os.path.realpath(package_root)
    status = _git("status", "--porcelain", "--untracked-files=no") if in_checkout else None
    meta: dict = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=_git("rev-parse", "HEAD") if in_checkout else None,
        dirty=bool(status) if in_checkout else None,
        version=gqa_ext.__version__,
        command=command,
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        threads=torch.get_num_threads(),
        build_info=gqa_ext.build_info(),
        impls=opts.impls,
        rounds=opts.rounds,
        timed_seconds=opts.timed_seconds,
        min_rounds=MIN_ROUNDS,
        warmup=opts.warmup,
        rel_tol={DTYPE_NAMES[k]: v for k, v in REL_TOL.items()},
        lse_atol=LSE_ATOL,
        l2_flush_bytes=L2_FLUSH_BYTES if opts.device == "cuda" else 0,
        cpu_decode_step_bytes=CPU_DECODE_STEP_BYTES if opts.device == "cpu" else 0,
    )
    if opts.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta["device"] = dict(
            name=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_bytes=getattr(p, "L2_cache_size", None),
        )
        meta["cudnn"] = torch.backends.cudnn.version()
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
    else:
        meta["device"] = dict(name=f"CPU {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return meta


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- command line


def _list_of(choices: list[str] | dict) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)} (comma-separated)")
        return items

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers, comma-separated")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gqa-ext bench``."""
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", type=_list_of(DTYPES), help="dtypes (default: bf16 on CUDA, fp32,bf16 on CPU)")
    parser.add_argument("--model", type=_list_of(MODELS), help=f"models (default all: {', '.join(MODELS)})")
    parser.add_argument(
        "--mode",
        type=_list_of(MODES),
        help=f"modes, of {', '.join(MODES)} (default: {','.join(DEFAULT_MODES)}); backward runs each length "
        "causal and without the mask (backward-full)",
    )
    parser.add_argument(
        "--case",
        default="",
        help="comma-separated substrings: run the cases whose name contains any of them, "
        "e.g. 'prefill bf16 S2048,decode'",
    )
    parser.add_argument("--lengths", type=_ints, help="replace the lengths of every mode (S, or L for decode)")
    parser.add_argument("--batch", type=int, help="replace the batch sizes of every mode")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke subset: on CPU llama3-8b, one dtype, short lengths, 2 rounds; on CUDA a few cases",
    )
    parser.add_argument(
        "--impl",
        help="comma-separated implementations to run beside ours (default all: on CPU "
        f"{', '.join(IMPLS['cpu'][1:])}; on CUDA {', '.join(IMPLS['cuda'][1:])})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"timed rounds per case (default 15 on CUDA, 5 on CPU, cut to as few as {MIN_ROUNDS} where a case's "
        f"rounds would take over {TIMED_SECONDS['cuda']:g} s on CUDA, {TIMED_SECONDS['cpu']:g} s on CPU)",
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed calls per implementation after the check (default 3 on CUDA, 0 on CPU)"
    )
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take time)")
    parser.add_argument(
        "--time-budget", type=float, default=0, help="seconds; cases not started by then are skipped (0: no limit)"
    )
    parser.add_argument("--out", default="gqa_ext_bench", help="output directory (default ./gqa_ext_bench)")
    parser.add_argument("--json", help="write the results here instead of OUT/results.json")
    parser.add_argument("--table", help="write the table here instead of OUT/table.txt")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of our op's errors")


def run(args: argparse.Namespace, command: str = "gqa-ext bench") -> int:
    """Runs the benchmark for parsed ``args``; returns the exit status."""

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if cuda else ["fp32", "bf16"]))]
    models = args.model or (["llama3-8b"] if args.quick and not cuda else list(MODELS))
    if args.quick and not args.dtype:
        dtypes = dtypes[:1]
    rounds = args.rounds if args.rounds is not None else (2 if args.quick and not cuda else 15 if cuda else 5)
    # On the CPU the check call warms up: no compiles, no autotuning.
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    if rounds < 1 or warmup < 0:
        return fail("--rounds must be >= 1 and --warmup >= 0")
    if args.batch is not None and args.batch < 1:
        return fail("--batch must be >= 1")
    impls = IMPLS[device]
    if args.impl is not None:
        wanted = [s.strip() for s in args.impl.split(",") if s.strip()]
        bad = [s for s in wanted if s not in impls]
        if bad:
            return fail(f"--impl {','.join(bad)}: on {device} choose from {', '.join(impls)}")
        impls = [OURS, *(n for n in impls if n in wanted and n != OURS)]
    if args.no_flex:
        impls = [n for n in impls if n != FLEX]
    timed_seconds = 0.0 if args.rounds is not None else TIMED_SECONDS[device]
    opts = Options(device, rounds, warmup, impls, timed_seconds=timed_seconds, verbose=args.verbose)

    cases = make_cases(
        device,
        dtypes,
        models,
        args.mode or list(DEFAULT_MODES),
        lengths=args.lengths,
        batch=args.batch,
        quick=args.quick,
    )
    wanted_names = [s.strip() for s in args.case.split(",") if s.strip()]
    cases = [c for c in cases if not wanted_names or any(s in c.name for s in wanted_names)]
    if args.list:
        for c in cases:
            print(f"{c.name:<40} K/V {c.cache_bytes / 1e9:7.3f} GB  {c.flops / 1e12:9.4f} TFLOP")
        return 0
    if not cases:
        return fail("no case matches the options")
    if cuda and not torch.cuda.is_available():
        return fail(
            f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "--device cuda needs a GPU"
        )
    if cuda and not gqa_ext.build_info().get("cuda_kernels"):
        print("warning: this gqa_ext build has no CUDA kernels; our op will fail", file=sys.stderr)

    meta = collect_meta(opts, command)
    progress = Progress(len(cases))
    try:
        return _run_cases(cases, opts, args, meta, progress)
    finally:
        # Also on Ctrl-C: the terminal keeps no half-drawn bar.
        progress.close()


def _run_cases(cases: list[Case], opts: Options, args: argparse.Namespace, meta: dict, progress: Progress) -> int:
    """Measures the ceilings and runs the cases, writing the outputs after each; returns the exit status."""
    cuda = opts.device == "cuda"
    json_path = args.json or os.path.join(args.out, "results.json")
    table_path = args.table or os.path.join(args.out, "table.txt")
    progress.note(f"gqa_ext bench: {len(cases)} cases on {meta['device']['name']}; torch {meta['torch']}")
    t0 = time.monotonic()
    ceilings = measure_ceilings(opts.device, list(dict.fromkeys(c.dtype for c in cases)))
    mm = ", ".join(f"{k} {v:.3g}" for k, v in ceilings["matmul_tflops"].items())
    progress.note(
        f"ceilings ({time.monotonic() - t0:.1f} s): copy {ceilings['copy_gbps']:.0f} GB/s, "
        f"read {ceilings['read_gbps']:.0f} GB/s, matmul {mm} TFLOP/s"
    )

    # Rows keep the cases' order; the quick cases run first, so that a run cut
    # short by --time-budget still has them.
    slots: list[dict | None] = [None] * len(cases)

    def rows() -> list[dict]:
        return [r for r in slots if r is not None]

    def write(complete: bool) -> str:
        table = format_table(meta, ceilings, rows(), opts.impls)
        results = dict(meta=meta, ceilings=ceilings, cases=rows(), complete=complete)
        _write_text(json_path, json.dumps(results, indent=1) + "\n")
        _write_text(table_path, table + "\n")
        return table

    failed = False
    order = sorted(range(len(cases)), key=lambda i: (not cases[i].quick, i))
    for n_done, i in enumerate(order):
        case = cases[i]
        elapsed = time.monotonic() - t0
        if args.time_budget and elapsed > args.time_budget:
            for j, c in enumerate(cases):
                if slots[j] is None:
                    slots[j] = dict(case=c.name, status="skipped", message=f"time budget of {args.time_budget:g} s")
            progress.note(f"time budget spent: skipped {len(cases) - n_done} cases")
            break
        skip_flex = ""
        if args.time_budget and elapsed > FLEX_BUDGET_SHARE * args.time_budget:
            skip_flex = "time budget"
        progress.start(n_done, case.name)
        tc = time.monotonic()
        try:
            with warnings.catch_warnings():
                # Backends that refuse a case warn why before raising; the message is kept.
                warnings.simplefilter("ignore")
                row = run_case(case, opts, ceilings, skip_flex)
        except DeviceLost as e:
            slots[i] = dict(case=case.name, status="device lost", message=str(e))
            progress.close()
            print(f"{case.name}: CUDA context lost ({e}); stopping", file=sys.stderr, flush=True)
            print(write(complete=False))
            return 1
        except torch.OutOfMemoryError as e:
            row = dict(case=case.name, status="out of memory", message=_one_line(e))
        finally:
            if cuda:
                # Raises in a lost context; the report must still be written.
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        row["seconds"] = time.monotonic() - tc
        slots[i] = row
        took = f"{case.name} ({row['seconds']:.1f} s)"
        if "impls" in row:
            failed |= row["impls"][OURS]["status"] != OK
            failed |= row["impls"].get(OURS_PAGED, {}).get("status") in (ERROR, WRONG)
            cells = ", ".join(f"{n} {_cell(st)}" for n, st in row["impls"].items())
            details = [f"{n}: {st['status']}: {st['message']}" for n, st in row["impls"].items() if st.get("message")]
            progress.done(n_done, f"{took}: {cells}", details)
        else:
            failed = True
            progress.done(n_done, f"{took}: {row['status']}: {row['message']}", [])
        write(complete=False)

    progress.close()
    table = write(complete=True)
    print(f"total {time.monotonic() - t0:.1f} s\n", flush=True)
    outputs = [json_path, table_path]
    if not args.no_plots:
        plots = write_plots(rows(), args.out)
        if plots is None:
            print("note: matplotlib is not installed, so no plots (pip install 'gqa_ext[bench]')", file=sys.stderr)
        else:
            outputs += plots
    print(f"wrote {', '.join(outputs)}\n", file=sys.stderr, flush=True)
    print(table, flush=True)
    if not any("impls" in r for r in rows()):
        print("error: no case was measured", file=sys.stderr)
        return 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``gqa-ext bench`` with ``argv`` (default: the command line); returns the exit status."""
    parser = argparse.ArgumentParser(prog="gqa-ext bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv), command=shlex.join(["gqa-ext", "bench", *argv]))
