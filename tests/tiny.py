"""Tiny random models and a word-level tokenizer, built from configs: no downloads."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a of is in plays sport lives works was born speaks language team city capital . , 's "
    "baseball basketball soccer tennis golf hockey paris london rome berlin tokyo madrid english french "
    "german italian spanish japanese danielle darrieux michael jordan lebron james toko yuki alpha beta "
    "gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
    "therefore because i you he she it they we and or but so for on at by with from to as mother "
    "tongue native profession city , said that this which known famous player for apple google"
).split()

ARCH_KWARGS = {
    "gpt2": dict(n_layer=4, n_embd=32, n_head=4, n_positions=128),
    "gptj": dict(n_layer=4, n_embd=32, n_head=4, n_positions=128, rotary_dim=4),
    "gpt_neox": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=128),
    "llama": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=128),
    "mistral": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, max_position_embeddings=128),
    "qwen2": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=128),
    "gemma": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=128, head_dim=8),
}
ARCHS = tuple(ARCH_KWARGS)


def make_tokenizer(*, add_bos: bool = False, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS; ``add_bos`` adds ``<s>`` in front like LLaMA's tokenizer."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side=padding_side)
    return fast


def tiny_model(model_type: str = "gpt2", *, seed: int = 0, vocab_size: int | None = None,
               dtype: torch.dtype = torch.float32, init_std: float | None = None, **overrides):
    """A small randomly initialised causal LM of ``model_type`` in eval mode.

    ``init_std`` redraws every weight matrix from N(0, init_std²) with ``seed``, so the model does not depend
    on how a transformers release initialises weights (releases before 5.15 ignore GPT-2's
    ``initializer_range`` in ``from_config``)."""
    kwargs = dict(ARCH_KWARGS[model_type])
    kwargs.update(overrides)
    vocab = vocab_size or (len(set(WORDS)) + 4)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                  **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if init_std is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.copy_(torch.randn(param.shape, generator=gen) * init_std)
    return model.to(dtype).eval()


SENTENCES = [
    "the sport played by michael jordan is basketball", "danielle darrieux speaks french", "the mother tongue of "
    "danielle darrieux is french", "lebron james plays basketball", "toko yuki lives in tokyo", "alpha beta works "
    "for apple", "he said that the capital of italy is rome", "she plays tennis and golf in london",
]


def subword_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A tokenizer of a real kind, trained here on SENTENCES with a vocabulary small enough that names split
    into several subword tokens: ``"bpe"`` (byte-level like GPT-2, no BOS) or ``"sentencepiece"`` (``▁``
    words, BOS added, like LLaMA's)."""
    from tokenizers import trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        raise ValueError(kind)
    vocab_size = {"bpe": 300, "sentencepiece": 75}[kind]  # 256 bytes + 44 merges; ~30 letters + 45 merges
    tok.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                initial_alphabet=alphabet, show_progress=False))
    if kind == "sentencepiece":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
