"""``memit-adapter bench``: the engine's speed claims measured side by side in one run.

Usage::

    memit-adapter bench                          # GPT-2-small-sized random model, 100 requests
    memit-adapter bench --size tiny --n-requests 8 --json bench.json

Reports (1) the batched target-vector optimisation against the same code run one request at a time, and
the token positions a step runs (suffixes) against whole rows, (2) the one-pass statistics against one full
forward pass per layer (the published code's way) and against per-layer passes that stop at their layer,
(3) peak memory. Times are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .arch import get_arch_spec
from .config import MemitConfig
from .requests import EditRequest
from .stats import _accumulate
from .targets import compute_targets, tokens_per_step

SIZES = {
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),  # GPT-2 small
    "tiny": dict(n_layer=6, n_embd=64, n_head=4, vocab_size=2000),
}


def bench_model(size: str = "small", seed: int = 0):
    """A randomly initialised GPT-2 of ``size`` and a word-level tokenizer over its whole vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    cfg = SIZES[size]
    # special tokens named apart from the words: added tokens match inside words ("w1" would split "w1471")
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, cfg["vocab_size"])}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg, bos_token_id=2, eos_token_id=2)).eval(), tok


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run_benchmark(*, size: str = "small", n_requests: int = 100, z_steps: int = 2, n_texts: int = 64,
                  text_length: int = 128, chunk: int | None = None, device: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run the three measurements; return a dict of figures (seconds, ratios, MB).

    ``chunk`` is the batched run's ``v_batch_size`` (None: all requests in one batch).
    """
    model, tok = bench_model(size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    spec = get_arch_spec(model)
    vocab = SIZES[size]["vocab_size"]
    rng = random.Random(0)
    cfg = MemitConfig.for_model(model, v_num_grad_steps=z_steps, v_loss_threshold=0.0)
    if len(cfg.layers) == 1:  # models of <= 6 layers edit one; the statistics comparison needs several
        cfg = cfg.replace(layers=list(range(min(3, spec.num_layers(model)))))
    requests = [EditRequest(_words(rng, 2, vocab) + " {} " + _words(rng, 3, vocab), _words(rng, 2, vocab),
                            " " + _words(rng, 1, vocab)) for _ in range(n_requests)]
    templates = ["{}"] + [_words(rng, 10, vocab) + ". {}" for _ in range(5)]
    texts = [_words(rng, text_length, vocab) for _ in range(n_texts)]
    last = max(cfg.layers)
    compute_targets(model, spec, tok, requests[:2], templates, cfg.replace(v_num_grad_steps=1), last,
                    progress=False)  # warm-up: first-call allocations would count against the batched run
    out: dict[str, Any] = {"size": size, "device": device, "n_requests": n_requests, "z_steps": z_steps,
                           "chunk": chunk, "edited_layers": cfg.layers, "n_texts": n_texts, "text_length": text_length,
                           "threads": torch.get_num_threads()}
    out["z_step_tokens"], out["z_step_tokens_full_rows"] = tokens_per_step(tok, requests[: chunk or n_requests],
                                                                           templates)

    (z_b, _), out["z_batched_s"] = _timed(lambda: compute_targets(model, spec, tok, requests, templates, cfg, last,
                                                                  batch_size=chunk or n_requests, progress=progress))
    out["peak_mb_after_z_batched"] = _peak_mb()
    (z_s, _), out["z_serial_s"] = _timed(lambda: compute_targets(model, spec, tok, requests, templates, cfg, last,
                                                                 batch_size=1, progress=progress))
    out["z_speedup"] = out["z_serial_s"] / out["z_batched_s"]
    out["z_max_abs_diff"] = (z_b - z_s).abs().max().item()

    def stats(layers, stop_early=True):
        return _accumulate(model, tok, texts, layers, spec, None, 8, torch.float32, progress, stop_early)

    one, out["stats_one_pass_s"] = _timed(lambda: stats(cfg.layers))
    per_full, out["stats_per_layer_full_s"] = _timed(lambda: [stats([l], stop_early=False) for l in cfg.layers])
    _, out["stats_per_layer_truncated_s"] = _timed(lambda: [stats([l]) for l in cfg.layers])
    out["stats_speedup_vs_full_passes"] = out["stats_per_layer_full_s"] / out["stats_one_pass_s"]
    out["stats_speedup_vs_truncated_passes"] = out["stats_per_layer_truncated_s"] / out["stats_one_pass_s"]
    out["stats_target"] = 0.8 * len(cfg.layers)
    out["stats_max_abs_diff"] = max((one[l].mom2 - p[l].mom2).abs().max().item()
                                    for p, l in zip(per_full, cfg.layers))
    out["peak_mb"] = _peak_mb()
    return out


def format_report(r: dict[str, Any]) -> str:
    ok = lambda good: "meets" if good else "MISSES"  # noqa: E731
    return "\n".join([
        f"memit-adapter bench: GPT-2 '{r['size']}' random model on {r['device']} ({r['threads']} threads), "
        f"edited layers {r['edited_layers']}",
        f"z vectors, {r['n_requests']} requests x {r['z_steps']} steps: batched "
        f"({r['chunk'] or 'all'} per batch) {r['z_batched_s']:.1f} s, "
        f"one at a time {r['z_serial_s']:.1f} s -> {r['z_speedup']:.1f}x ({ok(r['z_speedup'] >= 10)} the 10x target;"
        f" max |dz| {r['z_max_abs_diff']:.2e})",
        f"z step, first batch: {r['z_step_tokens']} token positions through the blocks after L (suffixes from the"
        f" subject's last token), {r['z_step_tokens'] / r['z_step_tokens_full_rows']:.0%} of the"
        f" {r['z_step_tokens_full_rows']} of whole rows",
        f"statistics, {r['n_texts']} texts x {r['text_length']} tokens: one pass {r['stats_one_pass_s']:.1f} s, "
        f"full pass per layer {r['stats_per_layer_full_s']:.1f} s -> {r['stats_speedup_vs_full_passes']:.1f}x "
        f"({ok(r['stats_speedup_vs_full_passes'] >= r['stats_target'])} the {r['stats_target']:.1f}x target); "
        f"per-layer passes stopped at their layer {r['stats_per_layer_truncated_s']:.1f} s -> "
        f"{r['stats_speedup_vs_truncated_passes']:.1f}x",
        f"peak memory: {r['peak_mb_after_z_batched']:.0f} MB after batched z, {r['peak_mb']:.0f} MB at the end",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default: GPT-2 small)")
    parser.add_argument("--n-requests", type=int, default=100)
    parser.add_argument("--z-steps", type=int, default=2, help="optimisation steps per z (the method uses 20-25)")
    parser.add_argument("--texts", type=int, default=64, help="corpus texts for the statistics pass")
    parser.add_argument("--text-length", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=None, help="requests per batch in the batched run (default all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    if args.json and (not Path(args.json).resolve().parent.is_dir() or Path(args.json).is_dir()):
        raise SystemExit(f"memit-adapter bench: cannot write {args.json} (no such folder, or it is a folder)")
    report = run_benchmark(size=args.size, n_requests=args.n_requests, z_steps=args.z_steps, n_texts=args.texts,
                           text_length=args.text_length, chunk=args.chunk, device=args.device,
                           progress=not args.quiet)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
