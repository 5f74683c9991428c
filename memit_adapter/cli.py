"""The ``memit-adapter`` console script. Each subcommand lives in its own module, imported on use.

A subcommand module defines ``add_arguments(parser)`` and ``run_cli(args) -> int`` (or the functions named in
its ``COMMANDS`` entry). An error the user can act on
(a :class:`~memit_adapter.errors.MemitError`, a file or network error, a bad value) is one line on stderr and exit
status 1; ``--verbose`` shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import MemitError

COMMANDS = {
    "edit": ("memit_adapter.edit", "compute an edit pack from a requests file, save it (and push it)"),
    "stats": ("memit_adapter.stats_cli", "compute a model's key second moments into a cache folder (and the Hub)"),
    "inspect": ("memit_adapter.pack_cli", "what a pack holds: edits, modules, ranks, sizes, fingerprint, metrics"),
    "merge": ("memit_adapter.pack_cli", "save a model with packs merged into its weights",
              "add_merge_arguments", "run_merge_cli"),
    "push": ("memit_adapter.pack_cli", "upload a pack folder to the Hub (one commit)", "add_push_arguments",
             "run_push_cli"),
    "pull": ("memit_adapter.pack_cli", "download a pack from the Hub into a folder", "add_pull_arguments",
             "run_pull_cli"),
    "compress": ("memit_adapter.pack_cli", "cut every delta of a pack to a rank by SVD", "add_compress_arguments",
                 "run_compress_cli"),
    "export": ("memit_adapter.export", "a pack as a LoRA adapter vLLM serves: one rank <= 512, lora_alpha = r"),
    "demo": ("memit_adapter.demo.run", "edit 100 facts of the shipped world model, end to end (offline)"),
    "eval": ("memit_adapter.evaluation", "CounterFact metrics of a model, optionally with an edit pack"),
    "trace": ("memit_adapter.tracing", "causal tracing of facts; suggests the layers to edit"),
    "bench": ("memit_adapter.bench", "batched vs serial z, one-pass vs per-layer statistics, peak memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memit-adapter", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"memit-adapter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text, *functions) in COMMANDS.items():
        add, run = functions or ("add_arguments", "run_cli")
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            getattr(importlib.import_module(module_name), add)(p)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(_missing=module_name)
        p.set_defaults(_module=module_name, _run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "_missing", None):
        print(f"memit-adapter {args.command}: not available in this build ({args._missing} missing)", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(getattr(module, args._run)(args) or 0)
    except (MemitError, OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"memit-adapter {args.command}: error: {e} ({type(e).__name__}; -v shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
