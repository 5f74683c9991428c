"""The settings of the baselines the MEMIT paper compares against: ROME and FT-W (fine-tuning with weight decay).

Usage::

    RomeConfig.for_model(model)          # GPT-J: layer 5, 20 steps of lr 0.5, weight decay 0.5, KL 0.0625
    FtConfig.for_model(model)            # GPT-J: layer 21, 25 steps of lr 5e-4, weight decay 5e-4, stop at 1e-2
    config_class("rome")                 # the config dataclass of a method name saved in a pack

Each is a dataclass with the published values as defaults; ``for_model`` picks the published layer for the
published models and a documented rule for the others. The methods are :func:`memit_adapter.rome.compute_rome_edits`
and :func:`memit_adapter.finetune.compute_ft_edits`; both return an :class:`~memit_adapter.pack.EditPack` whose
``config`` is their config (``pack.config.method`` says which method made it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from torch import nn

from .config import CONTEXT_TEMPLATE_STARTS, LLAMA_LIKE, MemitConfig, _first_attr, _non_negative, _positive
from .errors import ConfigError


class _Serialised:
    """``to_dict`` / ``from_dict`` / ``replace`` of a config dataclass (unknown fields refused by name)."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any):
        return replace(self, **changes)


def _check_numbers(cfg: Any, positive: tuple[str, ...], non_negative: tuple[str, ...], ints: tuple[str, ...]) -> None:
    """Counts are ints (``layer`` >= 0, the others >= 1); weights are finite numbers, not flags (MemitConfig's
    rules, :func:`~memit_adapter.config._positive` and ``_non_negative``)."""
    for name in ints:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "layer" else 1):
            raise ConfigError(f"{name} must be an int >= {0 if name == 'layer' else 1}, got {value!r}")
    for name in positive + non_negative:
        if isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be a number, got {getattr(cfg, name)!r}")
    _positive(cfg, *positive)
    _non_negative(cfg, *non_negative)


@dataclass
class RomeConfig(_Serialised):
    """ROME (Meng et al., 2022): one rank-one update of one layer's MLP output projection per request, each
    computed on the model with the earlier ones applied (the way the MEMIT paper runs it on many edits).

    Attributes:
        layer: the edited layer (GPT-J: 5; GPT-2 XL: 17).
        original_key: False (default) is r-ROME (Gupta et al., 2024): the key ``k*`` averaged over the context
            templates is used on both sides of the update, ``ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)``, which
            removes the published code's "disabling edits". True: the published code's update, whose right
            vector divides by the bare prompt's key, ``ΔW = (v* − W k) (C⁻¹k*)ᵀ / (kᵀ C⁻¹ k*)``.
        v_*, clamp_norm_factor, kl_factor, context_*, mom2_*, stats_batch_size, seed: as in
            :class:`~memit_adapter.config.MemitConfig` (the target vector ``v*`` is optimised the same way, at the
            edited layer, for one request at a time).
    """

    method: ClassVar[str] = "rome"
    layer: int = 5
    original_key: bool = False
    v_lr: float = 0.5
    v_lr_relative: bool = False
    v_num_grad_steps: int = 20
    v_loss_threshold: float = 0.05
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    context_templates: list[str] | None = None
    context_template_length: int = 10
    context_template_starts: list[str] = field(default_factory=lambda: list(CONTEXT_TEMPLATE_STARTS))
    context_template_top_k: int = 5
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float32"
    mom2_max_length: int | None = None
    mom2_max_tokens: int | None = None
    stats_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.original_key, bool) or not isinstance(self.v_lr_relative, bool):
            raise ConfigError("original_key and v_lr_relative must be True or False")
        _check_numbers(self, ("v_lr", "clamp_norm_factor"), ("v_loss_threshold", "kl_factor", "v_weight_decay"),
                       ("layer", "v_num_grad_steps", "stats_batch_size"))
        self.z_config()  # every shared field checked by MemitConfig's own rules

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def z_config(self) -> MemitConfig:
        """The :class:`MemitConfig` whose target-vector optimisation at ``layer`` is ROME's ``v*``."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layer", "original_key")}
        return MemitConfig(layers=[self.layer], **shared)

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> RomeConfig:
        """Published settings for GPT-2 XL (layer 17), GPT-J (layer 5) and LLaMA-7B-class models (layer 5, weight
        decay 1e-3, 25 steps: EasyEdit's); other models edit the middle layer of ``MemitConfig.for_model``'s range,
        with its target-vector settings (which were measured on such models; ROME's own layer choice for them
        was not)."""
        cfg = model.config
        model_type = getattr(cfg, "model_type", "")
        shape = (_first_attr(cfg, "n_layer", "num_hidden_layers"), _first_attr(cfg, "n_embd", "hidden_size"))
        if model_type == "gpt2" and shape == (48, 1600):
            preset: dict[str, Any] = dict(layer=17)
        elif model_type == "gptj" and shape == (28, 4096):
            preset = dict(layer=5)
        elif model_type in LLAMA_LIKE and shape == (32, 4096):
            preset = dict(layer=5, v_num_grad_steps=25, v_weight_decay=1e-3)
        else:
            memit = MemitConfig.for_model(model)
            preset = dict(layer=memit.layers[(len(memit.layers) - 1) // 2],
                          **{k: getattr(memit, k) for k in ("v_lr", "v_lr_relative", "v_num_grad_steps",
                                                            "v_loss_threshold", "clamp_norm_factor", "v_weight_decay",
                                                            "mom2_max_length", "mom2_max_tokens", "stats_batch_size")})
        preset.update(overrides)
        return cls(**preset)


@dataclass
class FtConfig(_Serialised):
    """FT-W (MEMIT paper, appendix B.1): fine-tune one layer's MLP output projection on the requests' targets with
    Adam and a weight decay on that weight (no norm constraint), in epochs over the requests, stopping early once
    an epoch's mean loss is below ``loss_threshold``. The pack holds the change of that weight (dense, or low
    rank when that is smaller).

    Attributes:
        layer: the fine-tuned layer (GPT-J: 21).
        lr, num_steps, weight_decay, loss_threshold: published 5e-4, 25 epochs, 5e-4, 1e-2.
        batch_size: requests per optimiser step.
        norm_constraint: when set, every element of the change is clamped to ``±norm_constraint`` after each step
            (FT-L, ROME paper); None = FT-W.
    """

    method: ClassVar[str] = "ft"
    layer: int = 21
    lr: float = 5e-4
    num_steps: int = 25
    weight_decay: float = 5e-4
    loss_threshold: float = 1e-2
    batch_size: int = 64
    norm_constraint: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self, ("lr",), ("weight_decay", "loss_threshold"), ("layer", "num_steps", "batch_size"))
        if self.norm_constraint is not None:
            _check_numbers(self, ("norm_constraint",), (), ())

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> FtConfig:
        """The published settings at layer ``floor(0.75·n_layers)`` (GPT-J: 21, the paper's layer).

        The published lr was tuned on GPT-J; on small models it barely moves the weight. world-gpt2-bpe (layer 4,
        the same 100 / 1,000 requests): lr 5e-4 ES / PS / NS / retention 15 / 12 / 99.7 / 99.9 and 21 / 17 / 92 /
        80; lr 2e-3 96 / 90.5 / 97.9 / 97.8 and 90 / 74 / 78 / 53; lr 1e-2 100 / 100 / 81.5 / 78 and 100 / 84 /
        77 / 51 (the paper's picture of FT-W: near-perfect efficacy, low specificity).
        Adam moves every element of the weight by about lr a step, and the output moves by the sum over d_ff
        inputs, so an lr that keeps ``lr · d_ff`` at GPT-J's (``5e-4 · 16384 / d_ff``) was measured on four
        worlds (1,000 edits, seed-0 sample): world-gpt2-bpe (d_ff 1,024, lr 8e-3) 99.8 / 90.8 / 66.8 / 37.4,
        world-llama-sp (688, 1.19e-2) 100 / 95.6 / 74.3 / 45.1, but the two shaped worlds world-gpt2 (1,024,
        8e-3) 31.6 / 21.5 / 83.2 / 49.1 and world-llama (512, 1.6e-2) 32.9 / 30.6 / 79.4 / 50.4. It gives the
        paper's FT-W on two models of four, so it is not the default: the two conventionally trained worlds ship
        it in their ``ft_config.json`` (:func:`memit_adapter.demo.world_config`), others pass ``lr``.
        """
        n_layer = _first_attr(model.config, "n_layer", "num_hidden_layers")
        return cls(**{"layer": math.floor(0.75 * n_layer), **overrides})


METHOD_CONFIGS: dict[str, type] = {"memit": MemitConfig, "rome": RomeConfig, "ft": FtConfig}


def config_class(method: str) -> type:
    """The config dataclass of ``method`` (``"memit"``, ``"rome"`` or ``"ft"``)."""
    try:
        return METHOD_CONFIGS[method]
    except KeyError:
        raise ConfigError(f"unknown editing method {method!r}; known: {sorted(METHOD_CONFIGS)}") from None
