"""FT-W, the MEMIT paper's fine-tuning baseline: one layer's MLP output projection trained on the new targets.

Usage::

    pack = compute_ft_edits(model, tok, requests, FtConfig.for_model(model))
    pack.deltas["transformer.h.21.mlp.fc_out"].weight_delta()     # the change of that weight

The loss of a request is the mean negative log-likelihood of its target tokens after its rewrite prompt (encoded
as everywhere else, :func:`~memit_adapter.tokens.encode_continuation`). Adam runs epochs over the requests in
batches of ``batch_size``; the weight decay acts on the whole weight ``W + ΔW`` as Adam's own ``weight_decay``
does on a fine-tuned weight (a gradient ``weight_decay · (W + ΔW)``); an epoch whose mean loss is below
``loss_threshold`` ends the training. Only ``ΔW`` is trained, through a forward hook: the model's weights are
never written. Needs no statistics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, check_model
from .devices import input_device, module_weight
from .distributed import is_main
from .engine import hub_model_id
from .errors import ConfigError, MemitError
from .fingerprint import weights_fingerprint
from .method_configs import FtConfig
from .modes import evaluating
from .pack import EditPack, LayerDelta
from .requests import EditRequest, as_requests, check_requests
from .tokens import encode_continuation, pad_id, pad_right


def compute_ft_edits(
    model: nn.Module,
    tokenizer,
    requests: Iterable[EditRequest | Mapping[str, Any]],
    config: FtConfig | None = None,
    *,
    arch: ArchSpec | None = None,
    progress: bool = True,
    **_unused: Any,
) -> EditPack:
    """FT-W's change of ``config.layer``'s output projection for ``requests`` (default :meth:`FtConfig.for_model`),
    as an :class:`EditPack` (dense, or low rank where that is smaller). ``corpus``, ``cache_dir`` and ``stats`` are
    accepted for the signature :func:`~memit_adapter.compute_edits` shares, and not used."""
    requests = as_requests(requests)
    check_requests(requests)
    spec = check_model(model, tokenizer, arch)
    config = config or FtConfig.for_model(model)
    if config.layer >= spec.num_layers(model):
        raise ConfigError(f"layer {config.layer} out of range: the model has {spec.num_layers(model)} layers")
    name = spec.mlp_out_name(config.layer)
    fingerprint = weights_fingerprint(model, [name])
    device = input_device(model)
    encoded = [encode_continuation(tokenizer, r.text, r.target_new) for r in requests]
    weight = module_weight(model, name).detach().float()
    weight = (weight.T if spec.transposed else weight).to(device)  # (d_out, d_in)
    delta = torch.zeros_like(weight, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)
    pad = pad_id(tokenizer)
    clock = time.perf_counter()
    epochs_run, losses = 0, []
    with evaluating(model), _trained_delta(model, spec, config.layer, delta):
        for _ in tqdm(range(config.num_steps), desc="FT-W epochs", disable=not (progress and is_main())):
            total = 0.0
            for start in range(0, len(requests), config.batch_size):
                batch = encoded[start:start + config.batch_size]
                loss = _target_nll(model, batch, pad, device)
                (grad,) = torch.autograd.grad(loss, [delta])
                delta.grad = grad + config.weight_decay * (weight + delta.detach())
                opt.step()
                if config.norm_constraint is not None:
                    with torch.no_grad():
                        delta.clamp_(-config.norm_constraint, config.norm_constraint)
                total += float(loss.detach()) * len(batch)
            epochs_run += 1
            losses.append(total / len(requests))
            if not torch.isfinite(torch.tensor(losses[-1])):
                raise MemitError(f"the FT-W loss is not finite in epoch {epochs_run}; lower lr")
            if losses[-1] < config.loss_threshold:
                break
    pack = EditPack(deltas={name: LayerDelta(dense=delta.detach().cpu())}, requests=requests, config=config,
                    model_type=model.config.model_type,
                    fan_in_fan_out=spec.transposed, base_model=hub_model_id(model), fingerprint=fingerprint)
    pack.report = {"seconds": {"fine-tuning": time.perf_counter() - clock}, "epochs": epochs_run,
                   "epoch_loss": losses}
    return pack


def _target_nll(model: nn.Module, batch: list[tuple[list[int], list[int]]], pad: int, device) -> torch.Tensor:
    """Mean over the batch of each request's mean target-token NLL."""
    ids, mask = pad_right([p + t for p, t in batch], pad, device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    losses = []
    for row, (prompt, target) in enumerate(batch):
        at = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1, device=device)
        losses.append(F.cross_entropy(logits[row, at], torch.tensor(target, device=device)))
    return torch.stack(losses).mean()


@contextmanager
def _trained_delta(model: nn.Module, spec: ArchSpec, layer: int, delta: torch.Tensor) -> Iterator[None]:
    """``delta`` ``(d_out, d_in)`` added to ``layer``'s output projection through a forward hook, with gradients
    (the engine's hooks add fixed deltas without them)."""
    def hook(_mod, args, out):
        return out + (args[0].to(delta.device).float() @ delta.T).to(out.device, out.dtype)

    handle = spec.mlp_out_module(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
