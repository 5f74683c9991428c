"""The demo: a generated fact world, small models trained on it, and ``memit-adapter demo``.

Not part of the editing library (``import memit_adapter`` does not import it); the library's tests and
examples use these worlds as models small enough to train, edit and evaluate on a CPU in seconds.

Usage::

    from memit_adapter.demo import load_world_model, make_world, world_config, world_model_path

    model, tok, records = load_world_model("gpt2-bpe")   # shipped checkpoint, offline
    cfg = world_config("gpt2-bpe", model)                 # the MEMIT settings tuned for it
    world = make_world(seed=0, n_subjects=600)            # the world it was trained on

Modules: :mod:`.world` (the world generator and its tokenizers), :mod:`.checkpoints` (the shipped models),
:mod:`.train` (``python -m memit_adapter.demo.train``: how they were trained), :mod:`.run` (the demo command).
"""

from .checkpoints import DEFAULT_WORLD, WORLD_MODELS, load_world_model, world_config, world_model_path
from .world import FactWorld, make_world, pack_documents, recall_by_template, train_world_tokenizer

__all__ = ["DEFAULT_WORLD", "WORLD_MODELS", "FactWorld", "load_world_model", "make_world", "pack_documents",
           "recall_by_template", "train_world_tokenizer", "world_config", "world_model_path"]
