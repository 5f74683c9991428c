"""Train a small GPT-2- or LLaMA-architecture model from scratch, on CPU, until it knows the fact world.

Usage (the commands of the shipped checkpoints)::

    python -m memit_adapter.demo.train --arch gpt2 --position-dims 16 --out memit_adapter/demo/assets/world-gpt2
    python -m memit_adapter.demo.train --arch llama --d-ff 512 --lr 0.004 --switch-epoch 12 \
        --no-freeze-name-embeddings --out memit_adapter/demo/assets/world-llama
    python -m memit_adapter.demo.train --arch gpt2 --tokenizer bpe --vocab-size 780 $CONVENTIONAL \
        --out memit_adapter/demo/assets/world-gpt2-bpe
    python -m memit_adapter.demo.train --arch llama --tokenizer sentencepiece --vocab-size 540 --d-ff 688 \
        --untie-embeddings $CONVENTIONAL --out memit_adapter/demo/assets/world-llama-sp

    # the deeper and wider GPT-2 behind MemitConfig.for_model's constants (not shipped: 16 MB; 40 min, 99.8%):
    python -m memit_adapter.demo.train --arch gpt2 --tokenizer bpe --vocab-size 780 $CONVENTIONAL \
        --n-layer 8 --d-model 288 --n-head 4 --d-ff 1152 --epochs 14 --max-minutes 48 --out world-gpt2-bpe-8l

    # no shaping, a 600-subject world, sentences packed into rows of 64 tokens from the first epoch:
    CONVENTIONAL="--attn-free-layers 0 --no-freeze-name-embeddings --subjects 600 --d-model 256 \
        --seq-len 64 --switch-epoch 0 --packed-share 1 --batch-size 16 --lr 1e-3 --weight-decay 0.01 \
        --warmup 150 --min-lr-ratio 0.1 --name-weight 1 --epochs 20 --target 1 --threads 2 --max-minutes 30"

(The last two ran on two CPU cores shared with other jobs, with ``OMP_WAIT_POLICY=PASSIVE``: OpenMP's
spinning threads made a step five times slower when the cores were busy. Both stopped at the time limit,
GPT-2 after 17 epochs, LLaMA after 13, with worst-template recall 99.8% and 99.3%; see their
``training.json``.)

The first two were shaped until MEMIT worked on them:
what makes the model editable the way large LMs are (see ``silence_attention`` and ``freeze_rows``):
its first ``--attn-free-layers`` blocks have no attention, and name embeddings are frozen random
vectors, so a subject's facts live in the early MLPs at its last token and later positions can only
read them from there. A subject's keys in those blocks must also be the same at every position: with
GPT-2's stock position embeddings, even keys that agree to cos 0.976 across positions left 100 edits
at ES 72% / NS 69% (the solve's inverse amplifies the difference). ``--position-dims`` keeps positions
in coordinates the first blocks neither read nor write (``separate_positions``), so those keys are
exactly position-free while later blocks see word order; ``--no-position-embeddings`` drops positions
altogether (order then comes from the causal mask alone, and greedy generations loop after the first
sentence). LLaMA's rotary positions act inside attention only, so its attention-free blocks are
position-free as they are.

The corpus states every fact of ``make_world(seed)`` in every template, plus a little filler. Each
epoch shuffles the sentences and packs them into sequences of ``--seq-len`` tokens, so facts are
learned both at the start of a text and after unrelated context (MEMIT prefixes its prompts with
sampled text). What makes a 6-layer model memorise 2,100 facts within minutes: a unique last subject
token, extra loss weight on the object tokens, a high learning rate and many epochs (``--names
composite`` worlds, whose subjects are only unique as a (first name, surname) pair, take about 16
epochs to get going). Training stops once every template reaches ``--target`` recall (greedy next
word == object), or at ``--max-minutes``.
The output folder holds float16 safetensors, config, tokenizer, the corpus, the world, its
CounterFact records and ``training.json`` (settings, recall per template, sizes, time).

``--tokenizer bpe|sentencepiece`` trains a GPT-2- or LLaMA-style subword tokenizer on the corpus
(``world.train_world_tokenizer``) instead of the word-level one; names and some objects are then several
tokens, recall asks for the whole object greedily, and the records store targets without a leading
space, as CounterFact does. With the flags of ``$CONVENTIONAL`` above nothing is shaped: every block
has attention, positions are the architecture's own, no weight is frozen or zeroed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from memit_adapter.demo.world import (
    NAME_STYLES,
    TOKENIZER_KINDS,
    build_world_tokenizer,
    make_world,
    pack_documents,
    recall_by_template,
    train_world_tokenizer,
)

log = logging.getLogger("train_world")

SPECIAL = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def build_model(arch: str, vocab_size: int, args: argparse.Namespace) -> torch.nn.Module:
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=args.seq_len, n_embd=args.d_model,
                            n_layer=args.n_layer, n_head=args.n_head, n_inner=args.d_ff, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=args.tie_embeddings, **SPECIAL)
        model = silence_attention(GPT2LMHeadModel(config), args.attn_free_layers)
        if not args.position_embeddings:
            with torch.no_grad():
                model.transformer.wpe.weight.zero_()
            model.transformer.wpe.weight.requires_grad_(False)
        return model
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.d_model, num_hidden_layers=args.n_layer,
                         num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
                         intermediate_size=args.d_ff, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=args.tie_embeddings, **SPECIAL)
    return silence_attention(LlamaForCausalLM(config), args.attn_free_layers)


def silence_attention(model: torch.nn.Module, n_layers: int) -> torch.nn.Module:
    """Zero and freeze the attention output projection of the first ``n_layers`` blocks.

    Those blocks then only run their MLP, so a token's state after them depends on that token alone,
    and a later position can learn a fact about the subject only by reading the subject's own state
    after them. That is the flow causal tracing finds in large LMs (early MLPs at the last subject
    token enrich it, later attention reads it) and the flow MEMIT edits; without it a small model
    reads the unique surname's embedding from the last prompt token in its first layers and looks the
    fact up there, out of MEMIT's reach. The checkpoint stays a stock model: the zeros are weights.
    """
    from memit_adapter.arch import get_arch_spec

    spec = get_arch_spec(model)
    if not 0 <= n_layers < spec.num_layers(model):
        raise ValueError(f"--attn-free-layers must be in 0..{spec.num_layers(model) - 1} (the model needs attention "
                         f"somewhere), got {n_layers}")
    for i in range(n_layers):
        attn = spec.blocks(model)[i].get_submodule(spec.attn)
        out_proj = attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj
        with torch.no_grad():
            out_proj.weight.zero_()
            if out_proj.bias is not None:
                out_proj.bias.zero_()
        for p in attn.parameters():
            p.requires_grad_(False)
    return model


def separate_positions(model: torch.nn.Module, dims: int, n_blocks: int) -> None:
    """GPT-2: positions live only in the last ``dims`` coordinates of the residual stream, as a frozen
    sinusoidal code, and the first ``n_blocks`` (attention-free) blocks neither read nor write them.

    Each position's code is ``[sin, cos, -sin, -cos]`` of ``dims / 4`` frequencies: its mean is zero and its
    norm the same at every position, so LayerNorm's mean and scale at a token do not depend on where it
    stands; token embeddings are zero (frozen) in those coordinates, and in the first blocks the MLP's
    LayerNorm gain and bias are zero there (it does not read them) and its output projection is zero there
    (it does not write them). A token's MLP keys in those blocks are then exactly the same at every
    position, as without position embeddings, while the later attention blocks see word order.
    """
    d = model.config.n_embd
    if dims <= 0 or dims % 4 or dims >= d:
        raise ValueError(f"--position-dims must be a positive multiple of 4 below d_model {d}, got {dims}")
    pos = torch.arange(model.config.n_positions, dtype=torch.float32)[:, None]
    freqs = model.config.n_positions ** (-torch.arange(dims // 4, dtype=torch.float32) / (dims // 4))
    angle = pos * freqs
    code = torch.cat([angle.sin(), angle.cos(), -angle.sin(), -angle.cos()], dim=1)
    code = code * model.config.initializer_range * 2**0.5  # each coordinate's RMS is the init std
    cols = slice(d - dims, d)
    wpe = model.transformer.wpe.weight
    with torch.no_grad():
        wpe.zero_()
        wpe[:, cols] = code
    wpe.requires_grad_(False)
    zero_columns(model.transformer.wte.weight, cols, dim=1)
    for block in model.transformer.h[:n_blocks]:
        zero_columns(block.ln_2.weight, cols, dim=0)
        zero_columns(block.ln_2.bias, cols, dim=0)
        zero_columns(block.mlp.c_proj.weight, cols, dim=1)  # Conv1D: (d_ff, d_model)
        zero_columns(block.mlp.c_proj.bias, cols, dim=0)


def zero_columns(weight: torch.nn.Parameter, cols: slice, dim: int) -> None:
    """Set ``weight``'s slice ``cols`` along ``dim`` to zero and keep it there (its gradient is masked)."""
    mask = torch.ones_like(weight)
    mask.narrow(dim, cols.start, cols.stop - cols.start).zero_()
    with torch.no_grad():
        weight.mul_(mask)
    mask_gradient(weight, mask)


def mask_gradient(weight: torch.nn.Parameter, mask: torch.Tensor) -> None:
    """Multiply ``weight``'s gradient by ``mask``: where it is 0, Adam without weight decay never moves it."""
    weight.register_hook(lambda grad: grad * mask)


def freeze_rows(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Keep ``rows`` of an embedding at their random initial values (their gradient is zeroed).

    Frozen random name embeddings carry no facts, so the model has to store each subject's facts in the
    MLPs that read them, and two subjects' keys are as different as two random vectors make them, not
    as alike as their attributes (trained name embeddings end up coding the attributes, and the
    subjects' keys then span only ~60-100 directions, too few to edit hundreds of subjects apart).
    """
    mask = torch.ones_like(weight)
    mask[rows] = 0.0
    mask_gradient(weight, mask)


def encode_corpus(world, tokenizer, n_repeat_filler: int, obj_weight: float, name_weight: float):
    """Per sentence, (token ids, loss weight per token) twice, without special tokens: as a text of its own
    and after a space, as it continues a row of running text (byte-level BPE: ``otto`` vs ``Ġotto``).

    Object tokens weigh ``obj_weight``; the tokens of names, which no model can predict, ``name_weight``.
    Tokens are matched to the name and the object by their character offsets, so a name or an object of
    several subword tokens is weighted whole.
    """
    items = []
    for f in world.facts:
        for t, template in enumerate(world.relation(f.relation).templates):
            prompt, start = world.prompt(f, t), template.index("{}")
            spans = [(start, start + len(f.subject), name_weight),
                     (len(prompt) + 1, len(prompt) + 1 + len(f.obj), obj_weight)]
            items.append(tuple(encode_weighted(tokenizer, f"{prompt} {f.obj} .", spans, lead) for lead in ("", " ")))
    for text in world.filler * n_repeat_filler:
        items.append(tuple(encode_weighted(tokenizer, text, [], lead) for lead in ("", " ")))
    return items


def encode_weighted(tokenizer, text: str, spans: list[tuple[int, int, float]], lead: str = ""):
    """(ids, weights) of ``lead + text``: a token overlapping a character span ``(start, end, weight)`` of
    ``text`` gets its weight, the others 1."""
    enc = tokenizer(lead + text, add_special_tokens=False, return_offsets_mapping=True)
    weights = []
    for a, b in enc["offset_mapping"]:
        a, b = a - len(lead), b - len(lead)
        weights.append(next((w for start, end, w in spans if a < end and b > start), 1.0))
    return list(enc["input_ids"]), weights


def pack_rows(items, rng: random.Random, seq_len: int, bos: int | None):
    """Concatenate sentences into (input_ids, loss weights) rows of at most seq_len tokens; the first
    sentence of a row in its own form, the others in their form after a space."""
    rows, cur_ids, cur_w = [], [], []
    start = [bos] if bos is not None else []
    for first, after in items:
        if cur_ids and len(cur_ids) + len(after[0]) > seq_len:
            rows.append((cur_ids, cur_w))
            cur_ids, cur_w = [], []
        ids, weights = after if cur_ids else first
        if not cur_ids:
            cur_ids, cur_w = list(start), [0.0] * len(start)
        cur_ids += ids
        cur_w += weights
    if cur_ids:
        rows.append((cur_ids, cur_w))
    return rows


def single_rows(items, fillers, rng: random.Random, bos: int | None, prefix_prob: float):
    """One sentence per row, some after a filler sentence, so that recall survives a prefix."""
    rows = []
    for first, after in items:
        row_ids, row_w = ([bos], [0.0]) if bos is not None else ([], [])
        ids, weights = first
        if fillers and rng.random() < prefix_prob:
            prefix = rng.choice(fillers)
            row_ids, row_w = row_ids + prefix, row_w + [1.0] * len(prefix)
            ids, weights = after
        rows.append((row_ids + ids, row_w + weights))
    return rows


def epoch_batches(items, fillers, rng: random.Random, args, bos: int | None, packed_share: float):
    """Shuffled batches of one epoch: single-sentence rows, and a share of sentences packed into long rows.

    Single sentences make the subject the only name in context, which is what lets a small model get
    past the plateau where it knows the templates but not the facts; packed rows teach it positions up
    to ``seq_len`` and to find the most recent subject among several.
    """
    order = list(items)
    rng.shuffle(order)
    n_packed = int(packed_share * len(order))
    packed = pack_rows(order[:n_packed], rng, args.seq_len, bos)
    single = single_rows(order[n_packed:], fillers, rng, bos, args.prefix_prob)
    out = [packed[i:i + args.batch_size] for i in range(0, len(packed), args.batch_size)]
    out += [single[i:i + args.single_batch_size] for i in range(0, len(single), args.single_batch_size)]
    rng.shuffle(out)
    return out


def to_tensors(chunk, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    w = torch.zeros(len(chunk), width)
    for j, (row_ids, row_w) in enumerate(chunk):
        ids[j, :len(row_ids)] = torch.tensor(row_ids)
        w[j, :len(row_w)] = torch.tensor(row_w)
    return ids, w


def weighted_loss(model, ids: torch.Tensor, w: torch.Tensor, pad: int, obj_weight: float):
    """Weighted mean NLL, and the mean NLL of the object tokens alone (for the log)."""
    mask = (ids != pad).long()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (b, t-1, vocab)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view_as(ids[:, 1:])
    target_w = w[:, 1:]  # the weight of a token is that of the position it is predicted at
    is_obj = target_w == obj_weight
    return (nll * target_w).sum() / target_w.sum(), nll[is_obj].mean().item() if is_obj.any() else float("nan")


def min_recall(recall: dict[str, dict[int, float]]) -> float:
    return min(v for by_t in recall.values() for v in by_t.values())


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    world = make_world(args.world_seed, names=args.names, n_subjects=args.subjects)
    tokenizer = make_tokenizer(world, args)
    model = build_model(args.arch, len(tokenizer), args)
    if args.freeze_name_embeddings:
        if args.tokenizer != "word":
            raise ValueError(f"--tokenizer {args.tokenizer}: name tokens are subwords shared with other words, "
                             "there are no name embeddings to freeze; pass --no-freeze-name-embeddings")
        if args.weight_decay:
            raise ValueError("frozen name embeddings need --weight-decay 0 (AdamW's decay would move them)")
        rows = sorted({tokenizer.convert_tokens_to_ids(w) for s in world.subjects for w in s.split()})
        if args.name_std > 0:  # else they keep the model's initial values
            with torch.no_grad():
                model.get_input_embeddings().weight[rows] = torch.randn(len(rows), args.d_model) * args.name_std
        freeze_rows(model.get_input_embeddings().weight, rows)
    if args.position_dims:
        if args.arch != "gpt2" or not args.position_embeddings:
            raise ValueError("--position-dims is for GPT-2 with position embeddings")
        separate_positions(model, args.position_dims, args.attn_free_layers)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2fM parameters, vocab %d", args.arch, n_params / 1e6, len(tokenizer))
    items = encode_corpus(world, tokenizer, args.filler_repeat, args.obj_weight, args.name_weight)
    fillers = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in world.filler]
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    bos = tokenizer.bos_token_id if adds_bos else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)

    def lr_at(progress: float, step: int) -> float:  # progress in epochs / planned epochs
        warm = min(1.0, (step + 1) / args.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)

    probe = rng.sample(world.facts, min(args.probe, len(world.facts)))
    packed_share = args.packed_share if args.switch_epoch == 0 else 0.0  # 0: packed rows from the start
    t0, step, history = time.time(), 0, []
    for epoch in range(1, args.epochs + 1):
        model.train()
        chunks = epoch_batches(items, fillers, rng, args, bos, packed_share)
        total, obj_total = 0.0, 0.0
        for i, chunk in enumerate(chunks):
            for group in opt.param_groups:
                group["lr"] = lr_at((epoch - 1 + i / len(chunks)) / args.epochs, step)
            ids, w = to_tensors(chunk, tokenizer.pad_token_id)
            loss, obj_nll = weighted_loss(model, ids, w, tokenizer.pad_token_id, args.obj_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            total += loss.item()
            obj_total += obj_nll if obj_nll == obj_nll else 0.0
        minutes = (time.time() - t0) / 60
        model.eval()
        recall = recall_by_template(model, tokenizer, world, facts=probe)
        mean_recall = sum(v for r in recall.values() for v in r.values()) / sum(len(r) for r in recall.values())
        history.append({"epoch": epoch, "loss": round(total / len(chunks), 4),
                        "object_nll": round(obj_total / len(chunks), 4), "packed_share": packed_share,
                        "probe_mean_recall": round(mean_recall, 4), "probe_min_recall": round(min_recall(recall), 4),
                        "minutes": round(minutes, 2)})
        log.info("epoch %d  loss %.4f  object nll %.3f  probe recall mean %.3f min %.3f  packed %.2f  lr %.2e  "
                 "%.1f min", epoch, total / len(chunks), obj_total / len(chunks), mean_recall, min_recall(recall),
                 packed_share, opt.param_groups[0]["lr"], minutes)
        if packed_share == 0.0 and (mean_recall >= args.switch_recall or epoch >= args.switch_epoch):
            packed_share = args.packed_share  # phase 2: also learn long, multi-sentence texts
        elif packed_share > 0 and epoch >= args.min_epochs and min_recall(recall) >= args.target:
            full = recall_by_template(model, tokenizer, world)
            log.info("full min recall %.4f", min_recall(full))
            if min_recall(full) >= args.target:
                break
        if minutes > args.max_minutes:
            log.warning("stopping at the time limit of %.0f minutes", args.max_minutes)
            break
    train_minutes = (time.time() - t0) / 60
    save(args, model, tokenizer, world, history, train_minutes, epoch, step, n_params)


def make_tokenizer(world, args: argparse.Namespace):
    """The word-level tokenizer (BOS for LLaMA), or a subword one trained on the world's corpus."""
    if args.tokenizer == "word":
        return build_world_tokenizer(world, add_bos=args.arch == "llama")
    if not args.vocab_size:
        raise ValueError(f"--tokenizer {args.tokenizer} needs --vocab-size (see world.train_world_tokenizer)")
    return train_world_tokenizer(world, kind=args.tokenizer, vocab_size=args.vocab_size)


def token_counts(world, tokenizer) -> dict:
    """How many tokens names and objects take: histograms over subjects and surnames in running text (after
    a space, as after a template's words) and at the start of a text, and the objects of several tokens."""
    def histogram(texts):
        counts = Counter(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        return {n: counts[n] for n in sorted(counts)}

    objects = {o: tokenizer.tokenize(" " + o) for rel in world.relations for o in rel.objects}
    return {"subject": histogram(" " + s for s in world.subjects),
            "subject_at_text_start": histogram(world.subjects),
            "surname": histogram(" " + s.split()[-1] for s in world.subjects),
            "objects": len(objects),
            "multi_token_objects": {o: toks for o, toks in objects.items() if len(toks) > 1}}


def write_corpus(out: Path, world, tokenizer, seq_len: int, *, packed: bool = True) -> None:
    """``out/corpus.txt``, the world's text for the key statistics: each training sentence on a line of its own,
    then (``packed``) the same sentences shuffled and joined into running texts of at most ``seq_len`` tokens, as
    the model read them in training (:func:`~memit_adapter.demo.world.pack_documents`); about as many tokens of each.

    The one-sentence lines hold the keys of prompts read from the start of a text; the running texts hold keys at
    every position up to the end of the context, where generation runs. From the lines alone, 100 edits raised the
    entropy of greedy generations by 22% on world-gpt2-bpe (the text fell apart after three sentences), 5.7% on
    world-llama-sp; with the running texts added, 6.3% and 4.4%. :func:`save` writes the lines alone for the
    word-level worlds, whose shipped settings were tuned on them.
    """
    sentences = world.corpus_sentences()
    texts = sentences + (pack_documents(sentences, tokenizer, seq_len) if packed else [])
    (out / "corpus.txt").write_text("\n".join(texts) + "\n")


def save(args, model, tokenizer, world, history, train_minutes, epochs, steps, n_params) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    word_level = args.tokenizer == "word"
    write_corpus(out, world, tokenizer, args.seq_len, packed=not word_level)
    (out / "world.json").write_text(json.dumps(world.to_dict()))
    leading_space = word_level  # subword worlds store CounterFact's targets, "paris"
    (out / "records.json").write_text(json.dumps(world.counterfact_records(leading_space=leading_space)))
    # recall of the shipped (float16-rounded) weights, loaded back as float32 the way users load them
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    recall = recall_by_template(shipped, tok, world)
    recall_prefixed = recall_by_template(shipped, tok, world, prefix=world.filler[0] + " ")
    report = {
        "name": out.name,
        "arch": args.arch,
        "tokenizer": args.tokenizer,
        "parameters": n_params,
        "config": {k: getattr(args, k) for k in ("n_layer", "d_model", "d_ff", "n_head", "seq_len",
                                                 "attn_free_layers", "position_embeddings",
                                                 "freeze_name_embeddings", "name_std", "tie_embeddings",
                                                 "position_dims")},
        "training": {k: getattr(args, k) for k in ("lr", "min_lr_ratio", "warmup", "batch_size", "obj_weight",
                                                   "name_weight", "weight_decay", "single_batch_size", "prefix_prob",
                                                   "packed_share", "switch_recall", "switch_epoch",
                                                   "filler_repeat", "threads", "seed", "world_seed", "names",
                                                   "subjects", "vocab_size", "target", "epochs", "max_minutes")},
        "epochs": epochs,
        "steps": steps,
        "train_minutes": round(train_minutes, 2),
        "world": {"subjects": len(world.subjects), "relations": len(world.relations), "facts": len(world.facts),
                  "templates_per_relation": len(world.relations[0].templates), "vocab": len(tok)},
        "records_leading_space": leading_space,
        "corpus_packed": not word_level,
        "tokens": token_counts(world, tok),
        "recall_by_template": recall,
        "min_recall": min_recall(recall),
        "recall_after_filler_prefix": {"prefix": world.filler[0], "min": min_recall(recall_prefixed),
                                       "by_template": recall_prefixed},
        "history": history,
    }
    report["files_bytes"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != "training.json"}
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    write_card(out)
    log.info("saved to %s; min recall per template %.4f", out, report["min_recall"])


def write_card(out: Path) -> None:
    """README.md of a checkpoint folder, from its training.json."""
    r = json.loads((out / "training.json").read_text())
    templates = {}
    world = json.loads((out / "world.json").read_text())
    for rel in world["relations"]:
        templates[rel["relation_id"]] = rel["templates"]
    names = r["training"].get("names", "unique_surname")
    name_text = ("first names and surnames each shared by many people, only the pair unique"
                 if names == "composite" else "each with a surname of their own")
    name = r.get("name", f"world-{r['arch']}")
    key = name[len("world-"):] if name.startswith("world-") else r["arch"]
    world_args = f"{r['training']['world_seed']}, names=\"{names}\""
    if r["world"]["subjects"] != 300:
        world_args += f", n_subjects={r['world']['subjects']}"
    subword = r.get("tokenizer", "word") != "word"
    recall_text = "greedy continuation = every token of the true object" if subword else \
        "greedy next word = true object"
    lines = [
        f"# {name}: a {r['config']['n_layer']}-layer {r['arch']} model that knows a fact world", "",
        "Trained from scratch on CPU by `python -m memit_adapter.demo.train` on the world of "
        f"`memit_adapter.demo.world.make_world({world_args})`: "
        f"{r['world']['subjects']} invented people ({name_text}), {r['world']['relations']} relations, "
        f"{r['world']['facts']} facts, each stated in "
        f"{r['world']['templates_per_relation']} templates. Load it with `load_world_model(\"{key}\")`.", "",
        f"- parameters: {r['parameters']:,} (d_model {r['config']['d_model']}, d_ff {r['config']['d_ff']}, "
        f"{r['config']['n_head']} heads, context {r['config']['seq_len']}); weights stored in float16",
        *_tokenizer_lines(r),
        *_design_lines(r["config"], r["arch"]),
        *_recipe_lines(r),
        f"- training: {r['epochs']} epochs{_stop_text(r)}, {r['steps']} steps, {r['train_minutes']} minutes on "
        f"{r['training']['threads']} CPU thread(s); settings in `training.json`",
        f"- recall ({recall_text}), worst template: {100 * r['min_recall']:.1f}%; after a "
        f"filler sentence: {100 * r['recall_after_filler_prefix']['min']:.1f}%", "",
        "| relation | template | recall |", "|---|---|---|",
    ]
    for rel, by_t in r["recall_by_template"].items():
        for t, value in by_t.items():
            lines.append(f"| {rel} | `{templates[rel][int(t)]}` | {100 * value:.1f}% |")
    targets = "" if r.get("records_leading_space", True) else ", targets without a leading space as in CounterFact"
    packed = ", then the same packed into running texts: the statistics corpus" if r.get("corpus_packed") else ""
    lines += ["", f"Files: `model.safetensors`, `config.json`, tokenizer files, `corpus.txt` (the training sentences"
              f"{packed}), `world.json` (the world), `records.json` (its facts as CounterFact records{targets}), "
              "`training.json`."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _stop_text(r: dict) -> str:
    """Why training stopped before the end of its schedule, if it did (older reports do not say)."""
    planned, limit = r["training"].get("epochs"), r["training"].get("max_minutes")
    if not planned or r["epochs"] >= planned:
        return ""
    why = f"the time limit of {limit:g} minutes" if limit and r["train_minutes"] > limit else "the target recall"
    return f" of a {planned}-epoch schedule, stopped at {why}"


def _tokenizer_lines(r: dict) -> list[str]:
    """Card lines on the tokenizer and how many tokens names and objects take."""
    kind, vocab = r.get("tokenizer", "word"), r["world"]["vocab"]
    if kind == "word":
        return [f"- vocabulary: {vocab} words (word-level `tokenizers` model, lower-cased)"]
    what = ("byte-level BPE like GPT-2's (all 256 bytes, no BOS)" if kind == "bpe" else
            "SentencePiece-style BPE like LLaMA's (Metaspace `▁`, `<s>` in front of every text)")
    tokens = r["tokens"]
    multi = tokens["multi_token_objects"]

    def hist(h: dict) -> str:
        return ", ".join(f"{n}: {count}" for n, count in h.items())

    return [f"- tokenizer: {what}, {vocab} tokens, trained on the corpus by "
            f"`train_world_tokenizer(world, kind=\"{kind}\", vocab_size={vocab})`",
            f"- tokens per subject in running text (tokens: subjects): {hist(tokens['subject'])}; per surname: "
            f"{hist(tokens['surname'])}",
            f"- {len(multi)} of the {tokens['objects']} objects take several tokens: "
            + ", ".join(f"{o} ({' '.join(toks)})" for o, toks in multi.items())]


def _recipe_lines(r: dict) -> list[str]:
    """Card line on the conventional recipe (absent for the shaped models and older reports)."""
    c, t = r["config"], r["training"]
    if c.get("attn_free_layers") or c.get("freeze_name_embeddings") or t.get("switch_epoch") != 0:
        return []
    return [f"- recipe: sentences packed into rows of at most {c['seq_len']} tokens, reshuffled every epoch; "
            f"AdamW lr {t['lr']:g}, betas (0.9, 0.98), weight decay {t['weight_decay']:g}, {t['warmup']} warm-up "
            f"steps, cosine to {100 * t['min_lr_ratio']:g}%; loss x{t['obj_weight']:g} on object tokens, "
            f"x{t['name_weight']:g} on name tokens; batch {t['batch_size']}; no dropout"]


def _design_lines(config: dict, arch: str) -> list[str]:
    """Card lines on the choices that make the model editable like a large LM (absent in older reports), or
    on their absence."""
    shaped = (config.get("attn_free_layers", 0) or config.get("freeze_name_embeddings") or config.get("position_dims")
              or config.get("position_embeddings") is False)
    if not shaped:
        stock = "`GPT2LMHeadModel` with learned position embeddings" if arch == "gpt2" else \
            "`LlamaForCausalLM` with rotary positions"
        lines = [f"- no shaping: a stock {stock}, every block with attention, nothing frozen or zeroed, trained "
                 "the ordinary way"]
        return lines + (["- untied LM head"] if config.get("tie_embeddings") is False else [])
    lines = []
    k = config.get("attn_free_layers", 0)
    if k:
        stock_positions = arch == "gpt2" and config.get("position_embeddings") and not config.get("position_dims")
        where = " (and its position)" if stock_positions else ""
        lines.append(f"- blocks 0-{k - 1} have no attention (output projection zero, kept frozen): a token's state "
                     f"after them depends on that token{where} alone, and later positions learn about "
                     "the subject only by reading the subject's own state, which is where MEMIT writes")
    if config.get("freeze_name_embeddings"):
        std = config.get("name_std") or "of the initialisation"
        lines.append(f"- the embeddings of name words are random (std {std}) and frozen, so facts "
                     "are stored in the MLPs that read them and different subjects have different keys")
    if config.get("position_dims"):
        lines.append(f"- positions: a frozen sinusoidal code in the last {config['position_dims']} of the residual "
                     "coordinates, which token embeddings and the attention-free blocks leave alone, so a token's "
                     "keys there are the same at every position while later blocks see word order")
    if config.get("position_embeddings") is False:
        lines.append("- no position embeddings (zero, frozen): word order comes from the causal mask alone")
    if config.get("tie_embeddings") is False:
        lines.append("- untied LM head")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--out", required=True)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--no-position-embeddings", dest="position_embeddings", action="store_false",
                   help="GPT-2: zero and freeze wpe (order then comes from the causal mask alone), so that "
                        "a token's state after the attention-free blocks does not depend on its position")
    p.add_argument("--position-dims", type=int, default=0,
                   help="GPT-2: a frozen sinusoidal position code in this many residual coordinates that the "
                        "attention-free blocks neither read nor write (see separate_positions); 0 = stock wpe")
    p.add_argument("--no-freeze-name-embeddings", dest="freeze_name_embeddings", action="store_false",
                   help="train the embeddings of name words too (see freeze_rows)")
    p.add_argument("--untie-embeddings", dest="tie_embeddings", action="store_false",
                   help="a separate, trainable LM head (so large frozen name embeddings do not set name logits)")
    p.add_argument("--name-std", type=float, default=0.0,
                   help="std of the frozen random name embeddings; 0 keeps the model's initialisation "
                        "(std 0.02 in GPT-2 and LLaMA)")
    p.add_argument("--attn-free-layers", type=int, default=3,
                   help="first blocks whose attention output is zero (see silence_attention)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--epochs", type=int, default=40, help="length of the cosine schedule")
    p.add_argument("--min-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch of packed text")
    p.add_argument("--single-batch-size", type=int, default=64, help="rows per batch of single sentences")
    p.add_argument("--prefix-prob", type=float, default=0.25, help="share of single sentences after a filler")
    p.add_argument("--packed-share", type=float, default=0.5, help="share of sentences packed, phase 2")
    p.add_argument("--switch-recall", type=float, default=0.9, help="probe recall that starts phase 2")
    p.add_argument("--switch-epoch", type=int, default=20,
                   help="epoch that starts phase 2 at the latest; 0 = packed rows from the first epoch")
    p.add_argument("--obj-weight", type=float, default=5.0)
    p.add_argument("--name-weight", type=float, default=0.2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--filler-repeat", type=int, default=2)
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--probe", type=int, default=300, help="facts checked after each epoch")
    p.add_argument("--max-minutes", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--names", choices=NAME_STYLES, default="unique_surname",
                   help="subject names of make_world: shared first names and surnames, or unique surnames")
    p.add_argument("--subjects", type=int, default=300, help="subjects of make_world")
    p.add_argument("--tokenizer", choices=("word",) + TOKENIZER_KINDS, default="word",
                   help="word-level, or a GPT-2-style byte-level BPE / LLaMA-style SentencePiece BPE trained on the "
                        "corpus (world.train_world_tokenizer)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="vocabulary of a subword tokenizer, small enough that surnames split into several tokens")
    p.add_argument("--card-only", action="store_true", help="only rewrite README.md from training.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cli_args = parse_args()
    if cli_args.card_only:
        write_card(Path(cli_args.out))
    else:
        train(cli_args)
