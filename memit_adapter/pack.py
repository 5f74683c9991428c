"""``EditPack``: the per-layer deltas of one batch of edits, plus what is needed to trust and reuse them.

Usage::

    pack = compute_edits(model, tok, requests, cfg, corpus=texts)
    pack.deltas["transformer.h.3.mlp.c_proj"].weight_delta()   # (d_out, d_in) tensor

    with pack.applied(model):                 # delta added in the forward pass, removed on exit
        model.generate(**batch)
    pack.merge(model); pack.unmerge(model)    # in place; unmerge restores the weights bit for bit
    err = pack.compress(rank=8)               # SVD truncation, returns the relative error
    both = EditPack.stack([pack_a, pack_b])   # refuses contradicting facts

    pack.save_pretrained("my-pack")           # a PEFT LoRA adapter + edit_pack.json + requests.jsonl + README.md
    pack = EditPack.from_pretrained("my-pack")            # or "user/repo", revision=...
    pack.push_to_hub("user/repo", subfolder="batch-1")
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .config import MemitConfig
from .errors import ConflictingRequestsError, FingerprintMismatchError, PackError
from .fingerprint import tensor_bytes
from .method_configs import METHOD_CONFIGS, FtConfig, RomeConfig
from .requests import EditRequest, find_conflicts

if TYPE_CHECKING:
    from torch import nn

    from .apply import MergeReport

REPRESENTATIONS = ("auto", "low_rank", "dense")


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
        tensors = [t for t in (self.B, self.A, self.dense) if t is not None]
        if any(not isinstance(t, torch.Tensor) or t.dim() != 2 for t in tensors):
            raise PackError("LayerDelta tensors must be 2-D torch tensors")
        if low_rank and self.B.shape[1] != self.A.shape[0]:
            raise PackError(f"B {tuple(self.B.shape)} and A {tuple(self.A.shape)} disagree on the rank")
        if n := _non_finite(self):
            raise PackError(f"a LayerDelta of shape {self.shape} would hold {n} NaN/inf value(s); non-finite deltas "
                            "never enter a pack (an overflow in a cast, or a failed solve?)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerDelta):
            return NotImplemented
        return all(_same_tensor(a, b) for a, b in ((self.B, other.B), (self.A, other.A), (self.dense, other.dense)))

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

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype if self.dense is not None else self.B.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.B, self.A, self.dense) if t is not None)

    @property
    def dense_is_smaller(self) -> bool:
        """True when ``r·(d_in + d_out) > d_in·d_out``: storing the full matrix takes fewer numbers."""
        d_out, d_in = self.shape
        return self.rank * (d_in + d_out) > d_in * d_out

    def weight_delta(self) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` update in the factors' dtype."""
        return self.dense if self.dense is not None else self.B @ self.A

    def to_dense(self) -> LayerDelta:
        if self.is_dense:
            return self
        prod = self.B.to(torch.float64) @ self.A.to(torch.float64)  # one rounding, to the factors' dtype
        return LayerDelta(dense=prod.to(self.dtype))

    def to_low_rank(self) -> LayerDelta:
        """Exact factors of a dense delta, rank ``min(d_out, d_in)``: one factor is the identity."""
        if not self.is_dense:
            return self
        d_out, d_in = self.shape
        eye = torch.eye(min(d_out, d_in), dtype=self.dtype, device=self.dense.device)
        return LayerDelta(B=eye, A=self.dense) if d_out <= d_in else LayerDelta(B=self.dense, A=eye)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with ``B @ A`` equal to the delta; exact for dense deltas (identity factor)."""
        low = self.to_low_rank()
        return low.B, low.A

    def truncated(self, rank: int) -> tuple[LayerDelta, float, float]:
        """Best rank-``rank`` approximation by SVD: ``(delta, discarded ‖·‖_F², total ‖·‖_F²)``.

        Low-rank factors are not multiplied out: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a`` and only the
        ``r × r`` core ``R_b R_aᵀ`` is decomposed.
        """
        if self.is_dense:
            U, S, Vh = torch.linalg.svd(self.dense.to(torch.float64), full_matrices=False)
        else:
            Qb, Rb = torch.linalg.qr(self.B.to(torch.float64))  # (d_out, r), (r, r)
            Qa, Ra = torch.linalg.qr(self.A.to(torch.float64).T)  # (d_in, r), (r, r)
            Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T)
            U, Vh = Qb @ Uc, Vhc @ Qa.T
        k = min(rank, S.numel())
        total, kept = float((S**2).sum()), float((S[:k] ** 2).sum())
        B, A = (U[:, :k] * S[:k]).to(self.dtype), Vh[:k].to(self.dtype)
        return LayerDelta(B=B, A=A), max(total - kept, 0.0), total

    def to(self, *args: Any, **kwargs: Any) -> LayerDelta:
        """Move or cast like ``torch.Tensor.to``."""
        if self.is_dense:
            return LayerDelta(dense=self.dense.to(*args, **kwargs))
        return LayerDelta(B=self.B.to(*args, **kwargs), A=self.A.to(*args, **kwargs))


@dataclass
class EditPack:
    """Deltas per edited module (full module names) with the requests and config that produced them.

    ``representation`` picks how each delta is held: ``"auto"`` (dense when ``r·(d_in + d_out) >
    d_in·d_out``, low rank otherwise), ``"low_rank"`` or ``"dense"``. ``fingerprint`` is
    :func:`~memit_adapter.fingerprint.weights_fingerprint` of the edited modules' weights before the
    edit; ``parents`` the :attr:`pack_id` of packs this one was computed on top of. ``report`` (kept in memory,
    not saved) says how :func:`~memit_adapter.compute_edits` made the pack: ``seconds`` per phase
    (``statistics``, ``targets``, ``update``), each request's target NLL at the end of its target-vector
    optimisation ``z_nll`` and the indices of the requests whose target stayed below even odds (``unconverged``).
    ``targets`` (float32, ``(n, d_model)``, or None) are the target vectors of the requests of the chain the pack
    ends, measured on the base model: a pack computed alone holds those of its own requests, a pack of a joint chain
    those of :func:`~memit_adapter.joint.chain_requests` (see ``compute_edits(..., joint=True)``); None for packs
    computed on top of others sequentially, combined, or made by ROME or FT-W.
    """

    deltas: dict[str, LayerDelta]
    requests: list[EditRequest]
    config: MemitConfig | RomeConfig | FtConfig  # its ``method`` says which method made the pack
    model_type: str
    fan_in_fan_out: bool = False  # True when the edited weights are stored (d_in, d_out), GPT-2's Conv1D
    base_model: str | None = None
    revision: str | None = None
    fingerprint: str | None = None
    parents: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    representation: str = "auto"
    targets: torch.Tensor | None = field(default=None, compare=False, repr=False)
    report: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.deltas, dict) or not self.deltas:
            raise PackError("an EditPack needs at least one delta: deltas={module_name: LayerDelta}")
        bad = [name for name, d in self.deltas.items() if not isinstance(name, str) or not isinstance(d, LayerDelta)]
        if bad:
            raise PackError(f"deltas must map full module names to LayerDelta, bad entries: {bad}")
        if not isinstance(self.config, tuple(METHOD_CONFIGS.values())):
            raise PackError(f"config must be a MemitConfig, RomeConfig or FtConfig, got {type(self.config).__name__}")
        if self.representation not in REPRESENTATIONS:
            raise PackError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        self.deltas = dict(self.deltas)
        self.requests = list(self.requests)
        self.parents = list(self.parents)
        if self.targets is not None:
            t = self.targets
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise PackError("targets must be a 2-D floating-point tensor (n requests, d_model) or None")
            if not torch.isfinite(t).all():
                raise PackError("targets hold NaN/inf values; non-finite target vectors never enter a pack")
        check_finite(self, "EditPack")
        self.set_representation(self.representation)

    @property
    def module_names(self) -> list[str]:
        return list(self.deltas)

    @property
    def nbytes(self) -> int:
        """Bytes held by the deltas."""
        return sum(d.nbytes for d in self.deltas.values())

    @property
    def pack_id(self) -> str:
        """Content hash of the deltas and the requests: what a child pack lists in ``parents``."""
        h = hashlib.sha256()
        for name in sorted(self.deltas):
            d = self.deltas[name]
            h.update(f"{name}|{d.is_dense}|{d.dtype}|".encode())
            for t in (d.B, d.A, d.dense):
                if t is not None:
                    h.update(f"{tuple(t.shape)}|".encode())
                    h.update(tensor_bytes(t.detach().clone(memory_format=torch.contiguous_format)))
        h.update(json.dumps([r.to_dict() for r in self.requests], sort_keys=True).encode())
        return "sha256:" + h.hexdigest()

    def set_representation(self, representation: str = "auto") -> EditPack:
        """Hold every delta low rank, dense, or (``"auto"``) whichever takes fewer numbers. Returns ``self``."""
        if representation not in REPRESENTATIONS:
            raise PackError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
        self.representation = representation
        for name, d in self.deltas.items():
            dense = d.dense_is_smaller if representation == "auto" else representation == "dense"
            self.deltas[name] = d.to_dense() if dense else d.to_low_rank()
        return self

    def compress(self, rank: int) -> float:
        """Truncate every delta to ``rank`` by SVD, in place; returns ``‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F`` over all modules.

        Usage: ``err = pack.compress(8)`` -> ``0.013`` (1.3% of the update's norm discarded).
        """
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise PackError(f"rank must be an int >= 1, got {rank!r}")
        check_finite(self, "compress")
        truncated, discarded, total = {}, 0.0, 0.0
        for name, d in self.deltas.items():  # all or nothing: the pack changes only once every SVD succeeded
            try:
                truncated[name], lost, norm2 = d.truncated(rank)
            except torch.linalg.LinAlgError as e:
                raise PackError(f"compress: the SVD of the delta of {name} {d.shape} did not converge ({e}); "
                                "nothing was changed. Keep the pack uncompressed, or compress in float64.") from e
            discarded, total = discarded + lost, total + norm2
        self.deltas.update(truncated)
        self.set_representation(self.representation)
        return math.sqrt(discarded / total) if total > 0 else 0.0

    # -- stacking -------------------------------------------------------------------------------
    @classmethod
    def stack(cls, packs: Sequence[EditPack], *, force: bool = False) -> EditPack:
        """One pack whose delta is the sum of ``packs``' deltas (factors concatenated, so exact).

        Raises :class:`ConflictingRequestsError` naming the facts when two packs give the same subject
        and relation prompt different targets, and :class:`FingerprintMismatchError` when packs on the
        same modules were computed on different base weights (``force=True`` skips that check). The
        result keeps the base fingerprint when the root packs (those not computed on top of another
        one in the list) all cover the same modules; otherwise it has none (the check is skipped).
        ``parents`` are the parents of the inputs that are not inputs themselves.
        """
        packs = list(packs)
        if not packs or not all(isinstance(p, EditPack) for p in packs):
            raise PackError("EditPack.stack needs a non-empty list of EditPack")
        check_compatible(packs)
        deltas: dict[str, LayerDelta] = {}
        for p in packs:
            for name, d in p.deltas.items():
                deltas[name] = d if name not in deltas else _add(deltas[name], d)
        ids = [p.pack_id for p in packs]
        roots = [p for p in packs if not set(p.parents) & set(ids)]
        by_modules: dict[frozenset, set] = {}  # fingerprints are comparable over the same modules only
        for p in roots:
            if p.fingerprint is not None:
                by_modules.setdefault(frozenset(p.deltas), set()).add(p.fingerprint)
        clash = [sorted(fps) for fps in by_modules.values() if len(fps) > 1]
        if clash and not force:
            raise FingerprintMismatchError(
                f"the packs were computed on different base weights ({clash[0]}); pass force=True to stack them anyway"
            )
        whole = by_modules.get(frozenset(deltas), set())
        fingerprints = whole if len(by_modules) == 1 else set()
        parents = [pid for p in packs for pid in p.parents if pid not in ids]
        first = packs[0]
        return cls(deltas=deltas, requests=[r for p in packs for r in p.requests], config=first.config,
                   model_type=first.model_type, fan_in_fan_out=first.fan_in_fan_out, base_model=first.base_model,
                   revision=first.revision, fingerprint=next(iter(fingerprints), None) if len(fingerprints) == 1
                   else None, parents=list(dict.fromkeys(parents)), metrics={},
                   representation=first.representation)

    # -- applying to a model (see memit_adapter.apply) -----------------------------------------------
    def merge(self, model: nn.Module, *, force: bool = False, loss_warn_threshold: float = 0.1) -> MergeReport | None:
        """Add the deltas to ``model``'s weights in place; :meth:`unmerge` restores them bit for bit."""
        from .apply import merge

        return merge(self, model, force=force, loss_warn_threshold=loss_warn_threshold)

    def unmerge(self, model: nn.Module, *, force: bool = False) -> None:
        """Restore the weights this pack's :meth:`merge` changed, bit for bit (:func:`memit_adapter.apply.unmerge`).

        Raises :class:`~memit_adapter.errors.WeightsChangedError`, changing nothing, if other code changed those
        weights since the merge; ``force=True`` restores them anyway and warns what it overwrote.
        """
        from .apply import unmerge

        unmerge(self, model, force=force)

    def attach(self, model: nn.Module, *, force: bool = False) -> bool:
        """Add the deltas in the forward pass (forward hooks) without touching the weights; False if already active."""
        from .apply import attach

        return attach(self, model, force=force)

    def detach(self, model: nn.Module) -> None:
        """Remove the hooks of :meth:`attach`; outputs are the original ones again."""
        from .apply import detach

        detach(self, model)

    @contextmanager
    def applied(self, model: nn.Module, *, force: bool = False) -> Iterator[nn.Module]:
        """``with pack.applied(model): ...`` -- attached inside the block, detached on exit (also on error)."""
        from .apply import applied

        with applied(self, model, force=force):
            yield model

    # -- files and Hub (see memit_adapter.persistence, memit_adapter.hub) --------------------------------
    def save_pretrained(self, save_directory: str, *, dense_file: bool = False, card: bool = True,
                        overwrite: bool = False) -> None:
        """Write the pack as a PEFT LoRA adapter plus metadata; see :func:`memit_adapter.persistence.save_pack`.

        A folder holding an earlier pack is replaced as a whole, atomically. A folder holding anything else
        raises :class:`~memit_adapter.errors.OverwriteError` unless ``overwrite=True``.
        """
        from .persistence import save_pack

        save_pack(self, save_directory, dense_file=dense_file, card=card, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                        **hub_kwargs: Any) -> EditPack:
        """Load from a local folder or a Hub repo id; see :func:`memit_adapter.hub.load_pack`."""
        from .hub import load_pack

        return load_pack(path_or_repo_id, revision=revision, subfolder=subfolder, **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
                    revision: str | None = None, commit_message: str | None = None, **kwargs: Any) -> Any:
        """Upload the saved folder as one commit; see :func:`memit_adapter.hub.push_pack`."""
        from .hub import push_pack

        return push_pack(self, repo_id, subfolder=subfolder, private=private, revision=revision,
                         commit_message=commit_message, **kwargs)


def check_compatible(packs: Sequence[EditPack]) -> None:
    """Raise :class:`ConflictingRequestsError` if two of ``packs`` contradict each other, naming the facts. A pack
    computed on top of another (its ``parents``) may rewrite that one's facts.

    Also refuses packs of different model types or weight orientation.
    """
    types = {(p.model_type, p.fan_in_fan_out) for p in packs}
    if len(types) > 1:
        raise PackError(f"packs for different model types/orientations cannot be combined: {sorted(types)}")
    owner = {id(r): i for i, p in enumerate(packs) for r in p.requests}
    ids = [p.pack_id for p in packs]

    def rewrites(a: int, b: int) -> bool:  # one pack was computed on top of the other: its fact replaces the other's
        return ids[a] in packs[b].parents or ids[b] in packs[a].parents

    pairs = [(a, b) for a, b in find_conflicts([r for p in packs for r in p.requests])
             if owner[id(a)] != owner[id(b)] and not rewrites(owner[id(a)], owner[id(b)])]
    if pairs:
        shown = "; ".join(
            f"{a.text!r}: {a.target_new!r} (pack {owner[id(a)]}) vs {b.target_new!r} (pack {owner[id(b)]})"
            for a, b in pairs[:5]
        )
        raise ConflictingRequestsError(
            f"{len(pairs)} contradicting fact(s) between packs (same subject and prompt, different targets): "
            f"{shown}. Drop one of the packs or recompute one batch with the intended target."
        )


def check_finite(pack: EditPack, action: str) -> None:
    """Raise :class:`PackError` naming the module if a delta holds NaN/inf (changed in place after construction).

    Usage: ``check_finite(pack, "attach")`` at the start of anything that would put the pack into a model or a file.
    """
    for name, d in pack.deltas.items():
        if n := _non_finite(d):
            raise PackError(f"{action}: the delta of {name} holds {n} NaN/inf value(s); nothing was changed. "
                            "Non-finite deltas never enter a pack, a model or a file: recompute the pack, or load "
                            "a saved copy if it was changed in place.")


def _non_finite(d: LayerDelta) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in (d.B, d.A, d.dense) if t is not None)


def _add(a: LayerDelta, b: LayerDelta) -> LayerDelta:
    if a.shape != b.shape:
        raise PackError(f"cannot add deltas of shapes {a.shape} and {b.shape}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if a.is_dense or b.is_dense:
        return LayerDelta(dense=a.to_dense().dense.to(dtype) + b.to_dense().dense.to(dtype))
    return LayerDelta(B=torch.cat([a.B.to(dtype), b.B.to(dtype)], dim=1), A=torch.cat([a.A.to(dtype), b.A.to(dtype)]))


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
