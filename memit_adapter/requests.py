"""Edit requests: the facts ``(subject, relation prompt, new object)`` to write into a model.

Usage::

    req = EditRequest("{} plays the sport of", "Michael Jordan", " baseball", target_true=" basketball")
    req.text                      # 'Michael Jordan plays the sport of'
    reqs = [EditRequest.from_dict(r) for r in counterfact_records]
    check_requests(reqs)          # raises on malformed or conflicting requests
    reqs = load_requests("edits.jsonl")   # .jsonl / .json (EditRequest fields or CounterFact records) / .csv
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConflictingRequestsError, InvalidRequestError
from .tokens import fill


@dataclass(frozen=True)
class EditRequest:
    """One fact to write. ``prompt`` holds exactly one ``{}`` where ``subject`` goes.

    ``relation_id`` (CounterFact's, e.g. ``"P17"``) names the relation the prompt asks about; requests
    that carry it let the target-vector step keep the subject's other relations (``preserve_factor``).

    ``subject_token``: which of the subject's tokens carries the edit, counted from its end (-1: the last, where
    the published method writes; -2: the one before it; past the first it means the first). None lets the config
    decide (``MemitConfig.edit_token``); a pack stores the token its edit was written at.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    relation_id: str | None = None
    subject_token: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise InvalidRequestError(
                f"prompt must contain exactly one '{{}}' where the subject goes, got {self.prompt!r}"
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise InvalidRequestError(f"subject must be a non-empty string, got {self.subject!r}")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise InvalidRequestError(f"target_new must be a non-empty string (request for {self.subject!r})")
        if self.relation_id is not None and not isinstance(self.relation_id, str):
            raise InvalidRequestError(f"relation_id must be a string or None, got {type(self.relation_id).__name__}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise InvalidRequestError(f"target_true must be a string or None, got {type(self.target_true).__name__}")
        token = self.subject_token
        if token is not None and (not isinstance(token, int) or isinstance(token, bool) or token >= 0):
            raise InvalidRequestError(f"subject_token must be None or a negative int (-1: the subject's last token), "
                                      f"got {token!r}")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in (braces elsewhere in the prompt or subject kept as they are)."""
        return fill(self.prompt, self.subject)[0]

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EditRequest:
        """Build from a flat dict, a CounterFact record (``requested_rewrite``) or a MEMIT request dict.

        Targets may be strings or ``{"str": ...}`` dicts. A prompt that already contains the subject
        instead of ``{}`` (seen in some exports) is turned into a template.
        """
        if not isinstance(record, Mapping):
            raise InvalidRequestError(f"expected a mapping, got {type(record).__name__}")
        rw = record.get("requested_rewrite", record)
        if isinstance(rw, list):  # multi_counterfact may hold a list of rewrites
            if len(rw) != 1:
                raise InvalidRequestError("record holds several rewrites; split it with requests_from_records")
            rw = rw[0]
        if not isinstance(rw, Mapping):
            raise InvalidRequestError(f"requested_rewrite must be a mapping, got {type(rw).__name__}: {rw!r:.80}")
        try:
            prompt, subject, target_new = rw["prompt"], rw["subject"], _target_str(rw["target_new"])
        except KeyError as e:
            raise InvalidRequestError(f"request record lacks field {e.args[0]!r}: {dict(rw)}") from None
        if "{}" not in prompt and subject in prompt:
            prompt = prompt.replace(subject, "{}", 1)
        target_true = rw.get("target_true")
        return cls(prompt=prompt, subject=subject, target_new=target_new,
                   target_true=None if target_true is None else _target_str(target_true),
                   case_id=record.get("case_id", rw.get("case_id")),
                   relation_id=None if rw.get("relation_id") is None else str(rw["relation_id"]),
                   subject_token=rw.get("subject_token"))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``relation_id`` and ``subject_token`` only when set, so packs written before them
        keep their ids."""
        out = asdict(self)
        for name in ("relation_id", "subject_token"):
            if out[name] is None:
                del out[name]
        return out


def _csv_row(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row's fields, ``subject_token`` as the integer it spells (left as text, and refused, when it is not)."""
    token = row.get("subject_token")
    if token is not None and token.strip().lstrip("-").isdigit():
        row["subject_token"] = int(token)
    return row


def _target_str(target: Any) -> str:
    if isinstance(target, Mapping):
        if "str" not in target:
            raise InvalidRequestError(f"target dict must have a 'str' field, got {dict(target)}")
        target = target["str"]
    if not isinstance(target, str):
        raise InvalidRequestError(f"target must be a string, got {type(target).__name__}")
    return target


def as_requests(requests: Iterable[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
    """Accept ``EditRequest``s or dicts; return a list of ``EditRequest``."""
    return [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in requests]


def find_conflicts(requests: Iterable[EditRequest]) -> list[tuple[EditRequest, EditRequest]]:
    """Pairs of requests with the same subject and prompt but different new targets (paper eqn. 5)."""
    seen: dict[tuple[str, str], EditRequest] = {}
    conflicts = []
    for req in requests:
        key = (req.subject.strip(), req.prompt.strip())
        other = seen.setdefault(key, req)
        if other.target_new.strip() != req.target_new.strip():
            conflicts.append((other, req))
    return conflicts


def check_requests(requests: list[EditRequest]) -> None:
    """Raise :class:`InvalidRequestError` on an empty batch, :class:`ConflictingRequestsError` on eqn. 5."""
    if not requests:
        raise InvalidRequestError("no edit requests given; pass at least one EditRequest")
    conflicts = find_conflicts(requests)
    if conflicts:
        shown = "; ".join(
            f"{a.text!r} -> {a.target_new!r} vs {b.target_new!r}" for a, b in conflicts[:5]
        )
        raise ConflictingRequestsError(
            f"{len(conflicts)} conflicting request pair(s) (same subject and prompt, different targets): {shown}"
        )


def check_keep(keep: Sequence[str] | None, requests: Sequence[EditRequest]) -> list[str]:
    """``keep`` (facts to keep: None or a list of prompts) as a list of distinct prompts, less those that name a
    subject of ``requests`` (a substring match on the subject), with a warning saying how many were left out: in a
    causal model such a prompt reads the subject's key, the one its edit must change (an edited subject's other facts
    are ``MemitConfig.preserve_factor``'s to keep). :class:`InvalidRequestError` for a single string or an item that is
    not a non-empty string."""
    if keep is None:
        return []
    if isinstance(keep, str):
        raise InvalidRequestError("keep must be a list of prompts, not one string")
    keep = list(keep)
    bad = [p for p in keep if not isinstance(p, str) or not p.strip()]
    if bad:
        raise InvalidRequestError(f"keep prompts must be non-empty strings, got {bad[:3]!r}")
    keep = list(dict.fromkeys(keep))
    subjects = sorted({r.subject.strip() for r in requests}, key=len, reverse=True)
    if not subjects:
        return keep
    named = re.compile("|".join(map(re.escape, subjects)))
    about = [p for p in keep if named.search(p)]
    if not about:
        return keep
    warnings.warn(f"{len(about)} of {len(keep)} keep prompts name a subject being edited (e.g. {about[0]!r}) and "
                  "are left out: that subject's key is the one its edit writes (preserve_factor keeps its other "
                  "facts)", stacklevel=3)
    left_out = set(about)
    return [p for p in keep if p not in left_out]


def load_requests(path: str | os.PathLike) -> list[EditRequest]:
    """Read edit requests from a file, checked (:func:`check_requests`) before any model is involved.

    ``.jsonl``: one JSON object a line; ``.json``: a list of objects (or one); each object holds the fields of
    :class:`EditRequest` or is a CounterFact record (``requested_rewrite``). ``.csv``: a header row naming
    ``prompt``, ``subject``, ``target_new`` and optionally ``target_true``, ``case_id``, ``relation_id``,
    ``subject_token`` (an integer such as ``-2``).
    Raises :class:`InvalidRequestError` naming the file and the line or record at fault; ``FileNotFoundError``.
    """
    requests = _read_requests(path, "requests must be")
    check_requests(requests)
    return requests


def _read_requests(path: str | os.PathLike, what: str) -> list[EditRequest]:
    """The requests of a .jsonl / .json / .csv file (see :func:`load_requests`), unchecked for conflicts; ``what``
    begins the message for a file of another kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no requests file at {path}")
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".json", ".csv"):
        raise InvalidRequestError(f"{path.name}: {what} a .jsonl, .json or .csv file")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[str, Any]] = []
    if kind == ".csv":
        reader = csv.DictReader(text.splitlines())
        known = {f.name for f in fields(EditRequest)}
        missing = {"prompt", "subject", "target_new"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidRequestError(f"{path.name}: the header lacks column(s) {sorted(missing)}")
        rows = [(f"line {i}", _csv_row({k: v for k, v in row.items() if k in known and v not in (None, "")}))
                for i, row in enumerate(reader, start=2)]
    elif kind == ".jsonl":
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append((f"line {i}", _json(line, f"{path.name}, line {i}")))
    else:
        data = _json(text, path.name)
        rows = [(f"record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data])]
    requests = []
    for where, row in rows:
        try:
            requests.append(EditRequest.from_dict(row))
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{path.name}, {where}: {e}") from None
    return requests


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file, e.g. facts to keep (``keep`` of :func:`~memit_adapter.engine.compute_edits`): ``.txt``,
    one prompt a line (blank lines skipped); ``.jsonl`` / ``.json`` / ``.csv``: requests or CounterFact records as
    :func:`load_requests` reads them (their targets may disagree), their prompts filled with their subjects. Raises
    :class:`InvalidRequestError` for a file that holds none; ``FileNotFoundError``."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        prompts = [r.text for r in _read_requests(path, "prompts must be a .txt file, or")]
    elif not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InvalidRequestError(f"{path.name}: no prompts in the file")
    return prompts


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{where}: not JSON ({e})") from None
