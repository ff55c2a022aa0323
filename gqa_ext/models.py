"""Attention shapes of a few public models, for ``gqa-ext bench`` and ``gqa-ext memory``.

Only what the attention layers need: head counts, head size, layer count and
the Gemma 2 options. Numbers are from each model's published config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The attention of one model: every layer alike (or, for Gemma 2, its local layers)."""

    name: str
    heads_q: int
    heads_kv: int
    head_dim: int
    num_layers: int
    softcap: float = 0.0
    # Our window_left (-1: unbounded): a query sees itself and this many keys before it.
    window: int = -1

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads_q // self.heads_kv

    def kv_bytes_per_token(self, dtype_bytes: int, heads_kv: int | None = None) -> int:
        """Bytes of K and V cached per token over all layers; ``heads_kv`` overrides the model's."""
        heads = self.heads_kv if heads_kv is None else heads_kv
        return self.num_layers * 2 * heads * self.head_dim * dtype_bytes


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama3-8b", heads_q=32, heads_kv=8, head_dim=128, num_layers=32),
        ModelShape("llama3-70b", heads_q=64, heads_kv=8, head_dim=128, num_layers=80),
        # A group of 7: not a power of two.
        ModelShape("qwen2.5-7b", heads_q=28, heads_kv=4, head_dim=128, num_layers=28),
        # Gemma 2 alternates global and local layers; these are the local ones.
        # HF's sliding_window=4096 lets a query see itself and the 4095 keys
        # before it, which is our window_left=4095.
        ModelShape("gemma2-9b", heads_q=16, heads_kv=8, head_dim=256, num_layers=42, softcap=50.0, window=4095),
        # Multi-query attention: one KV head for 71 query heads.
        ModelShape("falcon-7b", heads_q=71, heads_kv=1, head_dim=64, num_layers=32),
    )
}
