"""subject_reach: can a vector at each subject token change the answer? Checked against plain forwards and against
a model that provably cannot read the subject after a given block."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_tokenizer, tiny_model

from memit_adapter.errors import ConfigError
from memit_adapter.reach import choose_subject_tokens, subject_reach, summarise_reach
from memit_adapter.requests import EditRequest

FACTS = [EditRequest("{} plays the sport of", "michael jordan", " tennis"),
         EditRequest("the mother tongue of {} is", "danielle darrieux", " german"),
         EditRequest("the sport played by {}", "lebron james", " golf")]  # the subject ends the prompt


def _nll(model, tok, text: str, target: str) -> float:
    """Mean NLL of ``target``'s tokens after ``text``, from a plain forward (teacher forcing)."""
    prompt, full = tok(text).input_ids, tok(text + target).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), -1)
    return float(-torch.stack([logp[p - 1, full[p]] for p in range(len(prompt), len(full))]).mean())


def _blind_after(model, layer: int):
    """Zero the attention output of every block after ``layer``: no position reads another one there, so a change
    of the subject's states after block ``layer`` cannot reach the answer position (unless the subject ends there)."""
    with torch.no_grad():
        for block in model.transformer.h[layer + 1:]:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
    return model


def test_start_nll_is_the_models_and_optimising_the_vector_lowers_it():
    model, tok = tiny_model("gpt2", init_std=0.1), make_tokenizer()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    want = [_nll(model, tok, f.text, f.target_new) for f in FACTS]
    model.transformer.h[0].train()  # a block left in train mode (dropout) is evaluated in eval mode, then restored
    results = subject_reach(model, tok, FACTS, layer=1, steps=25, progress=False)
    assert [r.tokens for r in results] == [["michael", "jordan"], ["danielle", "darrieux"], ["lebron", "james"]]
    for r, nll in zip(results, want):
        assert r.start_nll == pytest.approx(nll, rel=1e-5)
        assert max(r.nll) < r.start_nll and r.layer == 1
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # the model is as it was
    assert model.transformer.h[0].training and not model.transformer.h[1].training
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_that_cannot_read_the_subject_is_reported_unreachable():
    model, tok = _blind_after(tiny_model("gpt2", init_std=0.1), 1), make_tokenizer()
    results = subject_reach(model, tok, FACTS, layer=1, steps=60, progress=False)
    for r in results[:2]:  # the answer position never reads the subject after block 1: nothing moves
        assert r.nll == pytest.approx([r.start_nll] * 2, abs=1e-5) and not r.last_reaches
    last = results[2]  # "lebron james" ends the prompt: its last token is the answer position itself
    assert last.nll[0] == pytest.approx(last.start_nll, abs=1e-5) and last.nll[1] < last.start_nll - 2
    summary = summarise_reach(results)
    assert (summary["facts"], summary["last_token_fails"], summary["another_token_reaches"]) == (3, 3, 0)
    # with attention intact the same tokens reach further: the blindness is what the check measured
    open_model = tiny_model("gpt2", init_std=0.1)
    assert all(a.nll[-1] < b.nll[-1] for a, b in zip(subject_reach(open_model, tok, FACTS[:2], layer=1, steps=60,
                                                                   progress=False), results))


def test_rows_are_independent_of_the_batch():
    model, tok = tiny_model("llama", init_std=0.1), make_tokenizer(add_bos=True)
    whole = subject_reach(model, tok, FACTS, layer=2, steps=10, progress=False)
    one_by_one = subject_reach(model, tok, FACTS, layer=2, steps=10, batch_size=1, progress=False)
    assert [r.tokens[0] for r in whole] == ["michael", "danielle", "lebron"]  # BOS is not a subject token
    for a, b in zip(whole, one_by_one):
        assert a.nll == pytest.approx(b.nll, rel=1e-3, abs=1e-4)


def test_bad_settings_are_refused():
    model, tok = tiny_model("gpt2"), make_tokenizer()
    with pytest.raises(ConfigError, match="not one of the model's 4 blocks"):
        subject_reach(model, tok, FACTS, layer=4)
    with pytest.raises(ConfigError, match="steps"):
        subject_reach(model, tok, FACTS, layer=0, steps=0)


def test_trace_reach_command_writes_what_the_library_computes(tmp_path, capsys):
    from memit_adapter.cli import main

    model, tok = tiny_model("gpt2", init_std=0.1), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    records = [{"case_id": i, "requested_rewrite": r.to_dict() | {"target_new": {"str": r.target_new},
                                                                   "target_true": {"str": " basketball"}}}
               for i, r in enumerate(FACTS)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    assert main(["trace", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "records.json"), "--reach",
                 "--reach-layer", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    report = json.loads((tmp_path / "r" / "reach.json").read_text())
    want = subject_reach(model, tok, FACTS, layer=1, progress=False)
    assert report["layer"] == 1 and report["summary"] == summarise_reach(want)
    assert [x for f in report["facts"] for x in f["nll"]] == pytest.approx([x for r in want for x in r.nll], rel=1e-4)
    assert f"fails to reach the target of {summarise_reach(want)['last_token_fails']} of 3" in capsys.readouterr().out
    assert not list(tmp_path.glob("r/*.png"))  # no tracing was done
    with pytest.raises(SystemExit, match="layer 9 is not one of the model's 4 blocks"):
        main(["trace", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "records.json"), "--reach",
              "--reach-layer", "9", "--out", str(tmp_path / "bad"), "--quiet"])
    assert not (tmp_path / "bad").exists()


def test_choose_subject_tokens_moves_only_the_subjects_whose_last_token_fails(monkeypatch):
    """The last token where it reaches every request of its subject; else the latest token whose mean NLL over the
    subject's requests is below ln 2, tried only for the subjects that fail; a request's own token is kept."""
    from memit_adapter import reach

    tok = make_tokenizer()
    reqs = [EditRequest("{} plays the sport of", "michael jordan tennis", " golf"),
            EditRequest("the sport played by {}", "michael jordan tennis", " hockey"),
            EditRequest("{} lives in", "danielle darrieux", " rome"),
            EditRequest("{} lives in", "lebron james", " paris", subject_token=-2),
            EditRequest("{} lives in", "alpha beta gamma", " rome"), EditRequest("{} lives in", "toko yuki", " rome")]
    # target NLL by (request, subject token from the end): "michael jordan tennis" fails at its last token for its
    # first request only; over both requests only "michael" (-3) reaches, "jordan" (-2) only for one of them.
    # "alpha beta gamma" reaches from "beta" (-2) and best from "alpha" (-3): the latest that reaches is taken
    table = {(0, -1): 2.0, (1, -1): 0.1, (0, -2): 0.0, (1, -2): 3.0, (0, -3): 0.5, (1, -3): 0.5, (2, -1): 0.3,
             (4, -1): 2.0, (4, -2): 0.5, (4, -3): 0.0, (5, -1): 3.0, (5, -2): 1.0}  # "toko yuki": none reaches
    calls = []

    def fake_rows(model, block, tokenizer, facts, rows, steps, lr, batch_size, progress):
        calls.append([(i, pos - facts[i].subject[1]) for i, pos in rows])
        nll = torch.tensor([table[i, pos - facts[i].subject[1]] for i, pos in rows])
        return nll + 1, nll

    monkeypatch.setattr(reach, "_reach_rows", fake_rows)
    chosen = reach.choose_subject_tokens(tiny_model("gpt2"), tok, reqs, layer=1, progress=False)
    assert [r.subject_token for r in chosen] == [-3, -3, -1, -2, -2, -2]  # "toko yuki": the best, none reaching
    assert calls == [[(0, -1), (1, -1), (2, -1), (4, -1), (5, -1)],
                     [(0, -3), (0, -2), (1, -3), (1, -2), (4, -3), (4, -2), (5, -2)]]
    assert [r.target_new for r in chosen] == [r.target_new for r in reqs] and chosen[3] is reqs[3]
    calls.clear()
    assert reach.choose_subject_tokens(tiny_model("gpt2"), tok, chosen, layer=1, progress=False) == chosen
    assert calls == []  # every token already set: nothing to measure
    # a subject that has a token, on another request or in `known` (a chain), keeps it: one token per subject
    mixed = [reqs[0], reqs[2], EditRequest("{} plays", "lebron james", " golf"), reqs[3]]
    got = reach.choose_subject_tokens(tiny_model("gpt2"), tok, mixed, layer=1, known={"michael jordan tennis": -2},
                                      progress=False)
    assert [r.subject_token for r in got] == [-2, -1, -2, -2] and calls == [[(1, -1)]]


def test_choose_subject_tokens_keeps_the_last_token_that_is_the_answer_position():
    model, tok = _blind_after(tiny_model("gpt2", init_std=0.1), 1), make_tokenizer()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    chosen = choose_subject_tokens(model, tok, FACTS[2:], layer=1, steps=60, progress=False)
    assert [r.subject_token for r in chosen] == [-1]  # "lebron james" ends the prompt: its last token reaches
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
