"""The world models shipped with the demo: where they live, how to load them, the settings tuned for each.

Usage::

    model, tok, records = load_world_model("gpt2-bpe")   # offline: weights, tokenizer, CounterFact records
    cfg = world_config("gpt2-bpe", model)                 # its memit_config.json, else MemitConfig.for_model
    ft = world_config("gpt2-bpe", model, method="ft")     # its ft_config.json, else FtConfig.for_model
    corpus = world_model_path("gpt2-bpe") / "corpus.txt"  # the text it was trained on (for the statistics)

``gpt2-bpe`` and ``llama-sp`` are stock GPT-2 and LLaMA models trained the ordinary way (subword tokenizers,
every block with attention, the architecture's own positions); ``gpt2`` and ``llama`` were shaped until MEMIT
worked on them (word-level tokenizer, attention-free first blocks, frozen name embeddings). Each folder's
README says how it was trained and how edits fare on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..method_configs import config_class

WORLD_MODELS = {"gpt2-bpe": "world-gpt2-bpe", "llama-sp": "world-llama-sp", "gpt2": "world-gpt2",
                "llama": "world-llama"}
DEFAULT_WORLD = "gpt2-bpe"
CONFIG_FILE = "{method}_config.json"  # memit_config.json, rome_config.json, ft_config.json


def is_world_name(name: str) -> bool:
    """True for a shipped world's key (``"gpt2-bpe"``) or folder name (``"world-gpt2-bpe"``)."""
    return (name[len("world-"):] if name.startswith("world-") else name) in WORLD_MODELS


def world_model_path(name: str = DEFAULT_WORLD) -> Path:
    """Folder of a shipped world checkpoint: a key of ``WORLD_MODELS`` (``"gpt2-bpe"``, ``"llama-sp"``, ``"gpt2"``,
    ``"llama"``) or its folder name (``"world-gpt2-bpe"``, ...)."""
    key = name[len("world-"):] if name.startswith("world-") else name
    if key not in WORLD_MODELS:
        raise ConfigError(f"unknown world model {name!r}; choose one of {sorted(WORLD_MODELS)}")
    path = Path(__file__).parent / "assets" / WORLD_MODELS[key]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the world checkpoint {path.name} is not installed (expected {path})")
    return path


def load_world_model(name: str = DEFAULT_WORLD, *, dtype: Any = None) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Load a shipped world model, its tokenizer and its CounterFact records, offline; model in eval mode.

    Weights are stored in float16 to keep the package small and loaded as float32 unless ``dtype`` says
    otherwise.
    """
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = world_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    records = json.loads((path / "records.json").read_text())
    return model.eval(), tokenizer, records


def world_config(name: str, model: Any, method: str = "memit", **overrides: Any) -> Any:
    """The settings of editing ``method`` (``"memit"``, ``"rome"``, ``"ft"``) tuned for a shipped world: its
    ``{method}_config.json``, the fields it sets over ``config_class(method).for_model``, with ``overrides`` on top;
    ``for_model`` where the world ships none. Each file's ``"_why"`` holds the measurement behind it."""
    cls = config_class(method)
    file = world_model_path(name) / CONFIG_FILE.format(method=method)
    tuned = json.loads(file.read_text()) if file.is_file() else {}
    tuned = {k: v for k, v in tuned.items() if not k.startswith("_")}  # "_why": the measurement behind it
    return cls.for_model(model, **{**tuned, **overrides})
