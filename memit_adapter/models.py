"""Loading a model to edit by name: a Hub id, a local folder, or one of the demo's shipped world models.

Usage::

    model, tokenizer, records = load_model("gpt2-xl")          # records: None (no records.json on the Hub)
    model, tokenizer, records = load_model("./my-checkpoint")   # records.json beside the weights, if any
    model, tokenizer, records = load_model("world-gpt2-bpe")    # offline, from memit_adapter.demo
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def world_name(name: str) -> str | None:
    """``name`` when it names a shipped demo world (``world-gpt2-bpe``, ...) and no folder of that name exists."""
    if not name.startswith("world-") or Path(name).exists():
        return None
    from .demo.checkpoints import is_world_name

    return name if is_world_name(name) else None


def load_model(name: str, *, dtype: Any = None) -> tuple[Any, Any, list[dict[str, Any]] | None]:
    """``(model, tokenizer, records or None)`` of a Hub id or local folder, in eval mode.

    ``world-gpt2-bpe``, ``world-llama-sp``, ``world-gpt2`` and ``world-llama`` (unless a folder of that name
    exists) load a shipped world model of :mod:`memit_adapter.demo` and its records, offline. A local folder's
    records are its ``records.json`` when it has one (as the folders ``memit_adapter.demo.train`` writes do).

    ``dtype`` None: float32 without a GPU (half-precision matrix products on CPU are an order of magnitude
    slower, and a float16 checkpoint would otherwise load as float16), the checkpoint's own dtype with one.
    """
    import torch

    if dtype is None:
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    if world_name(name) is not None:
        from .demo.checkpoints import load_world_model

        return load_world_model(name, dtype=None if dtype == "auto" else dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records_file = Path(name) / "records.json"
    records = json.loads(records_file.read_text()) if records_file.is_file() else None
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(name), records
