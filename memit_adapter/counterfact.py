"""Read CounterFact-format records: the real ``counterfact.json`` / ``multi_counterfact.json``, or any file like them.

Usage::

    records = load_counterfact("counterfact.json", n=1000)    # list of dicts, checked and normalised
    records[0]["requested_rewrite"]["target_new"]["str"]       # 'English'
    requests = [EditRequest.from_dict(r) for r in records]

A record has ``case_id``, ``requested_rewrite`` {``prompt`` with one ``{}``, ``subject``, ``relation_id``,
``target_new`` {``str``}, ``target_true`` {``str``}}, ``paraphrase_prompts``, ``neighborhood_prompts`` and
``generation_prompts`` (lists of full prompts). Nothing is downloaded: the files are read from disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError

__all__ = ["PROMPT_FIELDS", "load_counterfact", "normalize_record", "normalize_records"]

PROMPT_FIELDS = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")


def load_counterfact(path: str | Path, *, n: int | None = None) -> list[dict[str, Any]]:
    """Read a JSON list (or JSON-lines file) of CounterFact records; keep the first ``n``; normalise each.

    Raises :class:`InvalidRequestError` naming the record and the field when a record is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CounterFact file at {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    elif stripped.startswith("{") and "\n" in stripped.strip():
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        data = data if isinstance(data, list) else [data]
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        data = data[:n]
    return normalize_records(data, source=str(path.name))


def normalize_records(records: Iterable[Mapping[str, Any]], *, source: str = "records") -> list[dict[str, Any]]:
    """:func:`normalize_record` over ``records``; a missing ``case_id`` becomes the position."""
    out = []
    for i, record in enumerate(records):
        try:
            rec = normalize_record(record)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{source}, record {i}: {e}") from None
        if rec.get("case_id") is None:
            rec["case_id"] = i
        out.append(rec)
    return out


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with targets as ``{"str": ...}``, a ``{}`` prompt and list-valued prompt fields.

    A ``requested_rewrite`` given as a one-element list (some multi-edit exports) is unwrapped; a
    prompt that holds the subject instead of ``{}`` is turned into a template.
    """
    if not isinstance(record, Mapping):
        raise InvalidRequestError(f"a record must be a JSON object, got {type(record).__name__}")
    if "requested_rewrite" not in record:
        raise InvalidRequestError(f"record lacks 'requested_rewrite'; has {sorted(record)}")
    rw = record["requested_rewrite"]
    if isinstance(rw, list):
        if len(rw) != 1:
            raise InvalidRequestError(f"requested_rewrite holds {len(rw)} rewrites; give one rewrite per record")
        rw = rw[0]
    if not isinstance(rw, Mapping):
        raise InvalidRequestError(f"requested_rewrite must be an object, got {type(rw).__name__}")
    for key in ("prompt", "subject", "target_new", "target_true"):
        if key not in rw:
            raise InvalidRequestError(f"requested_rewrite lacks {key!r}")
    prompt, subject = rw["prompt"], rw["subject"]
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject:
        raise InvalidRequestError(f"prompt and subject must be strings, got {prompt!r} and {subject!r}")
    if "{}" not in prompt and subject in prompt:
        prompt = prompt.replace(subject, "{}", 1)
    if prompt.count("{}") != 1:
        raise InvalidRequestError(f"prompt must hold exactly one '{{}}' where the subject goes, got {prompt!r}")
    out = dict(record)
    out["requested_rewrite"] = {**rw, "prompt": prompt, "target_new": _target(rw["target_new"]),
                                "target_true": _target(rw["target_true"])}
    for key in PROMPT_FIELDS:
        value = record.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise InvalidRequestError(f"{key} must be a list of strings")
        out[key] = list(value)
    return out


def _target(target: Any) -> dict[str, Any]:
    if isinstance(target, str):
        target = {"str": target}
    if not isinstance(target, Mapping) or not isinstance(target.get("str"), str) or not target["str"].strip():
        raise InvalidRequestError(f"a target must be a non-empty string or {{'str': ...}}, got {target!r}")
    return dict(target)
