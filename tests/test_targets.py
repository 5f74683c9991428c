import math
from contextlib import contextmanager

import pytest
import torch
from engine_setup import VARIED_TEMPLATES, config, model_and_tokenizer, requests, varied_requests
from tiny import ARCHS, make_tokenizer, tiny_model

from memit_adapter.arch import get_arch_spec
from memit_adapter.hooks import capture_outputs
from memit_adapter.targets import (
    LENGTH_BUCKETS,
    _batch_parts,
    _build_batch,
    _forward_step,
    _select_parts,
    compute_targets,
    context_templates,
    length_buckets,
    lookup_states,
)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_targets_equal_one_at_a_time(arch):
    model, tok = model_and_tokenizer(arch)
    spec = get_arch_spec(model)
    reqs = requests()
    # a threshold that some rows reach before the last step exercises the per-row early stop
    cfg = config(v_num_grad_steps=15, v_loss_threshold=2.9)
    templates = ["{}", "the man said . {}", "he said that {}"]
    z_all, h_all = compute_targets(model, spec, tok, reqs, templates, cfg, 2, progress=False)
    z_one, h_one = compute_targets(model, spec, tok, reqs, templates, cfg, 2, batch_size=1, progress=False)
    torch.testing.assert_close(h_all, h_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_all, z_one, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(z_all, h_all)


def test_targets_respect_norm_clamp():
    model, tok = model_and_tokenizer("gpt2")
    cfg = config(clamp_norm_factor=0.1)
    z, h = compute_targets(model, get_arch_spec(model), tok, requests(), ["{}"], cfg, 1, progress=False)
    ratio = (z - h).norm(dim=-1) / h.norm(dim=-1)
    assert (ratio <= 0.1 + 1e-4).all() and (ratio > 0.09).all()


def test_context_templates_are_seeded_and_well_formed():
    model, tok = model_and_tokenizer("gpt2")
    cfg = config(context_templates=None, context_template_length=4,
                 context_template_starts=["the", "therefore", "because", "i", "you"])
    a, b = context_templates(model, tok, cfg), context_templates(model, tok, cfg)
    other = context_templates(model, tok, cfg.replace(seed=1))
    assert a == b and a != other
    assert a[0] == "{}" and len(a) == 1 + len(cfg.context_template_starts)
    assert all(t.count("{}") == 1 and t.endswith(". {}") for t in a[1:])
    assert [t.split()[0] for t in a[1:]] == cfg.context_template_starts


def _reference_states(model, spec, layer, batch, row_delta):
    """Independent of the cut: each row run alone, unpadded, in full, with a hook adding its δ at its lookup."""
    out = []
    for r in range(len(batch.lookup)):
        ids = batch.input_ids[r:r + 1, : int(batch.attention_mask[r].sum())]
        with _added_at(spec.blocks(model)[layer], int(batch.lookup[r]), row_delta[r]):
            out.append(model.base_model(input_ids=ids).last_hidden_state[0])
    return out


# every architecture; and a sliding window shorter than the rows, and eager attention
MODELS = [pytest.param(arch, {}, id=arch) for arch in ARCHS] + [
    pytest.param("mistral", {"sliding_window": 3}, id="mistral-window3"),
    pytest.param("llama", {"attn_implementation": "eager"}, id="llama-eager")]


@pytest.mark.parametrize("arch,overrides", MODELS)
@pytest.mark.parametrize("add_bos,padding_side", [(False, "right"), (True, "left"), (False, "left"), (True, "right")])
def test_suffix_steps_equal_full_forwards(arch, overrides, add_bos, padding_side):
    """The states a step computes (suffixes on the prefixes' cached keys/values, blocks 0..L skipped) equal
    full forwards with δ hooked in, at every suffix position, also on subsets of the rows (early stopping)."""
    model = tiny_model(arch, initializer_range=0.1, **overrides)
    tok = make_tokenizer(add_bos=add_bos, padding_side=padding_side)
    spec, layer = get_arch_spec(model), 1
    blocks = list(spec.blocks(model))
    batch = _build_batch(tok, varied_requests(), VARIED_TEMPLATES, "cpu", 0.1)
    assert (batch.lookup == 0).any() != add_bos  # without BOS some rows have no prefix
    _check_steps(model, spec, layer, batch, [[0, 1, 2, 3], [0, 2, 3], [1], [2]])
    if not add_bos:  # no row with a prefix: the parts run without a cache
        bare = _build_batch(tok, varied_requests()[2:3], ["{}"], "cpu", 0.1)
        assert (bare.lookup == 0).all()
        _check_steps(model, spec, layer, bare, [[0]])
    assert list(spec.blocks(model)) == blocks and all(type(b).__name__ != "_StandIn" for b in blocks)


def _check_steps(model, spec, layer, batch, subsets):
    delta = torch.randn(batch.n_requests, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parts, final, as_tuple = _batch_parts(model, spec, layer, batch)
        assert len(parts) == min(LENGTH_BUCKETS, len(set((batch.attention_mask.sum(1) - batch.lookup).tolist())))
        for part in parts:  # steps keep only the prefix keys and values of the blocks after L (one element each else)
            for i, (k, v) in enumerate(part.kv):
                assert all((t.untyped_storage().nbytes() == t.element_size()) == (i <= layer) for t in (k, v))
        for live in map(torch.tensor, subsets):
            sub, rows = batch.subset(live)
            got = _forward_step(model, spec, layer, _select_parts(parts, rows), delta[live][sub.row_request],
                                as_tuple)
            want = _reference_states(model, spec, layer, sub, delta[live][sub.row_request])
            for r, w in enumerate(want):
                n = len(w) - int(sub.lookup[r])
                torch.testing.assert_close(got[r, :n], w[-n:], rtol=1e-4, atol=1e-5)
        # unedited: the same without δ, and block L's output at the lookups
        want = _reference_states(model, spec, layer, batch, torch.zeros(len(batch.lookup), delta.shape[1]))
        for r, w in enumerate(want):
            n = len(w) - int(batch.lookup[r])
            torch.testing.assert_close(final[r, :n], w[-n:], rtol=1e-4, atol=1e-5)
        with capture_outputs(spec.blocks(model)[layer]) as seen:
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        rows = torch.arange(len(batch.lookup))
        torch.testing.assert_close(lookup_states(parts), seen[0][rows, batch.lookup], rtol=1e-4, atol=1e-5)


def _reference_targets(model, spec, tok, req, templates, cfg, layer):
    """An independent MEMIT z loop for one request (full forwards, δ hooked in at the lookup): ``h`` and, for
    each step, the loss, the δ it was computed with and the target NLL (the loop never stops early; the caller
    picks the stop)."""
    from memit_adapter.targets import KL_PROMPT
    from memit_adapter.tokens import encode_fact

    block = spec.blocks(model)[layer]
    facts = [encode_fact(tok, t.replace("{}", req.prompt), req.subject, req.target_new) for t in templates]
    essence = encode_fact(tok, KL_PROMPT, req.subject)

    def at(fact) -> int:  # the edit token: the subject's last, or req.subject_token counted from its end
        first, stop = fact.subject
        return max(first, stop + (req.subject_token or -1))

    def final(fact, ids, delta):
        with _added_at(block, at(fact), delta):
            return model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]

    with torch.no_grad(), capture_outputs(block) as seen:
        before = torch.log_softmax(_logits(model, final(essence, essence.ids, 0.0)[at(essence)]), -1)
        model.base_model(input_ids=torch.tensor([facts[0].ids]))
    h = seen[-1][0, at(facts[0])]
    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    history = []
    for step in range(cfg.v_num_grad_steps):
        nll = []
        for f in facts:
            logp = torch.log_softmax(_logits(model, final(f, f.ids[:-1], delta)[f.target_positions]), -1)
            nll.append(-logp[torch.arange(len(f.target_ids)), f.target_ids].mean())
        now = torch.log_softmax(_logits(model, final(essence, essence.ids, delta)[at(essence)]), -1)
        kl = (now.exp() * (now - before)).sum()
        loss = torch.stack(nll).mean() + cfg.kl_factor * kl + cfg.v_weight_decay * delta.norm() / h.norm() ** 2
        history.append((loss.item(), delta.detach().clone(), torch.stack(nll).mean().item()))
        opt.zero_grad()
        loss.backward()
        # the step's rate: cosine from v_lr at step 0 down to v_lr_decay_to * v_lr at the last step
        last = max(cfg.v_num_grad_steps - 1, 1)
        opt.param_groups[0]["lr"] = cfg.v_lr * (cfg.v_lr_decay_to + (1 - cfg.v_lr_decay_to)
                                                * (1 + math.cos(math.pi * step / last)) / 2)
        opt.step()
        with torch.no_grad():
            delta.mul_(min(1.0, cfg.clamp_norm_factor * h.norm() / delta.norm()))
    return h, history


@pytest.mark.parametrize("arch,add_bos,padding_side", [("gpt2", False, "right"), ("gptj", True, "left"),
                                                       ("gpt_neox", False, "left"), ("llama", True, "right"),
                                                       ("gemma", True, "left")])
def test_targets_equal_an_independent_full_forward_loop(arch, add_bos, padding_side):
    """z of a batch (every row cut at its lookup, some rows stopping early) equals a plain loop per request on
    full forwards: templates of different lengths, subjects first / inside / last, multi-token targets."""
    model, tok = tiny_model(arch, initializer_range=0.1), make_tokenizer(add_bos=add_bos, padding_side=padding_side)
    spec, layer, reqs = get_arch_spec(model), 1, varied_requests()
    cfg = config(v_num_grad_steps=8, clamp_norm_factor=2.0)  # a clamp that binds on these models
    refs = [_reference_targets(model, spec, tok, r, VARIED_TEMPLATES, cfg, layer) for r in reqs]
    # a threshold the most improving request reaches at the middle step: it stops there, others at other steps
    k = cfg.v_num_grad_steps // 2
    j = max(range(len(reqs)), key=lambda i: refs[i][1][1][0] - refs[i][1][-2][0])
    threshold = (refs[j][1][k - 1][0] + refs[j][1][k][0]) / 2
    stops = [next((s for s, (loss, *_) in enumerate(hist) if loss < threshold), len(hist) - 1) for _, hist in refs]
    assert stops[j] == k and len(set(stops)) > 1
    assert min(abs(loss - threshold) for _, hist in refs for loss, *_ in hist) > 1e-3  # no stop decided by rounding
    z, h = compute_targets(model, spec, tok, reqs, VARIED_TEMPLATES, cfg.replace(v_loss_threshold=threshold), layer,
                           progress=False)
    torch.testing.assert_close(h, torch.stack([h_ref for h_ref, _ in refs]), rtol=1e-5, atol=1e-5)
    want = torch.stack([h_ref + hist[k][1] for (h_ref, hist), k in zip(refs, stops)])
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(z, h)


@pytest.mark.parametrize("arch,add_bos", [("gpt2", False), ("llama", True)])
def test_targets_at_another_subject_token_equal_the_full_forward_loop_there(arch, add_bos):
    """With ``subject_token`` -2, δ goes in at the subject's second-to-last token (its only one for "toko") in
    every row, the essence included: the batch equals the plain loop with δ added there, and differs from the
    last token's."""
    from dataclasses import replace

    model, tok = tiny_model(arch, initializer_range=0.1), make_tokenizer(add_bos=add_bos)
    spec, layer = get_arch_spec(model), 1
    reqs = [replace(r, subject_token=-2) for r in varied_requests()]
    cfg = config(v_num_grad_steps=6, clamp_norm_factor=2.0, v_loss_threshold=0.0)
    refs = [_reference_targets(model, spec, tok, r, VARIED_TEMPLATES, cfg, layer) for r in reqs]
    z, h = compute_targets(model, spec, tok, reqs, VARIED_TEMPLATES, cfg, layer, progress=False)
    torch.testing.assert_close(h, torch.stack([h_ref for h_ref, _ in refs]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, torch.stack([h_ref + hist[-1][1] for h_ref, hist in refs]), rtol=1e-4, atol=1e-4)
    z_last, h_last = compute_targets(model, spec, tok, varied_requests(), VARIED_TEMPLATES, cfg, layer,
                                     progress=False)
    assert not torch.allclose(h_last[:2], h[:2]) and torch.allclose(h_last[2], h[2], atol=1e-5)  # "toko": one token


@pytest.mark.parametrize("arch,add_bos", [("gpt2", False), ("llama", True)])
def test_a_row_stops_once_its_target_nll_is_below_the_threshold(arch, add_bos):
    """``v_target_nll_threshold`` stops each row at the first step whose target NLL (the independent loop's,
    without the KL and decay terms) is below it, whatever its whole loss; each z equals that step's."""
    model, tok = tiny_model(arch, initializer_range=0.1), make_tokenizer(add_bos=add_bos)
    spec, layer, reqs = get_arch_spec(model), 1, varied_requests()
    cfg = config(v_num_grad_steps=8, clamp_norm_factor=2.0, v_loss_threshold=0.0)
    refs = [_reference_targets(model, spec, tok, r, VARIED_TEMPLATES, cfg, layer) for r in reqs]
    k = cfg.v_num_grad_steps // 2
    j = max(range(len(reqs)), key=lambda i: refs[i][1][1][2] - refs[i][1][-2][2])
    threshold = (refs[j][1][k - 1][2] + refs[j][1][k][2]) / 2
    stops = [next((s for s, (*_, nll) in enumerate(hist) if nll < threshold), len(hist) - 1) for _, hist in refs]
    assert stops[j] == k and len(set(stops)) > 1
    assert min(abs(nll - threshold) for _, hist in refs for *_, nll in hist) > 1e-3
    assert any(hist[s][0] > threshold for (_, hist), s in zip(refs, stops))  # where the whole loss would go on
    z, _ = compute_targets(model, spec, tok, reqs, VARIED_TEMPLATES, cfg.replace(v_target_nll_threshold=threshold),
                           layer, progress=False)
    want = torch.stack([h_ref + hist[s][1] for (h_ref, hist), s in zip(refs, stops)])
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,add_bos", [("gpt2", False), ("llama", True)])
def test_a_decaying_learning_rate_follows_its_cosine(arch, add_bos):
    """With ``v_lr_decay_to`` the z of every row equals the independent loop run at a rate that falls on a cosine
    from ``v_lr`` to ``v_lr_decay_to * v_lr`` over the steps, and differs from the constant rate's z."""
    model, tok = tiny_model(arch, initializer_range=0.1), make_tokenizer(add_bos=add_bos)
    spec, layer, reqs = get_arch_spec(model), 1, varied_requests()
    constant = config(v_num_grad_steps=8, clamp_norm_factor=2.0, v_loss_threshold=0.0)
    decaying = constant.replace(v_lr_decay_to=0.1)
    refs = [_reference_targets(model, spec, tok, r, VARIED_TEMPLATES, decaying, layer) for r in reqs]
    z, _ = compute_targets(model, spec, tok, reqs, VARIED_TEMPLATES, decaying, layer, progress=False)
    torch.testing.assert_close(z, torch.stack([h + hist[-1][1] for h, hist in refs]), rtol=1e-4, atol=1e-4)
    z_constant, _ = compute_targets(model, spec, tok, reqs, VARIED_TEMPLATES, constant, layer, progress=False)
    assert (z - z_constant).norm(dim=-1).min() > 1e-3


def test_blocks_and_their_hooks_are_left_in_place():
    """Steps stand in for blocks 0..L in the block list, not by replacing their ``forward``: an instance-level
    ``forward`` (accelerate's hooks put one there) survives the optimisation."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    model, tok = model_and_tokenizer("gpt2")
    blocks = list(get_arch_spec(model).blocks(model))
    for b in blocks:
        accelerate_hooks.add_hook_to_module(b, accelerate_hooks.ModelHook())
    compute_targets(model, get_arch_spec(model), tok, requests()[:2], ["{}", "the man said . {}"],
                    config(v_num_grad_steps=2), 2, progress=False)
    assert list(get_arch_spec(model).blocks(model)) == blocks
    assert all("forward" in vars(b) and hasattr(b, "_hf_hook") for b in blocks)


def test_relative_step_equals_absolute_step_times_hidden_rms():
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    req = requests()[:1]
    cfg = config(v_num_grad_steps=6, v_lr=0.2, v_lr_relative=True)
    z_rel, h = compute_targets(model, spec, tok, req, ["{}"], cfg, 1, progress=False)
    rms = (h.norm() / h.shape[1] ** 0.5).item()
    z_abs, _ = compute_targets(model, spec, tok, req, ["{}"], cfg.replace(v_lr=0.2 * rms, v_lr_relative=False), 1,
                               progress=False)
    torch.testing.assert_close(z_rel, z_abs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(z_rel, h)


def _logits(model, hidden):
    """The LM head's float32 logits, as the model computes them (its own module, softcap included)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@contextmanager
def _added_at(block, pos: int, delta):
    """``delta`` added to ``block``'s output at position ``pos`` of the (single) sequence, inside the block."""
    def hook(_m, _a, out):
        hs = (out[0] if isinstance(out, tuple) else out).clone()
        hs[0, pos] += delta
        return (hs, *out[1:]) if isinstance(out, tuple) else hs

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _same_subject_requests():
    from memit_adapter import EditRequest

    # two subjects with two relations each, interleaved; the text before the subject is the same,
    # so the two requests of a subject have the same key
    return [EditRequest("{} plays", "michael jordan", " tennis"), EditRequest("{} lives in", "alpha beta", " rome"),
            EditRequest("{} lives in", "michael jordan", " paris"), EditRequest("{} plays", "alpha beta", " golf")]


def test_requests_about_one_subject_share_their_delta():
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reqs = _same_subject_requests()
    cfg = config(v_num_grad_steps=8)
    z, h = compute_targets(model, spec, tok, reqs, ["{}"], cfg, 1, progress=False)
    torch.testing.assert_close(h[0], h[2])  # same key, same hidden state
    d = z - h
    torch.testing.assert_close(d[0], d[2])
    torch.testing.assert_close(d[1], d[3])
    assert not torch.allclose(d[0], d[1])
    # chunks of one request still keep a subject's requests together: same result
    z_chunked, _ = compute_targets(model, spec, tok, reqs, ["{}"], cfg, 1, batch_size=1, progress=False)
    torch.testing.assert_close(z_chunked, z, rtol=1e-4, atol=1e-4)
    # without sharing, each request has its own δ, equal to optimising it alone
    z_own, _ = compute_targets(model, spec, tok, reqs, ["{}"], cfg.replace(share_subject_delta=False), 1,
                               progress=False)
    assert not torch.allclose(z_own[0], z_own[2])
    z_alone, _ = compute_targets(model, spec, tok, reqs[2:3], ["{}"], cfg, 1, progress=False)
    torch.testing.assert_close(z_own[2], z_alone[0], rtol=1e-4, atol=1e-4)


def test_shared_delta_minimises_the_mean_loss_of_its_requests():
    """With one subject, the shared row is the one-request optimisation of the summed objective:
    compare to an independent Adam loop on the two requests' mean NLL (no KL, no decay, no clamp)."""
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reqs = [r for r in _same_subject_requests() if r.subject == "alpha beta"]
    cfg = config(v_num_grad_steps=5, kl_factor=0.0, v_weight_decay=0.0, clamp_norm_factor=100.0,
                 v_loss_threshold=0.0, v_lr=0.3)
    z, h = compute_targets(model, spec, tok, reqs, ["{}"], cfg, 1, progress=False)

    block = spec.blocks(model)[1]
    delta = torch.zeros(h.shape[1], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.3)
    for _ in range(4):  # the engine evaluates 5 losses and steps 4 times
        nll = []
        for r in reqs:
            ids = tok(r.prompt.format(r.subject) + r.target_new, add_special_tokens=False)["input_ids"]
            n_subj = len(tok(r.prompt.format(r.subject), add_special_tokens=False)["input_ids"])
            subj_last = len(tok(r.subject, add_special_tokens=False)["input_ids"]) - 1

            with _added_at(block, subj_last, delta):
                final = model.base_model(input_ids=torch.tensor([ids[:-1]])).last_hidden_state
            logp = torch.log_softmax(_logits(model, final[0, n_subj - 1:]), -1)
            tgt = torch.tensor(ids[n_subj:])
            nll.append(-logp[torch.arange(len(tgt)), tgt].mean())
        loss = torch.stack(nll).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not cfg.v_lr_relative and delta.norm() > 0  # absolute steps, as in the loop above
    torch.testing.assert_close(z[0] - h[0], delta.detach(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(z[1] - h[1], delta.detach(), rtol=1e-3, atol=1e-4)


def test_kept_prompts_are_the_other_relations_of_each_subject():
    from memit_adapter import EditRequest
    from memit_adapter.targets import delta_groups, kept_prompts, relation_templates

    _, tok = model_and_tokenizer("gpt2")
    reqs = [EditRequest("{} lives in", "alpha beta", " rome", " paris", relation_id="lives"),
            EditRequest("{} plays", "alpha beta", " golf", " tennis", relation_id="sport"),
            EditRequest("{} is good at", "michael jordan", " golf", relation_id="sport"),  # another template
            EditRequest("{} works for", "toko yuki", " ibm", relation_id="employer"),
            EditRequest("{} speaks", "lebron james", " french")]  # no relation id: takes no part
    relations = relation_templates(reqs)
    assert relations == {"lives": "{} lives in", "sport": "{} plays", "employer": "{} works for"}
    kept = kept_prompts(tok, reqs, delta_groups(reqs, config()), relations, 2.0)
    # the subject's first request holds its row's prompts; weight = factor * row size / count
    assert [k.template for k in kept[0]] == ["{} works for"] and kept[0][0].weight == pytest.approx(4.0)
    assert kept[1] == []
    assert [k.template for k in kept[2]] == ["{} lives in", "{} works for"]
    assert [k.weight for k in kept[2]] == pytest.approx([1.0, 1.0])
    assert [k.template for k in kept[3]] == ["{} lives in", "{} plays"]
    assert kept[4] == []
    first = {tok(t, add_special_tokens=False)["input_ids"][0] for t in (" paris", " tennis")}
    assert kept[0][0].forbidden == first and kept[2][0].forbidden == frozenset()
    assert kept_prompts(tok, reqs, delta_groups(reqs, config()), relations, 0.0) == [[]] * len(reqs)
    # separate δs per request: a subject's other edited relations are still not kept
    own = kept_prompts(tok, reqs, delta_groups(reqs, config(share_subject_delta=False)), relations, 2.0)
    assert [k.template for k in own[0]] == [k.template for k in own[1]] == ["{} works for"]
    assert own[0][0].weight == pytest.approx(2.0)
    # at most one other relation a subject: a seeded draw of the two, the weight carried by the one kept
    capped = [kept_prompts(tok, reqs, delta_groups(reqs, config()), relations, 2.0, 1, seed) for seed in range(8)]
    assert all(len(c[2]) == 1 and c[2][0].template in ("{} lives in", "{} works for") for c in capped)
    assert all(c[2][0].weight == pytest.approx(2.0) and c[0] == kept[0] for c in capped)
    assert len({c[2][0].template for c in capped}) == 2  # the seed decides which
    assert capped[3] == kept_prompts(tok, reqs, delta_groups(reqs, config()), relations, 2.0, 1, 3)


def _preserve_pair(true_of_alpha=None):
    from memit_adapter import EditRequest

    return [EditRequest("{} plays", "alpha beta", " golf", true_of_alpha, relation_id="sport"),
            EditRequest("{} lives in", "michael jordan", " paris", relation_id="lives")]


@pytest.mark.parametrize("every", [1, 3])
def test_preserve_term_is_the_kl_of_the_subjects_other_relations(every):
    """Against an independent Adam loop on NLL(new object) + f * KL(now || before) of the next token after
    "alpha beta lives in" (the relation another request of the batch edits); with ``preserve_every`` k the KL
    counts on steps 0, k, 2k, ... at k times its weight and not on the others."""
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reqs = _preserve_pair()
    f = 3.0
    cfg = config(v_num_grad_steps=6, kl_factor=0.0, v_weight_decay=0.0, clamp_norm_factor=100.0,
                 v_loss_threshold=0.0, v_lr=0.3, preserve_factor=f, preserve_every=every)
    z, h = compute_targets(model, spec, tok, reqs, ["{}"], cfg, 1, progress=False)
    z0, _ = compute_targets(model, spec, tok, reqs, ["{}"], cfg.replace(preserve_factor=0.0), 1, progress=False)
    assert not torch.allclose(z[0], z0[0], atol=1e-3)

    block = spec.blocks(model)[1]
    subj_last = len(tok("alpha beta", add_special_tokens=False)["input_ids"]) - 1
    ids = tok("alpha beta plays golf", add_special_tokens=False)["input_ids"]
    kept_ids = torch.tensor([tok("alpha beta lives in", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        last = model.base_model(input_ids=kept_ids).last_hidden_state[0, -1]
        before = torch.log_softmax(_logits(model, last), -1)
    delta = torch.zeros(h.shape[1], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.3)
    for step in range(5):
        with _added_at(block, subj_last, delta):
            final = model.base_model(input_ids=torch.tensor([ids[:-1]])).last_hidden_state
            kept = model.base_model(input_ids=kept_ids).last_hidden_state[0, -1]
        nll = -torch.log_softmax(_logits(model, final[0, -1]), -1)[ids[-1]]
        now = torch.log_softmax(_logits(model, kept), -1)
        weight = f * every if step % every == 0 else 0.0
        loss = nll + weight * (now.exp() * (now - before)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(z[0] - h[0], delta.detach(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("every", [2, 3])
def test_preserve_every_runs_the_kept_prompts_on_their_steps_only(every):
    """The last block sees the two kept prompts' rows (one per subject) on ceil(steps / k) of the steps only."""
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    steps = 7
    cfg = config(v_num_grad_steps=steps, v_loss_threshold=0.0, preserve_factor=1.0, v_batch_size=None)

    def rows_seen(c):
        seen = []
        handle = spec.blocks(model)[-1].register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
        try:
            compute_targets(model, spec, tok, _preserve_pair(), ["{}"], c, 1, progress=False)
        finally:
            handle.remove()
        return sum(seen)

    every_step = rows_seen(cfg)
    assert every_step - rows_seen(cfg.replace(preserve_every=every)) == 2 * (steps - math.ceil(steps / every))
    # without preservation: two rows fewer at every step and in the two passes before (prefixes, unedited suffixes)
    assert every_step - rows_seen(cfg.replace(preserve_factor=0.0)) == 2 * (steps + 2)


def test_preserve_every_gives_the_same_targets_batched_and_one_at_a_time():
    """With kept prompts every 3rd step and thresholds that rows reach part way, batching changes no δ: a row with
    kept prompts is tested on their steps only, a row without (a request lacking ``relation_id``) on every step,
    whoever shares its chunk. The thresholds span the target NLL of rows 0 and 3 from the end of the run to its
    start, so that they stop at different steps whatever the tiny model's weights."""
    from memit_adapter import EditRequest

    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reqs = [EditRequest("{} plays", "alpha beta", " golf", relation_id="sport"),
            EditRequest("{} lives in", "michael jordan", " paris", relation_id="lives"),
            EditRequest("{} speaks", "toko", " french", relation_id="speaks"),
            EditRequest("the mother tongue of {} is", "danielle darrieux", " french")]
    cfg = config(v_num_grad_steps=15, v_loss_threshold=0.0, preserve_factor=1.0, preserve_every=3)
    templates = ["{}", "he said that {}"]
    run = lambda c, **kw: compute_targets(model, spec, tok, reqs, templates, c, 2, progress=False,  # noqa: E731
                                          return_loss=True, **kw)
    z_full, h, end = run(cfg)
    start = run(cfg.replace(v_num_grad_steps=1))[2]
    full = (z_full - h).norm(dim=-1)
    stopped_part_way = set()
    for thr in torch.cat([torch.linspace(float(end[i]), float(start[i]), 6) for i in (0, 3)]).tolist():
        z_all = run(cfg.replace(v_loss_threshold=thr))[0]
        torch.testing.assert_close(z_all, run(cfg.replace(v_loss_threshold=thr), batch_size=1)[0],
                                   rtol=1e-4, atol=1e-4)
        moved = (z_all - h).norm(dim=-1)
        stopped_part_way |= {i for i in range(len(reqs)) if 0 < moved[i] < full[i] - 1e-3}
    assert {0, 3} <= stopped_part_way  # a row with kept prompts and the one without stop part way


def test_kept_prompt_answered_with_the_old_object_is_dropped():
    """A kept prompt whose unedited answer is the subject's ``target_true`` asks about the rewritten fact:
    it is left out, and the δ equals the one optimised without preservation."""
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    ids = torch.tensor([tok("alpha beta lives in", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        top = int(model(input_ids=ids).logits[0, -1].argmax())
    other = next(t for t in range(tok.vocab_size) if t != top and tok.decode([t]).strip())
    cfg = config(v_num_grad_steps=5, preserve_factor=3.0)
    run = lambda reqs, c: compute_targets(model, spec, tok, reqs, ["{}"], c, 1, progress=False)[0]  # noqa: E731
    plain = run(_preserve_pair(), cfg.replace(preserve_factor=0.0))
    dropped = run(_preserve_pair(tok.decode([top])), cfg)
    kept = run(_preserve_pair(tok.decode([other])), cfg)
    torch.testing.assert_close(dropped[0], plain[0])
    assert not torch.allclose(kept[0], plain[0], atol=1e-3)


class _FakeMemory:
    """A device of ``free`` bytes on which a chunk takes ``fixed + per_request x requests`` at its peak."""

    def __init__(self, free: int, per_request: int, fixed: int = 0):
        self.free, self.per_request, self.fixed, self.peak_now, self.released = free, per_request, fixed, 0, 0

    def available(self):
        return self.free

    def start(self):
        self.peak_now = 0
        return 0

    def peak(self):
        return self.peak_now

    def release(self):
        self.released += 1

    def use(self, n: int):
        if self.fixed + self.per_request * n > self.free:
            raise torch.OutOfMemoryError("fake: out of memory")
        self.peak_now = self.fixed + self.per_request * n


def test_chunk_sizer_probes_then_fills_free_memory_and_halves_on_oom():
    from memit_adapter.targets import ChunkSizer

    memory = _FakeMemory(free=1000, per_request=10, fixed=40)
    sizer = ChunkSizer(None, "cpu", probe=4, fill=0.8, memory=memory)
    seen = []

    def work(chunk):
        memory.use(len(chunk))
        seen.append(list(chunk))

    groups = [[i] for i in range(200)]
    sizer.run(groups, work, progress=False)
    # the probe's 4 requests took 80 bytes: 20 a request -> 40 at once; then 440 for 40: 11 a request -> 72
    assert [len(c) for c in seen[:3]] == [4, 40, 72] and sum(seen, []) == list(range(200))
    # a device that has less free memory than measured (longer rows than before): halve and go on at that size
    memory = _FakeMemory(free=500, per_request=30)
    sizer = ChunkSizer(None, "cpu", probe=4, memory=memory)
    sizer.per_request = 10.0  # as if a chunk of short rows had been measured: 40 at once
    seen.clear()
    sizer.run([[0, 1], *[[i] for i in range(2, 60)]], work, progress=False)
    assert memory.released == 2 and sizer.cap == 10 and [len(c) for c in seen] == [10] * 6  # 40 -> 20 -> 10
    assert sum(seen, []) == list(range(60))
    with pytest.raises(torch.OutOfMemoryError):  # one group that does not fit cannot be halved
        ChunkSizer(None, "cpu", probe=50, memory=_FakeMemory(free=100, per_request=10)).run(
            [list(range(50))], work, progress=False)
    # a given size, or the CPU: no measuring
    seen.clear()
    ChunkSizer(3, "cpu").run([[0, 1], [2], [3, 4], [5]], work, progress=False)
    assert seen == [[0, 1, 2], [3, 4, 5]]
    assert ChunkSizer(None, "cpu").memory is None


def test_targets_sized_from_free_memory_equal_targets_at_once(monkeypatch):
    """batch_size None on a device that reports its memory: chunks sized by it, some halved after running out of
    memory; z is the same as in one batch."""
    from memit_adapter import targets as targets_mod

    model, tok = model_and_tokenizer("gpt2")
    spec, reqs = get_arch_spec(model), _same_subject_requests() + requests()
    cfg = config(v_num_grad_steps=4)
    z_all, h_all = compute_targets(model, spec, tok, reqs, ["{}"], cfg, 1, progress=False)
    memory = _FakeMemory(free=100, per_request=30)
    sizes = []
    real = targets_mod.optimise_deltas

    def fake_device(*args, **kwargs):
        memory.use(len(args[3]))
        sizes.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(targets_mod._DeviceMemory, "of", classmethod(lambda cls, device: memory))
    monkeypatch.setattr(targets_mod, "optimise_deltas", fake_device)
    z, h = compute_targets(model, spec, tok, reqs, ["{}"], cfg, 1, progress=False)
    assert memory.released >= 1 and max(sizes) <= 3 and sum(sizes) == len(reqs)
    torch.testing.assert_close(z, z_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_all, rtol=1e-5, atol=1e-5)


def test_a_step_reads_one_value_list_back_from_the_device(monkeypatch):
    """Past the set-up, each step of the z loop reads the device once (which rows go on, the loss shown): no
    ``.item()``, ``int(tensor)``, ``if tensor`` or ``nonzero`` in targets.py while the set of rows stays."""
    import sys

    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reads = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith("targets.py"):
                reads.append(name)
            return real(self, *args, **kwargs)
        return counted

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    def run(steps):
        reads.clear()
        cfg = config(v_num_grad_steps=steps, v_loss_threshold=0.0)  # no row stops early
        compute_targets(model, spec, tok, requests(), ["{}", "the man said . {}"], cfg, 1, progress=False)
        return list(reads)

    few, more = run(3), run(7)
    assert len(more) - len(few) == 4 and more[-4:] == ["tolist"] * 4


def test_non_finite_loss_is_an_error_not_a_stop():
    """A forward that overflows gives a NaN loss, which no threshold compares below: it raises, where it would
    otherwise have ended the row as if it had converged."""
    from memit_adapter import MemitError

    model, tok = model_and_tokenizer("gpt2")
    with torch.no_grad():
        model.transformer.h[3].mlp.c_fc.weight.fill_(float("inf"))
    with pytest.raises(MemitError, match="not finite at step 0"):
        compute_targets(model, get_arch_spec(model), tok, requests()[:2], ["{}"], config(), 1, progress=False)


def test_half_precision_head_gives_float32_logits():
    from memit_adapter.targets import _Head

    model = tiny_model("llama", dtype=torch.bfloat16, initializer_range=0.1)
    hidden = (torch.randn(5, 32, generator=torch.Generator().manual_seed(0)) * 30).bfloat16()
    logits = _Head(model)(hidden)
    want = hidden.float() @ model.lm_head.weight.float().T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(model.lm_head(hidden).float(), want, rtol=1e-6, atol=1e-5)  # bf16 rounds them
    model32 = tiny_model("gpt2")
    assert _Head(model32).weight.data_ptr() == model32.lm_head.weight.data_ptr()  # float32: no copy


def test_rows_below_even_odds_go_on_alone_up_to_the_step_cap(monkeypatch):
    """With ``v_max_grad_steps``, a row that reached even odds within ``v_num_grad_steps`` keeps exactly the δ it
    had then, and a row that did not goes on: it ends as the same row run alone. (Random tiny models plateau above
    ln 2, so "even odds" is moved to an NLL of 2.5 here.)"""
    from memit_adapter import targets

    monkeypatch.setattr(targets, "UNCONVERGED_NLL", 2.5)
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reqs = requests()
    short = config(v_num_grad_steps=6, v_loss_threshold=0.0)
    z0, h, nll0 = compute_targets(model, spec, tok, reqs, ["{}"], short, 2, progress=False, return_loss=True)
    slow = [i for i, x in enumerate(nll0.tolist()) if x > 2.5]
    done = [i for i in range(len(reqs)) if i not in slow]
    assert slow and done  # both kinds, or the test shows nothing
    longer = short.replace(v_max_grad_steps=30)
    z1, _, nll1 = compute_targets(model, spec, tok, reqs, ["{}"], longer, 2, progress=False, return_loss=True)
    torch.testing.assert_close(z1[done], z0[done])
    assert (nll1[slow] < nll0[slow]).all()
    for i in slow:  # rows are independent: alone, the same steps
        alone, _ = compute_targets(model, spec, tok, [reqs[i]], ["{}"], longer, 2, progress=False)
        torch.testing.assert_close(alone[0], z1[i], rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="v_max_grad_steps"):
        short.replace(v_max_grad_steps=3)


def _top_everywhere(model, spec, tok, req, templates, delta, layer) -> bool:
    """Whether the first target token is the most probable next token after every templated prompt, with ``delta``
    added to block ``layer``'s output at the subject's last token (these prompts end with the subject)."""
    target = tok(req.target_new, add_special_tokens=False)["input_ids"][0]
    for t in templates:
        ids = tok(t.replace("{}", req.prompt).replace("{}", req.subject), return_tensors="pt")["input_ids"]
        with torch.no_grad(), _added_at(spec.blocks(model)[layer], ids.shape[1] - 1, delta):
            if int(model(ids).logits[0, -1].argmax()) != target:
                return False
    return True


def test_most_probable_early_stopping_stops_each_row_at_its_first_top_answer():
    """With ``v_stop_when_top`` (MPES), each δ is the plain optimisation's δ after the fewest steps that make its
    target the top answer of all its prompts (checked here with a hooked full forward)."""
    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reqs, templates = requests(), ["{}", "the man said . {}"]
    plain = config(v_num_grad_steps=30, v_loss_threshold=0.0)  # the loss never stops a row here
    z_top, h = compute_targets(model, spec, tok, reqs, templates, plain.replace(v_stop_when_top=True), 2,
                               progress=False)
    runs = [compute_targets(model, spec, tok, reqs, templates, plain.replace(v_num_grad_steps=n), 2,
                            progress=False)[0] for n in range(1, 31)]
    stopped = 0
    for i, req in enumerate(reqs):
        first = next((n for n in range(1, 31)
                      if _top_everywhere(model, spec, tok, req, templates, runs[n - 1][i] - h[i], 2)), 30)
        torch.testing.assert_close(z_top[i], runs[first - 1][i], rtol=1e-4, atol=1e-4)
        stopped += first < 30
    assert stopped >= 2  # rows that stopped early, or the test shows nothing


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_run_the_fewest_positions(seed):
    """Every row in exactly one bucket, buckets of consecutive lengths, and no grouping into at most k buckets
    of consecutive lengths runs fewer positions (brute force over all cuts)."""
    import itertools
    import random

    rng = random.Random(seed)
    lengths = [rng.choice(range(1, rng.randint(2, 12))) for _ in range(rng.randint(1, 40))]
    k = rng.randint(1, 5)
    groups = length_buckets(lengths, k)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths))) and len(groups) <= k
    spans = [(min(lengths[r] for r in g), max(lengths[r] for r in g)) for g in groups]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    cost = sum(len(g) * max(lengths[r] for r in g) for g in groups)
    sizes = sorted(set(lengths))
    best = min(sum(sum(1 for x in lengths if sizes[a] <= x <= sizes[b - 1]) * sizes[b - 1]
                   for a, b in zip((0, *cuts), (*cuts, len(sizes))))
               for n in range(min(k, len(sizes))) for cuts in itertools.combinations(range(1, len(sizes)), n))
    assert cost == best
    assert length_buckets([], k) == []
