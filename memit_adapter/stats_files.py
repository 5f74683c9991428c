"""Second moments to and from other places: the published MEMIT ``.npz`` layout and the Hub.

Usage::

    # statistics the published implementation computed (data/stats/<model>/wikipedia_stats/*.npz) into a cache
    import_published_stats(model, ["transformer.h.3.mlp.fc_out_float32_mom2_100000.npz", ...], "mom2-cache")
    push_stats("mom2-cache", "me/gpt-j-mom2")            # a Hub dataset repo with a card naming what each entry is
    pull_stats("me/gpt-j-mom2", "mom2-cache")            # and back, into any cache folder

``compute_edits(..., cache_dir="mom2-cache")`` without a corpus then uses them (the newest entry of the model, layer
and dtype). Network access happens only in :func:`push_stats` and :func:`pull_stats`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .arch import ArchSpec, check_model
from .errors import StatisticsError
from .stats import SecondMoment, StatsCache, model_id, read_entry_keys

_NPZ_NAME = re.compile(r"^(?P<module>.+)_(?P<precision>float16|float32|float64|bfloat16)_(?P<stats>[a-z0-9-]+?)"
                       r"(?:_t(?P<batch_tokens>\d+))?(?:_(?P<size>\d+))?\.npz$")
CARD_FILE = "README.md"


def import_published_stats(model: nn.Module, files: Iterable[str | os.PathLike], cache: StatsCache | str | os.PathLike,
                           *, arch: ArchSpec | None = None) -> dict[int, Path]:
    """Write the published implementation's second moments into ``cache`` as entries of ``model``.

    ``files`` are ``.npz`` files (or folders of them) in the published layout: named
    ``<module>_<precision>_mom2[_<samples>].npz`` (``transformer.h.3.mlp.fc_out_float32_mom2_100000.npz``) and
    holding the running sum ``mom2.mom2`` and its ``mom2.count``. The module name says the layer; the sum is
    divided by the count into float32. Returns ``{layer: cache file}``. Raises :class:`StatisticsError` naming
    the file when one is not in that layout, names no edited-module of ``model``, or does not fit its shape;
    nothing is written then.
    """
    import numpy as np

    spec = check_model(model, None, arch)
    cache = StatsCache(cache) if not isinstance(cache, StatsCache) else cache
    by_name = {spec.mlp_out_name(layer): layer for layer in range(spec.num_layers(model))}
    paths = []
    for f in files:
        f = Path(f)
        paths += sorted(f.glob("*.npz")) if f.is_dir() else [f]
    if not paths:
        raise StatisticsError("no .npz statistics files given (or none in the folders given)")
    entries = []
    for path in paths:
        m = _NPZ_NAME.match(path.name)
        if m is None or "mom2" not in m["stats"].split("-"):
            raise StatisticsError(f"{path}: not a published MEMIT statistics file (<module>_<precision>_mom2"
                                  "[_<samples>].npz)")
        layer = _layer_of(m["module"], by_name)
        if layer is None:
            raise StatisticsError(f"{path}: module {m['module']!r} is none of this model's edited modules "
                                  f"({spec.mlp_out_name(0)}, ...)")
        try:
            with np.load(path) as data:  # numeric arrays only: the pickled 'constructor' entries are not read
                total, count = torch.from_numpy(np.array(data["mom2.mom2"])), int(data["mom2.count"])
        except (OSError, ValueError, KeyError) as e:
            raise StatisticsError(f"{path}: unreadable as published statistics ({type(e).__name__}: {e})") from e
        d_in = spec.weight_shape(model, layer)[1]
        if tuple(total.shape) != (d_in, d_in) or count <= 0:
            raise StatisticsError(f"{path}: a ({d_in}, {d_in}) second moment over a positive count is expected for "
                                  f"layer {layer}, found {tuple(total.shape)} over {count}")
        stat = SecondMoment(mom2=(total.double() / count).float(), count=count)
        stat.check_finite(layer)
        key = {"model": model_id(model), "layer": layer, "corpus": f"published-npz:{path.parent.name}/{path.name}",
               "n_samples": int(m["size"]) if m["size"] else None, "dtype": "float32", "max_length": None,
               "max_tokens": None}
        entries.append((layer, key, stat))
    return {layer: cache.save(key, stat) for layer, key, stat in entries}


def _layer_of(module: str, by_name: dict[str, int]) -> int | None:
    """The layer whose edited module is ``module``, allowing for a wrapper prefix on either side."""
    for name, layer in by_name.items():
        if name == module or name.endswith("." + module) or module.endswith("." + name):
            return layer
    return None


def stats_card(directory: str | os.PathLike) -> str:
    """A README for a cache folder shared on the Hub: each entry's model, layer, corpus, sample and token budget
    and key-vector count, and how to use it."""
    directory = Path(directory)
    rows = []
    for path in sorted(directory.glob("mom2_layer*.safetensors")):
        key, count = read_entry_keys(path)
        rows.append(f"| `{path.name}` | `{key.get('model')}` | {key.get('layer')} | {key.get('corpus')} | "
                    f"{key.get('n_samples')} | {key.get('max_tokens')} | {count} | {key.get('dtype')} |")
    if not rows:
        raise StatisticsError(f"{directory} holds no statistics entries (mom2_layer*.safetensors)")
    from . import __version__

    return "\n".join([
        "---", "tags:", "- memit", "- knowledge-editing", "---", "",
        "# MEMIT key second moments", "",
        "Uncentered second moments `C = E[k kᵀ]` of the inputs of a model's edited MLP output projections, as",
        f"`memit_adapter` {__version__} computes and caches them (`memit-adapter stats`). Each file is one layer; its",
        "safetensors metadata holds the full key (model weights or `name@revision`, layer, corpus, samples, dtype)",
        "and the number of key vectors it averages over.", "",
        "| file | model | layer | corpus | texts | token budget | key vectors | dtype |",
        "|---|---|---|---|---|---|---|---|",
        *rows, "",
        "## Use", "",
        "```bash",
        "memit-adapter stats --pull THIS_REPO --cache mom2-cache",
        "memit-adapter edit --model MODEL --requests edits.jsonl --stats-cache mom2-cache --out pack",
        "```", "",
        "An entry is used only for the model whose weights (or Hub name and revision) it was computed on.", "",
    ])


def push_stats(directory: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
               endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Upload a cache folder's entries and a card (:func:`stats_card`) to the Hub dataset repo ``repo_id`` as one
    commit; returns the commit's URL. Partial checkpoints and temporary files stay behind."""
    from huggingface_hub import CommitOperationAdd, HfApi

    directory = Path(directory)
    card = stats_card(directory)
    api = HfApi(token=token, endpoint=endpoint)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    ops = [CommitOperationAdd(path.name, str(path)) for path in sorted(directory.glob("mom2_layer*.safetensors"))]
    ops.append(CommitOperationAdd(CARD_FILE, card.replace("THIS_REPO", repo_id).encode()))
    info = api.create_commit(repo_id, ops, repo_type="dataset",
                             commit_message=commit_message or f"MEMIT key second moments ({len(ops) - 1} entries)")
    return info.commit_url


def pull_stats(repo_id: str, directory: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
               endpoint: str | None = None) -> list[Path]:
    """Download the entries of a statistics dataset repo (written by :func:`push_stats`) into the cache folder
    ``directory``; returns their paths. Each entry is checked readable before it is kept."""
    from huggingface_hub import snapshot_download

    directory = Path(directory)
    snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token, endpoint=endpoint,
                      local_dir=str(directory), allow_patterns=["mom2_layer*.safetensors"])
    paths = sorted(directory.glob("mom2_layer*.safetensors"))
    for path in paths:
        read_entry_keys(path)
    if not paths:
        raise StatisticsError(f"the dataset repo {repo_id} holds no statistics entries (mom2_layer*.safetensors)")
    return paths
