"""Subword tokenizers of the fact world (GPT-2-style byte-level BPE, LLaMA-style SentencePiece) and the stock
world models trained with them (``world-gpt2-bpe``, ``world-llama-sp``)."""

import json
import random
from collections import Counter
from statistics import median

import pytest
import torch

from memit_adapter.demo import (
    FactWorld,
    load_world_model,
    make_world,
    pack_documents,
    recall_by_template,
    train_world_tokenizer,
    world_model_path,
)
from memit_adapter.demo.train import write_corpus
from memit_adapter.errors import ConfigError

VOCAB = {"bpe": 780, "sentencepiece": 540}  # the sizes of the shipped checkpoints
SHIPPED = {"gpt2-bpe": ("gpt2", "bpe"), "llama-sp": ("llama", "sentencepiece")}


@pytest.fixture(scope="module")
def world():
    return make_world(0, n_subjects=600)


@pytest.fixture(scope="module", params=sorted(VOCAB))
def tokenizer(request, world):
    return train_world_tokenizer(world, kind=request.param, vocab_size=VOCAB[request.param])


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_names_split_into_several_tokens(world, tokenizer):
    """In running text (after a space) no surname is one token, and a subject is several."""
    surnames = [n_tokens(tokenizer, " " + s.split()[-1]) for s in world.subjects]
    subjects = [n_tokens(tokenizer, " " + s) for s in world.subjects]
    assert min(surnames) >= 2 and 3 <= median(subjects) <= 6
    assert min(subjects) >= 3 and sum(n >= 4 for n in subjects) > 0.8 * len(subjects)
    objects = {o: n_tokens(tokenizer, " " + o) for r in world.relations for o in r.objects}
    multi = [o for o, n in objects.items() if n > 1]
    assert 1 <= len(multi) <= 20 and "volleyball" in multi  # most objects are one token, a few several


def test_tokenizer_encodes_the_corpus_and_decodes_it_back(world, tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    t = tokenizer
    assert (t.pad_token_id, t.unk_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2, 3)
    for text in world.corpus_sentences()[::997]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


def test_packed_documents_fill_the_context_with_every_sentence_once(world, tokenizer):
    sentences = world.corpus_sentences()[:3000]
    docs = pack_documents(sentences, tokenizer, 64, seed=1)
    lengths = [len(tokenizer(d)["input_ids"]) for d in docs]  # special tokens (LLaMA's <s>) included
    assert max(lengths) <= 64 and sum(lengths) / len(docs) > 56
    pieces = [s + " ." for d in docs for s in d.split(" . ")]  # every sentence ends in " ."
    pieces = [p[:-2] if p.endswith(" . .") else p for p in pieces]
    assert Counter(pieces) == Counter(sentences)
    for doc, following in zip(docs, docs[1:]):  # greedy: the next document's first sentence did not fit
        first = following.split(" . ")[0]
        first = first if first.endswith(" .") else first + " ."
        assert len(tokenizer(doc + " " + first)["input_ids"]) > 64
    assert docs == pack_documents(sentences, tokenizer, 64, seed=1) != pack_documents(sentences, tokenizer, 64)


def test_a_text_longer_than_the_context_is_a_document_of_its_own(tokenizer):
    long = " ".join(["the weather is nice ."] * 30)
    texts = ["a cat .", long, "a dog .", "a cow .", "", "  "]
    orders = set()
    for seed in range(6):  # the long text first, in the middle and last
        docs = pack_documents(texts, tokenizer, 16, seed=seed)
        others = [d for d in docs if d != long]
        assert long in docs and sorted(" ".join(others).split()) == sorted("a cat . a dog . a cow .".split())
        assert all(len(tokenizer(d)["input_ids"]) <= 16 for d in others)
        orders.add(docs.index(long))
    assert len(orders) > 1


@pytest.mark.parametrize("texts,max_tokens,message", [
    (["a cat ."], 0, "at least 1"),
    ("a cat .", 16, "one string"),
    (["a cat .\na dog ."], 16, "line breaks"),
])
def test_pack_documents_refuses_bad_input(tokenizer, texts, max_tokens, message):
    with pytest.raises(ConfigError, match=message):
        pack_documents(texts, tokenizer, max_tokens)


def test_the_world_corpus_holds_the_sentences_then_the_same_as_running_text(world, tokenizer, tmp_path):
    write_corpus(tmp_path, world, tokenizer, 64)
    lines = (tmp_path / "corpus.txt").read_text().splitlines()
    sentences = world.corpus_sentences()
    assert lines[: len(sentences)] == sentences
    assert lines[len(sentences):] == pack_documents(sentences, tokenizer, 64)


def test_only_the_sentencepiece_tokenizer_adds_bos(world, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    is_sp = tokenizer.tokenize("x")[0].startswith("▁")
    tokenizer.save_pretrained(tmp_path)
    for tok in (tokenizer, AutoTokenizer.from_pretrained(tmp_path)):
        ids = tok("otto zapous lives in")["input_ids"]
        assert (ids[0] == tok.bos_token_id) == is_sp and ids.count(tok.bos_token_id) == int(is_sp)
    # LLaMA: "▁" in front of the first word too; GPT-2: no space in front of the first word
    assert tokenizer.tokenize("otto zapous")[0][0] == ("▁" if is_sp else "o")
    assert tokenizer.tokenize(" otto")[0] == ("▁otto" if is_sp else "Ġotto")


def test_tokenizer_is_deterministic_and_checks_its_arguments(world):
    a = train_world_tokenizer(world, kind="bpe", vocab_size=VOCAB["bpe"])
    assert a.get_vocab() == train_world_tokenizer(world, kind="bpe", vocab_size=VOCAB["bpe"]).get_vocab()
    assert len(a) == VOCAB["bpe"]
    with pytest.raises(ConfigError, match="kind"):
        train_world_tokenizer(world, kind="wordpiece", vocab_size=500)
    with pytest.raises(ConfigError, match="vocab_size"):
        train_world_tokenizer(world, kind="bpe", vocab_size=200)  # below the 256 bytes


def test_records_without_leading_space():
    small = make_world(0)
    spaced, bare = small.counterfact_records(), small.counterfact_records(leading_space=False)
    assert spaced == small.counterfact_records(leading_space=True)
    for s, b in zip(spaced, bare):
        for key in ("target_new", "target_true"):
            assert b["requested_rewrite"][key]["str"] == s["requested_rewrite"][key]["str"][1:]
            assert not b["requested_rewrite"][key]["str"].startswith(" ")
        s["requested_rewrite"].pop("target_new"), s["requested_rewrite"].pop("target_true")
        b["requested_rewrite"].pop("target_new"), b["requested_rewrite"].pop("target_true")
        assert s == b  # nothing else changes


# -- the shipped checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    model, tok, records = load_world_model(request.param)
    path = world_model_path(request.param)
    world = FactWorld.from_dict(json.loads((path / "world.json").read_text()))
    report = json.loads((path / "training.json").read_text())
    return request.param, model, tok, records, world, report


def test_shipped_checkpoint_is_a_stock_model_of_the_generator(shipped):
    name, model, tok, records, world, report = shipped
    arch, kind = SHIPPED[name]
    assert model.config.model_type == arch and next(model.parameters()).dtype == torch.float32
    assert report["tokenizer"] == kind and report["config"]["attn_free_layers"] == 0
    assert not report["config"]["freeze_name_embeddings"] and not report["config"]["position_dims"]
    assert world.to_dict() == make_world(world.seed, names=world.names, n_subjects=600).to_dict()
    assert records == world.counterfact_records(leading_space=False)
    assert not records[0]["requested_rewrite"]["target_new"]["str"].startswith(" ")
    fresh = train_world_tokenizer(world, kind=kind, vocab_size=report["training"]["vocab_size"])
    assert tok.get_vocab() == fresh.get_vocab()
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == (kind == "sentencepiece")
    assert report["min_recall"] >= 0.95
    sentences = world.corpus_sentences()  # the statistics corpus: the sentences, then the same as running text
    corpus = (world_model_path(name) / "corpus.txt").read_text().splitlines()
    assert corpus == sentences + pack_documents(sentences, tok, report["config"]["seq_len"])
    size = sum(p.stat().st_size for p in world_model_path(name).iterdir())
    assert size < 20 * 2**20


def test_shipped_checkpoint_recalls_sampled_facts(shipped):
    _, model, tok, _, world, _ = shipped
    facts = random.Random(0).sample(world.facts, 100)
    recall = recall_by_template(model, tok, world, facts=facts)  # {relation: {template: share of its facts}}
    n_facts = Counter(f.relation for f in facts)
    hits = sum(v * n_facts[rel] for rel, by_t in recall.items() for v in by_t.values())
    prompts = sum(n_facts[rel] * len(by_t) for rel, by_t in recall.items())
    assert prompts == 5 * len(facts) and hits / prompts >= 0.95


def test_recall_of_a_multi_token_object_is_greedy_generation(shipped):
    """recall_by_template's verdict on facts whose object is several tokens equals greedy decoding's."""
    _, model, tok, _, world, _ = shipped
    facts = [f for f in world.facts if n_tokens(tok, " " + f.obj) > 1][:12]
    assert facts
    for f in facts:
        by_t = recall_by_template(model, tok, world, facts=[f])[f.relation]
        for t, value in by_t.items():
            prompt = world.prompt(f, t)
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            n = n_tokens(tok, " " + f.obj)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            assert value == float(tok.decode(out[0, ids.shape[1]:]).strip() == f.obj), (prompt, f.obj)


@pytest.mark.parametrize("name", ["gpt2-bpe", "llama-sp", "gpt2", "llama"])
def test_every_shipped_world_has_tuned_settings_with_their_evidence(name):
    from memit_adapter import MemitConfig
    from memit_adapter.demo import world_config

    tuned = json.loads((world_model_path(name) / "memit_config.json").read_text())
    assert "100 edits" in tuned.pop("_why")  # the measurement behind the settings
    model, _, _ = load_world_model(name)
    cfg = world_config(name, model, seed=3)
    assert all(getattr(cfg, k) == v for k, v in tuned.items()) and cfg.seed == 3
    rest = MemitConfig.for_model(model)
    assert cfg.mom2_max_tokens == rest.mom2_max_tokens  # fields the file does not set are for_model's


@pytest.mark.parametrize("name", ["gpt2-bpe", "llama-sp", "gpt2"])
def test_worlds_ship_the_ft_w_lr_measured_on_them_and_the_edit_command_uses_it(name, tmp_path, capsys):
    from memit_adapter import EditPack
    from memit_adapter.cli import main
    from memit_adapter.demo import world_config
    from memit_adapter.method_configs import FtConfig

    model, _, records = load_world_model(name)
    file = world_model_path(name) / "ft_config.json"
    cfg = world_config(name, model, "ft", seed=2)
    if name == "gpt2":  # a shaped world: the lr·d_ff rule did not give the paper's FT-W there, nothing shipped
        assert not file.exists() and cfg == FtConfig.for_model(model, seed=2)
        return
    tuned = json.loads(file.read_text())
    assert "1,000 edits" in tuned.pop("_why")
    d_ff = model.config.n_inner if name == "gpt2-bpe" else model.config.intermediate_size
    assert tuned == {"lr": pytest.approx(5e-4 * 16384 / d_ff, rel=1e-3)}  # lr · d_ff at GPT-J's
    assert cfg == FtConfig.for_model(model, lr=tuned["lr"], seed=2) and cfg.lr != FtConfig().lr
    with pytest.raises(ConfigError, match="unknown editing method"):
        world_config(name, model, "mend")
    rec = records[0]["requested_rewrite"]
    (tmp_path / "edits.jsonl").write_text(json.dumps({"prompt": rec["prompt"], "subject": rec["subject"],
                                                      "target_new": rec["target_new"]["str"]}) + "\n")
    assert main(["edit", "--model", f"world-{name}", "--requests", str(tmp_path / "edits.jsonl"), "--method", "ft",
                 "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    assert EditPack.from_pretrained(str(tmp_path / "ft")).config == FtConfig.for_model(model, lr=tuned["lr"])
