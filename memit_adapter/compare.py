"""The editing methods side by side on the same requests: ``memit-adapter eval --methods memit rome ft``.

Usage::

    runs = compare_methods(model, tok, records, ["memit", "rome", "ft"], sizes=[10, 100], corpus=texts)
    print(format_comparison(runs))
    plot_method_scaling(runs, "scaling.png")      # Score and NS against the number of edits (the paper's Fig. 5)
    compare_methods(model, tok, records, ["memit", "memit-published"], sizes=[100, 1000], corpus=texts)

Every method edits the same seeded sample of records (the first n of one sample for each size n, so the sizes are
nested), with its own config (``config_class(method).for_model(model)`` unless given; ``"memit-published"`` is
MEMIT with :meth:`~memit_adapter.config.MemitConfig.published_for`'s settings, so that the published method and
this library's defaults meet on the same requests), and is evaluated with its pack hooked in: ES / PS / NS /
Score, generation entropy, retention of the facts of ``retention_records`` that the batch leaves alone, and the
edit time. The statistics of every layer any method edits are collected once, before the timed runs, and shared
(FT-W needs none).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import MemitConfig
from .errors import ConfigError
from .evaluation import RESULT_HEADER, CounterFactResult, evaluate_counterfact, result_cells
from .method_configs import config_class
from .methods import METHODS
from .requests import EditRequest
from .stats import collect_stats_for

# a compared name that is a method with other settings: its method, and the settings it runs with by default
VARIANTS = {"memit-published": ("memit", MemitConfig.published_for)}
COMPARED = (*METHODS, *VARIANTS)  # every name compare_methods takes


@dataclass
class MethodRun:
    """One method on one batch: its metrics with the pack applied and its edit time (statistics excluded)."""

    method: str
    n_edits: int
    seconds: float
    result: CounterFactResult


def compare_methods(model: nn.Module, tokenizer, records: Sequence[Mapping[str, Any]], methods: Sequence[str],
                    sizes: Sequence[int], *, configs: Mapping[str, Any] | None = None, corpus: Any = None,
                    cache_dir: str | None = None, seed: int = 0, retention_records: Sequence[Mapping] | None = None,
                    generation_records: int | None = 20, progress: bool = True) -> list[MethodRun]:
    """Each method of ``methods`` on the first n records of one seeded sample, for each n of ``sizes``; the
    unedited model as method ``"none"`` on the largest batch first. Raises :class:`ConfigError` on an unknown
    method or a size larger than ``records``."""
    unknown = [m for m in methods if m not in COMPARED]
    if unknown:
        raise ConfigError(f"unknown editing method(s) {unknown}; known: {sorted(COMPARED)}")
    if not sizes or max(sizes) > len(records) or min(sizes) < 1:
        raise ConfigError(f"sizes {list(sizes)} must be between 1 and the {len(records)} records")
    configs = {m: (configs or {}).get(m) or _default_config(m, model) for m in methods}
    layers = sorted({layer for m in methods if m != "ft" for layer in configs[m].layers})
    stats = None
    if layers:
        first = configs[next(m for m in methods if m != "ft")]
        stats = collect_stats_for(model, tokenizer, corpus, layers, first, cache_dir=cache_dir, progress=progress)
    sample = random.Random(seed).sample(list(records), max(sizes))
    evaluate = dict(generation=bool(generation_records), max_generation_records=generation_records,
                    retention_records=retention_records)
    runs = [MethodRun("none", max(sizes), 0.0, evaluate_counterfact(model, tokenizer, sample, **evaluate))]
    for n in sorted(sizes):
        chosen = sample[:n]
        requests = [EditRequest.from_dict(r) for r in chosen]
        for method in methods:
            t0 = time.perf_counter()
            name = VARIANTS[method][0] if method in VARIANTS else method
            pack = METHODS[name](model, tokenizer, requests, configs[method], stats=stats, progress=progress)
            seconds = time.perf_counter() - t0
            with pack.applied(model):
                result = evaluate_counterfact(model, tokenizer, chosen, **evaluate)
            runs.append(MethodRun(method, n, seconds, result))
    return runs


def _default_config(method: str, model: nn.Module) -> Any:
    """The settings a compared name runs with when none are given: its variant's, else ``for_model``."""
    if method in VARIANTS:
        return VARIANTS[method][1](model)
    return config_class(method).for_model(model)


def format_comparison(runs: Sequence[MethodRun]) -> str:
    """One line per run: ES, PS, NS, Score, retention in percent, entropy, seconds."""
    width = max([8, *(len(r.method) + 1 for r in runs)])
    lines = [f"{'method':<{width}}{'edits':>7}{RESULT_HEADER}{'s':>9}"]
    lines += [f"{r.method:<{width}}{r.n_edits:>7}{result_cells(r.result)}{r.seconds:>9.1f}" for r in runs]
    return "\n".join(lines)


def plot_method_scaling(runs: Sequence[MethodRun], path: str | Path | None = None):
    """Score and NS of each method against the number of edits (log scale), and retention where the runs have
    it, the unedited model as a dashed line; returns the matplotlib ``Figure`` and writes ``path`` when given."""
    from .plots import _figure

    panels = [("score", "Score (harmonic mean of ES, PS, NS)"),
              ("neighborhood_score", "Neighbourhood score (specificity)")]
    if any(r.result.retention is not None for r in runs):
        panels.append(("retention", "Retention (unedited facts kept)"))
    fig = _figure(4.5 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels))
    base = next((r for r in runs if r.method == "none"), None)
    for ax, (metric, title) in zip(axes, panels):
        for method in dict.fromkeys(r.method for r in runs if r.method != "none"):
            points = sorted((r.n_edits, getattr(r.result, metric)) for r in runs if r.method == method)
            points = [(n, 100 * v) for n, v in points if v is not None]
            label = {"ft": "FT-W", "memit-published": "MEMIT (published settings)"}.get(method, method.upper())
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)
        if base is not None and getattr(base.result, metric) is not None:
            ax.axhline(100 * getattr(base.result, metric), color="gray", linestyle="--", label="unedited")
        ax.set_xscale("log")
        ax.set_xlabel("number of edits")
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if path is not None:
        fig.savefig(path)
    return fig
