"""MHA -> GQA conversion (gqa_ext.convert): the pooled weights, the groupings, and Hugging Face models."""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys

import pytest
import torch
from conftest import rel_err

from gqa_ext import convert
from gqa_ext.convert import STRATEGIES, convert_model, mha_to_gqa

F64 = torch.float64


def random_layer(num_heads, head_dim, hidden, *, bias=False, seed=0, dtype=F64):
    """Weights of a random multi-head layer, scaled so that the attention is neither uniform nor one-hot."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    rows = num_heads * head_dim
    w = dict(
        q_w=randn(rows, hidden, scale=hidden**-0.5),
        k_w=randn(rows, hidden, scale=hidden**-0.5),
        v_w=randn(rows, hidden, scale=hidden**-0.5),
        o_w=randn(hidden, rows, scale=rows**-0.5),
    )
    if bias:
        w.update(q_b=randn(rows, scale=0.3), k_b=randn(rows, scale=0.3), v_b=randn(rows, scale=0.3))
        w["o_b"] = randn(hidden, scale=0.3)
    return w


def hidden_states(batch, seqlen, hidden, seed=1, dtype=F64):
    return torch.randn(batch, seqlen, hidden, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def layer_output(x, w, num_heads, num_kv_heads):
    """Causal attention layer in plain float64 torch; query head h uses KV head h // (num_heads // num_kv_heads)."""
    x = x.to(F64)
    batch, seqlen, _ = x.shape
    head_dim = w["q_w"].shape[0] // num_heads

    def proj(name, heads):
        b = w.get(name + "_b")
        y = torch.nn.functional.linear(x, w[name + "_w"].to(F64), None if b is None else b.to(F64))
        return y.view(batch, seqlen, heads, head_dim).transpose(1, 2)

    q = proj("q", num_heads)
    k = proj("k", num_kv_heads).repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = proj("v", num_kv_heads).repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, seqlen, -1)
    o_b = w.get("o_b")
    return torch.nn.functional.linear(out, w["o_w"].to(F64), None if o_b is None else o_b.to(F64))


def pooled_in_place(w, groups, num_heads):
    """The multi-head layer with each group's K and V heads replaced by their mean, heads left where they are."""
    head_dim = w["q_w"].shape[0] // num_heads
    out = dict(w)
    for name in ("k_w", "v_w", "k_b", "v_b"):
        if w.get(name) is None:
            continue
        heads = w[name].to(F64).reshape(num_heads, head_dim, *w[name].shape[1:]).clone()
        for g in groups:
            heads[g] = heads[g].mean(dim=0, keepdim=True)
        out[name] = heads.reshape(w[name].shape)
    return out


def converted_weights(conv, w):
    return dict(
        q_w=conv.q_w,
        k_w=conv.k_w,
        v_w=conv.v_w,
        o_w=conv.o_w,
        q_b=conv.q_b,
        k_b=conv.k_b,
        v_b=conv.v_b,
        o_b=w.get("o_b"),
    )


def convert_layer(w, num_heads, num_kv_heads, strategy, **kwargs):
    return mha_to_gqa(
        w["q_w"], w["k_w"], w["v_w"], w["o_w"], num_heads, num_kv_heads, strategy,
        q_b=w.get("q_b"), k_b=w.get("k_b"), v_b=w.get("v_b"), o_b=w.get("o_b"), **kwargs,
    )  # fmt: skip


def check_partition(groups, num_heads, num_kv_heads):
    assert len(groups) == num_kv_heads
    assert all(len(g) == num_heads // num_kv_heads for g in groups)
    assert sorted(h for g in groups for h in g) == list(range(num_heads))
    assert all(g == sorted(g) for g in groups) and [g[0] for g in groups] == sorted(g[0] for g in groups)


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_as_many_kv_heads_as_heads_is_exact(strategy):
    num_heads, head_dim, hidden = 6, 8, 24
    w = random_layer(num_heads, head_dim, hidden, bias=True, seed=3)
    x = hidden_states(2, 19, hidden)
    conv = convert_layer(w, num_heads, num_heads, strategy, calibration=x, seed=5)
    assert conv.groups == [[h] for h in range(num_heads)] and conv.head_order == list(range(num_heads))
    for name in ("q_w", "k_w", "v_w", "o_w", "q_b", "k_b", "v_b"):
        assert torch.equal(getattr(conv, name), w[name]), name
    out = layer_output(x, converted_weights(conv, w), num_heads, num_heads)
    assert rel_err(out, layer_output(x, w, num_heads, num_heads)) < 1e-14
    assert conv.error < 1e-14


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "num_heads, num_kv_heads",
    [
        pytest.param(4, 2, id="group2"),
        pytest.param(8, 2, id="group4"),
        pytest.param(14, 2, id="group7"),
        pytest.param(12, 4, id="group3"),
        pytest.param(7, 1, id="mqa"),
    ],
)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_converted_layer_is_the_pooled_multi_head_layer(strategy, num_heads, num_kv_heads, bias):
    """The permuted q rows, o columns and pooled K/V compute the MHA layer with each group's K/V averaged."""
    head_dim, hidden = 4, 20
    w = random_layer(num_heads, head_dim, hidden, bias=bias, seed=num_heads * 10 + num_kv_heads)
    x = hidden_states(2, 17, hidden, seed=7)
    conv = convert_layer(w, num_heads, num_kv_heads, strategy, calibration=x, seed=11)
    check_partition(conv.groups, num_heads, num_kv_heads)
    assert conv.head_order == [h for g in conv.groups for h in g]
    assert conv.k_w.shape == (num_kv_heads * head_dim, hidden) and conv.v_w.shape == conv.k_w.shape
    assert conv.q_w.shape == w["q_w"].shape and conv.o_w.shape == w["o_w"].shape

    out = layer_output(x, converted_weights(conv, w), num_heads, num_kv_heads)
    expected = layer_output(x, pooled_in_place(w, conv.groups, num_heads), num_heads, num_heads)
    assert rel_err(out, expected) < 1e-13
    # The proxy is that layer's error against the original.
    original = layer_output(x, w, num_heads, num_heads)
    assert conv.error == pytest.approx(rel_err(expected, original), rel=1e-9)
    assert conv.error > 1e-3


def test_nontrivial_permutation_is_exercised():
    """The cases above would not catch a missing permutation unless some grouping moves heads."""
    w = random_layer(8, 4, 20, seed=0)
    groups = [convert_layer(w, 8, 2, s, seed=11).groups for s in ("random", "clustered")]
    assert all(g != [[0, 1, 2, 3], [4, 5, 6, 7]] for g in groups)


def test_low_precision_weights_keep_their_dtype():
    w = random_layer(8, 4, 16, bias=True, dtype=torch.bfloat16)
    conv = convert_layer(w, 8, 2, "clustered")
    assert all(getattr(conv, n).dtype == torch.bfloat16 for n in ("q_w", "k_w", "v_w", "o_w", "q_b", "k_b", "v_b"))
    pooled = pooled_in_place(w, conv.groups, 8)["k_w"].reshape(8, 4, 16)
    expected = pooled[[g[0] for g in conv.groups]]
    got = conv.k_w.reshape(2, 4, 16)
    assert torch.allclose(got.to(F64), expected, rtol=1e-2, atol=1e-3)


def test_groupings_are_deterministic_partitions():
    w = random_layer(16, 4, 24, seed=2)
    x = hidden_states(1, 40, 24)
    assert convert_layer(w, 16, 4, "contiguous").groups == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]
    runs = {seed: convert_layer(w, 16, 4, "random", seed=seed).groups for seed in (0, 1, 0)}
    for groups in runs.values():
        check_partition(groups, 16, 4)
    assert convert_layer(w, 16, 4, "random", seed=0).groups == runs[0]
    assert runs[0] != runs[1]
    for calibration in (None, x):
        a = convert_layer(w, 16, 4, "clustered", calibration=calibration, seed=3).groups
        check_partition(a, 16, 4)
        assert convert_layer(w, 16, 4, "clustered", calibration=calibration, seed=3).groups == a
    # The global RNG is neither used nor advanced.
    state = torch.random.get_rng_state()
    convert_layer(w, 16, 4, "random")
    convert_layer(w, 16, 4, "clustered")
    assert torch.equal(torch.random.get_rng_state(), state)


def clustered_layer(num_heads, num_kv_heads, head_dim, hidden, noise, seed=0):
    """Head h's K and V are its cluster's (h % num_kv_heads) centre plus noise: similar heads are not neighbours."""
    g = torch.Generator().manual_seed(seed)
    w = random_layer(num_heads, head_dim, hidden, seed=seed + 1)
    for name in ("k_w", "v_w"):
        centres = torch.randn(num_kv_heads, head_dim, hidden, generator=g, dtype=F64) * hidden**-0.5
        heads = centres[torch.arange(num_heads) % num_kv_heads]
        heads = heads + noise * hidden**-0.5 * torch.randn(heads.shape, generator=g, dtype=F64)
        w[name] = heads.reshape(num_heads * head_dim, hidden)
    return w


@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 2), (12, 4), (16, 8)])
def test_clustering_finds_similar_non_adjacent_heads(num_heads, num_kv_heads):
    w = clustered_layer(num_heads, num_kv_heads, head_dim=8, hidden=32, noise=0.05)
    x = hidden_states(2, 48, 32)
    clusters = [list(range(c, num_heads, num_kv_heads)) for c in range(num_kv_heads)]
    contiguous = convert_layer(w, num_heads, num_kv_heads, "contiguous", calibration=x)
    for calibration in (None, x):
        clustered = convert_layer(w, num_heads, num_kv_heads, "clustered", calibration=calibration)
        assert clustered.groups == clusters
    clustered = convert_layer(w, num_heads, num_kv_heads, "clustered", calibration=x)
    assert clustered.error < 0.3 * contiguous.error, (clustered.error, contiguous.error)


def test_activations_reveal_what_the_weights_hide():
    """Inputs that never use half the hidden dims: heads alike on the used half (h % 2) but whose
    weights on the unused half are far larger and alike by neighbours (h // 4)."""
    num_heads, num_kv_heads, head_dim, hidden = 8, 2, 8, 32
    w = clustered_layer(num_heads, num_kv_heads, head_dim, hidden, noise=0.05)
    g = torch.Generator().manual_seed(9)
    for name in ("k_w", "v_w"):
        unused = 10 * torch.randn(num_kv_heads, head_dim, hidden // 2, generator=g, dtype=F64)
        heads = w[name].reshape(num_heads, head_dim, hidden).clone()
        heads[:, :, hidden // 2 :] = unused[torch.arange(num_heads) // (num_heads // num_kv_heads)]
        w[name] = heads.reshape(num_heads * head_dim, hidden)
    x = hidden_states(3, 40, hidden)
    x[..., hidden // 2 :] = 0

    by_weights = convert_layer(w, num_heads, num_kv_heads, "clustered")
    by_activations = convert_layer(w, num_heads, num_kv_heads, "clustered", calibration=x)
    assert by_weights.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert by_activations.groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    by_weights = convert_layer(w, num_heads, num_kv_heads, "clustered", calibration=None)
    error_by_weights = rel_err(
        layer_output(x, converted_weights(by_weights, w), num_heads, num_kv_heads),
        layer_output(x, w, num_heads, num_heads),
    )
    assert by_activations.error < 0.3 * error_by_weights


def balanced_partitions(items, size):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = [h for h in rest if h not in others]
        for tail in balanced_partitions(remaining, size):
            yield [[first, *others], *tail]


def head_parts(w, num_heads, x):
    """Per head, K and V as clustering sees them: the weights, or their activations on x."""
    parts = []
    for p in ("k", "v"):
        y = w[p + "_w"] if x is None else torch.nn.functional.linear(x, w[p + "_w"], w.get(p + "_b")).T
        parts.append(y.reshape(num_heads, -1))
    return parts


def pooling_error(parts, groups):
    """What clustering minimises: the squared error mean-pooling makes on K and on V, each relative to the
    total squared norm of K or V."""
    total = 0.0
    for y in parts:
        err = sum((y[g] - y[g].mean(dim=0)).pow(2).sum() for g in groups)
        total += (err / y.pow(2).sum()).item()
    return total


@pytest.mark.parametrize("num_kv_heads", [2, 4])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("use_activations", [False, True], ids=["weights", "activations"])
def test_clustering_is_optimal_on_small_cases(num_kv_heads, seed, use_activations):
    num_heads, hidden = 8, 12
    w = random_layer(num_heads, 3, hidden, bias=use_activations, seed=100 + seed)
    x = hidden_states(1, 30, hidden, seed=seed) if use_activations else None
    got = convert_layer(w, num_heads, num_kv_heads, "clustered", calibration=x, seed=seed)
    parts = head_parts(w, num_heads, None if x is None else x[0])
    best = min(
        pooling_error(parts, groups)
        for groups in balanced_partitions(list(range(num_heads)), num_heads // num_kv_heads)
    )
    assert pooling_error(parts, got.groups) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("tokens", [5, 100], ids=["few_tokens", "qr"])
def test_activation_distances(tokens):
    """Both routes to the heads' distances on activations (the rows themselves, or R of a QR when there are
    more rows than columns) give ||X_i - X_j||^2 / ||X||^2 summed over K and V."""
    num_heads, head_dim, hidden = 5, 3, 10
    w = random_layer(num_heads, head_dim, hidden, bias=True, seed=4)
    x = hidden_states(1, tokens, hidden)[0]
    d2 = convert._head_distances(w["k_w"], w["v_w"], w["k_b"], w["v_b"], num_heads, x)
    expected = torch.zeros(num_heads, num_heads, dtype=F64)
    for p in ("k", "v"):
        y = torch.nn.functional.linear(x, w[p + "_w"], w[p + "_b"]).reshape(tokens, num_heads, head_dim)
        diff = y[:, :, None] - y[:, None, :]
        expected += diff.pow(2).sum(dim=(0, 3)) / y.pow(2).sum()
    assert torch.allclose(d2, expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_kv_heads=3), r"num_kv_heads \(3\) must divide num_heads \(8\)"),
        (dict(num_kv_heads=0), "num_kv_heads must be a positive int"),
        (dict(strategy="nearest"), "strategy must be one of"),
        (dict(k_w=torch.zeros(32, 17, dtype=F64)), "k_w must have q_w's shape"),
        (dict(v_w=torch.zeros(16, 16, dtype=F64)), "v_w must have q_w's shape"),
        (dict(o_w=torch.zeros(16, 30, dtype=F64)), "o_w must have num_heads \\* head_dim = 32 columns"),
        (dict(q_w=torch.zeros(30, 16, dtype=F64)), "q_w has 30 rows, not a multiple of num_heads"),
        (dict(head_dim=3), r"q_w has 32 rows, but num_heads \* head_dim = 8 \* 3"),
        (dict(k_b=torch.zeros(31, dtype=F64)), r"k_b must have shape \(32,\)"),
        (dict(q_w=torch.zeros(32, 16, dtype=torch.long)), "q_w must be a 2-D floating-point tensor"),
        (dict(calibration=torch.zeros(2, 5, 15, dtype=F64)), "calibration must be hidden states"),
    ],
)
def test_bad_arguments(change, match):
    w = random_layer(8, 4, 16)
    args = dict(q_w=w["q_w"], k_w=w["k_w"], v_w=w["v_w"], o_w=w["o_w"], num_heads=8, num_kv_heads=2)
    args["strategy"] = "clustered"
    args.update(change)
    with pytest.raises(ValueError, match=match):
        mha_to_gqa(**args)


# ---------------------------------------------------------------- Hugging Face models


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def tiny_llama(transformers, *, heads=8, kv_heads=8, bias=False, attn="sdpa", seed=0):
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        vocab_size=101,
        intermediate_size=128,
        attention_bias=bias,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    return model


def token_ids(batch, seqlen, seed=0):
    return torch.randint(101, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_convert_model_runs_and_generates(transformers, attn):
    model = tiny_llama(transformers, attn=attn)
    report = convert_model(model, 2, "clustered", calibration=token_ids(3, 24), seed=1)
    assert model.config.num_key_value_heads == 2
    assert report.num_kv_heads == 2 and report.strategy == "clustered" and len(report.groups) == 2
    for layer, groups, err in zip(model.model.layers, report.groups, report.errors, strict=True):
        attn_mod = layer.self_attn
        assert attn_mod.k_proj.weight.shape == (16, 64) and attn_mod.v_proj.weight.shape == (16, 64)
        assert attn_mod.q_proj.weight.shape == (64, 64) and attn_mod.num_key_value_groups == 4
        check_partition(groups, 8, 2)
        assert isinstance(err, float) and 0 < err < 1
    assert report.mean_error == pytest.approx(sum(report.errors) / 2)

    ids = token_ids(2, 10, seed=5)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 10, 101) and torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :10], ids)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_convert_model_computes_the_pooled_model(transformers, bias):
    """The converted model's logits are those of the original with each group's K/V heads averaged in place."""
    model = tiny_llama(transformers, bias=bias, seed=3)
    reference = copy.deepcopy(model)
    report = convert_model(model, 2, "random", seed=4)
    assert report.errors == [None, None] and report.mean_error is None
    assert any(g != [[0, 1, 2, 3], [4, 5, 6, 7]] for g in report.groups)
    with torch.no_grad():
        for layer, groups in zip(reference.model.layers, report.groups, strict=True):
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                for t in (proj.weight, proj.bias):
                    if t is not None:
                        heads = t.view(8, 8, *t.shape[1:])
                        for g in groups:
                            heads[g] = heads[g].mean(dim=0, keepdim=True)
    ids = token_ids(2, 12, seed=6)
    with torch.no_grad():
        got, expected = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_convert_model_without_grouping_keeps_the_logits(transformers, strategy):
    model = tiny_llama(transformers, bias=True, seed=1)
    ids = token_ids(2, 12, seed=2)
    with torch.no_grad():
        before = model(ids).logits
    report = convert_model(model, 8, strategy, calibration=ids)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-6, atol=1e-6)
    assert all(e < 1e-6 for e in report.errors)


def test_convert_model_errors(transformers):
    with pytest.raises(ValueError, match="must be multi-head"):
        convert_model(tiny_llama(transformers, kv_heads=4), 2)
    model = tiny_llama(transformers)
    before = model.model.layers[0].self_attn.k_proj.weight.clone()
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(8\)"):
        convert_model(model, 3)
    with pytest.raises(ValueError, match="strategy must be one of"):
        convert_model(model, 2, "neighbours")
    with pytest.raises(ValueError, match="calibration must be input ids"):
        convert_model(model, 2, "clustered", calibration=torch.zeros(2, 3, 64))
    assert model.config.num_key_value_heads == 8
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, before)


def test_cli_convert(transformers, tmp_path, capsys):
    from gqa_ext.__main__ import main

    src, dst = str(tmp_path / "mha"), str(tmp_path / "gqa")
    tiny_llama(transformers).save_pretrained(src)
    argv = ["convert", src, dst, "--num-kv-heads", "2", "--strategy", "clustered", "--calibration-tokens", "64"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean relative error" in printed

    model = transformers.AutoModelForCausalLM.from_pretrained(dst)
    assert model.config.num_key_value_heads == 2
    assert model.model.layers[1].self_attn.k_proj.weight.shape == (16, 64)
    with open(os.path.join(dst, "gqa_conversion.json")) as f:
        record = json.load(f)
    assert record["strategy"] == "clustered" and record["num_kv_heads"] == 2 and record["seed"] == 0
    assert record["calibration_shape"] == [1, 64]
    assert len(record["groups"]) == 2 and len(record["errors"]) == 2
    for groups in record["groups"]:
        check_partition(groups, 8, 2)
    assert all(0 < e < 1 for e in record["errors"])

    assert main(["convert", src, str(tmp_path / "bad"), "--num-kv-heads", "3"]) == 2
    assert "must divide" in capsys.readouterr().err


def test_cli_convert_calibrates_on_text(transformers, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from gqa_ext.__main__ import main

    src, dst = str(tmp_path / "mha"), str(tmp_path / "gqa")
    tiny_llama(transformers).save_pretrained(src)
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(100)}}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]").save_pretrained(src)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"w{(7 * i) % 100}" for i in range(300)))

    argv = ["convert", src, dst, "--num-kv-heads", "4", "--strategy", "random", "--seed", "3"]
    assert main([*argv, "--calibration", str(text), "--calibration-tokens", "200"]) == 0
    capsys.readouterr()
    with open(os.path.join(dst, "gqa_conversion.json")) as f:
        record = json.load(f)
    assert record["calibration"] == str(text) and record["calibration_shape"] == [1, 128]
    assert record["seed"] == 3 and all(0 < e < 1 for e in record["errors"])
    assert transformers.AutoTokenizer.from_pretrained(dst)("w5 w6")["input_ids"] == [6, 7]


def test_cli_convert_without_transformers(monkeypatch, tmp_path, capsys):
    from gqa_ext.__main__ import main

    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--num-kv-heads", "2"]) == 2
    assert 'pip install "gqa_ext[transformers]"' in capsys.readouterr().err
