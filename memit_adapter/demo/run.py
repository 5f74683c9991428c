"""``memit-adapter demo``: edit 100 facts of the shipped world model at once, end to end, offline.

Usage::

    memit-adapter demo                     # GPT-2 + byte-level BPE world model, 100 edits, pack in ./memit-demo-pack
    memit-adapter demo --model llama-sp --n-edits 50 --out /tmp/pack

Loads the world model, shows what it believes, computes one MEMIT pack for all edits, shows the new
answers on the rewrite prompt and a paraphrase and that a neighbour (a subject the batch does not edit)
kept its answer, prints ES/PS/NS before and after, saves the pack, loads it into a fresh model with stock
``model.load_adapter`` (PEFT's ``PeftModel`` where the installed transformers refuses its adapter methods,
see :mod:`memit_adapter.compat`) and switches it off and on.
"""

from __future__ import annotations

import argparse
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..compat import stock_adapter_refusal
from ..engine import compute_edits
from ..evaluation import evaluate_counterfact, format_table, target_top1
from ..requests import EditRequest
from .checkpoints import DEFAULT_WORLD, WORLD_MODELS, load_world_model, world_config, world_model_path


def _answer(model, tokenizer, prompt: str, max_tokens: int = 8) -> str:
    """The first word the model writes after ``prompt``, decoding greedily (objects may be several tokens)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(max_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            words = tokenizer.decode(ids[0, start:], skip_special_tokens=True).split()
            if len(words) > 1:
                break
    return words[0] if words else ""


def _untouched(prompts: list[str], edited: set[str]) -> str:
    """The first prompt about a subject that no request of the batch edits (else the first prompt)."""
    return next((p for p in prompts if not any(f" {s} " in f" {p} " for s in edited)), prompts[0])


def _say(text: str = "") -> None:
    print(text, flush=True)


def _load_stock(base, folder: str):
    """Load a saved pack into ``base`` with stock code only; return (model, switch-off context, how).

    transformers' own adapter methods when the installed pair allows them, else (saying why in one line)
    PEFT's ``PeftModel`` with its ``disable_adapter()`` context manager.
    """
    refusal = stock_adapter_refusal()
    if refusal is None:
        base.load_adapter(folder, adapter_name="edits")

        @contextmanager
        def adapter_off():
            base.disable_adapters()
            try:
                yield
            finally:
                base.enable_adapters()

        return base, adapter_off, f"stock model.load_adapter({folder!r})"
    _say(f"\nNote: {refusal}")
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, folder, adapter_name="edits")
    return model, model.disable_adapter, f"stock PeftModel.from_pretrained(model, {folder!r})"


def run_demo(model_name: str = DEFAULT_WORLD, *, n_edits: int = 100, out: str | Path = "memit-demo-pack",
             seed: int = 0, progress: bool = True) -> dict:
    """Run the demo; return the metrics before and after and the pack folder."""
    t0 = time.perf_counter()
    model, tok, records = load_world_model(model_name)
    corpus = world_model_path(model_name) / "corpus.txt"
    chosen = random.Random(seed).sample(records, min(n_edits, len(records)))
    requests = [EditRequest.from_dict(r) for r in chosen]
    _say(f"Loaded the {model_name} world model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
         f"{len(records)} known facts).")
    _say("\nWhat it believes now:")
    for req in requests[:3]:
        _say(f"  {req.text!r:48} -> {_answer(model, tok, req.text)!r}")

    cfg = world_config(model_name, model)  # the settings tuned for this world (its memit_config.json)
    _say(f"\nEditing {len(requests)} facts at once with MEMIT "
         f"(layers {cfg.layers}, λ = {cfg.update_weight(len(requests)):g})...")
    t_edit = time.perf_counter()
    pack = compute_edits(model, tok, requests, cfg, corpus=corpus, progress=progress)
    _say(f"  computed in {time.perf_counter() - t_edit:.1f} s; pack: {len(pack.deltas)} layers, "
         f"{pack.nbytes / 1e6:.2f} MB")

    with pack.applied(model):
        answers = [_answer(model, tok, req.text) for req in requests]
        greedy = target_top1(model, tok, [req.text for req in requests], [req.target_new for req in requests])
        took = [i for i, hit in enumerate(greedy.tolist()) if hit]
        _say(f"\nWith the edits applied (weights untouched, deltas hooked in), {len(took)} of {len(requests)} "
             "rewrite prompts now give the new object as the top answer:")
        shown = (took + [i for i in range(len(requests)) if i not in took])[:3]
        edited = {req.subject for req in requests}
        for i in shown:
            rec, req = chosen[i], requests[i]
            para, neigh = rec["paraphrase_prompts"][0], _untouched(rec["neighborhood_prompts"], edited)
            _say(f"  rewrite    {req.text!r:48} -> {answers[i]!r} (asked: {req.target_new.strip()!r})")
            _say(f"  paraphrase {para!r:48} -> {_answer(model, tok, para)!r}")
            _say(f"  neighbour  {neigh!r:48} -> {_answer(model, tok, neigh)!r} "
                 f"(true: {rec['requested_rewrite']['target_true']['str'].strip()!r})")
        post = evaluate_counterfact(model, tok, chosen, generation=False, retention_records=records)
    pre = evaluate_counterfact(model, tok, chosen, generation=False, retention_records=records)
    _say("\nCounterFact metrics on the edited facts, and retention: the other facts of the world still "
         "recalled (%):")
    _say(format_table({"before": pre, "after": post}))

    out = Path(out)
    pack.metrics = {k: v for k, v in post.to_dict().items() if isinstance(v, (int, float))}
    pack.save_pretrained(str(out))
    _say(f"\nSaved the pack to {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")

    fresh, _, _ = load_world_model(model_name)
    stock, adapter_off, how = _load_stock(fresh, str(out))  # stock transformers + PEFT, no memit_adapter involved
    req = requests[shown[0]]
    _say(f"\nA fresh model with {how}:")
    toggled = [_answer(stock, tok, req.text)]
    _say(f"  adapter on : {req.text!r} -> {toggled[-1]!r}")
    with adapter_off():
        toggled.append(_answer(stock, tok, req.text))
        _say(f"  adapter off: {req.text!r} -> {toggled[-1]!r}")
    toggled.append(_answer(stock, tok, req.text))
    _say(f"  adapter on : {req.text!r} -> {toggled[-1]!r}")
    _say(f"\nDone in {time.perf_counter() - t0:.0f} s.")
    return {"pre": pre, "post": post, "pack_dir": out, "n_took": len(took), "stock_on_off_on": toggled}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_WORLD, choices=list(WORLD_MODELS),
                        help=f"shipped world model (default {DEFAULT_WORLD})")
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--out", default="memit-demo-pack", help="folder for the saved pack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    run_demo(args.model, n_edits=args.n_edits, out=args.out, seed=args.seed, progress=not args.quiet)
    return 0
