"""Can an edit at the subject's last token change a fact? A check of MEMIT's premise on a given model.

MEMIT (and ROME) write each fact at the subject's last token: the target vector is the hidden state there after
the last edited layer, moved until the model gives the new object. That holds when the model reads the subject at
its last token (causal tracing's "early site" in large models); a small or unusual model may read it from other
subject tokens instead, and then no edit at the last token takes, however long its target vector is optimised.

:func:`subject_reach` measures it directly. For each fact and each of its subject tokens, one vector is added to
the hidden state after block ``layer`` at that token alone and optimised with Adam for ``steps`` steps (elements
move by about ``lr`` x the RMS of that state a step) to make the model give the target; the target's NLL at the
end says how far the fact can be moved from there. All (fact, token) rows run as one batch; each row's vector
only affects its own loss, so the rows are optimised independently.

Usage::

    results = subject_reach(model, tok, requests, layer=MemitConfig.for_model(model).layers[-1])
    summarise_reach(results)   # {"facts": 100, "last_token_fails": 29, "another_token_reaches": 29, ...}
    requests = choose_subject_tokens(model, tok, requests, layer)   # each subject_token: where its edit goes

:func:`choose_subject_tokens` turns the check into a choice (``MemitConfig.edit_token="reach"``, on in ``for_model``'s
scaled defaults): a subject stays at its last token where that reaches its targets, and moves to the latest token that
reaches them where it does not.

Measured on the shipped worlds (``subject_reach`` with its defaults on ``random.Random(0).sample(records, 100)``;
``memit-adapter trace --model M --reach`` checks a world's first ``--limit`` records): world-llama-sp's last subject
token fails to reach the target of 14 / 29 / 56 facts after block 0 / 2 / 4 (another subject token reaches 14 / 29 /
54 of them), and is the best token for only 12 / 8 / 4; world-gpt2-bpe's fails for none after block 2 (MEMIT's
target layer on both). On world-llama-sp, 22 of the same 100 requests end MEMIT's target optimisation below even
odds: that world reads many subjects from their earlier tokens, which bounds what any last-token edit can take
there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, check_model
from .devices import input_device
from .errors import ConfigError
from .hooks import capture_outputs, edit_output
from .modes import evaluating
from .requests import EditRequest
from .targets import KL_PROMPT
from .tokens import encode_fact, pad_id, pad_right

REACHED = math.log(2)  # a target NLL below ln 2: the target is more likely than not


@dataclass
class ReachResult:
    """One fact: the target's mean NLL per token before any change and after optimising a vector at each
    subject token (``nll[i]`` for ``tokens[i]``; ``nll[-1]``: the last subject token, where MEMIT writes)."""

    text: str
    target: str
    tokens: list[str]
    start_nll: float
    nll: list[float]
    layer: int

    @property
    def best(self) -> int:
        """Index of the subject token from which the target is reached best."""
        return min(range(len(self.nll)), key=self.nll.__getitem__)

    @property
    def last_reaches(self) -> bool:
        return self.nll[-1] < REACHED

    def to_dict(self) -> dict:
        return asdict(self)


def subject_reach(model: nn.Module, tokenizer, requests: Sequence[EditRequest], layer: int, *, steps: int = 30,
                  lr: float = 0.25, batch_size: int = 256, progress: bool = True,
                  arch: ArchSpec | None = None) -> list[ReachResult]:
    """For every request and every subject token: the NLL of ``target_new`` after ``steps`` Adam steps on a
    vector added at that token after block ``layer`` (see the module docstring). The model is left as it was
    (weights, modes, ``requires_grad``). Raises :class:`ConfigError` on a layer the model does not have or a
    non-positive ``steps`` / ``lr`` / ``batch_size``."""
    spec = check_model(model, tokenizer, arch)
    n_layers = spec.num_layers(model)
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} is not one of the model's {n_layers} blocks")
    if steps < 1 or lr <= 0 or batch_size < 1:
        raise ConfigError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1 and lr ({lr}) > 0")
    facts = [encode_fact(tokenizer, r.prompt, r.subject, r.target_new) for r in requests]
    rows = [(i, pos) for i, f in enumerate(facts) for pos in range(*f.subject)]
    start, nll = _reach_rows(model, spec.blocks(model)[layer], tokenizer, facts, rows, steps, lr, batch_size, progress)
    out, k = [], 0
    for r, f in zip(requests, facts):
        n = f.n_subject
        tokens = [tokenizer.decode([t]) for t in f.ids[f.subject[0]:f.subject[1]]]
        out.append(ReachResult(r.text, r.target_new, tokens, float(start[k]), nll[k:k + n].tolist(), layer))
        k += n
    return out


def choose_subject_tokens(model: nn.Module, tokenizer, requests: Sequence[EditRequest], layer: int, *,
                          known: Mapping[str, int] | None = None, steps: int = 30, lr: float = 0.25,
                          batch_size: int = 256, progress: bool = True, arch: ArchSpec | None = None
                          ) -> list[EditRequest]:
    """``requests`` with ``subject_token`` set where it is None: the subject's last token (-1) where a vector
    added there after block ``layer`` reaches the target of every request about that subject (NLL below ln 2
    after ``steps`` Adam steps, as :func:`subject_reach` measures); else the latest subject token whose mean target
    NLL over those requests is below ln 2, or the one with the lowest where none is (``MemitConfig.edit_token=
    "reach"``). The latest rather than the best: on world-llama-sp (100 edits, seeds 0, 1, 2) it kept 89.0% of the
    unedited facts against 84.6%, with ES / PS / NS 91.0 / 86.8 / 96.2 against 90.7 / 86.1 / 94.8.

    One token per subject, since requests about one subject share their key: a subject that already has one, in
    ``known`` (subject -> token, e.g. the requests of a chain being re-solved) or on another of ``requests``,
    keeps it. Requests whose ``subject_token`` is set are kept as given. The last tokens are tried first (one row
    per request); only the subjects that fail there are tried at their other tokens, so a model that reads its
    subjects at the last token pays one short optimisation per request. The choice is made on each request's
    own prompt; a token is counted from the end because a subject's first word may split differently at the start
    of a text and after a space, and it is taken among the tokens the subject has both in its requests' prompts and
    in :data:`~memit_adapter.targets.KL_PROMPT`. The model is left as it was.
    """
    spec = check_model(model, tokenizer, arch)
    fixed = dict(known or {})
    for r in requests:
        if r.subject_token is not None:
            fixed.setdefault(r.subject.strip(), r.subject_token)
    pending = [i for i, r in enumerate(requests) if r.subject_token is None and r.subject.strip() not in fixed]
    chosen = (_choose_by_reach(model, spec.blocks(model)[layer], tokenizer, requests, pending, steps, lr, batch_size,
                               progress) if pending else {})
    chosen.update(fixed)
    return [replace(r, subject_token=chosen[r.subject.strip()]) if r.subject_token is None else r for r in requests]


def _choose_by_reach(model, block: nn.Module, tokenizer, requests: Sequence[EditRequest], pending: list[int],
                     steps: int, lr: float, batch_size: int, progress: bool) -> dict[str, int]:
    """The token of each subject of ``requests[pending]`` (see :func:`choose_subject_tokens`), from the end."""
    facts = {i: encode_fact(tokenizer, requests[i].prompt, requests[i].subject, requests[i].target_new)
             for i in pending}
    _, nll_last = _reach_rows(model, block, tokenizer, facts, [(i, facts[i].lookup) for i in pending], steps, lr,
                              batch_size, progress)
    by_subject: dict[str, list[int]] = {}
    for i in pending:
        by_subject.setdefault(requests[i].subject.strip(), []).append(i)
    nll: dict[tuple[str, int], list[float]] = {}  # (subject, token from the end): each of its requests' NLL there
    for i, x in zip(pending, nll_last.tolist()):
        nll.setdefault((requests[i].subject.strip(), -1), []).append(x)
    failing = [s for s in by_subject if max(nll[s, -1]) >= REACHED]  # in request order
    chosen = {s: -1 for s in by_subject}
    if not failing:
        return chosen
    width = {s: min(encode_fact(tokenizer, KL_PROMPT, s).n_subject, *(facts[i].n_subject for i in by_subject[s]))
             for s in failing}
    rows = [(i, facts[i].subject[1] + j) for s in failing for i in by_subject[s] for j in range(-width[s], -1)]
    _, nll_rows = _reach_rows(model, block, tokenizer, facts, rows, steps, lr, batch_size, progress)
    for (i, pos), x in zip(rows, nll_rows.tolist()):
        nll.setdefault((requests[i].subject.strip(), pos - facts[i].subject[1]), []).append(x)
    for s in failing:
        mean = {j: sum(nll[s, j]) / len(nll[s, j]) for j in range(-width[s], 0)}
        reaching = [j for j, x in mean.items() if x < REACHED]
        chosen[s] = max(reaching) if reaching else min(mean, key=lambda j: (mean[j], -j))
    return chosen


def _reach_rows(model, block: nn.Module, tokenizer, facts, rows, steps: int, lr: float, batch_size: int,
                progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Target NLL of each ``(fact key, position)`` row before and after its own vector's ``steps`` Adam steps."""
    start, nll = torch.empty(len(rows)), torch.empty(len(rows))
    with evaluating(model, freeze=True):
        for first in tqdm(range(0, len(rows), batch_size), desc="reach", disable=not progress):
            chunk = rows[first:first + batch_size]
            start[first:first + len(chunk)], nll[first:first + len(chunk)] = _optimise_chunk(
                model, block, tokenizer, facts, chunk, steps, lr)
    return start, nll


def _optimise_chunk(model, block: nn.Module, tokenizer, facts, chunk, steps: int, lr: float):
    """Target NLL of each row of ``chunk`` before and after ``steps`` Adam steps on its own vector."""
    device = input_device(model)
    ids, mask = pad_right([facts[i].ids[:-1] for i, _ in chunk], pad_id(tokenizer), device)
    row = torch.arange(len(chunk), device=device)
    pos = torch.tensor([p for _, p in chunk], device=device)
    t_row = torch.tensor([r for r, (i, _) in enumerate(chunk) for _ in facts[i].target_ids], device=device)
    t_pos = torch.tensor([p for i, _ in chunk for p in facts[i].target_positions], device=device)
    t_ids = torch.tensor([t for i, _ in chunk for t in facts[i].target_ids], device=device)
    n_target = torch.tensor([float(len(facts[i].target_ids)) for i, _ in chunk], device=device)

    def target_nll(logits: torch.Tensor) -> torch.Tensor:  # mean over each row's target tokens, float32
        logp = torch.log_softmax(logits[t_row, t_pos].float(), -1).gather(1, t_ids[:, None])[:, 0]
        return torch.zeros(len(chunk), device=device).index_add(0, t_row, -logp) / n_target

    with torch.no_grad(), capture_outputs(block) as seen:
        before = target_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    h = seen[0][row, pos].float()
    scale = (h.pow(2).mean(-1, keepdim=True).sqrt()).detach()  # each row's state RMS: its step unit
    unit = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([unit], lr=lr)

    def add(hidden: torch.Tensor) -> torch.Tensor:
        at = (hidden[row, pos].float() + unit * scale).to(hidden.dtype)
        return hidden.index_put((row, pos), at)

    with torch.enable_grad(), edit_output(block, add):
        for _ in range(steps):
            loss = target_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
            unit.grad, = torch.autograd.grad(loss.sum(), [unit])
            opt.step()
        with torch.no_grad():
            after = target_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    return before.cpu(), after.cpu()


def summarise_reach(results: Sequence[ReachResult]) -> dict[str, int]:
    """Counts over ``results``: facts, those the last subject token fails to reach (target NLL still >= ln 2),
    those of them another subject token reaches, and facts whose best token is the last."""
    fails = [r for r in results if not r.last_reaches]
    return {"facts": len(results), "last_token_fails": len(fails),
            "another_token_reaches": sum(min(r.nll) < REACHED for r in fails),
            "best_is_last": sum(r.best == len(r.nll) - 1 for r in results)}


__all__ = ["REACHED", "ReachResult", "choose_subject_tokens", "subject_reach", "summarise_reach"]
