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

Writes are atomic: a new folder is built beside the target and renamed into place; into an existing
folder each file is replaced atomically and ``edit_pack.json``, written last, records the SHA-256 of
the weights file, so a mixed or damaged set is detected on load. Loading reads safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import MemitConfig
from .errors import MemitError, PackError
from .pack import EditPack, LayerDelta
from .requests import EditRequest

FORMAT_NAME = "memit_adapter.edit_pack"
FORMAT_VERSION = 1
METADATA_FILE = "edit_pack.json"
REQUESTS_FILE = "requests.jsonl"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
DENSE_WEIGHTS_FILE = "edit_deltas.safetensors"
CARD_FILE = "README.md"
PACK_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, DENSE_WEIGHTS_FILE, REQUESTS_FILE, CARD_FILE, METADATA_FILE)
_PEFT_PREFIX = "base_model.model."
_CARD_ROWS = 50


# -- writing ----------------------------------------------------------------------------------------
def save_pack(pack: EditPack, save_directory: str | os.PathLike, *, dense_file: bool = False,
              card: bool = True) -> Path:
    """Write ``pack`` to ``save_directory`` atomically; returns the folder.

    ``dense_file=True`` writes ``edit_deltas.safetensors`` (each delta as held: dense matrices or
    ``B``/``A``) instead of ``adapter_config.json`` + ``adapter_model.safetensors``: smaller when a pack
    has more edits than ``d_in·d_out/(d_in + d_out)``, but loadable only by ``EditPack.from_pretrained``.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise PackError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        written = _write_files(pack, tmp, dense_file=dense_file, card=card)
        if not target.exists() or not any(target.iterdir()):
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)  # the whole folder appears at once
            return target
        for name in written:  # the sidecar last: it vouches for the weights file by hash
            os.replace(tmp / name, target / name)
        for stale in set(PACK_FILES) - set(written):
            (target / stale).unlink(missing_ok=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_files(pack: EditPack, folder: Path, *, dense_file: bool, card: bool) -> list[str]:
    if dense_file:
        weights_file, tensors = DENSE_WEIGHTS_FILE, _native_tensors(pack)
        files = [weights_file]
    else:
        weights_file, tensors = ADAPTER_WEIGHTS_FILE, _peft_tensors(pack)
        _write_json(folder / ADAPTER_CONFIG_FILE, peft_config_dict(pack))
        files = [ADAPTER_CONFIG_FILE, weights_file]
    save_file(tensors, str(folder / weights_file),
              metadata={"format": "pt", "memit_adapter_format": str(FORMAT_VERSION), "pack_id": pack.pack_id})
    _fsync(folder / weights_file)
    with open(folder / REQUESTS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in pack.requests)
    files.append(REQUESTS_FILE)
    if card:
        (folder / CARD_FILE).write_text(render_card(pack), encoding="utf-8")
        files.append(CARD_FILE)
    meta = metadata_dict(pack, weights_file=weights_file, weights_sha256=_sha256(folder / weights_file))
    _write_json(folder / METADATA_FILE, meta)
    return files + [METADATA_FILE]


def peft_config_dict(pack: EditPack) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter with scaling 1, per-module ranks, full module names."""
    ranks = {name: _lora_rank(d) for name, d in pack.deltas.items()}
    r = max(set(ranks.values()), key=lambda k: (list(ranks.values()).count(k), k))  # the most common rank
    pattern = {name: k for name, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": pack.base_model,
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
        "config": pack.config.to_dict(),
        "modules": {name: {"dense": d.is_dense, "rank": d.rank, "shape": list(d.shape), "dtype": _dtype_name(d.dtype)}
                    for name, d in pack.deltas.items()},
        "weights_file": weights_file,
        "weights_sha256": weights_sha256,
    }


def _lora_rank(d: LayerDelta) -> int:
    return min(d.shape) if d.is_dense else d.rank


def _peft_tensors(pack: EditPack) -> dict[str, torch.Tensor]:
    out = {}
    for name, d in pack.deltas.items():
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
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- model card -------------------------------------------------------------------------------------
def render_card(pack: EditPack) -> str:
    """The README.md: Hub front matter (``base_model``, ``library_name: peft``, tags), the edits, the metrics."""
    template = Template(resources.files("memit_adapter").joinpath("cards", "edit_pack.md").read_text("utf-8"))
    base = pack.base_model
    front = [f"base_model: {base}"] if base else []
    tags = ["memit", "knowledge-editing", "lora"] + ([f"base_model:adapter:{base}"] if base else [])
    front += ["library_name: peft", "tags:"] + [f"- {t}" for t in tags]
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
        lambda_=pack.config.mom2_update_weight,
        library_version=__version__,
        repo_hint=base or "BASE_MODEL_ID",
    )


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
    if _sha256(path) != meta["weights_sha256"]:
        raise PackError(f"{path} does not match the hash recorded in {METADATA_FILE}: the file is damaged, or "
                        "comes from another save. Save the pack again.")
    tensors = _read_safetensors(path)
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
    pack = EditPack(deltas=deltas, requests=requests, config=MemitConfig.from_dict(meta["config"]),
                    model_type=meta["model_type"], fan_in_fan_out=bool(meta["fan_in_fan_out"]),
                    base_model=meta["base_model"], revision=meta["revision"], fingerprint=meta["fingerprint"],
                    parents=list(meta["parents"]), metrics=dict(meta["metrics"]),
                    representation=meta["representation"])
    pack.deltas.update(deltas)  # "auto" could re-choose; keep what was saved
    return pack


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
