"""gqa_ext.nn: GroupedQueryAttention, KVCache and RotaryEmbedding.

Every mode of the layer (dense, packed, decoding over a contiguous or paged
cache) is checked against a float64 reference built here from the layer's own
weights: the projections in float64, a hand-written RoPE (complex rotation of
the pairs (i, i + D/2), not the module's formula), attention_ref, o_proj.
Weights are redrawn so that the scores spread over a few units: with
nn.Linear's default init the softmax is nearly uniform and a wrong position or
mask would barely move the output. Sizes are off every tile size.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from conftest import DEVICES, TOLERANCE, assert_rel_close, default_dtype, rel_err, skip_unsupported

from gqa_ext.nn import GroupedQueryAttention, KVCache, RotaryEmbedding
from gqa_ext.reference import attention_ref, kvcache_sequence

THETA = 10000.0

# (num_heads, num_kv_heads, head_dim) with embed_dim 48: MHA, a group of 4
# with Hq * D != E, MQA with a group of 7, a group of 7 over 2 KV heads.
HEAD_CASES = [
    pytest.param(4, 4, 12, id="mha"),
    pytest.param(8, 2, 10, id="group4"),
    pytest.param(7, 1, 8, id="mqa_group7"),
    pytest.param(14, 2, 6, id="group7"),
]

# Module options; every case but "plain" is causal or has a window, and the
# bias alternates.
OPTION_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True, "rope_theta": THETA}, id="causal_rotary"),
    pytest.param({"causal": False, "rope_theta": THETA, "bias": True}, id="rotary_bias"),
    pytest.param({"causal": True, "window": (5, 0), "bias": True}, id="causal_window_bias"),
    pytest.param({"window": (6, 3), "rope_theta": 500.0}, id="window_both_rotary"),
    pytest.param({"causal": True, "softcap": 1.5, "rope_theta": THETA, "softmax_scale": 0.6}, id="softcap_scale"),
]

EMBED_DIM = 48

# How far two runs of the same computation cut differently may be apart, as
# ||a - b|| / ||b|| (as in test_kvcache.py).
ROUNDING_TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 5e-3}


def make_module(heads_q, heads_kv, head_dim, dtype=torch.float32, device="cpu", **options) -> GroupedQueryAttention:
    options.setdefault("causal", False)
    if torch.device(device).type == "cuda":
        # The CUDA kernels take head dims that are multiples of 8.
        head_dim = -(-head_dim // 8) * 8
    module = GroupedQueryAttention(EMBED_DIM, heads_q, heads_kv, head_dim, device=device, dtype=dtype, **options)
    with torch.no_grad():
        for proj in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
            # q and k entries of std ~2: scores of a few units over sqrt(D).
            std = 2.0 / math.sqrt(proj.in_features) if proj is not module.o_proj else 1.0 / math.sqrt(proj.in_features)
            proj.weight.normal_(0.0, std)
            if proj.bias is not None:
                proj.bias.normal_(0.0, 0.5)
    return module


def weights64(module: GroupedQueryAttention, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().requires_grad_(requires_grad) for n, p in module.named_parameters()}


def rope_ref(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (..., S, H, D) float64 rotated by positions (..., S): pair (i, i + D/2) as the complex x_i + 1j x_{i+D/2}."""
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64, device=x.device) / x.shape[-1])
    angles = positions.double().unsqueeze(-1).unsqueeze(-1) * freqs
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def project_ref(module, w, x, positions):
    """q, k, v (..., S, H, D) in float64 from x (..., S, E), k and q rotated."""

    def proj(name, heads):
        y = F.linear(x.double(), w[f"{name}.weight"], w.get(f"{name}.bias"))
        return y.unflatten(-1, (heads, module.head_dim))

    q, k, v = proj("q_proj", module.num_heads), proj("k_proj", module.num_kv_heads), proj("v_proj", module.num_kv_heads)
    if module.rotary is not None:
        q, k = rope_ref(q, positions, module.rotary.theta), rope_ref(k, positions, module.rotary.theta)
    return q, k, v


def reference(module, w, x, positions=None):
    """The layer in float64 on x (B, S, E): positions default to 0..S-1."""
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device)
    q, k, v = project_ref(module, w, x, positions)
    out, _ = attention_ref(
        q,
        k,
        v,
        softmax_scale=module.softmax_scale,
        causal=module.causal,
        window_left=module.window[0],
        window_right=module.window[1],
        softcap=module.softcap,
    )
    return F.linear(out.flatten(-2), w["o_proj.weight"], w.get("o_proj.bias"))


def reference_rounded(module, w, x):
    """The layer on x (B, S, E) rounded to x's dtype where the layer rounds, exact elsewhere; differentiable.

    w: the parameters in x's dtype. Projections in x's dtype, RoPE and
    attention in float64 with their results rounded to x's dtype: the error of
    the dtype alone, which bounds what the kernels can reach.
    """

    def proj(name, heads):
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias")).unflatten(-1, (heads, module.head_dim))

    q, k, v = proj("q_proj", module.num_heads), proj("k_proj", module.num_kv_heads), proj("v_proj", module.num_kv_heads)
    if module.rotary is not None:
        positions = torch.arange(x.shape[1], device=x.device)
        q = rope_ref(q.double(), positions, module.rotary.theta).to(x.dtype)
        k = rope_ref(k.double(), positions, module.rotary.theta).to(x.dtype)
    out, _ = attention_ref(
        q,
        k,
        v,
        softmax_scale=module.softmax_scale,
        causal=module.causal,
        window_left=module.window[0],
        window_right=module.window[1],
        softcap=module.softcap,
    )
    return F.linear(out.to(x.dtype).flatten(-2), w["o_proj.weight"], w.get("o_proj.bias"))


def check_against_reference(module, x, out, dout, grads, sequences=None):
    """out and grads (x's, then the parameters') against autograd through the float64 reference.

    x is dense (B, S, E), or packed (T, E) with ``sequences`` the (start, end)
    rows of each non-empty sequence, which the reference runs alone.
    """
    dtype = x.dtype

    def run(fn, w, x):
        if sequences is None:
            return fn(module, w, x)
        return torch.cat([fn(module, w, x[start:end].unsqueeze(0))[0] for start, end in sequences])

    w = weights64(module, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    ref = run(reference, w, x64)
    assert_rel_close(out, ref, dtype, "out")
    ref_grads = torch.autograd.grad(ref, [x64, *w.values()], dout.double())
    baseline_grads = None
    if dtype != torch.float32:
        w_low = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
        x_low = x.detach().clone().requires_grad_()
        rounded = run(reference_rounded, w_low, x_low)
        baseline_grads = torch.autograd.grad(rounded, [x_low, *w_low.values()], dout)
    check_grads(module, grads, ref_grads, dtype, baseline_grads)


def check_grads(module, grads, ref_grads, dtype, baseline_grads=None):
    """grads: x's then the parameters' (named_parameters order), against the float64 ones.

    With ``baseline_grads`` (from :func:`reference_rounded`), an error up to
    twice the baseline's also passes: in bfloat16 the rounding of q and k alone
    moves the gradients of q_proj and k_proj by more than 1e-2 when the
    softmax is peaked.
    """
    names = ["x"] + [n for n, _ in module.named_parameters()]
    assert len(grads) == len(ref_grads) == len(names)
    scale = max(ref.norm() for ref in ref_grads)
    for i, (name, g, ref) in enumerate(zip(names, grads, ref_grads, strict=True)):
        if ref.norm() > 1e-9 * scale and baseline_grads is not None:
            err, allowed = rel_err(g, ref), max(TOLERANCE[dtype], 2 * rel_err(baseline_grads[i], ref))
            assert torch.isfinite(g).all() and err <= allowed, f"d{name}: relative error {err:.3g} > {allowed:.3g}"
        elif ref.norm() > 1e-9 * scale:
            assert_rel_close(g, ref, dtype, f"d{name}")
        else:
            # k_proj's bias without rotary: it adds the same score to every key
            # of a query, which the softmax cancels; the gradient is 0 up to
            # rounding, measured against the other gradients' scale.
            assert g.norm() <= TOLERANCE[dtype] * scale, f"d{name}: {g.norm():.3g} where 0 is expected"


# -- dense ---------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTION_CASES)
@pytest.mark.parametrize("heads_q, heads_kv, head_dim", HEAD_CASES)
def test_dense_forward(heads_q, heads_kv, head_dim, options):
    module = make_module(heads_q, heads_kv, head_dim, **options)
    x = torch.randn(3, 37, EMBED_DIM)
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_rel_close(out, reference(module, weights64(module), x), torch.float32, "out")


def check_dense(device, dtype, heads_q, heads_kv, head_dim, options):
    module = make_module(heads_q, heads_kv, head_dim, dtype, device, **options)
    x = torch.randn(2, 37, EMBED_DIM, dtype=dtype, device=device, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape and out.dtype == dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *module.parameters()], dout)
    check_against_reference(module, x, out, dout, grads)


@pytest.mark.parametrize("options", [OPTION_CASES[1], OPTION_CASES[3], OPTION_CASES[5]])
@pytest.mark.parametrize("heads_q, heads_kv, head_dim", [HEAD_CASES[1], HEAD_CASES[2]])
@pytest.mark.parametrize("device", DEVICES)
def test_dense_backward(device, heads_q, heads_kv, head_dim, options):
    check_dense(device, default_dtype(device), heads_q, heads_kv, head_dim, options)


@pytest.mark.parametrize("heads_q, heads_kv, head_dim", [HEAD_CASES[0], HEAD_CASES[3]])
def test_dense_bfloat16(heads_q, heads_kv, head_dim):
    check_dense("cpu", torch.bfloat16, heads_q, heads_kv, head_dim, OPTION_CASES[5].values[0])


def test_dense_position_ids():
    module = make_module(8, 2, 10, causal=True, rope_theta=THETA)
    x = torch.randn(2, 21, EMBED_DIM)
    # Sequence 0 continues from position 3; sequence 1 has gaps (tokens dropped).
    positions = torch.stack([torch.arange(21) + 3, torch.randperm(60)[:21].sort().values])
    out = module(x, position_ids=positions)
    assert_rel_close(out, reference(module, weights64(module), x, positions), torch.float32, "out")
    # RoPE sees relative positions only: shifting a sequence's positions keeps
    # its output, gaps change it.
    torch.testing.assert_close(module(x, position_ids=positions + 8), out)
    default = module(x)
    torch.testing.assert_close(default[0], out[0])
    assert (default[1] - out[1]).abs().max() > 1e-2, "position_ids had no effect"


def test_rotary_embedding_matches_reference():
    rotary = RotaryEmbedding(16, theta=THETA)
    q, k = torch.randn(2, 29, 5, 16), torch.randn(2, 29, 1, 16)
    positions = torch.randint(0, 64, (2, 29))
    q_rot, k_rot = rotary(q, k, positions)
    assert q_rot.dtype == q.dtype and q_rot.shape == q.shape and k_rot.shape == k.shape
    assert_rel_close(q_rot, rope_ref(q.double(), positions, THETA), torch.float32, "q")
    assert_rel_close(k_rot, rope_ref(k.double(), positions, THETA), torch.float32, "k")
    # Position 0 is the identity; bfloat16 in, bfloat16 out.
    q0, _ = rotary(q.bfloat16(), k.bfloat16(), torch.zeros(29, dtype=torch.long))
    assert q0.dtype == torch.bfloat16 and torch.equal(q0, q.bfloat16())


def test_parameters_are_named_as_in_hugging_face():
    module = GroupedQueryAttention(48, 8, 2, rope_theta=THETA, bias=True)
    shapes = {n: tuple(t.shape) for n, t in module.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (48, 48),
        "q_proj.bias": (48,),
        "k_proj.weight": (12, 48),
        "k_proj.bias": (12,),
        "v_proj.weight": (12, 48),
        "v_proj.bias": (12,),
        "o_proj.weight": (48, 48),
        "o_proj.bias": (48,),
    }
    assert set(GroupedQueryAttention(48, 8).state_dict()) == {f"{p}_proj.weight" for p in "qkvo"}


# -- packed sequences ------------------------------------------------------------

# An empty sequence and a one-token one among others; T = 37.
PACKED_LENGTHS = [9, 0, 1, 23, 4]


@pytest.mark.parametrize("options", [OPTION_CASES[1], OPTION_CASES[4], OPTION_CASES[5]])
@pytest.mark.parametrize("heads_q, heads_kv, head_dim", [HEAD_CASES[0], HEAD_CASES[3]])
@pytest.mark.parametrize("device", DEVICES)
def test_packed_equals_each_sequence_alone(device, heads_q, heads_kv, head_dim, options):
    dtype = default_dtype(device)
    module = make_module(heads_q, heads_kv, head_dim, dtype, device, **options)
    offsets = [0]
    for n in PACKED_LENGTHS:
        offsets.append(offsets[-1] + n)
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    x = torch.randn(offsets[-1], EMBED_DIM, dtype=dtype, device=device, requires_grad=True)
    out = module(x, cu_seqlens=cu_seqlens, max_seqlen=max(PACKED_LENGTHS))
    assert out.shape == x.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *module.parameters()], dout)

    sequences = [(start, end) for start, end in zip(offsets[:-1], offsets[1:], strict=True) if start < end]
    check_against_reference(module, x, out, dout, grads, sequences)
    # And each sequence alone through the dense path, at positions 0..n-1.
    for start, end in sequences:
        alone = module(x[start:end].detach().unsqueeze(0))[0]
        err = rel_err(out[start:end], alone)
        assert err <= ROUNDING_TOLERANCE[dtype], f"rows {start}:{end}: packed and dense differ by {err:.3g}"


def test_packed_rotary_positions_restart_per_sequence():
    # RoPE depends on relative positions only, so positions counted across the
    # whole pack would give the same output up to float32 rounding of the
    # angles: this looks at the positions the layer hands its rotary embedding.
    module = make_module(4, 4, 12, causal=True, rope_theta=THETA)
    seen = []
    rotary_forward = module.rotary.forward

    def spy(q, k, positions):
        seen.append(positions)
        return rotary_forward(q, k, positions)

    module.rotary.forward = spy
    cu_seqlens = torch.tensor([0, 9, 9, 10, 33, 37], dtype=torch.int32)
    x = torch.randn(37, EMBED_DIM)
    out = module(x, cu_seqlens=cu_seqlens, max_seqlen=23)
    expected = torch.cat([torch.arange(n) for n in PACKED_LENGTHS])
    assert seen[0].tolist() == expected.tolist()
    # position_ids replaces them.
    positions = torch.arange(37) * 2
    shifted = module(x, cu_seqlens=cu_seqlens, max_seqlen=23, position_ids=positions)
    assert seen[1] is positions
    assert (shifted - out).abs().max() > 1e-2


# -- decoding with a KV cache -----------------------------------------------------

# Prompt lengths of the three sequences (prefilled in chunks of at most 8),
# then the decode steps' token counts, for the whole batch.
PROMPTS = [5, 17, 1]
STEPS = [1, 1, 1, 2, 1]
CAPACITY = 40


def make_cache(module, block_size, device) -> KVCache:
    if block_size is None:
        return module.new_kv_cache(len(PROMPTS), CAPACITY)
    # A shuffled block table over a pool with blocks no sequence uses.
    per_seq = -(-CAPACITY // block_size)
    num_blocks = len(PROMPTS) * per_seq + 3
    table = torch.randperm(num_blocks)[: len(PROMPTS) * per_seq].view(len(PROMPTS), per_seq)
    return KVCache.paged(
        len(PROMPTS),
        CAPACITY,
        module.num_kv_heads,
        module.head_dim,
        block_size=block_size,
        num_blocks=num_blocks,
        block_table=table.to(device),
        dtype=module.k_proj.weight.dtype,
        device=device,
    )


@torch.no_grad()
def decode(module, cache, tokens):
    """Chunked prefill of each prompt through cache.narrow, then the batch's steps.

    tokens: (B, max total length, E). Returns the outputs of every call as
    (sequence index or None for the batch, first position, output) and checks
    seqlens after each call.
    """
    outputs = []
    lens = [0] * len(PROMPTS)
    for b, n in enumerate(PROMPTS):
        one = cache.narrow(b, 1)
        for start in range(0, n, 8):
            chunk = tokens[b : b + 1, start : min(n, start + 8)]
            outputs.append((b, start, module(chunk, kv_cache=one)))
            lens[b] += chunk.shape[1]
            assert cache.seqlens.tolist() == lens
    for s in STEPS:
        chunk = torch.stack([tokens[b, n : n + s] for b, n in enumerate(lens)])
        outputs.append((None, list(lens), module(chunk, kv_cache=cache)))
        lens = [n + s for n in lens]
        assert cache.seqlens.tolist() == lens
    return outputs


DECODE_OPTIONS = [
    pytest.param({"causal": True, "rope_theta": THETA}, id="causal_rotary"),
    pytest.param({"causal": True, "window": (6, 0), "softcap": 2.0, "rope_theta": 500.0, "bias": True}, id="window"),
    # Not causal, but a window with right = 0 sees no later token either.
    pytest.param({"causal": False, "window": (-1, 0)}, id="window_right_0"),
]


@pytest.mark.parametrize("options", DECODE_OPTIONS)
@pytest.mark.parametrize("heads_q, heads_kv, head_dim", [HEAD_CASES[1], HEAD_CASES[2]])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_equals_dense_reference(device, heads_q, heads_kv, head_dim, options):
    check_decode(device, default_dtype(device), heads_q, heads_kv, head_dim, options)


@pytest.mark.parametrize("heads_q, heads_kv, head_dim", [HEAD_CASES[0], HEAD_CASES[3]])
def test_decode_bfloat16(heads_q, heads_kv, head_dim):
    check_decode("cpu", torch.bfloat16, heads_q, heads_kv, head_dim, DECODE_OPTIONS[1].values[0])


def check_decode(device, dtype, heads_q, heads_kv, head_dim, options):
    """Prefill and decode steps, contiguous and paged, against the reference on the whole sequences."""
    module = make_module(heads_q, heads_kv, head_dim, dtype, device, **options)
    total = [n + sum(STEPS) for n in PROMPTS]
    tokens = torch.randn(len(PROMPTS), max(total), EMBED_DIM, dtype=dtype, device=device)
    w = weights64(module)
    refs = [reference(module, w, tokens[b : b + 1, :n])[0] for b, n in enumerate(total)]

    results = {}
    for block_size in (None, 16):
        cache = make_cache(module, block_size, device)
        outputs = decode(module, cache, tokens)
        for b, start, out in outputs:
            if b is not None:
                assert_rel_close(out[0], refs[b][start : start + out.shape[1]], dtype, f"prefill {b} at {start}")
            else:
                for i, n in enumerate(start):
                    assert_rel_close(out[i], refs[i][n : n + out.shape[1]], dtype, f"step at {start}, sequence {i}")
        # The cache holds every token's rotated key and value.
        for b, n in enumerate(total):
            _, k_ref, v_ref = project_ref(module, w, tokens[b, :n], torch.arange(n, device=device))
            assert_rel_close(kvcache_sequence(cache.k, b, n, cache.block_table), k_ref, dtype, f"cached k {b}")
            assert_rel_close(kvcache_sequence(cache.v, b, n, cache.block_table), v_ref, dtype, f"cached v {b}")
        results[block_size] = outputs
    for (_, _, contiguous), (_, _, paged) in zip(results[None], results[16], strict=True):
        # The kernels may cut the keys differently over pages: rounding only.
        err = rel_err(paged, contiguous)
        assert err <= ROUNDING_TOLERANCE[dtype], f"paged and contiguous differ by {err:.3g}"


@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
def test_decode_overflow_raises(block_size):
    module = make_module(8, 2, 10, causal=True, rope_theta=THETA)
    # Capacity 20 contiguous, 32 paged (two blocks of 16).
    cache = module.new_kv_cache(2, 20, block_size=block_size)
    capacity = cache.capacity
    assert capacity == (20 if block_size is None else 32)
    with torch.no_grad():
        module(torch.randn(1, capacity - 3, EMBED_DIM), kv_cache=cache.narrow(1, 1))
        module(torch.randn(2, 2, EMBED_DIM), kv_cache=cache)
        saved = (cache.k.clone(), cache.v.clone())
        pattern = rf"appending 2 tokens overflows the KV cache: sequence 1 holds {capacity - 1} of its {capacity}"
        with pytest.raises(IndexError, match=pattern):
            module(torch.randn(2, 2, EMBED_DIM), kv_cache=cache)
        # Nothing written, nothing advanced; one more token still fits.
        assert cache.seqlens.tolist() == [2, capacity - 1]
        assert torch.equal(cache.k, saved[0]) and torch.equal(cache.v, saved[1])
        module(torch.randn(2, 1, EMBED_DIM), kv_cache=cache)
        assert cache.seqlens.tolist() == [3, capacity]
        cache.reset()
        assert cache.seqlens.tolist() == [0, 0]


def test_decode_needs_no_grad():
    module = make_module(4, 4, 12, causal=True)
    cache = module.new_kv_cache(1, 8)
    with pytest.raises(RuntimeError, match=r"decoding with a KV cache has no backward; run it under torch.no_grad"):
        module(torch.randn(1, 2, EMBED_DIM), kv_cache=cache)
    assert cache.seqlens.tolist() == [0]


# -- torch.compile -----------------------------------------------------------------


@pytest.fixture
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_dense_forward_backward_matches_eager(reset_dynamo):
    module = make_module(8, 2, 10, causal=True, window=(9, 0), softcap=3.0, rope_theta=THETA, bias=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    x = torch.randn(2, 37, EMBED_DIM)
    dout = torch.randn_like(x)
    results = []
    for fn in (module, compiled):
        xg = x.clone().requires_grad_()
        out = fn(xg)
        results.append((out, torch.autograd.grad(out, [xg, *module.parameters()], dout)))
    (out_e, grads_e), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out_e)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e)
    assert counter.frame_count == 1


def test_compile_packed_matches_eager(reset_dynamo):
    module = make_module(14, 2, 6, causal=True, rope_theta=THETA)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    cu_seqlens = torch.tensor([0, 9, 9, 10, 33, 37], dtype=torch.int32)
    x = torch.randn(37, EMBED_DIM)
    dout = torch.randn_like(x)
    results = []
    for fn in (module, compiled):
        xg = x.clone().requires_grad_()
        out = fn(xg, cu_seqlens=cu_seqlens, max_seqlen=23)
        results.append((out, torch.autograd.grad(out, [xg, *module.parameters()], dout)))
    (out_e, grads_e), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out_e)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e)
    assert counter.frame_count == 1


@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "bs16"])
def test_compile_decode_steps_match_eager(block_size, reset_dynamo):
    module = make_module(7, 1, 8, causal=True, softcap=2.0, rope_theta=THETA)
    tokens = torch.randn(len(PROMPTS), max(PROMPTS) + 2, EMBED_DIM)
    eager_cache = make_cache(module, block_size, "cpu")
    with torch.no_grad():
        for b, n in enumerate(PROMPTS):
            module(tokens[b : b + 1, :n], kv_cache=eager_cache.narrow(b, 1))
    cache = KVCache(
        eager_cache.k.clone(),
        eager_cache.v.clone(),
        eager_cache.seqlens.clone(),
        None if block_size is None else eager_cache.block_table.clone(),
    )
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    # Two steps: the second one with other seqlens must not recompile.
    for step in range(2):
        x = torch.randn(len(PROMPTS), 1, EMBED_DIM)
        with torch.no_grad():
            expected = module(x, kv_cache=eager_cache)
            got = compiled(x, kv_cache=cache)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert cache.seqlens.tolist() == eager_cache.seqlens.tolist() == [n + step + 1 for n in PROMPTS]
        assert torch.equal(cache.k, eager_cache.k) and torch.equal(cache.v, eager_cache.v)
    assert counter.frame_count == 1


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, pattern",
    [
        pytest.param((48, 8, 3), {}, r"num_heads = 8 must be a multiple of num_kv_heads = 3", id="kv_heads"),
        pytest.param((48, 8, 0), {}, r"num_kv_heads must be a positive int, got 0", id="kv_heads_zero"),
        pytest.param((48, 0), {}, r"num_heads must be a positive int, got 0", id="heads_zero"),
        pytest.param((50, 8), {}, r"embed_dim = 50 is not a multiple of num_heads = 8; pass head_dim", id="embed"),
        pytest.param((48, 8, 2, 7), {"rope_theta": THETA}, r"rotary .* need an even head_dim, got 7", id="odd_rope"),
        pytest.param((48, 8), {"rope_theta": -1.0}, r"theta must be a finite float > 0", id="theta"),
        pytest.param((48, 8), {"window": 4}, r"window must be a \(left, right\) pair of ints >= -1", id="window"),
        pytest.param((48, 8), {"window": (-2, 0)}, r"window must be a \(left, right\) pair", id="window_neg"),
        pytest.param((48, 8), {"window": (4, 2)}, r"causal=True already limits the window's right side", id="causal"),
        pytest.param((48, 8), {"softcap": -1.0}, r"softcap must be a finite float >= 0", id="softcap"),
    ],
)
def test_constructor_errors(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GroupedQueryAttention(*args, **kwargs)


def test_odd_head_dim_without_rotary_is_fine():
    module = make_module(8, 2, 7, causal=True)
    x = torch.randn(1, 5, EMBED_DIM)
    assert_rel_close(module(x), reference(module, weights64(module), x), torch.float32, "out")


def test_forward_errors():
    module = GroupedQueryAttention(48, 8, 2, rope_theta=THETA)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    cache = module.new_kv_cache(2, 8)
    cases = [
        ((torch.randn(5, 48),), {}, r"x must be \(B, S, E\) with E = embed_dim = 48, got shape \(5, 48\)"),
        ((torch.randn(2, 5, 40),), {}, r"x must be \(B, S, E\) with E = embed_dim = 48, got shape \(2, 5, 40\)"),
        ((torch.randn(1, 5, 48),), {"cu_seqlens": cu, "max_seqlen": 3}, r"x must be \(T, E\) with cu_seqlens"),
        ((torch.randn(5, 48),), {"cu_seqlens": cu}, r"cu_seqlens and max_seqlen go together"),
        ((torch.randn(2, 5, 48),), {"max_seqlen": 3}, r"cu_seqlens and max_seqlen go together"),
        ((torch.randn(5, 48),), {"cu_seqlens": cu, "max_seqlen": 3, "kv_cache": cache}, r"not both"),
        ((torch.randn(2, 5, 48),), {"position_ids": torch.arange(5)}, r"position_ids must have shape .*\(2, 5\)"),
        ((torch.randn(3, 1, 48),), {"kv_cache": cache}, r"the KV cache holds 2 sequences, x has 3"),
        (
            (torch.randn(2, 1, 48),),
            {"kv_cache": KVCache.contiguous(2, 8, 1, 6)},
            r"the KV cache holds 1 heads of 6 in torch.float32, this layer needs 2 heads of 6",
        ),
    ]
    with torch.no_grad():
        for args, kwargs, pattern in cases:
            with pytest.raises(ValueError, match=pattern):
                module(*args, **kwargs)
    assert cache.seqlens.tolist() == [0, 0]


def test_kvcache_errors():
    k = torch.zeros(2, 8, 1, 6)
    with pytest.raises(ValueError, match=r"seqlens must be a 1-D int32 tensor"):
        KVCache(k, k.clone(), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"a contiguous cache holds one row of k and v per sequence"):
        KVCache(k, k.clone(), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k and v must be 4-D tensors of the same shape"):
        KVCache(k, k[:, :4].clone(), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_table must be an int32 tensor \(B, max_blocks\)"):
        KVCache(k, k.clone(), torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_table entries must be in \[0, num_blocks = 4\)"):
        KVCache.paged(2, 32, 1, 6, block_size=16, num_blocks=4, block_table=torch.tensor([[0, 1], [2, 4]]))
    with pytest.raises(ValueError, match=r"2 sequences of 2 blocks need 4 blocks, got num_blocks = 3"):
        KVCache.paged(2, 32, 1, 6, block_size=16, num_blocks=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_new_kv_cache_follows_module(device, dtype):
    skip_unsupported(device, dtype)
    module = GroupedQueryAttention(48, 8, 2, 10, dtype=dtype, device=device)
    contiguous = module.new_kv_cache(3, 20)
    assert contiguous.k.shape == (3, 20, 2, 10) and contiguous.block_table is None
    paged = module.new_kv_cache(3, 20, block_size=16)
    assert paged.k.shape == (6, 16, 2, 10) and paged.block_table.tolist() == [[0, 1], [2, 3], [4, 5]]
    for cache in (contiguous, paged):
        assert cache.k.dtype == cache.v.dtype == dtype and cache.k.device.type == device
        assert cache.seqlens.dtype == torch.int32 and cache.seqlens.tolist() == [0, 0, 0]
