"""Hooks for the tests: force the CUDA forward's heuristic choices.

The CUDA forward picks a split-KV count and whether to pack the query heads of
a group into the rows of a tile from the shape and the GPU. Tests force each
choice so that every path runs on small shapes. CPU ops ignore these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gqa_ext import _C


@contextlib.contextmanager
def forced_cuda_forward(num_splits: int | None = None, pack_gqa: bool | None = None) -> Iterator[None]:
    """Within the block, CUDA forwards use these choices instead of the heuristics.

    Args:
        num_splits: split the keys of every (batch, head, row block) into this
            many parts (capped at the number of key blocks); None: heuristic.
        pack_gqa: fold the query heads of a group into the rows of a tile
            (True) or give each query head its own tiles (False); None: heuristic.
    """
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
    _C._set_forward_overrides(num_splits or 0, -1 if pack_gqa is None else int(pack_gqa))
    try:
        yield
    finally:
        _C._set_forward_overrides(0, -1)
