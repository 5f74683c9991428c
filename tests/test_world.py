"""The fact world: determinism, format, CounterFact records, tokenizer; the shipped checkpoints."""

import json
import random
from collections import Counter

import pytest
import torch

from memit_adapter.demo.checkpoints import load_world_model, world_model_path
from memit_adapter.demo.world import (
    RELATIONS,
    FactWorld,
    Relation,
    build_world_tokenizer,
    check_templates,
    make_world,
    recall_by_template,
)
from memit_adapter.errors import ConfigError
from memit_adapter.evaluation import evaluate_counterfact
from memit_adapter.requests import EditRequest, check_requests


@pytest.fixture(scope="module")
def world():
    return make_world(0)


def test_world_is_deterministic_in_the_seed(world):
    again = make_world(0)
    assert again.to_dict() == world.to_dict()
    assert again.counterfact_records() == world.counterfact_records()
    other = make_world(1)
    assert other.subjects != world.subjects


def test_world_shape(world):
    assert len(world.subjects) == 300 and len(set(world.subjects)) == 300
    assert len(world.relations) >= 6 and all(4 <= len(r.templates) <= 5 for r in world.relations)
    assert len(world.facts) == 300 * len(world.relations)
    # one fact per (subject, relation), objects single words from the relation
    assert len({(f.subject, f.relation) for f in world.facts}) == len(world.facts)
    for f in world.facts:
        assert f.obj in world.relation(f.relation).objects and " " not in f.obj
    # names have 2-3 words and the last one identifies the subject
    assert {len(s.split()) for s in world.subjects} == {2, 3}
    last = Counter(s.split()[-1] for s in world.subjects)
    assert max(last.values()) == 1
    other_words = {w for s in world.subjects for w in s.split()[:-1]} | set(world.vocabulary()) - set(last)
    assert not set(last) & {w for r in world.relations for t in r.templates for w in t.split()}
    assert not set(last) & {o for r in world.relations for o in r.objects}
    assert other_words  # first names are shared, surnames are not


def test_composite_names_share_both_words():
    world = make_world(0, names="composite")
    assert world.names == "composite" and make_world(0, names="composite").to_dict() == world.to_dict()
    assert len(world.subjects) == 300 and {len(s.split()) for s in world.subjects} == {2, 3}
    pairs = Counter((s.split()[0], s.split()[-1]) for s in world.subjects)
    assert max(pairs.values()) == 1  # only the (first name, surname) pair identifies a subject
    last = Counter(s.split()[-1] for s in world.subjects)
    first = Counter(s.split()[0] for s in world.subjects)
    assert min(last.values()) >= 2 and min(first.values()) >= 2 and len(last) <= 40 and len(first) <= 40
    assert not set(last) & ({w for r in world.relations for t in r.templates for w in t.split()} | set(first))
    assert FactWorld.from_dict(json.loads(json.dumps(world.to_dict()))).to_dict() == world.to_dict()
    old = {k: v for k, v in make_world(0).to_dict().items() if k != "names"}  # a world.json of before
    assert FactWorld.from_dict(old).names == "unique_surname" and make_world(0).names == "unique_surname"
    with pytest.raises(ConfigError, match="names"):
        make_world(0, names="random")


def test_corpus_states_every_fact_in_every_template(world):
    sentences = world.corpus_sentences()
    facts = world.fact_sentences()
    n_templates = sum(len(world.relation(f.relation).templates) for f in world.facts)
    assert len(facts) == len(set(facts)) == n_templates
    assert sentences[:len(facts)] == facts
    filler = sentences[len(facts):]
    assert 0 < len(filler) < 0.05 * len(facts)  # a little filler
    f = world.facts[0]
    for t in world.relation(f.relation).templates:
        assert f"{t.format(f.subject)} {f.obj} ." in facts
    starts = {s.split()[0] for s in filler}
    assert {"the", "therefore", "because", "i", "you"} <= starts  # MEMIT's context-template starts


def test_templates_are_never_prefixes_of_each_other():
    check_templates(RELATIONS)
    bad = RELATIONS + (Relation("fan", ("{} is a fan of the",), ("reds", "blues")),)
    with pytest.raises(ConfigError, match="prefix"):
        check_templates(bad)
    with pytest.raises(ConfigError, match="single words"):
        check_templates((Relation("x", ("{} likes",), ("new york", "oslo")),))
    with pytest.raises(ConfigError, match="exactly one"):
        check_templates((Relation("x", ("likes",), ("a", "b")),))


def test_counterfact_records(world):
    records = world.counterfact_records()
    assert len(records) == len(world.facts)
    true_obj = {(f.subject, f.relation): f.obj for f in world.facts}
    subjects = set(world.subjects)
    for rec in random.Random(0).sample(records, 200):
        rw = rec["requested_rewrite"]
        assert set(rec) >= {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                            "generation_prompts"}
        rel = world.relation(rw["relation_id"])
        assert rw["prompt"] in rel.templates
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        assert new.startswith(" ") and true.startswith(" ") and new != true
        assert true.strip() == true_obj[(rw["subject"], rel.relation_id)] and new.strip() in rel.objects
        others = {t.format(rw["subject"]) for t in rel.templates} - {rw["prompt"].format(rw["subject"])}
        assert set(rec["paraphrase_prompts"]) == others
        assert len(rec["neighborhood_prompts"]) == 10
        for prompt in rec["neighborhood_prompts"]:
            holder = [s for s in subjects if s in prompt and s != rw["subject"]]
            assert any(true_obj[(s, rel.relation_id)] == true.strip() for s in holder)
        assert all(rw["subject"] in p for p in rec["generation_prompts"])
    assert [r["case_id"] for r in records] == list(range(len(records)))
    json.dumps(records)  # plain JSON
    requests = [EditRequest.from_dict(r) for r in records]
    check_requests(requests)  # one target per (subject, prompt): a consistent batch


def test_world_round_trips_through_dict(world):
    assert FactWorld.from_dict(json.loads(json.dumps(world.to_dict()))).to_dict() == world.to_dict()


@pytest.mark.parametrize("add_bos", [False, True])
def test_world_tokenizer(world, add_bos, tmp_path):
    from transformers import AutoTokenizer

    tok = build_world_tokenizer(world, add_bos=add_bos)
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for s in world.corpus_sentences()[::97]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s.split()) and tok.unk_token_id not in ids
    f = world.facts[3]
    ids = tok(f.subject.title() + " Lives In")["input_ids"]  # lower-cases
    assert ids[0] == tok.bos_token_id if add_bos else ids[0] != tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[-3]) == f.subject.split()[-1]
    assert tok.pad_token_id == 0


def test_recall_by_template_on_a_tiny_random_model(world):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_world_tokenizer(world)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=64)).eval()
    facts = world.facts[:14]
    recall = recall_by_template(model, tok, world, facts=facts)
    assert set(recall) == {f.relation for f in facts}
    # independent: one prompt at a time
    rel = facts[0].relation
    for t, value in recall[rel].items():
        hits = []
        for f in facts:
            if f.relation == rel:
                ids = tok(world.prompt(f, t), return_tensors="pt")["input_ids"]
                with torch.no_grad():
                    hits.append(tok.convert_ids_to_tokens(int(model(ids).logits[0, -1].argmax())) == f.obj)
        assert value == sum(hits) / len(hits)


# -- the shipped checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_shipped_world_model_knows_its_facts(name):
    model, tok, records = load_world_model(name)
    report = json.loads((world_model_path(name) / "training.json").read_text())
    assert model.config.model_type == name and next(model.parameters()).dtype == torch.float32
    assert report["min_recall"] >= 0.95
    assert all(v >= 0.95 for by_t in report["recall_by_template"].values() for v in by_t.values())
    world = FactWorld.from_dict(json.loads((world_model_path(name) / "world.json").read_text()))
    assert world.to_dict() == make_world(world.seed, names=world.names).to_dict()  # the generator's
    assert records == world.counterfact_records()
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == (name == "llama")
    facts = random.Random(1).sample(world.facts, 60)
    recall = recall_by_template(model, tok, world, facts=facts)
    values = [v for by_t in recall.values() for v in by_t.values()]
    assert sum(values) / len(values) >= 0.95
    # before any edit, the true object beats the new one almost everywhere
    result = evaluate_counterfact(model, tok, records[:20], generation=False)
    assert result.efficacy_score <= 0.1 and result.paraphrase_score <= 0.1 and result.neighborhood_score >= 0.9


def test_shipped_files_are_small():
    for name in ("gpt2", "llama"):
        for path in world_model_path(name).iterdir():
            assert path.stat().st_size < 20 * 2**20, path.name


def test_unknown_world_model_name():
    with pytest.raises(ConfigError, match="world-gpt2|gpt2"):
        world_model_path("gpt3")
    assert world_model_path("world-gpt2") == world_model_path("gpt2")


def test_cli_eval_on_world_model(tmp_path, capsys):
    from memit_adapter.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--model", "world-gpt2", "--n", "5", "--no-generation", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())["results"]["model"]
    assert saved["n_records"] == 5 and saved["neighborhood_score"] >= 0.9
    assert "paraphrase_score" in capsys.readouterr().out


@pytest.mark.slow
def test_training_script_writes_a_loadable_checkpoint(tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny-world"
    subprocess.run([sys.executable, "-m", "memit_adapter.demo.train", "--arch", "llama", "--out", str(out),
                    "--n-layer", "1", "--d-model", "32", "--d-ff", "64", "--epochs", "2", "--switch-epoch", "1",
                    "--probe", "20", "--attn-free-layers", "0"],
                   check=True, capture_output=True)
    report = json.loads((out / "training.json").read_text())
    assert report["epochs"] == 2 and report["history"][1]["packed_share"] == 0.5
    assert set(report["recall_by_template"]) == {r.relation_id for r in RELATIONS}
    assert "| relation | template | recall |" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.intermediate_size == 64
    assert AutoTokenizer.from_pretrained(out)("x")["input_ids"][0] == 2  # <s>
    assert json.loads((out / "records.json").read_text()) == make_world(0).counterfact_records()


def _train_world_module():
    from memit_adapter.demo import train

    return train


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_keeps_attention_free_blocks_and_frozen_names(arch):
    """After optimiser steps, block 0's attention still outputs exactly zero, block 1's does not, the
    frozen rows have not moved and the others have; the GPT-2 position embeddings stay zero when asked."""
    tw = _train_world_module()
    args = tw.parse_args(["--out", "unused", "--arch", arch, "--n-layer", "2", "--d-model", "32", "--d-ff", "64",
                          "--attn-free-layers", "1", "--no-position-embeddings"])
    torch.manual_seed(0)
    model = tw.build_model(arch, 50, args)
    emb = model.get_input_embeddings().weight
    frozen = [5, 7]
    tw.freeze_rows(emb, frozen)
    before = emb.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=args.weight_decay)
    ids = torch.randint(0, 50, (4, 12))
    ids[:, 3] = 5
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    seen = {}
    blocks = model.transformer.h if arch == "gpt2" else model.model.layers
    hooks = [b.get_submodule("attn" if arch == "gpt2" else "self_attn").register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out[0])) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert torch.count_nonzero(seen[0]) == 0 and torch.count_nonzero(seen[1]) > 0
    assert torch.equal(emb[frozen], before[frozen])
    assert not torch.equal(emb[[1, 2]], before[[1, 2]])
    if arch == "gpt2":
        assert torch.count_nonzero(model.transformer.wpe.weight) == 0
    with pytest.raises(ValueError, match="attn-free-layers"):
        tw.build_model(arch, 50, tw.parse_args(["--out", "x", "--arch", arch, "--n-layer", "2",
                                                "--attn-free-layers", "2"]))


def test_separated_positions_leave_the_first_blocks_keys_position_free():
    """--position-dims: after optimiser steps, a token's MLP keys in the attention-free blocks are the same
    at two positions (exactly, up to float rounding), the first attention block's are not, and the
    position code, the token embeddings' position coordinates and the masked weights stay as set."""
    tw = _train_world_module()
    args = tw.parse_args(["--out", "unused", "--n-layer", "3", "--d-model", "32", "--d-ff", "64",
                          "--attn-free-layers", "2", "--position-dims", "8"])
    torch.manual_seed(0)
    model = tw.build_model("gpt2", 50, args)
    tw.separate_positions(model, 8, 2)
    wpe = model.transformer.wpe.weight.detach().clone()
    assert torch.count_nonzero(wpe[:, :24]) == 0 and torch.allclose(wpe.sum(1), torch.zeros(len(wpe)), atol=1e-6)
    assert torch.allclose(wpe.norm(dim=1), wpe[0].norm().expand(len(wpe)))  # same norm at every position
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        ids = torch.randint(0, 50, (4, 20))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.transformer.wpe.weight, wpe)
    assert torch.count_nonzero(model.transformer.wte.weight[:, 24:]) == 0
    assert torch.count_nonzero(model.transformer.h[0].mlp.c_proj.weight[:, 24:]) == 0
    assert torch.count_nonzero(model.transformer.h[2].mlp.c_proj.weight[:, 24:]) > 0
    keys = {}
    hooks = [b.mlp.c_proj.register_forward_hook(lambda m, a, o, i=i: keys.__setitem__(i, a[0][0]))
             for i, b in enumerate(model.transformer.h)]
    ids = torch.randint(0, 50, (1, 20))
    ids[0, 2] = ids[0, 15] = 7
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for i in (0, 1):
        torch.testing.assert_close(keys[i][2], keys[i][15], rtol=0, atol=1e-5)
    assert (keys[2][2] - keys[2][15]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="position-dims"):
        tw.separate_positions(model, 6, 2)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_shipped_world_models_route_subjects_through_attention_free_blocks(name):
    """The first blocks' attention adds exactly nothing and their MLP keys at a token do not depend on its
    position (GPT-2: positions in separate coordinates; LLaMA: rotary, inside attention), so a subject's
    state there depends on the subject alone: the property that puts the facts where MEMIT edits them."""
    from memit_adapter.arch import get_arch_spec

    model, tok, _ = load_world_model(name)
    k = json.loads((world_model_path(name) / "training.json").read_text())["config"]["attn_free_layers"]
    assert k >= 1
    spec = get_arch_spec(model)
    seen, keys = {}, {}
    blocks = spec.blocks(model)
    hooks = [blocks[i].get_submodule(spec.attn).register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out[0])) for i in range(k + 1)]
    down = "mlp.c_proj" if name == "gpt2" else "mlp.down_proj"
    hooks += [blocks[i].get_submodule(down).register_forward_hook(
        lambda m, a, out, i=i: keys.__setitem__(i, a[0])) for i in range(k + 1)]
    enc = tok(["otto zapous lives in", "the home of otto zapous is in"], return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in hooks:
            h.remove()
    assert all(torch.count_nonzero(seen[i]) == 0 for i in range(k)) and torch.count_nonzero(seen[k]) > 0
    zapous = tok.convert_tokens_to_ids("zapous")
    pos = [row.tolist().index(zapous) for row in enc["input_ids"]]
    assert pos[0] != pos[1]
    for i in range(k):
        torch.testing.assert_close(keys[i][0, pos[0]], keys[i][1, pos[1]], rtol=0, atol=1e-4)
    assert not torch.allclose(keys[k][0, pos[0]], keys[k][1, pos[1]], atol=1e-3)


@pytest.mark.slow
def test_hundred_edits_on_the_shipped_gpt2_world_meet_the_quality_bar():
    """100 edits with ``MemitConfig.for_model``'s settings: ES >= 99%, PS >= 90%, NS >= 90% (issue 4)."""
    from memit_adapter import EditRequest, MemitConfig, compute_edits

    torch.manual_seed(0)
    model, tok, records = load_world_model("gpt2")
    chosen = random.Random(0).sample(records, 100)
    pack = compute_edits(model, tok, [EditRequest.from_dict(r) for r in chosen], MemitConfig.for_model(model),
                         corpus=world_model_path("gpt2") / "corpus.txt", progress=False)
    with pack.applied(model):
        post = evaluate_counterfact(model, tok, chosen, generation=False)
    assert post.efficacy_score >= 0.99 and post.paraphrase_score >= 0.9 and post.neighborhood_score >= 0.9, post
