"""Edits over time: a chain of packs, each computed on top of the ones before, evaluated after every pack.

Usage::

    steps = evaluate_chain(model, tok, records, n_packs=10, per_pack=100, corpus=texts)
    print(format_chain(steps))
    plot_chain(steps, "chain.png")        # Score, NS and retention against the number of edits so far

``memit-adapter eval --chain 10 --n 100`` runs the same from the command line. Three regimes edit the same seeded
sample, cut into ``n_packs`` batches of ``per_pack`` records: ``"sequential"`` computes pack i on top of packs
1..i-1 (``compute_edits(on_top_of=...)``: their edits active and their keys kept in the solve), ``"joint"``
re-solves packs 1..i together on the base model and keeps the difference (``compute_edits(on_top_of=...,
joint=True)``: the chain equals one batch of all its edits), ``"independent"`` computes every pack on the base
model and joins them as :meth:`EditPack.stack` would. After each pack, with all
packs so far applied, the metrics cover every record edited so far (ES, PS, NS, Score, generation entropy of the
first ``generation_records``) and retention covers the facts of ``retention_records`` that none of them edits.
The statistics are collected once and shared.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .config import MemitConfig
from .engine import compute_edits
from .errors import ConfigError
from .evaluation import RESULT_HEADER, CounterFactResult, evaluate_counterfact, result_cells
from .requests import EditRequest
from .stats import SecondMoment, collect_stats_for

REGIMES = ("sequential", "joint", "independent")


@dataclass
class ChainStep:
    """The chain after its ``pack``-th pack (0: the unedited model): metrics over the ``n_edits`` records edited
    so far, and the seconds the packs since the previous step took to compute (that pack's, when every pack is
    evaluated)."""

    regime: str
    pack: int
    n_edits: int
    seconds: float
    result: CounterFactResult


def evaluate_chain(model: nn.Module, tokenizer, records: Sequence[Mapping[str, Any]], n_packs: int, per_pack: int,
                   *, config: MemitConfig | None = None, regimes: Sequence[str] = REGIMES, corpus: Any = None,
                   cache_dir: str | None = None, stats: Mapping[int, SecondMoment] | None = None, seed: int = 0,
                   retention_records: Sequence[Mapping[str, Any]] | None = None, generation_records: int = 20,
                   every: int = 1, progress: bool = True) -> list[ChainStep]:
    """The steps of each regime of ``regimes``, after the unedited model's (regime ``"none"``, pack 0): one after
    every ``every``-th pack and after the last. Raises :class:`ConfigError` on an unknown regime, more records asked
    for than there are, or ``every < 1``."""
    bad = [r for r in regimes if r not in REGIMES]
    if bad or not regimes:
        raise ConfigError(f"regimes must be among {REGIMES}, got {list(regimes)}")
    if n_packs < 1 or per_pack < 1 or n_packs * per_pack > len(records):
        raise ConfigError(f"{n_packs} packs of {per_pack} need {n_packs * per_pack} records; there are {len(records)}")
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"every must be an int >= 1 (evaluate after every k-th pack), got {every!r}")
    config = config or MemitConfig.for_model(model)
    if stats is None:
        stats = collect_stats_for(model, tokenizer, corpus, config.layers, config, cache_dir=cache_dir,
                                  progress=progress)
    sample = random.Random(seed).sample(list(records), n_packs * per_pack)
    evaluate = dict(generation=generation_records > 0, max_generation_records=generation_records or None,
                    retention_records=retention_records)
    steps = [ChainStep("none", 0, 0, 0.0, evaluate_counterfact(model, tokenizer, sample, **evaluate))]
    for regime in regimes:
        packs, seconds = [], 0.0
        bar = tqdm(range(n_packs), desc=f"{regime} packs", disable=not progress)
        for i in bar:
            batch = sample[i * per_pack:(i + 1) * per_pack]
            t0 = time.perf_counter()
            pack = compute_edits(model, tokenizer, [EditRequest.from_dict(r) for r in batch], config, stats=stats,
                                 on_top_of=packs if regime != "independent" else (), joint=regime == "joint",
                                 progress=False)
            seconds += time.perf_counter() - t0
            packs.append(pack)
            if (i + 1) % every and i + 1 < n_packs:
                continue
            done = sample[:(i + 1) * per_pack]
            with ExitStack() as active:
                for p in packs:  # in order: a pack after the ones it was computed on
                    active.enter_context(p.applied(model))
                result = evaluate_counterfact(model, tokenizer, done, **evaluate)
            steps.append(ChainStep(regime, i + 1, len(done), seconds, result))
            seconds = 0.0
            bar.set_postfix(score=f"{100 * (result.score or 0):.1f}",
                            kept="-" if result.retention is None else f"{100 * result.retention:.1f}")
    return steps


def format_chain(steps: Sequence[ChainStep]) -> str:
    """One line per step: regime, pack, edits so far, ES, PS, NS, Score, retention (%), entropy, seconds."""
    lines = [f"{'regime':<12}{'pack':>5}{'edits':>7}{RESULT_HEADER}{'s':>8}"]
    lines += [f"{s.regime:<12}{s.pack:>5}{s.n_edits:>7}{result_cells(s.result)}{s.seconds:>8.1f}" for s in steps]
    return "\n".join(lines)


def plot_chain(steps: Sequence[ChainStep], path: str | Path | None = None):
    """Score, NS and retention of each regime against the number of edits so far (the unedited model dashed);
    returns the matplotlib ``Figure`` and writes ``path`` when given."""
    from .plots import _figure

    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3)
    base = next((s for s in steps if s.regime == "none"), None)
    for ax, metric, title in ((axes[0], "score", "Score of all edits so far"),
                              (axes[1], "neighborhood_score", "Neighbourhood score"),
                              (axes[2], "retention", "Unedited facts kept (retention)")):
        for regime in dict.fromkeys(s.regime for s in steps if s.regime != "none"):
            points = [(s.n_edits, getattr(s.result, metric)) for s in steps if s.regime == regime]
            points = [(n, 100 * v) for n, v in points if v is not None]
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=regime)
        if base is not None and getattr(base.result, metric) is not None:
            ax.axhline(100 * getattr(base.result, metric), color="gray", linestyle="--", label="unedited")
        ax.set_xlabel("edits so far")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if path is not None:
        fig.savefig(path)
    return fig
