"""``gqa-ext convert``: make a grouped query attention model from a multi-head one.

Ainslie et al. (2023), "GQA: Training Generalized Multi-Query Transformer
Models from Multi-Head Checkpoints" (arXiv:2305.13245), convert a multi-head
checkpoint by splitting its H query heads into Hkv groups of G = H / Hkv and
mean-pooling the key and value projection heads of each group into one KV
head; the model is then uptrained on about 5% of the original pre-training
steps to recover the quality the pooling lost. This module does the
conversion only: uptraining is the user's job.

Which heads share a group matters: later work (AsymGQA, QCQA) reports large
gains from grouping similar heads rather than neighbours. The strategies:

    contiguous  group j is heads j*G .. j*G+G-1 (LLaMA-2's static grouping)
    random      a seeded random partition into groups of G heads
    clustered   groups of G heads whose keys and values are alike, found by
                a balanced k-means (exact swap local search from several
                seeded starts) on the K and V projections, or, given
                calibration inputs, on their activations

The clustered objective is the error mean-pooling makes: the sum over heads
of the squared distance of the head's (K, V) to its group's mean, with K and
V each scaled by their total norm so that both count alike. On calibration
activations X the distance of heads i and j is ||X (W_i - W_j)^T||^2, which
is exactly the error pooling makes on those keys and values.

After grouping, the query heads are reordered so that each group's heads are
contiguous (query head h of the converted model uses KV head h // G, the
layout every GQA kernel, gqa_ext's included, expects), and the output
projection's input columns move with them. Attention is equivariant to a
permutation of the heads when the output projection's columns follow, so the
converted weights compute exactly what the multi-head model computes with
each group's keys and values replaced by their mean.

Each conversion can report a quality proxy: the relative error
||out_gqa - out_mha|| / ||out_mha|| of the attention layer's output on
calibration inputs. :func:`mha_to_gqa` measures it with causal attention and
no positional encoding; rotary embeddings rotate every head's keys the same
way at a position, so mean-pooling commutes with them and the weights' error
is what the proxy sees. :func:`convert_model` measures it by calling each
converted attention module of a Hugging Face model on its own captured inputs.

    gqa-ext convert SRC DST --num-kv-heads N [--strategy contiguous|random|clustered] [--seed S]
                    [--calibration TEXTFILE] [--calibration-tokens N]

converts the causal LM saved in SRC (``save_pretrained`` layout; needs
``transformers``) and saves it, with its tokenizer, and
``gqa_conversion.json`` (the groups and errors of each layer) in DST. The
calibration inputs are the first N tokens of TEXTFILE, or N seeded random
token ids without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gqa_ext.api import attention

STRATEGIES = ("contiguous", "random", "clustered")

# Starts of the clustered search besides the contiguous grouping; each is
# cheap (H is at most a few hundred) and the swap search only finds a local
# optimum.
_KMEANSPP_STARTS = 3
_RANDOM_STARTS = 4


@dataclass(frozen=True, eq=False)
class GQAConversion:
    """The converted weights of one attention layer and the grouping behind them.

    Weights are in ``nn.Linear`` layout, in the converted head order:
    ``q_w`` (H*D, E), ``k_w`` and ``v_w`` (Hkv*D, E), ``o_w`` (E_out, H*D);
    the biases are None where none was given.

    Attributes:
        groups: the original head indices of each new KV head's group, in
            ascending order within a group, groups ordered by their smallest head.
        head_order: the original query head of each new query head (the groups
            concatenated); new query head h uses KV head h // G.
        error: the relative error of the attention output on the calibration
            inputs, against the original weights; None without calibration.
    """

    q_w: Tensor
    k_w: Tensor
    v_w: Tensor
    o_w: Tensor
    q_b: Tensor | None
    k_b: Tensor | None
    v_b: Tensor | None
    groups: list[list[int]]
    head_order: list[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    strategy: str
    error: float | None = None


def mha_to_gqa(
    q_w: Tensor,
    k_w: Tensor,
    v_w: Tensor,
    o_w: Tensor,
    num_heads: int,
    num_kv_heads: int,
    strategy: str = "contiguous",
    *,
    q_b: Tensor | None = None,
    k_b: Tensor | None = None,
    v_b: Tensor | None = None,
    o_b: Tensor | None = None,
    head_dim: int | None = None,
    calibration: Tensor | None = None,
    seed: int = 0,
) -> GQAConversion:
    """Convert one multi-head attention layer's projections to ``num_kv_heads`` KV heads.

    Args:
        q_w, k_w, v_w: the query, key and value projections, (H*D, E) each
            (``nn.Linear.weight``), H = ``num_heads``.
        o_w: the output projection, (E_out, H*D).
        num_heads: H, the query (and key/value) heads of the multi-head layer.
        num_kv_heads: KV heads after conversion; must divide ``num_heads``.
        strategy: ``"contiguous"``, ``"random"`` or ``"clustered"`` (module docstring).
        q_b, k_b, v_b: optional projection biases, (H*D,); k_b and v_b are
            mean-pooled like the weights, q_b is permuted like q_w.
        o_b: optional output bias; unchanged by the conversion, used only for
            the error.
        head_dim: D; default ``q_w.shape[0] // num_heads``.
        calibration: optional hidden states entering the layer, (B, S, E) or
            (S, E). With it, "clustered" groups by the heads' activations
            instead of their weights, and the result carries the error.
        seed: seeds "random" and the starts of "clustered" (a private
            generator; the global RNG is untouched).

    Returns:
        A :class:`GQAConversion`. The new weights have the dtype of the old;
        the means are taken in at least float32.

    Raises:
        ValueError: naming the argument, for head counts that do not divide,
            shapes that do not match, or an unknown strategy.
    """
    w = dict(q_w=q_w, k_w=k_w, v_w=v_w, o_w=o_w, q_b=q_b, k_b=k_b, v_b=v_b, o_b=o_b)
    head_dim = _check_layer(w, num_heads, num_kv_heads, head_dim)
    _check_strategy(strategy)
    if calibration is not None:
        _check_calibration(calibration, q_w.shape[1])
    x = None if calibration is None else calibration.reshape(-1, calibration.shape[-1])
    groups = _make_groups(strategy, w, num_heads, num_kv_heads, x, seed)
    conv = _pool(w, groups, num_heads, head_dim, strategy)
    if calibration is None:
        return conv
    ref = _attention_output(calibration, w, num_heads, num_heads, head_dim)
    new_w = dict(q_w=conv.q_w, k_w=conv.k_w, v_w=conv.v_w, o_w=conv.o_w, q_b=conv.q_b, k_b=conv.k_b, v_b=conv.v_b)
    out = _attention_output(calibration, {**new_w, "o_b": o_b}, num_heads, num_kv_heads, head_dim)
    return dataclasses.replace(conv, error=_relative_error(out, ref))


@dataclass
class ConversionReport:
    """What :func:`convert_model` did: per decoder layer, the groups and the error of the attention output.

    ``errors[i]`` is the relative error of layer i's attention output on the
    calibration inputs (each layer fed the original model's hidden states), or
    None without calibration; ``mean_error`` is their mean.
    """

    strategy: str
    num_heads: int
    num_kv_heads: int
    seed: int
    groups: list[list[list[int]]] = field(default_factory=list)
    errors: list[float | None] = field(default_factory=list)
    mean_error: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def convert_model(
    model: nn.Module,
    num_kv_heads: int,
    strategy: str = "contiguous",
    calibration: Tensor | Mapping[str, Tensor] | None = None,
    *,
    seed: int = 0,
) -> ConversionReport:
    """Convert a multi-head Hugging Face Llama-style causal LM to ``num_kv_heads`` KV heads, in place.

    The model is one whose decoder layers are ``model.model.layers`` with
    ``self_attn.{q,k,v,o}_proj`` ``nn.Linear`` projections (Llama, Mistral,
    Qwen2, ...), with ``config.num_key_value_heads == config.num_attention_heads``.
    Each layer is converted as by :func:`mha_to_gqa`: k_proj and v_proj are
    replaced by smaller ``nn.Linear`` (same dtype, device, bias), q_proj and
    o_proj are permuted in place, and ``num_key_value_groups`` (and
    ``num_key_value_heads`` where the module has it) and
    ``config.num_key_value_heads`` are updated. Any attention implementation
    (eager, sdpa, ...) works: the projections are all that change.

    Args:
        model: the model; left in the training mode it came in.
        num_kv_heads: KV heads after conversion; must divide the query heads.
        strategy: ``"contiguous"``, ``"random"`` or ``"clustered"``.
        calibration: optional input ids (B, S), or a dict of model inputs
            (its ``attention_mask``, if 2-D, selects the tokens used). The
            original model runs once on it; "clustered" groups each layer by
            the activations of its K and V projections on the captured hidden
            states, and every layer reports its error.
        seed: as in :func:`mha_to_gqa`.

    Returns:
        A :class:`ConversionReport`.

    Raises:
        ValueError: for a model that is not multi-head or not Llama-style, or
            bad arguments; the model is then unchanged.
    """
    config = model.config
    num_heads = config.num_attention_heads
    old_kv = getattr(config, "num_key_value_heads", None) or num_heads
    if old_kv != num_heads:
        raise ValueError(
            f"convert_model: the model must be multi-head (num_key_value_heads == num_attention_heads), "
            f"but it has num_attention_heads={num_heads} and num_key_value_heads={old_kv}"
        )
    _check_heads(num_heads, num_kv_heads)
    _check_strategy(strategy)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attns = _attention_modules(model)
    # Every layer is checked before any is changed, so a bad layer leaves the model as it was.
    for attn in attns:
        _check_layer(_module_weights(attn), num_heads, num_kv_heads, head_dim)

    captured = None if calibration is None else _capture(model, attns, calibration)
    report = ConversionReport(strategy=strategy, num_heads=num_heads, num_kv_heads=num_kv_heads, seed=seed)
    was_training = model.training
    model.eval()
    try:
        for i, attn in enumerate(attns):
            x = None
            if captured is not None and strategy == "clustered":
                x = _hidden_states(*captured.inputs[i])
                x = x[captured.tokens] if captured.tokens is not None else x.reshape(-1, x.shape[-1])
            with torch.no_grad():
                w = _module_weights(attn)
                groups = _make_groups(strategy, w, num_heads, num_kv_heads, x, seed)
                conv = _pool(w, groups, num_heads, head_dim, strategy)
                _install(attn, conv)
            report.groups.append(groups)
            report.errors.append(None if captured is None else captured.error(i, attn))
    finally:
        model.train(was_training)
    config.num_key_value_heads = num_kv_heads
    if captured is not None and report.errors:
        report.mean_error = sum(report.errors) / len(report.errors)
    return report


# ---------------------------------------------------------------- checks


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def _check_layer(w: dict, num_heads: int, num_kv_heads: int, head_dim: int | None) -> int:
    """Raises ValueError naming the first bad one of the weights w (q_w, ..., o_b); returns the head dim."""
    _check_heads(num_heads, num_kv_heads)
    q_w, k_w, v_w, o_w, q_b, k_b, v_b, o_b = (w[n] for n in ("q_w", "k_w", "v_w", "o_w", "q_b", "k_b", "v_b", "o_b"))
    for name, t in (("q_w", q_w), ("k_w", k_w), ("v_w", v_w), ("o_w", o_w)):
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            what = f"a {t.dim()}-D {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {what}")
    rows = q_w.shape[0]
    if head_dim is None:
        if rows % num_heads:
            raise ValueError(f"q_w has {rows} rows, not a multiple of num_heads ({num_heads})")
        head_dim = rows // num_heads
    elif rows != num_heads * head_dim:
        raise ValueError(f"q_w has {rows} rows, but num_heads * head_dim = {num_heads} * {head_dim}")
    for name, t in (("k_w", k_w), ("v_w", v_w)):
        if t.shape != q_w.shape:
            raise ValueError(
                f"{name} must have q_w's shape {tuple(q_w.shape)} (a multi-head layer), got {tuple(t.shape)}"
            )
    if o_w.shape[1] != rows:
        raise ValueError(f"o_w must have num_heads * head_dim = {rows} columns, got shape {tuple(o_w.shape)}")
    for name, b, n in (("q_b", q_b, rows), ("k_b", k_b, rows), ("v_b", v_b, rows), ("o_b", o_b, o_w.shape[0])):
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (n,)):
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"{name} must have shape ({n},), got {got}")
    return head_dim


def _check_calibration(x: Tensor, hidden: int) -> None:
    if not isinstance(x, Tensor) or x.dim() not in (2, 3) or x.shape[-1] != hidden or x.numel() == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"calibration must be hidden states (B, S, {hidden}) or (S, {hidden}), got {got}")


# ---------------------------------------------------------------- grouping


def _canonical(groups: list[list[int]]) -> list[list[int]]:
    return sorted((sorted(int(h) for h in g) for g in groups), key=lambda g: g[0])


def _make_groups(
    strategy: str, w: dict, num_heads: int, num_kv_heads: int, x: Tensor | None, seed: int
) -> list[list[int]]:
    """The groups of original heads, canonical: ascending within a group, groups ordered by their first head."""
    size = num_heads // num_kv_heads
    if strategy == "contiguous" or size == 1 or num_kv_heads == 1:
        return [list(range(j * size, (j + 1) * size)) for j in range(num_kv_heads)]
    gen = torch.Generator().manual_seed(seed)
    if strategy == "random":
        perm = torch.randperm(num_heads, generator=gen).tolist()
        return _canonical([perm[j * size : (j + 1) * size] for j in range(num_kv_heads)])
    d2 = _head_distances(w["k_w"], w["v_w"], w["k_b"], w["v_b"], num_heads, x)
    labels = _balanced_kmeans(d2, num_kv_heads, gen)
    return _canonical([torch.nonzero(labels == j).flatten().tolist() for j in range(num_kv_heads)])


def _head_features(w: Tensor, b: Tensor | None, num_heads: int, x: Tensor | None, with_bias: bool) -> Tensor:
    """(H, F) float64: each head's projection, as weights or as what it does to x."""
    w = w.detach().to(torch.float64)
    if with_bias:
        # A bias acts as a weight column on a constant input of 1.
        bias = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b.detach().to(w)
        w = torch.cat([w, bias[:, None]], dim=1)
    if x is None:
        return w.reshape(num_heads, -1)
    n, e = x.shape
    if n > e:
        # ||X dW^T|| = ||R dW^T|| for X = QR: the same distances from an (E, E) factor instead of N rows.
        r = torch.linalg.qr(x, mode="r").R
        return (w @ r.T).reshape(num_heads, -1)
    return (x @ w.T).reshape(n, num_heads, -1).transpose(0, 1).reshape(num_heads, -1)


def _head_distances(k_w, v_w, k_b, v_b, num_heads: int, x: Tensor | None) -> Tensor:
    """(H, H) float64 squared distances of the heads' (K, V), each of K and V scaled by its total norm."""
    with_bias = k_b is not None or v_b is not None
    if x is not None:
        x = x.detach().to(device=k_w.device, dtype=torch.float64)
        if with_bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    d2 = torch.zeros(num_heads, num_heads, dtype=torch.float64, device=k_w.device)
    for w, b in ((k_w, k_b), (v_w, v_b)):
        feats = _head_features(w, b, num_heads, x, with_bias)
        gram = feats @ feats.T
        sq = gram.diagonal()
        part = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0).fill_diagonal_(0)
        total = sq.sum()
        d2 += part / total if total > 0 else part
    return d2.cpu()


def _grouping_cost(d2: Tensor, labels: Tensor, size: int) -> float:
    """Sum over heads of the squared distance to the group mean: (1 / 2G) sum of d2 over pairs in a group."""
    same = labels[:, None] == labels[None, :]
    return (d2 * same).sum().item() / (2 * size)


def _swap_search(d2: Tensor, labels: Tensor, num_groups: int) -> Tensor:
    """Best-improvement swaps of two heads in different groups until none lowers the cost."""
    member = F.one_hot(labels, num_groups).to(d2)  # member[i, g] = 1 iff head i is in group g
    tol = 1e-12 * max(d2.max().item(), 1e-300)
    while True:
        # a[i, j]: sum of d2 from head i to the members of j's group. A matmul rather than indexing a
        # (H, groups) sum by the labels: it is exact (one nonzero term) and many times faster on the CPU.
        a = d2 @ member @ member.T
        own = a.diagonal()
        # G * (the cost change) of swapping heads i and j of different groups.
        delta = a + a.T - own[:, None] - own[None, :] - 2 * d2
        delta.masked_fill_(member @ member.T > 0, math.inf)
        best = int(torch.argmin(delta))
        i, j = divmod(best, d2.shape[0])
        if delta[i, j] >= -tol:
            return member.argmax(dim=1)
        member[[i, j]] = member[[j, i]]


def _kmeanspp_labels(d2: Tensor, num_groups: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding on the heads, then each head to its nearest centre with room, nearest pairs first."""
    n = d2.shape[0]
    size = n // num_groups
    centres = [int(torch.randint(n, (1,), generator=gen))]
    while len(centres) < num_groups:
        nearest = d2[:, centres].min(dim=1).values
        weights = nearest.clone()
        weights[centres] = 0
        if weights.sum() <= 0:  # the other heads all coincide with centres
            weights = torch.ones(n, dtype=d2.dtype)
            weights[centres] = 0
        centres.append(int(torch.multinomial(weights, 1, generator=gen)))
    dist = d2[:, centres]
    labels = [-1] * n
    room = [size] * num_groups
    for flat in torch.argsort(dist.flatten(), stable=True).tolist():
        h, g = divmod(flat, num_groups)
        if labels[h] < 0 and room[g] > 0:
            labels[h] = g
            room[g] -= 1
    return torch.tensor(labels)


def _balanced_kmeans(d2: Tensor, num_groups: int, gen: torch.Generator) -> Tensor:
    """Group labels (H,) minimising :func:`_grouping_cost`, best of several swap-searched starts."""
    n = d2.shape[0]
    size = n // num_groups
    starts = [torch.arange(n) // size]
    starts += [_kmeanspp_labels(d2, num_groups, gen) for _ in range(_KMEANSPP_STARTS)]
    starts += [torch.randperm(n, generator=gen) // size for _ in range(_RANDOM_STARTS)]
    best, best_cost = None, math.inf
    for start in starts:
        labels = _swap_search(d2, start, num_groups)
        cost = _grouping_cost(d2, labels, size)
        # A strict improvement only, so that ties keep the earlier start (contiguous first).
        if cost < best_cost * (1 - 1e-12):
            best, best_cost = labels, cost
    return best


# ---------------------------------------------------------------- pooling


def _pool(w: dict, groups: list[list[int]], num_heads: int, head_dim: int, strategy: str) -> GQAConversion:
    """Query heads and output columns reordered group by group; each group's K and V heads averaged."""
    num_kv_heads, size = len(groups), len(groups[0])
    order = [h for g in groups for h in g]
    q_w, k_w, v_w, o_w, q_b, k_b, v_b = (w[n] for n in ("q_w", "k_w", "v_w", "o_w", "q_b", "k_b", "v_b"))
    idx = torch.tensor(order, device=q_w.device)

    def permute_rows(t: Tensor) -> Tensor:
        return t.detach().reshape(num_heads, head_dim, *t.shape[1:])[idx].reshape(t.shape)

    def mean_pool(t: Tensor) -> Tensor:
        acc = torch.promote_types(t.dtype, torch.float32)
        heads = t.detach().reshape(num_heads, head_dim, *t.shape[1:])[idx].to(acc)
        pooled = heads.reshape(num_kv_heads, size, head_dim, *t.shape[1:]).mean(dim=1)
        return pooled.reshape(num_kv_heads * head_dim, *t.shape[1:]).to(t.dtype)

    o_new = o_w.detach().reshape(o_w.shape[0], num_heads, head_dim)[:, idx].reshape(o_w.shape)
    return GQAConversion(
        q_w=permute_rows(q_w),
        k_w=mean_pool(k_w),
        v_w=mean_pool(v_w),
        o_w=o_new,
        q_b=None if q_b is None else permute_rows(q_b),
        k_b=None if k_b is None else mean_pool(k_b),
        v_b=None if v_b is None else mean_pool(v_b),
        groups=[list(g) for g in groups],
        head_order=order,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        strategy=strategy,
    )


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    den = torch.linalg.vector_norm(e).item()
    num = torch.linalg.vector_norm(a - e).item()
    return num / den if den > 0 else num


def _attention_output(x: Tensor, w: dict, num_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """Causal attention layer output on hidden states x, without positional encoding (module docstring)."""
    # float32 unless the weights are float64, whose exactness the caller may want to see.
    dtype = torch.float64 if w["q_w"].dtype == torch.float64 else torch.float32
    device = w["q_w"].device
    w = {n: None if t is None else t.detach().to(device=device, dtype=dtype) for n, t in w.items()}
    x = x.detach().to(device=device, dtype=dtype)
    if x.dim() == 2:
        x = x[None]
    batch, seqlen, _ = x.shape
    q = F.linear(x, w["q_w"], w["q_b"]).view(batch, seqlen, num_heads, head_dim)
    k = F.linear(x, w["k_w"], w["k_b"]).view(batch, seqlen, num_kv_heads, head_dim)
    v = F.linear(x, w["v_w"], w["v_b"]).view(batch, seqlen, num_kv_heads, head_dim)
    out = attention(q, k, v, causal=True)
    return F.linear(out.reshape(batch, seqlen, -1), w["o_w"], w["o_b"])


# ---------------------------------------------------------------- Hugging Face models


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"convert_model: expected a Llama-style model with decoder layers at model.model.layers, "
            f"got {type(model).__name__}"
        )
    attns = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(
            isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ):
            raise ValueError(
                f"convert_model: layer {i} has no self_attn with nn.Linear q_proj, k_proj, v_proj and o_proj"
            )
        attns.append(attn)
    return attns


def _module_weights(attn: nn.Module) -> dict:
    return {
        f"{p}_{kind}": getattr(getattr(attn, f"{p}_proj"), attr)
        for p in "qkvo"
        for kind, attr in (("w", "weight"), ("b", "bias"))
    }


def _hidden_states(args: tuple, kwargs: dict) -> Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _first(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Captured:
    """Each attention module's inputs and output on the calibration batch, from one run of the original model."""

    def __init__(self, num_layers: int) -> None:
        self.inputs: list[tuple[tuple, dict] | None] = [None] * num_layers
        self.outputs: list[Tensor | None] = [None] * num_layers
        self.tokens: Tensor | None = None  # (B, S) bool: the tokens that count, None for all

    def error(self, i: int, attn: nn.Module) -> float:
        """Relative error of the converted module's output on layer i's captured inputs."""
        args, kwargs = self.inputs[i]
        with torch.no_grad():
            out = _first(attn(*args, **kwargs))
        ref = self.outputs[i]
        if self.tokens is not None:
            out, ref = out[self.tokens], ref[self.tokens]
        return _relative_error(out, ref)


def _capture(model: nn.Module, attns: list[nn.Module], calibration) -> _Captured:
    captured = _Captured(len(attns))
    device = next(model.parameters()).device
    if isinstance(calibration, Mapping):
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in calibration.items()}
        mask = inputs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            captured.tokens = mask.bool()
    elif isinstance(calibration, Tensor) and calibration.dim() == 2 and not calibration.is_floating_point():
        inputs = {"input_ids": calibration.to(device)}
    else:
        got = tuple(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be input ids (B, S) or a dict of model inputs, got {got}")
    # No cache: the captured inputs are replayed on the converted modules, which must not append to one.
    inputs["use_cache"] = False

    def pre_hook(i):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            for name in ("cache", "past_key_values", "past_key_value"):
                if name in kwargs:
                    kwargs[name] = None
            captured.inputs[i] = (args, kwargs)

        return hook

    def post_hook(i):
        def hook(module, args, output):
            captured.outputs[i] = _first(output).detach()

        return hook

    handles = []
    was_training = model.training
    model.eval()
    try:
        for i, attn in enumerate(attns):
            handles.append(attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(attn.register_forward_hook(post_hook(i)))
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [i for i, x in enumerate(captured.inputs) if x is None]
    if missing:
        raise ValueError(f"convert_model: the calibration run did not reach the attention of layers {missing}")
    return captured


def _install(attn: nn.Module, conv: GQAConversion) -> None:
    attn.q_proj.weight.copy_(conv.q_w)
    if conv.q_b is not None:
        attn.q_proj.bias.copy_(conv.q_b)
    attn.o_proj.weight.copy_(conv.o_w)
    attn.k_proj = _smaller_linear(attn.k_proj, conv.k_w, conv.k_b)
    attn.v_proj = _smaller_linear(attn.v_proj, conv.v_w, conv.v_b)
    attn.num_key_value_groups = conv.num_heads // conv.num_kv_heads
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = conv.num_kv_heads


def _smaller_linear(old: nn.Linear, w: Tensor, b: Tensor | None) -> nn.Linear:
    new = nn.Linear(
        old.in_features, w.shape[0], bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    new.weight.copy_(w)
    new.weight.requires_grad_(old.weight.requires_grad)
    if b is not None:
        new.bias.copy_(b)
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gqa-ext convert``."""
    parser.add_argument("src", help="directory of the multi-head causal LM (save_pretrained layout)")
    parser.add_argument("dst", help="directory to save the converted model in")
    parser.add_argument("--num-kv-heads", type=int, required=True, metavar="N", help="KV heads after conversion")
    parser.add_argument("--strategy", choices=STRATEGIES, default="contiguous", help="grouping (default contiguous)")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of random, clustered and random calibration"
    )
    parser.add_argument("--calibration", metavar="TEXTFILE", help="text to calibrate on (default: random tokens)")
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=512,
        metavar="N",
        help="calibration tokens, in sequences of 128 (default 512)",
    )


def _calibration_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> Tensor | str:
    """(B, L) input ids, or an error message."""
    n = args.calibration_tokens
    if args.calibration is None:
        ids = torch.randint(vocab_size, (n,), generator=torch.Generator().manual_seed(args.seed))
    else:
        if tokenizer is None:
            return f"--calibration needs a tokenizer, and none loads from {args.src}"
        with open(args.calibration, encoding="utf-8") as f:
            text = f.read()
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:n]
        if ids.numel() < 2:
            return f"{args.calibration} has {ids.numel()} tokens; calibration needs at least 2"
    length = min(128, ids.numel())
    batch = ids.numel() // length
    return ids[: batch * length].reshape(batch, length)


def run(args: argparse.Namespace) -> int:
    """Converts, saves and prints the per-layer errors; returns the exit status."""
    try:
        import transformers
    except ImportError:
        print('error: gqa-ext convert needs transformers: pip install "gqa_ext[transformers]"', file=sys.stderr)
        return 2
    if args.calibration_tokens < 2:
        print("error: --calibration-tokens must be >= 2", file=sys.stderr)
        return 2
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.src)
    except OSError as e:
        print(f"error: cannot load a causal LM from {args.src}: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.src)
    except (OSError, ValueError):
        tokenizer = None
    ids = _calibration_ids(args, tokenizer, model.config.vocab_size)
    if isinstance(ids, str):
        print(f"error: {ids}", file=sys.stderr)
        return 2
    try:
        report = convert_model(model, args.num_kv_heads, args.strategy, calibration=ids, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(args.dst)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.dst)
    record = {
        "source": os.path.abspath(args.src),
        "calibration": args.calibration or "random token ids",
        "calibration_shape": list(ids.shape),
        **report.to_dict(),
    }
    with open(os.path.join(args.dst, "gqa_conversion.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(
        f"{report.num_heads} -> {report.num_kv_heads} KV heads, strategy {report.strategy}, seed {report.seed}; "
        f"calibration: {record['calibration']} {tuple(ids.shape)}"
    )
    print(f"{'layer':>5}  {'rel. error':>10}  groups")
    for i, (groups, err) in enumerate(zip(report.groups, report.errors, strict=True)):
        print(f"{i:>5}  {err:>10.3e}  " + " ".join("[" + ",".join(map(str, g)) + "]" for g in groups))
    print(f"mean relative error of the attention outputs: {report.mean_error:.3e}")
    print(f"saved to {args.dst} (with gqa_conversion.json); uptrain it before use (Ainslie et al. 2023: ~5% of steps)")
    return 0
