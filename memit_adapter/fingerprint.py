"""Content fingerprints of model weights, used to key statistics caches and to check a pack's base."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor in its own dtype (bf16 included), on CPU, contiguous."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights_fingerprint(model: nn.Module, module_names: Iterable[str]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the ``weight`` of each named module.

    Usage: ``weights_fingerprint(model, ["transformer.h.0.mlp.c_proj"])`` -> ``"sha256:…"``.
    """
    h = hashlib.sha256()
    for name in sorted(module_names):
        w = model.get_submodule(name).weight
        h.update(f"{name}|{w.dtype}|{tuple(w.shape)}|".encode())
        h.update(tensor_bytes(w))
    return "sha256:" + h.hexdigest()
