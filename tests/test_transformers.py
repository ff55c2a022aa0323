"""attn_implementation="gqa_ext" in HF transformers, on tiny random models (no downloads).

Each model is compared with transformers' own SDPA backend, or with eager
where SDPA lacks a feature (Gemma 2's softcap), and, independently of both,
with itself run one sequence at a time without padding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

transformers = pytest.importorskip("transformers", minversion="5.0")

import gqa_ext  # noqa: E402
import gqa_ext.integrations.transformers as gqa_hf  # noqa: E402
from gqa_ext.reference import attention_ref  # noqa: E402

gqa_hf.register()

VOCAB = 101
SEQLEN = 19


def _llama() -> torch.nn.Module:
    # LLaMA-3-8B's 32/8 heads scaled down to 8/2.
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg)


def _qwen2() -> torch.nn.Module:
    # Qwen2.5-7B's group of 7 (28/4), as 14/2, with q/k/v biases.
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=56,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _gemma2() -> torch.nn.Module:
    # A sliding layer then a global one; the window (6) is shorter than the
    # sequences. Weights 10x larger than the default make scores large enough
    # for the softcap to matter (it changes the logits by ~6%).
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=6,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=24,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    return transformers.Gemma2ForCausalLM(cfg)


# (model factory, the transformers backend to compare with)
MODELS = [
    pytest.param(_llama, "sdpa", id="llama"),
    pytest.param(_qwen2, "sdpa", id="qwen2_group7"),
    pytest.param(_gemma2, "eager", id="gemma2_softcap_window"),
]

# Rows 1 and 2 padded on the chosen side; row 0 is not padded.
PADDINGS = ["left", "right"]


def _model(factory, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def _inputs(padding: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, SEQLEN), generator=g)
    mask = torch.ones(3, SEQLEN, dtype=torch.long)
    for row, pad in ((1, 5), (2, 11)):
        if padding == "left":
            mask[row, :pad] = 0
        else:
            mask[row, SEQLEN - pad :] = 0
    return ids, mask


def _logits(model: torch.nn.Module, impl: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_register_selects_backend():
    model = transformers.AutoModelForCausalLM.from_config(_llama().config, attn_implementation="gqa_ext")
    assert model.config._attn_implementation == "gqa_ext"
    assert transformers.AttentionInterface._global_mapping["gqa_ext"] is gqa_hf.attention_forward
    assert transformers.AttentionMaskInterface._global_mapping["gqa_ext"] is gqa_hf.padding_mask


@pytest.mark.parametrize("factory,baseline", MODELS)
def test_logits_match_unpadded(factory, baseline):
    model = _model(factory)
    ids, _ = _inputs("left")
    ours = _logits(model, "gqa_ext", ids)
    assert rel_err(ours, _logits(model, baseline, ids)) < 1e-5


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("factory,baseline", MODELS)
def test_logits_match_padded(factory, baseline, padding):
    model = _model(factory)
    ids, mask = _inputs(padding)
    ours = _logits(model, "gqa_ext", ids, mask)
    theirs = _logits(model, baseline, ids, mask)
    valid = mask.bool()
    # Padded positions' logits are arbitrary in every backend.
    assert rel_err(ours[valid], theirs[valid]) < 1e-5
    # Independent of the baseline: each row equals that sequence alone,
    # unpadded. Positions restart at 0 for a right-padded row and after the
    # padding for a left-padded one, as transformers numbers them.
    for row in range(ids.shape[0]):
        alone = _logits(model, "gqa_ext", ids[row : row + 1, valid[row]])
        assert rel_err(ours[row, valid[row]], alone[0]) < 1e-5
    # Left padding sits before the tokens, so the mask matters: unmasked
    # attention gives other logits. (Causal attention never sees right padding.)
    if padding == "left":
        assert rel_err(_logits(model, "gqa_ext", ids)[valid], theirs[valid]) > 1e-3


@pytest.mark.parametrize("factory,baseline", MODELS)
def test_greedy_generation_matches(factory, baseline):
    model = _model(factory)
    ids, mask = _inputs("left")
    tokens = {}
    for impl in (baseline, "gqa_ext"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert tokens["gqa_ext"].shape == (3, SEQLEN + 10)
    assert torch.equal(tokens["gqa_ext"], tokens[baseline])


def test_greedy_generation_static_cache():
    # A static cache's keys are longer than the mask; the slots past it are unused.
    model = _model(_llama)
    ids, mask = _inputs("left")
    tokens = {}
    for impl in ("sdpa", "gqa_ext"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            tokens[impl] = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
    assert torch.equal(tokens["gqa_ext"], tokens["sdpa"])


@pytest.mark.parametrize("padding", PADDINGS)
def test_gradients_match_sdpa(padding):
    model = _model(_llama)
    ids, mask = _inputs(padding)
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("sdpa", "gqa_ext"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads["sdpa"].items():
        assert rel_err(grads["gqa_ext"][name], grad) < 1e-4, name


@pytest.mark.parametrize("factory,baseline", MODELS)
@pytest.mark.parametrize("marker", ["position_ids", "cu_seq_lens"])
def test_packed_sequences(factory, baseline, marker):
    # One row holding three sequences, as a flattening data collator makes.
    model = _model(factory)
    model.set_attn_implementation("gqa_ext")
    lengths = [7, 1, 11]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, VOCAB, (1, n), generator=g) for n in lengths]
    kwargs = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    if marker == "cu_seq_lens":
        cu = torch.tensor([0, 7, 8, 19], dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11)
    with torch.no_grad():
        packed = model(torch.cat(seqs, 1), use_cache=False, **kwargs).logits
        alone = torch.cat([model(s).logits for s in seqs], 1)
    assert rel_err(packed, alone) < 1e-5


def test_unpadded_call_copies_and_repeats_nothing():
    # Only the op runs on transformers' (B, H, S, D) tensors: no copy, no
    # contiguous(), no repeat of K/V.
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(2, 8, 13, 16)
    k, v = torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    with OpLog() as log:
        out, weights = gqa_hf.attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None
    assert [op for op in log.ops if op not in ("aten.transpose", "aten.view")] == ["gqa.forward"]
    ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=0.3)
    assert out.shape == (2, 13, 8, 16)
    assert rel_err(out, ref) < 1e-5


def test_errors():
    module = torch.nn.Module()
    module.is_causal = True
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        gqa_hf.attention_forward(module, q, k, k, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="4-D attention mask"):
        gqa_hf.attention_forward(module, q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="attention sinks"):
        gqa_hf.attention_forward(module, q, k, k, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="does not fit"):
        gqa_hf.attention_forward(module, q, k, k, torch.ones(1, 7, dtype=torch.bool))

    from transformers import masking_utils as mu

    def image_block(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < 2

    # A mask overlay the kernels cannot apply is refused, not dropped.
    with pytest.raises(NotImplementedError, match="image_block"):
        gqa_hf.padding_mask(1, 5, 5, mask_function=mu.or_masks(mu.causal_mask_function, image_block))
    assert gqa_hf.padding_mask(1, 5, 5, mask_function=mu.sliding_window_causal_mask_function(3)) is None
    # A 4-D mask passed to the model is refused too.
    model = _model(_llama)
    model.set_attn_implementation("gqa_ext")
    with pytest.raises(NotImplementedError, match="4-D attention mask"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_padding_mask_slices_and_drops_full_masks():
    full = torch.ones(2, 9, dtype=torch.bool)
    assert gqa_hf.padding_mask(2, 1, 9, attention_mask=full) is None
    padded = full.clone()
    padded[1, :3] = False
    assert torch.equal(gqa_hf.padding_mask(2, 1, 9, attention_mask=padded), padded)
    # A sliding-window cache holds the last kv_length keys only: the padding
    # before them does not matter, a hole among them does.
    assert gqa_hf.padding_mask(2, 1, 4, attention_mask=padded) is None
    padded[0, -2] = False
    assert torch.equal(gqa_hf.padding_mask(2, 1, 4, attention_mask=padded), padded[:, -4:])


def test_nn_module_computes_hf_llama_attention():
    # gqa_ext.nn.GroupedQueryAttention takes a Llama layer's weights by name
    # and rotates like transformers' RoPE.
    model = _model(_llama)
    cfg = model.config
    hf_attn = model.model.layers[0].self_attn
    ours = gqa_ext.nn.GroupedQueryAttention(
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        rope_theta=cfg.rope_parameters["rope_theta"],
    )
    ours.load_state_dict(hf_attn.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, SEQLEN, cfg.hidden_size, generator=g)
    positions = torch.arange(SEQLEN)[None].expand(2, -1)
    with torch.no_grad():
        expected, _ = hf_attn(x, position_embeddings=model.model.rotary_emb(x, positions), attention_mask=None)
        assert rel_err(ours(x), expected) < 1e-5


@pytest.mark.parametrize("strategy", ["contiguous", "clustered"])
def test_converted_model_runs_on_gqa_ext(strategy):
    # A multi-head model converted to GQA (gqa_ext.convert) serves through the backend.
    torch.manual_seed(0)
    cfg = _llama().config
    cfg.num_key_value_heads = cfg.num_attention_heads
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids, mask = _inputs("left")
    gqa_ext.convert.convert_model(model, 2, strategy, calibration=ids)
    assert model.config.num_key_value_heads == 2
    valid = mask.bool()
    ours = _logits(model, "gqa_ext", ids, mask)
    assert rel_err(ours[valid], _logits(model, "sdpa", ids, mask)[valid]) < 1e-5
    tokens = {}
    for impl in ("sdpa", "gqa_ext"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens["gqa_ext"], tokens["sdpa"])
