"""``memit-adapter stats``: compute the key second moments of a model once, into a cache folder (and the Hub).

Usage::

    memit-adapter stats --model EleutherAI/gpt-j-6b --corpus wikitext wikitext-103-raw-v1 train --streaming \\
        --max-tokens 200000 --cache mom2-cache --device cuda [--push me/gptj-mom2]
    memit-adapter stats --model ./my-model --corpus texts.jsonl --cache mom2-cache --layers 3-8
    memit-adapter stats --model EleutherAI/gpt-j-6b --import-npz data/stats/gpt-j-6b/wikipedia_stats --cache mom2-cache
    memit-adapter stats --pull me/gptj-mom2 --cache mom2-cache

``--corpus`` is a local ``.txt`` / ``.jsonl`` file or a ``datasets`` name with an optional config and split
(downloaded by ``datasets``: the only command that downloads a corpus, and only when asked to). The layers
default to ``MemitConfig.for_model``'s, the token budget to its ``mom2_max_tokens`` (None: every text up to
``--n-samples``). Later ``memit-adapter edit --stats-cache DIR`` or ``compute_edits(cache_dir=DIR)`` read the
entries; ``--push`` uploads the entries with a card naming each one's model, layer, corpus and count to a Hub
dataset repo (one commit), and ``--pull`` downloads them into a cache folder (:mod:`memit_adapter.stats_files`).
``--import-npz`` takes statistics the published MEMIT implementation computed (``.npz`` files or their folder).
An interrupted pass continues from its last checkpoint (written every ``--checkpoint-every`` seconds into the cache
folder) when the same command is run again.
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
from .stats_files import import_published_stats, pull_stats, push_stats


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
    parser.add_argument("--model", help="Hub id or local folder (needed unless --pull)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", nargs="+", metavar="FILE | NAME [CONFIG] [SPLIT]",
                        help="a .txt/.jsonl file, or a datasets name with optional config and split (default train)")
    source.add_argument("--import-npz", nargs="+", type=Path, metavar="FILE_OR_DIR",
                        help="the published implementation's .npz statistics of --model, instead of a pass")
    source.add_argument("--pull", metavar="REPO", help="download the entries of this Hub dataset repo instead")
    parser.add_argument("--cache", required=True, type=Path, help="cache folder (entries already there are kept)")
    parser.add_argument("--layers", help="e.g. 3-8 (default: for_model's)")
    parser.add_argument("--max-tokens", type=int, help="stop after this many key vectors (default: for_model's)")
    parser.add_argument("--n-samples", type=int, default=100_000, help="texts drawn from the corpus at most")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it all")
    parser.add_argument("--text-column", default="text", help="the dataset column holding the text")
    parser.add_argument("--device", help="e.g. cuda (default: cpu)")
    parser.add_argument("--push", metavar="REPO", help="upload the cache folder to this Hub dataset repo")
    parser.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                        help="write the partial sums this often, so that an interrupted run continues (default 300)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace) -> int:
    layers = parse_layers(args.layers) if args.layers else None
    if args.cache.exists() and not args.cache.is_dir():
        raise SystemExit(f"memit-adapter stats: --cache {args.cache} is a file, not a folder")
    if args.pull:
        paths = pull_stats(args.pull, args.cache)
        print(f"pulled {len(paths)} statistics entries of {args.pull} into {args.cache}/")
        return 0
    if not args.model:
        raise SystemExit("memit-adapter stats: --model is needed with --corpus or --import-npz")
    if args.import_npz:
        model, _, _ = load_model(args.model)
        written = import_published_stats(model, args.import_npz, args.cache)
        print(f"imported the published statistics of layers {sorted(written)} into {args.cache}/")
        _push(args, f"MEMIT key second moments of {args.model} (imported), layers {sorted(written)}")
        return 0
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
                              seed=cfg.seed, checkpoint_seconds=args.checkpoint_every)
        main = is_main()  # asked inside the group: outside it every process is its own rank 0
    if not main:  # every rank holds the same statistics: rank 0 prints and pushes
        return 0
    size = sum(s.mom2.numel() * s.mom2.element_size() for s in stats.values())
    print(f"second moments of layers {cfg.layers} from {next(iter(stats.values())).count} key vectors in "
          f"{time.perf_counter() - t0:.1f} s, {size / 2**20:.1f} MiB, cached in {args.cache}/")
    _push(args, f"MEMIT key second moments of {args.model}, layers {cfg.layers}")
    return 0


def _push(args: argparse.Namespace, message: str) -> None:
    if args.push:
        url = push_stats(args.cache, args.push, commit_message=message)
        print(f"pushed to the dataset repo {args.push} ({url})")
