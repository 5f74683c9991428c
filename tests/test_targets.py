from contextlib import contextmanager

import pytest
import torch
from engine_setup import config, model_and_tokenizer, requests
from tiny import ARCHS

from memit_adapter.arch import get_arch_spec
from memit_adapter.hooks import capture_outputs
from memit_adapter.targets import (
    _build_batch,
    _forward,
    _forward_in_parts,
    _forward_replayed,
    compute_targets,
    context_templates,
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


@pytest.mark.parametrize("arch", ARCHS)
def test_replayed_prefix_equals_full_forward(arch):
    """Skipping blocks 0..L with their cached output gives the same final states as running them."""
    model, tok = model_and_tokenizer(arch)
    spec = get_arch_spec(model)
    batch = _build_batch(tok, requests()[:3], ["{}", "the man said . {}"], "cpu")
    delta = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_outputs(spec.blocks(model)[1]) as seen:
        as_tuple = []
        handle = spec.blocks(model)[1].register_forward_hook(lambda m, a, o: as_tuple.append(isinstance(o, tuple)))
        _forward(model, spec, 1, batch, None)
        handle.remove()
        full, _ = _forward(model, spec, 1, batch, delta)
        sub, rows = batch.subset(torch.tensor([0, 2]))
        replayed = _forward_replayed(model, spec, 1, sub, seen[0][rows, : sub.input_ids.shape[1]], delta[[0, 2]],
                                     as_tuple[0])
    mask = sub.attention_mask.bool()
    torch.testing.assert_close(replayed[mask], full[rows, : sub.input_ids.shape[1]][mask], rtol=1e-4, atol=1e-5)
    # rewrite rows and (shorter) KL rows run apart, each padded to its own width: same states
    parts = _forward_in_parts(model, spec, 1, sub, seen[0][rows, : sub.input_ids.shape[1]], delta[[0, 2]],
                              as_tuple[0])
    assert parts.shape == replayed.shape and sub.n_rewrite_rows < len(rows)
    torch.testing.assert_close(parts[mask], replayed[mask], rtol=1e-4, atol=1e-5)
    assert all("forward" not in vars(b) for b in spec.blocks(model))


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
    from memit_adapter.targets import _logits_at

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
            logp = torch.log_softmax(_logits_at(model, final[0, n_subj - 1:]), -1)
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


def _preserve_pair(true_of_alpha=None):
    from memit_adapter import EditRequest

    return [EditRequest("{} plays", "alpha beta", " golf", true_of_alpha, relation_id="sport"),
            EditRequest("{} lives in", "michael jordan", " paris", relation_id="lives")]


def test_preserve_term_is_the_kl_of_the_subjects_other_relations():
    """Against an independent Adam loop on NLL(new object) + f * KL(now || before) of the next token after
    "alpha beta lives in" (the relation another request of the batch edits)."""
    from memit_adapter.targets import _logits_at

    model, tok = model_and_tokenizer("gpt2")
    spec = get_arch_spec(model)
    reqs = _preserve_pair()
    f = 3.0
    cfg = config(v_num_grad_steps=6, kl_factor=0.0, v_weight_decay=0.0, clamp_norm_factor=100.0,
                 v_loss_threshold=0.0, v_lr=0.3, preserve_factor=f)
    z, h = compute_targets(model, spec, tok, reqs, ["{}"], cfg, 1, progress=False)
    z0, _ = compute_targets(model, spec, tok, reqs, ["{}"], cfg.replace(preserve_factor=0.0), 1, progress=False)
    assert not torch.allclose(z[0], z0[0], atol=1e-3)

    block = spec.blocks(model)[1]
    subj_last = len(tok("alpha beta", add_special_tokens=False)["input_ids"]) - 1
    ids = tok("alpha beta plays golf", add_special_tokens=False)["input_ids"]
    kept_ids = torch.tensor([tok("alpha beta lives in", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        last = model.base_model(input_ids=kept_ids).last_hidden_state[0, -1]
        before = torch.log_softmax(_logits_at(model, last), -1)
    delta = torch.zeros(h.shape[1], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.3)
    for _ in range(5):
        with _added_at(block, subj_last, delta):
            final = model.base_model(input_ids=torch.tensor([ids[:-1]])).last_hidden_state
            kept = model.base_model(input_ids=kept_ids).last_hidden_state[0, -1]
        nll = -torch.log_softmax(_logits_at(model, final[0, -1]), -1)[ids[-1]]
        now = torch.log_softmax(_logits_at(model, kept), -1)
        loss = nll + f * (now.exp() * (now - before)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(z[0] - h[0], delta.detach(), rtol=1e-3, atol=1e-4)


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
