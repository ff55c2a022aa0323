"""gqa_ext: grouped query attention for PyTorch.

Importing it registers the ``torch.ops.gqa.*`` ops (forward, backward, their
variable-length forms, forward_kvcache and merge_states) with their fake
kernels (torch.compile) and autograd, and exposes the Python API:
:func:`attention`, :func:`attention_varlen`, :func:`attention_kvcache` and
:func:`merge_states`. Built on them: :mod:`gqa_ext.nn` (the
``GroupedQueryAttention`` layer and its ``KVCache``), :mod:`gqa_ext.convert`
(multi-head checkpoints to GQA) and :mod:`gqa_ext.integrations.transformers`
(``attn_implementation="gqa_ext"``; imported on its own, as it needs transformers).
"""

from __future__ import annotations

import torch


def _load_native():
    """Import gqa_ext._C after checking it was built against this torch."""
    try:
        from gqa_ext import _build_config
    except ImportError as e:
        raise ImportError(
            f"gqa_ext's native module is not built in {__path__[0]}. Install the package with "
            "`pip install .` (or `pip install --no-build-isolation .` to build against the torch already "
            "installed); if it is installed, this is the source tree shadowing it: run from another directory."
        ) from e
    if torch.__version__ != _build_config.TORCH_VERSION:
        # Loading _C now would fail with an undefined symbol, or worse, load.
        raise ImportError(
            f"gqa_ext was built against torch {_build_config.TORCH_VERSION}, but torch {torch.__version__} "
            "is installed; the two must be the same release. Rebuild gqa_ext against the installed torch "
            f"with `pip install --no-build-isolation .`, or install torch {_build_config.TORCH_VERSION}."
        )
    from gqa_ext import _C

    return _C, _build_config.VERSION


_C, __version__ = _load_native()

# _ops registers the fake kernels and autograd.
from gqa_ext import _ops, convert, nn  # noqa: E402, F401
from gqa_ext.api import attention, attention_kvcache, attention_varlen, merge_states  # noqa: E402
from gqa_ext.reference import attention_ref  # noqa: E402


def build_info() -> dict:
    """What this build contains: versions, CUDA archs, whether the CUDA kernels are in."""
    return dict(_C.build_info())


__all__ = [
    "attention",
    "attention_kvcache",
    "attention_varlen",
    "attention_ref",
    "build_info",
    "convert",
    "merge_states",
    "nn",
    "__version__",
]
