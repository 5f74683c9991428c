"""``compute_edits``: from edit requests to per-layer deltas, without changing the model.

Usage::

    pack = compute_edits(model, tok, [EditRequest("{} plays the sport of", "Michael Jordan", " baseball")],
                         MemitConfig.for_model(model), corpus=texts, cache_dir="stats-cache")
    pack.deltas["transformer.h.3.mlp.c_proj"].weight_delta()     # (d_out, d_in)

Under ``torchrun`` (a ``torch.distributed`` process group), every rank calls ``compute_edits`` alike, shares the
statistics pass and the target vectors, and gets the same pack; rank 0 saves it (see
:mod:`memit_adapter.distributed`)::

    pack = compute_edits(model, tok, requests, cfg, corpus=texts)
    if dist.get_rank() == 0:
        pack.save_pretrained("my-edits")
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, check_model, max_positions
from .config import MemitConfig
from .devices import execution_device, input_device
from .distributed import broadcast_, broadcast_object, is_main
from .errors import ConfigError, InvalidRequestError, StatisticsError
from .fingerprint import weights_fingerprint
from .hooks import StopForward
from .joint import check_joint_chain, difference, joint_batch
from .modes import evaluating
from .pack import EditPack, LayerDelta
from .reach import choose_subject_tokens
from .requests import EditRequest, as_requests, check_keep, check_requests
from .solve import cached_null_space, cov_factor, layer_update, null_space, projected_update, woodbury_pays
from .stats import SecondMoment, collect_stats_for, prompt_moments
from .targets import UNCONVERGED_NLL, ChunkSizer, compute_targets, context_templates, relation_templates
from .tokens import encode_fact, pad_id, pad_right

logger = logging.getLogger(__name__)


def compute_edits(
    model: nn.Module,
    tokenizer,
    requests: Iterable[EditRequest | Mapping[str, Any]],
    config: MemitConfig | None = None,
    *,
    corpus: Any = None,
    cache_dir: str | os.PathLike | None = None,
    stats: Mapping[int, SecondMoment] | None = None,
    arch: ArchSpec | None = None,
    progress: bool = True,
    on_top_of: Sequence[EditPack] = (),
    joint: bool = False,
    keep: Sequence[str] = (),
) -> EditPack:
    """Compute the MEMIT update of every edited layer; return it as an :class:`EditPack`.

    ``corpus`` (texts, a .txt/.jsonl path or a ``datasets.Dataset``) and/or ``cache_dir`` provide the
    second-moment statistics; ``stats`` passes precomputed ones (see :func:`collect_stats`). ``config``
    defaults to :meth:`MemitConfig.for_model`. The model's weights are never written: edits of earlier
    layers act through forward hooks while later layers are computed, and every hook is removed when this
    returns or raises.

    ``on_top_of`` (sequential editing): packs computed earlier, to keep. They are active (hooked, in order) while
    the target vectors and keys are measured, and the keys of their requests at each edited layer join the
    preserved keys of the solve (``λC + K₀K₀ᵀ + KKᵀ``, the sequential form of MEMIT), so the new update leaves
    what they wrote in place. The new pack holds only its own deltas and lists their ``pack_id`` as its
    ``parents``; use it together with them (``EditPack.stack``, or attached one after the other).

    ``joint=True`` (``on_top_of``: the whole chain, in order, each pack computed alone or joint, with this config and
    statistics; an empty chain gives a plain pack, its first): the chain's requests (less those a new request
    rewrites: same subject and prompt or ``relation_id``) and the new ones are solved as one batch on the base model
    (none of the chain's packs may be active), and the new pack holds that update minus the chain's: with all packs
    applied the model equals that one batch (:mod:`memit_adapter.joint`).
    The chain's target vectors are reused from its last pack (``EditPack.targets``), except those of requests about
    a subject the new batch edits, optimised again with it; the key passes and the solve cover every request.
    Every pack stores the target vectors of its chain, so the next pack can be computed in another process.

    ``keep`` (not part of the published method): prompts of facts the model should go on answering as it does, a
    regression set (``"The mother tongue of Danielle Darrieux is"``, ...). Their keys at every token and edited layer
    (:func:`~memit_adapter.stats.prompt_moments`, measured before the target vectors, with the ``on_top_of`` packs
    applied unless ``joint``) join the preserved second moment of the solve, ``C + β·C_keep`` (β:
    ``config.keep_weight``), so the update moves them less (see ``MemitConfig.keep_weight`` for what that buys).
    Prompts that name a subject this solve edits (a joint chain's too) are left out with a warning
    (:func:`~memit_adapter.requests.check_keep`): they read the key the edit writes. The pack's
    ``report["kept_prompts"]`` counts those used; the prompts are not saved with the pack, so a joint chain extended
    later must be given them again. Memory: ``C_keep`` waits in host memory (``d_in²`` of ``mom2_dtype`` per layer);
    each layer's sum is formed on its device for its solve.

    ``config.edit_token="reach"``: before the target vectors, the subject token of each request without one is
    chosen (:func:`~memit_adapter.reach.choose_subject_tokens`; with several processes on rank 0, which the others
    wait for); the pack's requests record it. Requests about one subject, which share one δ, must name one token.

    ``config.repair_rounds`` > 0 (not with ``joint``): the requests that did not take are edited again on top, up to
    that many rounds, and the rounds' packs come back stacked as one (:mod:`memit_adapter.repair`).

    ``config.v_batch_size`` requests at a time go through the target-vector optimisation and through each
    layer's key pass (None: all at once on the CPU, as many as fit on an accelerator; see
    :class:`~memit_adapter.targets.ChunkSizer`). Peak memory on the model's device beyond the weights, for n
    requests, chunks of c, |R| edited layers: the largest of the statistics pass (unless ``stats`` are given), one
    z chunk (:func:`~memit_adapter.targets.optimise_deltas`: O(c), about 7 GB for c = 32 on a 7B model), one key
    chunk (``_keys_and_outputs``: O(c)) and one layer's solve (:func:`~memit_adapter.solve.layer_update`: O(d_in²
    + d_in·n), 8 GB for 10,000 edits of GPT-J); plus what grows with n and stays, in float32: z and ``cur``
    ``2·n·d_model``, one layer's keys ``n·d_in``, and the updates solved so far, ``n·(d_in + d_out)`` per layer
    (the pack's factors) and ``d_in·d_out`` more where n passes ``n* = d_in·d_out / (d_in + d_out)`` (the dense
    form the hook applies). 10,000 requests on GPT-J (d_in 16,384, d_model 4,096): 0.3 GB, 0.7 GB, 1.1 GB a layer.

    Several processes (``torchrun``; :mod:`memit_adapter.distributed`): when a ``torch.distributed`` process group
    of more than one rank is initialised, every rank must call this with the same arguments (its own copy of the
    model; the same ``stats``, if given). The context templates are rank 0's; the statistics pass
    (:func:`~memit_adapter.stats.collect_stats`) and the target vectors
    (:func:`~memit_adapter.targets.compute_targets`) are shared out and their results combined on every rank;
    the key passes and solves run on every rank, and rank 0's deltas are broadcast, so every rank returns the
    same pack, equal to one process's within float32 rounding. Saving stays the caller's: on rank 0 alone
    (``if dist.get_rank() == 0: pack.save_pretrained(...)``). Progress bars and warnings come from rank 0.
    """
    requests = as_requests(requests)
    check_requests(requests)
    spec = check_model(model, tokenizer, arch)
    config = config or MemitConfig.for_model(model)
    n_layers = spec.num_layers(model)
    if max(config.layers) >= n_layers:
        raise ConfigError(f"layers {config.layers} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    names = [spec.mlp_out_name(layer) for layer in config.layers]
    fingerprint = weights_fingerprint(model, names)
    earlier = list(on_top_of)
    if joint and config.repair_rounds:
        raise ConfigError("repair_rounds does not combine with joint=True: a joint pack is one solve of its chain, "
                          "and repair rounds are packs on top of it; compute the joint pack, then repair on top")
    held = _check_joint(model, earlier, config) if joint else []  # the chain's requests
    keep = check_keep(keep, [*held, *requests])  # all the subjects this solve edits
    if config.share_subject_delta:  # before any work; with "reach", undecided tokens follow a subject's set one
        _check_subject_tokens([*held, *requests], unset=-1 if config.edit_token == "last" else None)

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    progress = progress and is_main()
    with evaluating(model):
        templates = broadcast_object(context_templates(model, tokenizer, config))  # sampled: rank 0's everywhere
        _check_encodings(tokenizer, requests, templates, max_positions(model))  # before any long work
        keep_factors = stats is not None  # the caller's statistics: a factor of C computed now serves later packs
        if stats is None:
            stats = collect_stats_for(model, tokenizer, corpus, config.layers, config, cache_dir=cache_dir, arch=spec,
                                      progress=progress)
        _check_stats(stats, config.layers)
        seconds["statistics"], clock = time.perf_counter() - clock, time.perf_counter()
        chain, below = (earlier, []) if joint else ([], earlier)  # re-solved with the new requests, or kept under them
        with _active(model, below):
            kept = None  # the facts to keep: their second moment, on the host until each layer's solve
            if keep:
                kept = {layer: SecondMoment(stat.mom2.cpu(), stat.count) for layer, stat in prompt_moments(
                    model, tokenizer, keep, config.layers, batch_size=config.stats_batch_size, dtype=config.mom2_dtype,
                    arch=spec, progress=progress).items()}
                seconds["keep"], clock = time.perf_counter() - clock, time.perf_counter()
            if config.edit_token == "reach":
                known = {r.subject.strip(): r.subject_token or -1 for r in held}  # a chain re-solved keeps its own
                requests = broadcast_object(choose_subject_tokens(model, tokenizer, requests, max(config.layers),
                                                                  known=known, progress=progress, arch=spec)
                                            if is_main() else None)
            solved, zs, z_loss = _targets(model, spec, tokenizer, requests, templates, config, chain, held, progress)
            seconds["targets"], clock = time.perf_counter() - clock, time.perf_counter()
            prior = (_key_rows(tokenizer, [r for p in below for r in p.requests], templates, config.subject_keys)
                     if below else None)
            deltas = _spread_over_layers(model, spec, tokenizer, solved, templates, config, zs, stats, progress,
                                         keep_factors=keep_factors, prior=prior, kept=kept)
        broadcast_(t for layer in config.layers for t in (deltas[layer].B, deltas[layer].A))  # identical packs
        seconds["update"] = time.perf_counter() - clock
    layer_deltas = {name: deltas[layer] for name, layer in zip(names, config.layers)}
    if joint:  # the chain's packs hold the rest of the joint update
        layer_deltas = {name: difference(d, [p.deltas[name] for p in earlier]) for name, d in layer_deltas.items()}

    pack = EditPack(deltas=layer_deltas, requests=requests, config=config, model_type=model.config.model_type,
                    fan_in_fan_out=spec.transposed, base_model=hub_model_id(model), fingerprint=fingerprint,
                    parents=[p.pack_id for p in earlier], targets=None if below else zs.float().cpu())
    nll = z_loss.tolist()
    pack.report = {"seconds": seconds, "z_nll": nll,
                   "unconverged": [i for i, x in enumerate(nll) if x > UNCONVERGED_NLL],
                   "off_last_token": [i for i, r in enumerate(requests) if (r.subject_token or -1) != -1],
                   "kept_prompts": len(keep)}
    if config.repair_rounds:
        from .repair import repaired

        def edit_again(failing: list[EditRequest], under: list[EditPack]) -> EditPack:
            return compute_edits(model, tokenizer, failing, config.replace(repair_rounds=0), stats=stats, arch=arch,
                                 progress=progress, on_top_of=under, keep=keep)

        pack = repaired(model, tokenizer, pack, config.repair_rounds, below, edit_again, _active)
    return pack


def _check_subject_tokens(requests: list[EditRequest], unset: int | None) -> None:
    """Raise :class:`InvalidRequestError` when requests about one subject, which share one δ, name different
    ``subject_token``s; a request without one counts as ``unset`` (None: not at all)."""
    seen: dict[str, int] = {}
    for r in requests:
        mine = unset if r.subject_token is None else r.subject_token
        if mine is None:
            continue
        token = seen.setdefault(r.subject.strip(), mine)
        if token != mine:
            raise InvalidRequestError(f"requests about {r.subject.strip()!r} share one target vector but name "
                                      f"subject tokens {token} and {mine}: give them one token, or set "
                                      f"share_subject_delta=False")


def _check_joint(model: nn.Module, chain: list[EditPack], config: MemitConfig) -> list[EditRequest]:
    from .apply import active_packs

    held = check_joint_chain(chain, config.layers)
    ids = {p.pack_id for p in chain}
    if any(p.pack_id in ids for p in active_packs(model)):
        raise ConfigError("joint=True solves on the base model, but packs of the chain are attached to or merged into "
                          "it: detach or unmerge them first")
    return held


def _targets(model, spec, tokenizer, requests, templates, config, chain, held, progress
             ) -> tuple[list[EditRequest], torch.Tensor, torch.Tensor]:
    """``(requests to solve for, their target vectors, the new requests' final target NLL)``: the new requests
    alone, or with a joint ``chain`` (its requests ``held``) its kept requests (chain order) and then the new ones,
    the chain's stored target vectors reused except for the requests optimised again
    (:func:`~memit_adapter.joint.joint_batch`)."""
    last = max(config.layers)
    if not chain:
        zs, _, loss = compute_targets(model, spec, tokenizer, requests, templates, config, last,
                                      batch_size=config.v_batch_size, progress=progress, return_loss=True)
        return requests, zs, loss
    plan = joint_batch(chain, requests, config.share_subject_delta, held)
    again = [i for i, a in enumerate(plan.again) if a]
    fresh = [plan.old[i] for i in again] + requests
    zs, _, loss = compute_targets(model, spec, tokenizer, fresh, templates, config, last,
                                  batch_size=config.v_batch_size, progress=progress, return_loss=True,
                                  relations=relation_templates(plan.old + requests))
    old_z = plan.z.to(zs.device)
    old_z[again] = zs[:len(again)]
    return plan.old + requests, torch.cat([old_z, zs[len(again):]]), loss[len(again):]


def hub_model_id(model: nn.Module) -> str | None:
    """``config._name_or_path`` when it reads as a Hub id (``org/name``), not a local folder; else None."""
    name = getattr(model.config, "_name_or_path", "") or ""
    local = name.startswith(".") or os.path.isabs(name) or os.path.exists(name)
    if not name or local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    return name


@contextmanager
def _active(model: nn.Module, packs: Sequence[EditPack]) -> Iterator[None]:
    """The packs attached in order (those the caller has not attached or merged already), detached on exit."""
    from .apply import active_packs, attach, detach

    already = {p.pack_id for p in active_packs(model)}
    attached = []
    try:
        for pack in packs:
            if pack.pack_id not in already:
                attach(pack, model)
                attached.append(pack)
        yield
    finally:
        for pack in reversed(attached):
            detach(pack, model)


def _spread_over_layers(model, spec, tokenizer, requests, templates, config, zs, stats, progress, keep_factors,
                        prior: _KeyRows | None = None, kept: Mapping[int, SecondMoment] | None = None
                        ) -> dict[int, LayerDelta]:
    """Eqn. 14 layer by layer, ascending; each new delta is active (hooked) while later layers are solved.

    The spec measures layer l_p's keys and block L's output ``cur`` on the current model, the deltas of
    l_1..l_{p-1} applied; both come from the same forward, and none can come earlier, since each pass needs the
    delta the previous one solved for: one pass per edited layer is the fewest. Each pass stops as soon as it has
    what it measures (the templated prompts at layer l_p's key, the bare prompts at block L) and runs each
    prompt only up to the subject's edit token (what follows cannot reach it in a causal model). With
    ``keep_factors`` (statistics the caller keeps), a Cholesky factor of C computed for the Woodbury route is
    kept on the :class:`SecondMoment` for the next pack. ``prior``: the prompts of earlier packs' requests, whose
    keys at each layer (measured the same way) are added to the preserved second moment: ``C + K₀K₀ᵀ / λ``.
    ``kept``: the second moments of the facts to keep, added as ``C + β·C_keep`` (β: ``config.keep_weight``), one
    layer at a time, on the layer's device; C stands for that sum below.

    With ``config.nullspace_threshold`` > 0 each layer is solved the AlphaEdit way instead
    (:func:`~memit_adapter.solve.projected_update`): the update is confined to the null space of C (its
    eigenvectors below the threshold; with ``keep_factors`` the basis is kept for the next pack, see
    :func:`~memit_adapter.solve.cached_null_space`), and the earlier packs' keys ``K₀`` join the new ones in
    ``P(KKᵀ + K₀K₀ᵀ) + αI`` rather than C (C stays the corpus's, plus the facts to keep's, and with no facts to
    keep its basis may be kept).
    The pack keeps the low-rank form ``B = R`` ``(d_out, n)``, ``A`` ``(n, d_in)``.
    """
    rows = _key_rows(tokenizer, requests, templates, config.subject_keys)
    projected = config.nullspace_threshold > 0  # AlphaEdit's null-space solve instead of MEMIT's λC one
    lam = config.update_weight(len(requests) + (len(prior.bare) if prior is not None else 0))  # all keys solved for
    sizer = ChunkSizer(config.v_batch_size, input_device(model))
    deltas: dict[int, LayerDelta] = {}
    with _hooked_deltas(model, spec) as active:
        for pos, layer in enumerate(tqdm(config.layers, desc="layers", disable=not progress)):
            device = execution_device(model, spec.mlp_out_name(layer))  # the layer's solve runs where its keys are
            keys, cur = _keys_and_outputs(model, spec, rows, pad_id(tokenizer), layer, max(config.layers), sizer)
            residuals = (zs.to(cur.device) - cur).T / (len(config.layers) - pos)  # (d_model, n)
            stat, factor, keeps = stats[layer], None, keep_factors  # keeps: whether stat's factors may be kept
            if kept is not None:  # a new matrix for this pack
                stat, keeps = stat.plus(kept[layer], config.keep_weight, device=device), False
            if projected:
                k0 = None if prior is None else _keys_and_outputs(model, spec, prior, pad_id(tokenizer), layer, layer,
                                                                  sizer)[0]
                B, A, how = _projected(stat, keys, residuals, k0, config, device, keeps)
            else:
                if prior is not None:
                    k0, _ = _keys_and_outputs(model, spec, prior, pad_id(tokenizer), layer, layer, sizer)
                    stat, keeps = stat.plus(SecondMoment(mom2=k0.T @ k0, count=len(k0)), 1 / lam, device=device), False
                if woodbury_pays(len(requests), keys.shape[1], stat.has_factor()):
                    factor = stat.factor(device) if keeps else cov_factor(stat.mom2.to(device))
                B, A = layer_update(keys.T, residuals, stat.mom2, lam, factor=factor)
                how = "Woodbury" if factor is not None else "dense"
            deltas[layer] = LayerDelta(B=B.float(), A=A.float())
            active[layer] = deltas[layer]
            if logger.isEnabledFor(logging.INFO):
                logger.info("layer %d: |residual| %.3f, |ΔW| %.4g, %s solve", layer, residuals.norm().item(),
                            _frobenius(B, A), how)
    return deltas


def _projected(stat: SecondMoment, keys: torch.Tensor, residuals: torch.Tensor, k0: torch.Tensor | None,
               config: MemitConfig, device, keep: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One layer's AlphaEdit update ``(B, A, description)`` from the keys ``(n, d_in)``, the earlier packs' keys
    ``k0`` ``(n_p, d_in)`` or None, and the null space of ``stat.mom2`` (the corpus's C, plus the facts to keep's
    when there are some), kept on the host for the next pack when ``keep``."""
    threshold, reference = config.nullspace_threshold, config.nullspace_threshold_of
    space = (cached_null_space(stat.mom2, threshold, reference, device) if keep
             else null_space(stat.mom2.to(device), threshold, reference))
    B, A = projected_update(keys.T, residuals, space, config.nullspace_l2,
                            prior_keys=None if k0 is None else k0.T.to(keys.device))
    return B, A, f"null-space (dim {space.dim} of {space.eigenvalues.numel()}, eigenvalues < {space.threshold:.3g})"


def _frobenius(B: torch.Tensor, A: torch.Tensor) -> float:
    """``|B A|_F``, from the n x n Gram matrices when they are smaller than ``B A``."""
    if B.shape[1] ** 2 < B.shape[0] * A.shape[1]:
        return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())
    return float(torch.linalg.matrix_norm(B @ A))


@dataclass
class _KeyRows:
    """Each request's prompts as token ids cut after the subject's edit token (where keys and ``cur`` are read;
    no later token can reach it in a causal model): the bare one and the others whose keys are averaged (one per
    prefixed context template; with ``subject_keys`` also the subject alone after each of them and bare)."""

    bare: list[list[int]]  # n rows
    templated: list[list[list[int]]]  # n x (len(templates) - 1) rows, or n x (2 * len(templates) - 1)


def _key_rows(tokenizer, requests: list[EditRequest], templates: list[str], subject_keys: bool = False) -> _KeyRows:
    """The rows a key is read from (see ``MemitConfig.subject_keys``)."""
    def cut(template: str, req: EditRequest, prompt: str) -> list[int]:
        fact = encode_fact(tokenizer, template.replace("{}", prompt), req.subject, subject_token=req.subject_token)
        return fact.ids[: fact.lookup + 1]

    alone = templates[1:] + templates[:1] if subject_keys else []  # the subject with nothing of the prompt
    return _KeyRows([cut(templates[0], r, r.prompt) for r in requests],
                    [[cut(t, r, r.prompt) for t in templates[1:]] + [cut(t, r, "{}") for t in alone]
                     for r in requests])


@torch.no_grad()
def _keys_and_outputs(model, spec, rows: _KeyRows, pad: int, layer: int, last: int, sizer: ChunkSizer
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``layer`` (mean over the templated rows, then mean with the bare one) ``(n, d_in)`` and block
    ``last``'s output at the bare prompt ``(n, d_model)``, both float32, in chunks of requests of ``sizer``; each on
    the device its module runs on.

    Memory on the model's device: the results, ``n·(d_in + d_model)·4`` bytes, plus one forward of a chunk's
    ``c·t`` rows of at most ``w`` tokens (``t`` templates; ``2t - 1`` with ``subject_keys``) without gradients:
    about ``c·t·w·(4·d_model + 3·d_ff)`` elements of the model's dtype at the widest block (``+ c·t·heads·w²`` with
    eager attention), and ``c·t`` keys in float32. 10,000 requests of 6 templates on a 7B model (d_ff 11,008),
    chunks of 32, w = 24: 0.6 GB of results, about 0.5 GB a forward (about twice that with ``subject_keys``).
    """
    device = input_device(model)
    n, t = len(rows.bare), 1 + len(rows.templated[0])
    d_in, d_model = spec.weight_shape(model, layer)[1], spec.weight_shape(model, last)[0]
    keys = torch.empty(n, d_in, device=execution_device(model, spec.mlp_out_name(layer)))
    cur = torch.empty(n, d_model, device=execution_device(model, spec.block_name(last)))

    def run(chunk: list[int]) -> None:
        k_bare, c = _run_until(model, spec, [rows.bare[i] for i in chunk], pad, device, layer, last)
        if t > 1:
            k, _ = _run_until(model, spec, [s for i in chunk for s in rows.templated[i]], pad, device, layer)
            k_bare = 0.5 * (k_bare + k.to(k_bare.device).reshape(len(chunk), t - 1, -1).mean(1))
        keys[chunk], cur[chunk] = k_bare.to(keys.device), c.to(cur.device)

    sizer.run([[i] for i in range(n)], run, desc=f"keys of layer {layer}", progress=False)
    return keys, cur


def _run_until(model, spec, seqs: list[list[int]], pad: int, device, layer: int, last: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input of ``layer``'s ``W_out`` at the last token of each of ``seqs`` ``(rows, d_in)`` and, with ``last``,
    block ``last``'s output there ``(rows, d_model)``, float32, from a forward that stops once it has them."""
    ids, mask = pad_right(seqs, pad, device)
    rows = torch.arange(len(seqs), device=device)
    at = torch.tensor([len(s) - 1 for s in seqs], device=device)
    seen: dict[str, torch.Tensor] = {}

    def at_key(_mod, args):
        x = args[0]  # as the module was called: on the device of the module before it
        seen["keys"] = x[rows.to(x.device), at.to(x.device)].float()
        if last is None:
            raise StopForward

    def at_output(_mod, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        seen["cur"] = h[rows.to(h.device), at.to(h.device)].float()
        raise StopForward

    handles = [spec.mlp_out_module(model, layer).register_forward_pre_hook(at_key)]
    if last is not None:
        handles.append(spec.blocks(model)[last].register_forward_hook(at_output))
    try:
        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen["keys"], seen.get("cur")


@contextmanager
def _hooked_deltas(model, spec) -> Iterator[dict[int, LayerDelta]]:
    """Yield a dict; every delta put in it is added to its layer's ``W_out`` output until exit, in float32: as
    ``(x Aᵀ) Bᵀ``, or as ``x ΔWᵀ`` once the rank n passes ``n* = d_in·d_out / (d_in + d_out)`` (the dense matrix
    is then the smaller one, and the cheaper product)."""
    active: dict[int, LayerDelta] = {}
    cache: dict[int, list[torch.Tensor]] = {}

    def make_hook(layer):
        def hook(_mod, args, out):
            if layer not in active:
                return None
            if layer not in cache:
                d = active[layer]
                (n, d_in), d_out = d.A.shape, d.B.shape[0]
                factors = [(d.B @ d.A).T] if n * (d_in + d_out) > d_in * d_out else [d.A.T, d.B.T]
                cache[layer] = [m.to(out.device) for m in factors]
            y = args[0].to(out.device).float()  # the input as the module was called, maybe on another device
            for m in cache[layer]:
                y = y @ m
            return out + y.to(out.dtype)
        return hook

    handles = [spec.mlp_out_module(model, layer).register_forward_hook(make_hook(layer))
               for layer in range(spec.num_layers(model))]
    try:
        yield active
    finally:
        for h in handles:
            h.remove()


def _check_encodings(tokenizer, requests: list[EditRequest], templates: list[str], limit: int | None) -> None:
    """Encode every request with every context template: tokenisation errors (a subject without tokens of its
    own, an empty target) raise here, and :class:`InvalidRequestError` names the first request whose longest
    prompt and target exceed the model's context of ``limit`` positions."""
    for req in requests:
        longest = max(len(encode_fact(tokenizer, t.replace("{}", req.prompt), req.subject, req.target_new).ids)
                      for t in templates)
        if limit is not None and longest > limit:
            raise InvalidRequestError(f"request {req.text!r} -> {req.target_new!r} is {longest} tokens with its "
                                      f"longest context template, past the model's {limit} positions; shorten it")


def _check_stats(stats: Mapping[int, SecondMoment], layers: list[int]) -> None:
    missing = [layer for layer in layers if layer not in stats]
    if missing:
        raise StatisticsError(f"statistics given for layers {sorted(stats)} but not for edited layers {missing}")
    for layer in layers:
        stats[layer].check_finite(layer)
