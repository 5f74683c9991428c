"""Step 2 of MEMIT: the target vectors ``z_i = h_i + δ_i``, all requests of a batch optimised together.

Usage::

    templates = context_templates(model, tok, cfg)        # ["{}", "The ... . {}", ...], seeded
    zs, h = compute_targets(model, tok, requests, templates, cfg, layer=max(cfg.layers))   # (n, d_model) each

Requests about different subjects are independent: each has its own row of ``δ``, its own loss, norm
clamp and early stop, and Adam is element-wise, so optimising them together gives the same ``δ`` as one
at a time. Requests about the same subject share one row (``config.share_subject_delta``): in a causal
model their keys at the subject's edit token are the same vector when the text before the subject is
the same, so one key cannot be asked for two different ``z``; the shared ``δ`` minimises the mean of
their losses instead, and then every one of them asks for the same change.

A step runs only what δ changes. δ is added at the subject's edit token (its last, unless the request's
``subject_token`` says otherwise), so in a causal model no state before it moves: those prefixes are run once
and their attention keys and values cached, and each step runs the rest of the row (from the edit token on:
the prompt after the subject, the target) through the blocks after layer L on that cache. With
the sampled context templates most of a row is prefix: :func:`tokens_per_step` counts both (20 requests of
CounterFact-like shapes on a word-level tokenizer: a step runs 9-35% of the token positions of whole rows).
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from .arch import ArchSpec
from .config import MemitConfig
from .devices import input_device
from .distributed import gather_rows, is_main, rank, shard, world_size
from .errors import MemitError
from .modes import evaluating
from .requests import EditRequest
from .tokens import EncodedFact, encode_fact, pad_id, pad_right

KL_PROMPT = "{} is a"

logger = logging.getLogger(__name__)


def context_templates(model: nn.Module, tokenizer, config: MemitConfig) -> list[str]:
    """``["{}"]`` followed by one prefix sampled from the model per start word (top-k, seeded), as
    ``prefix + ". {}"``; the config's own ``context_templates`` when given."""
    if config.context_templates is not None:
        return list(config.context_templates)
    device = input_device(model)
    templates = ["{}"]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        for start in config.context_template_starts:
            ids = torch.tensor([tokenizer(start)["input_ids"]], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  top_k=config.context_template_top_k, top_p=1.0, temperature=1.0,
                                  max_new_tokens=config.context_template_length, min_new_tokens=1,
                                  pad_token_id=pad_id(tokenizer))
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


@dataclass
class _Batch:
    """The padded prompts of a chunk of requests: ``len(templates)`` rewrite rows per request, then the KL
    rows (one "{subject} is a" row per request, then the preservation prompts of the subjects)."""

    input_ids: torch.Tensor  # (rows, seq)
    attention_mask: torch.Tensor  # (rows, seq)
    row_request: torch.Tensor  # (rows,) request index of each row
    lookup: torch.Tensor  # (rows,) the subject's edit token (EncodedFact.lookup)
    kl_pos: torch.Tensor  # (rows,) position whose next-token distribution a KL row keeps (0 on rewrite rows)
    kl_weight: torch.Tensor  # (rows,) weight of that KL term (0 on rewrite rows)
    target_rows: torch.Tensor  # (m,) row of each target token
    target_pos: torch.Tensor  # (m,) position predicting it
    target_ids: torch.Tensor  # (m,)
    target_weight: torch.Tensor  # (m,) 1 / (n_templates * target_len) of its request
    n_requests: int
    n_rewrite_rows: int

    @property
    def first_kept_row(self) -> int:
        """The first row of the kept prompts (after the rewrite rows and one KL row per request)."""
        return self.n_rewrite_rows + self.n_requests

    def subset(self, requests: torch.Tensor, kept: bool = True) -> tuple[_Batch, torch.Tensor]:
        """The rows of ``requests`` (ascending indices), without the kept prompts' unless ``kept``, trimmed to their
        longest row; and those rows' indices."""
        keep = torch.isin(self.row_request, requests)
        if not kept:
            keep[self.first_kept_row:] = False
        rows = keep.nonzero()[:, 0]  # rewrite rows first, then KL rows, as in self
        new_row = torch.full_like(self.row_request, -1)
        new_row[rows] = torch.arange(len(rows), device=rows.device)
        new_req = torch.full((self.n_requests,), -1, dtype=torch.long, device=rows.device)
        new_req[requests] = torch.arange(len(requests), device=rows.device)
        t_keep = keep[self.target_rows]
        width = int(self.attention_mask[rows].sum(1).max())
        sub = _Batch(self.input_ids[rows, :width], self.attention_mask[rows, :width], new_req[self.row_request[rows]],
                     self.lookup[rows], self.kl_pos[rows], self.kl_weight[rows], new_row[self.target_rows[t_keep]],
                     self.target_pos[t_keep], self.target_ids[t_keep], self.target_weight[t_keep], len(requests),
                     int((rows < self.n_rewrite_rows).sum()))
        return sub, rows


@dataclass(frozen=True)
class _Kept:
    """A preservation prompt of a subject: its template, KL weight, and the first tokens of the subject's
    old answers (a prompt the unedited model answers with one of them is dropped)."""

    template: str
    weight: float
    forbidden: frozenset[int]


def _build_batch(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], device,
                 kl_factor: float = 0.0, kept: Sequence[Sequence[_Kept]] | None = None) -> _Batch:
    facts: list[EncodedFact] = []
    rows_req: list[int] = []
    kl_pos: list[int] = []
    kl_weight: list[float] = []
    for i, req in enumerate(requests):
        for t in templates:
            facts.append(encode_fact(tokenizer, t.replace("{}", req.prompt), req.subject, req.target_new,
                                     req.subject_token))
            rows_req.append(i)
    n_rewrite = len(facts)
    kl_pos += [0] * n_rewrite
    kl_weight += [0.0] * n_rewrite
    for i, req in enumerate(requests):  # the essence: the edited subject token of "{subject} is a"
        facts.append(encode_fact(tokenizer, KL_PROMPT, req.subject, subject_token=req.subject_token))
        rows_req.append(i)
        kl_pos.append(facts[-1].lookup)
        kl_weight.append(kl_factor)
    for i, req in enumerate(kept or [[] for _ in requests]):  # other relations: the answer position
        for k in req:
            facts.append(encode_fact(tokenizer, k.template, requests[i].subject,
                                     subject_token=requests[i].subject_token))
            rows_req.append(i)
            kl_pos.append(facts[-1].n_prompt - 1)
            kl_weight.append(k.weight)
    # the last target token is never an input: drop it (it only has to be predicted)
    seqs = [f.ids[:-1] if r < n_rewrite else f.ids for r, f in enumerate(facts)]
    ids, mask = pad_right(seqs, pad_id(tokenizer), device)
    t_rows, t_pos, t_ids, t_w = [], [], [], []
    for r, f in enumerate(facts[:n_rewrite]):
        w = 1.0 / (len(templates) * len(f.target_ids))
        for pos, tid in zip(f.target_positions, f.target_ids):
            t_rows.append(r)
            t_pos.append(pos)
            t_ids.append(tid)
            t_w.append(w)
    as_t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return _Batch(ids, mask, as_t(rows_req), as_t([f.lookup for f in facts]), as_t(kl_pos),
                  as_t(kl_weight, torch.float32), as_t(t_rows), as_t(t_pos), as_t(t_ids),
                  as_t(t_w, torch.float32), len(requests), n_rewrite)


def relation_templates(requests: Sequence[EditRequest]) -> dict[str, str]:
    """The first prompt template of every ``relation_id`` among ``requests``, in order of appearance."""
    out: dict[str, str] = {}
    for r in requests:
        if r.relation_id is not None:
            out.setdefault(r.relation_id, r.prompt)
    return out


def kept_prompts(tokenizer, requests: Sequence[EditRequest], groups: Sequence[int], relations: Mapping[str, str],
                 factor: float, max_relations: int | None = None, seed: int = 0) -> list[list[_Kept]]:
    """The preservation prompts of each request: held by the first request of each δ row, one per relation of
    ``relations`` that no request about the row's subject edits (at most ``max_relations`` of them, drawn with a
    generator seeded by ``seed`` and the subject, kept in order), weighted ``factor * row size / count`` so that the
    row's mean loss carries ``factor`` times their mean KL. Rows whose subject has a request lacking
    ``relation_id`` get none (its relation is unknown, so a kept prompt might ask about the fact being rewritten)."""
    out: list[list[_Kept]] = [[] for _ in requests]
    if factor == 0 or not relations:
        return out
    members: dict[int, list[int]] = {}
    edited_of: dict[str, set[str | None]] = {}  # all relations a subject's requests edit, across rows
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
        edited_of.setdefault(requests[i].subject, set()).add(requests[i].relation_id)
    for idx in members.values():
        reqs = [requests[i] for i in idx]
        edited = set().union(*(edited_of[r.subject] for r in reqs))
        if None in edited:
            continue
        templates = [t for rid, t in relations.items() if rid not in edited]
        if max_relations is not None and len(templates) > max_relations:
            drawn = set(random.Random(f"{seed}-{reqs[0].subject}").sample(range(len(templates)), max_relations))
            templates = [t for i, t in enumerate(templates) if i in drawn]
        if not templates:
            continue
        forbidden = frozenset(ids[0] for r in reqs if r.target_true
                              for ids in [tokenizer(r.target_true, add_special_tokens=False)["input_ids"]] if ids)
        w = factor * len(idx) / len(templates)
        out[idx[0]] = [_Kept(t, w, forbidden) for t in templates]
    return out


class _Head:
    """The LM head in float32: logits of selected final states ``(m, d_model)`` -> ``(m, vocab)``, softcapped where
    the model does. A half-precision ``nn.Linear`` head is copied to float32 once (``vocab x d_model x 4`` bytes), so
    that the loss sees logits rounded once, in float32, not to the model's dtype first (bf16 keeps 8 bits: a
    logit of 20 would move by up to 0.08, more than the 0.05 loss at which a request stops)."""

    def __init__(self, model: nn.Module):
        self.module = model.get_output_embeddings()
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        weight = getattr(self.module, "weight", None)
        self.linear = isinstance(self.module, nn.Linear) and weight is not None and weight.device.type != "meta"
        if self.linear:  # a float32 weight is used as it is, without a copy
            self.weight = weight.detach().float()
            self.bias = None if self.module.bias is None else self.module.bias.detach().float()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.linear:
            logits = F.linear(hidden.to(self.weight.device).float(), self.weight, self.bias).to(hidden.device)
        else:  # e.g. a head whose weight an offloading hook brings in: its own forward, in its dtype
            logits = self.module(hidden).float().to(hidden.device)
        return torch.tanh(logits / self.cap) * self.cap if self.cap else logits


@dataclass
class _Part:
    """Rows of a batch cut at their lookups, so that a step runs only the states δ changes.

    δ is added at each row's lookup, and in a causal model no state before it depends on it: the prefix
    (the tokens before the lookup) is run once and its keys and values are kept; a step runs the suffix (the
    lookup onwards) on them. Prefixes are left-padded to ``P`` columns, suffixes right-padded to ``S``, so
    every row's lookup is suffix column 0 and a row's tokens stay contiguous (attention sees the distances of
    the unpadded row); ``positions`` are each row's own.
    """

    prefix_mask: torch.Tensor  # (rows, P)
    ids: torch.Tensor  # (rows, S) the suffix
    mask: torch.Tensor  # (rows, S)
    positions: torch.Tensor  # (rows, S)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, the prefix's keys and values (rows, heads, P, head_dim)
    block_out: torch.Tensor | None = None  # (rows, S, d_model) block L's output on the suffix, without δ
    rows: torch.Tensor | None = None  # (rows,) the row of the batch each of the part's rows is

    def select(self, rows: torch.Tensor, batch_rows: torch.Tensor) -> _Part:
        """The part of ``rows`` (indices into this part), trimmed to their longest prefix and suffix, whose rows
        are ``batch_rows`` of a (sub-)batch."""
        width, s = self.prefix_mask.shape[1], int(self.mask[rows].sum(1).max())
        first = width - int(self.prefix_mask[rows].sum(1).max())
        if len(rows) == len(self.ids) and first == 0 and s == self.ids.shape[1]:
            return replace(self, rows=batch_rows)
        at = rows.tolist()
        if at == list(range(at[0], at[0] + len(at))):  # a run of rows (those without kept prompts): views, no copies
            rows = slice(at[0], at[0] + len(at))
        on = lambda t: rows if isinstance(rows, slice) else rows.to(t.device)  # noqa: E731  (the layer's device)
        kv = [(k[on(k), :, first:], v[on(v), :, first:]) for k, v in self.kv]
        out = None if self.block_out is None else self.block_out[on(self.block_out), :s]
        return _Part(self.prefix_mask[rows, first:], self.ids[rows, :s], self.mask[rows, :s], self.positions[rows, :s],
                     kv, out, batch_rows)


def _cut(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, lookup: torch.Tensor) -> _Part:
    """Cut right-padded rows at ``lookup`` and run their prefixes (the :class:`_Part` without ``block_out``)."""
    length = attention_mask.sum(1)
    width, s = int(lookup.max()), int((length - lookup).max())
    pos = lookup[:, None] + torch.arange(-width, s, device=lookup.device)  # (rows, P + S) token of each column
    real = (pos >= 0) & (pos < length[:, None])
    pos = torch.where(real, pos, 0)
    ids, mask = input_ids.gather(1, pos), real.long()
    kv = _prefix_kv(model, ids[:, :width], mask[:, :width], pos[:, :width]) if width else []
    return _Part(mask[:, :width], ids[:, width:], mask[:, width:], pos[:, width:], kv)


def _prefix_kv(model, input_ids, attention_mask, positions) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values of left-padded prefixes ``(rows, heads, P, head_dim)``. The rows run in groups
    of similar prefix length (:func:`length_buckets`), each at its own width: a batch mixes prefixes of a context
    template and the subject (a dozen tokens or more) with those of the subject alone ("{subject} is a", the kept
    prompts), and one pass at the longest width would run the short ones' padding through every block. Padding
    columns are zeroed: there a row without prefix tokens attends to nothing, which some attention kernels answer
    with NaN, and a NaN in a masked column would survive the mask (0 * NaN)."""
    lengths = attention_mask.sum(1).tolist()
    width = input_ids.shape[1]
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for rows in length_buckets(lengths):
        w = max(lengths[r] for r in rows)
        if w == 0:  # rows without a prefix keep zeros
            continue
        idx, cols = torch.tensor(rows, device=input_ids.device), slice(width - w, width)
        cache = DynamicCache()  # no config: every layer keeps all columns (a sliding window is left to the mask)
        model.base_model(input_ids=input_ids[idx, cols], attention_mask=attention_mask[idx, cols],
                         position_ids=positions[idx, cols], past_key_values=cache, use_cache=True)
        if not out:
            out = [(k.new_zeros(len(lengths), k.shape[1], width, k.shape[3]),
                    v.new_zeros(len(lengths), v.shape[1], width, v.shape[3]))
                   for k, v in ((layer.keys, layer.values) for layer in cache.layers)]
        keep = attention_mask[idx, cols].bool()[:, None, :, None]
        for (keys, values), layer in zip(out, cache.layers):  # each on its layer's device
            at, i = keep.to(layer.keys.device), idx.to(layer.keys.device)
            keys[i, :, cols] = torch.where(at, layer.keys, 0)
            values[i, :, cols] = torch.where(at, layer.values, 0)
    return out


class _Prefilled(DynamicLayer):
    """A cache layer that starts from given keys and values without copying them (``DynamicCache.update`` would
    concatenate them onto an empty tensor: a copy of every layer's prefix at every step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values


def _stub(t: torch.Tensor) -> torch.Tensor:
    """A stand-in for a layer's prefix keys or values ``(rows, heads, P, head_dim)`` that no step reads: zeros
    of shape ``(rows, 1, P, 1)`` held in one element, so that the cache still reports the prefix's length."""
    return t.new_zeros(()).expand(t.shape[0], 1, t.shape[2], 1)


def _drop_unread_kv(parts: Sequence[_Part], layer: int) -> None:
    """Replace the prefix keys and values of blocks ``0..layer`` by :func:`_stub`: a step stands in for those
    blocks (:func:`_replayed_blocks`), so only the later blocks' attention reads the cache."""
    for part in parts:
        part.kv = [(_stub(k), _stub(v)) if i <= layer else (k, v) for i, (k, v) in enumerate(part.kv)]


def _run_suffix(model, part: _Part) -> torch.Tensor:
    """Final hidden states ``(rows, S, d_model)`` of the suffixes, attending to their prefixes' keys and values, on
    the device of the suffixes' ids (the batch's: the final norm may run on another)."""
    cache = None
    if part.prefix_mask.shape[1]:  # a new cache each run: the suffix's keys and values are appended to it
        cache = Cache(layers=[_Prefilled(k, v) for k, v in part.kv])
    out = model.base_model(input_ids=part.ids, attention_mask=torch.cat([part.prefix_mask, part.mask], 1),
                           position_ids=part.positions, past_key_values=cache, use_cache=cache is not None)
    return (out[0] if isinstance(out, tuple) else out.last_hidden_state).to(part.ids.device)


class _StandIn(nn.Module):
    """Takes a block's place: returns ``output`` when given, else its input, as a tuple when blocks do."""

    def __init__(self, output: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.output, self.as_tuple = output, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states if self.output is None else self.output
        return (h, None) if self.as_tuple else h


@contextmanager
def _replayed_blocks(model: nn.Module, spec: ArchSpec, layer: int, output: torch.Tensor, as_tuple: bool
                     ) -> Iterator[None]:
    """Blocks ``0..layer`` are not run: stand-ins take their places in the block list, block ``layer``'s
    returning ``output`` and earlier ones passing their input on. The blocks are put back on exit, untouched
    (hooks on them, such as accelerate's, stay as they were)."""
    blocks = spec.blocks(model)
    originals = [blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            blocks[i] = _StandIn(output if i == layer else None, as_tuple)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


LENGTH_BUCKETS = 4  # at most this many groups of rows by length: the parts a batch is cut into, the prefix passes


def length_buckets(lengths: Sequence[int], k: int = LENGTH_BUCKETS) -> list[list[int]]:
    """Rows (indices into ``lengths``, their lengths: of suffixes or of prefixes) grouped into at most ``k`` groups,
    each holding every row of a range of consecutive lengths, chosen to run the fewest token positions (a group runs
    its rows x its longest; an exact search over the cuts between lengths). Groups from short to long."""
    sizes = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == v) for v in sizes]
    k, m = min(k, len(sizes)), len(sizes)
    if m == 0:
        return []
    # best[j][g]: fewest positions for the first j lengths in g groups; cut[j][g]: where its last group starts
    best = [[math.inf] * (k + 1) for _ in range(m + 1)]
    cut = [[0] * (k + 1) for _ in range(m + 1)]
    best[0][0] = 0
    for j in range(1, m + 1):
        for g in range(1, k + 1):
            for i in range(g - 1, j):
                cost = best[i][g - 1] + sum(count[i:j]) * sizes[j - 1]
                if cost < best[j][g]:
                    best[j][g], cut[j][g] = cost, i
    g = min(range(1, k + 1), key=lambda g: (best[m][g], g))
    bounds, j = [], m
    while g:
        bounds.append((cut[j][g], j))
        j, g = cut[j][g], g - 1
    return [[r for r, x in enumerate(lengths) if sizes[a] <= x <= sizes[b - 1]] for a, b in reversed(bounds)]


def _batch_parts(model, spec: ArchSpec, layer: int, batch: _Batch) -> tuple[list[_Part], torch.Tensor, bool]:
    """The rows of ``batch`` cut into parts of similar suffix length (:func:`length_buckets`), each padded only
    to its own widths, with block ``layer``'s output on their suffixes; the unedited final states of the
    suffixes ``(rows, S, d_model)`` in the batch's row order (column 0 = each row's lookup); and whether the
    blocks return tuples."""
    parts, finals, seen = [], [], []
    handle = spec.blocks(model)[layer].register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        for rows in _part_rows(batch):
            idx = torch.tensor(rows, device=batch.input_ids.device)
            part = _cut(model, batch.input_ids[idx], batch.attention_mask[idx], batch.lookup[idx])
            part.rows = idx
            finals.append(_run_suffix(model, part))
            out = seen[-1]
            part.block_out = out[0] if isinstance(out, tuple) else out
            parts.append(part)
    finally:
        handle.remove()
    _drop_unread_kv(parts, layer)
    return parts, _joined(finals, parts), isinstance(seen[-1], tuple)


def _part_rows(batch: _Batch) -> list[list[int]]:
    """The batch rows of each part a step runs: :func:`length_buckets` of the rows' suffix lengths."""
    return length_buckets((batch.attention_mask.sum(1) - batch.lookup).tolist())


def _joined(states: Sequence[torch.Tensor], parts: Sequence[_Part]) -> torch.Tensor:
    """States ``(part rows, S_part, ...)`` of ``parts`` as one tensor in the order of the rows they hold
    (``part.rows``, together every row once), right-padded to the widest."""
    width = max(f.shape[1] for f in states)
    stacked = torch.cat([F.pad(f, (0, 0, 0, width - f.shape[1])) for f in states])
    order = torch.cat([p.rows.to(stacked.device) for p in parts])
    return stacked[torch.argsort(order)]


def lookup_states(parts: Sequence[_Part]) -> torch.Tensor:
    """Block L's unedited output at every row's lookup ``(rows, d_model)``, in the rows' order."""
    return _joined([p.block_out[:, :1] for p in parts], parts)[:, 0]


def tokens_per_step(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str]) -> tuple[int, int]:
    """Token positions one step runs through the blocks after L when ``requests`` are optimised together (without
    kept prompts): ``(suffixes, full rows)``, rows x columns of the suffixes it runs (the parts of
    :func:`length_buckets`) and of the whole rows it would run without the cut (rewrite and KL rows each padded to
    their own longest)."""
    batch = _build_batch(tokenizer, requests, templates, "cpu")
    length = batch.attention_mask.sum(1)
    suffix = length - batch.lookup
    suffixes = sum(len(rows) * int(suffix[rows].max()) for rows in _part_rows(batch))
    full = sum((b - a) * int(length[a:b].max())
               for a, b in ((0, batch.n_rewrite_rows), (batch.n_rewrite_rows, len(length))) if b > a)
    return suffixes, full


def _select_parts(parts: Sequence[_Part], rows: torch.Tensor) -> list[_Part]:
    """The parts holding batch rows ``rows``, each cut down to those of them it holds and trimmed; a result's
    ``rows`` are positions in ``rows`` (together each once)."""
    where = {r: i for i, r in enumerate(rows.tolist())}
    out = []
    for part in parts:
        mine = [(j, where[r]) for j, r in enumerate(part.rows.tolist()) if r in where]
        if mine:
            local, at = (torch.tensor(x, device=rows.device) for x in zip(*mine))
            out.append(part.select(local, at))
    return out


def _forward_step(model, spec: ArchSpec, layer: int, parts: Sequence[_Part], row_delta: torch.Tensor,
                  as_tuple: bool) -> torch.Tensor:
    """Final states of the suffixes of ``parts``' rows, in the order of those rows, when block ``layer`` adds
    ``row_delta`` ``(rows, d_model)`` at their lookups: only blocks after ``layer`` run, on the suffixes.
    ``h + δ`` is summed in float32 and rounded to the model's dtype once."""
    finals = []
    for part in parts:
        d = row_delta[part.rows.to(row_delta.device)]
        at = (part.block_out[:, 0].float() + d.to(part.block_out.device)).to(part.block_out.dtype)
        out = torch.cat([at[:, None], part.block_out[:, 1:]], 1)
        with _replayed_blocks(model, spec, layer, out, as_tuple):
            finals.append(_run_suffix(model, part))
    return _joined(finals, parts)


def _losses(head: _Head, batch: _Batch, final, kl_init, delta, h_norm, config: MemitConfig, kept_part: bool):
    """Per-request loss ``(n,)`` in float32: NLL of the targets + the weighted KL rows + weight decay; the NLL; with
    ``config.v_stop_when_top`` how many of the request's target tokens (over its rewrite prompts) are not the most
    probable token (else None); and with ``kept_part`` the part of the loss that is the kept prompts' weighted KL
    (else None).

    ``final``: the final states of the rows' suffixes (column = position - lookup); ``kl_init``: the unedited
    log-probabilities of ``batch``'s KL rows, in order."""
    def per_request(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # each row's value, summed by request
        return torch.zeros(batch.n_requests, device=final.device).index_add(0, batch.row_request[rows], values)

    at_targets = final[batch.target_rows, batch.target_pos - batch.lookup[batch.target_rows]]
    logp = torch.log_softmax(head(at_targets), dim=-1)
    tok_nll = -logp.gather(1, batch.target_ids[:, None])[:, 0] * batch.target_weight
    nll = per_request(tok_nll, batch.target_rows)
    misses = None
    if config.v_stop_when_top:  # target tokens not (yet) the top answer; only MPES reads it
        misses = per_request((logp.detach().argmax(-1) != batch.target_ids).float(), batch.target_rows)
    kl_rows = torch.arange(batch.n_rewrite_rows, final.shape[0], device=final.device)
    at_kl = final[kl_rows, batch.kl_pos[kl_rows] - batch.lookup[kl_rows]]
    kl_logp = torch.log_softmax(head(at_kl), dim=-1)
    kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)  # KL(now || before)
    kl = kl * batch.kl_weight[kl_rows]
    kept_kl = None
    if kept_part:
        kept = batch.first_kept_row - batch.n_rewrite_rows  # the kept prompts' first among the KL rows
        kept_kl = per_request(kl[kept:], kl_rows[kept:])
    decay = config.v_weight_decay * delta.norm(dim=-1) / h_norm**2
    return nll + per_request(kl, kl_rows) + decay, nll, misses, kept_kl


def delta_groups(requests: Sequence[EditRequest], config: MemitConfig) -> list[int]:
    """The δ row of each request: one per distinct subject when ``config.share_subject_delta``, else one
    per request. Rows are numbered in order of first appearance."""
    if not config.share_subject_delta:
        return list(range(len(requests)))
    rows: dict[str, int] = {}
    return [rows.setdefault(r.subject, len(rows)) for r in requests]


def subject_shares(requests: Sequence[EditRequest], groups: Sequence[int]) -> list[list[int]]:
    """The δ rows (of :func:`delta_groups`) each rank optimises, ascending, for every rank of the process group:
    the subjects, in order of first appearance, dealt out in turn (rank r: subjects r, r + W, ...; see
    :func:`~memit_adapter.distributed.shard`), so that all requests about one subject stay on one rank (they share
    a δ row, or their kept prompts depend on each other). One process: ``[all rows]``."""
    rows_of: dict[str, list[int]] = {}
    for req, g in zip(requests, groups):
        rows = rows_of.setdefault(req.subject, [])
        if g not in rows:
            rows.append(g)
    subjects = list(rows_of.values())
    return [sorted(g for rows in shard(subjects, r) for g in rows) for r in range(world_size())]


def optimise_deltas(model, spec: ArchSpec, tokenizer, requests, templates, config: MemitConfig, layer: int,
                    progress: bool = True, relations: Mapping[str, str] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise the δ rows of :func:`delta_groups` together; return ``(z, h, nll)``, float32, shapes
    ``(n, d_model)``, ``(n, d_model)``, ``(n,)``, with ``z_i = h_i + δ`` of request i's row and the row's final
    target NLL (mean over its requests of the NLL averaged over the context templates).

    What δ cannot change is run once: each row's prefix (the tokens before its lookup) through every block,
    its suffix (the lookup onwards) through the blocks up to ``layer``. A step runs only the suffixes, only
    through the blocks after ``layer``, and only of the rows whose loss has not yet reached ``v_loss_threshold``
    (the kept prompts' rows only every ``config.preserve_every`` steps).
    The forward and backward run in the model's dtype; δ, the logits, the loss and Adam's state are float32.
    ``relations`` (relation id -> prompt template) are the relations whose answers ``config.preserve_factor``
    keeps; None = :func:`relation_templates` of ``requests``.

    Memory on the model's device, for ``r`` rows (``len(templates)`` per request, then ``r_kl``: one KL row per
    request and the kept prompts), prefixes of ``P`` and suffixes of ``S`` tokens (the longest of each), ``m``
    target tokens, ``b`` bytes per element of the model's dtype, ``d_kv`` = key heads x head dim:
    ``2·n_layers·r·P·d_kv·b`` for the prefixes' keys and values while they are computed, then
    ``2·(n_layers - L - 1)·r·P·d_kv·b`` (a step reads only those of the blocks after L), twice while a step's attention
    appends the suffixes' keys and values to them, and with ``preserve_every`` > 1 once more, for the rows without the
    kept prompts, once a δ row has stopped (before, they are views);
    ``r·S·d_model·b`` for block L's output; ``(m + r_kl)·vocab·4·3`` for the float32 logits, log-probabilities
    and their gradient, and ``r_kl·vocab·4`` for the unedited ones; and ``(n_layers - L - 1)·r·S·a·b`` for the
    activations autograd keeps through the blocks after L, ``a`` about ``10·d_model + 4·d_ff`` (architecture
    dependent; eager attention adds ``heads·(P + S)``). Half-precision models add ``vocab·d_model·4`` for the
    float32 head. 32 requests of 6 templates on a 7B LLaMA (P = 12, S = 8, L = 8): 1.4 GB of keys and values
    while they are computed, 1.0 GB kept; 7 GB of activations.
    """
    if relations is None:
        relations = relation_templates(requests)
    # only δ needs gradients: with the weights' flags off, autograd does not keep the activations that weight
    # gradients would need (most of the memory of a step)
    with evaluating(model, freeze=True):
        return _optimise_deltas(model, spec, tokenizer, requests, templates, config, layer, progress, relations)


@dataclass
class _Live:
    """What a step runs: the requests of the δ rows still going, their rows of the batch cut into parts, and the
    maps from those to the δ rows. Built again only when a δ row stops, so a step reads no value back from the
    device to index with."""

    sub: _Batch
    parts: list[_Part]
    req_group: torch.Tensor  # (n_live,) δ row of each live request
    row_group: torch.Tensor  # (rows,) δ row of each live batch row
    h_norm: torch.Tensor  # (n_live,)
    kl_init: torch.Tensor  # (live KL rows, vocab) their unedited log-probabilities

    @classmethod
    def of(cls, batch: _Batch, parts: Sequence[_Part], kl_init: torch.Tensor, groups: Sequence[int],
           going: set[int], h_norm: torch.Tensor, kept: bool = True) -> _Live:
        """The rows of ``going``'s requests, without their kept prompts unless ``kept``."""
        device = batch.input_ids.device
        idx = torch.tensor([i for i, g in enumerate(groups) if g in going], device=device)
        sub, rows = batch.subset(idx, kept=kept)
        req_group = torch.tensor(groups, device=device)[idx]
        return cls(sub, _select_parts(parts, rows), req_group, req_group[sub.row_request], h_norm[idx],
                   kl_init[rows[sub.n_rewrite_rows:] - batch.n_rewrite_rows])

    def by_row(self, per_request: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Per-request values summed over each δ row ``(n_rows,)``."""
        return per_request.new_zeros(n_rows).index_add(0, self.req_group, per_request)


def _optimise_deltas(model, spec, tokenizer, requests, templates, config, layer, progress, relations):
    device = input_device(model)  # the batch, δ and the loss; block L's output and the states come from their modules
    groups = delta_groups(requests, config)
    kept = kept_prompts(tokenizer, requests, groups, relations, config.preserve_factor,
                        config.preserve_max_relations, config.seed)
    batch = _build_batch(tokenizer, requests, templates, device, config.kl_factor, kept)
    head = _Head(model)
    with torch.no_grad():
        parts, final, as_tuple = _batch_parts(model, spec, layer, batch)
        kl_rows = torch.arange(batch.n_rewrite_rows, final.shape[0], device=device)
        kl_init = torch.log_softmax(head(final[kl_rows, batch.kl_pos[kl_rows] - batch.lookup[kl_rows]]), dim=-1)
        del final
        _drop_old_answers(batch, kl_init, [k.forbidden for ks in kept for k in ks])
        # h_i: block output at the subject's edit token of the bare prompt (templates[0] == "{}")
        at = lookup_states(parts)
        h = at[torch.arange(batch.n_requests, device=at.device) * len(templates)].float().to(device)
    group = torch.tensor(groups, device=device)  # (n,) δ row of each request
    n_groups = max(groups) + 1
    size = torch.zeros(n_groups, device=device).index_add(0, group, torch.ones(len(requests), device=device))
    h_norm = h.norm(dim=-1)
    g_norm = torch.zeros(n_groups, device=device).index_add(0, group, h_norm) / size  # mean |h| of a row
    max_norm = config.clamp_norm_factor * g_norm
    # Adam moves each element by about lr a step: optimise δ / unit so that the step is lr * unit
    unit = (g_norm / h.shape[1] ** 0.5)[:, None] if config.v_lr_relative else torch.ones_like(g_norm)[:, None]
    param = torch.zeros(n_groups, h.shape[1], device=device, requires_grad=True)
    opt = torch.optim.Adam([param], lr=config.v_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, steps=config.v_num_grad_steps, end=config.v_lr_decay_to))
    active = torch.ones(n_groups, dtype=torch.bool, device=device)
    last_nll = torch.zeros(n_groups, device=device)  # each row's mean target NLL when it was last measured
    going = set(range(n_groups))
    # the δ rows with kept prompts: their loss is whole only on the kept prompts' steps (0, every, 2 every, ...)
    kept_req = batch.row_request[batch.first_kept_row:][batch.kl_weight[batch.first_kept_row:] > 0]
    has_kept = torch.zeros(n_groups, dtype=torch.bool, device=device)
    has_kept[group[kept_req]] = True
    every = config.preserve_every if bool(has_kept.any()) else 1
    lives = _lives(batch, parts, kl_init, groups, going, h_norm, every)
    budget = max(config.v_num_grad_steps, config.v_max_grad_steps or 0)
    with tqdm(total=budget, desc="target vectors", unit="step", disable=not progress, leave=False) as bar:
        for step in range(budget):
            delta = param * unit
            kept_step = step % every == 0
            live = lives[not kept_step]  # with the kept prompts, or without them
            final = _forward_step(model, spec, layer, live.parts, delta[live.row_group], as_tuple)
            weighted = every > 1 and kept_step  # the kept prompts' KL counts `every` times on their steps
            req_loss, req_nll, req_miss, req_kept = _losses(head, live.sub, final, live.kl_init,
                                                            delta[live.req_group], live.h_norm, config, weighted)
            loss = live.by_row(req_loss, n_groups) / size  # mean per row
            objective = loss  # what the step descends
            if weighted:
                objective = loss + (every - 1) * live.by_row(req_kept, n_groups) / size
            shown = torch.where(active, loss.detach(), 0.0).sum() / len(going)
            nll = live.by_row(req_nll.detach(), n_groups) / size
            last_nll = torch.where(active, nll, last_nll)
            below = loss.detach() < config.v_loss_threshold
            active = active & ~(below if kept_step else below & ~has_kept)  # a row with kept prompts: on their steps
            if config.v_target_nll_threshold:
                active = active & (nll >= config.v_target_nll_threshold)
            if config.v_stop_when_top:  # MPES: the row's targets are the top answers of all its rewrite prompts
                active = active & (live.by_row(req_miss, n_groups) > 0)
            if step >= config.v_num_grad_steps - 1:  # from here on only the rows still below even odds go on
                active = active & (nll > UNCONVERGED_NLL)
            # the one read-back of a step: the loss shown, whether it is finite, which rows go on
            flags = torch.cat([shown[None], torch.isfinite(loss).all()[None].float(), active.float()]).tolist()
            bar.update()
            bar.set_postfix(loss=f"{flags[0]:.3f}", active=len(going))
            if not flags[1]:
                raise MemitError(f"the target-vector loss is not finite at step {step} ({_dtype_name(model)} model): "
                                 "its forward pass overflows; load the model in bfloat16 or float32")
            still = {g for g, on in enumerate(flags[2:]) if on}
            if not still or step == budget - 1:
                break
            _adam_step(opt, param, objective, active, unit, max_norm)
            schedule.step()
            if still != going:
                going = still
                lives = _lives(batch, parts, kl_init, groups, going, h_norm, every)
    return (h + (param * unit).detach()[group]), h, last_nll[group]


def _lives(batch: _Batch, parts, kl_init, groups, going, h_norm, every: int) -> tuple[_Live, _Live]:
    """What a step runs with the kept prompts and without them (the same object when ``every`` is 1: every step
    has them)."""
    full = _Live.of(batch, parts, kl_init, groups, going, h_norm)
    return (full, full) if every == 1 else (full, _Live.of(batch, parts, kl_init, groups, going, h_norm, kept=False))


def lr_factor(step: int, steps: int, end: float) -> float:
    """The learning rate of the Adam update made at ``step`` (0-based) as a fraction of ``v_lr``: a half cosine from 1
    at step 0 to ``end`` at step ``steps - 1`` (the last step of ``steps`` makes no update, so the last update runs
    at ``lr_factor(steps - 2)``), ``end`` after it; 1 throughout when ``end`` is 1."""
    if end == 1.0 or steps < 2:
        return 1.0
    t = min(step, steps - 1) / (steps - 1)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def _adam_step(opt: torch.optim.Optimizer, param: torch.Tensor, loss: torch.Tensor, active: torch.Tensor,
               unit: torch.Tensor, max_norm: torch.Tensor) -> None:
    """One Adam step on the δ rows still ``active`` (the others keep their values: Adam's momentum would move them),
    then each row projected back into its ball ``|δ| <= max_norm``."""
    (grad,) = torch.autograd.grad(torch.where(active, loss, 0.0).sum(), [param])
    before = param.detach().clone()
    param.grad = grad
    opt.step()
    with torch.no_grad():
        param.copy_(torch.where(active[:, None], param, before))
        norms = (param * unit).norm(dim=-1)
        scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
        param.mul_(scale[:, None])


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def _drop_old_answers(batch: _Batch, kl_init: torch.Tensor, forbidden: Sequence[frozenset[int]]) -> None:
    """Zero the weight of the kept prompts' rows (``forbidden``: one set per row) whose unedited top token is in
    their forbidden set: such a prompt asks about the fact being rewritten, under another relation id."""
    if not forbidden:
        return
    top = kl_init[batch.first_kept_row - batch.n_rewrite_rows:].argmax(-1).tolist()
    drop = torch.tensor([t in f for t, f in zip(top, forbidden, strict=True)], device=batch.kl_weight.device)
    batch.kl_weight[batch.first_kept_row:][drop] = 0.0


def compute_targets(model, spec: ArchSpec, tokenizer, requests, templates, config: MemitConfig, layer: int,
                    *, batch_size: int | None = None, progress: bool = True, return_loss: bool = False,
                    relations: Mapping[str, str] | None = None):
    """:func:`optimise_deltas` over chunks of about ``batch_size`` requests (None: see :class:`ChunkSizer`, all
    at once on the CPU, as many as fit on an accelerator); ``(z, h)``, and with ``return_loss`` each request's
    final target NLL too (of its δ row, when last measured). ``relations``: those ``config.preserve_factor`` keeps
    (None: :func:`relation_templates` of ``requests``).

    A chunk holds whole δ rows (all requests of a shared subject), so chunking never changes a result. Requests
    whose target is still below even odds at the end (NLL above ln 2: :data:`UNCONVERGED_NLL`) are named in a
    warning: their edits will most likely not take. (The total loss, with its KL and weight-decay terms, is not
    used: it stays above a small ``v_loss_threshold`` by design, which only asks to run every step.)

    Under a ``torch.distributed`` process group (every rank calling this alike), the subjects are dealt out to
    the ranks (:func:`subject_shares`), each rank optimises the δ rows of its subjects, and ``z``, ``h`` and the
    NLL are all-gathered: every rank returns all of them, in the order of ``requests``, as one process would
    (within float32 rounding: other chunks).
    """
    groups = delta_groups(requests, config)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    shares = subject_shares(requests, groups)
    relations = relation_templates(requests) if relations is None else relations
    device = input_device(model)
    d_model = spec.weight_shape(model, layer)[0]
    z, h = (torch.zeros(len(requests), d_model, device=device) for _ in range(2))  # before a chunk is measured
    loss = torch.zeros(len(requests), device=device)
    progress = progress and is_main()

    def run(chunk: list[int]) -> None:
        z[chunk], h[chunk], loss[chunk] = optimise_deltas(model, spec, tokenizer, [requests[i] for i in chunk],
                                                          templates, config, layer, progress, relations)

    ChunkSizer(batch_size, device).run([members[g] for g in shares[rank()]], run, desc="request chunks",
                                       progress=progress)
    if len(shares) > 1:
        owned = [sorted(i for g in rows for i in members[g]) for rows in shares]
        z, h, loss = (gather_rows(t, owned) for t in (z, h, loss))
    if is_main():
        _warn_unconverged(requests, loss.tolist(), config)
    return (z, h, loss) if return_loss else (z, h)


UNCONVERGED_NLL = math.log(2.0)  # a target less likely than even odds after the optimisation


def _warn_unconverged(requests, nll: list[float], config: MemitConfig) -> None:
    above = [i for i, x in enumerate(nll) if x > UNCONVERGED_NLL]
    if above:
        worst = max(above, key=lambda i: nll[i])
        logger.warning("%d of %d requests ended the target-vector optimisation with their target below even odds "
                       "after %d steps (worst: NLL %.3f, %r -> %r); they will most likely not take: raise "
                       "v_max_grad_steps (these rows alone go on), v_num_grad_steps or v_lr", len(above), len(nll),
                       max(config.v_num_grad_steps, config.v_max_grad_steps or 0), nll[worst], requests[worst].text,
                       requests[worst].target_new)


# -- chunks --------------------------------------------------------------------------------------

_OutOfMemory = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class _DeviceMemory:
    """The allocator's view of one accelerator's memory (``torch.get_device_module(device)``); None where the
    device has no such view (the CPU, an old torch)."""

    _NEEDS = ("mem_get_info", "memory_allocated", "memory_reserved", "max_memory_allocated", "reset_peak_memory_stats")

    def __init__(self, module, device: torch.device):
        self.module, self.device = module, device

    @classmethod
    def of(cls, device: torch.device) -> _DeviceMemory | None:
        if device.type == "cpu" or not hasattr(torch, "get_device_module"):
            return None
        module = torch.get_device_module(device)
        return cls(module, device) if all(hasattr(module, name) for name in cls._NEEDS) else None

    def available(self) -> int:
        """Bytes a chunk may use: free on the device, plus what the caching allocator holds unused."""
        free, _ = self.module.mem_get_info(self.device)
        return free + self.module.memory_reserved(self.device) - self.module.memory_allocated(self.device)

    def start(self) -> int:
        """Reset the peak statistics (the device's, for the whole process); bytes in use now."""
        self.module.reset_peak_memory_stats(self.device)
        return self.module.memory_allocated(self.device)

    def peak(self) -> int:
        return self.module.max_memory_allocated(self.device)

    def release(self) -> None:
        if hasattr(self.module, "empty_cache"):
            self.module.empty_cache()


class ChunkSizer:
    """How many requests to run at once: ``size`` when given; else all at once, except on an accelerator that
    reports its memory (CUDA and the like), where as many as fit:

    the first chunk holds ``probe`` requests and measures the peak memory it takes per request; each later chunk
    fills ``fill`` of the memory available then, at the peak per request of the chunk before (the fixed part of a
    chunk's memory, spread over more requests, fades from the estimate as chunks grow); a chunk that runs out of
    memory all the same (longer rows than the chunk before) is halved and run again, and no later chunk is larger.
    The work must not depend on the chunking (each request's result is its own) and must write its results only
    once it has them, in memory allocated before the first chunk (else it would count as the probe's).

    Usage::

        sizer = ChunkSizer(None, model.device)
        sizer.run([[0], [1, 2], [3]], work)      # work(chunk) on consecutive groups, e.g. work([0, 1, 2]), work([3])
    """

    def __init__(self, size: int | None, device: torch.device, *, probe: int = 8, fill: float = 0.8,
                 memory: _DeviceMemory | None = None):
        self.size = size
        self.memory = None if size is not None else memory if memory is not None else _DeviceMemory.of(
            torch.device(device))
        self.probe, self.fill = probe, fill
        self.per_request = 0.0  # peak bytes per request of the last chunk
        self.cap: int | None = None  # set by running out of memory

    def next_size(self, remaining: int) -> int:
        if self.memory is None:
            return self.size or remaining
        size = self.probe if not self.per_request else int(self.fill * self.memory.available() / self.per_request)
        return max(1, min(size, self.cap or size))

    def run(self, groups: Sequence[Sequence[int]], work: Callable[[list[int]], None], *, desc: str = "chunks",
            progress: bool = True) -> None:
        """Call ``work`` on chunks of consecutive ``groups`` (lists of indices kept in one chunk), each index once."""
        total = sum(len(g) for g in groups)
        one_chunk = self.memory is None and (self.size or total) >= total
        with tqdm(total=total, desc=desc, unit="request", disable=not progress or one_chunk, leave=False) as bar:
            i = done = 0
            while i < len(groups):
                j, n = i, 0
                size = self.next_size(total - done)
                while j < len(groups) and (j == i or n + len(groups[j]) <= size):
                    n += len(groups[j])
                    j += 1
                chunk = [x for g in groups[i:j] for x in g]
                if self._measured(work, chunk, can_halve=j - i > 1):
                    i, done = j, done + len(chunk)
                    bar.update(len(chunk))

    def _measured(self, work: Callable[[list[int]], None], chunk: list[int], can_halve: bool) -> bool:
        if self.memory is None:
            work(chunk)
            return True
        base = self.memory.start()
        try:
            work(chunk)
        except _OutOfMemory:
            if not can_halve:
                raise
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:  # outside the handler: the failed chunk's tensors are freed with its traceback
            self.memory.release()
            self.cap = max(1, len(chunk) // 2)
            logger.info("a chunk of %d requests ran out of memory; chunks of at most %d from now on", len(chunk),
                        self.cap)
            return False
        self.per_request = max(1.0, (self.memory.peak() - base) / len(chunk))
        return True
