"""Tokenising facts: where the subject's tokens are, where the target tokens are, padding.

The one encoder of ``prompt + target`` for the engine, evaluation and tracing. A target is read as the
model reads it right after the prompt: with the published space rule (:func:`spaced_target`: a leading
space unless the target has one or the prompt ends in whitespace), tokenised together with the prompt,
so that byte-level BPE and SentencePiece give the ids a model sees in running text (``ĠEnglish``,
``▁English``), not those of the target on its own.

Everything is computed on the unpadded token list of each text, then padded on the right by
:func:`pad_right`, so the tokenizer's own ``padding_side`` and a BOS token it may add cannot move
the lookup position.

Usage::

    fact = encode_fact(tok, "The man. {} plays the sport of", "Michael Jordan", "baseball")
    fact.ids, fact.lookup, fact.subject, fact.target_positions
    prompt_ids, target_ids = encode_continuation(tok, "Michael Jordan plays the sport of", "baseball")
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
    subject: tuple[int, int]  # [first, stop) positions of the subject's tokens (BOS included in the count)
    n_prompt: int  # number of prompt tokens (BOS included); target tokens follow
    subject_token: int = -1  # the subject token that carries the edit, from its end (see EditRequest.subject_token)

    @property
    def lookup(self) -> int:
        """Index of the subject token that carries the edit: the last unless ``subject_token`` says otherwise
        (one past the first token means the first)."""
        return max(self.subject[0], self.subject[1] + self.subject_token)

    @property
    def n_subject(self) -> int:
        """Number of the subject's tokens."""
        return self.subject[1] - self.subject[0]

    @property
    def target_ids(self) -> list[int]:
        return self.ids[self.n_prompt:]

    @property
    def target_positions(self) -> list[int]:
        """Positions whose next-token logits predict the target tokens."""
        return list(range(self.n_prompt - 1, len(self.ids) - 1))


def fill(template: str, subject: str) -> tuple[str, int]:
    """Put ``subject`` where ``{}`` is, without ``str.format`` (subjects may hold braces); return the text
    and the subject's start offset. Raises :class:`InvalidRequestError` unless ``template`` holds exactly one
    ``{}``."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise InvalidRequestError(f"prompt must contain exactly one '{{}}' where the subject goes, got {template!r}")
    start = template.index("{}")
    return template[:start] + subject + template[start + 2:], start


def encode_fact(tokenizer, template: str, subject: str, target: str = "", subject_token: int | None = None
                ) -> EncodedFact:
    """Tokenise ``template`` filled with ``subject``, followed by ``target`` as the model would continue the
    prompt (see :func:`encode_continuation`); ``subject_token`` (None: the last, -1) sets the ``lookup``."""
    text, start = fill(template, subject)
    prompt_ids, span = subject_span(tokenizer, text, start, start + len(subject.rstrip()))
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and all(i == unk for i in prompt_ids[span[0]:span[1]]):
        raise InvalidRequestError(f"subject {subject!r} is only unknown tokens ({tokenizer.unk_token!r}) to this "
                                  "tokenizer: an edit there would change every unknown word")
    target_ids = _continuation_ids(tokenizer, text, prompt_ids, target) if target else []
    return EncodedFact(ids=list(prompt_ids) + target_ids, subject=span, n_prompt=len(prompt_ids),
                       subject_token=-1 if subject_token is None else subject_token)


def encode_continuation(tokenizer, text: str, target: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, target ids)``: ``text`` with the tokenizer's special tokens, and ``target`` as the
    model reads it right after ``text`` (with :func:`spaced_target`'s space, tokenised in context)."""
    prompt_ids = list(tokenizer(text)["input_ids"])
    return prompt_ids, _continuation_ids(tokenizer, text, prompt_ids, target)


def spaced_target(text: str, target: str) -> str:
    """``target`` with a leading space unless it has one or ``text`` ends in whitespace (the published rule).

    CounterFact stores targets without a space (``"English"``), while a model continues ``"... is"`` with
    the token of ``" English"`` (``ĠEnglish`` in a byte-level BPE, ``▁English`` in SentencePiece). A
    tokenizer that drops whitespace (word-level) gives the same ids either way.
    """
    if target[:1].isspace() or text[-1:].isspace():
        return target
    return " " + target


def _continuation_ids(tokenizer, text: str, prompt_ids: list[int], target: str) -> list[int]:
    target = spaced_target(text, target)
    full = list(tokenizer(text + target)["input_ids"])
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        ids = full[len(prompt_ids):]
    else:  # the tokenizer merged across the boundary: the target tokenised on its own
        ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidRequestError(f"target {target!r} tokenises to nothing")
    return ids


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
