"""Sampling kernels and decoders.

- ``sublim.decoding.decoder``: the batched ``Decoder`` (shared-prefix ``PrefixCache``, ``RestrictedGrammar``,
  ``Decoding``, ``common_prefix``), through the fused forward or the model's own.
- ``sublim.decoding.fused``: the fused Llama-family forward and its CPU kernels (numba, OpenBLAS).
- ``sublim.decoding.vllm``: the vLLM backend (a CUDA GPU, extra ``vllm``).

Import from the submodules. The decoder's names are also served here, loaded on first use, so that
``import sublim.decoding.vllm`` does not compile the numba kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sublim.decoding.decoder import Decoder, Decoding, PrefixCache, RestrictedGrammar, common_prefix

__all__ = ["Decoder", "Decoding", "PrefixCache", "RestrictedGrammar", "common_prefix"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("sublim.decoding.decoder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
