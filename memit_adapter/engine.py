"""``compute_edits``: from edit requests to per-layer deltas, without changing the model.

Usage::

    pack = compute_edits(model, tok, [EditRequest("{} plays the sport of", "Michael Jordan", " baseball")],
                         MemitConfig.for_model(model), corpus=texts, cache_dir="stats-cache")
    pack.deltas["transformer.h.3.mlp.c_proj"].weight_delta()     # (d_out, d_in)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, get_arch_spec, max_positions
from .config import MemitConfig
from .errors import ConfigError, InvalidRequestError, StatisticsError
from .fingerprint import weights_fingerprint
from .hooks import capture_inputs, capture_outputs
from .pack import EditPack, LayerDelta
from .requests import EditRequest, as_requests, check_requests
from .solve import layer_update
from .stats import SecondMoment, StatsCache, collect_stats
from .targets import _build_batch, compute_targets, context_templates
from .tokens import encode_fact

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
) -> EditPack:
    """Compute the MEMIT update of every edited layer; return it as an :class:`EditPack`.

    ``corpus`` (texts, a .txt/.jsonl path or a ``datasets.Dataset``) and/or ``cache_dir`` provide the
    second-moment statistics; ``stats`` passes precomputed ones (see :func:`collect_stats`). ``config``
    defaults to :meth:`MemitConfig.for_model`. The model's weights are never written: edits of earlier
    layers act through forward hooks while later layers are computed, and every hook is removed when this
    returns or raises.
    """
    requests = as_requests(requests)
    check_requests(requests)
    spec = get_arch_spec(model, arch)
    config = config or MemitConfig.for_model(model)
    n_layers = spec.num_layers(model)
    if max(config.layers) >= n_layers:
        raise ConfigError(f"layers {config.layers} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    for req in requests:  # tokenisation errors (subject without tokens, empty target) before any work
        encode_fact(tokenizer, req.prompt, req.subject, req.target_new)
    names = [spec.mlp_out_name(layer) for layer in config.layers]
    fingerprint = weights_fingerprint(model, names)

    with _eval_mode(model):
        templates = context_templates(model, tokenizer, config)
        _check_lengths(tokenizer, requests, templates, max_positions(model))  # before any long work
        if stats is None:
            stats = collect_stats(model, tokenizer, corpus, config.layers, n_samples=config.mom2_n_samples,
                                  max_length=config.mom2_max_length, max_tokens=config.mom2_max_tokens,
                                  batch_size=config.stats_batch_size,
                                  dtype=config.mom2_dtype, cache=StatsCache(cache_dir) if cache_dir else None,
                                  arch=spec, progress=progress)
        _check_stats(stats, config.layers)
        last = max(config.layers)
        zs, _ = compute_targets(model, spec, tokenizer, requests, templates, config, last,
                                batch_size=config.v_batch_size, progress=progress)  # (n, d_model)
        deltas = _spread_over_layers(model, spec, tokenizer, requests, templates, config, zs, stats, progress)

    return EditPack(deltas={name: deltas[layer] for name, layer in zip(names, config.layers)},
                    requests=requests, config=config, model_type=model.config.model_type,
                    fan_in_fan_out=spec.transposed, base_model=hub_model_id(model), fingerprint=fingerprint)


def hub_model_id(model: nn.Module) -> str | None:
    """``config._name_or_path`` when it reads as a Hub id (``org/name``), not a local folder; else None."""
    name = getattr(model.config, "_name_or_path", "") or ""
    local = name.startswith(".") or os.path.isabs(name) or os.path.exists(name)
    if not name or local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    return name


def _spread_over_layers(model, spec, tokenizer, requests, templates, config, zs, stats, progress
                        ) -> dict[int, LayerDelta]:
    """Eqn. 14 layer by layer, ascending; each new delta is active (hooked) while later layers are solved."""
    deltas: dict[int, LayerDelta] = {}
    with _hooked_deltas(model, spec) as active:
        for pos, layer in enumerate(tqdm(config.layers, desc="layers", disable=not progress)):
            keys, cur = _keys_and_outputs(model, spec, tokenizer, requests, templates, layer, max(config.layers))
            residuals = (zs - cur).T / (len(config.layers) - pos)  # (d_model, n)
            cov = stats[layer].mom2.to(keys.device)
            B, A = layer_update(keys.T, residuals, cov, config.mom2_update_weight)
            deltas[layer] = LayerDelta(B=B.float(), A=A.float())
            active[layer] = deltas[layer]
            logger.info("layer %d: |residual| %.3f, |ΔW| %.4g", layer, residuals.norm().item(),
                        torch.linalg.matrix_norm(B @ A).item())
    return deltas


@torch.no_grad()
def _keys_and_outputs(model, spec, tokenizer, requests, templates, layer, last) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at ``layer`` (mean over prefixed templates, then mean with the bare one) ``(n, d_in)`` and block
    ``last``'s output at the bare prompt ``(n, d_model)``, both float32, from one forward pass."""
    bare = [EditRequest(r.prompt, r.subject, r.target_new) for r in requests]
    batch = _build_batch(tokenizer, bare, templates, next(model.parameters()).device)
    n, t = len(requests), len(templates)
    rows = torch.arange(batch.n_rewrite_rows, device=batch.input_ids.device)
    with capture_inputs(spec.mlp_out_module(model, layer)) as k_in, capture_outputs(spec.blocks(model)[last]) as outs:
        model.base_model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows], use_cache=False)
    k = k_in[0][rows, batch.lookup[rows]].float().reshape(n, t, -1)
    keys = k[:, 0] if t == 1 else 0.5 * (k[:, 0] + k[:, 1:].mean(1))
    cur = outs[0][rows, batch.lookup[rows]].float().reshape(n, t, -1)[:, 0]
    return keys, cur


@contextmanager
def _hooked_deltas(model, spec) -> Iterator[dict[int, LayerDelta]]:
    """Yield a dict; every delta put in it is added to its layer's ``W_out`` output until exit."""
    active: dict[int, LayerDelta] = {}
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(layer):
        def hook(_mod, args, out):
            if layer not in active:
                return None
            if layer not in cache:
                d = active[layer]
                cache[layer] = (d.A.to(out.device), d.B.to(out.device))
            A, B = cache[layer]
            return out + ((args[0].float() @ A.T) @ B.T).to(out.dtype)
        return hook

    handles = [spec.mlp_out_module(model, layer).register_forward_hook(make_hook(layer))
               for layer in range(spec.num_layers(model))]
    try:
        yield active
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_lengths(tokenizer, requests: list[EditRequest], templates: list[str], limit: int | None) -> None:
    """Raise :class:`InvalidRequestError` naming the first request whose longest prompt (with a context
    template) and target exceed the model's context of ``limit`` positions."""
    if limit is None:
        return
    for req in requests:
        longest = max(len(encode_fact(tokenizer, t.replace("{}", req.prompt), req.subject, req.target_new).ids)
                      for t in templates)
        if longest > limit:
            raise InvalidRequestError(f"request {req.text!r} -> {req.target_new!r} is {longest} tokens with its "
                                      f"longest context template, past the model's {limit} positions; shorten it")


def _check_stats(stats: Mapping[int, SecondMoment], layers: list[int]) -> None:
    missing = [layer for layer in layers if layer not in stats]
    if missing:
        raise StatisticsError(f"statistics given for layers {sorted(stats)} but not for edited layers {missing}")
    for layer in layers:
        stats[layer].check_finite(layer)
