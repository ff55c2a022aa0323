"""torch.ops.gqa.forward on CUDA against the float64 reference.

The module runs only where ``torch.cuda.is_available()`` and gqa_ext was built
with its CUDA kernels (``gqa_ext.build_info()["cuda_kernels"]``); elsewhere it
is skipped as a whole, with the reason.

Dry run: with the environment variable ``GQA_EXT_CUDA_TESTS_DEVICE=cpu`` the
module runs on the CPU device instead, so that the tests' own logic (shapes,
masks, expected zeros and -inf, comparisons) is checked against the CPU
kernels on a machine without a GPU::

    GQA_EXT_CUDA_TESTS_DEVICE=cpu python -m pytest tests/test_cuda_forward.py

In a dry run the CPU ops ignore ``forced_cuda_forward``, and the tests of
CUDA-only errors (float32 and float64 inputs, D > 256, mixed devices) skip.
``GQA_EXT_CUDA_TESTS_DEVICE=cuda`` (or unset) is the normal mode.

The kernel tiles 128 or 64 rows (pairs of a query position and a query head
of the group, packed or not) by 16, 64 or 128 keys, so the lengths below sit on
and around those edges, and the splits of the keys (split-KV) and the packing
of a group's query heads are forced through ``forced_cuda_forward`` so that
every path runs on small shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import (
    GROUP_CASES,
    LSE_ATOL,
    LSE_RTOL,
    NONCONTIGUOUS_KINDS,
    OPTION_CASES,
    assert_lse_close,
    assert_rel_close,
    make_qkv,
    rel_err,
)

import gqa_ext
from gqa_ext._testing import forced_cuda_forward
from gqa_ext.reference import attention_ref, visible_mask

_DEVICE_ENV = "GQA_EXT_CUDA_TESTS_DEVICE"
_device_name = os.environ.get(_DEVICE_ENV, "cuda") or "cuda"
if _device_name not in ("cuda", "cpu"):
    raise ValueError(
        f"{_DEVICE_ENV} must be 'cuda' (default) or 'cpu' (dry run on the CPU kernels), got {_device_name!r}"
    )
if _device_name == "cuda":
    if not torch.cuda.is_available():
        pytest.skip(
            f"needs a CUDA device (torch.cuda.is_available() is False); {_DEVICE_ENV}=cpu dry-runs these tests "
            "on the CPU kernels",
            allow_module_level=True,
        )
    if not gqa_ext.build_info()["cuda_kernels"]:
        pytest.skip(
            "gqa_ext was built without its CUDA kernels (build_info()['cuda_kernels'] is False)",
            allow_module_level=True,
        )

# Every tensor of this module is created on this device.
DEVICE = torch.device(_device_name)
ON_CUDA = DEVICE.type == "cuda"

cuda_only = pytest.mark.skipif(not ON_CUDA, reason=f"checks a CUDA-only error; {_DEVICE_ENV}=cpu dry run")

HALF_DTYPES = [torch.float16, torch.bfloat16]

# How far two runs that differ only in how the work is cut (split-KV count,
# packing) may be apart, as ||a - b|| / ||b||: both round the probabilities to
# q's dtype before the P @ V product, with other row maxima, and round the
# output once. Tighter than the error allowed against the reference.
ROUNDING_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 5e-3}

SPLIT_COUNTS = [1, 2, 3, 7, 64]


def make_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, kind="contiguous"):
    """q, k, v on DEVICE: a layout of conftest.make_qkv, or one of these, about the kernel's 16-byte loads:

    - ``"sliced_aligned"``: slices of bigger tensors whose storage offsets and
      strides are all multiples of 8 elements, so the kernel reads them in place;
    - ``"odd_head_stride"``: rows padded by 3, 5 and 1 elements (q, k, v), so the
      head, row and batch strides are not multiples of 8 elements;
    - ``"odd_storage_offset"``: contiguous views 1, 3 and 5 elements into their
      storage, so the data pointers are not 16-byte aligned.
    """

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    shapes = [(batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_kv, head_dim)]
    shapes.append(shapes[1])
    if kind == "sliced_aligned":
        return tuple(randn(b + 1, s + 3, h + 2, d + 16)[1:, 2 : 2 + s, 1 : 1 + h, 8 : 8 + d] for b, s, h, d in shapes)
    if kind == "odd_head_stride":
        return tuple(randn(b, s, h, d + pad)[..., :d] for (b, s, h, d), pad in zip(shapes, (3, 5, 1), strict=True))
    if kind == "odd_storage_offset":
        return tuple(
            randn(b * s * h * d + off)[off:].view(b, s, h, d)
            for (b, s, h, d), off in zip(shapes, (1, 3, 5), strict=True)
        )
    return make_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, kind=kind, device=DEVICE)


def forward(q, k, v, **options):
    """The op's (out, lse), with the properties every output must have checked."""
    out, lse = torch.ops.gqa.forward(q, k, v, **options)
    batch, seqlen_q, heads_q, head_dim = q.shape
    assert out.device == q.device and lse.device == q.device
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == (batch, seqlen_q, heads_q, head_dim)
    assert lse.shape == (batch, heads_q, seqlen_q)
    return out, lse


def check_forward(q, k, v, ref=None, name="out", **options):
    """Runs the op and checks out and lse against the reference; returns (out, lse)."""
    out, lse = forward(q, k, v, **options)
    ref_out, ref_lse = attention_ref(q, k, v, **options) if ref is None else ref
    assert_rel_close(out, ref_out, q.dtype, name)
    assert_lse_close(lse, ref_lse)
    return out, lse


def assert_same_to_rounding(got, expected, dtype, name):
    """(out, lse) pairs of two runs that cut the work differently agree up to rounding."""
    (out, lse), (out_e, lse_e) = got, expected
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, out_e)
    assert err <= ROUNDING_TOLERANCE[dtype], f"{name}: differs from the other run by {err:.3g} (relative)"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_e)), f"{name}: lse is -inf on other rows"
    finite = ~torch.isneginf(lse_e)
    torch.testing.assert_close(lse[finite], lse_e[finite], atol=LSE_ATOL, rtol=LSE_RTOL, msg=lambda m: f"{name}: {m}")


def reference_chunked(q, k, v, **options):
    """attention_ref one batch element and KV head (with its query heads) at a time.

    The same result, with a bounded float64 footprint for the long KV caches
    (attention_ref repeats k and v for every query head).
    """
    group = q.shape[2] // k.shape[2]
    outs, lses = [], []
    for b in range(q.shape[0]):
        parts = [
            attention_ref(
                q[b : b + 1, :, h * group : (h + 1) * group],
                k[b : b + 1, :, h : h + 1],
                v[b : b + 1, :, h : h + 1],
                **options,
            )
            for h in range(k.shape[2])
        ]
        outs.append(torch.cat([p[0] for p in parts], dim=2))
        lses.append(torch.cat([p[1] for p in parts], dim=1))
    return torch.cat(outs), torch.cat(lses)


# -- dtypes, head dims, sequence lengths, groups, options --------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 96, 40])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_dtypes_head_dims(dtype, head_dim, causal):
    # 64, 128, 256 are the kernel's own head dims; 96 and 40 run padded to the
    # next one inside, and must still use the default scale 1 / sqrt(D).
    q, k, v = make_inputs(2, 129, 300, 8, 2, head_dim, dtype)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "head_dim, kind",
    [
        (1, "contiguous"),
        (17, "contiguous"),
        (65, "contiguous"),
        (255, "contiguous"),
        (17, "sliced"),
        (100, "bhsd_transposed"),
    ],
    ids=["d1", "d17", "d65", "d255", "d17_sliced", "d100_bhsd_transposed"],
)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_odd_head_dims(dtype, head_dim, kind):
    # D not a multiple of 8 is zero-padded by the op layer (255 to 256); 100
    # is a multiple of 4 only. The output must drop the padding.
    q, k, v = make_inputs(1, 65, 300, 4, 2, head_dim, dtype, kind=kind)
    out, _ = check_forward(q, k, v, window_left=100)
    assert out.is_contiguous()


SEQLEN_CASES = [
    (1, 1),
    (1, 17),
    (1, 1000),
    (2, 64),
    (2, 129),
    (63, 1),
    (63, 65),
    (65, 127),
    (129, 64),
    (129, 129),
    (257, 17),
    (257, 300),
    (65, 1000),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLEN_CASES)
def test_cuda_forward_seqlens(seqlen_q, seqlen_k, head_dim, causal):
    q, k, v = make_inputs(1, seqlen_q, seqlen_k, 10, 2, head_dim, torch.bfloat16)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, causal",
    [(65, 300, False), (257, 129, True)],
    ids=["query_shorter", "causal_query_longer"],
)
@pytest.mark.parametrize("heads_q, heads_kv", GROUP_CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_group_sizes(dtype, heads_q, heads_kv, seqlen_q, seqlen_k, causal):
    q, k, v = make_inputs(2, seqlen_q, seqlen_k, heads_q, heads_kv, 64, dtype)
    check_forward(q, k, v, causal=causal)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(129, 300), (300, 129), (63, 1000)])
@pytest.mark.parametrize("options", OPTION_CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_options(dtype, options, seqlen_q, seqlen_k):
    q, k, v = make_inputs(1, seqlen_q, seqlen_k, 8, 2, 128, dtype)
    check_forward(q, k, v, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"window_left": 50, "window_right": 7},
        {"softcap": 0.5, "softmax_scale": 0.5, "causal": True, "window_left": 64},
    ],
    ids=["window_both", "softcap_scale_causal_window"],
)
@pytest.mark.parametrize("head_dim", [64, 256, 40])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_options_head_dims(dtype, head_dim, options):
    q, k, v = make_inputs(1, 257, 1000, 10, 2, head_dim, dtype)
    check_forward(q, k, v, **options)


def test_cuda_forward_causal_equals_window_right_zero():
    q, k, v = make_inputs(1, 129, 300, 8, 2, 64, torch.bfloat16)
    out_causal, lse_causal = forward(q, k, v, causal=True, window_left=40)
    out_window, lse_window = forward(q, k, v, window_left=40, window_right=0)
    torch.testing.assert_close(out_causal, out_window, rtol=0, atol=0)
    torch.testing.assert_close(lse_causal, lse_window, rtol=0, atol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_online_softmax_rescales_across_key_tiles(dtype, num_splits):
    # Scores grow with the key index (up to ~25 above the noise), so every
    # later key tile raises the row maximum and the running sums (and, with
    # splits, the partial results) must be rescaled.
    q, k, v = make_inputs(1, 129, 1000, 8, 2, 64, dtype)
    q[..., 0] = 1.0
    k[..., 0] = torch.linspace(0, 200, 1000, device=DEVICE).view(1, 1000, 1)
    with forced_cuda_forward(num_splits=num_splits):
        check_forward(q, k, v)
        check_forward(q, k, v, causal=True, window_left=300)


# -- decode, split-KV, packing ------------------------------------------------

DECODE_CASES = [
    pytest.param(1, 1, 4097, 32, 8, {}, id="b1_sq1_sk4097_h32"),
    pytest.param(3, 1, 4097, 64, 8, {}, id="b3_sq1_sk4097_h64"),
    pytest.param(1, 1, 16000, 32, 8, {}, id="b1_sq1_sk16000_h32"),
    pytest.param(1, 1, 16000, 64, 8, {"window_left": 4096}, id="b1_sq1_sk16000_h64_window"),
    pytest.param(2, 1, 4097, 64, 8, {"softcap": 30.0}, id="b2_sq1_sk4097_h64_softcap"),
    pytest.param(1, 2, 4097, 64, 8, {"causal": True}, id="b1_sq2_sk4097_h64_causal"),
    pytest.param(1, 4, 16000, 32, 8, {"causal": True}, id="b1_sq4_sk16000_h32_causal"),
    pytest.param(3, 4, 4097, 32, 8, {"causal": True, "softcap": 30.0}, id="b3_sq4_sk4097_h32_causal_softcap"),
    pytest.param(2, 1, 1, 32, 8, {}, id="b2_sq1_sk1_h32"),
    pytest.param(3, 1, 65, 64, 8, {}, id="b3_sq1_sk65_h64"),
]


@pytest.mark.parametrize("batch, seqlen_q, seqlen_k, heads_q, heads_kv, options", DECODE_CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_decode(dtype, batch, seqlen_q, seqlen_k, heads_q, heads_kv, options):
    # Decoding (Sq = 1) and speculative decoding (Sq = 2, 4) over a long KV
    # cache at D = 128, with the heuristic split count and packing.
    q, k, v = make_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, 128, dtype)
    check_forward(q, k, v, ref=reference_chunked(q, k, v, **options), **options)


SPLIT_CASES = [
    pytest.param(1, 1000, {}, id="decode"),
    pytest.param(4, 1000, {"causal": True}, id="speculative_causal"),
    pytest.param(65, 300, {"causal": True}, id="causal"),
    # Query i sees keys i + 771 .. i + 871 only: most splits see no key for
    # the first row blocks.
    pytest.param(129, 1000, {"window_left": 100, "window_right": 0}, id="window_most_splits_empty"),
    # Every row sees one key, so all splits but one see nothing for a row.
    pytest.param(3, 1000, {"window_left": 0, "window_right": 0}, id="single_key"),
    # Rows 0..170 see no key at all, with any split.
    pytest.param(300, 129, {"causal": True, "softcap": 4.0}, id="causal_query_longer_softcap"),
    # One key block: the split count is capped at 1.
    pytest.param(2, 17, {}, id="one_key_block"),
]


@pytest.mark.parametrize("seqlen_q, seqlen_k, options", SPLIT_CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_forced_splits(dtype, seqlen_q, seqlen_k, options):
    # Every split count, with packing on and off: each matches the reference
    # and agrees with the unsplit, unpacked run up to rounding.
    q, k, v = make_inputs(2, seqlen_q, seqlen_k, 10, 2, 128, dtype)
    ref = attention_ref(q, k, v, **options)
    results = {}
    for pack_gqa in (False, True):
        for num_splits in SPLIT_COUNTS:
            with forced_cuda_forward(num_splits=num_splits, pack_gqa=pack_gqa):
                name = f"out (num_splits={num_splits}, pack_gqa={pack_gqa})"
                results[num_splits, pack_gqa] = check_forward(q, k, v, ref=ref, name=name, **options)
    base = results[1, False]
    for (num_splits, pack_gqa), got in results.items():
        assert_same_to_rounding(got, base, dtype, f"num_splits={num_splits}, pack_gqa={pack_gqa} vs unsplit")


@pytest.mark.parametrize("num_splits", [None, 3])
def test_cuda_forward_is_repeatable(num_splits):
    # Same inputs, same bits: a race in the kernel or the combine of the
    # splits would show as run-to-run differences.
    q, k, v = make_inputs(2, 65, 1000, 10, 2, 128, torch.bfloat16)
    with forced_cuda_forward(num_splits=num_splits):
        out, lse = forward(q, k, v, causal=True, window_left=500)
        for _ in range(3):
            again, lse_again = forward(q, k, v, causal=True, window_left=500)
            assert torch.equal(out, again) and torch.equal(lse, lse_again)


@pytest.mark.parametrize("options", [{}, {"causal": True, "window_left": 40}], ids=["plain", "causal_window"])
@pytest.mark.parametrize("seqlen_q", [1, 77])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("heads_q, heads_kv", [(3, 3), (10, 2), (16, 2)], ids=["group1", "group5", "group8"])
def test_cuda_forward_forced_pack_gqa(heads_q, heads_kv, head_dim, seqlen_q, options):
    # Packed, a tile's rows are (query position, head of the group) pairs, and
    # the mask must follow the position of each row, not the row index.
    q, k, v = make_inputs(2, seqlen_q, 300, heads_q, heads_kv, head_dim, torch.bfloat16)
    ref = attention_ref(q, k, v, **options)
    with forced_cuda_forward(pack_gqa=False):
        unpacked = check_forward(q, k, v, ref=ref, name="out (unpacked)", **options)
    with forced_cuda_forward(pack_gqa=True):
        packed = check_forward(q, k, v, ref=ref, name="out (packed)", **options)
    assert_same_to_rounding(packed, unpacked, torch.bfloat16, "packed vs unpacked")


# -- layouts and strides -------------------------------------------------------


@pytest.mark.parametrize("kind", [*NONCONTIGUOUS_KINDS, "sliced_aligned", "odd_head_stride", "odd_storage_offset"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_noncontiguous_inputs(dtype, kind):
    # The kernel reads 16-byte chunks of rows in place when the data pointer
    # and the batch, row and head strides allow it (bhsd_transposed, packed_kv,
    # sliced_aligned), and the op copies the tensor first otherwise: conftest's
    # "sliced" starts 4 elements into its rows, odd_* are misaligned on purpose.
    q, k, v = make_inputs(2, 129, 300, 8, 2, 64, dtype, kind=kind)
    if kind == "odd_storage_offset":  # contiguous views, but not 16-byte aligned
        assert all(t.is_contiguous() and t.storage_offset() % 8 != 0 for t in (q, k, v))
    else:
        assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    out, lse = check_forward(q, k, v, causal=True, window_left=100)
    # Same result as on contiguous copies of the same values.
    out_c, lse_c = forward(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, window_left=100)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)


@pytest.mark.parametrize("head_dim", [64, 40])
def test_cuda_forward_packed_qkv(head_dim):
    # One (B, S, Hq + 2 Hkv, D) projection split into q, k and v: a row
    # stride of (Hq + 2 Hkv) D, and k and v at offsets into q's storage. With
    # D = 40 the kernel pads to 64 internally while reading rows of 40.
    qkv = torch.randn(2, 129, 8 + 2 + 2, head_dim, dtype=torch.bfloat16, device=DEVICE)
    q, k, v = qkv.split([8, 2, 2], dim=2)
    check_forward(q, k, v, causal=True)


@pytest.mark.parametrize("options", [{}, {"causal": True, "softcap": 3.0, "window_left": 40}], ids=["plain", "options"])
def test_cuda_attention_bhsd_layout_matches_bshd(options):
    q, k, v = make_inputs(2, 129, 300, 8, 2, 64, torch.bfloat16, kind="bhsd")
    window = (options.get("window_left", -1), -1)
    kwargs = {"causal": options.get("causal", False), "softcap": options.get("softcap", 0.0), "window": window}
    out_bhsd, lse_bhsd = gqa_ext.attention(q, k, v, layout="bhsd", return_lse=True, **kwargs)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out_bshd, lse_bshd = gqa_ext.attention(qt, kt, vt, layout="bshd", return_lse=True, **kwargs)
    assert out_bhsd.shape == q.shape and out_bhsd.device == q.device
    torch.testing.assert_close(out_bhsd, out_bshd.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(lse_bhsd, lse_bshd, rtol=0, atol=0)
    ref_out, ref_lse = attention_ref(qt, kt, vt, **options)
    assert_rel_close(out_bhsd.transpose(1, 2), ref_out, torch.bfloat16, "out")
    assert_lse_close(lse_bhsd, ref_lse)


@pytest.mark.parametrize(
    "kind, head_dim",
    [
        ("contiguous", 64),
        ("sliced", 64),
        ("kv_strides_differ", 64),
        ("bhsd_transposed", 64),
        ("odd_storage_offset", 64),
        ("sliced", 40),
        ("bhsd_transposed", 17),
    ],
)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_outputs_and_inputs_untouched(dtype, kind, head_dim):
    # out is a fresh contiguous (B, Sq, Hq, D) tensor of q's dtype, lse a
    # contiguous (B, Hq, Sq) float32 one, both on q's device, whatever the
    # input layout; the inputs' storage (also outside the views) is unchanged.
    q, k, v = make_inputs(2, 129, 300, 8, 2, head_dim, dtype, kind=kind)
    bases = [t if t._base is None else t._base for t in (q, k, v)]
    saved = [b.clone() for b in bases]
    with forced_cuda_forward(num_splits=3):
        out, lse = forward(q, k, v, causal=True, softcap=2.0, window_left=64)
    assert out.is_contiguous() and lse.is_contiguous()
    assert out.stride() == (129 * 8 * head_dim, 8 * head_dim, head_dim, 1)
    assert out.device == DEVICE and lse.device == DEVICE
    assert all(out.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() for b in bases)
    for b, s in zip(bases, saved, strict=True):
        assert torch.equal(b, s)


# -- zero sizes and rows without keys -----------------------------------------


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize(
    "batch, seqlen_q, seqlen_k", [(0, 17, 33), (2, 0, 33), (2, 17, 0), (0, 0, 0)], ids=["B0", "Sq0", "Sk0", "all0"]
)
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_zero_size(dtype, head_dim, batch, seqlen_q, seqlen_k, num_splits):
    # Sk = 0: every row sees nothing, so out is 0 and lse -inf (the kernel
    # must still write them: the outputs start as NaN in the tests).
    q, k, v = make_inputs(batch, seqlen_q, seqlen_k, 4, 2, head_dim, dtype)
    with forced_cuda_forward(num_splits=num_splits):
        out, lse = forward(q, k, v, causal=True)
        out_plain, lse_plain = forward(q, k, v)
    for o, lse_ in ((out, lse), (out_plain, lse_plain)):
        assert (o == 0).all()
        assert torch.isneginf(lse_).all()
    out_api = gqa_ext.attention(q, k, v)
    assert out_api.shape == q.shape and out_api.device == DEVICE and (out_api == 0).all()


@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, options",
    [
        (300, 129, {"causal": True}),
        (257, 17, {"window_left": 5, "window_right": 100}),
        (257, 129, {"window_left": 0, "window_right": 0}),
        (300, 129, {"causal": True, "softcap": 2.0, "window_left": 3}),
        # Rows 0..99 see no key; the others see up to 21 keys, in one or two splits.
        (400, 300, {"window_left": 20, "window_right": 0}),
    ],
    ids=["causal_query_longer", "window_both", "window_zero", "causal_softcap_window", "window_query_longer"],
)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_forward_rows_without_keys_give_zero_and_neg_inf(dtype, seqlen_q, seqlen_k, options, num_splits):
    q, k, v = make_inputs(2, seqlen_q, seqlen_k, 10, 2, 64, dtype)
    with forced_cuda_forward(num_splits=num_splits):
        out, lse = check_forward(q, k, v, **options)
    mask_options = {n: options[n] for n in options if n != "softcap"}
    empty = ~visible_mask(seqlen_q, seqlen_k, **mask_options, device=DEVICE).any(dim=1)
    assert 0 < empty.sum() < seqlen_q, "the case must have rows with and without keys"
    assert (out[:, empty] == 0).all()
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    assert (out[:, ~empty].abs().sum(dim=-1) > 0).all()


# -- torch.compile -------------------------------------------------------------


@pytest.fixture
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_cuda_compile_fullgraph_inductor_matches_eager(reset_dynamo):
    # Forward only: the CUDA backward is not part of this module.
    def fn(q, k, v):
        return gqa_ext.attention(q * 0.5, k, v, causal=True, window=(40, -1), softcap=5.0) * 2.0

    q, k, v = make_inputs(2, 129, 300, 10, 2, 64, torch.bfloat16)
    expected = fn(q, k, v)
    got = torch.compile(fn, fullgraph=True)(q, k, v)
    assert got.device == DEVICE and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)
    ref_out, _ = attention_ref(q * 0.5, k, v, causal=True, window_left=40, softcap=5.0)
    assert_rel_close(got, 2.0 * ref_out, torch.bfloat16, "out")


def test_cuda_compile_bhsd_lse_dynamic_matches_eager(reset_dynamo):
    def fn(q, k, v):
        return gqa_ext.attention(q, k, v, layout="bhsd", softmax_scale=0.3, window=(5, 2), return_lse=True)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for seqlen_q, seqlen_k in [(17, 65), (129, 300)]:
        q, k, v = make_inputs(3, seqlen_q, seqlen_k, 8, 1, 64, torch.bfloat16, kind="bhsd")
        out, lse = compiled(q, k, v)
        out_e, lse_e = fn(q, k, v)
        assert out.shape == q.shape and lse.shape == (3, 8, seqlen_q) and out.device == DEVICE
        torch.testing.assert_close(out, out_e)
        torch.testing.assert_close(lse, lse_e)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"recompiled for a new sequence length: {frames}"


# -- errors ----------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_forward_rejects_full_precision(dtype):
    q, k, v = make_inputs(1, 17, 33, 4, 2, 64, dtype)
    with pytest.raises((TypeError, NotImplementedError, RuntimeError), match="CUDA"):
        torch.ops.gqa.forward(q, k, v)


@cuda_only
@pytest.mark.parametrize("head_dim", [257, 264, 512])
def test_cuda_forward_rejects_head_dim_over_256(head_dim):
    q, k, v = make_inputs(1, 17, 33, 4, 2, head_dim, torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"head dim.*256"):
        torch.ops.gqa.forward(q, k, v)


@cuda_only
@pytest.mark.parametrize("on_cpu", ["k", "v", "kv", "q"])
def test_cuda_forward_rejects_mixed_devices(on_cpu):
    tensors = dict(zip("qkv", make_inputs(1, 17, 33, 4, 2, 64, torch.bfloat16), strict=True))
    for name in on_cpu:
        tensors[name] = tensors[name].cpu()
    with pytest.raises((ValueError, RuntimeError), match="device"):
        torch.ops.gqa.forward(tensors["q"], tensors["k"], tensors["v"])
