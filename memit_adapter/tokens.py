"""Tokenising facts: where the subject's last token is, where the target tokens are, padding.

Everything is computed on the unpadded token list of each text, then padded on the right by
:func:`pad_right`, so the tokenizer's own ``padding_side`` and a BOS token it may add cannot move
the lookup position.

Usage::

    fact = encode_fact(tok, "The man. {} plays the sport of", "Michael Jordan", " baseball")
    fact.ids, fact.lookup, fact.target_positions
    input_ids, attention_mask = pad_right([f.ids for f in facts], pad_id(tok))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidRequestError


@dataclass(frozen=True)
class EncodedFact:
    """Token ids of ``prompt + target`` with the positions the method needs."""

    ids: list[int]  # prompt tokens followed by target tokens
    lookup: int  # index of the subject's last token
    n_prompt: int  # number of prompt tokens (BOS included); target tokens follow

    @property
    def target_ids(self) -> list[int]:
        return self.ids[self.n_prompt:]

    @property
    def target_positions(self) -> list[int]:
        """Positions whose next-token logits predict the target tokens."""
        return list(range(self.n_prompt - 1, len(self.ids) - 1))


def fill(template: str, subject: str) -> tuple[str, int]:
    """Put ``subject`` where ``{}`` is, without ``str.format`` (subjects may hold braces); return the text
    and the subject's start offset."""
    start = template.index("{}")
    return template[:start] + subject + template[start + 2:], start


def encode_fact(tokenizer, template: str, subject: str, target: str = "") -> EncodedFact:
    """Tokenise ``template`` filled with ``subject``, followed by ``target`` (tokenised on its own, without
    special tokens, as the model would continue the prompt)."""
    text, start = fill(template, subject)
    end = start + len(subject.rstrip())
    prompt_ids, lookup = _prompt_ids_and_lookup(tokenizer, text, start, end)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] if target else []
    if target and not target_ids:
        raise InvalidRequestError(f"target {target!r} tokenises to nothing")
    return EncodedFact(ids=list(prompt_ids) + list(target_ids), lookup=lookup, n_prompt=len(prompt_ids))


def _prompt_ids_and_lookup(tokenizer, text: str, start: int, end: int) -> tuple[list[int], int]:
    ids, (_, stop) = subject_span(tokenizer, text, start, end)
    return ids, stop - 1


def subject_span(tokenizer, text: str, start: int, end: int) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``text`` and the ``[first, stop)`` positions of the characters ``text[start:end]``.

    From the tokenizer's character offsets (special tokens such as BOS have empty spans and count as
    positions); slow tokenizers: from the token counts of the text up to ``start`` and ``end``.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
        if hits:
            return list(enc["input_ids"]), (hits[0], hits[-1] + 1)
    else:
        ids = tokenizer(text)["input_ids"]
        first, stop = len(tokenizer(text[:start])["input_ids"]), len(tokenizer(text[:end])["input_ids"])
        if stop > first:
            return list(ids), (first, stop)
    raise InvalidRequestError(f"subject {text[start:end]!r} has no token of its own in {text!r}")


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad_right(
    seqs: list[list[int]], pad: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(len(seqs), max_len)``, padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
