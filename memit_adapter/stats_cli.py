"""``memit-adapter stats``: compute the key second moments of a model once, into a cache folder (and the Hub).

Usage::

    memit-adapter stats --model EleutherAI/gpt-j-6b --corpus wikitext wikitext-103-raw-v1 train --streaming \\
        --max-tokens 200000 --cache mom2-cache --device cuda [--push me/gptj-mom2]
    memit-adapter stats --model ./my-model --corpus texts.jsonl --cache mom2-cache --layers 3-8

``--corpus`` is a local ``.txt`` / ``.jsonl`` file or a ``datasets`` name with an optional config and split
(downloaded by ``datasets``: the only command that downloads a corpus, and only when asked to). The layers
default to ``MemitConfig.for_model``'s, the token budget to its ``mom2_max_tokens`` (None: every text up to
``--n-samples``). Later ``memit-adapter edit --stats-cache DIR`` or ``compute_edits(cache_dir=DIR)`` read the
entries; ``--push`` uploads the folder to a Hub dataset repo (one commit) so that others can download it.
Memory: ``d_ff² x 4`` bytes a layer in float32 (GPT-J: 1 GiB a layer, 6 GiB for its six edited layers).
Started by ``torchrun``, the ranks share the corpus and all-reduce the sums (:mod:`memit_adapter.distributed`);
rank 0 alone writes the cache, prints and pushes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .config import MemitConfig
from .distributed import is_main, process_group, rank_device
from .edit import parse_layers
from .errors import StatisticsError
from .models import load_model
from .stats import StatsCache, collect_stats


def open_corpus(spec: list[str], *, streaming: bool = False, text_column: str = "text") -> Any:
    """A local file path, or ``datasets.load_dataset(name, config, split=split, streaming=...)`` with the text in
    column ``text`` (renamed from ``text_column``)."""
    if len(spec) == 1 and Path(spec[0]).is_file():
        if text_column != "text":
            raise StatisticsError("--text-column applies to datasets; a .jsonl file's field must be 'text'")
        return spec[0]
    if len(spec) > 3:
        raise StatisticsError(f"--corpus takes a file, or a dataset name with optional config and split; got {spec}")
    try:
        import datasets
    except ImportError:
        raise StatisticsError('a datasets corpus needs the datasets package: pip install "memit-adapter[data]"'
                              ) from None
    name, config, split = (spec + [None, None])[:3]
    ds = datasets.load_dataset(name, config, split=split or "train", streaming=streaming)
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id or local folder")
    parser.add_argument("--corpus", required=True, nargs="+", metavar="FILE | NAME [CONFIG] [SPLIT]",
                        help="a .txt/.jsonl file, or a datasets name with optional config and split (default train)")
    parser.add_argument("--cache", required=True, type=Path, help="cache folder (entries already there are kept)")
    parser.add_argument("--layers", help="e.g. 3-8 (default: for_model's)")
    parser.add_argument("--max-tokens", type=int, help="stop after this many key vectors (default: for_model's)")
    parser.add_argument("--n-samples", type=int, default=100_000, help="texts drawn from the corpus at most")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it all")
    parser.add_argument("--text-column", default="text", help="the dataset column holding the text")
    parser.add_argument("--device", help="e.g. cuda (default: cpu)")
    parser.add_argument("--push", metavar="REPO", help="upload the cache folder to this Hub dataset repo")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers) if args.layers else None
    if args.cache.exists() and not args.cache.is_dir():
        raise SystemExit(f"memit-adapter stats: --cache {args.cache} is a file, not a folder")
    corpus = open_corpus(args.corpus, streaming=args.streaming, text_column=args.text_column)
    with process_group(args.device):
        model, tokenizer, _ = load_model(args.model)
        model.to(rank_device(args.device))
        cfg = MemitConfig.for_model(model, **({"layers": layers} if layers else {}))
        max_tokens = args.max_tokens if args.max_tokens is not None else cfg.mom2_max_tokens
        t0 = time.perf_counter()
        stats = collect_stats(model, tokenizer, corpus, cfg.layers, n_samples=args.n_samples,
                              max_length=cfg.mom2_max_length, max_tokens=max_tokens, batch_size=cfg.stats_batch_size,
                              dtype=cfg.mom2_dtype, cache=StatsCache(args.cache), progress=not args.quiet,
                              seed=cfg.seed)
        main = is_main()  # asked inside the group: outside it every process is its own rank 0
    if not main:  # every rank holds the same statistics: rank 0 prints and pushes
        return 0
    size = sum(s.mom2.numel() * s.mom2.element_size() for s in stats.values())
    print(f"second moments of layers {cfg.layers} from {next(iter(stats.values())).count} key vectors in "
          f"{time.perf_counter() - t0:.1f} s, {size / 2**20:.1f} MiB, cached in {args.cache}/")
    if args.push:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=args.push, repo_type="dataset", folder_path=str(args.cache),
                          commit_message=f"MEMIT key second moments of {args.model}, layers {cfg.layers}")
        print(f"pushed to the dataset repo {args.push}")
    return 0
