"""Edit packs on the Hugging Face Hub: push a saved pack as one commit, load by repo id and revision.

Usage::

    push_pack(pack, "user/facts", subfolder="2024-batch-1", private=True)   # several packs per repo
    pack = load_pack("user/facts", subfolder="2024-batch-1", revision="v1")
    pack = load_pack("./local-folder")

    # inference code without memit_adapter:
    model.load_adapter("user/facts", adapter_kwargs={"revision": "v1", "subfolder": "2024-batch-1"})

Network access happens only in these two functions. ``huggingface_hub`` reads ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and its cache location when it is imported; loading with ``HF_HUB_OFFLINE=1``
(or ``local_files_only=True``) reads the files from the cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import PackError
from .pack import EditPack
from .persistence import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    DENSE_WEIGHTS_FILE,
    METADATA_FILE,
    PACK_FILES,
    REQUESTS_FILE,
    TARGETS_FILE,
    load_pack_dir,
    save_pack,
)


def load_pack(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
              token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
              local_files_only: bool = False, endpoint: str | None = None) -> EditPack:
    """An :class:`EditPack` from a local folder or from a Hub model repo (``revision``: branch, tag or commit).

    ``endpoint`` overrides ``HF_ENDPOINT`` (a private Hub mirror).
    """
    local = Path(path_or_repo_id) / (subfolder or "")
    if local.is_dir():
        return load_pack_dir(local)
    if os.path.isabs(str(path_or_repo_id)) or str(path_or_repo_id).startswith("."):
        raise PackError(f"no edit pack folder at {local}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    def fetch(filename: str) -> Path:
        try:
            return Path(hf_hub_download(str(path_or_repo_id), filename, subfolder=subfolder, revision=revision,
                                        token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                                        endpoint=endpoint))
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            where = f"{path_or_repo_id}" + (f"/{subfolder}" if subfolder else "") + f" @ {revision or 'main'}"
            raise PackError(f"{filename} not found in {where}: not an edit pack, or not in the cache "
                            f"when offline ({type(e).__name__})") from None
        except HfHubHTTPError as e:
            raise PackError(f"could not download {filename} from {path_or_repo_id}: {e}") from None

    meta_path = fetch(METADATA_FILE)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        weights_file, targets_file = meta["weights_file"], meta.get("targets_file")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        weights_file = targets_file = None  # load_pack_dir reports the damaged sidecar
    wanted = [REQUESTS_FILE] + ([weights_file] if weights_file in (ADAPTER_WEIGHTS_FILE, DENSE_WEIGHTS_FILE) else [])
    if weights_file == ADAPTER_WEIGHTS_FILE:
        wanted.append(ADAPTER_CONFIG_FILE)
    if targets_file == TARGETS_FILE:
        wanted.append(TARGETS_FILE)
    for name in wanted:
        fetch(name)
    # all files of one revision sit in one snapshot folder; the sidecar's hash of the weights catches a
    # branch that moved between downloads
    return load_pack_dir(meta_path.parent)


def push_pack(pack: EditPack, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
              revision: str | None = None, commit_message: str | None = None, token: str | bool | None = None,
              create_pr: bool = False, dense_file: bool = False, endpoint: str | None = None) -> Any:
    """Save ``pack`` and upload the folder to ``repo_id`` (created if needed) as one commit; returns its info.

    Uses ``HfApi.upload_folder`` rather than PEFT's ``push_to_hub``, which would replace our model card.
    ``subfolder`` keeps several packs in one repo; files of an earlier pack in the same place are replaced.
    ``revision`` names a branch, created from the default branch if it does not exist.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token, endpoint=endpoint)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memit-push-") as tmp:
        folder = save_pack(pack, Path(tmp) / "pack", dense_file=dense_file, repo_id=repo_id, subfolder=subfolder)
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), path_in_repo=subfolder or None, revision=revision,
            commit_message=commit_message or f"Add MEMIT edit pack ({len(pack.requests)} edits)",
            delete_patterns=[f for f in PACK_FILES if not (folder / f).exists()], create_pr=create_pr,
        )

