"""Architecture knowledge as data: where the edited MLP projection, blocks and head live.

Usage::

    spec = get_arch_spec(model)                 # looks up model.config.model_type
    module = spec.mlp_out_module(model, 3)             # the W_out of layer 3
    register_architecture("my_gpt", ArchSpec(layers="body.blocks", mlp_out="ff.out", ...))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .devices import offload_entry
from .errors import ModelError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one model family. Paths are dotted attribute names.

    ``layers`` is the ``ModuleList`` of transformer blocks; ``mlp_out`` the edited projection inside
    one block (its input is the key ``k``, its output the value ``m``); ``embed`` the token
    embedding; ``final_norm`` the last normalisation; ``transposed`` is True when the weight is
    stored ``(d_in, d_out)`` as GPT-2's ``Conv1D`` does (``nn.Linear`` stores ``(d_out, d_in)``);
    ``attn`` and ``mlp`` are the attention and MLP submodules of one block (used by causal tracing;
    guessed from the block's children when None).
    """

    layers: str
    mlp_out: str
    embed: str
    final_norm: str
    transposed: bool = False
    attn: str | None = None
    mlp: str | None = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def mlp_out_name(self, layer: int) -> str:
        """Full module name of the edited projection of ``layer``, e.g. ``transformer.h.3.mlp.c_proj``."""
        return f"{self.layers}.{layer}.{self.mlp_out}"

    def block_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def mlp_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.mlp_out_name(layer))

    def weight_shape(self, model: nn.Module, layer: int) -> tuple[int, int]:
        """``(d_out, d_in)`` of the edited projection, whatever its storage orientation."""
        w = self.mlp_out_module(model, layer).weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    def delta_to_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """Turn a ``(d_out, d_in)`` delta into the layout of the stored weight."""
        return delta.T if self.transposed else delta


_LLAMA_LIKE = ArchSpec(layers="model.layers", mlp_out="mlp.down_proj", embed="model.embed_tokens",
                       final_norm="model.norm", attn="self_attn", mlp="mlp")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(layers="transformer.h", mlp_out="mlp.c_proj", embed="transformer.wte",
                     final_norm="transformer.ln_f", transposed=True, attn="attn", mlp="mlp"),
    "gptj": ArchSpec(layers="transformer.h", mlp_out="mlp.fc_out", embed="transformer.wte",
                     final_norm="transformer.ln_f", attn="attn", mlp="mlp"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", embed="gpt_neox.embed_in",
                         final_norm="gpt_neox.final_layer_norm", attn="attention", mlp="mlp"),
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")},
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Add or replace the entry used for models whose ``config.model_type`` is ``model_type``."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    ARCHITECTURES[model_type] = spec


def get_arch_spec(model: nn.Module, spec: ArchSpec | None = None) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``: ``spec`` when given, else the table entry of its model type."""
    if spec is not None:
        return spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"no architecture entry for model_type={model_type!r}; known: {sorted(ARCHITECTURES)}. "
            "Pass arch=ArchSpec(...) or call memit_adapter.register_architecture(model_type, ArchSpec(...))."
        )
    return ARCHITECTURES[model_type]


def check_model(model: nn.Module, tokenizer=None, spec: ArchSpec | None = None) -> ArchSpec:
    """:func:`get_arch_spec`, after checking what would otherwise fail deep inside the work: every path of the
    spec names a submodule of ``model`` and each edited projection has a 2-D weight
    (:class:`UnsupportedArchitectureError`); no weight is on the meta device and ``tokenizer`` (when given) has
    no id past the input embedding (:class:`ModelError`)."""
    spec = get_arch_spec(model, spec)
    name = type(model).__name__

    def module(path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError as e:
            raise UnsupportedArchitectureError(
                f"the ArchSpec does not fit {name}: {path!r} is not a submodule of it ({e}). Fix the spec passed as "
                "arch= or given to register_architecture (print(model) shows the module names)") from None

    blocks = module(spec.layers)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UnsupportedArchitectureError(f"the ArchSpec does not fit {name}: layers={spec.layers!r} is a "
                                           f"{type(blocks).__name__}, not a non-empty ModuleList of blocks")
    for path in [spec.embed, spec.final_norm] + [spec.mlp_out_name(i) for i in range(len(blocks))]:
        weight = getattr(module(path), "weight", None)
        if path != spec.final_norm and not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
            raise UnsupportedArchitectureError(f"the ArchSpec does not fit {name}: {path!r} has no 2-D weight")
    meta = [n for n, p in model.named_parameters() if p.is_meta and not _offloaded(model, n)]
    if meta:
        raise ModelError(f"{len(meta)} weights of {name} are on the meta device (e.g. {meta[0]}) and hold no values; "
                         "load the model's weights (not with init_empty_weights or device_map='meta') first")
    if tokenizer is not None:
        n_rows = module(spec.embed).weight.shape[0]
        if len(tokenizer) > n_rows:
            raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but {name}'s input embedding only {n_rows} "
                             "rows: is it this model's tokenizer? After adding tokens, call "
                             "model.resize_token_embeddings(len(tokenizer))")
    return spec


def _offloaded(model: nn.Module, param_name: str) -> bool:
    """Whether a meta-device parameter is offloaded by accelerate (a hook loads its values for each forward),
    rather than simply empty."""
    return offload_entry(model, param_name) is not None


def max_positions(model: nn.Module) -> int | None:
    """The longest input ``model`` takes (``n_positions`` / ``max_position_embeddings``), or ``None``."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
