"""Pack commands: ``inspect``, ``merge``, ``push``, ``pull``, ``compress``.

Usage::

    memit-adapter inspect edits/                 # or a Hub repo id; --json for the same as JSON
    memit-adapter merge --model gpt2-xl --packs edits/ more-edits/ --out gpt2-xl-edited
    memit-adapter push edits/ me/gpt2-xl-edits [--subfolder day-1] [--private]
    memit-adapter pull me/gpt2-xl-edits --out edits/ [--subfolder day-1] [--revision v2]
    memit-adapter compress edits/ --rank 64 [--out edits-r64]   # in place without --out

``inspect`` prints the pack's id, base model and fingerprint, its parents, the edited modules (shape, rank,
dense or low rank, dtype, bytes), the settings that made it, the metrics in its card and the first requests.
``merge`` loads the base model, merges each pack in turn (each checked against the weights it was computed on)
and saves a model folder that ``AutoModelForCausalLM.from_pretrained`` loads without this library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .pack import EditPack

_SHOWN_SETTINGS = ("mom2_update_weight", "v_num_grad_steps", "v_loss_threshold", "nullspace_threshold",
                   "repair_rounds", "original_key", "lr", "num_steps", "weight_decay")


def describe(pack: EditPack) -> dict[str, Any]:
    """What ``inspect`` shows, as a JSON-ready dict."""
    cfg = pack.config
    return {
        "pack_id": pack.pack_id, "base_model": pack.base_model, "revision": pack.revision,
        "model_type": pack.model_type, "fingerprint": pack.fingerprint, "parents": list(pack.parents),
        "n_edits": len(pack.requests), "bytes": pack.nbytes,
        "chain_targets": None if pack.targets is None else pack.targets.shape[0],
        "modules": {name: {"shape": list(d.shape), "rank": d.rank, "form": "dense" if d.is_dense else "low rank",
                           "dtype": str(d.dtype).replace("torch.", ""), "bytes": d.nbytes}
                    for name, d in sorted(pack.deltas.items())},
        "config": {"method": cfg.method, "layers": list(cfg.layers),
                   **{k: v for k, v in cfg.to_dict().items() if k in _SHOWN_SETTINGS}},
        "metrics": dict(pack.metrics),
        "requests": [{"text": r.text, "target_new": r.target_new, "target_true": r.target_true}
                     for r in pack.requests],
    }


def format_description(info: dict[str, Any], n_requests: int = 5) -> str:
    lines = [f"pack {info['pack_id']}: {info['n_edits']} edits of {info['base_model'] or 'an unrecorded base model'}"
             f" ({info['model_type']}), {info['bytes'] / 1e6:.2f} MB",
             f"fingerprint of the base weights: {info['fingerprint'] or 'not recorded'}",
             f"parents: {', '.join(info['parents']) or 'none'}",
             "target vectors: " + ("none (a joint chain cannot be extended from this pack)"
                                   if info["chain_targets"] is None else
                                   f"{info['chain_targets']}, of its chain's requests (joint=True can extend it)"),
             "settings: " + ", ".join(f"{k} {v}" for k, v in info["config"].items()),
             "modules:"]
    for name, m in info["modules"].items():
        lines.append(f"  {name}: {m['shape'][0]}x{m['shape'][1]}, rank {m['rank']}, {m['form']}, {m['dtype']}, "
                     f"{m['bytes'] / 1e6:.2f} MB")
    if info["metrics"]:
        lines.append("metrics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in sorted(info["metrics"].items())))
    lines.append("requests:")
    for r in info["requests"][:n_requests]:
        was = f" (was {r['target_true']!r})" if r["target_true"] else ""
        lines.append(f"  {r['text']!r} -> {r['target_new']!r}{was}")
    if len(info["requests"]) > n_requests:
        lines.append(f"  ... {len(info['requests']) - n_requests} more")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pack", help="a pack folder or Hub repo id")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.add_argument("--revision", help="Hub revision of the pack")


def run_cli(args: argparse.Namespace) -> int:
    info = describe(EditPack.from_pretrained(args.pack, revision=args.revision))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model: Hub id or local folder")
    parser.add_argument("--packs", required=True, nargs="+", help="pack folders or Hub repo ids, merged in order")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the merged model and tokenizer")
    parser.add_argument("--force", action="store_true", help="merge packs whose fingerprint does not match")


def run_merge_cli(args: argparse.Namespace) -> int:
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise SystemExit(f"memit-adapter merge: --out {args.out} exists and is not an empty folder")
    packs = [EditPack.from_pretrained(p) for p in args.packs]  # every pack readable before the model loads
    from .models import load_model

    model, tokenizer, _ = load_model(args.model)
    for path, pack in zip(args.packs, packs):
        pack.merge(model, force=args.force)
        print(f"merged {path}: {len(pack.requests)} edits into {len(pack.deltas)} modules")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"Saved the merged model to {args.out}/ (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pack", help="a pack folder")
    parser.add_argument("repo", help="Hub repo id, created if needed")
    parser.add_argument("--subfolder", help="keep several packs in one repo")
    parser.add_argument("--revision", help="branch (created from the default branch if needed)")
    parser.add_argument("--private", action="store_true")


def run_push_cli(args: argparse.Namespace) -> int:
    pack = EditPack.from_pretrained(args.pack)
    pack.push_to_hub(args.repo, subfolder=args.subfolder, revision=args.revision, private=args.private or None)
    print(f"pushed {len(pack.requests)} edits to {args.repo}" + (f"/{args.subfolder}" if args.subfolder else ""))
    return 0


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo", help="Hub repo id")
    parser.add_argument("--out", required=True, type=Path, help="folder to save the pack in")
    parser.add_argument("--subfolder")
    parser.add_argument("--revision")
    parser.add_argument("--overwrite", action="store_true", help="save into a folder holding other files")


def run_pull_cli(args: argparse.Namespace) -> int:
    from .persistence import check_destination

    check_destination(args.out, overwrite=args.overwrite)
    pack = EditPack.from_pretrained(args.repo, revision=args.revision, subfolder=args.subfolder)
    pack.save_pretrained(str(args.out), overwrite=args.overwrite)
    print(f"saved {len(pack.requests)} edits of {pack.base_model or 'an unrecorded base model'} to {args.out}/")
    return 0


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pack", help="a pack folder")
    parser.add_argument("--rank", required=True, type=int, help="largest rank kept in every module")
    parser.add_argument("--out", type=Path, help="save here (default: replace the pack in place)")


def run_compress_cli(args: argparse.Namespace) -> int:
    pack = EditPack.from_pretrained(args.pack)
    before = pack.nbytes
    error = pack.compress(args.rank)
    out = args.out or Path(args.pack)
    pack.save_pretrained(str(out))
    print(f"rank <= {args.rank}: relative error {error:.2e}, {before / 1e6:.2f} MB -> {pack.nbytes / 1e6:.2f} MB, "
          f"saved to {out}/")
    return 0
