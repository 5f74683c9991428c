"""Joint chains: each new pack re-solves every edit of its chain on the base model and holds the difference.

A pack computed with ``compute_edits(..., on_top_of=packs, joint=True)`` solves the requests of ``packs`` (those
a new request does not supersede) and the new requests as one MEMIT batch on the base model, and keeps
``ΔW_joint − Σ ΔW_earlier``: the chain, all packs applied, is then that one batch. The target vectors of earlier
requests are not optimised again: each pack stores ``targets``, the target vector of every request of the chain
it ends (:func:`chain_requests`), and only the requests about a subject that the new batch edits again are
optimised anew (they share one δ with the new ones). The chain equals the one batch exactly when every pack's
batch spans the same relations; otherwise a subject's preserved relations (``preserve_factor``) are those of the
batch in which its target vector was last optimised (world-gpt2-bpe, 100 packs of 10 against 10 of 100 on the
same edits: Score / retention 95.0 / 96.5 against 94.8 / 96.7 after 100 edits, equal after 200). This module holds
the bookkeeping; the solve is the engine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .pack import EditPack, LayerDelta
from .requests import EditRequest


def supersedes(new: EditRequest, old: EditRequest) -> bool:
    """True when ``new`` rewrites the fact ``old`` wrote: the same subject, and the same prompt or the same
    ``relation_id``."""
    return bool(_fact_keys(new) & _fact_keys(old))


def _fact_keys(req: EditRequest) -> set[tuple[str, str, str]]:
    subject = req.subject.strip()
    keys = {(subject, "prompt", req.prompt.strip())}
    if req.relation_id is not None:
        keys.add((subject, "relation", req.relation_id))
    return keys


def _not_rewritten(old: Sequence[EditRequest], new: Sequence[EditRequest]) -> list[int]:
    """Indices of the requests of ``old`` that no request of ``new`` :func:`supersedes`."""
    rewritten = set().union(*(_fact_keys(r) for r in new)) if new else set()
    return [i for i, r in enumerate(old) if not _fact_keys(r) & rewritten]


def chain_requests(packs: Sequence[EditPack]) -> list[EditRequest]:
    """The requests a chain of packs holds, in order: each pack's requests after those of the packs before it,
    less every request a later one :func:`supersedes`."""
    out: list[EditRequest] = []
    for pack in packs:
        out = [out[i] for i in _not_rewritten(out, pack.requests)] + list(pack.requests)
    return out


def check_joint_chain(packs: Sequence[EditPack], layers: Sequence[int]) -> list[EditRequest]:
    """Raise :class:`ConfigError` unless ``packs`` is a joint chain that a new pack can extend: MEMIT packs of the
    same edited layers (``layers`` are the new config's), each listing the ones before it as ``parents``, each
    holding the target vectors of its chain. Returns the chain's requests (:func:`chain_requests`)."""
    ids: list[str] = []
    chain: list[EditRequest] = []
    for i, pack in enumerate(packs):
        if pack.config.method != "memit" or list(pack.config.layers) != list(layers):
            raise ConfigError(f"joint=True: pack {i} was made by {pack.config.method} at layers "
                              f"{getattr(pack.config, 'layers', '?')}; a joint chain re-solves MEMIT packs of the new "
                              f"config's layers {list(layers)}")
        if pack.parents != ids:
            raise ConfigError(f"joint=True: pack {i} lists parents {pack.parents}, not the packs before it in "
                              "on_top_of: pass the whole chain, in order")
        chain = [chain[j] for j in _not_rewritten(chain, pack.requests)] + list(pack.requests)
        n = len(chain)
        if pack.targets is None or pack.targets.shape[0] != n:
            raise ConfigError(f"joint=True: pack {i} does not hold the target vectors of its chain ({n} requests); "
                              "packs computed sequentially (joint=False) or saved by an older memit_adapter "
                              "cannot be re-solved: recompute the chain with joint=True")
        ids.append(pack.pack_id)
    return chain


@dataclass
class JointBatch:
    """The chain's requests that a new batch keeps (``old``, chain order, less those it supersedes), their stored
    target vectors ``z`` ``(len(old), d_model)``, and which of them are optimised again with the new requests
    (``again``: about a subject the new requests edit, when subjects share their δ)."""

    old: list[EditRequest]
    z: torch.Tensor
    again: list[bool]


def joint_batch(packs: Sequence[EditPack], new: Sequence[EditRequest], share_subject_delta: bool,
                chain: Sequence[EditRequest] | None = None) -> JointBatch:
    """The :class:`JointBatch` of extending the joint chain ``packs`` (its requests ``chain``, when already known)
    with the requests ``new``."""
    chain = chain_requests(packs) if chain is None else chain
    rows = _not_rewritten(chain, new)
    subjects = {r.subject for r in new} if share_subject_delta else set()
    old = [chain[i] for i in rows]
    return JointBatch(old, packs[-1].targets[rows].float(), [r.subject in subjects for r in old])


def difference(joint: LayerDelta, earlier: Sequence[LayerDelta]) -> LayerDelta:
    """``joint − Σ earlier`` for one module: factors concatenated (exact) while that is smaller than the dense
    matrix, else the dense difference computed in float64."""
    parts = [joint, *earlier]
    rank = sum(d.rank for d in parts)
    d_out, d_in = joint.shape
    if rank * (d_in + d_out) > d_in * d_out or any(d.is_dense for d in parts):
        total = _dense64(joint)
        for d in earlier:
            total -= _dense64(d).to(total.device)
        return LayerDelta(dense=total.to(joint.dtype))
    B = torch.cat([joint.B] + [-d.B.to(joint.B) for d in earlier], dim=1)
    A = torch.cat([joint.A] + [d.A.to(joint.A) for d in earlier], dim=0)
    return LayerDelta(B=B, A=A)


def _dense64(d: LayerDelta) -> torch.Tensor:
    return d.dense.double() if d.is_dense else d.B.double() @ d.A.to(d.B.device).double()
