"""Repair rounds: edit again, on top, the requests of a batch that did not take (``MemitConfig.repair_rounds``).

A target vector that works when added at the subject's last token can still fail once the solve has written it into
the weights: the update reaches the lookup only approximately, and it also moves the states of the prompt's other
tokens, which the target-vector optimisation never saw. After a batch, each request whose new target is not yet more
probable than its true one after its own prompt (CounterFact's efficacy test; requests without ``target_true`` are
not tested) is edited again as a sequential pack on top of what came before (``compute_edits(on_top_of=...)``: the
earlier packs active while its target vectors and keys are measured, their keys preserved by the solve), until none
fails or the rounds are spent. The packs are returned stacked as one.

Usage::

    pack = compute_edits(model, tok, requests, MemitConfig.for_model(model, repair_rounds=2))
    pack.report["repair"]   # {"failing": [10, 3, 1], "seconds": ...}: before each round, and after the last
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .pack import EditPack
from .requests import EditRequest


def not_taken(model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> list[int]:
    """Indices of the requests (those with a ``target_true``) whose ``target_new`` is not more probable than their
    ``target_true`` after their own prompt on ``model`` as it is (mean per-token NLL, as CounterFact's efficacy)."""
    from .evaluation import target_nll

    tested = [i for i, r in enumerate(requests) if r.target_true]
    if not tested:
        return []
    prompts = [requests[i].text for i in tested]
    new = target_nll(model, tokenizer, prompts, [requests[i].target_new for i in tested])
    true = target_nll(model, tokenizer, prompts, [requests[i].target_true for i in tested])
    return [i for i, a, b in zip(tested, new.tolist(), true.tolist()) if not a < b]


def repaired(model: nn.Module, tokenizer, first: EditPack, rounds: int, below: Sequence[EditPack],
             edit: Callable[[list[EditRequest], list[EditPack]], EditPack],
             active: Callable[[nn.Module, Sequence[EditPack]], object]) -> EditPack:
    """``first`` and up to ``rounds`` repair packs stacked into one pack of ``first``'s requests.

    ``below``: the packs ``first`` was computed on top of (active while testing, under every round); ``edit(requests,
    on_top_of)`` computes one round's pack; ``active(model, packs)`` is a context manager that attaches packs.
    The result keeps ``first``'s requests, parents, config and report (its ``"seconds"`` summed over the rounds)
    and adds ``report["repair"]``: the number of requests failing before each round and after the last. It holds no
    target vectors (a joint chain cannot continue from it: its rounds are not one solve).
    """
    packs = [first]
    failing_counts: list[int] = []
    clock = time.perf_counter()
    for round_ in range(rounds + 1):
        with active(model, [*below, *packs]):
            failing = not_taken(model, tokenizer, first.requests)
        failing_counts.append(len(failing))
        if not failing or round_ == rounds:
            break
        packs.append(edit([first.requests[i] for i in failing], [*below, *packs]))
    if len(packs) == 1:
        first.report["repair"] = {"failing": failing_counts, "seconds": time.perf_counter() - clock}
        return first
    stacked = EditPack.stack(packs)
    seconds: dict[str, float] = {}
    for p in packs:
        for phase, s in p.report.get("seconds", {}).items():
            seconds[phase] = seconds.get(phase, 0.0) + s
    report: Mapping = {**first.report, "seconds": seconds,
                       "repair": {"failing": failing_counts, "seconds": time.perf_counter() - clock}}
    out = dataclasses.replace(stacked, requests=list(first.requests), parents=list(first.parents), targets=None)
    out.report = dict(report)
    return out
