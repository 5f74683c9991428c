"""``memit-adapter export --format vllm``: a pack as a LoRA adapter that vLLM serves.

Usage::

    memit-adapter export edits/ --format vllm --out edits-vllm [--max-rank 512] [--model BASE]
    report = export_vllm(pack, "edits-vllm", max_rank=512)   # per-module rank and relative error

vLLM sizes its LoRA buffers from one ``--max-lora-rank`` (at most 512), reads one ``r`` and ``lora_alpha`` per
adapter (no ``rank_pattern`` / ``alpha_pattern``) and scales every module by ``lora_alpha / r``. A pack's rank
per module is its number of edits until the delta turns dense, so the export gives every module one rank
``r = min(max_rank, largest rank)`` with ``lora_alpha = r`` (scale 1): a smaller module is padded with zero
rows and columns (exact), a larger one is cut to its best rank-``r`` approximation by SVD (the relative
Frobenius error of each is reported; with ``--model``, also how many rewrite prompts still give the new target).
vLLM has no LoRA for GPT-2, GPT-J or GPT-NeoX: those packs are refused, naming ``memit-adapter merge``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import PackError
from .pack import EditPack, LayerDelta
from .persistence import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, check_destination, config_base_model, peft_tensors

VLLM_MAX_RANK = 512
VLLM_LORA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")


def uniform_rank_deltas(pack: EditPack, max_rank: int = VLLM_MAX_RANK) -> tuple[dict[str, LayerDelta], dict]:
    """Every delta of ``pack`` as factors of one rank ``r = min(max_rank, largest rank)``; and per module its
    rank before, and the relative Frobenius error ``‖Δ − Δ_r‖ / ‖Δ‖`` (0 where nothing was cut)."""
    if max_rank < 1:
        raise PackError(f"max_rank must be >= 1, got {max_rank}")
    ranks = {name: d.lora_factors()[0].shape[1] for name, d in pack.deltas.items()}
    r = min(max_rank, max(ranks.values()))
    out, report = {}, {}
    for name, d in pack.deltas.items():
        if ranks[name] > r:
            cut, discarded, total = d.truncated(r)
            B, A = cut.B, cut.A
            error = (discarded / total) ** 0.5 if total > 0 else 0.0
        else:
            B, A = d.lora_factors()
            error = 0.0
        pad = r - B.shape[1]
        if pad:
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)
        out[name] = LayerDelta(B=B.contiguous(), A=A.contiguous())
        report[name] = {"rank": ranks[name], "relative_error": error}
    return out, {"r": r, "modules": report}


def export_vllm(pack: EditPack, out_dir: str | Path, *, max_rank: int = VLLM_MAX_RANK,
                overwrite: bool = False) -> dict[str, Any]:
    """Write ``pack`` to ``out_dir`` as a vLLM-servable LoRA adapter; return the rank and per-module errors.

    Raises :class:`PackError` for architectures vLLM serves without LoRA, and what
    :func:`~memit_adapter.persistence.check_destination` raises for the folder, before writing anything.
    """
    if pack.model_type not in VLLM_LORA_MODEL_TYPES:
        raise PackError(f"vLLM has no LoRA support for {pack.model_type!r} models (it has for "
                        f"{', '.join(VLLM_LORA_MODEL_TYPES)}); merge the pack into the weights instead: "
                        "memit-adapter merge --model BASE --packs PACK --out DIR, and serve that folder")
    if pack.fan_in_fan_out:
        raise PackError("the pack's weights are stored (d_in, d_out) (GPT-2's Conv1D): vLLM's LoRA does not take them")
    check_destination(out_dir, overwrite=overwrite)
    deltas, report = uniform_rank_deltas(pack, max_rank)
    r = report["r"]
    tensors = peft_tensors(deltas)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config_base_model(pack),
              "r": r, "lora_alpha": r, "lora_dropout": 0.0, "target_modules": sorted(deltas), "bias": "none",
              "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pack", help="a pack folder or Hub repo id")
    parser.add_argument("--format", choices=["vllm"], default="vllm", help="the target (default vllm)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the exported adapter")
    parser.add_argument("--max-rank", type=int, default=VLLM_MAX_RANK,
                        help=f"vLLM's --max-lora-rank (default and largest: {VLLM_MAX_RANK})")
    parser.add_argument("--model", help="base model: also report how many rewrite prompts still take after the cut")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder holding other files")


def run_cli(args: argparse.Namespace) -> int:
    if not 1 <= args.max_rank <= VLLM_MAX_RANK:
        raise SystemExit(f"memit-adapter export: --max-rank must be 1..{VLLM_MAX_RANK}, got {args.max_rank}")
    pack = EditPack.from_pretrained(args.pack)
    report = export_vllm(pack, args.out, max_rank=args.max_rank, overwrite=args.overwrite)
    print(f"Exported to {args.out}/: rank {report['r']} everywhere, lora_alpha = r (scale 1)")
    for name, m in report["modules"].items():
        how = "cut by SVD" if m["relative_error"] > 0 else ("padded" if m["rank"] < report["r"] else "as is")
        print(f"  {name}: rank {m['rank']} -> {report['r']} ({how}), relative error {m['relative_error']:.2e}")
    if args.model:
        print(_takes(pack, args.model, report["r"]))
    return 0


def _takes(pack: EditPack, model_name: str, r: int) -> str:
    from .evaluation import target_top1
    from .models import load_model

    model, tokenizer, _ = load_model(model_name)
    prompts, targets = [q.text for q in pack.requests], [q.target_new for q in pack.requests]
    with pack.applied(model):
        before = int(target_top1(model, tokenizer, prompts, targets).sum())
    cut = EditPack(deltas=uniform_rank_deltas(pack, r)[0], requests=pack.requests, config=pack.config,
                   model_type=pack.model_type, base_model=pack.base_model, fingerprint=pack.fingerprint)
    with cut.applied(model):
        after = int(target_top1(model, tokenizer, prompts, targets).sum())
    return (f"Rewrite prompts giving the new target greedily: {before} of {len(prompts)} with the pack, "
            f"{after} exported")
