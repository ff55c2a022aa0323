"""The ``gqa-ext`` command: ``memory``, ``bench`` (on tiny CPU cases) and the dispatcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gqa_ext
from gqa_ext import bench
from gqa_ext.__main__ import main
from gqa_ext.memory import kv_cache_report
from gqa_ext.models import MODELS, ModelShape
from gqa_ext.reference import visible_mask

# Stand-ins for the measured ceilings: measuring them takes seconds.
CEILINGS = dict(copy_gbps=10.0, read_gbps=10.0, matmul_tflops={"fp32": 0.1}, matmul_n=0, matmul_note="")


@pytest.fixture
def fixed_ceilings(monkeypatch):
    monkeypatch.setattr(bench, "measure_ceilings", lambda device, dtypes: CEILINGS)


def tiny_bench_args(out_dir, *extra: str) -> list[str]:
    """A bench command line for llama3-8b's heads at S = 64 (fp32, 2 rounds) into out_dir."""
    return ["bench", "--device", "cpu", "--model", "llama3-8b", "--lengths", "64", "--dtype", "fp32"] + [
        "--rounds",
        "2",
        "--out",
        str(out_dir),
        *extra,
    ]


def load_results(out_dir) -> dict:
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- memory


def test_memory_numbers():
    rows = {r["model"]: r for r in kv_cache_report("bf16", context=1024)}
    llama = rows["llama3-8b"]
    # 32 layers x (K and V) x 8 heads x 128 x 2 bytes.
    assert llama["bytes_per_token"] == {"mha": 524288, "gqa": 131072, "mqa": 16384}
    assert llama["bytes_per_sequence"] == {"mha": 512 << 20, "gqa": 128 << 20, "mqa": 16 << 20}
    assert llama["saving_gqa_vs_mha"] == 4 and llama["saving_mqa_vs_gqa"] == 8
    # falcon-7b is MQA already: 32 x 2 x 1 x 64 x 2 bytes, MHA has 71 heads.
    falcon = rows["falcon-7b"]
    assert falcon["bytes_per_token"] == {"mha": 71 * 8192, "gqa": 8192, "mqa": 8192}
    assert falcon["saving_gqa_vs_mha"] == 71 and falcon["saving_mqa_vs_gqa"] == 1
    fp32 = {r["model"]: r for r in kv_cache_report("fp32", context=10)}
    assert fp32["llama3-8b"]["bytes_per_sequence"]["gqa"] == 2 * 131072 * 10


def test_memory_command(capsys):
    assert main(["memory"]) == 0
    text = capsys.readouterr().out
    assert "128 KiB" in text and "512 MiB" in text and all(name in text for name in MODELS)
    assert main(["memory", "--json", "--dtype", "fp32", "--context", "2048"]) == 0
    rows = json.loads(capsys.readouterr().out)
    llama = next(r for r in rows if r["model"] == "llama3-8b")
    assert llama["bytes_per_token"]["gqa"] == 262144
    assert llama["bytes_per_sequence"]["mqa"] == 32768 * 2048


# ---------------------------------------------------------------- cases


def test_case_table():
    cases = bench.make_cases("cpu", [torch.float32, torch.bfloat16], list(MODELS), list(bench.MODES))
    # 3 lengths a mode, backward twice: causal and full.
    assert len(cases) == len(MODELS) * 2 * 15
    names = {c.name for c in cases}
    assert "llama3-8b prefill bf16 S2048 B1" in names
    assert "llama3-8b decode fp32 L4096 B1" in names
    backward = {c.name: c for c in cases if c.mode == bench.BACKWARD}
    assert len(backward) == len(MODELS) * 2 * 6
    causal = backward["llama3-8b backward fp32 S512 B1"]
    full = backward["llama3-8b backward-full fp32 S512 B1"]
    assert (causal.causal, causal.kind, full.causal, full.kind) == (True, "backward", False, "backward-full")
    assert full.visible_pairs == 512 * 512 and causal.visible_pairs == 512 * 513 // 2
    assert causal.flops == 2.5 * 4 * 32 * 128 * causal.visible_pairs
    # Only backward has full cases; the default modes leave backward out.
    assert all(c.causal for c in cases if c.mode in (bench.PREFILL, bench.TRAIN))
    assert bench.BACKWARD not in bench.DEFAULT_MODES
    gemma = next(c for c in cases if c.name == "gemma2-9b decode fp32 L16384 B1")
    assert (gemma.window_left, gemma.softcap, gemma.seqlen_q) == (4095, 50.0, 1)
    # The window leaves 4096 of the 16384 cached keys to read.
    assert gemma.kv_bytes == 2 * 4096 * 8 * 256 * 4
    cuda = bench.make_cases("cuda", [torch.bfloat16], list(MODELS), list(bench.MODES))
    assert all(c.batch * c.seqlen_q == bench.CUDA_TOKENS for c in cuda if c.mode != bench.DECODE)
    assert {c.batch for c in cuda if c.mode == bench.DECODE} == {1, 8}
    assert {c.causal for c in cuda if c.model.name == "llama3-8b" and c.mode == bench.BACKWARD} == {True, False}
    quick = bench.make_cases("cuda", [torch.bfloat16], list(MODELS), list(bench.MODES), quick=True)
    assert len(quick) == len(bench.CUDA_QUICK)
    assert {c.name for c in quick if c.mode == bench.BACKWARD} == {
        "llama3-8b backward bf16 S4096 B4",
        "llama3-8b backward-full bf16 S4096 B4",
    }
    # Marked quick in a full run too: they run first under --time-budget.
    assert {c.name for c in cuda if c.quick} == {c.name for c in quick}


@pytest.mark.parametrize(
    "window, mode, seqlen_q, seqlen_k, full",
    [
        (-1, "prefill", 37, 37, False),
        (5, "prefill", 37, 37, False),
        (5, "train", 20, 50, False),
        (5, "backward", 20, 50, False),
        (-1, "backward", 20, 50, True),
        (5, "backward", 20, 50, True),
        (7, "decode", 1, 30, False),
        (-1, "decode", 1, 30, False),
    ],
)
def test_visible_pairs_match_the_reference_mask(window, mode, seqlen_q, seqlen_k, full):
    model = ModelShape("tiny", heads_q=4, heads_kv=2, head_dim=8, num_layers=1, window=window)
    case = bench.Case(model, mode, torch.float32, 3, seqlen_q, seqlen_k, full=full)
    assert case.causal == (mode != "decode" and not full)
    mask = visible_mask(
        seqlen_q, seqlen_k, causal=case.causal, window_left=case.window_left, window_right=case.window_right
    )
    assert case.visible_pairs == int(mask.sum())
    factor = {"train": 3.5, "backward": 2.5}.get(mode, 1.0)
    assert case.flops == factor * 4 * 3 * 4 * 8 * int(mask.sum())


def test_case_filter_any_substring(capsys):
    assert main(["bench", "--device", "cpu", "--list", "--case", "llama3-8b prefill fp32,falcon-7b decode bf16"]) == 0
    listed = [line.split("  ")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert len(listed) == 6
    assert all(n.startswith(("llama3-8b prefill fp32", "falcon-7b decode bf16")) for n in listed)


# ---------------------------------------------------------------- measuring


def test_peak_memory_of_a_known_allocation():
    def allocate():
        kept = torch.ones(100_000_000, dtype=torch.uint8)
        freed = torch.ones(50_000_000, dtype=torch.uint8)
        del freed
        return kept

    result, peak_mb = bench.measure_peak(allocate, "cpu")
    assert result.numel() == 100_000_000
    assert peak_mb == pytest.approx(150.0, abs=0.1)
    _, peak_mb = bench.measure_peak(lambda: torch.ones(100_000_000, dtype=torch.uint8), "cpu")
    assert peak_mb == pytest.approx(100.0, abs=0.1)


@pytest.mark.parametrize(
    "mode, seqlen_q, check_rows, full",
    [("train", 40, 24, False), ("backward", 40, 24, False), ("backward", 40, 24, True), ("decode", 1, 1, False)],
)
def test_window_and_restricted_rows_check(monkeypatch, mode, seqlen_q, check_rows, full):
    """Local attention (SDPA gets a boolean mask), train and backward checked on their last rows only."""
    monkeypatch.setattr(bench, "REF_ELEMENTS", 2 * 40 * 24)  # G * Sk * 24 rows of 40
    model = ModelShape("local", heads_q=4, heads_kv=2, head_dim=16, num_layers=1, window=9)
    case = bench.Case(model, mode, torch.float32, 2, seqlen_q, 40, full=full)
    assert case.check_rows == check_rows
    # A CPU decode step runs as many layers as make CPU_DECODE_STEP_BYTES of K/V: the 10 keys this window
    # sees would take 52429 layers of 256 MB; 4 here.
    monkeypatch.setattr(bench, "CPU_DECODE_STEP_BYTES", 4 * case.kv_bytes)
    opts = bench.Options("cpu", rounds=1, warmup=0, impls=bench.IMPLS["cpu"])
    row = bench.run_case(case, opts, CEILINGS)
    assert row["layers"] == (4 if mode == "decode" else 1)
    for name in bench.IMPLS["cpu"]:
        st = row["impls"][name]
        if name == bench.OURS_PAGED and mode != "decode":
            assert st["status"] == "unsupported", (name, st)
            continue
        assert st["status"] == "ok", (name, st)
        assert set(st["errors"]) == ({"out", "dq", "dk", "dv"} if mode in ("train", "backward") else {"out"})
        assert max(st["errors"].values()) < 1e-5
        assert len(st["times_ms"]) == 1


@pytest.mark.parametrize("full", [False, True])
def test_backward_mode_times_the_backward_alone(monkeypatch, full):
    """One untimed forward per implementation; the check, the warm-up and every timed call are its backward,
    whose peak memory leaves out what the forward keeps."""
    real = bench.make_backward
    forwards: dict[str, int] = {}
    backwards: dict[str, int] = {}
    kept_mb = 20

    def counted(name, q, k, v, case):
        forwards[name] = forwards.get(name, 0) + 1
        out, bwd = real(name, q, k, v, case)
        # Stands for the forward's saved tensors: allocated before the backward, alive during it.
        saved = torch.ones(kept_mb * 1_000_000, dtype=torch.uint8)

        def backward(dout):
            backwards[name] = backwards.get(name, 0) + 1
            assert saved.numel() > 0
            return bwd(dout)

        return out, backward

    monkeypatch.setattr(bench, "make_backward", counted)
    model = ModelShape("tiny", heads_q=8, heads_kv=2, head_dim=32, num_layers=1)
    case = bench.Case(model, "backward", torch.float32, 2, 48, 48, full=full)
    opts = bench.Options("cpu", rounds=3, warmup=1, impls=bench.IMPLS["cpu"])
    row = bench.run_case(case, opts, CEILINGS)
    assert (row["mode"], row["kind"], row["shape"]["causal"]) == ("backward", case.kind, not full)
    assert row["flops"] == 2.5 * 4 * 2 * 8 * 32 * (48 * 48 if full else 48 * 49 // 2)
    assert row["impls"]["ours_paged"]["status"] == "unsupported"
    for name in ("ours", "sdpa", "sdpa_repeat"):
        st = row["impls"][name]
        assert st["status"] == "ok", (name, st)
        assert set(st["errors"]) == {"out", "dq", "dk", "dv"} and max(st["errors"].values()) < 1e-5
        assert forwards[name] == 1
        assert backwards[name] == 1 + 1 + 3  # the check, the warm-up, the rounds
        assert len(st["times_ms"]) == 3
        assert 0 < st["peak_mb"] < kept_mb, (name, st["peak_mb"])


# ---------------------------------------------------------------- bench end to end


def test_bench_command_end_to_end(tmp_path):
    """The real command in a fresh process, from outside the source tree: exit 0, JSON, table last."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(gqa_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gqa_ext",
            *tiny_bench_args(out, "--no-plots", "--mode", "prefill,train,backward,decode"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = load_results(out)
    assert results["complete"] is True
    assert results["meta"]["command"].startswith("gqa-ext bench --device cpu")
    assert results["meta"]["build_info"] == gqa_ext.build_info()
    assert results["ceilings"]["read_gbps"] > 0 and "fp32" in results["ceilings"]["matmul_tflops"]
    cases = {c["case"]: c for c in results["cases"]}
    assert set(cases) == {
        "llama3-8b prefill fp32 S64 B1",
        "llama3-8b train fp32 S64 B1",
        "llama3-8b backward fp32 S64 B1",
        "llama3-8b backward-full fp32 S64 B1",
        "llama3-8b decode fp32 L64 B1",
    }
    for case in cases.values():
        ours = case["impls"]["ours"]
        assert ours["status"] == "ok", ours
        assert len(ours["times_ms"]) == 2 and ours["peak_mb"] > 0 and ours["pct_ceiling"] > 0
        assert case["speedup"] > 0
    assert "tflops" in cases["llama3-8b train fp32 S64 B1"]["impls"]["ours"]
    # The backward alone: dq, dk, dv checked before timed, FLOPs 2.5 forwards (train 3.5), and less memory
    # than forward + backward, whose out and lse it does not count.
    prefill, train = cases["llama3-8b prefill fp32 S64 B1"], cases["llama3-8b train fp32 S64 B1"]
    for name, causal in [("llama3-8b backward fp32 S64 B1", True), ("llama3-8b backward-full fp32 S64 B1", False)]:
        case = cases[name]
        assert (case["mode"], case["shape"]["causal"]) == ("backward", causal)
        assert case["kind"] == ("backward" if causal else "backward-full")
        assert set(case["impls"]["sdpa"]["errors"]) == {"out", "dq", "dk", "dv"}
        assert set(case["impls"]["ours"]["errors"]) == {"out", "dq", "dk", "dv"}
        assert case["impls"]["ours"]["peak_mb"] < train["impls"]["ours"]["peak_mb"]
    assert cases["llama3-8b backward fp32 S64 B1"]["flops"] == 2.5 * prefill["flops"]
    assert train["flops"] == 3.5 * prefill["flops"]
    assert "kv_gbps" in cases["llama3-8b decode fp32 L64 B1"]["impls"]["ours"]
    # The paged cache runs beside the contiguous one, in decode only, and is no baseline.
    assert cases["llama3-8b decode fp32 L64 B1"]["impls"]["ours_paged"]["status"] == "ok"
    assert cases["llama3-8b prefill fp32 S64 B1"]["impls"]["ours_paged"]["status"] == "unsupported"
    assert all(case["best_baseline"] not in ("ours", "ours_paged") for case in cases.values())
    table = (out / "table.txt").read_text()
    assert all(name in table for name in cases)
    # The table is the last thing on stdout; progress went to stderr.
    assert res.stdout.rstrip().endswith(table.rstrip())
    assert "[5/5]" in res.stderr


@pytest.mark.parametrize("dtype, how", [("fp32", "scaled"), ("bf16", "shifted")])
def test_wrong_implementation_is_reported_and_not_timed(tmp_path, monkeypatch, capsys, fixed_ceilings, dtype, how):
    real_ours = bench._ours
    calls = {}

    def wrong_ours(q, k, v, case):
        run = real_ours(q, k, v, case)

        def wrong() -> torch.Tensor:
            calls[case.name] = calls.get(case.name, 0) + 1
            out = run()
            return out * 1.01 if how == "scaled" else out.roll(1, dims=1)

        return wrong

    monkeypatch.setattr(bench, "_ours", wrong_ours)
    args = tiny_bench_args(tmp_path, "--mode", "prefill,train", "--no-plots")
    args[args.index("fp32")] = dtype
    assert main(args) == 1
    results = load_results(tmp_path)
    assert len(results["cases"]) == 2
    for case in results["cases"]:
        ours = case["impls"]["ours"]
        assert ours["status"] == "WRONG", ours
        assert "relative error" in ours["message"]
        assert "median_ms" not in ours and "times_ms" not in ours
        assert case["impls"]["sdpa"]["status"] == "ok" and len(case["impls"]["sdpa"]["times_ms"]) == 2
        assert case["speedup"] is None
        assert calls[case["case"]] == 1  # the check's call only
    table = capsys.readouterr().out
    assert "WRONG" in table and "errors and wrong results" in table


@pytest.mark.parametrize("dtype, wrong", [("fp32", "dk"), ("bf16", "dq")])
def test_wrong_backward_is_reported_and_not_timed(tmp_path, monkeypatch, capsys, fixed_ceilings, dtype, wrong):
    """A right forward with a wrong backward: WRONG in both backward cases, its backward called by the check only."""
    real_ours = bench._ours_backward
    calls = {}

    def wrong_ours(q, k, v, case):
        out, bwd = real_ours(q, k, v, case)

        def backward(dout):
            calls[case.name] = calls.get(case.name, 0) + 1
            dq, dk, dv = bwd(dout)
            return (dq, dk * 1.01, dv) if wrong == "dk" else (dq.roll(1, dims=1), dk, dv)

        return out, backward

    monkeypatch.setattr(bench, "_ours_backward", wrong_ours)
    args = tiny_bench_args(tmp_path, "--mode", "backward", "--no-plots")
    args[args.index("fp32")] = dtype
    assert main(args) == 1
    results = load_results(tmp_path)
    assert [case["case"] for case in results["cases"]] == [
        f"llama3-8b backward {dtype} S64 B1",
        f"llama3-8b backward-full {dtype} S64 B1",
    ]
    for case in results["cases"]:
        ours = case["impls"]["ours"]
        assert ours["status"] == "WRONG", ours
        assert ours["message"].startswith(f"{wrong}: relative error"), ours
        assert ours["errors"]["out"] < bench.REL_TOL[bench.DTYPES[dtype]]
        assert "median_ms" not in ours and "times_ms" not in ours and "peak_mb" not in ours
        assert case["impls"]["sdpa"]["status"] == "ok" and len(case["impls"]["sdpa"]["times_ms"]) == 2
        assert case["speedup"] is None
        assert calls[case["case"]] == 1  # the check's call only
    table = capsys.readouterr().out
    assert "WRONG" in table and "errors and wrong results" in table


def test_plots(tmp_path, capsys, fixed_ceilings):
    pytest.importorskip("matplotlib")
    args = tiny_bench_args(tmp_path, "--mode", "prefill,decode", "--impl", "sdpa")
    args[args.index("64")] = "32,64"
    assert main(args) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["llama3-8b_decode_fp32_B1.png", "llama3-8b_prefill_fp32.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_matplotlib_no_plots(tmp_path, monkeypatch, capsys, fixed_ceilings):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    args = tiny_bench_args(tmp_path, "--mode", "decode", "--impl", "sdpa")
    args[args.index("64")] = "32,64"
    assert main(args) == 0
    assert not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_bench_cuda_without_gpu_exits_2(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_bad_options_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--model", "no-such-model"])
    assert e.value.code == 2
    assert main(["bench", "--device", "cpu", "--case", "no such case"]) == 2
    assert "no case matches" in capsys.readouterr().err


def test_info_is_the_default(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert "gqa_ext build" in text and "relative error vs float64 reference" in text
