"""The editing methods by name: ``METHODS["rome"](model, tok, requests, config, ...)`` returns an ``EditPack``.

Every function takes ``(model, tokenizer, requests, config=None, *, corpus=None, cache_dir=None, stats=None,
progress=True)``; the config class of each is :func:`~memit_adapter.method_configs.config_class` of its name.
"""

from __future__ import annotations

from .engine import compute_edits
from .finetune import compute_ft_edits
from .rome import compute_rome_edits

METHODS = {"memit": compute_edits, "rome": compute_rome_edits, "ft": compute_ft_edits}
