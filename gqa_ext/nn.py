"""``torch.nn`` building blocks on top of gqa_ext's ops.

:class:`GroupedQueryAttention` is an attention layer with q/k/v/o projections
(named as in Hugging Face's Llama, so that weights load by name), optional
rotary position embeddings, and three ways to run: dense batches
(:func:`gqa_ext.attention`), packed batches of different lengths
(:func:`gqa_ext.attention_varlen`), and incremental decoding over a
:class:`KVCache` (:func:`gqa_ext.attention_kvcache`, contiguous or paged).
All three work under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gqa_ext.api import attention, attention_kvcache, attention_varlen

__all__ = ["GroupedQueryAttention", "KVCache", "RotaryEmbedding"]


def _check_positive_int(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoPE) as in LLaMA and Hugging Face's ``apply_rotary_pos_emb``.

    Dimension ``i < D/2`` of a head is paired with dimension ``i + D/2`` (the
    "rotate_half" layout), and the pair at position ``p`` is rotated by the
    angle ``p * theta ** (-2i / D)``. The rotation runs in float32 and the
    result is cast back to the input's dtype. It has no parameters or buffers:
    the frequencies are recomputed in float32 on each call, so that
    ``module.to(torch.bfloat16)`` cannot round them.

    Args:
        head_dim: D, even.
        theta: the base of the frequencies (``rope_theta`` in Hugging Face
            configs). Only the plain schedule is implemented (``rope_type``
            "default"), no scaling (Llama 3's "llama3", YaRN, ...).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        _check_positive_int("RotaryEmbedding", "head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even to pair dimensions, got {head_dim}")
        if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and math.isfinite(theta) and theta > 0):
            raise ValueError(f"RotaryEmbedding: theta must be a finite float > 0, got {theta!r}")
        self.head_dim = head_dim
        self.theta = float(theta)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles, float32, of shape ``(*positions.shape, D)``."""
        # Computed as Hugging Face does (float32 powers of theta), so that
        # converted models rotate by the same float32 angles.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        angles = positions.float().unsqueeze(-1) * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotates queries and keys by their positions.

        Args:
            q: (..., S, Hq, D) queries.
            k: (..., S, Hkv, D) keys.
            positions: integer positions of the S tokens, broadcastable to
                q's and k's leading dims ``(..., S)``: (S,) for the same
                positions in every sequence, (B, S) per sequence.

        Returns:
            The rotated q and k, new tensors in q's and k's dtypes.
        """
        cos, sin = self.cos_sin(positions)
        # One (..., S, 1, D) angle table, broadcast over the heads.
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


@dataclass
class KVCache:
    """The keys and values of a batch of sequences being decoded, and their lengths.

    Contiguous (``block_table`` None): ``k`` and ``v`` are (B, Smax, Hkv, D)
    and sequence ``b`` holds its positions in ``k[b]``. Paged: ``k`` and ``v``
    are a pool (num_blocks, block_size, Hkv, D) and ``block_table`` (B,
    max_blocks) int32 maps position ``p`` of sequence ``b`` to row
    ``p % block_size`` of block ``block_table[b, p // block_size]``; blocks
    may be shared by several caches (see :meth:`narrow`).

    ``seqlens`` (B,) int32 counts the positions each sequence holds; a forward
    with ``kv_cache=`` appends after them and advances them in place. The
    tensors are used in place, never replaced, so a compiled function that
    takes the cache sees and makes every change.

    Build one with :meth:`contiguous`, :meth:`paged` or
    :meth:`GroupedQueryAttention.new_kv_cache`; the plain constructor takes
    tensors of your own.
    """

    k: Tensor
    v: Tensor
    seqlens: Tensor
    block_table: Tensor | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.k, Tensor) and isinstance(self.v, Tensor) and isinstance(self.seqlens, Tensor)):
            raise TypeError("KVCache: k, v and seqlens must be tensors")
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(
                "KVCache: k and v must be 4-D tensors of the same shape, (B, Smax, Hkv, D) or "
                f"(num_blocks, block_size, Hkv, D), got {tuple(self.k.shape)} and {tuple(self.v.shape)}"
            )
        if self.k.dtype != self.v.dtype or self.k.device != self.v.device:
            raise ValueError(
                f"KVCache: k and v must have the same dtype and device, got {self.k.dtype} on {self.k.device} "
                f"and {self.v.dtype} on {self.v.device}"
            )
        if self.seqlens.dtype != torch.int32 or self.seqlens.dim() != 1 or self.seqlens.device != self.k.device:
            raise ValueError(
                f"KVCache: seqlens must be a 1-D int32 tensor on {self.k.device}, got {self.seqlens.dtype} "
                f"of shape {tuple(self.seqlens.shape)} on {self.seqlens.device}"
            )
        if self.block_table is None:
            if self.k.shape[0] != self.seqlens.shape[0]:
                raise ValueError(
                    f"KVCache: a contiguous cache holds one row of k and v per sequence: k has "
                    f"{self.k.shape[0]}, seqlens {self.seqlens.shape[0]}"
                )
        else:
            table = self.block_table
            if (
                table.dtype != torch.int32
                or table.dim() != 2
                or table.shape[0] != self.seqlens.shape[0]
                or table.device != self.k.device
            ):
                raise ValueError(
                    f"KVCache: block_table must be an int32 tensor (B, max_blocks) with B = "
                    f"{self.seqlens.shape[0]} (seqlens' length) on {self.k.device}, got {table.dtype} of shape "
                    f"{tuple(table.shape)} on {table.device}"
                )

    @classmethod
    def contiguous(
        cls,
        batch: int,
        max_seqlen: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty contiguous cache: k and v (batch, max_seqlen, num_kv_heads, head_dim), zeros."""
        sizes = {"batch": batch, "max_seqlen": max_seqlen, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, value in sizes.items():
            _check_positive_int("KVCache.contiguous", name, value)
        shape = (batch, max_seqlen, num_kv_heads, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(batch, dtype=torch.int32, device=device),
        )

    @classmethod
    def paged(
        cls,
        batch: int,
        max_seqlen: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        block_table: Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty paged cache of ``num_blocks`` blocks of ``block_size`` positions, zeros.

        Each sequence gets ``ceil(max_seqlen / block_size)`` blocks: by
        default blocks ``b * n`` to ``b * n + n - 1`` for sequence ``b`` (n
        blocks each), or those of ``block_table``, (batch, n) block indices
        below ``num_blocks`` (read once here to check them). ``num_blocks``
        defaults to ``batch * n``; give more to leave blocks free.
        """
        sizes = {"batch": batch, "max_seqlen": max_seqlen, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, value in sizes.items():
            _check_positive_int("KVCache.paged", name, value)
        _check_positive_int("KVCache.paged", "block_size", block_size)
        blocks_per_seq = -(-max_seqlen // block_size)
        if num_blocks is None:
            num_blocks = batch * blocks_per_seq
        _check_positive_int("KVCache.paged", "num_blocks", num_blocks)
        if block_table is None:
            if num_blocks < batch * blocks_per_seq:
                raise ValueError(
                    f"KVCache.paged: {batch} sequences of {blocks_per_seq} blocks need {batch * blocks_per_seq} "
                    f"blocks, got num_blocks = {num_blocks}"
                )
            block_table = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device=device)
            block_table = block_table.view(batch, blocks_per_seq)
        else:
            if tuple(block_table.shape) != (batch, blocks_per_seq):
                raise ValueError(
                    f"KVCache.paged: block_table must have shape (batch, ceil(max_seqlen / block_size)) = "
                    f"{(batch, blocks_per_seq)}, got {tuple(block_table.shape)}"
                )
            if block_table.numel() and not (0 <= int(block_table.min()) and int(block_table.max()) < num_blocks):
                raise ValueError(f"KVCache.paged: block_table entries must be in [0, num_blocks = {num_blocks})")
            block_table = block_table.to(dtype=torch.int32, device=device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(batch, dtype=torch.int32, device=block_table.device),
            block_table,
        )

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def capacity(self) -> int:
        """Positions each sequence can hold: Smax, or the block table's columns times block_size."""
        if self.block_table is None:
            return self.k.shape[1]
        return self.block_table.shape[1] * self.k.shape[1]

    def reset(self) -> None:
        """Empties every sequence (sets seqlens to 0; the old keys and values stay, unread)."""
        self.seqlens.zero_()

    def narrow(self, start: int, length: int) -> KVCache:
        """Sequences ``start`` to ``start + length - 1`` as a cache of their own, sharing this one's tensors.

        Appending through it writes into this cache and advances these
        sequences' seqlens here too. It is how sequences of different lengths
        get their prompts: prefill each one through its own narrow cache,
        then decode the whole batch.
        """
        seqlens = self.seqlens.narrow(0, start, length)
        if self.block_table is None:
            return KVCache(self.k.narrow(0, start, length), self.v.narrow(0, start, length), seqlens)
        return KVCache(self.k, self.v, seqlens, self.block_table.narrow(0, start, length))


class GroupedQueryAttention(nn.Module):
    """Grouped query attention with input and output projections.

    Query head ``h`` attends with key/value head ``h // (num_heads //
    num_kv_heads)``; ``num_kv_heads == num_heads`` is multi-head attention,
    ``num_kv_heads == 1`` multi-query attention.

    Args:
        embed_dim: E, the size of the input and output features.
        num_heads: Hq, the query heads.
        num_kv_heads: Hkv, the key/value heads, a divisor of Hq; default Hq.
        head_dim: D; default ``embed_dim // num_heads`` (which must then
            divide exactly).
        bias: whether all four projections have a bias (Llama's
            ``attention_bias``).
        rope_theta: the base of rotary position embeddings
            (:class:`RotaryEmbedding`) applied to queries and keys, e.g.
            10000.0; None for no rotary embeddings.
        causal: whether a token sees only itself and the tokens before it.
        window: ``(left, right)``: a token sees the ones at most ``left``
            positions before it and ``right`` after it; -1 is unbounded. With
            ``causal``, right must be 0 or -1.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        softmax_scale: multiplies the scores; default ``1 / sqrt(D)``.
        device, dtype: of the projections' parameters.

    Attributes:
        q_proj, k_proj, v_proj: ``nn.Linear`` E -> Hq*D, Hkv*D, Hkv*D.
        o_proj: ``nn.Linear`` Hq*D -> E.
        rotary: the :class:`RotaryEmbedding`, or None.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        rope_theta: float | None = None,
        causal: bool = True,
        window: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        softmax_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = "GroupedQueryAttention"
        _check_positive_int(name, "embed_dim", embed_dim)
        _check_positive_int(name, "num_heads", num_heads)
        if num_kv_heads is None:
            num_kv_heads = num_heads
        _check_positive_int(name, "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{name}: num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(
                    f"{name}: embed_dim = {embed_dim} is not a multiple of num_heads = {num_heads}; "
                    "pass head_dim explicitly"
                )
            head_dim = embed_dim // num_heads
        _check_positive_int(name, "head_dim", head_dim)
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"{name}: rotary embeddings (rope_theta) need an even head_dim, got {head_dim}")
        if not (
            isinstance(window, (tuple, list))
            and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
        ):
            raise ValueError(f"{name}: window must be a (left, right) pair of ints >= -1, got {window!r}")
        if causal and window[1] not in (-1, 0):
            raise ValueError(
                f"{name}: causal=True already limits the window's right side to 0, got window = {tuple(window)}"
            )
        if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
            raise ValueError(f"{name}: softcap must be a finite float >= 0, got {softcap!r}")
        if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
            raise ValueError(f"{name}: softmax_scale must be a finite float or None, got {softmax_scale!r}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = bool(causal)
        self.window = (int(window[0]), int(window[1]))
        self.softcap = float(softcap)
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.rotary = None if rope_theta is None else RotaryEmbedding(head_dim, rope_theta)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, window={self.window}, softcap={self.softcap}"
        )

    def new_kv_cache(self, batch: int, max_seqlen: int, *, block_size: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this layer, on its parameters' device and dtype.

        Contiguous if ``block_size`` is None, else paged with one run of
        blocks per sequence (see :meth:`KVCache.paged`).
        """
        weight = self.k_proj.weight
        shape = (batch, max_seqlen, self.num_kv_heads, self.head_dim)
        if block_size is None:
            return KVCache.contiguous(*shape, dtype=weight.dtype, device=weight.device)
        return KVCache.paged(*shape, block_size=block_size, dtype=weight.dtype, device=weight.device)

    def forward(
        self,
        x: Tensor,
        *,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Attention of the tokens in ``x``, in one of three modes.

        - Dense: x (B, S, E), B sequences of S tokens each, at positions
          0 to S - 1. Differentiable.
        - Packed: x (T, E) with ``cu_seqlens`` (B + 1) int32 on x's device and
          ``max_seqlen``: sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b +
          1]`` (empty sequences allowed) and its positions start at 0. Rows
          past ``cu_seqlens[-1]`` are not attended; their output is
          undefined. Differentiable.
        - Decoding: x (B, S, E) with ``kv_cache``: the S new tokens of each
          sequence come after the ``kv_cache.seqlens[b]`` it holds, at
          positions ``seqlens[b]`` to ``seqlens[b] + S - 1``. Their keys and
          values are written into the cache, they attend over the cached
          tokens and each other, and ``kv_cache.seqlens`` advances by S in
          place. This equals the dense forward of the whole sequences (at
          these rows) when no token sees later ones (``causal``, or a window
          with right = 0). Not differentiable: run it under
          ``torch.no_grad()`` or ``torch.inference_mode()``. Outside
          ``torch.compile`` an append past the cache's capacity raises
          (checking reads seqlens, a device sync); under compile it is not
          checked here.

        Args:
            x: the tokens' features, (B, S, E) or, packed, (T, E).
            position_ids: integer rotary positions of shape x.shape[:-1],
                replacing the default ones above (e.g. for left-padded
                batches). Ignored without rotary embeddings.
            cu_seqlens, max_seqlen: the packed mode's sequence offsets and the
                longest sequence's length.
            kv_cache: the decoding mode's cache.

        Returns:
            The output, x's shape and dtype.
        """
        name = "GroupedQueryAttention"
        packed = cu_seqlens is not None
        if packed and kv_cache is not None:
            raise ValueError(f"{name}: pass cu_seqlens (packed sequences) or kv_cache (decoding), not both")
        if packed != (max_seqlen is not None):
            raise ValueError(f"{name}: cu_seqlens and max_seqlen go together: pass both or neither")
        expected = "(T, E) with cu_seqlens" if packed else "(B, S, E)"
        if x.dim() != (2 if packed else 3) or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{name}: x must be {expected} with E = embed_dim = {self.embed_dim}, got shape {tuple(x.shape)}"
            )
        if position_ids is not None and position_ids.shape != x.shape[:-1]:
            raise ValueError(
                f"{name}: position_ids must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                f"got {tuple(position_ids.shape)}"
            )
        # unflatten is a view: the ops take (..., S, H, D) with any strides but the last.
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        options = {
            "causal": self.causal,
            "window": self.window,
            "softcap": self.softcap,
            "softmax_scale": self.softmax_scale,
        }
        if packed:
            if self.rotary is not None:
                if position_ids is None:
                    position_ids = _packed_positions(cu_seqlens, x.shape[0])
                q, k = self.rotary(q, k, position_ids)
            out = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)
        elif kv_cache is not None:
            self._check_cache(kv_cache, q, k, v)
            seqlen = x.shape[1]
            if self.rotary is not None:
                if position_ids is None:
                    steps = torch.arange(seqlen, device=kv_cache.seqlens.device)
                    position_ids = kv_cache.seqlens.unsqueeze(1) + steps
                q, k = self.rotary(q, k, position_ids)
            out = attention_kvcache(
                q,
                kv_cache.k,
                kv_cache.v,
                k,
                v,
                cache_seqlens=kv_cache.seqlens,
                block_table=kv_cache.block_table,
                **options,
            )
            kv_cache.seqlens.add_(seqlen)
        else:
            if self.rotary is not None:
                if position_ids is None:
                    position_ids = torch.arange(x.shape[1], device=x.device)
                q, k = self.rotary(q, k, position_ids)
            out = attention(q, k, v, **options)
        return self.o_proj(out.flatten(-2))

    def _check_cache(self, cache: KVCache, q: Tensor, k: Tensor, v: Tensor) -> None:
        name = "GroupedQueryAttention"
        if not isinstance(cache, KVCache):
            raise TypeError(f"{name}: kv_cache must be a gqa_ext.nn.KVCache, got {type(cache).__name__}")
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            # forward_kvcache has no backward: gradients would silently be missing.
            raise RuntimeError(
                f"{name}: decoding with a KV cache has no backward; run it under torch.no_grad() or "
                "torch.inference_mode()"
            )
        if (cache.num_kv_heads, cache.head_dim) != (self.num_kv_heads, self.head_dim) or cache.k.dtype != k.dtype:
            raise ValueError(
                f"{name}: the KV cache holds {cache.num_kv_heads} heads of {cache.head_dim} in {cache.k.dtype}, "
                f"this layer needs {self.num_kv_heads} heads of {self.head_dim} in {k.dtype}"
            )
        if cache.batch_size != q.shape[0]:
            raise ValueError(f"{name}: the KV cache holds {cache.batch_size} sequences, x has {q.shape[0]}")
        if not torch.compiler.is_compiling():
            # Reads seqlens on the host; under compile this would break the
            # graph, and the op checks positions itself on the CPU (and on CUDA
            # with GQA_EXT_CHECK_INDICES=1).
            seqlen = q.shape[1]
            over = (cache.seqlens + seqlen > cache.capacity).nonzero()
            if over.numel():
                b = int(over[0, 0])
                raise IndexError(
                    f"{name}: appending {seqlen} tokens overflows the KV cache: sequence {b} holds "
                    f"{int(cache.seqlens[b])} of its {cache.capacity} positions"
                )


def _packed_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of each of the ``total`` packed rows within its sequence, (total,) int64, without a host sync."""
    rows = torch.arange(total, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    # The last sequence starting at or before each row is the row's own: with
    # right=True an empty sequence (equal offsets) is skipped.
    seq = torch.searchsorted(cu_seqlens, rows, right=True) - 1
    return rows.long() - cu_seqlens[seq.clamp_min(0)].long()
