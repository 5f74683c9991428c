import copy

import pytest
import torch
from engine_setup import VARIED_TEMPLATES, config, corpus, model_and_tokenizer, requests, varied_requests
from tiny import ARCHS

from memit_adapter import (
    ConfigError,
    ConflictingRequestsError,
    EditRequest,
    InvalidRequestError,
    StatisticsError,
    UnsupportedArchitectureError,
)
from memit_adapter import engine as engine_mod
from memit_adapter.arch import get_arch_spec
from memit_adapter.engine import compute_edits
from memit_adapter.fingerprint import weights_fingerprint
from memit_adapter.stats import collect_stats


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert all(p.requires_grad for p in model.parameters())


def _top(model, tok, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0, -1].argmax().item()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edits_make_model_prefer_new_targets(arch):
    model, tok = model_and_tokenizer(arch)
    snap = _snapshot(model)
    reqs = requests()
    targets = [tok.convert_tokens_to_ids(r.target_new.strip()) for r in reqs]
    assert [_top(model, tok, r.text) for r in reqs] != targets
    pack = compute_edits(model, tok, reqs, config(), corpus=corpus(), progress=False)
    _assert_untouched(model, snap)
    spec = get_arch_spec(model)
    assert list(pack.deltas) == [spec.mlp_out_name(layer) for layer in (1, 2)]
    assert pack.fingerprint == weights_fingerprint(model, pack.deltas)
    assert pack.fan_in_fan_out == (arch == "gpt2") and pack.model_type == arch
    with torch.no_grad():
        for name, delta in pack.deltas.items():
            assert delta.B.shape == (32, 5) and delta.A.shape[0] == 5
            model.get_submodule(name).weight += spec.delta_to_weight(delta.weight_delta())
    assert [_top(model, tok, r.text) for r in reqs] == targets


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("gpt2", "llama")])
def test_every_architecture_runs(arch):
    model, tok = model_and_tokenizer(arch)
    snap = _snapshot(model)
    pack = compute_edits(model, tok, requests()[:2], config(v_num_grad_steps=3), corpus=corpus(40), progress=False)
    _assert_untouched(model, snap)
    spec = get_arch_spec(model)
    for name, delta in pack.deltas.items():
        w = model.get_submodule(name).weight
        assert spec.delta_to_weight(delta.weight_delta()).shape == w.shape
        assert torch.isfinite(delta.weight_delta()).all() and delta.weight_delta().abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model, tok = model_and_tokenizer("llama", dtype=dtype)
    snap = _snapshot(model)
    pack = compute_edits(model, tok, requests()[:2], config(v_num_grad_steps=3), corpus=corpus(40), progress=False)
    _assert_untouched(model, snap)
    for delta in pack.deltas.values():
        assert delta.B.dtype == torch.float32 and torch.isfinite(delta.weight_delta()).all()


def test_model_untouched_when_compute_raises_midway(monkeypatch):
    model, tok = model_and_tokenizer("gpt2")
    snap = _snapshot(model)
    calls = []
    real = engine_mod.layer_update

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second layer")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "layer_update", failing)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        compute_edits(model, tok, requests(), config(v_num_grad_steps=2), corpus=corpus(40), progress=False)
    assert len(calls) == 2 and model.training
    _assert_untouched(model, snap)


def test_precomputed_stats_give_the_same_pack():
    model, tok = model_and_tokenizer("gpt2")
    cfg = config(v_num_grad_steps=5)
    stats = collect_stats(model, tok, corpus(), cfg.layers, n_samples=cfg.mom2_n_samples, progress=False)
    a = compute_edits(model, tok, requests(), cfg, stats=stats, progress=False)
    assert all(stats[layer].has_factor() for layer in cfg.layers)  # kept for the next pack on these statistics
    b = compute_edits(model, tok, requests(), cfg, corpus=corpus(), progress=False)
    again = compute_edits(model, tok, requests(), cfg, stats=stats, progress=False)
    for name in a.deltas:
        torch.testing.assert_close(a.deltas[name].weight_delta(), b.deltas[name].weight_delta())
        assert torch.equal(a.deltas[name].A, again.deltas[name].A)


BAD = {
    "conflict": ([EditRequest("the sport played by {}", "michael jordan", " tennis"),
                  EditRequest("the sport played by {}", "michael jordan", " golf")], {}, ConflictingRequestsError),
    "empty": ([], {}, InvalidRequestError),
    "layers": (None, {"layers": [2, 9]}, ConfigError),
    "dict_conflict": ([{"prompt": "{} plays", "subject": "toko yuki", "target_new": " golf"},
                       {"requested_rewrite": {"prompt": "{} plays", "subject": "toko yuki",
                                              "target_new": {"str": " tennis"}}}], {}, ConflictingRequestsError),
    "too_long": ([EditRequest("the sport played by " + "the " * 130 + "{}", "michael jordan", " golf")], {},
                 InvalidRequestError),  # past the tiny model's 128 positions
    "unknown_subject": ([EditRequest("the sport played by {}", "zyzzyva qwxj", " golf")], {}, InvalidRequestError),
    "string_rewrite": ([{"requested_rewrite": "michael jordan plays golf"}], {}, InvalidRequestError),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_and_leaves_model_untouched(case):
    model, tok = model_and_tokenizer("gpt2")
    snap = _snapshot(model)
    reqs, overrides, err = BAD[case]
    with pytest.raises(err):
        compute_edits(model, tok, requests() if reqs is None else reqs, config(**overrides), corpus=corpus(20),
                      progress=False)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("bad", [
    {"prompt": "no placeholder", "subject": "michael jordan", "target_new": " golf"},
    {"prompt": "{} and {}", "subject": "michael jordan", "target_new": " golf"},
    {"prompt": "the sport played by {}", "subject": "michael jordan", "target_new": "  "},
    {"prompt": "the sport played by {}", "subject": "", "target_new": " golf"},
])
def test_malformed_requests_rejected(bad):
    with pytest.raises(InvalidRequestError):
        EditRequest(**bad)


def test_record_whose_prompt_lacks_the_subject_is_rejected():
    rec = {"requested_rewrite": {"prompt": "Paris is the capital of", "subject": "France",
                                 "target_new": {"str": "Italy"}}}
    with pytest.raises(InvalidRequestError, match="exactly one"):
        EditRequest.from_dict(rec)


def test_unknown_architecture_and_missing_stats():
    model, tok = model_and_tokenizer("gpt2")
    snap = _snapshot(model)
    model.config.model_type = "not_a_model"
    with pytest.raises(UnsupportedArchitectureError, match="register_architecture"):
        compute_edits(model, tok, requests(), config(), corpus=corpus(20), progress=False)
    model.config.model_type = "gpt2"
    with pytest.raises(StatisticsError, match="corpus="):
        compute_edits(model, tok, requests(), config(), progress=False)
    _assert_untouched(model, snap)


def test_non_finite_statistics_rejected():
    model, tok = model_and_tokenizer("gpt2")
    snap = _snapshot(model)
    stats = collect_stats(model, tok, corpus(20), [1, 2], progress=False)
    stats[2].mom2[0, 0] = float("nan")
    with pytest.raises(StatisticsError, match="not finite"):
        compute_edits(model, tok, requests(), config(), stats=stats, progress=False)
    _assert_untouched(model, snap)


def test_base_model_is_recorded_only_as_a_hub_id(tmp_path):
    from memit_adapter.engine import hub_model_id

    model, _ = model_and_tokenizer("gpt2")
    for name, expected in [("EleutherAI/gpt-j-6b", "EleutherAI/gpt-j-6b"), ("gpt2", "gpt2"), (str(tmp_path), None),
                           ("./local", None), ("", None), ("a/b/c", None)]:
        model.config._name_or_path = name
        assert hub_model_id(model) == expected, name


def _reference_spread(model, tok, reqs, templates, cfg, zs, stats):
    """MEMIT's spreading as published: per layer, one full forward per prompt (targets included) on a copy of the
    model whose weights the earlier layers' updates were added to; the dense solve. With ``cfg.subject_keys`` the
    subject alone, after each context and bare, joins the prefixed prompts' mean."""
    from memit_adapter.hooks import capture_inputs, capture_outputs
    from memit_adapter.solve import layer_update
    from memit_adapter.tokens import encode_fact

    ref = copy.deepcopy(model)
    spec, last, out = get_arch_spec(ref), max(cfg.layers), {}
    for pos, layer in enumerate(cfg.layers):
        keys, cur = [], []
        for r in reqs:
            k = []
            texts = [t.replace("{}", r.prompt) for t in templates]
            texts += [t for t in templates[1:] + templates[:1] if cfg.subject_keys]  # each filled with the subject
            for j, text in enumerate(texts):
                fact = encode_fact(tok, text, r.subject, r.target_new if j < len(templates) else "")
                with torch.no_grad(), capture_inputs(spec.mlp_out_module(ref, layer)) as k_in, \
                        capture_outputs(spec.blocks(ref)[last]) as outs:
                    ref.base_model(input_ids=torch.tensor([fact.ids]))
                first, stop = fact.subject
                at = stop - 1 if r.subject_token is None else max(first, stop + r.subject_token)
                k.append(k_in[0][0, at])
                if j == 0:
                    cur.append(outs[0][0, at])
            keys.append(0.5 * (k[0] + torch.stack(k[1:]).mean(0)))
        residuals = (zs - torch.stack(cur)).T / (len(cfg.layers) - pos)
        B, A = layer_update(torch.stack(keys).T, residuals, stats[layer].mom2, cfg.mom2_update_weight)
        with torch.no_grad():
            spec.mlp_out_module(ref, layer).weight += spec.delta_to_weight((B @ A).float())
        out[spec.mlp_out_name(layer)] = (B @ A).float()
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_spreading_equals_full_forwards_on_edited_weights(arch, chunk):
    """Keys and cur from passes that stop at the block they need, on prompts cut after the subject, in chunks, with
    the earlier layers' updates hooked in (and solved by the Woodbury route): the same updates as full forwards
    of whole prompts on a model whose weights carry the earlier updates."""
    model, tok = model_and_tokenizer(arch)
    snap = _snapshot(model)
    reqs = varied_requests()
    # not GPT-NeoX's layer 0: its MLP reads the token alone, so over this corpus's ~120 words C is singular and the
    # update swings with the last bits of the keys
    cfg = config(layers=[1, 2], context_templates=VARIED_TEMPLATES, v_batch_size=chunk)
    stats = collect_stats(model, tok, corpus(), cfg.layers, n_samples=cfg.mom2_n_samples, progress=False)
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(len(reqs), model.config.hidden_size, generator=g)
    spec = get_arch_spec(model)
    deltas = engine_mod._spread_over_layers(model, spec, tok, reqs, VARIED_TEMPLATES, cfg, zs, stats, False,
                                            keep_factors=True)
    assert all(stats[layer].has_factor() for layer in cfg.layers)  # n = 4 edits << d_in: the Woodbury route
    _assert_untouched(model, snap)
    want = _reference_spread(model, tok, reqs, VARIED_TEMPLATES, cfg, zs, stats)
    for layer in cfg.layers:
        got = deltas[layer].weight_delta()
        w = want[spec.mlp_out_name(layer)]
        assert (got - w).abs().max() <= 1e-5 * w.abs().max(), layer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_subject_keys_add_the_subject_alone_to_each_key(arch):
    """With ``subject_keys`` each key also reads the subject alone (after each context, and bare): the rows say so
    in words, the spread equals full forwards of those texts, and the update differs from the published keys'."""
    model, tok = model_and_tokenizer(arch)
    reqs = varied_requests()
    cfg = config(layers=[1, 2], context_templates=VARIED_TEMPLATES, v_batch_size=2, subject_keys=True)
    rows = engine_mod._key_rows(tok, reqs, VARIED_TEMPLATES, subject_keys=True)
    texts = ["the man said . the mother tongue of danielle darrieux",
             "he said that the capital of italy is rome and that . the mother tongue of danielle darrieux",
             "the man said . danielle darrieux",
             "he said that the capital of italy is rome and that . danielle darrieux", "danielle darrieux"]
    words = [tok.decode(row, skip_special_tokens=True).strip() for row in rows.templated[1]]
    assert words == [tok.decode(tok(text)["input_ids"], skip_special_tokens=True).strip() for text in texts]
    assert words[-1] == "danielle darrieux"
    assert len(engine_mod._key_rows(tok, reqs, VARIED_TEMPLATES).templated[1]) == 2
    stats = collect_stats(model, tok, corpus(), cfg.layers, n_samples=cfg.mom2_n_samples, progress=False)
    zs = torch.randn(len(reqs), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    spec = get_arch_spec(model)
    got = {cfg_.subject_keys: engine_mod._spread_over_layers(model, spec, tok, reqs, VARIED_TEMPLATES, cfg_, zs, stats,
                                                              False, keep_factors=False)
           for cfg_ in (cfg, cfg.replace(subject_keys=False))}
    want = _reference_spread(model, tok, reqs, VARIED_TEMPLATES, cfg, zs, stats)
    for layer in cfg.layers:
        w = want[spec.mlp_out_name(layer)]
        assert (got[True][layer].weight_delta() - w).abs().max() <= 1e-5 * w.abs().max(), layer
        assert (got[False][layer].weight_delta() - w).abs().max() > 1e-2 * w.abs().max(), layer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_edit_at_another_subject_token_reads_its_keys_there(arch):
    """With ``subject_token`` -2 each key and ``cur`` come from the subject's second-to-last token (the first of a
    one-token subject): the spread equals full forwards read there, and differs from the last token's."""
    from dataclasses import replace

    model, tok = model_and_tokenizer(arch)
    reqs = [replace(r, subject_token=-2) for r in varied_requests()]
    cfg = config(layers=[1, 2], context_templates=VARIED_TEMPLATES, subject_keys=True)
    stats = collect_stats(model, tok, corpus(), cfg.layers, n_samples=cfg.mom2_n_samples, progress=False)
    zs = torch.randn(len(reqs), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    spec = get_arch_spec(model)
    got = engine_mod._spread_over_layers(model, spec, tok, reqs, VARIED_TEMPLATES, cfg, zs, stats, False,
                                         keep_factors=False)
    last = engine_mod._spread_over_layers(model, spec, tok, varied_requests(), VARIED_TEMPLATES, cfg, zs, stats,
                                          False, keep_factors=False)
    want = _reference_spread(model, tok, reqs, VARIED_TEMPLATES, cfg, zs, stats)
    for layer in cfg.layers:
        w = want[spec.mlp_out_name(layer)]
        assert (got[layer].weight_delta() - w).abs().max() <= 1e-5 * w.abs().max(), layer
        assert (last[layer].weight_delta() - w).abs().max() > 1e-2 * w.abs().max(), layer


def test_edit_token_reach_edits_at_the_tokens_it_chooses_and_the_pack_records_them(monkeypatch):
    """``edit_token="reach"``: the requests whose last token fails move to the token chosen for them; the pack is
    the one computed with those tokens given, and its requests carry them."""
    from dataclasses import replace

    from memit_adapter import reach

    model, tok = model_and_tokenizer("gpt2")
    reqs = requests()
    chosen = {"michael jordan": -2, "toko yuki": -2}  # these fail at their last token; the others reach there

    def fake_rows(model, block, tokenizer, facts, rows, steps, lr, batch_size, progress):
        nll = [0.0 if pos - facts[i].subject[1] == chosen.get(reqs[i].subject, -1) else 5.0 for i, pos in rows]
        return torch.full((len(rows),), 9.0), torch.tensor(nll)

    monkeypatch.setattr(reach, "_reach_rows", fake_rows)
    cfg = config(v_num_grad_steps=5, edit_token="reach")
    stats = collect_stats(model, tok, corpus(), cfg.layers, n_samples=cfg.mom2_n_samples, progress=False)
    pack = compute_edits(model, tok, reqs, cfg, stats=stats, progress=False)
    assert [r.subject_token for r in pack.requests] == [chosen.get(r.subject, -1) for r in reqs]
    assert pack.report["off_last_token"] == [i for i, r in enumerate(reqs) if r.subject in chosen]
    given = [replace(r, subject_token=chosen.get(r.subject, -1)) for r in reqs]
    want = compute_edits(model, tok, given, cfg.replace(edit_token="last"), stats=stats, progress=False)
    published = compute_edits(model, tok, reqs, cfg.replace(edit_token="last"), stats=stats, progress=False)
    for name, delta in pack.deltas.items():
        torch.testing.assert_close(delta.weight_delta(), want.deltas[name].weight_delta())
        assert not torch.allclose(delta.weight_delta(), published.deltas[name].weight_delta())
    assert pack.requests == want.requests


def test_a_subject_has_one_edit_token_and_packs_keep_it(tmp_path):
    """Requests about one subject share one δ: tokens that differ are refused before any work, unless δ is not
    shared; a pack saves and loads its requests' tokens, and its id does not change."""
    from dataclasses import replace

    from memit_adapter.pack import EditPack

    model, tok = model_and_tokenizer("gpt2")
    snap = _snapshot(model)
    a = EditRequest("{} plays the sport of", "michael jordan", " golf", subject_token=-2)
    b = EditRequest("the sport played by {}", "michael jordan", " golf")
    with pytest.raises(InvalidRequestError, match="subject tokens -2 and -1"):  # "last": b is at -1
        compute_edits(model, tok, [a, b], config(), corpus=["no statistics are collected"], progress=False)
    with pytest.raises(InvalidRequestError, match="subject tokens -2 and -3"):
        compute_edits(model, tok, [a, replace(b, subject_token=-3)], config(edit_token="reach"), corpus=corpus(),
                      progress=False)
    _assert_untouched(model, snap)
    cfg = config(v_num_grad_steps=3, edit_token="reach")
    pack = compute_edits(model, tok, [a, b, *requests()[1:3]], cfg, corpus=corpus(40), progress=False)
    assert [r.subject_token for r in pack.requests[:2]] == [-2, -2]
    compute_edits(model, tok, [a, b], config(v_num_grad_steps=3, share_subject_delta=False), corpus=corpus(40),
                  progress=False)  # separate δs: separate tokens are fine
    pack.save_pretrained(tmp_path / "p")
    loaded = EditPack.from_pretrained(str(tmp_path / "p"))
    assert loaded.requests == pack.requests and loaded.pack_id == pack.pack_id


def test_key_passes_stop_where_they_have_what_they_measure():
    """Each pass runs the templated prompts up to layer l's W_out and the bare ones up to block L; no block after L,
    and no final norm, ever runs; every row ends at the subject's last token."""
    model, tok = model_and_tokenizer("gpt2")
    spec, reqs = get_arch_spec(model), varied_requests()
    cfg = config(layers=[1, 2], context_templates=VARIED_TEMPLATES)
    stats = collect_stats(model, tok, corpus(40), cfg.layers, n_samples=40, progress=False)
    calls = {i: [] for i in range(4)}
    handles = [block.register_forward_pre_hook(lambda _m, args, i=i: calls[i].append(args[0].shape[:2]))
               for i, block in enumerate(spec.blocks(model))]
    handles.append(model.transformer.ln_f.register_forward_pre_hook(lambda *_: calls.setdefault("norm", [])))
    try:
        engine_mod._spread_over_layers(model, spec, tok, reqs, VARIED_TEMPLATES, cfg, torch.zeros(4, 32), stats, False,
                                       keep_factors=False)
    finally:
        for h in handles:
            h.remove()
    assert calls[3] == [] and "norm" not in calls
    bare, templated = 4, 4 * (len(VARIED_TEMPLATES) - 1)
    assert [rows for rows, _ in calls[0]] == [bare, templated] * 2
    assert [rows for rows, _ in calls[2]] == [bare, bare, templated]  # templated rows reach block 2 for layer 2 only
    rows = engine_mod._key_rows(tok, reqs, VARIED_TEMPLATES)
    widths = [max(map(len, rows.bare)), max(len(s) for r in rows.templated for s in r)]
    assert [width for _, width in calls[0]] == widths * 2
    cut = rows.bare[1]  # "the mother tongue of danielle darrieux" without " is"
    assert tok.decode(cut) == "the mother tongue of danielle darrieux"


@pytest.mark.parametrize("n", [4, 40])  # below and above n* = 128 * 32 / 160 = 25.6: factors, then the dense ΔW
def test_hooked_deltas_add_their_update(n):
    from memit_adapter import LayerDelta

    model, _ = model_and_tokenizer("gpt2")
    spec, g = get_arch_spec(model), torch.Generator().manual_seed(0)
    delta = LayerDelta(B=torch.randn(32, n, generator=g), A=torch.randn(n, 128, generator=g) / n)
    x = torch.randn(2, 5, 128, generator=g)
    module = spec.mlp_out_module(model, 1)
    with torch.no_grad():
        base = module(x)
        with engine_mod._hooked_deltas(model, spec) as active:
            active[1] = delta
            got = module(x)
        torch.testing.assert_close(got, base + x @ delta.weight_delta().T, rtol=1e-5, atol=1e-5)
        assert torch.equal(module(x), base)


def test_the_report_gives_phase_times_and_names_requests_that_did_not_converge(caplog, monkeypatch):
    """After one step no target is likely yet: every request is reported, with a warning naming the worst. 40 steps
    lower every NLL; with the bar above them, nothing is reported (this tiny random model plateaus near p = 0.1)."""
    import math

    from memit_adapter import targets

    model, tok = model_and_tokenizer("gpt2")
    stats = collect_stats(model, tok, corpus(40), [1, 2], progress=False)
    with caplog.at_level("WARNING", logger="memit_adapter.targets"):
        pack = compute_edits(model, tok, requests(), config(v_num_grad_steps=1), stats=stats, progress=False)
    nll = pack.report["z_nll"]
    assert pack.report["unconverged"] == list(range(5)) and min(nll) > math.log(2)
    assert set(pack.report["seconds"]) == {"statistics", "targets", "update"}
    worst = max(range(5), key=lambda i: nll[i])
    assert "5 of 5 requests" in caplog.text and repr(requests()[worst].text) in caplog.text
    caplog.clear()
    bar = 3.0
    monkeypatch.setattr(targets, "UNCONVERGED_NLL", bar)
    monkeypatch.setattr(engine_mod, "UNCONVERGED_NLL", bar)
    with caplog.at_level("WARNING", logger="memit_adapter.targets"):
        again = compute_edits(model, tok, requests(), config(), stats=stats, progress=False)
    assert all(a < b for a, b in zip(again.report["z_nll"], nll)) and max(again.report["z_nll"]) < bar
    assert again.report["unconverged"] == [] and "even odds" not in caplog.text


def test_lambda_grows_with_the_batch_when_asked():
    """mom2_update_weight_per_edit * n replaces a smaller mom2_update_weight: the same pack as that fixed λ."""
    model, tok = model_and_tokenizer("gpt2")
    stats = collect_stats(model, tok, corpus(40), [1, 2], progress=False)
    grown = compute_edits(model, tok, requests(), config(mom2_update_weight=1.0, mom2_update_weight_per_edit=4.0),
                          stats=stats, progress=False)
    fixed = compute_edits(model, tok, requests(), config(mom2_update_weight=20.0), stats=stats, progress=False)
    other = compute_edits(model, tok, requests(), config(mom2_update_weight=1.0), stats=stats, progress=False)
    for name in grown.deltas:
        torch.testing.assert_close(grown.deltas[name].weight_delta(), fixed.deltas[name].weight_delta())
        assert not torch.allclose(grown.deltas[name].weight_delta(), other.deltas[name].weight_delta())
