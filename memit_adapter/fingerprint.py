"""Content fingerprints of model weights, used to key statistics caches and to check a pack's base."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .devices import module_weight


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor in its own dtype (bf16 included), on CPU, contiguous."""
    if not t.numel():
        return b""
    # clone(contiguous_format) + flatten: a (n, 1) tensor may count as contiguous with strides view() rejects
    flat = t.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_fingerprint(model: nn.Module | Mapping[str, torch.Tensor], module_names: Iterable[str]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the ``weight`` of each named module, also of weights
    accelerate offloads (:func:`~memit_adapter.arch.module_weight`); ``model`` may also map the names to weights.

    Usage: ``weights_fingerprint(model, ["transformer.h.0.mlp.c_proj"])`` -> ``"sha256:…"``.
    """
    h = hashlib.sha256()
    for name in sorted(module_names):
        w = model[name] if isinstance(model, Mapping) else module_weight(model, name)
        h.update(f"{name}|{w.dtype}|{tuple(w.shape)}|".encode())
        h.update(tensor_bytes(w))
    return "sha256:" + h.hexdigest()
