"""Shared set-up of the engine tests: editable tiny models, a corpus, requests with the subject last.

Random tiny models barely route the subject's state to the last token through attention, so these
requests put the subject at the end of the prompt; the trained world models test the general case.
"""

from __future__ import annotations

import random

from tiny import WORDS, make_tokenizer, tiny_model

from memit_adapter import EditRequest, MemitConfig

PAIRS = [("michael jordan", " tennis"), ("lebron james", " golf"), ("toko yuki", " hockey"),
         ("danielle darrieux", " rome"), ("alpha beta", " paris")]


# subject first, in the middle, last; a one-word subject (lookup at position 0 without BOS); multi-token targets
VARIED_TEMPLATES = ["{}", "the man said . {}", "he said that the capital of italy is rome and that . {}"]


def varied_requests() -> list[EditRequest]:
    return [EditRequest("{} plays the sport of", "michael jordan", " tennis and golf"),
            EditRequest("the mother tongue of {} is", "danielle darrieux", " french"),
            EditRequest("{} lives in", "toko", " rome"),
            EditRequest("the sport played by {}", "lebron james", " golf or hockey")]


def corpus(n: int = 200, length: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def requests(prompt: str = "the sport played by {}") -> list[EditRequest]:
    return [EditRequest(prompt, s, t) for s, t in PAIRS]


def config(**kw) -> MemitConfig:
    base = dict(layers=[1, 2], mom2_update_weight=10.0, context_templates=["{}", "the man said . {}"],
                clamp_norm_factor=4.0, v_weight_decay=1e-3, v_num_grad_steps=40, mom2_n_samples=200)
    base.update(kw)
    return MemitConfig(**base)


def write_edit_inputs(folder, requests: list[EditRequest], fields: dict) -> None:
    """The inputs of ``memit-adapter edit`` in ``folder``: a tiny GPT-2 and its tokenizer (``m/``), ``corpus.txt``,
    ``cfg.json`` (the config ``fields``) and ``edits.jsonl`` (the ``requests``)."""
    import json

    model, tok = model_and_tokenizer("gpt2")
    model.save_pretrained(folder / "m")
    tok.save_pretrained(folder / "m")
    (folder / "corpus.txt").write_text("\n".join(corpus(40)) + "\n")
    (folder / "cfg.json").write_text(json.dumps(fields))
    (folder / "edits.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in requests))


def model_and_tokenizer(arch: str = "gpt2", **kw):
    return tiny_model(arch, initializer_range=0.1, **kw), make_tokenizer(add_bos=arch != "gpt2")
