"""``memit-adapter edit``: compute one pack from a requests file, save it (and push it), say how it went.

Usage::

    memit-adapter edit --model EleutherAI/gpt-j-6b --requests edits.jsonl --corpus wiki.jsonl \\
        --stats-cache mom2-cache --dtype bfloat16 --device cuda --out gptj-edits [--push me/gptj-edits] \\
        [--keep regression-facts.txt]
    memit-adapter edit --model world-gpt2-bpe --requests edits.csv --out pack   # a demo world: its corpus

Everything the command can check is checked before the model is loaded: the requests (parsed and checked
for conflicts), the config, the output folder (not a file, not someone else's files unless ``--overwrite``).
``--method rome`` or ``ft`` computes the paper's baselines instead (:mod:`memit_adapter.methods`).
The settings are the method's ``for_model`` (a shipped world's tuned ``memit_config.json`` or ``ft_config.json``),
then the fields of ``--config FILE.json``, then ``--layers``. The summary says how many rewrite prompts now give
the new target greedily, which requests ended their target optimisation above ``v_loss_threshold``, and the time
per phase.

Started by ``torchrun`` (``torchrun --nproc-per-node 4 -m memit_adapter.cli edit ... --device cuda``), every rank
loads the model (``--device cuda``: ``cuda:LOCAL_RANK``) and shares the work (:mod:`memit_adapter.distributed`);
rank 0 alone checks the takes, saves, pushes and prints.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from .distributed import is_main, process_group, rank_device
from .errors import ConfigError
from .evaluation import target_top1
from .joint import chain_requests
from .method_configs import config_class
from .methods import METHODS
from .models import load_model, world_name
from .pack import EditPack
from .persistence import check_destination
from .requests import check_keep, load_prompts, load_requests

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_layers(text: str) -> list[int]:
    """``"3-8"`` -> [3, ..., 8]; ``"3,5,7"`` -> [3, 5, 7]."""
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            return list(range(int(a), int(b) + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--layers takes a range like 3-8 or a list like 3,5,7, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id, local folder, or a demo world (world-gpt2-bpe, ...)")
    parser.add_argument("--requests", required=True, type=Path,
                        help=".jsonl or .json of EditRequest fields or CounterFact records, or .csv")
    parser.add_argument("--out", required=True, type=Path, help="folder for the pack (a PEFT LoRA adapter)")
    parser.add_argument("--method", choices=["memit", "rome", "ft"], default="memit",
                        help="memit (default), or the paper's baselines: rome (r-ROME, one rank-one update per "
                             "request) or ft (FT-W, fine-tuning one layer)")
    parser.add_argument("--config", type=Path, help="JSON file of config fields over the model's defaults "
                                                    "(MemitConfig, RomeConfig or FtConfig by --method)")
    parser.add_argument("--layers", help="edited layers, e.g. 3-8 (overrides the config)")
    parser.add_argument("--corpus", help="statistics corpus: .txt / .jsonl file (a demo world: its own corpus)")
    parser.add_argument("--stats-cache", type=Path, help="folder of cached second moments (read and written)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="load the model in this dtype (default: float32 "
                        "on CPU, the checkpoint's own on a GPU)")
    parser.add_argument("--device", help="e.g. cuda, cuda:1 (default: cpu)")
    parser.add_argument("--base-model", metavar="HUB_ID", help="the Hub id to record as the pack's base model when "
                        "--model is a local folder (default: --model when it is a Hub id)")
    parser.add_argument("--on-top-of", nargs="+", metavar="PACK",
                        help="MEMIT: packs (folders or Hub ids) computed earlier, in order: the new pack is computed "
                             "on top of them, with the last one's config unless --config/--layers are given")
    parser.add_argument("--joint", action="store_true",
                        help="with --on-top-of (a joint chain): re-solve the chain's edits and the new ones as one "
                             "batch on the base model; the new pack holds the difference")
    parser.add_argument("--keep", type=Path, metavar="FILE",
                        help="MEMIT: facts to keep as the model answers them (a regression set): a .txt of prompts, "
                             "one a line, or a requests / CounterFact file (their prompts); the solve moves their "
                             "keys less (weight: the config's keep_weight)")
    parser.add_argument("--push", metavar="REPO", help="also push the pack to this Hub repo")
    parser.add_argument("--overwrite", action="store_true", help="save into a folder holding other files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    # before any model is loaded: the requests, the config, the output folder
    requests = load_requests(args.requests)
    overrides = json.loads(args.config.read_text()) if args.config else {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{args.config}: a JSON object of MemitConfig fields is expected")
    if args.layers:
        layers = parse_layers(args.layers)
        if args.method != "memit" and len(layers) != 1:
            raise ConfigError(f"--method {args.method} edits one layer; --layers {args.layers} names {len(layers)}")
        overrides.update({"layers": layers} if args.method == "memit" else {"layer": layers[0]})
    config_class(args.method).from_dict(overrides)  # names and types of the fields, before any work
    if (args.on_top_of or args.joint) and args.method != "memit":
        raise ConfigError(f"--on-top-of/--joint compute MEMIT packs on top of others; --method {args.method} cannot")
    if args.keep and args.method != "memit":
        raise ConfigError(f"--keep is MEMIT's (its solve keeps the facts' keys); --method {args.method} cannot")
    keep = load_prompts(args.keep) if args.keep else []
    if args.joint and not args.on_top_of:
        raise ConfigError("--joint extends a chain: name its packs with --on-top-of")
    chain = [EditPack.from_pretrained(str(p)) for p in args.on_top_of or []]  # a missing pack stops us here
    keep = check_keep(keep, [*chain_requests(chain), *requests] if args.joint else requests)
    check_destination(args.out, overwrite=args.overwrite)
    corpus = args.corpus
    world = world_name(args.model)
    if corpus is None and world is None and args.stats_cache is None:
        raise SystemExit("memit-adapter edit: give --corpus (texts for the key statistics) or a --stats-cache "
                         "that holds them")

    with process_group(args.device):
        t0 = time.perf_counter()
        model, tokenizer, _ = load_model(args.model, dtype=_DTYPES.get(args.dtype))
        model.to(rank_device(args.device))
        if world is not None:
            from .demo.checkpoints import world_config, world_model_path

            corpus = corpus or str(world_model_path(world) / "corpus.txt")
        if chain and not overrides:
            config = chain[-1].config
            if args.joint and getattr(config, "repair_rounds", 0):  # a joint pack is one solve: no rounds on it
                config = config.replace(repair_rounds=0)
        elif world is not None:
            config = world_config(world, model, args.method, **overrides)
        else:
            config = config_class(args.method).for_model(model, **overrides)
        loaded = time.perf_counter() - t0
        if is_main():
            how = (f"λ = {config.update_weight(len(requests)):g}" if args.method == "memit" else args.method.upper())
            print(f"Editing {len(requests)} facts of {args.model} at layers {config.layers} ({how})", flush=True)
        extra = dict(on_top_of=chain, joint=args.joint) if chain else {}
        if keep:
            extra["keep"] = keep
        pack = METHODS[args.method](model, tokenizer, requests, config, corpus=corpus, cache_dir=args.stats_cache,
                                    progress=not args.quiet, **extra)
        if is_main():  # every rank holds the same pack: one writes it
            _save_and_report(pack, model, tokenizer, args, loaded, chain)
    return 0


def _save_and_report(pack, model, tokenizer, args: argparse.Namespace, loaded: float, chain=()) -> None:
    """Check the takes (with the ``chain`` it was computed on applied first), save (and push) the pack, print the
    summary."""
    requests = pack.requests
    if args.base_model:
        pack.base_model = args.base_model
    with ExitStack() as active:
        for p in [*chain, pack]:
            active.enter_context(p.applied(model))
        took = target_top1(model, tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    pack.save_pretrained(str(args.out), overwrite=args.overwrite)
    print(summary(pack, took.tolist(), loaded))
    print(f"Saved to {args.out}/")
    if args.push:
        pack.push_to_hub(args.push)
        print(f"Pushed to {args.push}")


def _first_five(header: str, rows: list[str]) -> list[str]:
    """``header`` and the first five ``rows``, indented; nothing when there are no rows."""
    return [header, *(f"  {row}" for row in rows[:5])] if rows else []


def summary(pack, took: list[bool], load_seconds: float) -> str:
    """The lines printed after an edit: takes, unconverged requests (the first five), time per phase, size."""
    reqs, report = pack.requests, pack.report
    lines = [f"{sum(took)} of {len(reqs)} rewrite prompts now give the new target greedily."]
    missed = [r for r, ok in zip(reqs, took) if not ok]
    for r in missed[:5]:
        lines.append(f"  not yet: {r.text!r} -> {r.target_new!r}")
    unconverged = report.get("unconverged", [])
    lines += _first_five(f"{len(unconverged)} requests ended their target optimisation below even odds (raise "
                         "v_max_grad_steps, v_num_grad_steps or v_lr):",
                         [f"NLL {report['z_nll'][i]:.3f}: {reqs[i].text!r} -> {reqs[i].target_new!r}"
                          for i in unconverged])
    moved = report.get("off_last_token", [])
    lines += _first_five(f"{len(moved)} requests are edited at a subject token before the last, from which the model "
                         "reaches their target (edit_token 'reach'; the pack's requests.jsonl gives each "
                         "subject_token):",
                         [f"token {reqs[i].subject_token} of {reqs[i].subject!r}: {reqs[i].text!r}" for i in moved])
    if report.get("kept_prompts"):
        lines.append(f"{report['kept_prompts']} facts to keep held in the solve (keep_weight "
                     f"{pack.config.keep_weight:g}).")
    seconds = {"load": load_seconds, **report.get("seconds", {})}
    lines.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    lines.append(f"Pack: {len(pack.deltas)} layers, {pack.nbytes / 1e6:.2f} MB")
    return "\n".join(lines)
