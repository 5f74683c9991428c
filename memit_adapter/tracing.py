"""Causal tracing (Meng et al. 2022; MEMIT Appendix A): which states of the model carry a fact.

The subject tokens' embeddings are corrupted with Gaussian noise (std ``noise_factor`` x the std of
embeddings); then one state at a time is restored to its clean value and the recovered probability of
the object is measured. P(object) is the product of its tokens' probabilities (teacher-forced), i.e. the
paper's probability of the answer token when the object is one token. Every noise sample and every
restored state of one fact is one row of a batch, so a fact costs a few batched forward passes.

Usage::

    res = trace_fact(model, tok, "{} plays the sport of", "Michael Jordan", " basketball")
    res.scores                          # (n_tokens, n_layers) P(object) with one hidden state restored
    mlp = trace_fact(model, tok, "{} plays the sport of", "Michael Jordan", kind="mlp")   # top prediction
    avg = average_traces(trace_facts(model, tok, requests))     # Figure 8, averaged over facts
    sev = trace_severed(model, tok, requests)                    # Figure 3: MLP / attention frozen
    suggest_layers(model, tok, requests)                         # e.g. [3, 4, 5]: use as MemitConfig.layers
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, check_model, get_arch_spec
from .config import MemitConfig
from .devices import execution_device, input_device
from .errors import ConfigError, InvalidRequestError, UnsupportedArchitectureError
from .hooks import capture_outputs, edit_output
from .models import load_model
from .modes import evaluating
from .requests import EditRequest
from .tokens import encode_fact, fill

logger = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
SEVER_MODES = ("none", "attn", "mlp")
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "last token")

# -- results ---------------------------------------------------------------------------------------
@dataclass
class TraceResult:
    """P(object) with one state restored, per (token, layer); ``low``/``high``: corrupted / clean run.

    For ``kind`` "mlp" and "attn", entry ``(t, l)`` restores that module at token ``t`` over the
    ``window`` layers centred on ``l``. An average over facts (:func:`average_traces`) has one row per
    token category (``CATEGORIES``) instead of one per token.
    """

    kind: str
    scores: torch.Tensor  # (n_tokens, n_layers)
    low: float
    high: float
    tokens: list[str]
    subject_range: tuple[int, int]  # [start, end) rows of the subject
    text: str
    target: str
    window: int = 1
    n_facts: int = 1

    @property
    def indirect_effect(self) -> torch.Tensor:
        """``scores - low``: the average indirect effect of each state, (n_tokens, n_layers)."""
        return self.scores - self.low

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scores": self.scores.tolist(), "low": self.low, "high": self.high,
                "tokens": self.tokens, "subject_range": list(self.subject_range), "text": self.text,
                "target": self.target, "window": self.window, "n_facts": self.n_facts}


@dataclass
class SeveredTrace:
    """Figure 3: P(object) with the hidden state of the last subject token at each layer restored,
    with nothing frozen ("none") or with that token's attention ("attn") or MLP ("mlp") modules of
    every layer frozen in their corrupted state. ``scores[mode]`` is (n_layers,)."""

    scores: dict[str, torch.Tensor]
    low: float
    high: float
    text: str
    target: str
    n_facts: int = 1

    def effect(self, mode: str = "none") -> torch.Tensor:
        """Average indirect effect per layer, (n_layers,)."""
        return self.scores[mode] - self.low

    def gap(self, mode: str = "mlp") -> torch.Tensor:
        """How much freezing ``mode`` modules lowers the effect, per layer, (n_layers,)."""
        return self.scores["none"] - self.scores[mode]

    def to_dict(self) -> dict:
        return {"scores": {k: v.tolist() for k, v in self.scores.items()}, "low": self.low, "high": self.high,
                "text": self.text, "target": self.target, "n_facts": self.n_facts}


# -- tokenising a fact -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Fact:
    prompt_ids: list[int]
    target_ids: list[int]
    subject: tuple[int, int]  # [start, end) token positions, BOS included in the count
    text: str
    target: str
    tokens: list[str] = field(default_factory=list)

    @property
    def input_ids(self) -> list[int]:
        # The last target token is only predicted, never fed.
        return self.prompt_ids + self.target_ids[:-1]

    @property
    def last_subject(self) -> int:
        return self.subject[1] - 1


def subject_token_range(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """``[start, end)`` positions of ``subject``'s tokens in the tokenised ``prompt`` (with one ``{}``).

    Positions count every token the tokenizer adds, so a BOS token shifts them by one.
    """
    return encode_fact(tokenizer, prompt, subject).subject


def _encode_fact(tokenizer, prompt: str, subject: str, target: str | None, model: nn.Module) -> _Fact:
    """Tokenise a fact with the engine's encoder; the object defaults to the model's top next token, kept
    as an id so that it need not survive a decode/encode round trip."""
    fact = encode_fact(tokenizer, prompt, subject, target or "")
    prompt_ids = fact.ids[:fact.n_prompt]
    if target:
        target_ids = fact.target_ids
    else:
        target_ids = [_top_token(model, prompt_ids)]
        target = tokenizer.decode(target_ids)
    tokens = [tokenizer.decode([i]) for i in prompt_ids]
    return _Fact(prompt_ids, target_ids, fact.subject, fill(prompt, subject)[0], target, tokens)


def _top_token(model: nn.Module, ids: list[int]) -> int:
    device = input_device(model)
    logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


# -- model plumbing --------------------------------------------------------------------------------
def trace_modules(model: nn.Module, arch: ArchSpec | None = None) -> tuple[str, str]:
    """Names of the (attention, MLP) submodules inside one block of ``model``: the ``ArchSpec``'s, else
    guessed from the block's children."""
    spec = get_arch_spec(model, arch)
    if spec.attn and spec.mlp:
        return spec.attn, spec.mlp
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    block = spec.blocks(model)[0]
    names = dict(block.named_children())
    attn = next((n for n in ("self_attn", "attn", "attention") if n in names), None)
    mlp = next((n for n in ("mlp", "feed_forward") if n in names), None)
    if attn is None or mlp is None:
        raise UnsupportedArchitectureError(
            f"cannot find the attention and MLP submodules of model_type={model_type!r} (block children: "
            f"{sorted(names)}); give them in the architecture entry: ArchSpec(..., attn=..., mlp=...)")
    return attn, mlp


def default_window(n_layers: int) -> int:
    """Layers restored together for the MLP and attention traces: the paper's 10 on GPT-J (28 layers)
    and GPT-2 XL (48), scaled down with depth for smaller models."""
    return max(1, min(10, round(10 * n_layers / 28)))


def _window(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for a while; every flag is put back, also on exceptions."""
    with evaluating(model), torch.no_grad():
        yield


class _Row(NamedTuple):
    sample: int  # noise sample; -1 = no noise
    patches: tuple[tuple[str, int, bool], ...] = ()  # (module name, token, clean?) to overwrite


class _Runner:
    """Runs rows of one fact: each row is a noise sample plus states overwritten by clean (or corrupted)
    values. Holds the clean states of every block/attention/MLP module and the corrupted ones."""

    def __init__(self, model: nn.Module, fact: _Fact, noise: torch.Tensor, arch: ArchSpec | None):
        self.model, self.fact, self.spec = model, fact, get_arch_spec(model, arch)
        self.n_layers = self.spec.num_layers(model)
        attn, mlp = trace_modules(model, arch)
        self.names = {"hidden": [self.spec.block_name(l) for l in range(self.n_layers)]}
        self.names["attn"] = [f"{n}.{attn}" for n in self.names["hidden"]]
        self.names["mlp"] = [f"{n}.{mlp}" for n in self.names["hidden"]]
        self.embed = model.get_submodule(self.spec.embed)
        self.device = input_device(model)  # the ids and the rows' samples; states and logits are on their modules'
        self.noise = noise.to(execution_device(model, self.spec.embed))  # (n_samples, n_subject_tokens, d_model)
        self.ids = torch.tensor([fact.input_ids], device=self.device)  # (1, seq)
        self.target = torch.tensor(fact.target_ids, device=self.device)  # (n_target,)
        self.clean: dict[str, torch.Tensor] = {}  # name -> (seq, d_model)
        self.corrupt: dict[str, torch.Tensor] = {}  # name -> (n_samples, seq, d_model)

    @classmethod
    def build(cls, model: nn.Module, fact: _Fact, std: float, opts: _Options, seed: int) -> _Runner:
        d_model = model.get_submodule(get_arch_spec(model, opts.arch).embed).weight.shape[-1]
        n_subject = fact.subject[1] - fact.subject[0]
        return cls(model, fact, _noise(opts.samples, n_subject, d_model, std, seed), opts.arch)

    def baseline(self, keep_clean: Sequence[str], keep_corrupt: Sequence[str] = ()) -> tuple[float, torch.Tensor]:
        """Clean and corrupted runs in one batch; stores the clean states of the modules ``keep_clean`` and
        the corrupted ones of ``keep_corrupt``. Returns ``(P clean, P corrupted per sample)``."""
        rows = [_Row(-1)] + [_Row(s) for s in range(len(self.noise))]
        probs, seen = self._forward(rows, capture=sorted({*keep_clean, *keep_corrupt}))
        self.clean = {n: seen[n][0] for n in keep_clean}
        self.corrupt = {n: seen[n][1:] for n in keep_corrupt}
        return probs[0].item(), probs[1:]

    def run(self, rows: list[_Row], batch_size: int) -> torch.Tensor:
        """P(object) of each row, (len(rows),), in batches of ``batch_size`` rows."""
        out = [self._forward(rows[i:i + batch_size])[0] for i in range(0, len(rows), batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def _forward(self, rows: list[_Row], capture: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
        samples = torch.tensor([r.sample for r in rows], device=self.device)
        with ExitStack() as stack:
            stack.enter_context(edit_output(self.embed, self._add_noise(samples)))
            for name, fn in self._patches(rows, samples).items():
                stack.enter_context(edit_output(self.model.get_submodule(name), fn))
            seen = {n: stack.enter_context(capture_outputs(self.model.get_submodule(n))) for n in capture}
            logits = self.model(input_ids=self.ids.expand(len(rows), -1), use_cache=False,
                                logits_to_keep=len(self.target)).logits  # (rows, n_target, vocab)
        logp = logits.float().log_softmax(-1)[:, -len(self.target):].gather(
            -1, self.target.to(logits.device).expand(len(rows), -1).unsqueeze(-1))
        return logp.sum((1, 2)).exp(), {n: v[0] for n, v in seen.items()}

    def _add_noise(self, samples: torch.Tensor):
        noisy = (samples >= 0).nonzero().squeeze(1)
        s0, s1 = self.fact.subject

        def fn(h: torch.Tensor) -> torch.Tensor:  # (rows, seq, d_model)
            h = h.clone()
            h[noisy.to(h.device), s0:s1] += self.noise[samples[noisy].to(self.noise.device)].to(h.device, h.dtype)
            return h

        return fn

    def _patches(self, rows: list[_Row], samples: torch.Tensor) -> dict:
        wanted: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
        for r, row in enumerate(rows):
            for name, tok, clean in row.patches:
                wanted[name].append((r, tok, clean))
        fns = {}
        for name, entries in wanted.items():
            ref = self.clean[name] if name in self.clean else self.corrupt[name]  # on the device of module `name`
            r, t, c = (torch.tensor(x, device=ref.device) for x in zip(*entries))
            values = ref.new_empty(len(entries), ref.shape[-1])  # (entries, d_model)
            if c.any():
                values[c] = self.clean[name][t[c]]
            if not c.all():
                values[~c] = self.corrupt[name][samples.to(ref.device)[r[~c]], t[~c]]
            fns[name] = _overwrite(r, t, values)
        return fns


def _overwrite(rows: torch.Tensor, toks: torch.Tensor, values: torch.Tensor):
    def fn(h: torch.Tensor) -> torch.Tensor:  # (rows, seq, d)
        h = h.clone()
        h[rows.to(h.device), toks.to(h.device)] = values.to(h.device, h.dtype)
        return h

    return fn


# -- noise -----------------------------------------------------------------------------------------
def embedding_std(model: nn.Module, tokenizer, texts: Sequence[str], *, arch: ArchSpec | None = None) -> float:
    """Standard deviation of the token-embedding outputs over the tokens of ``texts`` (a corpus, or the
    subjects to trace as the reference code does)."""
    name = get_arch_spec(model, arch).embed
    embed = model.get_submodule(name)
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InvalidRequestError("embedding_std needs at least one text with tokens")
    with _inference(model):
        return embed(torch.tensor(ids, device=execution_device(model, name))).float().std().item()


def _noise(n_samples: int, n_tokens: int, d_model: int, std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return std * torch.randn(n_samples, n_tokens, d_model, generator=gen)  # (n_samples, n_tokens, d_model)


# -- tracing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    samples: int = 10
    embed_std: float | None = None
    noise_factor: float = 3.0
    corpus: Sequence[str] | None = None
    window: int | None = None
    seed: int = 0
    batch_size: int = 256
    arch: ArchSpec | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size") + (("window",) if self.window is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("noise_factor",) + (("embed_std",) if self.embed_std is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")


_Triple = tuple[str, str, str | None]  # (prompt, subject, object or None)


def _prepare(model, tokenizer, facts: Sequence[_Triple], opts: _Options) -> tuple[list[_Fact], float]:
    """Tokenise the facts (object None: the model's top prediction) and fix the noise std."""
    check_model(model, tokenizer, opts.arch)
    encoded = [_encode_fact(tokenizer, p, s, t, model) for p, s, t in facts]
    std = opts.embed_std
    if std is None:
        std = embedding_std(model, tokenizer, list(opts.corpus or [s for _, s, _ in facts]), arch=opts.arch)
    return encoded, opts.noise_factor * std


def _triples(facts) -> list[_Triple]:
    """``(prompt, subject, target_true)`` of one ``EditRequest`` or a sequence of them; triples pass through."""
    facts = [facts] if isinstance(facts, EditRequest) else list(facts)
    if not facts:
        raise InvalidRequestError("no facts given; pass at least one EditRequest")
    out = []
    for f in facts:
        if isinstance(f, EditRequest):
            out.append((f.prompt, f.subject, f.target_true))
        elif isinstance(f, tuple) and len(f) == 3:
            out.append(f)
        else:
            raise InvalidRequestError(f"facts must be EditRequests, got {type(f).__name__}")
    return out


def _trace_one(model, fact: _Fact, std: float, kind: str, opts: _Options, seed: int) -> TraceResult:
    s0, s1 = fact.subject
    runner = _Runner.build(model, fact, std, opts, seed)
    n_layers = runner.n_layers
    window = 1 if kind == "hidden" else (opts.window or default_window(n_layers))
    names = runner.names[kind]
    high, lows = runner.baseline(names)
    low = lows.mean().item()
    n_tok = len(fact.prompt_ids)
    # Tokens before the subject never see the noise (causal attention): restoring them is the identity.
    cells = [(t, l) for t in range(s0, n_tok) for l in range(n_layers)]
    rows = [_Row(s, tuple((names[k], t, True) for k in _window(l, window, n_layers)))
            for t, l in cells for s in range(opts.samples)]
    probs = runner.run(rows, opts.batch_size).view(len(cells), opts.samples).mean(1)
    scores = torch.full((n_tok, n_layers), low)
    scores[s0:] = probs.view(n_tok - s0, n_layers).cpu()
    return TraceResult(kind, scores, low, high, fact.tokens, fact.subject, fact.text, fact.target, window)


def trace_fact(model: nn.Module, tokenizer, prompt: str, subject: str, target: str | None = None, *,
               kind: str = "hidden", samples: int = 10, embed_std: float | None = None, noise_factor: float = 3.0,
               corpus: Sequence[str] | None = None, window: int | None = None, seed: int = 0,
               batch_size: int = 256, arch: ArchSpec | None = None) -> TraceResult:
    """Trace one fact: P(``target``) after ``prompt`` (one ``{}``) with ``subject``'s embeddings corrupted,
    restoring one state of ``kind`` ("hidden", "mlp" or "attn") at a time.

    ``target`` defaults to the model's top next token. The noise std is ``noise_factor`` x ``embed_std``;
    ``embed_std`` defaults to :func:`embedding_std` over ``corpus`` (or over the subject). ``samples``
    noise samples are drawn from a generator seeded with ``seed``. ``window``: layers restored together
    for "mlp"/"attn" (default :func:`default_window`). The model is left bit-identical.
    """
    return trace_facts(model, tokenizer, [(prompt, subject, target)], kind=kind, samples=samples, embed_std=embed_std,
                       noise_factor=noise_factor, corpus=corpus, window=window, seed=seed, batch_size=batch_size,
                       arch=arch, progress=False)[0]


def trace_facts(model: nn.Module, tokenizer, facts: Sequence[EditRequest], *, kind: str = "hidden",
                progress: bool = True, **options) -> list[TraceResult]:
    """:func:`trace_fact` over many facts (``EditRequest.target_true`` is the object; when absent, the
    model's top prediction). Options as in :func:`trace_fact`; one noise std for all facts."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    facts = _triples(facts)
    opts = _Options(**options)
    with _inference(model):
        encoded, std = _prepare(model, tokenizer, facts, opts)
        return [_trace_one(model, f, std, kind, opts, opts.seed + i)
                for i, f in enumerate(tqdm(encoded, desc=f"tracing {kind}", disable=not progress))]


def average_traces(results: Sequence[TraceResult]) -> TraceResult:
    """Average traces of different facts (one kind) by token category (``CATEGORIES``), as in Figure 8.

    Categories that no fact has (e.g. middle subject tokens when every subject is one token) are dropped.
    """
    if not results or len({(r.kind, r.scores.shape[1]) for r in results}) != 1:
        raise ValueError("average_traces needs a non-empty list of traces of one kind and one model")
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    for r in results:
        for cat, idx in _categories(r.subject_range, len(r.tokens)).items():
            rows[cat].append(r.scores[idx].mean(0))
    cats = [c for c in CATEGORIES if rows[c]]
    scores = torch.stack([torch.stack(rows[c]).mean(0) for c in cats])
    n_subject = sum(c.endswith(("subject token", "subject tokens")) for c in cats)
    first = results[0]
    return TraceResult(first.kind, scores, sum(r.low for r in results) / len(results),
                       sum(r.high for r in results) / len(results), cats, (0, n_subject),
                       f"average over {len(results)} facts", "", first.window, len(results))


def _categories(subject: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    s0, s1 = subject
    cats = {"first subject token": [s0], "middle subject tokens": list(range(s0 + 1, s1 - 1)),
            "last subject token": [s1 - 1], "first subsequent token": [s1] if s1 < n_tokens - 1 else [],
            "further tokens": list(range(s1 + 1, n_tokens - 1)), "last token": [n_tokens - 1]}
    return {k: v for k, v in cats.items() if v}


def trace_severed(model: nn.Module, tokenizer, facts: EditRequest | Sequence[EditRequest], *,
                  modes: Sequence[str] = SEVER_MODES, progress: bool = True, **options) -> SeveredTrace:
    """Figure 3 over ``facts``, averaged: restore the last subject token's hidden state at each layer
    while that token's modules of ``modes`` ("none", "attn", "mlp") stay frozen in the corrupted run.

    Options as in :func:`trace_fact` (``window`` is unused). The model is left bit-identical.
    """
    bad = [m for m in modes if m not in SEVER_MODES]
    if bad or "none" not in modes:
        raise ValueError(f"modes must include 'none' and come from {SEVER_MODES}, got {list(modes)}")
    facts = _triples(facts)
    opts = _Options(**options)
    sums: dict[str, torch.Tensor] = {}
    low = high = 0.0
    with _inference(model):
        encoded, std = _prepare(model, tokenizer, facts, opts)
        for i, fact in enumerate(tqdm(encoded, desc="severed paths", disable=not progress)):
            f_scores, f_low, f_high = _severed_one(model, fact, std, modes, opts, opts.seed + i)
            for m, v in f_scores.items():
                sums[m] = sums.get(m, 0) + v
            low, high = low + f_low, high + f_high
    n = len(encoded)
    text, target = (encoded[0].text, encoded[0].target) if n == 1 else (f"average over {n} facts", "")
    return SeveredTrace({m: v / n for m, v in sums.items()}, low / n, high / n, text, target, n)


def _severed_one(model, fact: _Fact, std: float, modes: Sequence[str], opts: _Options, seed: int):
    runner = _Runner.build(model, fact, std, opts, seed)
    n_layers, last = runner.n_layers, fact.last_subject
    frozen = {m: runner.names[m] for m in modes if m != "none"}
    high, lows = runner.baseline(runner.names["hidden"], [n for names in frozen.values() for n in names])
    rows = []
    for mode in modes:
        freeze = tuple((n, last, False) for n in frozen.get(mode, ()))
        rows += [_Row(s, ((runner.names["hidden"][l], last, True),) + freeze)
                 for l in range(n_layers) for s in range(opts.samples)]
    probs = runner.run(rows, opts.batch_size).view(len(modes), n_layers, opts.samples).mean(2).cpu()
    return dict(zip(modes, probs)), lows.mean().item(), high


# -- choosing the layers ---------------------------------------------------------------------------
def best_range(gap: torch.Tensor, size: int | None = None, *, threshold: float = 0.5) -> list[int]:
    """Contiguous layers where ``gap`` (n_layers,) is largest: the ``size`` consecutive layers with the
    largest total, or (``size=None``) the run around the peak where ``gap >= threshold * peak``."""
    gap = gap.float()
    n = len(gap)
    if size is not None:
        if not 1 <= size <= n:
            raise ValueError(f"size must be between 1 and the number of layers ({n}), got {size}")
        sums = gap.unfold(0, size, 1).sum(1)
        start = int(sums.argmax())
        return list(range(start, start + size))
    peak = int(gap.argmax())
    if gap[peak] <= 0:
        logger.warning("freezing the MLPs opens no gap at any layer; suggesting layer %d only", peak)
        return [peak]
    lo, hi = peak, peak
    while lo > 0 and gap[lo - 1] >= threshold * gap[peak]:
        lo -= 1
    while hi < n - 1 and gap[hi + 1] >= threshold * gap[peak]:
        hi += 1
    return list(range(lo, hi + 1))


def suggest_layers(model: nn.Module, tokenizer, facts: Sequence[EditRequest], *, size: int | None = None,
                   threshold: float = 0.5, progress: bool = True, **options) -> list[int]:
    """The contiguous layers where freezing the last subject token's MLPs opens the largest gap in the
    indirect effect (Figure 3), usable as ``MemitConfig.layers``.

    ``facts``: ``EditRequest``s; ``target_true`` is the object traced (absent: the model's top prediction).
    ``size``/``threshold`` as in :func:`best_range`; other options as in :func:`trace_fact`.
    """
    sev = trace_severed(model, tokenizer, facts, modes=("none", "mlp"), progress=progress, **options)
    layers = best_range(sev.gap("mlp"), size, threshold=threshold)
    logger.info("MLP gap per layer %s -> layers %s", [round(g, 4) for g in sev.gap("mlp").tolist()], layers)
    return layers


# -- command line ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("facts (one, or a CounterFact-format file)")
    src.add_argument("--prompt", help="relation prompt with '{}' where the subject goes (or the full text)")
    src.add_argument("--subject")
    src.add_argument("--object", help="expected object; default: the model's top prediction")
    src.add_argument("--data", type=Path, help="JSON list of CounterFact records (target_true is traced)")
    src.add_argument("--limit", type=int, default=20,
                     help="trace only the first N records (default 20: a few minutes on a CPU; 0 = all)")
    parser.add_argument("--model", required=True,
                        help="model id or directory (AutoModelForCausalLM), or a shipped world model: world-gpt2, "
                             "world-llama, world-gpt2-bpe, world-llama-sp (their records are traced unless facts are "
                             "given)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNGs and trace.json")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--samples", type=int, default=10, help="noise samples per fact (default 10)")
    parser.add_argument("--embed-std", type=float, default=None, help="std of embeddings (default: estimated)")
    parser.add_argument("--noise-factor", type=float, default=3.0, help="noise std = factor x embedding std")
    parser.add_argument("--window", type=int, default=None, help="layers restored together for mlp/attn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per forward pass")
    parser.add_argument("--device", default=None, help="torch device for the model (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--reach", action="store_true",
                        help="instead of tracing: can an edit at the subject's last token change each fact's answer "
                             "to its target_new (memit_adapter.reach)? Writes reach.json")
    parser.add_argument("--reach-layer", type=int, default=None,
                        help="with --reach: the block after which vectors are added (default: the last layer "
                             "MemitConfig.for_model edits, where MEMIT's target vectors sit)")


def run_cli(args: argparse.Namespace) -> int:
    from . import plots

    if not args.reach:
        plots.require_matplotlib("trace")  # checked first: the figures come after all the work
    _check_out_folder(args.out)  # before the model is loaded: a bad path costs nothing
    model, tokenizer, shipped = _load(args.model, args.device)
    records = _cli_records(args, shipped)
    if args.reach:
        return _reach_cli(args, model, tokenizer, records)
    facts = _cli_facts(args, records)
    opts = dict(samples=args.samples, embed_std=args.embed_std, noise_factor=args.noise_factor, seed=args.seed,
                batch_size=args.batch_size)
    for prompt, subject, target in facts:  # a bad fact is refused before any folder is made
        _encode_fact(tokenizer, prompt, subject, target, model)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": args.model, "n_facts": len(facts), "traces": {}}
    traces = {}
    for kind in args.kinds:
        results = trace_facts(model, tokenizer, facts, kind=kind, window=args.window, progress=not args.quiet,
                              **opts)
        traces[kind] = results[0] if len(results) == 1 else average_traces(results)
        report["traces"][kind] = traces[kind].to_dict()
        plots.plot_trace(traces[kind], args.out / f"trace_{kind}.png")
        (args.out / "trace.json").write_text(json.dumps(report, indent=2))  # partial results as they come
    if len(traces) > 1:
        plots.plot_traces(list(traces.values()), args.out / "traces.png")
    sev = trace_severed(model, tokenizer, facts, progress=not args.quiet, **opts)
    plots.plot_severed(sev, args.out / "severed.png")
    report["severed"] = sev.to_dict()
    report["suggested_layers"] = best_range(sev.gap("mlp"))
    (args.out / "trace.json").write_text(json.dumps(report, indent=2))
    print(f"suggested layers: {report['suggested_layers']}  (figures and trace.json in {args.out})")
    default = MemitConfig.for_model(model).layers
    if default != report["suggested_layers"]:
        print(f"MemitConfig.for_model edits layers {default}; to follow the trace, pass "
              f"layers={report['suggested_layers']} (edit --layers {report['suggested_layers'][0]}-"
              f"{report['suggested_layers'][-1]})")
    return 0


def _reach_cli(args: argparse.Namespace, model: nn.Module, tokenizer, records: list[dict] | None) -> int:
    """``trace --reach``: :func:`~memit_adapter.reach.subject_reach` on the records' edits (``--data`` or a world's
    records: their ``target_new``), a summary line and reach.json."""
    from .reach import subject_reach, summarise_reach

    if records is None:
        raise SystemExit("memit-adapter trace --reach: give --data records.json (their target_new is the edit)")
    requests = [EditRequest.from_dict(r) for r in records]
    layer = MemitConfig.for_model(model).layers[-1] if args.reach_layer is None else args.reach_layer
    try:
        results = subject_reach(model, tokenizer, requests, layer, progress=not args.quiet)
    except ConfigError as e:
        raise SystemExit(f"memit-adapter trace --reach: {e}") from None
    summary = summarise_reach(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reach.json").write_text(json.dumps({"model": args.model, "layer": layer, "summary": summary,
                                                     "facts": [r.to_dict() for r in results]}, indent=2))
    print(f"after block {layer}: the subject's last token fails to reach the target of {summary['last_token_fails']} "
          f"of {summary['facts']} facts (another subject token reaches {summary['another_token_reaches']} of them); "
          f"the last token is the best for {summary['best_is_last']}  (reach.json in {args.out})")
    return 0


def _check_out_folder(out: Path) -> None:
    """Refuse an output path that is a file, or whose nearest existing folder cannot be written."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"memit-adapter trace: --out {out} is a file, not a folder")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"memit-adapter trace: cannot create or write {out} ({existing} is not writable)")


def _cli_records(args: argparse.Namespace, shipped: list[dict] | None) -> list[dict] | None:
    """The CounterFact records of the command (``--data``, else a world's own unless ``--prompt`` is given), the
    first ``--limit`` of them; None for a single ``--prompt/--subject`` fact."""
    if args.data is None and not (shipped and not args.prompt):
        return None
    if args.prompt or args.subject:
        raise SystemExit("give either --data or --prompt/--subject, not both")
    records = json.loads(args.data.read_text()) if args.data is not None else shipped
    if args.limit and len(records) > args.limit:
        print(f"tracing the first {args.limit} of {len(records)} records (--limit 0 traces all)")
        records = records[: args.limit]
    return records


def _cli_facts(args: argparse.Namespace, records: list[dict] | None) -> list[_Triple]:
    """The facts to trace: the command's records (:func:`_cli_records`; their ``target_true``), or
    ``--prompt/--subject``."""
    if records is not None:
        return [(r.prompt, r.subject, r.target_true) for r in map(EditRequest.from_dict, records)]
    if not (args.prompt and args.subject):
        raise SystemExit("give --prompt and --subject (and optionally --object), or --data records.json")
    prompt = args.prompt
    if "{}" not in prompt and args.subject in prompt:
        prompt = prompt.replace(args.subject, "{}", 1)
    return [(prompt, args.subject, args.object)]


def _load(name: str, device: str | None):
    model, tokenizer, records = load_model(name)
    return model.to(device or "cpu"), tokenizer, records


__all__ = ["CATEGORIES", "KINDS", "SEVER_MODES", "SeveredTrace", "TraceResult", "average_traces",
           "best_range", "default_window", "embedding_std", "subject_token_range", "suggest_layers", "trace_fact",
           "trace_facts", "trace_modules", "trace_severed"]
