"""Sweep MEMIT settings on a shipped world model: ES/PS/NS/entropy for batches of edits.

    python scripts/sweep_world_edits.py --model world-gpt2 --n-edits 100 --lam 50 256 1000 --layers 0-2 1-3
    python scripts/sweep_world_edits.py --model world-gpt2 --n-edits 1000 --json sweep.json
    python scripts/sweep_world_edits.py --model world-gpt2-bpe --base published --base for_model
    python scripts/sweep_world_edits.py --model world-gpt2-bpe --nullspace 0 0.1:mean_eigenvalue --nullspace-l2 10 1
    python scripts/sweep_world_edits.py --model world-llama-sp --lam 100 --keep-fraction 0.5 --keep-weight 0 0.3 1

Each setting computes one pack on the same seeded sample of records and evaluates it with the pack
hooked in (the model is never changed): ES/PS/NS (published NS), retention of every other fact of the
world, and the edit time. ``--base`` picks what the grid varies: ``for_model`` (the library's defaults)
and/or ``published`` (the published method's settings, MEMIT_SPEC.md, at layers 0-2 and λ 300 for these
small models). ``--nullspace`` switches the AlphaEdit null-space solve on (``nullspace_threshold``, optionally
``:nullspace_threshold_of``; 0 = off) and ``--nullspace-l2`` sets its α. Prints one line per setting; --json keeps
them all. ``--keep-fraction F`` gives ``compute_edits`` a regression set (``keep``): the prompts of the facts of a
seeded random fraction F of the subjects the batch does not edit, at each ``--keep-weight`` (0 = none); each line
then also gives the retention of the facts in the set, of the other unedited subjects' facts (held out: not in the
set) and of the edited subjects' other facts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch

from memit_adapter import EditRequest, MemitConfig, collect_stats, compute_edits
from memit_adapter.demo import world_model_path
from memit_adapter.edit import parse_layers
from memit_adapter.evaluation import (
    edited_prompts,
    evaluate_counterfact,
    retained_facts,
    scored_neighbors,
    target_nll,
    target_top1,
)
from memit_adapter.models import load_model


def corpus_of(name: str) -> Path:
    """The training corpus of a shipped world model (``world-gpt2``) or of a folder written by train_world.py."""
    folder = Path(name)
    return folder / "corpus.txt" if (folder / "corpus.txt").is_file() else world_model_path(name) / "corpus.txt"


def line(r) -> str:
    ent = "-" if r.generation_entropy is None else f"{r.generation_entropy:.3f}"
    return (f"ES {r.efficacy_score:.3f} PS {r.paraphrase_score:.3f} NS {r.neighborhood_score:.3f} "
            f"score {r.score:.3f} retention {r.retention:.3f} entropy {ent}")


def published(model, **fields) -> MemitConfig:
    """The published method's settings (20 z steps of lr 0.5, clamp 0.75, KL 0.0625, weight decay 0.5,
    threshold 0.05) at layers 0-2 and λ 300, with for_model's statistics budget so that only the method differs."""
    scaled = MemitConfig.for_model(model)
    values = dict(layers=[0, 1, 2], mom2_update_weight=300.0, v_num_grad_steps=20,
                  mom2_max_tokens=scaled.mom2_max_tokens, mom2_max_length=scaled.mom2_max_length,
                  stats_batch_size=scaled.stats_batch_size)
    return MemitConfig(**{**values, **fields})


def nullspace(text: str) -> tuple[float, str]:
    """``"2e-2"`` -> ``(0.02, "absolute")``; ``"0.1:mean_eigenvalue"`` -> ``(0.1, "mean_eigenvalue")``."""
    threshold, _, reference = text.partition(":")
    return float(threshold), reference or "absolute"


def neighbor_split(records) -> dict[str, list[tuple[str, str, str]]]:
    """The NS prompts ``(prompt, target_true, target_new)`` that evaluation scores, split by whether the
    neighbour's subject has an edit of its own in ``records``."""
    edited = edited_prompts(records)
    subjects = {r["requested_rewrite"]["subject"] for r in records}
    out: dict[str, list[tuple[str, str, str]]] = {"ns_edited_subject": [], "ns_unedited_subject": []}
    for rec in records:
        rw = rec["requested_rewrite"]
        for prompt in scored_neighbors(rec, edited):
            key = "ns_edited_subject" if any(s in prompt for s in subjects) else "ns_unedited_subject"
            out[key].append((prompt, rw["target_true"]["str"], rw["target_new"]["str"]))
    return out


def success_rate(model, tok, items) -> tuple[float, int]:
    """Share of ``items`` whose true object is more likely than the new one, and their count."""
    if not items:
        return float("nan"), 0
    prompts = [p for p, _, _ in items]
    true = target_nll(model, tok, prompts, [t for _, t, _ in items])
    new = target_nll(model, tok, prompts, [n for _, _, n in items])
    return float((true < new).float().mean()), len(items)


def keep_split(chosen, records, fraction: float, seed: int):
    """A regression set and what it leaves out, as ``(prompt, true object)``: the facts of a seeded random
    ``fraction`` of the subjects ``chosen`` does not edit (to keep), those of the other unedited subjects (held out)
    and those ``chosen`` leaves alone of the subjects it edits."""
    edited = {r["requested_rewrite"]["subject"] for r in chosen}
    others = sorted({r["requested_rewrite"]["subject"] for r in records} - edited)
    kept = set(random.Random(1000 + seed).sample(others, round(fraction * len(others))))
    facts = lambda subjects: retained_facts(chosen, [r for r in records  # noqa: E731
                                                     if r["requested_rewrite"]["subject"] in subjects])
    return facts(kept), facts(set(others) - kept), facts(edited)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="world-gpt2", help="world-gpt2, world-llama or a train_world.py folder")
    p.add_argument("--n-edits", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lam", type=float, nargs="*", default=None, help="λ values (default: for_model's)")
    p.add_argument("--layers", nargs="*", default=None, help="ranges like 0-2 (default: for_model's)")
    p.add_argument("--clamp", type=float, nargs="*", default=None)
    p.add_argument("--kl", type=float, nargs="*", default=None)
    p.add_argument("--steps", type=int, nargs="*", default=None)
    p.add_argument("--lr", type=float, nargs="*", default=None, help="v_lr values (relative when for_model's are)")
    p.add_argument("--share", type=int, nargs="*", default=None, help="share_subject_delta values (1/0)")
    p.add_argument("--preserve", type=float, nargs="*", default=None, help="preserve_factor values")
    p.add_argument("--nullspace", nargs="*", default=None, metavar="THRESHOLD[:REFERENCE]",
                   help="AlphaEdit null-space solve: nullspace_threshold values, each optionally with its "
                        "nullspace_threshold_of (absolute, max_eigenvalue, mean_eigenvalue; default absolute); "
                        "0 = off (MEMIT's solve)")
    p.add_argument("--nullspace-l2", type=float, nargs="*", default=None, help="nullspace_l2 (α) values")
    p.add_argument("--split-ns", action="store_true",
                   help="also print NS over neighbours whose subject the batch edits / does not edit")
    p.add_argument("--keep-fraction", type=float, default=0.0,
                   help="facts of this fraction of the subjects form a regression set to keep (see above)")
    p.add_argument("--keep-weight", type=float, nargs="*", default=None, help="keep_weight values (0: no set)")
    p.add_argument("--set", default="{}", help='JSON of other MemitConfig fields for every setting, e.g. '
                   '\'{"v_loss_threshold": 0.01}\'')
    p.add_argument("--entropy", type=int, default=0, help="records whose generations give the entropy (0: skip)")
    p.add_argument("--base", nargs="*", choices=["for_model", "published"], default=["for_model"])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tok, records = load_model(args.model)
    corpus = corpus_of(args.model)
    chosen = random.Random(args.seed).sample(records, min(args.n_edits, len(records)))
    requests = [EditRequest.from_dict(r) for r in chosen]
    bases = {"for_model": lambda: MemitConfig.for_model(model, **json.loads(args.set)),
             "published": lambda: published(model, **json.loads(args.set))}
    n_layers = model.config.num_hidden_layers
    first = bases[args.base[0]]()
    stats = collect_stats(model, tok, corpus, range(n_layers),
                          max_tokens=first.mom2_max_tokens, batch_size=first.stats_batch_size, progress=False)
    gen = dict(generation=bool(args.entropy), max_generation_records=args.entropy or None, retention_records=records)
    pre = evaluate_counterfact(model, tok, chosen, **gen)
    rows = [{"setting": "unedited", **pre.to_dict()}]
    print(f"unedited: {line(pre)}", flush=True)
    split = neighbor_split(chosen) if args.split_ns else None
    if not 0 <= args.keep_fraction <= 1 or bool(args.keep_fraction) != bool(args.keep_weight):
        p.error("--keep-fraction (in (0, 1]) and --keep-weight go together")
    kept_facts, held, edited_others = (keep_split(chosen, records, args.keep_fraction, args.seed)
                                       if args.keep_fraction else ([], [], []))
    keep = [q for q, _ in kept_facts]
    for base_name in args.base:
        base = bases[base_name]()
        grid = itertools.product(args.lam or [base.mom2_update_weight],
                                 [parse_layers(x) for x in args.layers] if args.layers else [base.layers],
                                 args.clamp or [base.clamp_norm_factor], args.kl or [base.kl_factor],
                                 args.steps or [base.v_num_grad_steps], args.lr or [base.v_lr],
                                 [bool(x) for x in args.share] if args.share else [base.share_subject_delta],
                                 args.preserve or [base.preserve_factor],
                                 [nullspace(x) for x in args.nullspace] if args.nullspace
                                 else [(base.nullspace_threshold, base.nullspace_threshold_of)],
                                 args.nullspace_l2 or [base.nullspace_l2],
                                 args.keep_weight if args.keep_weight is not None and keep else [0.0])
        for lam, layers, clamp, kl, steps, lr, share, preserve, (null_t, null_of), l2, beta in grid:
            if not null_t and args.nullspace_l2 and l2 != args.nullspace_l2[0]:
                continue  # the null-space solve is off: α plays no part, one run is enough
            cfg = base.replace(mom2_update_weight=lam, layers=layers, clamp_norm_factor=clamp, kl_factor=kl,
                               v_num_grad_steps=steps, v_lr=lr, share_subject_delta=share, preserve_factor=preserve,
                               nullspace_threshold=null_t, nullspace_threshold_of=null_of, nullspace_l2=l2,
                               keep_weight=beta or base.keep_weight)
            t0 = time.perf_counter()
            pack = compute_edits(model, tok, requests, cfg, stats=stats, progress=False, keep=keep if beta else ())
            secs = time.perf_counter() - t0
            with pack.applied(model), torch.no_grad():
                post = evaluate_counterfact(model, tok, chosen, **gen)
                ns_split = {k: success_rate(model, tok, v) for k, v in split.items()} if split else {}
                for name, facts in (("retention_kept", kept_facts), ("retention_held_out", held),
                                    ("retention_edited_subjects", edited_others)):
                    if facts:
                        hits = target_top1(model, tok, [q for q, _ in facts], [t for _, t in facts])
                        ns_split[name] = (float(hits.float().mean()), len(facts))
            setting = dict(base=base_name, lam=lam, layers=layers, clamp=clamp, kl=kl, steps=steps, lr=lr,
                           share=share, preserve=preserve, nullspace_threshold=null_t, nullspace_threshold_of=null_of,
                           nullspace_l2=l2, keep_weight=beta, kept_prompts=len(keep) if beta else 0,
                           seconds=round(secs, 1))
            rows.append({"setting": setting, **post.to_dict(), **ns_split})
            extra = "".join(f" {k} {v[0]:.3f} (n={v[1]})" for k, v in ns_split.items())
            print(f"{setting}: {line(post)}{extra}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
