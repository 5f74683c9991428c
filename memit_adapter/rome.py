"""ROME (Meng et al., 2022) as the MEMIT paper runs it on many edits: one rank-one update per request, in order,
each computed on the model with the earlier ones applied; all of them stacked into one pack.

Usage::

    pack = compute_rome_edits(model, tok, requests, RomeConfig.for_model(model), corpus=texts)
    pack.deltas["transformer.h.5.mlp.fc_out"].rank        # == len(requests)

For request i at layer l, with ``C`` the keys' second moment, ``k*`` the key at the subject's edit token averaged
over the context templates (the mean of the prefixed ones, then with the bare prompt: the engine's key), ``k`` the
bare prompt's key, ``δ`` the change of layer l's output there that makes the target likely (optimised as MEMIT's
target vectors are, :func:`~memit_adapter.targets.compute_targets` at layer l) and ``W`` the weight with the
earlier updates: ``v* = W k + δ`` and

* r-ROME (Gupta et al., 2024; the default): ``ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)``, so ``ΔW k* = v* − W k*``;
* the published code (``original_key=True``): ``ΔW = δ (C⁻¹k*)ᵀ / (kᵀ C⁻¹ k*)``, so ``ΔW k = δ``.

Keys at layer l are read before layer l's output projection, which is the only weight ROME changes: they do not
move with the earlier edits and are computed for all requests at once; only ``δ`` (and ``W k``) need the edits
before it. Cost: n target-vector optimisations of one request each (the published 4 s an edit on GPT-J).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, check_model, max_positions
from .devices import input_device, module_weight
from .distributed import is_main
from .engine import (
    _check_encodings,
    _check_stats,
    _hooked_deltas,
    _key_rows,
    _keys_and_outputs,
    _run_until,
    hub_model_id,
)
from .errors import ConfigError
from .fingerprint import weights_fingerprint
from .method_configs import RomeConfig
from .modes import evaluating
from .pack import EditPack, LayerDelta
from .requests import EditRequest, as_requests, check_requests
from .stats import SecondMoment, collect_stats_for
from .targets import UNCONVERGED_NLL, ChunkSizer, compute_targets, context_templates
from .tokens import pad_id


def compute_rome_edits(
    model: nn.Module,
    tokenizer,
    requests: Iterable[EditRequest | Mapping[str, Any]],
    config: RomeConfig | None = None,
    *,
    corpus: Any = None,
    cache_dir: str | os.PathLike | None = None,
    stats: Mapping[int, SecondMoment] | None = None,
    arch: ArchSpec | None = None,
    progress: bool = True,
) -> EditPack:
    """ROME's updates of ``requests``, one after the other, as one :class:`EditPack` of rank ``len(requests)`` at
    ``config.layer`` (default :meth:`RomeConfig.for_model`). Inputs as :func:`~memit_adapter.compute_edits`; the
    model's weights are never written (earlier updates act through a forward hook)."""
    requests = as_requests(requests)
    check_requests(requests)
    spec = check_model(model, tokenizer, arch)
    config = config or RomeConfig.for_model(model)
    if config.layer >= spec.num_layers(model):
        raise ConfigError(f"layer {config.layer} out of range: the model has {spec.num_layers(model)} layers")
    layer, zcfg = config.layer, config.z_config()
    name = spec.mlp_out_name(layer)
    fingerprint = weights_fingerprint(model, [name])
    progress = progress and is_main()
    seconds: dict[str, float] = {"targets": 0.0, "update": 0.0}
    clock = time.perf_counter()
    with evaluating(model):
        templates = context_templates(model, tokenizer, zcfg)
        _check_encodings(tokenizer, requests, templates, max_positions(model))
        if stats is None:
            stats = collect_stats_for(model, tokenizer, corpus, [layer], config, cache_dir=cache_dir, arch=spec,
                                      progress=progress)
        _check_stats(stats, [layer])
        seconds["statistics"], clock = time.perf_counter() - clock, time.perf_counter()
        rows = _key_rows(tokenizer, requests, templates)
        sizer = ChunkSizer(zcfg.v_batch_size, input_device(model))
        k_star, _ = _keys_and_outputs(model, spec, rows, pad_id(tokenizer), layer, layer, sizer)  # (n, d_in)
        k_bare, _ = _run_until(model, spec, rows.bare, pad_id(tokenizer), input_device(model), layer)
        left = _left_vectors(stats[layer], k_star)  # (n, d_in): C⁻¹k*
        weight = _weight(model, spec, name).to(left.device)  # (d_out, d_in) float64
        B = torch.zeros(weight.shape[0], 0, dtype=torch.float64, device=left.device)
        A = torch.zeros(0, weight.shape[1], dtype=torch.float64, device=left.device)
        nll = []
        seconds["update"], clock = time.perf_counter() - clock, time.perf_counter()
        for i in tqdm(range(len(requests)), desc="ROME edits", disable=not progress):
            with _hooked_deltas(model, spec) as active:
                if i:
                    active[layer] = LayerDelta(B=B.float(), A=A.float())
                z, h, loss = compute_targets(model, spec, tokenizer, [requests[i]], templates, zcfg, layer,
                                             batch_size=1, progress=False, return_loss=True)
            t = time.perf_counter()
            seconds["targets"] += t - clock
            delta = (z - h)[0].double().to(left.device)
            ks, kb, u = k_star[i].double().to(left.device), k_bare[i].double().to(left.device), left[i]
            if config.original_key:
                right, denom = delta, kb @ u
            else:  # W k - W k* with the earlier updates: v* - W k* = δ + W_eff (k - k*)
                diff = kb - ks
                right, denom = delta + weight @ diff + B @ (A @ diff), ks @ u
            B, A = torch.cat([B, right[:, None]], 1), torch.cat([A, (u / denom)[None]], 0)
            nll.append(float(loss[0]))
            clock = time.perf_counter()
            seconds["update"] += clock - t
    pack = EditPack(deltas={name: LayerDelta(B=B.float(), A=A.float())}, requests=requests, config=config,
                    model_type=model.config.model_type, fan_in_fan_out=spec.transposed,
                    base_model=hub_model_id(model), fingerprint=fingerprint)
    pack.report = {"seconds": seconds, "z_nll": nll, "unconverged": [i for i, x in enumerate(nll)
                                                                     if x > UNCONVERGED_NLL]}
    return pack


def _left_vectors(stat: SecondMoment, keys: torch.Tensor) -> torch.Tensor:
    """``C⁻¹ k*`` for every key, float64 ``(n, d_in)``, from the Cholesky factor of C (dead inputs decoupled)."""
    factor = stat.factor(keys.device)
    return torch.cholesky_solve(keys.double().T, factor.chol).T


def _weight(model: nn.Module, spec: ArchSpec, name: str) -> torch.Tensor:
    """The edited module's weight in ``(d_out, d_in)`` layout, float64."""
    w = module_weight(model, name).detach().double()
    return w.T if spec.transposed else w
