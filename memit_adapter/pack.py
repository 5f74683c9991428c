"""``EditPack``: the per-layer deltas of one batch of edits, plus what is needed to trust and reuse them.

Usage::

    pack = compute_edits(model, tok, requests, cfg, corpus=texts)
    pack.deltas["transformer.h.3.mlp.c_proj"].weight_delta()   # (d_out, d_in) tensor
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import MemitConfig
from .errors import PackError
from .requests import EditRequest


@dataclass
class LayerDelta:
    """The update of one module, ``ΔW = B @ A`` (low rank) or ``dense``; always in ``(d_out, d_in)`` layout."""

    B: torch.Tensor | None = None  # (d_out, r)
    A: torch.Tensor | None = None  # (r, d_in)
    dense: torch.Tensor | None = None  # (d_out, d_in)

    def __post_init__(self) -> None:
        low_rank = self.B is not None and self.A is not None
        if low_rank == (self.dense is not None) or (self.B is None) != (self.A is None):
            raise PackError("a LayerDelta holds either both B and A, or dense")
        if low_rank and self.B.shape[1] != self.A.shape[0]:
            raise PackError(f"B {tuple(self.B.shape)} and A {tuple(self.A.shape)} disagree on the rank")

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        """Stored rank: ``r`` for low-rank factors, ``min(d_out, d_in)`` for dense."""
        return min(self.shape) if self.dense is not None else self.B.shape[1]

    def weight_delta(self) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` update in the factors' dtype."""
        return self.dense if self.dense is not None else self.B @ self.A


@dataclass
class EditPack:
    """Deltas per edited module (full module names) with the requests and config that produced them."""

    deltas: dict[str, LayerDelta]
    requests: list[EditRequest]
    config: MemitConfig
    model_type: str
    fan_in_fan_out: bool = False  # True when the edited weights are stored (d_in, d_out), GPT-2's Conv1D
    base_model: str | None = None
    revision: str | None = None
    fingerprint: str | None = None
    parents: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def module_names(self) -> list[str]:
        return list(self.deltas)
