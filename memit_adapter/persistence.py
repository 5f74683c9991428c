"""Files of an edit pack: a PEFT LoRA adapter, a sidecar JSON, the requests and a model card.

Usage::

    save_pack(pack, "my-pack")                    # adapter_config.json, adapter_model.safetensors,
                                                  # edit_pack.json, requests.jsonl, README.md
    save_pack(pack, "my-pack", dense_file=True)   # edit_deltas.safetensors instead of the PEFT weights
    pack = load_pack_dir("my-pack")

    model.load_adapter("my-pack")                 # stock transformers/PEFT, no memit_adapter needed

The folder is a valid PEFT LoRA adapter: ``lora_B @ lora_A`` is each module's delta in ``(d_out, d_in)``
layout, ``lora_alpha = r`` makes the scaling 1, ``target_modules`` holds full module names (GPT-2's
``c_proj`` alone would also wrap ``attn.c_proj``), ``fan_in_fan_out`` is set for Conv1D weights, and
per-module ranks go through ``rank_pattern``/``alpha_pattern``. ``adapter_config.json`` holds only
keys every PEFT version since 0.7 knows; our own metadata lives in ``edit_pack.json``. A dense delta
(more edits than ``min(d_in, d_out)``) is stored exactly with one identity factor.

A save changes the folder as a whole: the files are written into a new folder beside the target, which
then takes the target's place in one step, so a reader (``EditPack.from_pretrained`` or stock PEFT) sees
the old pack or the new one, never a mixture, even if the save is killed. ``edit_pack.json`` records the
SHA-256 of every other file: a damaged weights file is refused on load, and a file changed by hand is not
overwritten by the next save without ``overwrite=True``. Loading reads safetensors and JSON only.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import MemitError, OverwriteError, PackError
from .method_configs import config_class
from .pack import EditPack, LayerDelta, check_finite
from .requests import EditRequest

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FORMAT_NAME = "memit_adapter.edit_pack"
FORMAT_VERSION = 1
METADATA_FILE = "edit_pack.json"
REQUESTS_FILE = "requests.jsonl"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
DENSE_WEIGHTS_FILE = "edit_deltas.safetensors"
TARGETS_FILE = "edit_targets.safetensors"  # the target vectors of a pack's chain (see EditPack.targets)
CARD_FILE = "README.md"
PACK_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, DENSE_WEIGHTS_FILE, REQUESTS_FILE, TARGETS_FILE, CARD_FILE,
              METADATA_FILE)
_LOADER_FILES = frozenset(PACK_FILES) - {CARD_FILE}  # never carried over from an old folder: a loader reads them
_TMP_MARK = ".memit-tmp-"  # .NAME.memit-tmp-HEX: a save in progress, or after its swap the old folder being deleted
_OLD_MARK = ".memit-old-"  # .NAME.memit-old-HEX: the old folder moved aside where two folders cannot be exchanged
_STALE_AFTER_S = 24 * 3600  # where folders cannot be locked (no fcntl), leftovers older than this are removed
_PEFT_PREFIX = "base_model.model."
_CARD_ROWS = 50


# -- writing ----------------------------------------------------------------------------------------
def save_pack(pack: EditPack, save_directory: str | os.PathLike, *, dense_file: bool = False, card: bool = True,
              overwrite: bool = False, repo_id: str | None = None, subfolder: str | None = None) -> Path:
    """Write ``pack`` to ``save_directory`` as one atomic change; returns the folder.

    ``repo_id`` / ``subfolder``: where the pack is going on the Hub, for the loading code of its card.
    ``dense_file=True`` writes ``edit_deltas.safetensors`` (each delta as held: dense matrices or
    ``B``/``A``) instead of ``adapter_config.json`` + ``adapter_model.safetensors``: smaller when a pack
    has more edits than ``d_in·d_out/(d_in + d_out)``, but loadable only by ``EditPack.from_pretrained``.

    The files go into a new folder beside the target (``.NAME.memit-tmp-*``; with the mode of the folder it
    replaces, or of any new folder: ``0o777`` less the umask), which then takes the target's place in one
    step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, and a save killed between them is
    rolled back to the old pack by the next save into the same parent). Leftovers of killed saves in the
    parent are removed on the next save there. A folder that cannot be swapped (a mount point, the working
    directory, a parent without write permission) has its files replaced one by one instead, with a warning.

    Saving over a folder that holds an earlier pack replaces it: the normal way to update a pack. A folder
    holding anything else (a model checkpoint, a README.md of one's own, a pack file changed by hand) raises
    :class:`OverwriteError` unless ``overwrite=True``; then the pack's files replace those of the same names
    and every other file is kept (hard-linked into the new folder, or copied).
    """
    check_finite(pack, "save")
    given = Path(save_directory)
    target, foreign = _destination(given, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    swap = _swappable(target)
    _clean_leftovers(target.parent if swap else target)
    with _staging(target.parent if swap else target, target.name) as tmp:
        if target.is_dir():
            os.chmod(tmp, target.stat().st_mode & 0o7777 | 0o700)  # as shared as the folder it replaces
        written = _write_files(pack, tmp, dense_file=dense_file, card=card, repo_id=repo_id, subfolder=subfolder)
        if swap:
            for name in foreign:
                if name not in written and name not in _LOADER_FILES:
                    _carry(target / name, tmp / name)
            _fsync(tmp)
            _swap_in(tmp, target)
        else:
            _replace_files(tmp, target, written, foreign)
    return given


def _swappable(target: Path) -> bool:
    """Whether a sibling folder can take ``target``'s place: not a mount point, not holding the working
    directory, in a parent folder we may write."""
    if not target.is_dir():
        return True
    cwd = Path.cwd()
    return (not os.path.ismount(target) and cwd != target and target not in cwd.parents
            and os.access(target.parent, os.W_OK | os.X_OK))


def _replace_files(new: Path, target: Path, written: list[str], foreign: list[str]) -> None:
    """The fallback where the folder cannot be swapped: its files are replaced one by one, the sidecar last."""
    warnings.warn(f"{target} cannot be replaced as a whole (a mount point, the working directory, or a parent "
                  "folder without write permission): its files are replaced one by one. A save killed midway "
                  "leaves a folder EditPack.from_pretrained refuses (the sidecar's hashes) and stock PEFT may "
                  "misread; save into a subfolder to avoid that.", stacklevel=4)
    for name in written:  # the sidecar, written last, vouches for the others by hash
        os.replace(new / name, target / name)
    for name in PACK_FILES:
        if name not in written and (name in _LOADER_FILES or name not in foreign):
            (target / name).unlink(missing_ok=True)
    _fsync(target)


def _write_files(pack: EditPack, folder: Path, *, dense_file: bool, card: bool, repo_id: str | None = None,
                 subfolder: str | None = None) -> list[str]:
    mode = folder.stat().st_mode & 0o666  # the new folder's mode less x: what open() gives under this umask
    files = []

    def done(name: str) -> None:
        os.chmod(folder / name, mode)  # safetensors creates its files 0o600
        _fsync(folder / name)
        files.append(name)

    if dense_file:
        weights_file, tensors = DENSE_WEIGHTS_FILE, _native_tensors(pack)
    else:
        weights_file, tensors = ADAPTER_WEIGHTS_FILE, peft_tensors(pack.deltas)
        _write_json(folder / ADAPTER_CONFIG_FILE, peft_config_dict(pack))
        done(ADAPTER_CONFIG_FILE)
    save_file(tensors, str(folder / weights_file),
              metadata={"format": "pt", "memit_adapter_format": str(FORMAT_VERSION), "pack_id": pack.pack_id})
    done(weights_file)
    with open(folder / REQUESTS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in pack.requests)
    done(REQUESTS_FILE)
    if pack.targets is not None:
        save_file({"targets": _plain(pack.targets)}, str(folder / TARGETS_FILE), metadata={"format": "pt"})
        done(TARGETS_FILE)
    if card:
        (folder / CARD_FILE).write_text(render_card(pack, repo_id, subfolder), encoding="utf-8")
        done(CARD_FILE)
    hashes = {name: _sha256(folder / name) for name in files}
    meta = metadata_dict(pack, weights_file=weights_file, weights_sha256=hashes[weights_file])
    meta["files"] = hashes
    meta["targets_file"] = TARGETS_FILE if pack.targets is not None else None
    _write_json(folder / METADATA_FILE, meta)
    done(METADATA_FILE)
    return files


def check_destination(save_directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise what :func:`save_pack` would raise about the folder itself (a file in its place, someone else's
    files in it), before any work: :class:`PackError` / :class:`OverwriteError`."""
    _destination(Path(save_directory), overwrite)


def _destination(given: Path, overwrite: bool) -> tuple[Path, list[str]]:
    target = Path(os.path.abspath(given.resolve() if given.is_symlink() else given))  # the folder a link points to
    if target.exists() and not target.is_dir():
        raise PackError(f"{given} exists and is not a directory")
    foreign = _foreign_entries(target)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OverwriteError(
            f"{given} holds files that are not an edit pack written by memit_adapter ({shown}); nothing was "
            "written. Save into a new or empty folder, or pass overwrite=True to replace the pack's files there "
            "and keep the others.")
    return target, foreign


def _foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that are not files of an edit pack we wrote, as its sidecar vouches for them: every
    entry when there is no sidecar of ours; else those not listed with their current hash (sidecars written
    before the hashes were recorded vouch for the pack's file names)."""
    if not folder.is_dir():
        return []
    names = [n for n in sorted(os.listdir(folder)) if _TMP_MARK not in n and _OLD_MARK not in n]  # a save's own
    try:
        meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        ours = meta.get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        return names
    hashes = meta.get("files")
    if not isinstance(hashes, dict):
        return [n for n in names if n not in PACK_FILES]
    return [n for n in names if n != METADATA_FILE and not (
        n in hashes and (folder / n).is_file() and not (folder / n).is_symlink() and _sha256(folder / n) == hashes[n])]


def _carry(src: Path, dst: Path) -> None:
    """Put ``src`` (a file, a folder or a link) at ``dst`` without copying data where a hard link does."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- swapping folders -------------------------------------------------------------------------------
@contextmanager
def _staging(parent: Path, name: str) -> Iterator[Path]:
    """A new empty folder ``parent/.NAME.memit-tmp-*``, locked while this process writes it, removed on exit
    (after :func:`_swap_in` it holds the old folder)."""
    while True:
        tmp = parent / f".{name}{_TMP_MARK}{secrets.token_hex(6)}"
        try:
            os.mkdir(tmp)  # 0o777 less the umask; tempfile.mkdtemp would make it 0o700
        except FileExistsError:
            continue
        lock = _lock(tmp, block=True)
        try:
            if lock is None or os.path.samestat(os.fstat(lock), os.stat(tmp)):
                break  # not removed as a leftover by another save between mkdir and lock
        except FileNotFoundError:
            pass
        _unlock(lock)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)


def _swap_in(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target`` in one step; what was at ``target`` ends up at ``new``."""
    if not target.exists():
        os.rename(new, target)
    elif not _exchange(new, target):
        old = target.parent / f".{target.name}{_OLD_MARK}{secrets.token_hex(6)}"
        lock = _lock(target, block=True)
        try:
            os.rename(target, old)  # killed here: _clean_leftovers renames it back
            os.rename(new, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            _unlock(lock)
    _fsync(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system (NFS, ...) or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _clean_leftovers(parent: Path) -> None:
    """Remove the temporary folders of killed saves in ``parent``, and put back a folder a killed save had
    moved aside. A save in progress holds a lock on its folder; the kernel drops it when the process dies."""
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        name, path = entry.name, Path(entry.path)
        mark = _TMP_MARK if _TMP_MARK in name else _OLD_MARK if _OLD_MARK in name else None
        if mark is None:
            continue
        try:
            lock = _lock(path, block=False)
            if lock is None and (fcntl is not None or time.time() - path.stat().st_mtime < _STALE_AFTER_S):
                continue  # a save in progress
            try:
                original = parent / name[1:name.rindex(mark)]
                if mark == _OLD_MARK and not original.exists():
                    os.rename(path, original)  # killed between its two renames: the old pack is the consistent one
                else:
                    shutil.rmtree(path, ignore_errors=True)
            finally:
                _unlock(lock)
        except OSError:
            continue  # never let cleaning up fail a save


def _lock(folder: Path, *, block: bool) -> int | None:
    """A descriptor holding an exclusive ``flock`` on ``folder``; None if busy (``block=False``) or without fcntl."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing drops the flock


UNRECORDED_BASE = ("base model not recorded (it was loaded from a folder): load it yourself, then "
                   "PeftModel.from_pretrained(base, this_pack)")
"""``base_model_name_or_path`` of a pack whose base has no known Hub id. ``null`` there sends
``AutoPeftModelForCausalLM.from_pretrained(pack)`` and ``pipeline(model=pack)`` to ``huggingface.co/None`` for
retries; this text is no valid repo id, so they fail at once with an error that shows it. ``PeftModel.from_pretrained``
and ``model.load_adapter`` never read the field."""


def config_base_model(pack: EditPack) -> str:
    """The ``base_model_name_or_path`` written for ``pack``: its Hub id, else :data:`UNRECORDED_BASE`."""
    return pack.base_model or UNRECORDED_BASE


def peft_config_dict(pack: EditPack) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter with scaling 1, per-module ranks, full module names."""
    ranks = {name: _lora_rank(d) for name, d in pack.deltas.items()}
    r = max(set(ranks.values()), key=lambda k: (list(ranks.values()).count(k), k))  # the most common rank
    pattern = {name: k for name, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config_base_model(pack),
        "revision": pack.revision,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1: B @ A is the delta itself
        "lora_dropout": 0.0,
        "target_modules": sorted(pack.deltas),
        "fan_in_fan_out": pack.fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
    }


def metadata_dict(pack: EditPack, *, weights_file: str, weights_sha256: str) -> dict[str, Any]:
    """The sidecar ``edit_pack.json``: provenance, config, per-module layout, and the weights file's hash."""
    from . import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library": "memit_adapter",
        "library_version": __version__,
        "pack_id": pack.pack_id,
        "model_type": pack.model_type,
        "fan_in_fan_out": pack.fan_in_fan_out,
        "base_model": pack.base_model,
        "revision": pack.revision,
        "fingerprint": pack.fingerprint,
        "parents": pack.parents,
        "representation": pack.representation,
        "n_requests": len(pack.requests),
        "metrics": pack.metrics,
        "method": pack.config.method,
        "config": pack.config.to_dict(),
        "modules": {name: {"dense": d.is_dense, "rank": d.rank, "shape": list(d.shape), "dtype": _dtype_name(d.dtype)}
                    for name, d in pack.deltas.items()},
        "weights_file": weights_file,
        "weights_sha256": weights_sha256,
    }


def _lora_rank(d: LayerDelta) -> int:
    return min(d.shape) if d.is_dense else d.rank


def peft_tensors(deltas: dict[str, LayerDelta]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``deltas`` under PEFT's names (``base_model.model.{module}.lora_A/B.weight``), on
    the CPU."""
    out = {}
    for name, d in deltas.items():
        B, A = d.lora_factors()
        out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = _plain(A)  # (r, d_in)
        out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = _plain(B)  # (d_out, r)
    return out


def _native_tensors(pack: EditPack) -> dict[str, torch.Tensor]:
    out = {}
    for name, d in pack.deltas.items():
        if d.is_dense:
            out[f"{name}.dense"] = _plain(d.dense)
        else:
            out[f"{name}.B"], out[f"{name}.A"] = _plain(d.B), _plain(d.A)
    return out


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (before a rename makes them visible)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- model card -------------------------------------------------------------------------------------
def render_card(pack: EditPack, repo_id: str | None = None, subfolder: str | None = None) -> str:
    """The README.md: Hub front matter (``base_model``, ``library_name: peft``, tags), the edits, the metrics, and
    code that loads the pack from ``repo_id`` (and ``subfolder``) when it is pushed, from its folder otherwise."""
    template = Template(resources.files("memit_adapter").joinpath("cards", "edit_pack.md").read_text("utf-8"))
    base = pack.base_model
    front = [f"base_model: {base}"] if base else []
    tags = ["memit", "knowledge-editing", "lora"] + ([f"base_model:adapter:{base}"] if base else [])
    front += ["library_name: peft", "license: other", "license_name: same-as-base-model", "tags:"]
    front += [f"- {t}" for t in tags] + _model_index(pack, repo_id, subfolder)
    rows = [f"| {i} | {_cell(r.subject)} | {_cell(r.text)} | {_cell(r.target_new)} | {_cell(r.target_true or '')} |"
            for i, r in enumerate(pack.requests[:_CARD_ROWS])]
    if len(pack.requests) > _CARD_ROWS:
        rows.append(f"| … | {len(pack.requests) - _CARD_ROWS} more in `{REQUESTS_FILE}` | | | |")
    metrics = "\n".join(f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in sorted(pack.metrics.items()))
    from . import __version__

    return template.substitute(
        front_matter="\n".join(front),
        base_model=(f"`{base}`" + (f" at revision `{pack.revision}`" if pack.revision else "") if base
                    else "a base model with no recorded Hub id"),
        n_edits=len(pack.requests),
        layers=", ".join(sorted(pack.deltas)),
        edits_table="\n".join(rows),
        metrics_table=("| metric | value |\n|---|---|\n" + metrics) if metrics else "No metrics were recorded.",
        fingerprint=pack.fingerprint or "not recorded",
        parents=", ".join(f"`{p}`" for p in pack.parents) or "none",
        settings=_settings_line(pack),
        method_link={"memit": "[MEMIT](https://memit.baulab.info)", "rome": "[ROME](https://rome.baulab.info)",
                     "ft": "fine-tuning with weight decay (FT-W)"}[pack.config.method],
        library_version=__version__,
        base_id=base or "ID_OR_FOLDER_OF_THE_BASE_MODEL",
        base_note="" if base else ("  # the base model's Hub id was not recorded (it was loaded from a folder): "
                                   "use that same model, the fingerprint below checks it"),
        pack_id=repo_id or "PATH_TO_THIS_FOLDER",
        adapter_kwargs=f', adapter_kwargs={{"subfolder": "{subfolder}"}}' if subfolder else "",
        pack_kwargs=f', subfolder="{subfolder}"' if subfolder else "",
    )


def _settings_line(pack: EditPack) -> str:
    cfg = pack.config
    if cfg.method == "memit":
        return f"MEMIT, covariance weight λ (mom2_update_weight) {cfg.mom2_update_weight:g}"
    if cfg.method == "rome":
        return f"ROME ({'published key' if cfg.original_key else 'r-ROME key'}), one rank-one update per request"
    return f"FT-W, {cfg.num_steps} epochs of lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}"


def _model_index(pack: EditPack, repo_id: str | None, subfolder: str | None) -> list[str]:
    """``model-index`` front matter lines for the pack's numeric metrics (``eval --write-card``); none without."""
    numeric = {k: v for k, v in sorted(pack.metrics.items())
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numeric:
        return []
    name = "/".join(x for x in (repo_id, subfolder) if x) or "memit-edit-pack"
    dataset = json.dumps(f"the pack's own {len(pack.requests)} requests")
    lines = ["model-index:", f"- name: {json.dumps(name)}", "  results:", "  - task:",
             "      type: knowledge-editing", "      name: Knowledge editing", "    dataset:",
             "      type: edit-requests", f"      name: {dataset}",
             "    metrics:"]
    for key, value in numeric.items():
        lines += [f"    - type: {json.dumps(key)}", f"      value: {json.dumps(value)}"]
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


# -- reading ----------------------------------------------------------------------------------------
def load_pack_dir(folder: str | os.PathLike) -> EditPack:
    """Read a folder written by :func:`save_pack`. Raises :class:`PackError` on missing, damaged or
    inconsistent files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PackError(f"no edit pack folder at {folder}")
    meta = _read_json(folder / METADATA_FILE, hint="not an edit pack (a plain PEFT adapter has no edit_pack.json)")
    if meta.get("format") != FORMAT_NAME or not isinstance(meta.get("format_version"), int):
        raise PackError(f"{folder / METADATA_FILE} is not an edit pack sidecar (format={meta.get('format')!r})")
    if meta["format_version"] > FORMAT_VERSION:
        raise PackError(f"{folder} uses edit pack format {meta['format_version']}; this memit_adapter reads up to "
                        f"{FORMAT_VERSION}. Upgrade memit_adapter.")
    try:
        return _pack_from(folder, meta)
    except PackError:
        raise
    except (MemitError, KeyError, TypeError, ValueError) as e:
        raise PackError(f"{folder}: inconsistent edit pack metadata ({type(e).__name__}: {e})") from None


def _pack_from(folder: Path, meta: dict[str, Any]) -> EditPack:
    weights_file = meta["weights_file"]
    if weights_file not in (ADAPTER_WEIGHTS_FILE, DENSE_WEIGHTS_FILE):
        raise PackError(f"{folder / METADATA_FILE}: unknown weights_file {weights_file!r}")
    path = folder / weights_file
    if not path.is_file():
        raise PackError(f"{path} is missing")
    _check_hash(path, meta["weights_sha256"])
    tensors = _read_safetensors(path)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise PackError(f"{path}: tensor {key} holds {int((~torch.isfinite(t)).sum())} NaN/inf value(s); a "
                            "pack with non-finite deltas is refused. Recompute the pack.")
    modules = meta["modules"]
    if weights_file == ADAPTER_WEIGHTS_FILE:
        _check_peft_config(folder, meta)
        deltas = {name: _delta_from_lora(tensors, name, info) for name, info in modules.items()}
        expected = {f"{_PEFT_PREFIX}{n}.lora_{x}.weight" for n in modules for x in "AB"}
    else:
        deltas = {name: _delta_from_native(tensors, name, info) for name, info in modules.items()}
        expected = {f"{n}.{x}" for n, info in modules.items() for x in (("dense",) if info["dense"] else "BA")}
    extra = set(tensors) - expected
    if extra:
        raise PackError(f"{path} holds tensors the metadata does not list: {sorted(extra)[:5]}")
    requests = _read_requests(folder / REQUESTS_FILE)
    if len(requests) != meta["n_requests"]:
        raise PackError(f"{folder / REQUESTS_FILE} holds {len(requests)} requests, the metadata says "
                        f"{meta['n_requests']}: the files come from different saves")
    config = config_class(meta.get("method", "memit")).from_dict(meta["config"])  # older packs: MEMIT
    pack = EditPack(deltas=deltas, requests=requests, config=config,
                    model_type=meta["model_type"], fan_in_fan_out=bool(meta["fan_in_fan_out"]),
                    base_model=meta["base_model"], revision=meta["revision"], fingerprint=meta["fingerprint"],
                    parents=list(meta["parents"]), metrics=dict(meta["metrics"]),
                    representation=meta["representation"], targets=_read_targets(folder, meta))
    pack.deltas.update(deltas)  # "auto" could re-choose; keep what was saved
    return pack


def _check_hash(path: Path, recorded: str | None) -> None:
    if _sha256(path) != recorded:
        raise PackError(f"{path} does not match the hash recorded in {METADATA_FILE}: the file is damaged, or "
                        "comes from another save. Save the pack again.")


def _read_targets(folder: Path, meta: dict[str, Any]) -> torch.Tensor | None:
    """The pack's target vectors, or None when it was saved without them (older packs, ROME, FT-W)."""
    name = meta.get("targets_file")
    if name is None:
        return None
    path = folder / TARGETS_FILE
    if name != TARGETS_FILE or not path.is_file():
        raise PackError(f"{path} is missing (the metadata lists targets_file {name!r})")
    _check_hash(path, meta.get("files", {}).get(TARGETS_FILE))
    tensors = _read_safetensors(path)
    targets = tensors.get("targets")
    if targets is None or set(tensors) != {"targets"} or targets.dim() != 2:
        raise PackError(f"{path} must hold one 2-D tensor 'targets', holds {sorted(tensors)}")
    return targets


def _delta_from_lora(tensors: dict[str, torch.Tensor], name: str, info: dict[str, Any]) -> LayerDelta:
    A = _tensor(tensors, f"{_PEFT_PREFIX}{name}.lora_A.weight")
    B = _tensor(tensors, f"{_PEFT_PREFIX}{name}.lora_B.weight")
    d_out, d_in = info["shape"]
    if A.dim() != 2 or B.dim() != 2 or B.shape[0] != d_out or A.shape[1] != d_in or B.shape[1] != A.shape[0]:
        raise PackError(f"{name}: lora_B {tuple(B.shape)} @ lora_A {tuple(A.shape)} is not ({d_out}, {d_in})")
    if info["dense"]:  # saved as identity @ dense or dense @ identity; take the dense factor as is
        return LayerDelta(dense=A if d_out <= d_in else B)
    return LayerDelta(B=B, A=A)


def _delta_from_native(tensors: dict[str, torch.Tensor], name: str, info: dict[str, Any]) -> LayerDelta:
    d = (LayerDelta(dense=_tensor(tensors, f"{name}.dense")) if info["dense"]
         else LayerDelta(B=_tensor(tensors, f"{name}.B"), A=_tensor(tensors, f"{name}.A")))
    if list(d.shape) != list(info["shape"]):
        raise PackError(f"{name}: stored delta has shape {d.shape}, the metadata says {tuple(info['shape'])}")
    return d


def _tensor(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise PackError(f"the weights file lacks tensor {key!r}")
    return tensors[key]


def _check_peft_config(folder: Path, meta: dict[str, Any]) -> None:
    cfg = _read_json(folder / ADAPTER_CONFIG_FILE, hint="the PEFT adapter config is missing")
    if sorted(cfg.get("target_modules") or []) != sorted(meta["modules"]):
        raise PackError(f"{folder / ADAPTER_CONFIG_FILE}: target_modules {cfg.get('target_modules')} do not match "
                        f"the pack's modules {sorted(meta['modules'])}")
    if bool(cfg.get("fan_in_fan_out")) != bool(meta["fan_in_fan_out"]) or cfg.get("lora_alpha") != cfg.get("r"):
        raise PackError(f"{folder / ADAPTER_CONFIG_FILE} was changed: fan_in_fan_out or lora_alpha != r")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PackError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def _read_json(path: Path, *, hint: str) -> Any:
    if not path.is_file():
        raise PackError(f"{path} is missing: {hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from None


def _read_requests(path: Path) -> list[EditRequest]:
    if not path.is_file():
        raise PackError(f"{path} is missing")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(EditRequest(**json.loads(line)))
        except (json.JSONDecodeError, TypeError, MemitError) as e:
            raise PackError(f"{path}, line {i}: not a valid edit request ({e})") from None
    return out
