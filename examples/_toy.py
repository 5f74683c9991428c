"""A toy base model for the examples: a 4-layer GPT-2 built from a config with a word-level tokenizer.

It downloads nothing. Real use starts from ``AutoModelForCausalLM.from_pretrained("<hub id>")``; the
trained world model (``memit_adapter.demo.load_world_model``) is a better toy once it is installed.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

WORDS = ("the sport played by michael jordan lebron james serena williams is basketball baseball tennis golf "
         "hockey soccer city of paris rome london a an and in on he she said").split()


def toy_base(folder: str | Path = "out/base") -> Path:
    """Build and save the toy model and tokenizer to ``folder`` once; return the folder."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<pad>", padding_side="left")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_layer=4, n_embd=32, n_head=4, n_positions=64,
                        initializer_range=0.1, pad_token_id=1, eos_token_id=1, bos_token_id=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def toy_corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Random sentences over the toy vocabulary, for the second-moment statistics."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(n)]
