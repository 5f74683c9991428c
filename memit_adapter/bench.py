"""``memit-adapter bench``: the engine's speed claims measured side by side in one run.

Usage::

    memit-adapter bench                          # GPT-2-small-sized random model, 100 requests
    memit-adapter bench --size tiny --n-requests 8 --json bench.json
    memit-adapter bench --compare world-gpt2-bpe --n-requests 1000     # (a) / (b) / (c), see run_comparison
    memit-adapter bench --compare world-gpt2-bpe --frontier 10 15 20 30 --plot frontier.png   # Score vs seconds
    memit-adapter bench --compare world-gpt2-bpe --frontier 10x3 20x2   # also: 10 steps at 3x each method's lr
    memit-adapter bench --compare world-gpt2-bpe --seeds 0 1 2   # mean ± sd over three samples of requests
    memit-adapter bench --scale llama-7b --sizes 1000 10000 --texts 2000 --json scale.json   # on a GPU

On a GPU machine without the package installed: ``PYTHONPATH=. python3 -m memit_adapter.cli bench --scale ...``.

Reports (1) the batched target-vector optimisation against the same code run one request at a time, and
the token positions a step runs (suffixes) against whole rows, (2) the one-pass statistics against one full
forward pass per layer (the published code's way) and against per-layer passes that stop at their layer,
(3) peak memory. Times are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .arch import get_arch_spec
from .config import MemitConfig
from .requests import EditRequest
from .stats import _accumulate
from .targets import KL_PROMPT, compute_targets, lr_factor, tokens_per_step
from .tokens import encode_fact, pad_id, pad_right

SIZES = {
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),  # GPT-2 small
    "tiny": dict(n_layer=6, n_embd=64, n_head=4, vocab_size=2000),
}


# random models of published shapes for `bench --scale` (GPU-sized), and tiny ones of the same kinds to test it
SCALE_SHAPES = {
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257)),
    "llama-7b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)),
    "tiny-gpt2": ("gpt2", dict(n_layer=4, n_embd=64, n_head=4, vocab_size=500)),
    "tiny-llama": ("llama", dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=500)),
}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` words ``w3`` ... (ids 0-2: unknown, padding, end of text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # special tokens named apart from the words: added tokens match inside words ("w1" would split "w1471")
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def random_model(arch: str, fields: dict[str, Any], *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 seed: int = 0, **special: int):
    """A randomly initialised ``arch`` model (a transformers model type) of config ``fields``, built on ``device``
    in ``dtype`` (bos / eos id 2, and ``special`` ids), and a word-level tokenizer over its vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, **fields, bos_token_id=2, eos_token_id=2, **special)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), word_tokenizer(fields["vocab_size"])


def bench_model(size: str = "small", seed: int = 0):
    """A randomly initialised GPT-2 of ``size`` (:data:`SIZES`) and a word-level tokenizer over its whole
    vocabulary."""
    return random_model("gpt2", SIZES[size], seed=seed)


def scale_model(shape: str, *, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0):
    """A randomly initialised model of ``shape`` (:data:`SCALE_SHAPES`), built on ``device`` in ``dtype``, and a
    word-level tokenizer over its vocabulary."""
    arch, fields = SCALE_SHAPES[shape]
    return random_model(arch, fields, dtype=dtype, device=device, seed=seed, pad_token_id=1)


def run_scale(shape: str, sizes: list[int], *, dtype: str = "bfloat16", device: str | None = None,
              n_texts: int = 2000, text_length: int = 128, max_minutes: float = 8.0,
              progress: bool = True) -> dict[str, Any]:
    """Edits at scale on a random model of ``shape``: for each number of requests in ``sizes`` (ascending), one
    :func:`~memit_adapter.engine.compute_edits` with ``MemitConfig.for_model`` (the published presets for
    GPT-2 XL and LLaMA-7B shapes; z chunks sized from free memory), and its seconds per phase (statistics once,
    from ``n_texts`` random texts of ``text_length`` words; z; update: keys and solve), peak memory and
    unconverged requests. A size whose time, extrapolated linearly from the previous one, would end past
    ``max_minutes`` from the start is skipped (and said so), so that the run fits a device lease.
    """
    from .engine import compute_edits
    from .stats import collect_stats

    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = scale_model(shape, dtype=getattr(torch, dtype), device=device)
    vocab = SCALE_SHAPES[shape][1]["vocab_size"]
    cfg = MemitConfig.for_model(model, v_batch_size=None)
    rng = random.Random(0)
    texts = [_words(rng, text_length, vocab) for _ in range(n_texts)]
    requests = _random_requests(rng, max(sizes), vocab)
    out: dict[str, Any] = {"shape": shape, "device": _device_name(device), "dtype": dtype, "layers": cfg.layers,
                           "z_steps": cfg.v_num_grad_steps, "lambda": cfg.mom2_update_weight, "n_texts": n_texts,
                           "text_length": text_length, "build_s": round(time.perf_counter() - start, 1), "runs": []}
    stats, out["statistics_s"] = _timed(lambda: collect_stats(model, tok, texts, cfg.layers, max_length=text_length,
                                                              batch_size=32, progress=progress))
    last: tuple[int, float] | None = None
    for n in sorted(sizes):
        left = max_minutes * 60 - (time.perf_counter() - start)
        if last is not None and last[1] * n / last[0] > left:
            out["runs"].append({"n_requests": n, "skipped": f"about {last[1] * n / last[0]:.0f} s expected, "
                                                            f"{max(left, 0):.0f} s left of --max-minutes"})
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        pack, secs = _timed(lambda n=n: compute_edits(model, tok, requests[:n], cfg, stats=stats, progress=progress))
        out["runs"].append({"n_requests": n, "total_s": round(secs, 2),
                            "seconds": {k: round(v, 2) for k, v in pack.report["seconds"].items()},
                            "unconverged": len(pack.report["unconverged"]), "peak_mb": round(_peak_mb())})
        last = (n, secs)
        del pack
    return out


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return str(device)


def format_scale(r: dict[str, Any]) -> str:
    lines = [f"memit-adapter bench --scale: random {r['shape']} ({r['dtype']}) on {r['device']}, "
             f"layers {r['layers']}, {r['z_steps']} z steps, λ {r['lambda']:g}; built in {r['build_s']:.0f} s; "
             f"statistics ({r['n_texts']} texts x {r['text_length']} words) {r['statistics_s']:.1f} s",
             "| requests | total s | z | update | unconverged | peak MB |", "|---|---|---|---|---|---|"]
    for run in r["runs"]:
        if "skipped" in run:
            lines.append(f"| {run['n_requests']} | skipped: {run['skipped']} | | | | |")
        else:
            lines.append(f"| {run['n_requests']} | {run['total_s']:.1f} | {run['seconds']['targets']:.1f} | "
                         f"{run['seconds']['update']:.1f} | {run['unconverged']} | {run['peak_mb']:.0f} |")
    return "\n".join(lines)


def reference_targets(model, spec, tokenizer, requests, templates, config: MemitConfig, layer: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The target vectors the published implementation's way: one request at a time, a full forward of every
    row at every step, δ added by a hook on block ``layer``'s output at each row's subject position.

    The same objective as :func:`~memit_adapter.targets.optimise_deltas` with ``preserve_factor=0`` and one δ
    per request (NLL of the target after each context template, KL of ``"{subject} is a"`` at the subject,
    weight decay ``|δ| / |h|²``, ``|δ| <= clamp·|h|``, stop below ``v_loss_threshold``; the rate of
    :func:`~memit_adapter.targets.lr_factor` at each step), written independently of it but for that schedule: the
    baseline (a) of the benchmark, and an oracle for the engine's faster path. Returns ``(z, h)``.
    """
    pairs = [_reference_one(model, spec.blocks(model)[layer], tokenizer, req, templates, config) for req in requests]
    return torch.stack([z for z, _ in pairs]), torch.stack([h for _, h in pairs])


def _reference_one(model, block, tokenizer, req, templates, config: MemitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    rewrite = [encode_fact(tokenizer, t.replace("{}", req.prompt), req.subject, req.target_new, req.subject_token)
               for t in templates]
    kl = encode_fact(tokenizer, KL_PROMPT, req.subject, subject_token=req.subject_token)
    ids, mask = pad_right([f.ids[:-1] for f in rewrite] + [kl.ids], pad_id(tokenizer), device)
    lookups = torch.tensor([f.lookup for f in rewrite] + [kl.lookup], device=device)
    rows = torch.arange(len(lookups), device=device)
    state: dict[str, torch.Tensor] = {}

    def add_delta(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        state.setdefault("h", hidden[0, lookups[0]].detach().float().clone())  # the bare prompt's h
        if "delta" in state:
            hidden = hidden.clone()
            hidden[rows, lookups] = hidden[rows, lookups] + state["delta"].to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(add_delta)
    try:
        with torch.no_grad():
            before = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[-1, kl.lookup].float(), -1)
        h = state["h"]
        unit = h.norm() / h.numel() ** 0.5 if config.v_lr_relative else torch.tensor(1.0, device=device)
        param = torch.zeros_like(h, requires_grad=True)
        opt = torch.optim.Adam([param], lr=config.v_lr)
        targets = [torch.tensor(f.target_ids, device=device)[:, None] for f in rewrite]
        for step in range(config.v_num_grad_steps):
            state["delta"] = delta = param * unit
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = sum(-torch.log_softmax(logits[r, f.target_positions], -1).gather(1, targets[r]).mean()
                      for r, f in enumerate(rewrite)) / len(rewrite)
            now = torch.log_softmax(logits[-1, kl.lookup], -1)
            kl_term = config.kl_factor * torch.nn.functional.kl_div(before, now, log_target=True, reduction="sum")
            loss = nll + kl_term + config.v_weight_decay * delta.norm() / h.norm() ** 2
            if loss.item() < config.v_loss_threshold or step == config.v_num_grad_steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.param_groups[0]["lr"] = config.v_lr * lr_factor(step, config.v_num_grad_steps, config.v_lr_decay_to)
            opt.step()
            with torch.no_grad():
                max_norm = config.clamp_norm_factor * h.norm()
                if (param * unit).norm() > max_norm:
                    param.mul_(max_norm / (param * unit).norm())
    finally:
        handle.remove()
    return h + (param * unit).detach(), h


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))


def _random_requests(rng: random.Random, n: int, vocab: int) -> list[EditRequest]:
    """``n`` requests of random words: a 2-word subject inside a 6-word prompt, a 1-word target."""
    return [EditRequest(_words(rng, 2, vocab) + " {} " + _words(rng, 3, vocab), _words(rng, 2, vocab),
                        " " + _words(rng, 1, vocab)) for _ in range(n)]


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
    requests = _random_requests(rng, n_requests, vocab)
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


def run_comparison(model_name: str = "world-gpt2-bpe", *, n_requests: int = 100, size: str = "small",
                   frontier: Sequence[int | str] = (), seeds: Sequence[int] = (0,), progress: bool = True
                   ) -> dict[str, Any]:
    """(a) the published way, (b) the published settings with this engine, (c) ``for_model``, on the same requests.

    ``model_name`` is a shipped world (its records, corpus and metrics) or ``"random"`` (a random GPT-2 of
    ``size`` and random requests; no metrics). Per run: seconds per phase (statistics, z, update: keys and
    solve), token positions per z step, peak memory, and on a world ES / PS / NS / Score and retention.
    (a) computes the statistics with one full forward per layer and z one request at a time with full forwards
    (:func:`reference_targets`); its update phase is the engine's (the same computation).

    ``frontier``: points at which (b) and (c) also run, each a step count (``20``: ``"b@20"``, ``"c@20"``, their
    settings with ``v_num_grad_steps`` changed) or ``"STEPSxF"`` (``"10x3"``: ``"b@10x3"``, ``"c@10x3"``, also
    with each method's own ``v_lr`` times F: fewer steps cover the same distance only with larger ones), so that
    the two methods are compared at equal time or equal Score, not only at their defaults (:func:`frontier_point`);
    on a world, ``report["c_at_b_score"]`` names the fastest (c) run whose Score is at least the default (b)'s
    (see :func:`~memit_adapter.plots.plot_frontier`).

    ``seeds``: each (b) and (c) run is repeated once per seed ``s``, on the requests ``random.Random(s)`` samples
    and with the config's ``seed`` set to ``s`` (which samples the context templates). With several seeds a run
    reports the mean of each figure, the sample standard deviation of its metrics (``run["sd"]``) and every
    seed's own run (``run["per_seed"]``): on 100 edits of a small world, one seed's PS moves by several points
    with the templates and requests alone. (a) is timed on the first seed's requests.
    """
    from .stats import collect_stats

    points = frontier_points(frontier)  # bad points fail before anything is loaded
    seeds = comparison_seeds(seeds)

    if model_name == "random":
        model, tok = bench_model(size)
        rng = random.Random(0)
        vocab = SIZES[size]["vocab_size"]
        first = _random_requests(rng, n_requests, vocab)  # then the texts, from the same generator
        texts, everything = [_words(rng, 128, vocab) for _ in range(64)], None
        samples = {s: (first if s == 0 else _random_requests(random.Random(s), n_requests, vocab), None)
                   for s in seeds}
    else:
        from .demo.checkpoints import load_world_model, world_model_path

        model, tok, everything = load_world_model(model_name)
        texts = str(world_model_path(model_name) / "corpus.txt")
        samples = {}
        for s in seeds:
            records = random.Random(s).sample(everything, min(n_requests, len(everything)))
            samples[s] = ([EditRequest.from_dict(r) for r in records], records)
    requests = samples[seeds[0]][0]
    spec = get_arch_spec(model)
    settings = {"published": MemitConfig.published_for(model), "for_model": MemitConfig.for_model(model)}
    out: dict[str, Any] = {"model": model_name, "n_requests": len(requests), "threads": torch.get_num_threads(),
                           "seeds": seeds, "runs": {}}
    base = settings["published"]
    stats, secs = _timed(lambda: collect_stats(model, tok, texts, base.layers, max_tokens=base.mom2_max_tokens,
                                               batch_size=base.stats_batch_size, progress=False))
    configs = {"b_published_engine": settings["published"], "c_for_model": settings["for_model"]}
    for family, default in (("b", settings["published"]), ("c", settings["for_model"])):
        configs.update({f"{family}@{_point_name(k, f)}": default.replace(v_num_grad_steps=k, v_lr=default.v_lr * f)
                        for k, f in points if (k, f) != (default.v_num_grad_steps, 1.0)})  # the default is that point
    for name, cfg in configs.items():
        out["runs"][name] = mean_run([_run_once(model, tok, requests_s, records, everything, cfg.replace(seed=seed),
                                                stats, secs, progress)
                                      for seed, (requests_s, records) in samples.items()])
    from .targets import context_templates

    z_templates = context_templates(model, tok, base.replace(seed=seeds[0]))  # those of (b)'s first-seed run
    out["z_step_tokens"], out["z_step_tokens_full_rows"] = tokens_per_step(tok, requests[:32], z_templates)
    # (a): statistics one full forward per edited layer, z one request at a time with full forwards
    _, stats_a = _timed(lambda: [_accumulate(model, tok, texts if isinstance(texts, list) else
                                             texts_of(texts, base), [layer], spec, None, base.stats_batch_size,
                                             torch.float32, False, False, base.mom2_max_tokens)
                                 for layer in base.layers])
    _, z_a = _timed(lambda: reference_targets(model, spec, tok, requests, z_templates, base, max(base.layers)))
    b = out["runs"]["b_published_engine"]
    out["runs"]["a_published_way"] = {"seconds": {"statistics": round(stats_a, 2), "targets": round(z_a, 2),
                                                  "update": b["seconds"]["update"]},
                                      "total_s": round(stats_a + z_a + b["seconds"]["update"], 2)}
    out["b_speedup_over_a"] = out["runs"]["a_published_way"]["total_s"] / b["total_s"]
    if everything is not None:
        out["c_at_b_score"] = _fastest_at_least(out["runs"], "c", b["score"])
    return out


def _run_once(model, tok, requests, records, everything, cfg: MemitConfig, stats, stats_s: float,
              progress: bool) -> dict[str, Any]:
    """One (b) or (c) run of :func:`run_comparison`: its seconds per phase, settings and peak memory, and with
    ``records`` (a world's) their metrics and the retention of ``everything``."""
    from .engine import compute_edits
    from .evaluation import evaluate_counterfact

    pack, total = _timed(lambda: compute_edits(model, tok, requests, cfg, stats=stats, progress=progress))
    phases = {k: round(v, 2) for k, v in pack.report["seconds"].items()}
    run = {"seconds": {**phases, "statistics": round(stats_s, 2)},
           "total_s": round(stats_s + total, 2), "layers": cfg.layers, "lambda": cfg.mom2_update_weight,
           "z_steps": cfg.v_num_grad_steps, "v_lr": cfg.v_lr, "peak_mb": round(_peak_mb())}
    if records is not None:
        with pack.applied(model):
            r = evaluate_counterfact(model, tok, records, generation=False, retention_records=everything)
        run.update({key: getattr(r, name) for key, name in _RUN_METRICS.items()})
    return run


_RUN_METRICS = {"efficacy": "efficacy_score", "paraphrase": "paraphrase_score", "neighborhood": "neighborhood_score",
                "score": "score", "retention": "retention"}  # a run's key: the CounterFactResult attribute


def comparison_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list; ValueError unless they are distinct non-negative integers, at least one."""
    out = list(seeds)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in out):
        raise ValueError(f"seeds must be non-negative integers, at least one, got {out}")
    if len(set(out)) < len(out):
        raise ValueError(f"seeds must be distinct, got {out}")
    return out


def mean_run(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One seed's run as it is; several seeds' runs as one whose times, phase seconds and metrics are their
    means, with the sample standard deviation of each metric in ``"sd"``, the largest peak memory, and the runs
    themselves in ``"per_seed"``."""
    if len(per_seed) == 1:
        return per_seed[0]
    first = per_seed[0]

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in per_seed)

    run = {**first, "total_s": round(mean("total_s"), 2), "peak_mb": max(r["peak_mb"] for r in per_seed),
           "seconds": {k: round(statistics.fmean(r["seconds"][k] for r in per_seed), 2) for k in first["seconds"]},
           "per_seed": list(per_seed)}
    metrics = [k for k in _RUN_METRICS if k in first]
    run.update({k: mean(k) for k in metrics})
    if metrics:
        run["sd"] = {k: statistics.stdev(r[k] for r in per_seed) for k in metrics}
    return run


def frontier_points(points: Sequence[int | str]) -> list[tuple[int, float]]:
    """The distinct :func:`frontier_point` of ``points``, sorted. Raises ValueError on a bad point, and on two whose
    run names would be the same (factors that differ only past 6 significant digits)."""
    out = sorted({frontier_point(p) for p in points})
    names = [_point_name(k, f) for k, f in out]
    if len(set(names)) < len(names):
        raise ValueError(f"frontier points that differ only past 6 significant digits: {list(points)}")
    return out


def frontier_point(point: int | str) -> tuple[int, float]:
    """``(steps, lr factor)`` of a frontier point: ``20`` or ``"20"`` -> ``(20, 1.0)``, ``"10x3"`` -> ``(10, 3.0)``.
    Raises ValueError unless both are positive numbers (steps an integer)."""
    text = str(point)
    steps, x, factor = text.partition("x")
    try:
        k, f = int(steps), float(factor) if x else 1.0
    except ValueError:
        raise ValueError(f"a frontier point is STEPS or STEPSxF (e.g. 20, 10x3), got {text!r}") from None
    if k < 1 or not f > 0 or math.isinf(f):
        raise ValueError(f"a frontier point's steps and lr factor must be positive, got {text!r}")
    return k, f


def _point_name(steps: int, factor: float) -> str:
    return str(steps) if factor == 1.0 else f"{steps}x{factor:g}"


def _fastest_at_least(runs: dict[str, dict[str, Any]], family: str, score: float) -> str | None:
    """The name of the fastest run of ``family`` ("b" or "c": the default and its ``@STEPS[xF]`` runs) whose Score
    is at least ``score``; None when none is."""
    names = [n for n in runs if n[0] == family and runs[n].get("score", -1.0) >= score]
    return min(names, key=lambda n: runs[n]["total_s"]) if names else None


def texts_of(path: str, cfg: MemitConfig) -> list[str]:
    from .stats import load_corpus

    return load_corpus(path, cfg.mom2_n_samples, cfg.seed)[0]


def seeds_note(report: dict[str, Any]) -> str:
    """``", mean over seeds [...]"`` for a comparison run on several seeds (with ``± sd`` where it has metrics);
    ``""`` for one."""
    seeds = report.get("seeds", [0])
    if len(seeds) < 2:
        return ""
    sd = any("sd" in run for run in report["runs"].values())
    return f", mean{' ± sd' if sd else ''} over seeds {seeds}"


def format_comparison(r: dict[str, Any]) -> str:
    over = seeds_note(r)
    lines = [f"memit-adapter bench --compare: {r['model']}, {r['n_requests']} requests, {r['threads']} threads{over}",
             "| run | total s | statistics | z | update | ES | PS | NS | Score | retention |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted((n for n in r["runs"] if n[0] in "bc"),
                   key=lambda n: (n[0], r["runs"][n]["z_steps"], r["runs"][n].get("v_lr", 0.0), "@" in n))
    for name in ("a_published_way", *order):
        run = r["runs"][name]
        sec = run["seconds"]
        m = [("-" if k not in run else f"{run[k]:.3f}±{run['sd'][k]:.3f}" if "sd" in run else f"{run[k]:.3f}")
             for k in _RUN_METRICS]
        lines.append(f"| {name} | {run['total_s']:.1f} | {sec['statistics']:.1f} | {sec['targets']:.1f} | "
                     f"{sec['update']:.1f} | " + " | ".join(m) + " |")
    lines.append(f"(b) is {r['b_speedup_over_a']:.1f}x faster than (a); a z step runs {r['z_step_tokens']} token "
                 f"positions, {r['z_step_tokens'] / r['z_step_tokens_full_rows']:.0%} of whole rows")
    if "c_at_b_score" in r:
        b = r["runs"]["b_published_engine"]
        c = r["c_at_b_score"]
        lines.append(f"no (c) run reaches (b)'s Score {b['score']:.3f}" if c is None else
                     f"(c) at (b)'s Score {b['score']:.3f} or better: {c}, {r['runs'][c]['total_s']:.1f} s against "
                     f"(b)'s {b['total_s']:.1f} s ({r['runs'][c]['total_s'] / b['total_s']:.2f}x its time)")
    return "\n".join(lines)


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
        f" subject's edit token), {r['z_step_tokens'] / r['z_step_tokens_full_rows']:.0%} of the"
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
    parser.add_argument("--texts", type=int, default=None,
                        help="corpus texts for the statistics pass (default 64; with --scale 2000)")
    parser.add_argument("--text-length", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=None, help="requests per batch in the batched run (default all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--scale", metavar="SHAPE", choices=sorted(SCALE_SHAPES),
                        help="edits at scale on a random model of this shape (gpt2-xl, llama-7b; tiny-gpt2 and "
                        "tiny-llama to try it): seconds per phase at each of --sizes requests")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="with --scale: requests per run")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="with --scale: the model's dtype")
    parser.add_argument("--max-minutes", type=float, default=8.0,
                        help="with --scale: skip a size whose extrapolated time would end past this")
    parser.add_argument("--compare", metavar="MODEL", help="compare (a) the published way, (b) the published "
                        "settings with this engine and (c) for_model on a shipped world (e.g. world-gpt2-bpe) or "
                        "'random' (a random GPT-2 of --size); --n-requests requests")
    parser.add_argument("--frontier", nargs="+", default=[], metavar="STEPS[xF]",
                        help="with --compare: also run (b) and (c) at these numbers of z steps (10x3: 10 steps at "
                        "3x each method's learning rate), to compare them at equal time or Score")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="with --compare: repeat each (b) and (c) run on the requests and context templates of "
                        "each seed, and report the mean and standard deviation (default: 0)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="with --compare on a world: Score and retention "
                        "against seconds of every (b) and (c) run, to this PNG (needs matplotlib)")


def run_cli(args: argparse.Namespace) -> int:
    if args.json and (not Path(args.json).resolve().parent.is_dir() or Path(args.json).is_dir()):
        raise SystemExit(f"memit-adapter bench: cannot write {args.json} (no such folder, or it is a folder)")
    if (args.frontier or args.plot or args.seeds is not None) and not args.compare:
        raise SystemExit("memit-adapter bench: --frontier, --seeds and --plot go with --compare")
    seeds = args.seeds or [0]
    for option, check, value in (("--frontier", frontier_points, args.frontier), ("--seeds", comparison_seeds, seeds)):
        try:
            check(value)
        except ValueError as e:
            raise SystemExit(f"memit-adapter bench: {option}: {e}") from None
    if args.plot:
        if args.compare == "random":
            raise SystemExit("memit-adapter bench: --plot needs a world (a random model has no Scores)")
        if not Path(args.plot).resolve().parent.is_dir() or Path(args.plot).is_dir():
            raise SystemExit(f"memit-adapter bench: cannot write {args.plot} (no such folder, or it is a folder)")
        from .plots import require_matplotlib

        require_matplotlib("bench")
    if args.scale:
        if any(n < 1 for n in args.sizes):
            raise SystemExit(f"memit-adapter bench: --sizes must be positive, got {args.sizes}")
        report = run_scale(args.scale, args.sizes, dtype=args.dtype, device=args.device, n_texts=args.texts or 2000,
                           text_length=args.text_length, max_minutes=args.max_minutes, progress=not args.quiet)
        text = format_scale(report)
    elif args.compare:
        report = run_comparison(args.compare, n_requests=args.n_requests, size=args.size,
                                frontier=args.frontier, seeds=seeds, progress=not args.quiet)
        text = format_comparison(report)
        if args.plot:
            from .plots import plot_frontier

            plot_frontier(report, args.plot)
    else:
        report = run_benchmark(size=args.size, n_requests=args.n_requests, z_steps=args.z_steps,
                               n_texts=args.texts or 64, text_length=args.text_length, chunk=args.chunk,
                               device=args.device, progress=not args.quiet)
        text = format_report(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
