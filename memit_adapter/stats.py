"""Second-moment statistics ``C_l = E[k kᵀ]`` of the edited modules' inputs, for all layers in ONE pass.

Usage::

    cache = StatsCache("~/.cache/memit_adapter/stats")
    stats = collect_stats(model, tok, corpus=["some text", ...], layers=[3, 4, 5], cache=cache)
    stats[3].mom2          # (d_in, d_in) float32, the uncentered second moment
    stats[3].count         # number of non-padding tokens it averages over

A cache hit (same model weights or name+revision, layer, corpus, sample count, dtype) runs no forward pass.

Under a ``torch.distributed`` process group of W ranks (see :mod:`memit_adapter.distributed`), rank r runs the
texts r, r+W, r+2W, ... and the sums and counts are all-reduced: every rank returns the same statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import secrets
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, check_model, max_positions
from .devices import execution_device, input_device, param_values
from .distributed import all_ranks, all_reduce_sum, barrier, is_main, rank, shard, sum_over_ranks, world_size
from .errors import StatisticsError
from .fingerprint import tensor_bytes
from .hooks import StopForward
from .modes import evaluating
from .solve import CovFactor, cov_factor
from .tokens import pad_id, pad_right

logger = logging.getLogger(__name__)


@dataclass
class SecondMoment:
    """``mom2 = (1/count) Σ k kᵀ`` over ``count`` key vectors of one layer."""

    mom2: torch.Tensor  # (d_in, d_in)
    count: int
    _factor: tuple[weakref.ref, int, CovFactor] | None = field(default=None, init=False, repr=False, compare=False)

    def factor(self, device: torch.device | str | None = None) -> CovFactor:
        """The float64 Cholesky factor of ``mom2`` (:func:`~memit_adapter.solve.cov_factor`) on ``device``: computed
        there the first time, then kept in host memory (``d_in² x 8`` bytes) and reused by every pack solved with
        these statistics, until ``mom2`` is replaced or changed in place."""
        if not self.has_factor():
            self._factor = (weakref.ref(self.mom2), self.mom2._version, cov_factor(self.mom2.to(device)).to("cpu"))
        return self._factor[2].to(device)

    def has_factor(self) -> bool:
        """Whether :meth:`factor` would reuse a factor already computed."""
        return (self._factor is not None and self._factor[0]() is self.mom2
                and self._factor[1] == self.mom2._version)

    def __getstate__(self) -> dict[str, Any]:  # the factor is a cache: not pickled (nor can its weak reference be)
        return {**self.__dict__, "_factor": None}

    def plus(self, other: SecondMoment, weight: float, *, device: torch.device | str | None = None) -> SecondMoment:
        """``mom2 + weight · other.mom2`` in this one's dtype, on ``device`` (default: this one's): this second moment
        with another set of keys mixed in at ``weight`` times its own weight, whatever the two counts (``count``
        stays this one's). Neither is changed."""
        device = self.mom2.device if device is None else device
        mom2 = torch.add(self.mom2.to(device), other.mom2.to(device=device, dtype=self.mom2.dtype), alpha=weight)
        return SecondMoment(mom2=mom2, count=self.count)

    def check_finite(self, layer: int) -> None:
        if self.count <= 0 or not torch.isfinite(self.mom2).all():
            raise StatisticsError(
                f"second-moment statistics of layer {layer} are not finite (count={self.count}); "
                "recollect them (a half-precision forward pass may have overflowed; try mom2_dtype='float64' "
                "or a float32 model) or delete the cache entry"
            )


# -- corpora -----------------------------------------------------------------------------------

def load_corpus(corpus: Any, n_samples: int, seed: int = 0) -> tuple[list[str], str]:
    """Texts from a list of strings, a local ``.txt`` (one document per non-empty line) or ``.jsonl``
    (field ``text``) file, a ``datasets.Dataset`` (column ``text``) or a streaming ``IterableDataset`` (the first
    ``n_samples`` through a seeded shuffle buffer of 10,000), in a seeded random order: at most
    ``n_samples`` of them, drawn uniformly, and an id naming exactly those texts in that order.

    The order is random so that a sample (``n_samples``, or the token budget of :func:`collect_stats`, which
    reads the texts in this order) is a sample of the whole corpus, not of its head: a file written in order
    (all sentences of one subject, then the next) otherwise gives second moments of a few subjects only. On
    the 600-subject world ``world-gpt2-bpe`` (stats budget 20,480 tokens of its corpus, then one sentence a line
    in subject order; 100 edits at layers 0-2, λ 1,000), reading the head kept 77.9% of the unedited facts; a
    uniform sample 99.2%.
    """
    rng = random.Random(seed)
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise StatisticsError(f"corpus file {str(path)!r} does not exist")
        texts = _read_corpus_file(path)
    elif _is_dataset(corpus):
        if "text" not in corpus.column_names:
            raise StatisticsError(f"dataset has no 'text' column (columns: {corpus.column_names}); pass "
                                  "corpus=ds.rename_column(NAME, 'text')")
        order = list(range(len(corpus)))
        rng.shuffle(order)
        texts = list(corpus.select(order[:n_samples])["text"])
    elif type(corpus).__name__ == "IterableDataset":  # streaming: a shuffle buffer, then the first n_samples
        stream = corpus.shuffle(seed=seed, buffer_size=10_000)
        texts = []
        for row in stream:
            if "text" not in row:
                raise StatisticsError(f"dataset rows have no 'text' field (fields: {sorted(row)}); pass "
                                      "corpus=ds.rename_column(NAME, 'text')")
            texts.append(row["text"])
            if len(texts) >= n_samples:
                break
    elif type(corpus).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise StatisticsError(f"the corpus is a {type(corpus).__name__} of splits {sorted(corpus)}: pass one "
                              "split, e.g. corpus=ds['train']")
    elif isinstance(corpus, Sequence) and all(isinstance(t, str) for t in corpus):
        texts = list(corpus)
    else:
        raise StatisticsError(
            f"corpus must be a list of strings, a .txt/.jsonl path or a datasets.Dataset, got {type(corpus).__name__}"
        )
    texts = [t for t in texts if t.strip()]
    if isinstance(corpus, (str, os.PathLike)) or not hasattr(corpus, "column_names"):
        rng.shuffle(texts)
    texts = texts[:n_samples]
    if not texts:
        raise StatisticsError("the corpus holds no non-empty text")
    digest = hashlib.sha256()
    for t in texts:
        digest.update(hashlib.sha256(t.encode()).digest())
    return texts, digest.hexdigest()[:16]


def _read_corpus_file(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in lines if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StatisticsError(f"{path.name}: every line must be a JSON object with a 'text' field ({e})") from e
    return lines


def _is_dataset(obj: Any) -> bool:
    return type(obj).__name__ == "Dataset" and hasattr(obj, "column_names") and hasattr(obj, "select")


# -- cache -------------------------------------------------------------------------------------

class StatsCache:
    """Second moments on disk as safetensors, one file per (model, layer, corpus, samples, dtype) key.

    Writes are atomic (temporary file + rename), so an interrupted run leaves no partial entry. The cache
    only saves time: :func:`collect_stats` warns and still returns its result when the cache cannot be
    read or written; an entry that exists but is damaged raises :class:`StatisticsError` naming the file.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"mom2_layer{key['layer']}_{digest}.safetensors"

    def load(self, key: dict[str, Any]) -> SecondMoment | None:
        path = self.path(key)
        if not _is_file(path):
            return None
        stored, stat = _read_entry(path, with_tensor=True)
        if stored != key:
            raise StatisticsError(f"statistics cache file {path} holds another key; delete it")
        return stat

    def save(self, key: dict[str, Any], stat: SecondMoment) -> Path:
        """Write one entry; raises ``OSError`` when the directory cannot be written (``collect_stats`` warns)."""
        path = self.path(key)
        _save_atomic(path, {"mom2": stat.mom2}, {"key": json.dumps(key, sort_keys=True), "count": str(stat.count)})
        return path


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` to the safetensors file ``path`` through a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{secrets.token_hex(6)}.safetensors"
    try:
        with open(tmp, "xb"):  # 0o666 less the umask: the mode the file gets (safetensors writes 0o600)
            pass
        mode = tmp.stat().st_mode & 0o777
        save_file({k: t.contiguous().cpu() for k, t in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Checkpoint:
    """The partial sums of one pass, written to the cache folder every ``every`` seconds (between batches), so that
    an interrupted pass continues where it stopped: the texts come in the same seeded order, and the resumed sums
    are those of an uninterrupted pass, bit for bit. One file per rank (``.partial-<key>-rank<r>of<W>``); a pass
    resumes only when every rank holds a checkpoint of the same batch. Removed once the entries are written."""

    def __init__(self, directory: Path, key: dict[str, Any], every: float) -> None:
        blob = json.dumps(key, sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:24]
        self.path = directory / f".partial-{digest}-rank{rank()}of{world_size()}.safetensors"
        self.key, self.every, self.last = blob, every, time.monotonic()

    def load(self) -> tuple[int, dict[str, int], dict[int, torch.Tensor], dict[int, int]] | None:
        """``(next batch start, {"used", "total"}, sums, counts)`` of a checkpoint every rank can resume, else None."""
        found = None
        if _is_file(self.path):
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("key") == self.key:
                        state = json.loads(meta["state"])
                        sums = {int(name.split(".")[1]): f.get_tensor(name) for name in f.keys()}
                        found = (state["next"], state, sums, {int(k): v for k, v in state["counts"].items()})
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint only costs the time it would have saved
                warnings.warn(f"ignoring the unreadable statistics checkpoint {self.path} ({type(e).__name__}: {e})",
                              stacklevel=3)
        start = found[0] if found else -1
        if not all_ranks([found is not None])[0] or sum_over_ranks(start) != start * world_size():
            return None
        return found

    def due(self) -> bool:
        """Whether to write now (any rank's clock decides, so that all write the same batch)."""
        return sum_over_ranks(int(time.monotonic() - self.last >= self.every)) > 0

    def save(self, next_start: int, used: int, total: int, sums: dict[int, torch.Tensor], counts: dict[int, int]
             ) -> None:
        state = {"next": next_start, "used": used, "total": total, "counts": counts}
        try:
            _save_atomic(self.path, {f"sum.{layer}": t for layer, t in sums.items()},
                         {"key": self.key, "state": json.dumps(state)})
        except (OSError, SafetensorError) as e:
            _warn_cache(self.path.parent, e, "checkpoint into")
        self.last = time.monotonic()

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # a cache folder that cannot be written holds no checkpoint either
            pass


def _read_entry(path: Path, *, with_tensor: bool) -> tuple[dict[str, Any], SecondMoment | int]:
    """The key of a cache file and, ``with_tensor``, its statistics, else its count; :class:`StatisticsError` if
    it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mom2 = f.get_tensor("mom2") if with_tensor else None
        key, count = json.loads(meta["key"]), int(meta["count"])
    except Exception as e:  # noqa: BLE001 - safetensors, JSON and missing fields: all mean a damaged entry
        raise StatisticsError(f"statistics cache file {path} is unreadable ({type(e).__name__}: {e}); "
                              "delete it") from e
    if not isinstance(key, dict):
        raise StatisticsError(f"statistics cache file {path} is unreadable (its key is not an object); delete it")
    return key, SecondMoment(mom2=mom2, count=count) if with_tensor else count


def read_entry_keys(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The key of a cache file and the number of key vectors it averages over, without reading its tensor;
    :class:`StatisticsError` if it is damaged."""
    return _read_entry(Path(path), with_tensor=False)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError as e:  # a cache directory we may not read: a miss, the statistics are computed
        _warn_cache(path.parent, e, "read")
        return False


def _warn_cache(directory: Path, error: Exception, action: str) -> None:
    warnings.warn(f"could not {action} the statistics cache in {directory} ({type(error).__name__}: {error}); "
                  "the statistics are computed and returned but not cached there", stacklevel=4)


def _save_all(cache: StatsCache, keys: dict[int, dict[str, Any] | None], stats: dict[int, SecondMoment]) -> None:
    """Write fresh statistics to ``cache``; one that cannot be written costs a warning, never the pass."""
    for layer, stat in stats.items():
        try:
            cache.save(keys[layer], stat)
        except (OSError, SafetensorError) as e:
            _warn_cache(cache.directory, e, "write")
            return


def model_id(model: nn.Module) -> str:
    """``name@revision`` when the model's commit is known, else a fingerprint of all its weights."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or ""
    revision = getattr(cfg, "_commit_hash", None)
    if name and revision:
        return f"{name}@{revision}"
    h = hashlib.sha256()
    for pname, _ in model.named_parameters():
        h.update(pname.encode())
        h.update(tensor_bytes(param_values(model, pname)))  # an offloaded weight: its values, not the meta tensor
    return f"{name or 'model'}#sha256:{h.hexdigest()[:24]}"


# -- the pass ----------------------------------------------------------------------------------

def collect_stats(
    model: nn.Module,
    tokenizer,
    corpus: Any = None,
    layers: Iterable[int] = (),
    *,
    n_samples: int = 100_000,
    max_length: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    cache: StatsCache | str | os.PathLike | None = None,
    arch: ArchSpec | None = None,
    progress: bool = True,
    seed: int = 0,
    checkpoint_seconds: float | None = 300.0,
) -> dict[int, SecondMoment]:
    """Second moments of the edited modules' inputs at ``layers`` from ONE forward pass over ``corpus``.

    Accumulates ``Σ k kᵀ`` in ``dtype`` (float32 or float64) over non-padding tokens, texts truncated to
    ``max_length`` tokens (default: the model's context, at most 1,024), stopping after the batch that
    reaches ``max_tokens`` keys. Texts are read in a random order seeded by ``seed`` (see :func:`load_corpus`),
    so that ``n_samples`` and ``max_tokens`` take a uniform sample of the corpus. With ``cache``, layers already
    cached are loaded and only the others computed; new results are written back, and the pass writes its partial
    sums there every ``checkpoint_seconds`` (None: never), so that a pass interrupted (Ctrl-C, a lost machine)
    continues from its last checkpoint when called again with the same arguments (see :class:`_Checkpoint`; each
    checkpoint is one float ``d_in²`` matrix per layer computed).
    Raises :class:`StatisticsError` when a layer is neither cached nor computable (no corpus) or comes
    out non-finite; warns when a pass's texts all stop short of half the context (:func:`warn_if_short_texts`).

    Under a ``torch.distributed`` process group of W > 1 ranks (every rank calls this with the same arguments),
    rank r runs the forward passes of the texts r, r+W, r+2W, ... in batches of ``batch_size``, and the sums and
    counts are all-reduced, so every rank returns the same statistics. Without a token budget they are those of
    one process (the same count; ``mom2`` within float32 rounding: the sums are added in another order). With
    ``max_tokens`` the ranks add up their counts after each batch and all stop once the total reaches the
    budget: W batches at once read the texts in the order one process does, so the result is that of one
    process with ``batch_size x W`` (it may read up to ``(W - 1) x batch_size`` texts more than one process
    with ``batch_size``). Every rank reads the cache, and a layer counts as cached only when every rank found
    it; rank 0 alone writes new entries, while the others wait.
    """
    spec = check_model(model, tokenizer, arch)
    layers = sorted(set(layers))
    if isinstance(cache, (str, os.PathLike)):
        cache = StatsCache(cache)
    texts, corpus_id = load_corpus(corpus, n_samples, seed) if corpus is not None else (None, None)
    keys = _cache_keys(model, layers, corpus, corpus_id, len(texts) if texts else n_samples, dtype, max_length,
                       max_tokens)

    out: dict[int, SecondMoment] = {}
    if cache is not None:
        for layer in layers:
            hit = cache.load(keys[layer]) if keys[layer] is not None else _find_any(cache, model, layer, dtype)
            if hit is not None:
                out[layer] = hit
        agreed = all_ranks([layer in out for layer in layers])  # every rank computes the same layers
        out = {layer: out[layer] for layer, hit in zip(layers, agreed) if hit}
    missing = [layer for layer in layers if layer not in out]
    if missing:
        if texts is None:
            raise StatisticsError(
                f"no second-moment statistics for layers {missing}: pass corpus=... (a list of texts, a local "
                ".txt/.jsonl file or a datasets.Dataset; ~10 x d_ff tokens keep most of the quality) or a cache "
                "directory that holds them (see collect_stats). memit_adapter never downloads a corpus itself."
            )
        if is_main():
            warn_if_short_texts(tokenizer, texts, context_length(model, max_length))
        checkpoint = None
        if cache is not None and checkpoint_seconds is not None:
            checkpoint = _Checkpoint(cache.directory, {"entries": [keys[layer] for layer in missing],
                                                       "batch_size": batch_size}, checkpoint_seconds)
        fresh = _accumulate(model, tokenizer, texts, missing, spec, max_length, batch_size,
                            getattr(torch, dtype), progress and is_main(), max_tokens=max_tokens,
                            checkpoint=checkpoint)
        for layer, stat in fresh.items():
            stat.check_finite(layer)
            out[layer] = stat
        if cache is not None:
            try:
                if is_main():
                    _save_all(cache, keys, fresh)
            finally:
                barrier()  # the entries are there for every rank once this returns
        if checkpoint is not None:
            checkpoint.remove()
    for layer, stat in out.items():
        stat.check_finite(layer)
    return {layer: out[layer] for layer in layers}


def prompt_moments(model: nn.Module, tokenizer, prompts: Sequence[str], layers: Iterable[int], *,
                   batch_size: int = 32, dtype: str = "float32", arch: ArchSpec | None = None,
                   progress: bool = True) -> dict[int, SecondMoment]:
    """Second moments of the edited modules' inputs at ``layers`` over every token of ``prompts``, in one pass.

    The pass of :func:`collect_stats` over a handful of short texts (facts to keep, say; see ``keep`` in
    :func:`~memit_adapter.engine.compute_edits`), taken as given: no shuffling, sampling, token budget, cache or
    warning about short texts; truncated to the model's context. Under a process group the ranks share the
    prompts and every rank gets the sums of all. Raises :class:`StatisticsError` when no prompt has a token or the
    result is not finite."""
    spec = check_model(model, tokenizer, arch)
    prompts, layers = list(prompts), sorted(set(layers))
    if not any(tokenizer(p)["input_ids"] for p in prompts):
        raise StatisticsError("prompt_moments needs at least one prompt that has a token")
    out = _accumulate(model, tokenizer, prompts, layers, spec, None, batch_size, getattr(torch, dtype),
                      progress and is_main())
    for layer, stat in out.items():
        stat.check_finite(layer)
    return out


def context_length(model: nn.Module, max_length: int | None) -> int:
    """Tokens a statistics text is truncated to: ``max_length``, else the model's context, at most 1,024."""
    return max_length or min(1024, max_positions(model) or 1024)


SHORT_TEXT_SAMPLE = 256  # texts of the (shuffled) corpus whose lengths warn_if_short_texts reads


def warn_if_short_texts(tokenizer, texts: Sequence[str], context: int) -> int:
    """Warn when no text among the first :data:`SHORT_TEXT_SAMPLE` of ``texts`` reaches half of ``context`` tokens;
    returns the longest one's length.

    C then holds no key past that position, and ``(λC + KKᵀ)⁻¹`` amplifies whatever the edited layers read beyond
    it: on world-gpt2-bpe (context 64), statistics from one sentence per text (at most ~20 tokens) let 100 edits
    raise the entropy of greedy generations by 22%, the text falling apart after three sentences; with texts up to
    the context added, 6%. ``max_length`` (``mom2_max_length``) set to the longest text the edited model will read
    or write silences it.
    """
    sample = list(texts[:SHORT_TEXT_SAMPLE])
    ids = tokenizer(sample, truncation=True, max_length=context)["input_ids"] if sample else []
    longest = max((len(x) for x in ids), default=0)
    if 2 * longest < context:
        warnings.warn(f"the statistics corpus holds short texts only: the longest of {len(sample)} sampled is "
                      f"{longest} tokens against a context of {context}, so C holds no key past position {longest} "
                      "and edits may make generations fall apart past it. Join the texts into documents as long as "
                      "the model's texts (e.g. sentences into paragraphs), or set max_length / mom2_max_length to "
                      "the longest text the edited model will read or write.", UserWarning, stacklevel=3)
    return longest


def collect_stats_for(model: nn.Module, tokenizer, corpus: Any, layers: Iterable[int], config: Any, *,
                      cache_dir: str | os.PathLike | None = None, arch: ArchSpec | None = None,
                      progress: bool = True) -> dict[int, SecondMoment]:
    """:func:`collect_stats` with the statistics settings of a method's config (``mom2_n_samples``,
    ``mom2_max_length``, ``mom2_max_tokens``, ``stats_batch_size``, ``mom2_dtype``, ``seed``: MemitConfig and
    RomeConfig have them) and a cache folder ``cache_dir`` (or none)."""
    return collect_stats(model, tokenizer, corpus, layers, n_samples=config.mom2_n_samples,
                         max_length=config.mom2_max_length, max_tokens=config.mom2_max_tokens,
                         batch_size=config.stats_batch_size, dtype=config.mom2_dtype,
                         cache=StatsCache(cache_dir) if cache_dir else None, arch=arch, progress=progress,
                         seed=config.seed)


def _cache_keys(model, layers, corpus, corpus_id, n, dtype, max_length, max_tokens
                ) -> dict[int, dict[str, Any] | None]:
    if corpus is None:
        return {layer: None for layer in layers}
    mid = model_id(model)
    return {layer: {"model": mid, "layer": layer, "corpus": corpus_id, "n_samples": n, "dtype": dtype,
                    "max_length": max_length, "max_tokens": max_tokens} for layer in layers}


def _find_any(cache: StatsCache, model, layer: int, dtype: str) -> SecondMoment | None:
    """Without a corpus, accept any cached entry of this model, layer and dtype (the newest)."""
    try:
        paths = list(cache.directory.glob(f"mom2_layer{layer}_*.safetensors")) if cache.directory.is_dir() else []
    except OSError as e:
        _warn_cache(cache.directory, e, "read")
        return None
    mid = model_id(model)
    found = []
    for path in paths:
        key, _ = _read_entry(path, with_tensor=False)
        if key.get("model") == mid and key.get("layer") == layer and key.get("dtype") == dtype:
            found.append((path.stat().st_mtime, key))
    return cache.load(max(found, key=lambda x: x[0])[1]) if found else None


@torch.no_grad()
def _accumulate(model, tokenizer, texts, layers, spec, max_length, batch_size, acc_dtype, progress, stop_early=True,
                max_tokens=None, checkpoint: _Checkpoint | None = None):
    """The second moments of ``layers`` over ``texts``; under a process group, over this rank's share of them,
    then all-reduced (see :func:`collect_stats`). With ``checkpoint``, starts from its partial sums when it holds
    some and writes them as it goes."""
    device = input_device(model)
    max_length = context_length(model, max_length)
    sums: dict[int, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    mask_box: list[torch.Tensor] = []
    deepest = max(layers)

    def make_hook(layer):
        def hook(_mod, args):
            x = args[0]  # on the device the module was called on: accumulated there (a split model's layer's)
            k = x.reshape(-1, x.shape[-1])[mask_box[0].to(x.device)].to(acc_dtype)  # (tokens, d_in)
            if layer not in sums:
                sums[layer] = torch.zeros(k.shape[1], k.shape[1], dtype=acc_dtype, device=k.device)
            sums[layer].addmm_(k.T, k)
            counts[layer] += k.shape[0]
            if stop_early and layer == deepest:
                raise StopForward
        return hook

    handles = [spec.mlp_out_module(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in layers]
    pad = pad_id(tokenizer)
    start = used = total = 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        start, state, sums, counts = resumed
        used, total = state["used"], state["total"]
        sums = {layer: t.to(execution_device(model, spec.mlp_out_name(layer))) for layer, t in sums.items()}
        logger.info("statistics resumed from %s: %d texts, %d key vectors done", checkpoint.path, used,
                    counts[deepest])
    mine = shard(texts)  # all of them in one process
    # rank 0's share is the longest: every rank runs as many batches (some empty), so the budget's sums line up
    n_batches = math.ceil(math.ceil(len(texts) / world_size()) / batch_size)
    # the bar counts what bounds the pass: key vectors under a token budget (of all ranks), else texts (this rank's)
    bar = tqdm(total=max_tokens if max_tokens is not None else len(mine), desc="second moments",
               unit="keys" if max_tokens is not None else "texts", disable=not progress,
               initial=min(total, max_tokens) if max_tokens is not None else min(used, len(mine)))
    try:
        with evaluating(model), bar:
            for i in range(start, n_batches * batch_size, batch_size):
                chunk = mine[i:i + batch_size]
                used += len(chunk)
                seqs = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
                seqs = [s for s in seqs if s]
                seen = counts[deepest]
                if seqs:
                    ids, mask = pad_right(seqs, pad, device)
                    mask_box[:] = [mask.reshape(-1).bool()]
                    try:
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except StopForward:
                        pass
                if max_tokens is not None:
                    before, total = total, total + sum_over_ranks(counts[deepest] - seen)
                    bar.update(min(total, max_tokens) - min(before, max_tokens))
                    if total >= max_tokens:
                        break
                else:
                    bar.update(len(chunk))
                if checkpoint is not None and checkpoint.due():
                    checkpoint.save(i + batch_size, used, total, sums, counts)
    finally:
        for h in handles:
            h.remove()
    if world_size() > 1:
        sums, counts = _summed_over_ranks(model, spec, layers, sums, counts, acc_dtype)
    ranks = f" (texts of this rank, keys of all {world_size()} ranks)" if world_size() > 1 else ""
    logger.info("second moments from %d of %d texts, %d key vectors, layers %s%s", used, len(texts),
                counts[deepest], layers, ranks)
    return {layer: SecondMoment(mom2=sums[layer] / counts[layer], count=counts[layer]) for layer in layers}


def _summed_over_ranks(model, spec, layers, sums, counts, acc_dtype
                       ) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Every rank's sums and counts added up (a rank that saw no token adds zeros)."""
    for layer in layers:
        if layer not in sums:
            d_in = spec.weight_shape(model, layer)[1]
            sums[layer] = torch.zeros(d_in, d_in, dtype=acc_dtype)
    counts_t = {layer: torch.tensor([counts[layer]], dtype=torch.long) for layer in layers}
    summed = all_reduce_sum({**{("sum", layer): sums[layer] for layer in layers},
                             **{("count", layer): counts_t[layer] for layer in layers}})
    return ({layer: summed[("sum", layer)] for layer in layers},
            {layer: int(summed[("count", layer)].item()) for layer in layers})
