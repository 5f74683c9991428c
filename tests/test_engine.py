import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer, requests
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

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second layer")
        return real(*args)

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
    b = compute_edits(model, tok, requests(), cfg, corpus=corpus(), progress=False)
    for name in a.deltas:
        torch.testing.assert_close(a.deltas[name].weight_delta(), b.deltas[name].weight_delta())


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
