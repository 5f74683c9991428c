"""Helpers for the EditPack tests: random low-rank packs on tiny models (no MEMIT engine needed)."""

from __future__ import annotations

import torch

from memit_adapter.arch import get_arch_spec
from memit_adapter.config import MemitConfig
from memit_adapter.fingerprint import weights_fingerprint
from memit_adapter.pack import EditPack, LayerDelta
from memit_adapter.requests import EditRequest

SUBJECTS = ("michael jordan", "lebron james", "danielle darrieux", "toko yuki", "alpha", "beta", "gamma", "delta",
            "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi")
TARGETS = (" baseball", " soccer", " tennis", " golf", " hockey")


def make_requests(n: int, *, offset: int = 0, target_offset: int = 0) -> list[EditRequest]:
    return [EditRequest("{} plays the sport of", SUBJECTS[(i + offset) % len(SUBJECTS)] + ("" if i + offset < 20 else
                        f" {i + offset}"), TARGETS[(i + target_offset) % len(TARGETS)], target_true=" basketball",
                        case_id=i + offset) for i in range(n)]


def random_pack(model, *, layers=(1, 2), rank: int = 2, rel: float = 0.1, seed: int = 0, n_requests: int | None = None,
                offset: int = 0, dtype: torch.dtype = torch.float32, **pack_kwargs) -> EditPack:
    """A pack of random rank-``rank`` deltas with ``‖ΔW‖ / ‖W‖ = rel`` on the MLP output of ``layers``."""
    spec = get_arch_spec(model)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in layers:
        name = spec.mlp_out_name(layer)
        d_out, d_in = spec.weight_shape(model, layer)
        B, A = torch.randn(d_out, rank, generator=gen), torch.randn(rank, d_in, generator=gen)
        w_norm = float(spec.mlp_out_module(model, layer).weight.detach().float().norm())
        scale = (rel * w_norm / float((B @ A).norm())) ** 0.5
        deltas[name] = LayerDelta(B=(B * scale).to(dtype), A=(A * scale).to(dtype))
    names = list(deltas)
    kwargs = dict(base_model=f"tiny-random/{model.config.model_type}", fingerprint=weights_fingerprint(model, names))
    kwargs.update(pack_kwargs)
    return EditPack(deltas=deltas, requests=make_requests(n_requests or rank, offset=offset),
                    config=MemitConfig(layers=list(layers), mom2_update_weight=100.0),
                    model_type=model.config.model_type, fan_in_fan_out=spec.transposed, **kwargs)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit (``-0.0`` and ``0.0`` differ, NaN equals itself)."""
    return a.keys() == b.keys() and all(_bits(a[k]).equal(_bits(b[k])) for k in a)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints) if t.is_floating_point() else t
