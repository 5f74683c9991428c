import json
from dataclasses import astuple

import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer
from tiny import make_tokenizer, tiny_model

from memit_adapter import ConfigError, EditRequest, InvalidRequestError, MemitConfig
from memit_adapter.engine import compute_edits
from memit_adapter.requests import find_conflicts
from memit_adapter.tokens import encode_fact


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_subject_lookup_and_targets(add_bos, padding_side):
    tok = make_tokenizer(add_bos=add_bos, padding_side=padding_side)
    fact = encode_fact(tok, "the man said . {} plays the sport of", "michael jordan", " tennis golf")
    tokens = tok.convert_ids_to_tokens(fact.ids)
    assert tokens[fact.lookup] == "jordan" and tokens[fact.lookup - 1] == "michael"
    assert (tokens[0] == "<s>") == add_bos
    assert tok.convert_ids_to_tokens(fact.target_ids) == ["tennis", "golf"]
    assert fact.target_positions == [len(fact.ids) - 3, len(fact.ids) - 2]
    assert tokens[fact.n_prompt - 1] == "of"
    for token, word in ((-1, "jordan"), (-2, "michael"), (-5, "michael")):  # past the first: the first
        moved = encode_fact(tok, "the man said . {} plays the sport of", "michael jordan", " tennis golf", token)
        assert tokens[moved.lookup] == word and (moved.ids, moved.subject) == (fact.ids, fact.subject)


def test_padding_side_does_not_change_the_edit():
    """A tokenizer that pads on the left gives the same deltas as one that pads on the right."""
    model = tiny_model("llama", initializer_range=0.1)
    packs = [compute_edits(model, make_tokenizer(add_bos=True, padding_side=side),
                           [EditRequest("{} plays the sport of", "michael jordan", " golf"),
                            EditRequest("the famous player for the team of {}", "lebron james", " rome")],
                           config(v_num_grad_steps=5), corpus=corpus(20), progress=False)
             for side in ("left", "right")]
    for name in packs[0].deltas:
        assert torch.equal(packs[0].deltas[name].weight_delta(), packs[1].deltas[name].weight_delta())


def test_request_from_counterfact_and_memit_dicts():
    cf = {"case_id": 7, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": "Michael Jordan",
                                              "relation_id": "P641", "target_new": {"str": "baseball"},
                                              "target_true": {"str": "basketball", "id": "Q5372"}}}
    memit = {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": "baseball"}}
    a, b = EditRequest.from_dict(cf), EditRequest.from_dict(memit)
    assert a == EditRequest("{} plays the sport of", "Michael Jordan", "baseball", "basketball", 7, "P641")
    assert (b.prompt, b.subject, b.target_new, b.target_true, b.relation_id) == (*astuple(a)[:3], None, None)
    assert EditRequest.from_dict(a.to_dict()) == a
    # an unset relation id stays out of the dict, so ids hashed from requests written before it stay the same
    assert "relation_id" not in b.to_dict() and EditRequest(**b.to_dict()) == b
    assert EditRequest(**a.to_dict()) == a
    with pytest.raises(InvalidRequestError, match="relation_id"):
        EditRequest("{} x", "s", " y", relation_id=17)
    for bad in (0, 1, True, -1.0, "-1"):
        with pytest.raises(InvalidRequestError, match="subject_token"):
            EditRequest("{} x", "s", " y", subject_token=bad)
    c = EditRequest.from_dict({"prompt": "{} x", "subject": "s", "target_new": "y", "subject_token": -2})
    assert c.subject_token == -2 and c.to_dict()["subject_token"] == -2 and EditRequest(**c.to_dict()) == c
    assert "subject_token" not in b.to_dict()  # unset: packs written before it keep their ids
    assert a.text == "Michael Jordan plays the sport of"
    with pytest.raises(InvalidRequestError, match="target_new"):
        EditRequest.from_dict({"prompt": "{} x", "subject": "s"})
    with pytest.raises(InvalidRequestError):
        EditRequest.from_dict({"prompt": "{} x", "subject": "s", "target_new": {"id": 3}})


def test_conflicts_found_and_duplicates_allowed():
    a = EditRequest("{} plays", "x", " golf")
    assert find_conflicts([a, EditRequest("{} plays", "x", "golf"), EditRequest("{} lives in", "x", " rome")]) == []
    b = EditRequest("{} plays", "x", " tennis")
    assert find_conflicts([a, b]) == [(a, b)]


def test_config_json_round_trip_and_validation():
    cfg = MemitConfig(layers=[1, 2], mom2_update_weight=300.0, context_templates=["{}", "a . {}"])
    assert MemitConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["mom2_update_weight"] == 300.0
    for bad in [dict(layers=[]), dict(layers=[2, 1]), dict(layers=[1, 1]), dict(layers=[-1]),
                dict(mom2_update_weight=0), dict(v_lr=float("nan")), dict(kl_factor=-1), dict(mom2_dtype="float16"),
                dict(v_batch_size=0), dict(context_templates=["no placeholder"]), dict(layers=[True]),
                dict(mom2_n_samples=2.5), dict(v_num_grad_steps=2.5), dict(v_num_grad_steps=0),
                dict(seed=float("nan")), dict(v_lr_relative="no"), dict(share_subject_delta=1), dict(v_lr="0.5"),
                dict(edit_token="first"), dict(edit_token=None),
                dict(kl_factor=True),
                dict(mom2_max_tokens=10.0), dict(stats_batch_size=True), dict(mom2_update_weight_per_edit=-1.0),
                dict(preserve_max_relations=0), dict(preserve_every=0), dict(preserve_every=1.5),
                dict(preserve_max_relations=2.0), dict(v_lr_decay_to=0.0),
                dict(v_lr_decay_to=1.5), dict(v_lr_decay_to=float("nan")), dict(v_lr_decay_to="0.5"),
                dict(v_target_nll_threshold="0.1"), dict(repair_rounds=-1), dict(repair_rounds=True),
                dict(subject_keys=1)]:
        with pytest.raises(ConfigError):
            MemitConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        MemitConfig.from_dict({"layerz": [1]})
    for text in ("{not json", "[1, 2]"):
        with pytest.raises(ConfigError, match="JSON"):
            MemitConfig.from_json(text)
    assert MemitConfig(mom2_update_weight=300, v_batch_size=None).mom2_update_weight == 300  # ints are numbers


class _Shell(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def test_for_model_presets_and_scaled_defaults():
    from transformers import GPT2Config, GPTJConfig, LlamaConfig
    xl = MemitConfig.for_model(_Shell(GPT2Config(n_layer=48, n_embd=1600)))
    assert xl.layers == [13, 14, 15, 16, 17] and xl.mom2_update_weight == 20000 and xl.v_num_grad_steps == 20
    gptj = MemitConfig.for_model(_Shell(GPTJConfig(n_layer=28, n_embd=4096)))
    assert gptj.layers == [3, 4, 5, 6, 7, 8] and gptj.mom2_update_weight == 15000
    llama = MemitConfig.for_model(_Shell(LlamaConfig(num_hidden_layers=32, hidden_size=4096)))
    assert llama.layers == [4, 5, 6, 7, 8] and llama.clamp_norm_factor == 4 and llama.v_weight_decay == 1e-3
    small = MemitConfig.for_model(_Shell(GPT2Config(n_layer=6, n_embd=256, n_inner=1024)))
    assert small.layers == [0, 1, 2] and small.mom2_update_weight == pytest.approx(102.4) and small.v_lr_relative
    assert small.update_weight(50) == pytest.approx(102.4) and small.update_weight(1000) == pytest.approx(1024)
    assert xl.update_weight(10_000) == 20000  # published presets keep their fixed λ
    assert (small.v_num_grad_steps, small.v_loss_threshold, small.preserve_factor) == (60, 0.001, 0.5)
    assert xl.preserve_factor == gptj.preserve_factor == llama.preserve_factor == 0.0  # published method
    assert small.subject_keys and not (xl.subject_keys or gptj.subject_keys or llama.subject_keys)
    assert small.edit_token == "reach" and xl.edit_token == gptj.edit_token == llama.edit_token == "last"
    twelve = MemitConfig.for_model(_Shell(GPT2Config(n_layer=12, n_embd=768)))
    assert twelve.layers == [1, 2, 3, 4] and twelve.mom2_update_weight == pytest.approx(307.2)
    assert not xl.v_lr_relative and xl.v_lr == 0.5 and xl.clamp_norm_factor == 0.75
    assert MemitConfig.for_model(_Shell(GPT2Config(n_layer=6)), layers=[4]).layers == [4]
    model, _ = model_and_tokenizer("gpt2")
    assert max(MemitConfig.for_model(model).layers) < 4


def test_published_for_is_the_published_preset_or_the_published_defaults_at_for_models_layers():
    from transformers import GPT2Config, GPTJConfig, LlamaConfig
    for cfg in (GPT2Config(n_layer=48, n_embd=1600), GPTJConfig(n_layer=28, n_embd=4096),
                LlamaConfig(num_hidden_layers=32, hidden_size=4096)):
        assert MemitConfig.published_for(_Shell(cfg)) == MemitConfig.for_model(_Shell(cfg))
    shell = _Shell(GPT2Config(n_layer=6, n_embd=256, n_inner=1024))
    published, scaled, defaults = MemitConfig.published_for(shell), MemitConfig.for_model(shell), MemitConfig()
    assert published.layers == scaled.layers == [0, 1, 2]
    assert published.mom2_update_weight == scaled.mom2_update_weight == pytest.approx(102.4)
    assert published.update_weight(1000) == pytest.approx(102.4) != scaled.update_weight(1000)  # fixed, as published
    assert (published.mom2_max_tokens, published.mom2_max_length) == (scaled.mom2_max_tokens, scaled.mom2_max_length)
    same = ("v_lr", "v_lr_relative", "clamp_norm_factor", "kl_factor", "v_weight_decay", "v_loss_threshold",
            "preserve_factor", "subject_keys", "edit_token", "context_template_length")
    assert {f: getattr(published, f) for f in same} == {f: getattr(defaults, f) for f in same}
    assert (published.v_num_grad_steps, published.v_lr, published.preserve_factor) == (20, 0.5, 0.0)
    assert MemitConfig.published_for(shell, v_num_grad_steps=5).v_num_grad_steps == 5
