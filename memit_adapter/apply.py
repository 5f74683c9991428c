"""Apply an :class:`~memit_adapter.pack.EditPack` to a model: merge into the weights, or add in the forward pass.

Usage::

    report = merge(pack, model)      # in place; report.restore_bytes, report.delta_rel_error
    unmerge(pack, model)             # every weight bit for bit as before; WeightsChangedError if other code
                                     # changed them since (nothing done), force=True restores anyway and warns
    with applied(pack, model):       # forward hooks: W x + B (A x); the weights are not touched
        model.generate(**batch)
    attach(pack, model); detach(pack, model)

Exact restore. Subtracting the delta again is not exact (``(W + Δ) − Δ ≠ W`` after rounding), so
``merge`` recomputes ``(W' − Δ)`` right away and keeps the original value of every element where
that would not give ``W`` back: an int32 index plus the value, ``4 + itemsize`` bytes per such
element, or a plain copy of the weight when that is smaller (deltas as large as the weight itself).
Measured on rank-10 deltas of 512 x 2048 weights: with ``‖Δ‖/‖W‖ = 1e-2`` 1.2-1.3% of the elements
in fp32, fp16 and bf16 (0.07-0.1 bytes per weight element instead of 2-4 for a copy); 7.5% at 1e-1,
0.2% at 1e-3. The cost is never more than one copy of the edited weights. Deltas are formed in float64, one block of
rows at a time, so that ``unmerge`` recomputes exactly what ``merge`` computed.

Unmerge is a transaction. ``merge`` keeps a digest of every stored row before and after (16 bytes per
row); ``unmerge`` first checks that the weights are still the ones merge left, then restores on copies,
checks every row against the original digests, and only then writes the weights and drops the pack.

State lives on the model (attribute ``_memit_adapter_edits``), like PEFT's per-layer ``merged``
flags: which packs are merged (in order) and which are attached.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .devices import execution_device, module_weight, writable_param
from .errors import FingerprintMismatchError, PackError, WeightsChangedError
from .fingerprint import weights_fingerprint
from .pack import EditPack, LayerDelta, check_compatible, check_finite

logger = logging.getLogger(__name__)

_STATE_ATTR = "_memit_adapter_edits"
_BLOCK_ELEMENTS = 1 << 22  # rows are processed in blocks of about 4M elements to bound float64 temporaries
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _Restore:
    index: torch.Tensor  # (n_fix,) flat positions where (W' - Δ) does not give W back
    values: torch.Tensor  # (n_fix,) the original values there
    before: torch.Tensor  # (rows,) int64 digests of W's stored rows, on CPU: the restore is checked against them
    after: torch.Tensor  # (rows,) digests of W' = what merge left: unmerge checks that nobody changed it since
    full: torch.Tensor | None = None  # the whole original weight, when that is smaller than index + values

    @property
    def nbytes(self) -> int:
        """Bytes of the restore record proper; the two digests add 16 bytes per stored row."""
        return sum(t.numel() * t.element_size() for t in (self.index, self.values, self.full) if t is not None)


@dataclass(eq=False)
class _Merged:
    pack: EditPack
    pack_id: str
    restores: dict[str, _Restore]


@dataclass
class _Attached:
    pack: EditPack
    pack_id: str
    handles: list[torch.utils.hooks.RemovableHandle]


@dataclass
class _ModelEdits:
    merged: list[_Merged] = field(default_factory=list)
    attached: dict[str, _Attached] = field(default_factory=dict)
    verified: set[str] = field(default_factory=set)  # packs whose fingerprint matched since the last (un)merge

    def active(self) -> list[tuple[str, EditPack]]:
        return [(m.pack_id, m.pack) for m in self.merged] + [(a.pack_id, a.pack) for a in self.attached.values()]


@dataclass
class MergeReport:
    """What a merge did. ``delta_rel_error``: ``‖(W' − W) − Δ‖ / ‖Δ‖``, the share of the delta lost to rounding
    into the weight dtype (0 in fp32; large in bf16 for small deltas). ``restore_bytes``: memory kept for the
    exact unmerge (plus 16 bytes per stored row for the digests that check it); ``restore_fraction``: share of
    the edited elements that needed it."""

    dtype: torch.dtype
    delta_rel_error: float
    restore_bytes: int
    restore_fraction: float
    weight_bytes: int
    per_module: dict[str, float] = field(default_factory=dict)


def model_edits(model: nn.Module) -> _ModelEdits:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = _ModelEdits()
        object.__setattr__(model, _STATE_ATTR, state)  # not a submodule or parameter: plain attribute
    return state


def active_packs(model: nn.Module) -> list[EditPack]:
    """The packs currently merged into (in merge order) or attached to ``model``."""
    return [p for _, p in model_edits(model).active()]


# -- checks -----------------------------------------------------------------------------------------
def check_fits(pack: EditPack, model: nn.Module, *, force: bool = False) -> None:
    """Raise :class:`PackError` if a module is missing or has another shape, and
    :class:`FingerprintMismatchError` if the pack was computed on other weights (unless ``force``).

    Also refuses a pack that contradicts one already active on the model. A pack that passed is not
    hashed again until a pack is merged or unmerged (weights changed by other means are not noticed).
    """
    for name, d in pack.deltas.items():
        try:
            w = model.get_submodule(name).weight
        except AttributeError:
            raise PackError(f"the model has no module {name!r} with a weight (pack for {pack.model_type!r}, "
                            f"model is {getattr(model.config, 'model_type', type(model).__name__)!r})") from None
        stored = (d.shape[1], d.shape[0]) if pack.fan_in_fan_out else d.shape
        if tuple(w.shape) != stored:
            raise PackError(f"{name}: delta of (d_out, d_in)={d.shape} does not fit a weight of shape "
                            f"{tuple(w.shape)} (fan_in_fan_out={pack.fan_in_fan_out})")
    state = model_edits(model)
    check_compatible([p for _, p in state.active()] + [pack])
    pid = pack.pack_id
    if force or pack.fingerprint is None or pid in state.verified:
        return
    current = weights_fingerprint(model, pack.module_names)
    # fits: computed on the model as it is now (sequential editing), or on it with the merged packs taken off
    if pack.fingerprint == current or (state.merged and pack.fingerprint == _base_fingerprint(
            model, state, pack.module_names)):
        state.verified.add(pid)  # hashing the weights on every toggle would copy them each time
        return
    raise FingerprintMismatchError(
        f"the pack was computed on other weights of {pack.module_names[:3]}... than this model's "
        f"(pack fingerprint {pack.fingerprint[:19]}..., model {current[:19]}...; base model recorded: "
        f"{pack.base_model!r} @ {pack.revision!r}). Load the base model the pack was made for, in the same "
        "dtype (the fingerprint covers the dtype), or pass force=True."
    )


# -- merge / unmerge --------------------------------------------------------------------------------
def merge(pack: EditPack, model: nn.Module, *, force: bool = False, loss_warn_threshold: float = 0.1
          ) -> MergeReport | None:
    """Add ``pack``'s deltas to the weights in place. Nothing is changed if any merged weight would be NaN/inf.

    Warns (and returns ``None``) if the pack is already merged or attached. Warns when rounding into the
    weight dtype loses more than ``loss_warn_threshold`` of the delta's norm (bf16/fp16 with small deltas).
    """
    state = model_edits(model)
    pid = pack.pack_id
    if any(m.pack_id == pid for m in state.merged) or pid in state.attached:
        warnings.warn("this pack is already merged into or attached to the model; nothing done", stacklevel=2)
        return None
    check_finite(pack, "merge")
    check_fits(pack, model, force=force)
    stored = {name: _stored_weight(model, name, "merge into") for name in pack.deltas}
    new_weights, restores, errors = {}, {}, {}
    for name, d in pack.deltas.items():
        new_weights[name], restores[name], errors[name] = _merged_weight(stored[name], d, pack.fan_in_fan_out, name)
    with torch.no_grad():
        for name, new in new_weights.items():
            stored[name].copy_(new)
    state.verified.clear()
    state.merged.append(_Merged(pack, pid, restores))
    report = _report(model, pack, restores, errors)
    if report.delta_rel_error > loss_warn_threshold:
        warnings.warn(
            f"merging into {report.dtype} rounded away {report.delta_rel_error:.0%} of the edit delta's norm; the "
            "edits may not take effect. Use pack.attach(model) / pack.applied(model), which add the delta in the "
            "forward pass, or load the model in float32 before merging.", stacklevel=2)
    return report


def unmerge(pack: EditPack, model: nn.Module, *, force: bool = False) -> None:
    """Undo :func:`merge` bit for bit, as one transaction. Packs merged later on the same modules are taken off
    and put back.

    First checks that every weight involved still holds what the merges left (a digest per stored row); if
    other code changed one since, raises :class:`WeightsChangedError` naming the modules and rows, with nothing
    changed. ``force=True`` restores anyway and warns what it overwrote: every element nobody changed gets its
    pre-merge bits back, and so do the changed ones where the merge kept a copy of the original weight (large
    deltas) or of the element; the other changed elements hold their current value minus the delta.
    """
    state = model_edits(model)
    pid = pack.pack_id
    pos = next((i for i, m in enumerate(state.merged) if m.pack_id == pid), None)
    if pos is None:
        warnings.warn("this pack is not merged into the model; nothing to unmerge", stacklevel=2)
        return
    chain = _merged_on_top(state.merged, pos)
    names = list(dict.fromkeys(name for m in chain for name in m.restores))
    stored = {name: _stored_weight(model, name, "unmerge from") for name in names}
    changed = _changed_rows(model, state.merged, names, force=force)
    weights = {name: stored[name].detach().clone() for name in names}
    inexact: dict[str, int] = {}
    for i, m in reversed(list(enumerate(chain))):  # on copies: the model changes only once all is computed
        for name, d in m.pack.deltas.items():
            bad = _restore_weight(weights[name], d, m.restores[name], m.pack.fan_in_fan_out)
            allowed = torch.zeros_like(bad)
            if name in changed:
                allowed[changed[name]] = True
            if (bad & ~allowed).any():
                raise PackError(f"{name}: the restored weight differs from the original bits in rows nobody changed; "
                                "the delta was recomputed differently than at merge time (was the model moved to "
                                "another device, or torch upgraded?); nothing was changed")
            if all(name not in c.restores for c in chain[:i]):  # the first merge into this module: the base
                inexact[name] = int(bad.sum())
    remerged = []
    for m in chain[1:]:
        restores = {}
        for name, d in m.pack.deltas.items():
            weights[name], restores[name], _ = _merged_weight(weights[name], d, m.pack.fan_in_fan_out, name)
        remerged.append(_Merged(m.pack, m.pack_id, restores))
    with torch.no_grad():
        for name, w in weights.items():
            stored[name].copy_(w)
    gone = {id(m) for m in chain}
    state.merged[:] = [m for m in state.merged if id(m) not in gone] + remerged
    state.verified.clear()
    _warn_dependents(model, pack)
    if changed:
        shown = "; ".join(f"{name}: {int(rows.numel())} row(s), {int(rows.numel()) - inexact[name]} of them back "
                          f"to their pre-merge bits" for name, rows in changed.items())
        warnings.warn(f"unmerge(force=True) overwrote weights changed after the merge ({shown}). Rows not back to "
                      "their pre-merge bits hold, in the changed elements, their current value minus the delta "
                      "(the restore record keeps no copy of those elements).", stacklevel=2)


def _stored_weight(model: nn.Module, name: str, verb: str) -> torch.Tensor:
    """The tensor that holds module ``name``'s weight as forwards see it, to change in place: the weight itself, or
    the copy accelerate keeps in memory for a weight it offloads to the CPU. :class:`PackError` for a weight
    offloaded to disk, which the offloading hook reads anew for every forward."""
    weight = writable_param(model, f"{name}.weight")
    if weight is None:
        raise PackError(f"cannot {verb} {name}: accelerate offloads its weight to disk and reads it from there "
                        "for every forward (a file of the offload folder, or of the checkpoint itself), which this "
                        "library does not write; nothing was changed. Use pack.attach(model) / pack.applied(model), "
                        "which add the delta in the forward pass, or offload that module to the CPU, not the disk.")
    return weight


def _merged_on_top(merged: list[_Merged], pos: int) -> list[_Merged]:
    """``merged[pos]`` and every later merge that shares a module with it or with one already taken."""
    chain, names = [merged[pos]], set(merged[pos].restores)
    for m in merged[pos + 1:]:
        if names & set(m.restores):
            chain.append(m)
            names |= set(m.restores)
    return chain


def _changed_rows(model: nn.Module, merged: list[_Merged], names: list[str], *, force: bool
                  ) -> dict[str, torch.Tensor]:
    """Stored rows of each weight in ``names`` that differ from what the last merge into it left; raises
    :class:`WeightsChangedError` if there are any and not ``force``, or if a weight changed shape or dtype."""
    changed, shown = {}, []
    for name in names:
        last = next(m for m in reversed(merged) if name in m.restores).restores[name]
        w = module_weight(model, name)
        ref = last.full if last.full is not None else last.values
        if w.dim() != 2 or w.shape[0] != last.after.numel() or w.dtype != ref.dtype:
            raise WeightsChangedError(
                f"cannot unmerge: {name}'s weight is now {w.dtype} of shape {tuple(w.shape)}, not the "
                f"{ref.dtype} weight with {last.after.numel()} rows the pack was merged into; nothing was changed. "
                "Cast or reload the model as it was when merged, or reload the base model.")
        rows = (_row_digests(w) != last.after).nonzero().squeeze(1)
        if rows.numel():
            changed[name] = rows
            shown.append(f"{name} ({rows.numel()} of {w.shape[0]} stored rows, first {rows[:3].tolist()})")
    if changed and not force:
        raise WeightsChangedError(
            f"cannot unmerge exactly: weights were changed after the merge by other code: {'; '.join(shown)}. "
            "Nothing was changed. Reload the base model, or pass force=True to restore the pre-merge weights "
            "anyway (overwriting those changes; see unmerge).")
    return changed


def _restore_weight(w: torch.Tensor, d: LayerDelta, r: _Restore, transposed: bool) -> torch.Tensor:
    """``W' -> W`` in place on ``w``; returns the ``(rows,)`` mask of stored rows that did not come back."""
    with torch.no_grad():
        if r.full is not None:
            w.copy_(r.full)
        else:
            for rows, delta in _delta_blocks(d, w, transposed):
                w[rows] = (w[rows].to(delta.dtype) - delta).to(w.dtype)
            w.view(-1)[r.index.long()] = r.values
    return _row_digests(w) != r.before


def _base_fingerprint(model: nn.Module, state: _ModelEdits, names: list[str]) -> str | None:
    """Fingerprint of ``names`` with every merged pack taken off, computed on copies: packs computed
    independently on the same base may be merged one after the other. ``None`` when the weights were changed
    since a merge (the base cannot be recovered exactly)."""
    base = {}
    for name in names:
        merges = [m for m in state.merged if name in m.restores]
        w = module_weight(model, name).detach().clone()
        if merges and not torch.equal(_row_digests(w), merges[-1].restores[name].after):
            return None
        for m in reversed(merges):
            if _restore_weight(w, m.pack.deltas[name], m.restores[name], m.pack.fan_in_fan_out).any():
                return None
        base[name] = w
    return weights_fingerprint(base, names)


def _merged_weight(w: torch.Tensor, d: LayerDelta, transposed: bool, name: str
                   ) -> tuple[torch.Tensor, _Restore, tuple[float, float]]:
    """``W + Δ`` in W's dtype, the restore record, and ``(‖(W'−W)−Δ‖², ‖Δ‖²)``."""
    new = torch.empty_like(w)
    fixes_idx, fixes_val = [], []
    lost2 = norm2 = 0.0
    ints = _INT_VIEW[w.element_size()]
    with torch.no_grad():
        for rows, delta in _delta_blocks(d, w, transposed):
            old = w[rows]
            merged = (old.to(delta.dtype) + delta).to(w.dtype)
            bad = ~torch.isfinite(merged) & torch.isfinite(old)
            if bad.any():
                raise PackError(f"merging would make {int(bad.sum())} weight(s) of {name} NaN/inf "
                                f"(dtype {w.dtype}); nothing was changed. Check the pack, or merge in float32.")
            back = (merged.to(delta.dtype) - delta).to(w.dtype)
            miss = (back.view(ints) != old.view(ints)).flatten().nonzero().squeeze(1)
            fixes_idx.append(miss + rows.start * w.shape[1])
            fixes_val.append(old.flatten()[miss])
            lost2 += float(((merged.to(delta.dtype) - old.to(delta.dtype)) - delta).pow(2).sum())
            norm2 += float(delta.pow(2).sum())
            new[rows] = merged
    index = torch.cat(fixes_idx)
    index = index.to(torch.int32) if w.numel() < 2**31 else index
    before, after = _row_digests(w), _row_digests(new)
    if index.numel() * (index.element_size() + w.element_size()) >= w.numel() * w.element_size():
        # large deltas (‖Δ‖ ≳ ‖W‖) leave few elements exactly recoverable: a plain copy is smaller
        empty = index[:0]
        return new, _Restore(empty, empty.to(w.dtype), before, after, full=w.detach().clone()), (lost2, norm2)
    return new, _Restore(index, torch.cat(fixes_val), before, after), (lost2, norm2)


def _row_blocks(w: torch.Tensor) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        yield slice(start, min(start + step, w.shape[0]))


def _delta_blocks(d: LayerDelta, w: torch.Tensor, transposed: bool) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, Δ[rows])`` in the weight's storage layout, float64 (float32 where the device has no fp64)."""
    acc = torch.float32 if w.device.type == "mps" else torch.float64
    if d.is_dense:
        full = d.dense.T if transposed else d.dense
        for rows in _row_blocks(w):
            yield rows, full[rows].to(device=w.device, dtype=acc)
        return
    B, A = d.B.to(device=w.device, dtype=acc), d.A.to(device=w.device, dtype=acc)
    for rows in _row_blocks(w):
        yield rows, (A[:, rows].T @ B.T) if transposed else (B[rows] @ A)  # (rows, cols) of the stored weight


def _row_digests(w: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` int64 on CPU: ``Σ_j bits(w[i, j]) · (2j + 1)`` mod 2⁶⁴ for each stored row ``i``. The weights
    are odd, hence invertible mod 2⁶⁴: changing any one element always changes its row's digest, and a swap of
    two different elements does too. Integer sums wrap, so the value does not depend on the summation order."""
    ints = w.detach().view(_INT_VIEW[w.element_size()])
    cols = torch.arange(1, 2 * w.shape[1], 2, dtype=torch.int64, device=w.device)
    out = torch.empty(w.shape[0], dtype=torch.int64)
    for rows in _row_blocks(w):
        out[rows] = (ints[rows].to(torch.int64) * cols).sum(dim=1).cpu()
    return out


def _report(model: nn.Module, pack: EditPack, restores: dict[str, _Restore],
            errors: dict[str, tuple[float, float]]) -> MergeReport:
    weights = [model.get_submodule(n).weight for n in pack.module_names]
    n_fix = sum(r.index.numel() if r.full is None else r.full.numel() for r in restores.values())
    lost2, norm2 = sum(e[0] for e in errors.values()), sum(e[1] for e in errors.values())
    return MergeReport(
        dtype=weights[0].dtype,
        delta_rel_error=math.sqrt(lost2 / norm2) if norm2 > 0 else 0.0,
        restore_bytes=sum(r.nbytes for r in restores.values()),
        restore_fraction=n_fix / sum(w.numel() for w in weights),
        weight_bytes=sum(w.numel() * w.element_size() for w in weights),
        per_module={n: math.sqrt(e[0] / e[1]) if e[1] > 0 else 0.0 for n, e in errors.items()},
    )


# -- toggling with forward hooks --------------------------------------------------------------------
def attach(pack: EditPack, model: nn.Module, *, force: bool = False) -> bool:
    """Add ``pack``'s deltas to the edited modules' outputs with forward hooks: ``y = W x + B (A x)``.

    Works with ``generate()`` and batches (the hook acts on every token). Warns and returns False if the
    pack is already active; True when it was attached.
    """
    state = model_edits(model)
    pid = pack.pack_id
    if pid in state.attached or any(m.pack_id == pid for m in state.merged):
        warnings.warn("this pack is already attached to or merged into the model; nothing done", stacklevel=2)
        return False
    check_finite(pack, "attach")
    check_fits(pack, model, force=force)
    handles = []
    try:
        for name, d in pack.deltas.items():
            module = model.get_submodule(name)
            hook = _delta_hook(d, module.weight.dtype, execution_device(model, name))
            handles.append(module.register_forward_hook(hook))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    state.attached[pid] = _Attached(pack, pid, handles)
    return True


def detach(pack: EditPack, model: nn.Module) -> None:
    """Remove the hooks of :func:`attach`. Warns and returns if the pack is not attached."""
    attached = model_edits(model).attached.pop(pack.pack_id, None)
    if attached is None:
        warnings.warn("this pack is not attached to the model; nothing to detach", stacklevel=2)
        return
    for h in attached.handles:
        h.remove()
    _warn_dependents(model, pack)


def _warn_dependents(model: nn.Module, pack: EditPack) -> None:
    """Warn when an active pack was computed on top of ``pack`` (``parents``), which is now switched off."""
    dependents = [p.pack_id for p in active_packs(model) if pack.pack_id in p.parents]
    if dependents:
        warnings.warn(f"pack {pack.pack_id} was switched off while pack(s) {', '.join(dependents)} computed on top of "
                      "it are still active: their edits assumed it; switch them off first, or keep it on",
                      stacklevel=3)


@contextmanager
def applied(pack: EditPack, model: nn.Module, *, force: bool = False) -> Iterator[nn.Module]:
    """``with applied(pack, model): model.generate(...)`` -- the pack is active inside the block only."""
    attached = attach(pack, model, force=force)
    try:
        yield model
    finally:
        if attached:
            detach(pack, model)


def _delta_hook(d: LayerDelta, weight_dtype: torch.dtype, device: torch.device) -> Callable:
    """The forward hook adding ``d``'s delta on ``device``, where the module runs (its weight may be offloaded, and
    the input as the module was called on another device: accelerate moves it inside ``forward``)."""
    # Factors are computed in at least float32, so a bf16 model keeps small deltas the merge would round away.
    dtype = torch.promote_types(weight_dtype, torch.float32)
    factors = [t.to(device=device, dtype=dtype) for t in ((d.dense,) if d.is_dense else (d.A, d.B))]

    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(device=device, dtype=dtype)  # (..., d_in)
        for f in factors:  # dense: x Δᵀ; low rank: (x Aᵀ) Bᵀ
            x = x @ f.T
        return output + x.to(device=output.device, dtype=output.dtype)

    return hook
