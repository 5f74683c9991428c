"""CounterFact metrics against independent, unbatched hand computations on tiny models; the loader; the CLI."""

import json
import math

import pytest
import torch
from tiny import make_tokenizer, tiny_model

from memit_adapter.counterfact import load_counterfact, normalize_record
from memit_adapter.errors import InvalidRequestError
from memit_adapter.evaluation import (
    CounterFactResult,
    evaluate_counterfact,
    evaluate_pack,
    format_table,
    generation_entropy,
    greedy_generate,
    ngram_entropy,
    target_nll,
)

RECORDS = [
    {"case_id": 7, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": "michael jordan",
                                         "relation_id": "P641", "target_new": {"str": "baseball", "id": "Q5369"},
                                         "target_true": {"str": "basketball", "id": "Q5372"}},
     "paraphrase_prompts": ["the sport michael jordan plays is", "you said michael jordan plays"],
     "neighborhood_prompts": ["lebron james plays the sport of", "the sport lebron james plays is",
                              "toko yuki plays"],
     "generation_prompts": ["michael jordan is a famous player of", "michael jordan plays"]},
    {"case_id": 8, "requested_rewrite": {"prompt": "the mother tongue of {} is", "subject": "danielle darrieux",
                                         "relation_id": "P103", "target_new": {"str": "english"},
                                         "target_true": {"str": "french"}},
     "paraphrase_prompts": ["danielle darrieux speaks the language"],
     "neighborhood_prompts": ["the mother tongue of toko yuki is", "michael jordan speaks"],
     "generation_prompts": ["danielle darrieux speaks"]},
]


def hand_nll(model, tokenizer, prompt, target, bos):
    """Mean NLL of the target words, one unpadded sequence at a time (the word-level vocab makes ids obvious)."""
    vocab = tokenizer.get_vocab()
    p = [vocab[w] for w in prompt.split()]
    t = [vocab[w] for w in target.split()]
    ids = torch.tensor([([1] if bos else []) + p + t])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = ids.shape[1] - len(t)
    return -sum(logp[n - 1 + j, tok].item() for j, tok in enumerate(t)) / len(t)


@pytest.fixture(params=[("gpt2", False), ("llama", True)], ids=["gpt2", "llama-bos"])
def model_tok(request):
    arch, bos = request.param
    return tiny_model(arch, seed=3), make_tokenizer(add_bos=bos, padding_side="left"), bos


def test_target_nll_matches_unbatched_hand_computation(model_tok):
    model, tok, bos = model_tok
    prompts = ["michael jordan plays the sport of", "i", "lebron james lives in the city of", "toko yuki speaks"]
    targets = [" baseball", "paris", " london", " french language"]  # with and without the leading space
    got = target_nll(model, tok, prompts, targets, batch_size=3)  # batches of unequal lengths, padded
    want = [hand_nll(model, tok, p, t, bos) for p, t in zip(prompts, targets)]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_metrics_match_hand_computation(model_tok):
    model, tok, bos = model_tok
    result = evaluate_counterfact(model, tok, RECORDS, batch_size=4, generation=False, per_record=True)

    def probs(prompt, rw):
        return (math.exp(-hand_nll(model, tok, prompt, rw["target_new"]["str"], bos)),
                math.exp(-hand_nll(model, tok, prompt, rw["target_true"]["str"], bos)))

    es, em, ps, pm, ns, nm = [], [], [], [], [], []
    for rec in RECORDS:
        rw = rec["requested_rewrite"]
        new, true = probs(rw["prompt"].format(rw["subject"]), rw)
        es.append(float(new > true))
        em.append(new - true)
        para = [probs(p, rw) for p in rec["paraphrase_prompts"]]
        ps.append(sum(n > t for n, t in para) / len(para))
        pm.append(sum(n - t for n, t in para) / len(para))
        neigh = [probs(p, rw) for p in rec["neighborhood_prompts"]]
        ns.append(sum(t > n for n, t in neigh) / len(neigh))
        nm.append(sum(t - n for n, t in neigh) / len(neigh))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert result.n_records == 2
    assert result.efficacy_score == pytest.approx(mean(es))
    assert result.efficacy_magnitude == pytest.approx(mean(em), abs=1e-7)
    assert result.paraphrase_score == pytest.approx(mean(ps))
    assert result.paraphrase_magnitude == pytest.approx(mean(pm), abs=1e-7)
    assert result.neighborhood_score == pytest.approx(mean(ns))
    assert result.neighborhood_magnitude == pytest.approx(mean(nm), abs=1e-7)
    trio = [mean(es), mean(ps), mean(ns)]
    want_score = 0.0 if min(trio) == 0 else 3 / sum(1 / x for x in trio)
    assert result.score == pytest.approx(want_score)
    assert result.generation_entropy is None
    assert [r["case_id"] for r in result.per_record] == [7, 8]
    assert len(result.per_record[0]["neighborhood"]) == 3


def test_success_rates_follow_the_probabilities():
    """Push the head towards one target: efficacy flips to 1, neighbourhood to 0, and back."""
    model, tok = tiny_model("gpt2", seed=1), make_tokenizer()
    vocab = tok.get_vocab()
    records = [RECORDS[0]]
    bias = torch.zeros(model.config.vocab_size)
    model.lm_head.bias = torch.nn.Parameter(bias)
    model.lm_head.bias.data[vocab["baseball"]] = 30.0
    pushed = evaluate_counterfact(model, tok, records, generation=False)
    assert (pushed.efficacy_score, pushed.paraphrase_score, pushed.neighborhood_score) == (1.0, 1.0, 0.0)
    assert pushed.efficacy_magnitude > 0.99 and pushed.neighborhood_magnitude < -0.99
    assert pushed.score == 0.0
    model.lm_head.bias.data[vocab["baseball"]] = -30.0
    model.lm_head.bias.data[vocab["basketball"]] = 30.0
    pulled = evaluate_counterfact(model, tok, records, generation=False)
    assert (pulled.efficacy_score, pulled.paraphrase_score, pulled.neighborhood_score) == (0.0, 0.0, 1.0)


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("x x x x x x") == 0.0
    assert ngram_entropy("one") == 0.0
    # punctuation counts as words
    assert ngram_entropy("a, b.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert generation_entropy(["a b a b", "x x x"]) == pytest.approx(ngram_entropy("a b a b") / 2)


def hand_greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("arch,bos", [("gpt2", False), ("llama", True)])
def test_greedy_generate_batched_equals_unpadded_loop(arch, bos):
    model, tok = tiny_model(arch, seed=5), make_tokenizer(add_bos=bos)
    prompts = ["michael jordan plays the sport of", "i", "the mother tongue of danielle darrieux is"]
    texts = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, texts):
        ids = tok(prompt)["input_ids"]
        want = tok.decode(hand_greedy(model, ids, 6), skip_special_tokens=True)
        assert text == want


def test_generation_entropy_in_result():
    model, tok = tiny_model("gpt2", seed=2), make_tokenizer()
    result = evaluate_counterfact(model, tok, RECORDS, max_new_tokens=8, per_record=True)
    gens = result.per_record[0]["generations"]
    assert len(gens) == 2 and gens[0].startswith("michael jordan is a famous player of")
    want = (generation_entropy(gens) + generation_entropy(result.per_record[1]["generations"])) / 2
    assert result.generation_entropy == pytest.approx(want)
    assert result.efficacy_score == evaluate_counterfact(model, tok, RECORDS, generation=False).efficacy_score
    short = evaluate_counterfact(model, tok, RECORDS, max_new_tokens=8, max_generation_records=1, per_record=True)
    assert "generation_entropy" not in short.per_record[1]
    assert short.generation_entropy == pytest.approx(generation_entropy(gens))


def test_evaluation_leaves_model_untouched_and_in_its_mode():
    model, tok = tiny_model("llama"), make_tokenizer(add_bos=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    evaluate_counterfact(model, tok, RECORDS, max_new_tokens=3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Pack:
    """Stands in for EditPack: applied(model) adds a bias towards a word while the context is open."""

    def __init__(self, token_id):
        self.token_id = token_id

    def applied(self, model):
        import contextlib

        @contextlib.contextmanager
        def ctx(m):
            m.lm_head.bias = torch.nn.Parameter(torch.zeros(m.config.vocab_size))
            m.lm_head.bias.data[self.token_id] = 30.0
            try:
                yield m
            finally:
                m.lm_head.bias = None

        return ctx(model)


def test_evaluate_pack_pre_and_post():
    model, tok = tiny_model("gpt2", seed=1), make_tokenizer()
    both = evaluate_pack(model, tok, RECORDS[:1], _Pack(tok.get_vocab()["baseball"]), generation=False)
    assert set(both) == {"pre", "post"}
    assert both["post"].efficacy_score == 1.0 and both["post"].neighborhood_score == 0.0
    assert model.lm_head.bias is None
    table = format_table(both)
    assert "efficacy_score" in table and "pre" in table.splitlines()[0] and "100.0" in table


# -- loader ---------------------------------------------------------------------------------------

def test_load_counterfact_json_list_and_jsonl(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(RECORDS))
    records = load_counterfact(path)
    assert [r["case_id"] for r in records] == [7, 8]
    assert records[0]["requested_rewrite"]["target_new"] == {"str": "baseball", "id": "Q5369"}
    assert load_counterfact(path, n=1) == records[:1]
    lines = tmp_path / "multi_counterfact.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert load_counterfact(lines) == records


def test_normalize_record_forms():
    rec = {"requested_rewrite": [{"prompt": "michael jordan plays", "subject": "michael jordan",
                                  "target_new": "golf", "target_true": {"str": "basketball"}}],
           "paraphrase_prompts": "you know michael jordan plays"}
    out = normalize_record(rec)
    rw = out["requested_rewrite"]
    assert rw["prompt"] == "{} plays" and rw["target_new"] == {"str": "golf"}
    assert out["paraphrase_prompts"] == ["you know michael jordan plays"] and out["neighborhood_prompts"] == []
    assert rec["requested_rewrite"][0]["prompt"] == "michael jordan plays"  # input untouched


def test_loader_errors_name_the_record(tmp_path):
    bad = [RECORDS[0], {"case_id": 3, "requested_rewrite": {"prompt": "{} plays", "subject": "x"}}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InvalidRequestError, match="record 1.*target_new"):
        load_counterfact(path)
    with pytest.raises(InvalidRequestError, match="exactly one"):
        normalize_record({"requested_rewrite": {"prompt": "plays", "subject": "x", "target_new": "a",
                                                "target_true": "b"}})
    with pytest.raises(FileNotFoundError):
        load_counterfact(tmp_path / "missing.json")


# -- command line ---------------------------------------------------------------------------------

def test_cli_eval_local_model(tmp_path, capsys):
    from memit_adapter.cli import main

    model, tok = tiny_model("llama", seed=4), make_tokenizer(add_bos=True)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "records.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--n", "1", "--out", str(out),
               "--max-new-tokens", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "efficacy_score" in printed and "neighborhood_score" in printed
    saved = json.loads(out.read_text())
    assert saved["n_records"] == 1
    want = evaluate_counterfact(model, tok, RECORDS[:1], max_new_tokens=4)
    got = CounterFactResult(**saved["results"]["model"])
    for key in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "generation_entropy"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), abs=1e-6)


def test_cli_eval_requires_data_for_plain_models(tmp_path):
    from memit_adapter.cli import main

    model, tok = tiny_model("gpt2"), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="--data is required"):
        main(["eval", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x.json")])


def test_cli_eval_with_a_saved_pack(tmp_path, capsys):
    """End to end: a real pack from the engine, saved, evaluated pre and post by the CLI."""
    engine = pytest.importorskip("memit_adapter.engine")
    from engine_setup import config, corpus, model_and_tokenizer

    from memit_adapter.cli import main
    from memit_adapter.pack import EditPack

    model, tok = model_and_tokenizer("gpt2")
    records = [{"case_id": 0, "requested_rewrite": {"prompt": "the sport played by {}", "subject": "michael jordan",
                                                    "target_new": {"str": " tennis"},
                                                    "target_true": {"str": " basketball"}},
                "paraphrase_prompts": ["you know the sport played by michael jordan"],
                "neighborhood_prompts": ["the sport played by lebron james"], "generation_prompts": []},
               {"case_id": 1, "requested_rewrite": {"prompt": "the sport played by {}", "subject": "toko yuki",
                                                    "target_new": {"str": " hockey"}, "target_true": {"str": " golf"}},
                "paraphrase_prompts": [], "neighborhood_prompts": [], "generation_prompts": ["toko yuki plays"]}]
    pack = engine.compute_edits(model, tok, records, config(v_num_grad_steps=3), corpus=corpus(40), progress=False)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    pack.save_pretrained(str(tmp_path / "pack"))
    (tmp_path / "r.json").write_text(json.dumps(records))
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--pack", str(tmp_path / "pack"), "--data",
                 str(tmp_path / "r.json"), "--n", "1", "--retention", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())["results"]
    assert set(saved) == {"pre", "post"}
    assert saved["pre"]["n_records"] == 1 and saved["pre"]["retention_facts"] == 1  # toko yuki's fact, not edited
    with pack.applied(model):
        kept_post = evaluate_counterfact(model, tok, records[:1], generation=False, retention_records=records)
    assert saved["post"]["retention"] == kept_post.retention
    assert main(["eval", "--model", str(tmp_path / "m"), "--pack", str(tmp_path / "pack"), "--data",
                 str(tmp_path / "r.json"), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())["results"]
    loaded = EditPack.from_pretrained(str(tmp_path / "pack"))
    want = evaluate_pack(model, tok, records, loaded)
    for when in ("pre", "post"):
        assert saved[when]["efficacy_magnitude"] == pytest.approx(want[when].efficacy_magnitude, abs=1e-6)
    assert saved["post"]["efficacy_magnitude"] != pytest.approx(saved["pre"]["efficacy_magnitude"], abs=1e-9)
    header = capsys.readouterr().out.splitlines()[0]
    assert "pre" in header and "post" in header


def test_neighbours_that_the_batch_edits_leave_ns(model_tok):
    """A neighbourhood prompt that another record of the batch rewrites is not a specificity check."""
    model, tok, bos = model_tok
    lebron = {"case_id": 9, "requested_rewrite": {"prompt": "{}  plays the sport of", "subject": "lebron james",
                                                  "relation_id": "P641", "target_new": {"str": "golf"},
                                                  "target_true": {"str": "basketball"}},
              "paraphrase_prompts": ["you said lebron james plays"], "neighborhood_prompts": ["toko yuki plays"],
              "generation_prompts": []}
    batch = [*RECORDS, lebron]
    kept = evaluate_counterfact(model, tok, batch, generation=False, per_record=True, exclude_edited_neighbors=True)
    full = evaluate_counterfact(model, tok, batch, generation=False, per_record=True)  # the published NS
    assert kept.neighbors_excluded == 1 and full.neighbors_excluded == 0
    assert len(kept.per_record[0]["neighborhood"]) == 2 and len(full.per_record[0]["neighborhood"]) == 3
    # the remaining two are those of the full run minus "lebron james plays the sport of" (the first)
    assert kept.per_record[0]["neighborhood"] == full.per_record[0]["neighborhood"][1:]
    rw = RECORDS[0]["requested_rewrite"]
    true, new = rw["target_true"]["str"], rw["target_new"]["str"]
    rates = [hand_nll(model, tok, p, true, bos) < hand_nll(model, tok, p, new, bos)
             for p in RECORDS[0]["neighborhood_prompts"][1:]]
    assert kept.per_record[0]["neighborhood_success"] == pytest.approx(sum(rates) / 2)
    assert "neighbors excluded" in format_table({"post": kept})


def test_load_model_reads_a_half_precision_folder_as_float32_on_cpu(tmp_path):
    """A float16 checkpoint (as memit_adapter.demo.train writes) loads as float32 without a GPU, with the same weights,
    unless a dtype is asked for; the folder's records come along."""
    from memit_adapter.models import load_model

    model, tok = tiny_model("gpt2", seed=5), make_tokenizer()
    model.half().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "records.json").write_text(json.dumps(RECORDS))
    loaded, _, records = load_model(str(tmp_path / "m"))
    assert records == RECORDS and not loaded.training
    if not torch.cuda.is_available():
        assert loaded.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight.float(), model.lm_head.weight.float())
    assert load_model(str(tmp_path / "m"), dtype=torch.float16)[0].dtype == torch.float16


def _fact_record(case_id, prompt, subject, relation, true):
    return {"case_id": case_id, "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": relation,
                                                      "target_new": {"str": "golf"}, "target_true": {"str": true}},
            "paraphrase_prompts": [], "neighborhood_prompts": [], "generation_prompts": []}


def test_retention_is_greedy_recall_of_the_facts_the_batch_leaves(model_tok):
    """Facts whose stored object is (or is not) the model's own greedy continuation: retention counts exactly
    the first kind, over the facts the batch does not edit."""
    model, tok, _ = model_tok
    facts = [("{} plays the sport of", "michael jordan", "P641"), ("the mother tongue of {} is", "toko yuki", "P103"),
             ("{} lives in the city", "lebron james", "P551"), ("{} works for", "alpha beta", "P108"),
             ("{} was born in", "danielle darrieux", "P19")]
    world, recalled = [], []
    for i, (prompt, subject, rel) in enumerate(facts):
        ids = tok(prompt.replace("{}", subject), return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy = tok.decode(out[0, ids.shape[1]:])  # two greedy words: a two-token object
        true = greedy if i % 2 == 0 else tok.decode(out[0, ids.shape[1]:ids.shape[1] + 1]) + " rome paris"
        world.append(_fact_record(i, prompt, subject, rel, true.strip()))
        recalled.append(i % 2 == 0)
    batch = [world[0]]  # edits fact 0: the four others remain, two of them recalled (facts 2 and 4)
    result = evaluate_counterfact(model, tok, batch, generation=False, retention_records=world)
    assert result.retention_facts == 4
    assert result.retention == pytest.approx(sum(recalled[1:]) / 4)
    assert "retention" in format_table({"m": result})
    assert evaluate_counterfact(model, tok, batch, generation=False).retention is None


@pytest.mark.parametrize("argv, message", [(["--n", "0"], "--n must be at least 1"),
                                           (["--out", "no-such-folder/res.json"], "cannot write results")])
def test_cli_eval_refuses_bad_arguments_before_loading_anything(tmp_path, monkeypatch, argv, message):
    from memit_adapter import evaluation
    from memit_adapter.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "load_model", lambda name: pytest.fail("loaded a model before checking"))
    with pytest.raises(SystemExit, match=message):
        main(["eval", "--model", "world-gpt2", *argv])
    assert list(tmp_path.iterdir()) == []
