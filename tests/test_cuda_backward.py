"""torch.ops.gqa.backward and backward_varlen on CUDA against the float64 reference.

The module runs where tests/test_cuda_forward.py runs: it imports its device
and skip logic from there, so it is skipped as a whole (with the reason)
unless ``torch.cuda.is_available()`` and gqa_ext was built with its CUDA
kernels (``gqa_ext.build_info()["cuda_kernels"]``).

Dry run: with ``GQA_EXT_CUDA_TESTS_DEVICE=cpu`` the module runs on the CPU
device instead, on the CPU backward, so that the tests' own logic (shapes,
reference gradients, expected zeros, comparisons) is checked on a machine
without a GPU::

    GQA_EXT_CUDA_TESTS_DEVICE=cpu python -m pytest tests/test_cuda_backward.py

In a dry run the tests of CUDA-only errors (float32 and float64 inputs,
D > 256, mixed devices) skip, and, to keep it to a couple of minutes (the
float64 references are slow on a CPU), the large parametrized matrices run in
bfloat16 only, the longest shapes are left out or smaller, and the inductor
test compiles with aot_eager.

The backward kernel's thread block owns one (batch, KV head, tile of keys):
128 keys for head dims up to 128, 64 for 256. It walks the query heads of the
group and the tiles of query rows that see those keys (64 rows a step, 32 for
head dim 256), summing dk and dv over all of them in registers; dq is summed
over the key tiles with atomics (in key-tile order with
``deterministic=True``). The lengths below sit on and around those edges.
Head dims that are not a multiple of 8 run zero-padded, as in the forward.

The gradients are compared with the float64 reference's
(``gqa_ext.reference.attention_ref`` / ``attention_varlen_ref`` under
autograd) from the same, rounded, inputs and the same fresh random dout.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo.testing
from conftest import GROUP_CASES, NONCONTIGUOUS_KINDS, OPTION_CASES, api_kwargs, rel_err
from test_backward import leaves
from test_compile import assert_same_results, forward_backward
from test_cuda_forward import (  # importing it applies its module-level skip and dry-run switch
    DEVICE,
    HALF_DTYPES,
    ON_CUDA,
    ROUNDING_TOLERANCE,
    cuda_only,
    forward,
    make_inputs,
    reset_dynamo,  # noqa: F401  (a fixture)
)
from test_varlen import (
    BACKWARD_LENGTHS,
    EMPTY_SEQUENCE_LENGTHS,
    EMPTY_SEQUENCE_OPTIONS,
    LENGTH_CASES,
    Varlen,
    assert_empty_sequence_gradients,
    forward_varlen,
    make_varlen,
)
from test_varlen import leaves as varlen_leaves

import gqa_ext
from gqa_ext.reference import attention_ref, attention_varlen_ref, visible_mask

# Relative error ||g - ref|| / ||ref|| allowed for each of dq, dk and dv
# against the float64 reference. Looser than conftest.TOLERANCE (the forward's
# and the CPU backward's, which compute in float32 and round the gradients
# once): the CUDA backward also rounds the probabilities P and dS to q's dtype
# before the products dV = P^T dO, dK = dS^T Q and dQ = dS K.
GRAD_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}

GRAD_NAMES = ("dq", "dk", "dv")

# The dtypes of the large parametrized matrices. A dry run checks the tests'
# logic, not the CPU kernels (tests/test_backward.py does): it runs these
# matrices in bfloat16 only, the other tests in both dtypes.
MATRIX_DTYPES = HALF_DTYPES if ON_CUDA else [torch.bfloat16]


def backward(dout, q, k, v, out, lse, deterministic=False, **options):
    """The op's (dq, dk, dv), with the properties every output must have checked."""
    grads = torch.ops.gqa.backward(dout, q, k, v, out, lse, **options, deterministic=deterministic)
    for name, g, t in zip(GRAD_NAMES, grads, (q, k, v), strict=True):
        assert g.device == q.device and g.dtype == q.dtype, f"{name}: {g.dtype} on {g.device}"
        assert g.shape == t.shape, f"{name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
    return grads


def reference_grads(q, k, v, dout, **options):
    """(dq, dk, dv) of attention_ref in float64, from the same (rounded) q, k, v and dout."""
    q64, k64, v64 = leaves(*(t.double() for t in (q, k, v)))
    ref_out, _ = attention_ref(q64, k64, v64, **options)
    return torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())


def assert_grads_close(grads, ref_grads, dtype):
    """dq, dk, dv are finite and within GRAD_TOLERANCE[dtype] of the reference's."""
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        if ref.any():
            err, tol = rel_err(g, ref), GRAD_TOLERANCE[dtype]
            assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g} ({dtype})"
        elif g.numel():
            # Exactly 0 by cancellation (e.g. every row sees one key: the
            # softmax is constant), so the rounding is measured against dv's scale.
            bound = GRAD_TOLERANCE[dtype] * ref_grads[2].abs().max().item()
            assert g.abs().max().item() <= bound, f"{name}: {g.abs().max().item():.3g} where the reference is 0"


def check_backward(q, k, v, dout=None, deterministic=False, **options):
    """Runs the forward and backward ops and checks dq, dk, dv against the reference; returns them."""
    out, lse = forward(q, k, v, **options)
    if dout is None:
        dout = torch.randn_like(out)
    grads = backward(dout, q, k, v, out, lse, deterministic, **options)
    assert_grads_close(grads, reference_grads(q, k, v, dout, **options), q.dtype)
    return grads


def assert_same_to_rounding(got, expected, dtype, what, tolerance=None):
    """Gradients of two computations that differ only in summation order agree up to rounding.

    tolerance: the relative difference allowed; default ROUNDING_TOLERANCE[dtype].
    """
    tolerance = ROUNDING_TOLERANCE[dtype] if tolerance is None else tolerance
    for name, g, e in zip(GRAD_NAMES, got, expected, strict=True):
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite values"
        err = rel_err(g, e)
        assert err <= tolerance, f"{what}: {name} differs by {err:.3g} (relative, > {tolerance:g})"


def assert_bitwise_equal(got, expected, what):
    for name, g, e in zip(GRAD_NAMES, got, expected, strict=True):
        assert torch.equal(g, e), f"{what}: {name} differs"


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) within the block: autograd passes it to the op.

    Only around gqa_ext's ops: on CUDA the reference's matmuls would raise
    under it (cuBLAS needs CUBLAS_WORKSPACE_CONFIG to be deterministic).
    """
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved)


# -- dtypes, head dims, sequence lengths, groups, options --------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 96, 40, 200])
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_dtypes_head_dims(dtype, head_dim, causal):
    # 64, 128, 256 are the kernel's own head dims; 96, 40 and 200 run padded
    # to the next one inside, and must still use the default scale 1 / sqrt(D).
    q, k, v = make_inputs(2, 129, 300, 8, 2, head_dim, dtype)
    check_backward(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "head_dim, kind",
    [
        (1, "contiguous"),
        (17, "contiguous"),
        (65, "contiguous"),
        (100, "contiguous"),
        (255, "contiguous"),
        (17, "sliced"),
        (100, "bhsd_transposed"),
    ],
    ids=["d1", "d17", "d65", "d100", "d255", "d17_sliced", "d100_bhsd_transposed"],
)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_odd_head_dims(dtype, head_dim, kind):
    # D not a multiple of 8 is zero-padded by a copy (255 to 256, 100 to 104):
    # the gradients must drop the padding (backward checks their shapes).
    q, k, v = make_inputs(1, 65, 300, 4, 2, head_dim, dtype, kind=kind)
    check_backward(q, k, v, window_left=100)


SEQLEN_CASES = [
    (1, 1),
    (1, 64),
    (1, 1000),
    (2, 129),
    (33, 31),
    (63, 1),
    (63, 65),
    (64, 64),
    (65, 63),
    (127, 129),
    (128, 128),
    (129, 127),
    (200, 300),
    (300, 200),
    (65, 1000),
    (1000, 65),
    *([(1000, 1000)] if ON_CUDA else []),  # a slow float64 reference on a CPU
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLEN_CASES)
def test_cuda_backward_seqlens(seqlen_q, seqlen_k, head_dim, causal):
    q, k, v = make_inputs(1, seqlen_q, seqlen_k, 10, 2, head_dim, torch.bfloat16)
    check_backward(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, causal",
    [(65, 300, False), (257, 129, True)],
    ids=["query_shorter", "causal_query_longer"],
)
@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_group_sizes(dtype, heads_q, heads_kv, seqlen_q, seqlen_k, causal):
    q, k, v = make_inputs(2, seqlen_q, seqlen_k, heads_q, heads_kv, 64, dtype)
    check_backward(q, k, v, causal=causal)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(129, 300), (300, 129), (63, 1000)])
@pytest.mark.parametrize("options", OPTION_CASES)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_options(dtype, options, seqlen_q, seqlen_k):
    q, k, v = make_inputs(1, seqlen_q, seqlen_k, 8, 2, 128, dtype)
    check_backward(q, k, v, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"window_left": 50, "window_right": 7},
        {"softcap": 0.5, "softmax_scale": 0.5, "causal": True, "window_left": 64},
    ],
    ids=["window_both", "softcap_scale_causal_window"],
)
@pytest.mark.parametrize("head_dim", [64, 256, 40, 100])
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_options_head_dims(dtype, head_dim, options):
    q, k, v = make_inputs(1, 257, 1000, 10, 2, head_dim, dtype)
    check_backward(q, k, v, **options)


# -- determinism and the sum over the group ------------------------------------

# Many key tiles per query tile and a group > 1, so that dq and dk/dv each
# sum many tiles' parts. Smaller in a dry run.
DETERMINISM_SHAPE = (2, 700, 700, 32, 4, 128) if ON_CUDA else (2, 300, 300, 8, 2, 64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_deterministic_is_bitwise_repeatable(dtype, causal):
    q, k, v = make_inputs(*DETERMINISM_SHAPE, dtype)
    out, lse = forward(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    first = backward(dout, q, k, v, out, lse, True, causal=causal)
    assert all(torch.isfinite(g).all() for g in first)
    for run in range(3):
        assert_bitwise_equal(backward(dout, q, k, v, out, lse, True, causal=causal), first, f"run {run + 2}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_deterministic_agrees_with_nondeterministic(dtype, causal):
    q, k, v = make_inputs(*DETERMINISM_SHAPE, dtype)
    out, lse = forward(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    deterministic = backward(dout, q, k, v, out, lse, True, causal=causal)
    for run in range(2):
        fast = backward(dout, q, k, v, out, lse, False, causal=causal)
        assert_same_to_rounding(fast, deterministic, dtype, f"deterministic=False (run {run + 1}) vs True")


def test_cuda_attention_autograd_is_bitwise_repeatable_under_deterministic_algorithms():
    q, k, v = leaves(*make_inputs(2, 300, 517, 10, 2, 64, torch.bfloat16))
    dout = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    with deterministic_algorithms():
        runs = [torch.autograd.grad(gqa_ext.attention(q, k, v, softcap=3.0), (q, k, v), dout) for _ in range(3)]
    for i, again in enumerate(runs[1:]):
        assert_bitwise_equal(again, runs[0], f"run {i + 2}")


GROUPED_CASES = [case for case in GROUP_CASES if case.id != "group1"]


@pytest.mark.parametrize(
    "options", [{}, {"causal": True, "window_left": 40, "softcap": 3.0}], ids=["plain", "causal_window_softcap"]
)
@pytest.mark.parametrize("heads_q, heads_kv", GROUPED_CASES)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_dk_dv_sum_over_group(dtype, heads_q, heads_kv, options):
    # dk and dv of a KV head are the sums over its query heads of what each
    # query head alone would give: the same as an MHA run on k and v repeated
    # for every query head, summed over the group afterwards.
    group = heads_q // heads_kv
    q, k, v = make_inputs(2, 129, 300, heads_q, heads_kv, 64, dtype)
    out, lse = forward(q, k, v, **options)
    dout = torch.randn_like(out)
    gqa = backward(dout, q, k, v, out, lse, True, **options)
    k_mha, v_mha = (t.repeat_interleave(group, dim=2) for t in (k, v))
    out_mha, lse_mha = forward(q, k_mha, v_mha, **options)
    dq_mha, dk_mha, dv_mha = backward(dout, q, k_mha, v_mha, out_mha, lse_mha, True, **options)
    summed = [g.double().unflatten(2, (heads_kv, group)).sum(dim=3) for g in (dk_mha, dv_mha)]
    # Twice the usual rounding: the MHA side rounds dk and dv once per query
    # head, the GQA side once per KV head. A head missing from the sum would
    # be off by about 1 / sqrt(group).
    tolerance = 2 * ROUNDING_TOLERANCE[dtype]
    assert_same_to_rounding(gqa, (dq_mha, *summed), dtype, "GQA vs MHA summed over the group", tolerance)


# -- layouts and strides -------------------------------------------------------


@pytest.mark.parametrize("kind", [*NONCONTIGUOUS_KINDS, "sliced_aligned", "odd_head_stride", "odd_storage_offset"])
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_noncontiguous_inputs(dtype, kind):
    # As the forward, the backward reads rows in place when the data pointer
    # and the strides allow 16-byte loads and copies the tensor otherwise.
    q, k, v = make_inputs(2, 129, 300, 8, 2, 64, dtype, kind=kind)
    if kind == "odd_storage_offset":  # contiguous views, but not 16-byte aligned
        assert all(t.is_contiguous() and t.storage_offset() % 8 != 0 for t in (q, k, v))
    else:
        assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    options = {"causal": True, "window_left": 100}
    dout = torch.randn(q.shape, dtype=dtype, device=DEVICE)
    grads = check_backward(q, k, v, dout, deterministic=True, **options)
    # Same gradients as from contiguous copies of the same values.
    qkv_c = [t.contiguous() for t in (q, k, v)]
    grads_c = backward(dout, *qkv_c, *forward(*qkv_c, **options), True, **options)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g, g_c)


@pytest.mark.parametrize("kind", ["bhsd_transposed", "sliced", "expanded"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_noncontiguous_dout_out_lse(dtype, kind):
    # dout, out and lse in other layouts (the autograd formula passes dout as
    # it comes, when its last dim is contiguous).
    q, k, v = make_inputs(2, 129, 300, 8, 2, 64, dtype)
    options = {"causal": True, "softcap": 2.0}
    out, lse = forward(q, k, v, **options)
    batch, seqlen_q, heads_q, head_dim = q.shape
    if kind == "bhsd_transposed":
        dout = torch.randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype, device=DEVICE).transpose(1, 2)
        out_nc = out.transpose(1, 2).contiguous().transpose(1, 2)
        lse_nc = lse.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "sliced":
        dout = torch.randn(batch, seqlen_q + 1, heads_q + 3, head_dim + 8, dtype=dtype, device=DEVICE)
        dout = dout[:, 1:, 2 : 2 + heads_q, 8 : 8 + head_dim]
        out_nc = torch.zeros(batch, seqlen_q, heads_q + 1, head_dim + 16, dtype=dtype, device=DEVICE)
        out_nc = out_nc[:, :, 1:, 16:].copy_(out)
        lse_nc = torch.zeros(batch, heads_q, seqlen_q + 5, device=DEVICE)[:, :, 5:].copy_(lse)
    else:
        dout = torch.randn(1, 1, heads_q, head_dim, dtype=dtype, device=DEVICE).expand(q.shape)
        out_nc, lse_nc = out, lse
    assert not dout.is_contiguous()
    expected = backward(dout.contiguous(), q, k, v, out, lse, True, **options)
    assert_grads_close(expected, reference_grads(q, k, v, dout, **options), dtype)
    got = backward(dout, q, k, v, out_nc, lse_nc, True, **options)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("head_dim", [64, 40])
def test_cuda_backward_packed_qkv(head_dim):
    # q, k and v split from one (B, S, Hq + 2 Hkv, D) projection; autograd
    # puts the three gradients into one (B, S, Hq + 2 Hkv, D) gradient.
    qkv = torch.randn(2, 129, 8 + 2 + 2, head_dim, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split([8, 2, 2], dim=2)
    out = gqa_ext.attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    ref_grads = reference_grads(q, k, v, dout, causal=True)
    assert_grads_close(dqkv.split([8, 2, 2], dim=2), ref_grads, torch.bfloat16)


@pytest.mark.parametrize(
    "kind, head_dim",
    [
        ("contiguous", 64),
        ("sliced", 64),
        ("kv_strides_differ", 64),
        ("odd_storage_offset", 64),
        ("sliced", 40),
        ("bhsd_transposed", 17),
    ],
)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_inputs_untouched(dtype, kind, head_dim):
    # dq, dk, dv are fresh tensors; dout, q, k, v, out and lse (also their
    # storage outside the views) are unchanged.
    q, k, v = make_inputs(2, 129, 300, 8, 2, head_dim, dtype, kind=kind)
    options = {"causal": True, "softcap": 2.0, "window_left": 64}
    out, lse = forward(q, k, v, **options)
    dout = torch.randn_like(out)
    tensors = (dout, q, k, v, out, lse)
    bases = [t if t._base is None else t._base for t in tensors]
    saved = [b.clone() for b in bases]
    for deterministic in (False, True):
        grads = backward(*tensors, deterministic, **options)
        for g in grads:
            assert all(g.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() for b in bases)
        for b, s in zip(bases, saved, strict=True):
            assert torch.equal(b, s)


# -- zero sizes and rows without keys -----------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "batch, seqlen_q, seqlen_k", [(0, 17, 33), (2, 0, 33), (2, 17, 0), (0, 0, 0)], ids=["B0", "Sq0", "Sk0", "all0"]
)
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_zero_size(dtype, head_dim, batch, seqlen_q, seqlen_k, deterministic):
    # Sq = 0: no query sees a key, so dk and dv are 0; Sk = 0: every row sees
    # nothing, so dq is 0 (the kernel must still write them: the outputs start
    # as NaN in the tests).
    q, k, v = make_inputs(batch, seqlen_q, seqlen_k, 4, 2, head_dim, dtype)
    for options in ({}, {"causal": True}):
        out, lse = forward(q, k, v, **options)
        dout = torch.randn_like(out)
        for name, g in zip(GRAD_NAMES, backward(dout, q, k, v, out, lse, deterministic, **options), strict=True):
            assert (g == 0).all(), f"{name} ({options})"
    q, k, v = leaves(q, k, v)
    out = gqa_ext.attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.device == DEVICE and (g == 0).all()


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, options",
    [
        (300, 129, {"causal": True}),
        (257, 17, {"window_left": 5, "window_right": 100}),
        (257, 129, {"window_left": 0, "window_right": 0}),
        (300, 129, {"causal": True, "softcap": 2.0, "window_left": 3}),
        # Rows 0..99 see no key.
        (400, 300, {"window_left": 20, "window_right": 0}),
        # Keys 0..160 are seen by no row.
        (129, 300, {"window_left": 10, "window_right": 0}),
    ],
    ids=[
        "causal_query_longer",
        "window_both",
        "window_zero",
        "causal_softcap_window",
        "window_query_longer",
        "window_keys_unseen",
    ],
)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_rows_without_keys_give_zero_gradients(dtype, seqlen_q, seqlen_k, options):
    # A row whose lse is -inf gets dq = 0 (no NaN from exp(s - lse)); a key
    # no row sees gets dk = dv = 0.
    q, k, v = make_inputs(2, seqlen_q, seqlen_k, 10, 2, 64, dtype)
    dq, dk, dv = check_backward(q, k, v, **options)
    mask_options = {n: options[n] for n in options if n != "softcap"}
    mask = visible_mask(seqlen_q, seqlen_k, **mask_options, device=DEVICE)
    empty_rows, unseen_keys = ~mask.any(dim=1), ~mask.any(dim=0)
    assert empty_rows.any() or unseen_keys.any(), "the case must have rows without keys or keys without rows"
    assert (dq[:, empty_rows] == 0).all()
    assert (dk[:, unseen_keys] == 0).all() and (dv[:, unseen_keys] == 0).all()
    # A row that sees a single key has dq = 0 too (its softmax is constant).
    assert (dq[:, mask.sum(dim=1) > 1].abs().sum(dim=-1) > 0).all()
    assert (dv[:, ~unseen_keys].abs().sum(dim=-1) > 0).all()


# -- autograd and torch.compile -------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"causal": True, "window_left": 40, "softcap": 3.0, "softmax_scale": 0.2}],
    ids=["plain", "causal_window_softcap_scale"],
)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_cuda_attention_autograd_uses_the_op(layout, options):
    # gqa_ext.attention's backward is torch.ops.gqa.backward with the same
    # options (and deterministic=True under use_deterministic_algorithms).
    kind = "bhsd" if layout == "bhsd" else "contiguous"
    q, k, v = leaves(*make_inputs(2, 129, 300, 8, 2, 64, torch.bfloat16, kind=kind))
    dout = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    with deterministic_algorithms():
        out = gqa_ext.attention(q, k, v, layout=layout, **api_kwargs(options))
        grads = torch.autograd.grad(out, (q, k, v), dout)
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.device == DEVICE and g.dtype == t.dtype
    *qkv, dout_bshd = (t.detach().transpose(1, 2) if layout == "bhsd" else t.detach() for t in (q, k, v, dout))
    out_op, lse_op = forward(*qkv, **options)
    grads_op = backward(dout_bshd, *qkv, out_op, lse_op, True, **options)
    assert_grads_close(grads_op, reference_grads(*qkv, dout_bshd, **options), torch.bfloat16)
    if layout == "bhsd":
        grads_op = [g.transpose(1, 2) for g in grads_op]
    assert_bitwise_equal(grads, grads_op, "autograd vs the op")


@pytest.mark.usefixtures("reset_dynamo")
def test_cuda_compile_fullgraph_inductor_backward_matches_eager():
    def fn(q, k, v):
        return gqa_ext.attention(q * 0.5, k, v, causal=True, window=(40, -1), softcap=5.0) * 2.0

    q, k, v = make_inputs(2, 129, 300, 10, 2, 64, torch.bfloat16)
    dout = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    expected = forward_backward(fn, q, k, v, dout)
    # Inductor compiles C++ on a CPU, which takes long: the dry run checks the test with aot_eager.
    backend = "inductor" if ON_CUDA else "aot_eager"
    got = forward_backward(torch.compile(fn, backend=backend, fullgraph=True), q, k, v, dout)
    assert_same_results(got, expected)
    assert all(g.device == DEVICE and torch.isfinite(g).all() for g in got[2])


@pytest.mark.usefixtures("reset_dynamo")
def test_cuda_compile_bhsd_dynamic_backward_matches_eager():
    def fn(q, k, v):
        return gqa_ext.attention(q, k, v, layout="bhsd", softmax_scale=0.3, window=(5, 2), return_lse=True)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for seqlen_q, seqlen_k in [(17, 65), (129, 300)]:
        q, k, v = make_inputs(3, seqlen_q, seqlen_k, 8, 1, 64, torch.bfloat16, kind="bhsd")
        dout = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
        got = forward_backward(compiled, q, k, v, dout)
        assert_same_results(got, forward_backward(fn, q, k, v, dout))
        assert all(g.shape == t.shape and g.device == DEVICE for g, t in zip(got[2], (q, k, v), strict=True))
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"recompiled for a new sequence length: {frames}"


@pytest.mark.usefixtures("reset_dynamo")
def test_cuda_compile_varlen_backward_matches_eager():
    x = make_varlen(*BACKWARD_LENGTHS, 10, 2, 64, torch.bfloat16, device=DEVICE)
    rest = x[3:]

    def fn(q, k, v):
        return gqa_ext.attention_varlen(q, k, v, *rest, causal=True, window=(64, -1), softcap=2.0)

    dout = torch.randn(x.q.shape, dtype=x.q.dtype, device=DEVICE)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = forward_backward(compiled, x.q, x.k, x.v, dout)
    assert_same_results(got, forward_backward(fn, x.q, x.k, x.v, dout))


# -- varlen ----------------------------------------------------------------------

# Ragged batches with empty and single-row sequences, Sq < Sk and Sq > Sk,
# lengths on and off the tiles' multiples.
VARLEN_LENGTH_CASES = [
    *LENGTH_CASES,
    pytest.param(*BACKWARD_LENGTHS, id="ragged"),
    pytest.param([63, 0, 1, 129, 200, 64, 1], [65, 3, 0, 127, 300, 1, 1000], id="tile_edges"),
]
TILE_EDGES = VARLEN_LENGTH_CASES[-1].values


def backward_varlen(dout, x: Varlen, out, lse, deterministic=False, **options):
    """The varlen op's (dq, dk, dv), with the properties every output must have checked."""
    grads = torch.ops.gqa.backward_varlen(dout, x.q, x.k, x.v, out, lse, *x[3:], **options, deterministic=deterministic)
    for name, g, t in zip(GRAD_NAMES, grads, (x.q, x.k, x.v), strict=True):
        assert g.device == t.device and g.dtype == t.dtype and g.shape == t.shape, name
    return grads


def check_varlen_backward(x: Varlen, dout=None, deterministic=False, **options):
    """Runs forward_varlen and backward_varlen and checks dq, dk, dv against the reference; returns them."""
    out, lse = forward_varlen(x, **options)
    if dout is None:
        dout = torch.randn_like(out)
    grads = backward_varlen(dout, x, out, lse, deterministic, **options)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (x.q, x.k, x.v))
    ref_out, _ = attention_varlen_ref(q64, k64, v64, x.cu_seqlens_q, x.cu_seqlens_k, **options)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    assert_grads_close(grads, ref_grads, x.q.dtype)
    return grads


VARLEN_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"causal": True, "window_left": 100, "softcap": 3.0}, id="causal_window_softcap"),
]


@pytest.mark.parametrize("options", VARLEN_OPTIONS)
@pytest.mark.parametrize("seqlens_q, seqlens_k", VARLEN_LENGTH_CASES)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_varlen_lengths(dtype, seqlens_q, seqlens_k, options):
    x = make_varlen(seqlens_q, seqlens_k, 10, 2, 64, dtype, device=DEVICE)
    check_varlen_backward(x, **options)


@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
@pytest.mark.parametrize("dtype", MATRIX_DTYPES, ids=str)
def test_cuda_backward_varlen_group_sizes(dtype, heads_q, heads_kv):
    x = make_varlen(*TILE_EDGES, heads_q, heads_kv, 64, dtype, device=DEVICE)
    check_varlen_backward(x, causal=True)


@pytest.mark.parametrize("options", OPTION_CASES)
def test_cuda_backward_varlen_options(options):
    x = make_varlen(*TILE_EDGES, 8, 2, 64, torch.bfloat16, device=DEVICE)
    check_varlen_backward(x, **options)


@pytest.mark.parametrize("head_dim", [40, 100, 128, 256])
def test_cuda_backward_varlen_head_dims(head_dim):
    x = make_varlen(*BACKWARD_LENGTHS, 8, 2, head_dim, torch.bfloat16, device=DEVICE)
    check_varlen_backward(x, causal=True, window_left=50)


@pytest.mark.parametrize("kind", ["sliced", "packed_qkv"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_varlen_noncontiguous_inputs(dtype, kind):
    lengths = [130, 0, 1, 17, 65]
    x = make_varlen(lengths, lengths, 8, 2, 64, dtype, kind=kind, device=DEVICE)
    assert not (x.q.is_contiguous() or x.k.is_contiguous() or x.v.is_contiguous())
    dout = torch.randn(x.q.shape, dtype=dtype, device=DEVICE)
    options = {"causal": True, "window_left": 50}
    grads = check_varlen_backward(x, dout, True, **options)
    contiguous = x._replace(q=x.q.contiguous(), k=x.k.contiguous(), v=x.v.contiguous())
    grads_c = backward_varlen(dout, contiguous, *forward_varlen(contiguous, **options), True, **options)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g, g_c)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_varlen_empty_sequences_give_zero_gradients(dtype):
    x = make_varlen(*EMPTY_SEQUENCE_LENGTHS, 8, 2, 64, dtype, device=DEVICE)
    assert_empty_sequence_gradients(*check_varlen_backward(x, **EMPTY_SEQUENCE_OPTIONS))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "seqlens_q, seqlens_k",
    [([], []), ([0, 0], [0, 0]), ([0, 0, 0], [5, 0, 2]), ([3, 2], [0, 0])],
    ids=["B0", "all_empty", "no_queries", "no_keys"],
)
def test_cuda_backward_varlen_zero_size(seqlens_q, seqlens_k, deterministic):
    x = make_varlen(seqlens_q, seqlens_k, 4, 2, 64, torch.bfloat16, device=DEVICE)
    out, lse = forward_varlen(x, causal=True)
    dout = torch.randn_like(out)
    grads = backward_varlen(dout, x, out, lse, deterministic, causal=True)
    for name, g in zip(GRAD_NAMES, grads, strict=True):
        assert (g == 0).all(), name
    x = varlen_leaves(x)
    out = gqa_ext.attention_varlen(*x, causal=True)
    grads = torch.autograd.grad(out, (x.q, x.k, x.v), torch.randn_like(out))
    assert all((g == 0).all() for g in grads)


def test_cuda_backward_varlen_larger_max_seqlen_gives_same_result():
    # max_seqlen_* only bound the lengths (and size the grid); larger values
    # change nothing beyond rounding (they may change the tiles the kernel picks).
    x = make_varlen(*TILE_EDGES, 8, 2, 64, torch.bfloat16, device=DEVICE)
    dout = torch.randn(x.q.shape, dtype=x.q.dtype, device=DEVICE)
    grads = check_varlen_backward(x, dout, True, causal=True)
    bigger = x._replace(max_seqlen_q=x.max_seqlen_q + 300, max_seqlen_k=x.max_seqlen_k + 1000)
    grads_b = check_varlen_backward(bigger, dout, True, causal=True)
    assert_same_to_rounding(grads_b, grads, torch.bfloat16, "larger max_seqlen")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_backward_varlen_deterministic(dtype):
    # Bitwise repeatable with deterministic=True, and the same up to rounding
    # as deterministic=False.
    x = make_varlen([700, 0, 1, 300], [700, 5, 0, 1000], 16, 2, 128, dtype, device=DEVICE)
    options = {"window_left": 200}
    out, lse = forward_varlen(x, **options)
    dout = torch.randn_like(out)
    first = backward_varlen(dout, x, out, lse, True, **options)
    for i in range(2):
        assert_bitwise_equal(backward_varlen(dout, x, out, lse, True, **options), first, f"run {i + 2}")
    fast = backward_varlen(dout, x, out, lse, False, **options)
    assert_same_to_rounding(fast, first, dtype, "deterministic=False vs True")


def test_cuda_attention_varlen_autograd_uses_the_op():
    options = {"causal": True, "window_left": 64, "softcap": 2.0, "softmax_scale": 0.2}
    x = varlen_leaves(make_varlen(*BACKWARD_LENGTHS, 10, 2, 64, torch.bfloat16, device=DEVICE))
    dout = torch.randn(x.q.shape, dtype=x.q.dtype, device=DEVICE)
    with deterministic_algorithms():
        out = gqa_ext.attention_varlen(*x, **api_kwargs(options))
        grads = torch.autograd.grad(out, (x.q, x.k, x.v), dout)
    plain = x._replace(q=x.q.detach(), k=x.k.detach(), v=x.v.detach())
    assert_bitwise_equal(grads, check_varlen_backward(plain, dout, True, **options), "autograd vs the op")


# -- errors ----------------------------------------------------------------------


def error_tensors(dtype, head_dim=64, varlen=False):
    """(dout, q, k, v, out, lse) of valid shapes (Hq = 4, Hkv = 2), and the varlen op's index arguments."""
    if varlen:
        x = make_varlen([17, 0, 5], [33, 3, 0], 4, 2, head_dim, dtype, device=DEVICE)
        q, k, v, rest = x.q, x.k, x.v, tuple(x[3:])
        lse = torch.zeros(4, q.shape[0], device=DEVICE)
    else:
        q, k, v = make_inputs(1, 17, 33, 4, 2, head_dim, dtype)
        rest = ()
        lse = torch.zeros(1, 4, 17, device=DEVICE)
    # The forward rejects these inputs too, so out and lse are made up.
    return (torch.randn_like(q), q, k, v, torch.zeros_like(q), lse), rest


@cuda_only
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_backward_rejects_full_precision(dtype, varlen):
    tensors, rest = error_tensors(dtype, varlen=varlen)
    op = torch.ops.gqa.backward_varlen if varlen else torch.ops.gqa.backward
    with pytest.raises((TypeError, NotImplementedError, RuntimeError), match=r"float16 and bfloat16"):
        op(*tensors, *rest)


@cuda_only
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("head_dim", [257, 264, 512])
def test_cuda_backward_rejects_head_dim_over_256(head_dim, varlen):
    tensors, rest = error_tensors(torch.bfloat16, head_dim, varlen=varlen)
    op = torch.ops.gqa.backward_varlen if varlen else torch.ops.gqa.backward
    with pytest.raises(NotImplementedError, match=r"head dim.*256"):
        op(*tensors, *rest)


@cuda_only
@pytest.mark.parametrize("on_cpu", ["dout", "q", "k", "v", "out", "lse"])
def test_cuda_backward_rejects_mixed_devices(on_cpu):
    tensors, _ = error_tensors(torch.bfloat16)
    named = dict(zip(("dout", "q", "k", "v", "out", "lse"), tensors, strict=True))
    named[on_cpu] = named[on_cpu].cpu()
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.gqa.backward(*named.values())


@cuda_only
@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cuda_backward_varlen_rejects_cu_seqlens_on_cpu(name):
    tensors, rest = error_tensors(torch.bfloat16, varlen=True)
    cu_q, cu_k, max_q, max_k = rest
    if name == "cu_seqlens_q":
        cu_q = cu_q.cpu()
    else:
        cu_k = cu_k.cpu()
    with pytest.raises(ValueError, match=rf"{name} must be on q's device cuda:\d+, got cpu"):
        torch.ops.gqa.backward_varlen(*tensors, cu_q, cu_k, max_q, max_k)
