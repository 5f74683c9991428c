"""Step 2 of MEMIT: the target vectors ``z_i = h_i + δ_i``, all requests of a batch optimised together.

Usage::

    templates = context_templates(model, tok, cfg)        # ["{}", "The ... . {}", ...], seeded
    zs, h = compute_targets(model, tok, requests, templates, cfg, layer=max(cfg.layers))   # (n, d_model) each

Requests about different subjects are independent: each has its own row of ``δ``, its own loss, norm
clamp and early stop, and Adam is element-wise, so optimising them together gives the same ``δ`` as one
at a time. Requests about the same subject share one row (``config.share_subject_delta``): in a causal
model their keys at the subject's last token are the same vector when the text before the subject is
the same, so one key cannot be asked for two different ``z``; the shared ``δ`` minimises the mean of
their losses instead, and then every one of them asks for the same change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec
from .config import MemitConfig
from .hooks import capture_outputs, edit_output
from .requests import EditRequest
from .tokens import EncodedFact, encode_fact, pad_id, pad_right

KL_PROMPT = "{} is a"


def context_templates(model: nn.Module, tokenizer, config: MemitConfig) -> list[str]:
    """``["{}"]`` followed by one prefix sampled from the model per start word (top-k, seeded), as
    ``prefix + ". {}"``; the config's own ``context_templates`` when given."""
    if config.context_templates is not None:
        return list(config.context_templates)
    device = next(model.parameters()).device
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
    lookup: torch.Tensor  # (rows,) subject's last token
    kl_pos: torch.Tensor  # (rows,) position whose next-token distribution a KL row keeps (0 on rewrite rows)
    kl_weight: torch.Tensor  # (rows,) weight of that KL term (0 on rewrite rows)
    target_rows: torch.Tensor  # (m,) row of each target token
    target_pos: torch.Tensor  # (m,) position predicting it
    target_ids: torch.Tensor  # (m,)
    target_weight: torch.Tensor  # (m,) 1 / (n_templates * target_len) of its request
    n_requests: int
    n_rewrite_rows: int

    def subset(self, requests: torch.Tensor) -> tuple[_Batch, torch.Tensor]:
        """The rows of ``requests`` (ascending indices), trimmed to their longest row; and those rows' indices."""
        keep = torch.isin(self.row_request, requests)
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
            facts.append(encode_fact(tokenizer, t.replace("{}", req.prompt), req.subject, req.target_new))
            rows_req.append(i)
    n_rewrite = len(facts)
    kl_pos += [0] * n_rewrite
    kl_weight += [0.0] * n_rewrite
    for i, req in enumerate(requests):  # the essence: the subject's last token of "{subject} is a"
        facts.append(encode_fact(tokenizer, KL_PROMPT, req.subject))
        rows_req.append(i)
        kl_pos.append(facts[-1].lookup)
        kl_weight.append(kl_factor)
    for i, req in enumerate(kept or [[] for _ in requests]):  # other relations: the answer position
        for k in req:
            facts.append(encode_fact(tokenizer, k.template, requests[i].subject))
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
                 factor: float) -> list[list[_Kept]]:
    """The preservation prompts of each request: held by the first request of each δ row, one per relation of
    ``relations`` that no request about the row's subject edits, weighted ``factor * row size / count`` so that the
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
        if not templates:
            continue
        forbidden = frozenset(ids[0] for r in reqs if r.target_true
                              for ids in [tokenizer(r.target_true, add_special_tokens=False)["input_ids"]] if ids)
        w = factor * len(idx) / len(templates)
        out[idx[0]] = [_Kept(t, w, forbidden) for t in templates]
    return out


def _logits_at(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits of selected final hidden states ``(m, d_model)`` -> ``(m, vocab)`` in float32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _forward(model, spec: ArchSpec, layer: int, batch: _Batch, delta: torch.Tensor | None):
    """Run the batch with ``delta[row_request]`` added to block ``layer``'s output at each row's lookup.

    Returns the final hidden states ``(rows, seq, d_model)`` and block ``layer``'s output at the lookups.
    """
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)

    def add_delta(h):
        if delta is None:
            return h
        h = h.clone()
        h[rows, batch.lookup] += delta[batch.row_request].to(h.dtype)
        return h

    block = spec.blocks(model)[layer]
    with edit_output(block, add_delta), capture_outputs(block, detach=False) as seen:
        out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    final = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return final, seen[0][rows, batch.lookup]


@contextmanager
def _replayed_prefix(model: nn.Module, spec: ArchSpec, layer: int, output: Callable[[], torch.Tensor],
                     as_tuple: bool) -> Iterator[None]:
    """Blocks ``0..layer`` skip their computation: block ``layer`` returns ``output()``, earlier ones pass
    their input on. Valid while nothing before block ``layer``'s output changes, as when only δ does."""
    blocks = spec.blocks(model)

    def wrap(h):
        return (h, None) if as_tuple else h

    def passthrough(hidden_states, *args, **kwargs):
        return wrap(hidden_states)

    def replay(*args, **kwargs):
        return wrap(output())

    for i in range(layer + 1):
        blocks[i].forward = replay if i == layer else passthrough
    try:
        yield
    finally:
        for i in range(layer + 1):
            del blocks[i].forward


def _forward_replayed(model, spec: ArchSpec, layer: int, batch: _Batch, block_out: torch.Tensor,
                      delta: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """Final hidden states of ``batch`` when block ``layer`` outputs ``block_out`` plus ``delta[row_request]``
    at each row's lookup; the blocks up to ``layer`` are not run again."""
    rows = torch.arange(batch.input_ids.shape[0], device=block_out.device)

    def output():
        return block_out.index_put((rows, batch.lookup), delta[batch.row_request].to(block_out.dtype),
                                   accumulate=True)

    with _replayed_prefix(model, spec, layer, output, as_tuple):
        out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _forward_in_parts(model, spec: ArchSpec, layer: int, batch: _Batch, block_out: torch.Tensor,
                      delta: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """:func:`_forward_replayed` on the rewrite rows and on the (short) KL rows separately, each padded only
    to its own longest row, then joined: the same states as one forward, without running the KL rows over
    the padding of the long rewrite rows."""
    n_rows, width = batch.input_ids.shape
    parts = []
    for a, b in ((0, batch.n_rewrite_rows), (batch.n_rewrite_rows, n_rows)):
        if b == a:
            continue
        w = int(batch.attention_mask[a:b].sum(1).max())
        part = replace(batch, input_ids=batch.input_ids[a:b, :w], attention_mask=batch.attention_mask[a:b, :w],
                       row_request=batch.row_request[a:b], lookup=batch.lookup[a:b])
        parts.append(F.pad(_forward_replayed(model, spec, layer, part, block_out[a:b, :w], delta, as_tuple),
                           (0, 0, 0, width - w)))
    return torch.cat(parts)


def _losses(model, batch: _Batch, final, kl_init, delta, h_norm, config: MemitConfig):
    """Per-request loss ``(n,)``: NLL of the targets + the weighted KL rows + weight decay; and the NLL.

    ``kl_init``: the unedited log-probabilities of ``batch``'s KL rows, in order."""
    logp = torch.log_softmax(_logits_at(model, final[batch.target_rows, batch.target_pos]), dim=-1)
    tok_nll = -logp.gather(1, batch.target_ids[:, None])[:, 0] * batch.target_weight
    req_of_tok = batch.row_request[batch.target_rows]
    nll = torch.zeros(batch.n_requests, device=final.device).index_add(0, req_of_tok, tok_nll)
    kl_rows = torch.arange(batch.n_rewrite_rows, final.shape[0], device=final.device)
    kl_logp = torch.log_softmax(_logits_at(model, final[kl_rows, batch.kl_pos[kl_rows]]), dim=-1)
    kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)  # KL(now || before)
    kl = torch.zeros_like(nll).index_add(0, batch.row_request[kl_rows], kl * batch.kl_weight[kl_rows])
    decay = config.v_weight_decay * delta.norm(dim=-1) / h_norm**2
    return nll + kl + decay, nll


def delta_groups(requests: Sequence[EditRequest], config: MemitConfig) -> list[int]:
    """The δ row of each request: one per distinct subject when ``config.share_subject_delta``, else one
    per request. Rows are numbered in order of first appearance."""
    if not config.share_subject_delta:
        return list(range(len(requests)))
    rows: dict[str, int] = {}
    return [rows.setdefault(r.subject, len(rows)) for r in requests]


def optimise_deltas(model, spec: ArchSpec, tokenizer, requests, templates, config: MemitConfig, layer: int,
                    progress: bool = True, relations: Mapping[str, str] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise the δ rows of :func:`delta_groups` together; return ``(z, h)``, both ``(n, d_model)``
    float32, with ``z_i = h_i + δ`` of request i's row.

    Blocks up to ``layer`` are run once (δ cannot change them) and each step runs only the rows whose
    loss has not yet reached ``v_loss_threshold``. ``relations`` (relation id -> prompt template) are the
    relations whose answers ``config.preserve_factor`` keeps; None = :func:`relation_templates` of ``requests``.
    """
    if relations is None:
        relations = relation_templates(requests)
    with _no_param_grads(model):
        return _optimise_deltas(model, spec, tokenizer, requests, templates, config, layer, progress, relations)


@contextmanager
def _no_param_grads(model: nn.Module) -> Iterator[None]:
    """Only δ needs gradients: with the weights' flags off, autograd does not keep the activations that
    weight gradients would need (most of the memory of a step). The flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _optimise_deltas(model, spec, tokenizer, requests, templates, config, layer, progress, relations):
    device = next(model.parameters()).device
    groups = delta_groups(requests, config)
    kept = kept_prompts(tokenizer, requests, groups, relations, config.preserve_factor)
    batch = _build_batch(tokenizer, requests, templates, device, config.kl_factor, kept)
    block = spec.blocks(model)[layer]
    with torch.no_grad(), capture_outputs(block) as seen_out:
        as_tuple = []
        handle = block.register_forward_hook(lambda _m, _a, out: as_tuple.append(isinstance(out, tuple)))
        try:
            final, at_lookup = _forward(model, spec, layer, batch, None)
        finally:
            handle.remove()
        block_out = seen_out[0]  # (rows, seq, d_model)
        kl_rows = torch.arange(batch.n_rewrite_rows, final.shape[0], device=device)
        kl_init = torch.log_softmax(_logits_at(model, final[kl_rows, batch.kl_pos[kl_rows]]), dim=-1)
        _drop_old_answers(batch, kl_init, [k.forbidden for ks in kept for k in ks])
        # h_i: block output at the subject's last token of the bare prompt (templates[0] == "{}")
        h = at_lookup[torch.arange(batch.n_requests, device=device) * len(templates)].float()
    group = torch.tensor(groups, device=device)  # (n,) δ row of each request
    n_groups = int(group.max()) + 1
    size = torch.zeros(n_groups, device=device).index_add(0, group, torch.ones(len(requests), device=device))
    h_norm = h.norm(dim=-1)
    g_norm = torch.zeros(n_groups, device=device).index_add(0, group, h_norm) / size  # mean |h| of a row
    max_norm = config.clamp_norm_factor * g_norm
    # Adam moves each element by about lr a step: optimise δ / unit so that the step is lr * unit
    unit = (g_norm / h.shape[1] ** 0.5)[:, None] if config.v_lr_relative else torch.ones_like(g_norm)[:, None]
    param = torch.zeros(n_groups, h.shape[1], device=device, requires_grad=True)
    opt = torch.optim.Adam([param], lr=config.v_lr)
    active = torch.ones(n_groups, dtype=torch.bool, device=device)
    bar = tqdm(range(config.v_num_grad_steps), desc="target vectors", unit="step", disable=not progress,
               leave=False)
    for step in bar:
        delta = param * unit
        idx = active[group].nonzero()[:, 0]  # requests of the rows still going
        sub, rows = batch.subset(idx)
        d_req = delta[group[idx]]
        final = _forward_in_parts(model, spec, layer, sub, block_out[rows, : sub.input_ids.shape[1]], d_req,
                                  as_tuple[0])
        kl_sub = kl_init[rows[sub.n_rewrite_rows:] - batch.n_rewrite_rows]  # the KL rows still going
        req_loss, _ = _losses(model, sub, final, kl_sub, d_req, h_norm[idx], config)
        loss = torch.zeros(n_groups, device=device).index_add(0, group[idx], req_loss) / size  # mean per row
        bar.set_postfix(loss=f"{loss[active].mean().item():.3f}", active=int(active.sum()))
        active = active & (loss.detach() >= config.v_loss_threshold)
        if not active.any() or step == config.v_num_grad_steps - 1:
            break
        (grad,) = torch.autograd.grad(loss[active].sum(), [param])
        before = param.detach().clone()
        param.grad = grad
        opt.step()
        with torch.no_grad():
            param[~active] = before[~active]  # finished rows keep their δ (Adam's momentum would move them)
            norms = (param * unit).norm(dim=-1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
            param.mul_(scale[:, None])
    bar.close()
    return (h + (param * unit).detach()[group]), h


def _drop_old_answers(batch: _Batch, kl_init: torch.Tensor, forbidden: Sequence[frozenset[int]]) -> None:
    """Zero the weight of the last ``len(forbidden)`` KL rows (the kept prompts) whose unedited top token is
    in their forbidden set: such a prompt asks about the fact being rewritten, under another relation id."""
    if not forbidden:
        return
    top = kl_init[-len(forbidden):].argmax(-1).tolist()
    drop = torch.tensor([t in f for t, f in zip(top, forbidden)], device=batch.kl_weight.device)
    batch.kl_weight[-len(forbidden):][drop] = 0.0


def compute_targets(model, spec: ArchSpec, tokenizer, requests, templates, config: MemitConfig, layer: int,
                    *, batch_size: int | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`optimise_deltas` over chunks of about ``batch_size`` requests (all at once when None).

    A chunk holds whole δ rows (all requests of a shared subject), so chunking never changes a result.
    """
    groups = delta_groups(requests, config)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    size = batch_size or len(requests)
    chunks: list[list[int]] = [[]]
    for idx in members.values():
        if chunks[-1] and len(chunks[-1]) + len(idx) > size:
            chunks.append([])
        chunks[-1].extend(idx)
    relations = relation_templates(requests)
    z = h = None
    for chunk in tqdm(chunks, desc="request chunks", disable=not progress or len(chunks) == 1):
        z_c, h_c = optimise_deltas(model, spec, tokenizer, [requests[i] for i in chunk], templates, config, layer,
                                   progress, relations)
        if z is None:
            z, h = z_c.new_empty(len(requests), z_c.shape[1]), h_c.new_empty(len(requests), h_c.shape[1])
        z[chunk], h[chunk] = z_c, h_c
    return z, h
