"""CounterFact metrics (MEMIT_SPEC.md): ES, PS, NS, their magnitudes, Score and generation entropy.

Usage::

    result = evaluate_counterfact(model, tok, records)          # records: CounterFact-format dicts
    result.efficacy_score, result.score                         # success rates in [0, 1]
    both = evaluate_pack(model, tok, records, pack)             # {"pre": ..., "post": ...}
    print(format_table(both))

    $ memit-adapter eval --model world-gpt2 --data records.json --n 100 --out eval.json
    $ memit-adapter eval --model world-gpt2 --pack edits --n 100 --retention   # + recall of the other facts

``P(x)`` is the model's probability of target string ``x`` after a prompt, taken as ``exp(-mean NLL)``
over the target's tokens. Per record, the rewrite prompt counts as efficacy success when
``P(new) > P(true)``, each paraphrase likewise, each neighbourhood prompt (another subject with the
same true object) when ``P(true) > P(new)``; a record's rate is the mean over its prompts and a score
the mean over records, as the published ``summarize.py`` computes it. Magnitudes are the means of
``P(new) - P(true)`` (``P(true) - P(new)`` for neighbours). Score is the harmonic mean of ES, PS and NS.
NS is the published one by default. With ``exclude_edited_neighbors=True``, a neighbourhood prompt that
is itself the rewrite or a paraphrase prompt of a record in the same batch (a fact the batch rewrites)
is left out of NS and counted in ``neighbors_excluded``: this matters when a batch edits many facts of a
small world (1,000 edits of 2,100 facts); CounterFact's neighbours are other subjects, rarely affected.
Retention (``retention_records=``) is the collateral damage NS can hide: the share of every other fact
of a world, those the batch does not edit, whose true object is still the model's greedy answer.
Generation entropy is ``mean(2/3 * H2, 4/3 * H3)`` (bits) of the word bi- and tri-gram distributions
of each greedy generation (prompt included), averaged per record and over records.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import max_positions
from .config import MemitConfig
from .counterfact import load_counterfact, normalize_records
from .devices import input_device
from .errors import MemitError
from .models import load_model
from .modes import evaluating
from .tokens import encode_continuation, fill, pad_id, pad_right

__all__ = ["CounterFactResult", "edited_prompts", "evaluate_counterfact", "evaluate_pack", "format_table",
           "generation_entropy", "greedy_generate", "ngram_entropy", "retained_facts", "scored_neighbors",
           "target_nll", "target_top1"]

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+|[^\w\s]")
METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
           "paraphrase_magnitude", "neighborhood_magnitude", "generation_entropy", "retention")


@dataclass
class CounterFactResult:
    """Rates and magnitudes in [0, 1] / [-1, 1]; ``None`` where a record set has no such prompts."""

    n_records: int
    efficacy_score: float | None
    efficacy_magnitude: float | None
    paraphrase_score: float | None
    paraphrase_magnitude: float | None
    neighborhood_score: float | None
    neighborhood_magnitude: float | None
    score: float | None
    generation_entropy: float | None = None
    neighbors_excluded: int = 0
    retention: float | None = None  # top-1 recall of the facts the batch does not edit (see retention_records)
    retention_facts: int = 0
    per_record: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self, *, per_record: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not per_record:
            out.pop("per_record")
        return out


# -- probabilities of target strings --------------------------------------------------------------

def target_nll(model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
               batch_size: int = 64) -> torch.Tensor:
    """Mean per-token NLL of ``targets[i]`` right after ``prompts[i]``; shape ``(len(prompts),)``, float64.

    Encoded as the engine encodes a fact (:func:`memit_adapter.tokens.encode_continuation`): the special
    tokens the tokenizer puts in front of a text (LLaMA's ``<s>``) first, and a target without leading
    whitespace gets a space, as MEMIT's code writes ``f"{prompt} {target}"``.
    """
    return _score_targets(model, tokenizer, prompts, targets, batch_size)[0]


def target_top1(model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
                batch_size: int = 64) -> torch.Tensor:
    """Whether every token of ``targets[i]`` is the model's top-1 next token after ``prompts[i]`` and the
    target tokens before it (greedy decoding would write the target); bool, shape ``(len(prompts),)``."""
    return _score_targets(model, tokenizer, prompts, targets, batch_size)[1]


def _score_targets(model, tokenizer, prompts, targets, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pairs = _encode_pairs(tokenizer, prompts, targets)
    device = input_device(model)
    pad = pad_id(tokenizer)
    nll_out = torch.empty(len(pairs), dtype=torch.float64)
    top1_out = torch.empty(len(pairs), dtype=torch.bool)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            ids, mask = pad_right(seqs, pad, device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (b, t, vocab)
            rows, cols, tgt, owner = [], [], [], []
            for b, i in enumerate(idx):
                n_prompt, target = len(pairs[i][0]), pairs[i][1]
                for j, tok_id in enumerate(target):
                    rows.append(b)
                    cols.append(n_prompt - 1 + j)  # the logits at position p predict token p + 1
                    tgt.append(tok_id)
                    owner.append(b)
            picked = logits[rows, cols].float()  # (n_target_tokens, vocab)
            tgt_t = torch.tensor(tgt, device=picked.device)
            nll = -torch.log_softmax(picked, dim=-1)[torch.arange(len(tgt)), tgt_t].double().cpu()
            misses = (picked.argmax(dim=-1) != tgt_t).long().cpu()
            owner_t = torch.tensor(owner)
            sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, owner_t, nll)
            counts = torch.bincount(owner_t, minlength=len(idx)).double()
            nll_out[torch.tensor(idx)] = sums / counts
            top1_out[torch.tensor(idx)] = torch.zeros(len(idx), dtype=torch.long).index_add_(0, owner_t, misses) == 0
    return nll_out, top1_out


def _encode_pairs(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with the tokenizer's special tokens, target ids) per pair, by the engine's encoder."""
    pairs = []
    for prompt, target in zip(prompts, targets):
        p, t = encode_continuation(tokenizer, prompt, target)
        if not p:
            raise MemitError(f"prompt {prompt!r} has no tokens and the tokenizer adds no BOS: nothing to condition on")
        pairs.append((p, t))
    return pairs


# -- fluency -------------------------------------------------------------------------------------

def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """``mean_n(weight_n * H_n)`` in bits, ``H_n`` the entropy of the word n-gram frequencies of ``text``."""
    words = _WORD.findall(text)
    parts = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def generation_entropy(texts: Sequence[str]) -> float:
    """Mean :func:`ngram_entropy` of ``texts``."""
    if not texts:
        raise ValueError("no texts given")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def greedy_generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 100,
                    batch_size: int = 32) -> list[str]:
    """Greedy continuations, decoded with the prompt in front (special tokens dropped).

    Prompts are left-padded in batches; generation stops early only at the model's EOS and never runs
    past its maximum context.
    """
    device = input_device(model)
    if not prompts:
        return []
    pad = pad_id(tokenizer)
    limit = max_positions(model)
    encoded = [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]  # as encode_continuation's prompts
    texts: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[b, width - len(encoded[i]):] = 1
        new = max_new_tokens if limit is None else max(0, min(max_new_tokens, limit - width))
        if new > 0:
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=new, pad_token_id=pad)
        else:
            out = ids
        for b, i in enumerate(idx):
            texts[i] = tokenizer.decode(out[b, width - len(encoded[i]):].tolist(), skip_special_tokens=True)
    return texts


# -- the metrics ---------------------------------------------------------------------------------

def evaluate_counterfact(model: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], *,
                         batch_size: int = 64, generation: bool = True, max_new_tokens: int = 100,
                         max_generation_records: int | None = None, per_record: bool = False,
                         exclude_edited_neighbors: bool = False,
                         retention_records: Sequence[Mapping[str, Any]] | None = None) -> CounterFactResult:
    """CounterFact metrics of ``model`` on ``records`` (see the module docstring for the definitions).

    ``generation=False`` skips the (slow) greedy generations; ``max_generation_records`` limits them to
    the first records. ``per_record=True`` keeps each record's NLLs and rates in ``result.per_record``.
    NS is the published one by default; ``exclude_edited_neighbors`` leaves out of it the neighbourhood
    prompts that are rewrite or paraphrase prompts of records in ``records`` (facts the evaluated batch
    itself edits), counted in ``result.neighbors_excluded``. ``retention_records`` (e.g. every record of a
    world) adds ``result.retention``: the share of their facts that ``records`` does not edit whose true
    object is still the model's greedy answer (:func:`retained_facts`), out of ``result.retention_facts``.
    """
    records = normalize_records(records)
    if not records:
        raise ValueError("no records to evaluate")
    with evaluating(model):
        edited = edited_prompts(records) if exclude_edited_neighbors else set()
        per = _score_prompts(model, tokenizer, records, batch_size, edited)
        if generation:
            _add_entropies(model, tokenizer, records, per, max_new_tokens, max_generation_records, batch_size)
        kept = retained_facts(records, retention_records) if retention_records is not None else None
        if kept:
            hits = target_top1(model, tokenizer, [p for p, _ in kept], [t for _, t in kept], batch_size=batch_size)
    result = _summarize(per, keep=per_record)
    if kept:
        result.retention, result.retention_facts = float(hits.double().mean()), len(kept)
    result.neighbors_excluded = sum(len(rec["neighborhood_prompts"]) - len(p["neighborhood"])
                                    for rec, p in zip(records, per))
    return result


def _normalized(prompt: str) -> str:
    return " ".join(prompt.split())


def edited_prompts(records: Sequence[Mapping[str, Any]]) -> set[str]:
    """The rewrite and paraphrase prompts of ``records``, whitespace-normalised: the prompts whose answer
    the batch of these records changes."""
    out = set()
    for rec in records:
        rw = rec["requested_rewrite"]
        for prompt in [fill(rw["prompt"], rw["subject"])[0], *rec["paraphrase_prompts"]]:
            out.add(_normalized(prompt))
    return out


def retained_facts(records: Sequence[Mapping[str, Any]],
                   world: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(prompt, true object)`` of each fact of ``world`` (CounterFact-format records, one fact each: subject
    and relation) that ``records`` does not edit; a relation is its ``relation_id``, else its prompt."""
    def fact(rec: Mapping[str, Any]) -> tuple[str, str]:
        rw = rec["requested_rewrite"]
        return rw["subject"].strip(), str(rw.get("relation_id") or _normalized(rw["prompt"]))

    edited = {fact(rec) for rec in normalize_records(records)}
    out, seen = [], set()
    for rec in normalize_records(world):
        key = fact(rec)
        if key not in edited and key not in seen:
            seen.add(key)
            rw = rec["requested_rewrite"]
            out.append((fill(rw["prompt"], rw["subject"])[0], rw["target_true"]["str"]))
    return out


def scored_neighbors(record: Mapping[str, Any], edited: set[str]) -> list[str]:
    """The neighbourhood prompts of ``record`` that NS scores: those not in ``edited`` (:func:`edited_prompts`)."""
    return [p for p in record["neighborhood_prompts"] if _normalized(p) not in edited]


def _score_prompts(model, tokenizer, records, batch_size, edited: set[str]) -> list[dict[str, Any]]:
    prompts, targets, where = [], [], []
    for r, rec in enumerate(records):
        rw = rec["requested_rewrite"]
        neighbors = scored_neighbors(rec, edited)
        groups = {"rewrite": [fill(rw["prompt"], rw["subject"])[0]], "paraphrase": rec["paraphrase_prompts"],
                  "neighborhood": neighbors}
        for kind, group in groups.items():
            for j, prompt in enumerate(group):
                for which in ("target_new", "target_true"):
                    prompts.append(prompt)
                    targets.append(rw[which]["str"])
                    where.append((r, kind, j, which))
    nll = target_nll(model, tokenizer, prompts, targets, batch_size=batch_size).tolist()
    per = [{"case_id": rec.get("case_id"), "rewrite": [], "paraphrase": [], "neighborhood": []} for rec in records]
    for (r, kind, j, which), value in zip(where, nll):
        group = per[r][kind]
        if j == len(group):
            group.append({})
        group[j][which] = value
    return per


def _add_entropies(model, tokenizer, records, per, max_new_tokens, max_records, batch_size) -> None:
    chosen = range(len(records)) if max_records is None else range(min(max_records, len(records)))
    prompts, owner = [], []
    for r in chosen:
        for prompt in records[r]["generation_prompts"]:
            prompts.append(prompt)
            owner.append(r)
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for r in chosen:
        mine = [t for t, o in zip(texts, owner) if o == r]
        if mine:
            per[r]["generation_entropy"] = generation_entropy(mine)
            per[r]["generations"] = mine


def _summarize(per: list[dict[str, Any]], *, keep: bool) -> CounterFactResult:
    rates: dict[str, list[float]] = {k: [] for k in ("rewrite", "paraphrase", "neighborhood")}
    mags: dict[str, list[float]] = {k: [] for k in rates}
    for rec in per:
        for kind in rates:
            pairs = rec[kind]
            if not pairs:
                continue
            sign = -1.0 if kind == "neighborhood" else 1.0  # neighbours should keep P(true) > P(new)
            diffs = [sign * (math.exp(-p["target_new"]) - math.exp(-p["target_true"])) for p in pairs]
            wins = [sign * (p["target_true"] - p["target_new"]) > 0 for p in pairs]
            rec[f"{kind}_success"] = sum(wins) / len(wins)
            rec[f"{kind}_magnitude"] = sum(diffs) / len(diffs)
            rates[kind].append(rec[f"{kind}_success"])
            mags[kind].append(rec[f"{kind}_magnitude"])
    es, ps, ns = (_mean(rates[k]) for k in ("rewrite", "paraphrase", "neighborhood"))
    entropies = [rec["generation_entropy"] for rec in per if "generation_entropy" in rec]
    return CounterFactResult(
        n_records=len(per), efficacy_score=es, efficacy_magnitude=_mean(mags["rewrite"]),
        paraphrase_score=ps, paraphrase_magnitude=_mean(mags["paraphrase"]), neighborhood_score=ns,
        neighborhood_magnitude=_mean(mags["neighborhood"]), score=_harmonic_mean([es, ps, ns]),
        generation_entropy=_mean(entropies), per_record=per if keep else [])


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _harmonic_mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if min(present) <= 0:
        return 0.0
    return len(present) / sum(1 / v for v in present)


def evaluate_pack(model: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], pack: Any,
                  **kwargs: Any) -> dict[str, CounterFactResult]:
    """Metrics before and with ``pack`` applied (``pack.applied(model)`` restores the model afterwards)."""
    applied = getattr(pack, "applied", None)
    if applied is None:
        raise MemitError(f"{type(pack).__name__} has no applied(model) context manager; this build cannot "
                         "evaluate packs yet")
    pre = evaluate_counterfact(model, tokenizer, records, **kwargs)
    with applied(model):
        post = evaluate_counterfact(model, tokenizer, records, **kwargs)
    return {"pre": pre, "post": post}


RESULT_HEADER = f"{'ES':>7}{'PS':>7}{'NS':>7}{'Score':>7}{'kept':>7}{'entropy':>9}"


def result_cells(result: CounterFactResult) -> str:
    """ES, PS, NS, Score and retention in percent and the entropy as fixed-width cells under :data:`RESULT_HEADER`
    (one row of the ``eval --methods`` and ``eval --chain`` tables)."""
    def pct(v: float | None) -> str:
        return f"{100 * v:>7.1f}" if v is not None else f"{'-':>7}"

    ent = f"{result.generation_entropy:>9.3f}" if result.generation_entropy is not None else f"{'-':>9}"
    return (f"{pct(result.efficacy_score)}{pct(result.paraphrase_score)}{pct(result.neighborhood_score)}"
            f"{pct(result.score)}{pct(result.retention)}{ent}")


def format_table(results: Mapping[str, CounterFactResult]) -> str:
    """A plain-text table, one column per result (e.g. ``pre`` and ``post``); rates in percent."""
    names = list(results)
    lines = [f"{'metric':<24}" + "".join(f"{n:>10}" for n in names)]
    lines.append(f"{'records':<24}" + "".join(f"{results[n].n_records:>10}" for n in names))
    for metric in METRICS:
        cells = []
        for n in names:
            value = getattr(results[n], metric)
            if value is None:
                cells.append(f"{'-':>10}")
            elif metric == "generation_entropy":
                cells.append(f"{value:>10.3f}")
            else:
                cells.append(f"{100 * value:>10.1f}")
        lines.append(f"{metric:<24}" + "".join(cells))
    if any(r.retention_facts for r in results.values()):
        lines.append(f"{'retention facts':<24}" + "".join(f"{results[n].retention_facts:>10}" for n in names))
    if any(r.neighbors_excluded for r in results.values()):
        lines.append(f"{'neighbors excluded':<24}" + "".join(f"{results[n].neighbors_excluded:>10}" for n in names))
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="local folder, Hub id, or a shipped world model: world-gpt2, world-llama, "
                             "world-gpt2-bpe, world-llama-sp")
    parser.add_argument("--pack", help="edit pack folder; reports the metrics before and with the pack (without "
                                       "--data: on the pack's own requests)")
    parser.add_argument("--data", help="CounterFact-format JSON (list or JSON lines); default for world models: "
                                       "their own records")
    parser.add_argument("--write-card", action="store_true",
                        help="with --pack (a local folder): write the metrics with the pack into its card")
    parser.add_argument("--n", type=int, help="evaluate the first N records")
    parser.add_argument("--out", default="eval_results.json", help="where to write the JSON results")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=100, help="length of the greedy generations")
    parser.add_argument("--no-generation", action="store_true", help="skip generation entropy (faster)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--retention", action="store_true",
                        help="also report retention: top-1 recall of every fact of the whole record set (--data "
                             "or the world's records) that the evaluated records (the edited batch) do not edit")
    from .compare import COMPARED

    parser.add_argument("--methods", nargs="+", choices=list(COMPARED),
                        help="compare editing methods: each edits the same sample of --n records (or of each size of "
                             "--sizes) and is evaluated with its pack applied; prints one table (memit-published: "
                             "MEMIT with the published settings, MemitConfig.published_for)")
    parser.add_argument("--sizes", nargs="+", type=int, help="with --methods: batch sizes (e.g. 10 100 1000), nested")
    parser.add_argument("--plot", help="with --methods/--chain: write the metrics against the number of edits to "
                                       "this PNG")
    parser.add_argument("--chain", type=int, metavar="K",
                        help="edits over time: K packs of --n records each, computed on top of each other "
                             "(sequential), re-solved with the chain (joint) or independently (--regimes), evaluated "
                             "after every pack (--every); prints one table")
    parser.add_argument("--regimes", nargs="+", choices=["sequential", "joint", "independent"],
                        default=["sequential", "joint", "independent"], help="with --chain: the regimes to run")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="with --chain: evaluate after every K-th pack (and the last) instead of after each")
    parser.add_argument("--corpus", help="with --methods/--chain: statistics corpus (a shipped world: its own)")
    parser.add_argument("--stats-cache", help="with --methods/--chain: folder of cached statistics")
    parser.add_argument("--exclude-edited-neighbors", action="store_true",
                        help="leave out of NS the neighbourhood prompts that the evaluated records rewrite "
                             "(not in the published metric; the count is reported)")


def run_cli(args: argparse.Namespace) -> int:
    if args.n is not None and args.n < 1:
        raise SystemExit(f"memit-adapter eval: --n must be at least 1, got {args.n}")
    out = Path(args.out)
    if not out.parent.is_dir() or out.is_dir():
        raise SystemExit(f"memit-adapter eval: cannot write results to {out} (no such folder, or it is a folder)")
    if args.write_card and not (args.pack and Path(args.pack).is_dir()):
        raise SystemExit("memit-adapter eval: --write-card needs --pack naming a local pack folder")
    if args.methods and args.chain:
        raise SystemExit("memit-adapter eval: --methods and --chain are separate runs; give one")
    if args.methods or args.chain:
        return _compare_cli(args, out)
    pack = _load_pack(args.pack) if args.pack else None  # before the model: a bad pack costs nothing
    model, tokenizer, world_records = load_model(args.model)
    if args.device:
        model.to(args.device)
    if args.data:
        everything = load_counterfact(args.data)
    elif world_records is not None:
        everything = normalize_records(world_records)
    elif pack is not None:
        everything = _records_of(pack.requests)
    else:
        raise SystemExit("memit-adapter eval: --data is required unless --model is a shipped world model or a --pack "
                         "is given (its own requests are then evaluated)")
    if pack is not None and not args.data:  # the pack's own requests, with a world's paraphrases when it has them
        edited = {(r.subject, r.prompt) for r in pack.requests}
        own = [r for r in everything
               if (r["requested_rewrite"]["subject"], r["requested_rewrite"]["prompt"]) in edited]
        records = own or _records_of(pack.requests)
    else:
        records = everything
    records = records if args.n is None else records[: args.n]
    kwargs = dict(batch_size=args.batch_size, generation=not args.no_generation, max_new_tokens=args.max_new_tokens,
                  exclude_edited_neighbors=args.exclude_edited_neighbors,
                  retention_records=everything if args.retention else None)
    if pack is not None:
        results = evaluate_pack(model, tokenizer, records, pack, **kwargs)
        if args.write_card:
            pack.metrics = {k: v for k, v in results["post"].to_dict().items() if isinstance(v, (int, float))}
            pack.save_pretrained(args.pack)
            print(f"wrote the metrics into {args.pack}/README.md")
    else:
        results = {"model": evaluate_counterfact(model, tokenizer, records, **kwargs)}
    print(format_table(results))
    payload = {"model": args.model, "pack": args.pack, "data": args.data, "n_records": len(records),
               "results": {k: v.to_dict() for k, v in results.items()}}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _compare_cli(args: argparse.Namespace, out: Path) -> int:
    """``eval --methods`` (:func:`~memit_adapter.compare.compare_methods`) or ``eval --chain``
    (:func:`~memit_adapter.chain.evaluate_chain`): the table, the JSON and the plot."""
    from .chain import evaluate_chain, format_chain, plot_chain
    from .compare import compare_methods, format_comparison, plot_method_scaling
    from .models import world_name

    if args.pack:
        raise SystemExit("memit-adapter eval: --methods and --chain compute their own packs; leave out --pack")
    sizes = args.sizes or [args.n or 100]
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib("eval")  # before any work: the plot comes at the end
    model, tokenizer, world_records = load_model(args.model)
    if args.device:
        model.to(args.device)
    records = load_counterfact(args.data) if args.data else normalize_records(world_records or [])
    if not records:
        raise SystemExit("memit-adapter eval: --methods needs --data unless --model is a shipped world model")
    world = world_name(args.model)
    corpus, configs = args.corpus, {}
    if world is not None:
        from .demo.checkpoints import world_config, world_model_path

        corpus = corpus or str(world_model_path(world) / "corpus.txt")
        tuned = {*(args.methods or ()), "memit"} - {"memit-published"}  # the published settings are not tuned
        configs = {m: world_config(world, model, m) for m in tuned}  # the world's tuned settings
        if "memit-published" in (args.methods or ()):  # at the world's layers and λ: only the method differs
            memit = configs["memit"]
            configs["memit-published"] = MemitConfig.published_for(model, layers=memit.layers,
                                                                   mom2_update_weight=memit.mom2_update_weight)
    if corpus is None and args.stats_cache is None and (args.chain or set(args.methods) - {"ft"}):
        raise SystemExit("memit-adapter eval: MEMIT and ROME need --corpus or --stats-cache for statistics")
    common = dict(corpus=corpus, cache_dir=args.stats_cache, retention_records=records if args.retention else None,
                  generation_records=0 if args.no_generation else 20)
    if args.chain:
        rows = evaluate_chain(model, tokenizer, records, args.chain, args.n or 100, config=configs.get("memit"),
                              regimes=args.regimes, every=args.every, **common)
        print(format_chain(rows))
        payload = [{"regime": r.regime, "pack": r.pack, "n_edits": r.n_edits, "seconds": r.seconds,
                    **r.result.to_dict()} for r in rows]
    else:
        rows = compare_methods(model, tokenizer, records, args.methods, sizes, configs=configs, **common)
        print(format_comparison(rows))
        payload = [{"method": r.method, "n_edits": r.n_edits, "seconds": r.seconds, **r.result.to_dict()}
                   for r in rows]
    out.write_text(json.dumps({"model": args.model, "data": args.data, "runs": payload}, indent=2) + "\n")
    print(f"wrote {out}")
    if args.plot:
        (plot_chain if args.chain else plot_method_scaling)(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _records_of(requests) -> list[dict[str, Any]]:
    """CounterFact records of edit requests (no paraphrases or neighbours); each needs its ``target_true``."""
    missing = [r.text for r in requests if not r.target_true]
    if missing:
        raise SystemExit(f"memit-adapter eval: {len(missing)} of the pack's requests carry no target_true (e.g. "
                         f"{missing[0]!r}), which the metrics compare against: give --data records")
    return normalize_records([{"case_id": i, "requested_rewrite": {
        "prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new},
        "target_true": {"str": r.target_true}}} for i, r in enumerate(requests)])


def _load_pack(path: str) -> Any:
    from . import pack as pack_module

    edit_pack = getattr(pack_module, "EditPack", None)
    if edit_pack is None or not hasattr(edit_pack, "from_pretrained") or not hasattr(edit_pack, "applied"):
        raise SystemExit("memit-adapter eval: this build cannot load edit packs yet "
                         "(EditPack.from_pretrained / EditPack.applied are missing)")
    return edit_pack.from_pretrained(path)
