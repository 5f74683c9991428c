"""Repair rounds (``MemitConfig.repair_rounds``): the requests of a batch that did not take, edited again on top."""

import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer

from memit_adapter import EditRequest, compute_edits
from memit_adapter.engine import _active
from memit_adapter.errors import ConfigError
from memit_adapter.repair import not_taken
from memit_adapter.stats import collect_stats

PAIRS = [("michael jordan", " tennis"), ("lebron james", " golf"), ("toko yuki", " hockey"),
         ("danielle darrieux", " rome"), ("alpha beta", " paris")]


@pytest.fixture(scope="module")
def setup():
    """A tiny GPT-2, requests whose true target is the model's own top answer (so every edit starts failing), a
    config whose edits are weak (few steps, a heavy λ: some do not take in one round), the statistics."""
    model, tok = model_and_tokenizer("gpt2")
    requests = []
    with torch.no_grad():
        for subject, new in PAIRS:
            prompt = "the sport played by {}"
            logits = model(**tok(prompt.format(subject), return_tensors="pt")).logits[0, -1]
            logits[tok.all_special_ids] = -float("inf")
            top = int(logits.argmax())
            true = " " + tok.decode([top]).strip()
            assert tok(true, add_special_tokens=False)["input_ids"] == [top] and true != new
            requests.append(EditRequest(prompt, subject, new, target_true=true))
    cfg = config(v_num_grad_steps=4, mom2_update_weight=500.0)
    stats = collect_stats(model, tok, corpus(40), cfg.layers, progress=False)
    return model, tok, cfg, stats, requests


def _failing(model, tok, requests) -> list[int]:
    """Requests whose new (one-token) target is not more probable than the true one after the prompt."""
    out = []
    with torch.no_grad():
        for i, r in enumerate(requests):
            logp = torch.log_softmax(model(**tok(r.text, return_tensors="pt")).logits[0, -1], -1)
            new, true = (tok(t, add_special_tokens=False)["input_ids"] for t in (r.target_new, r.target_true))
            assert len(new) == len(true) == 1
            if not logp[new[0]] > logp[true[0]]:
                out.append(i)
    return out


def test_a_repaired_pack_is_the_first_pack_plus_a_pack_of_its_failures_on_top(setup):
    """One round = the first pack + a sequential pack of exactly the failing requests, computed on top of it."""
    model, tok, cfg, stats, REQUESTS = setup
    first = compute_edits(model, tok, REQUESTS, cfg, stats=stats, progress=False)
    assert _failing(model, tok, REQUESTS) == list(range(len(REQUESTS)))
    with first.applied(model):
        failing = _failing(model, tok, REQUESTS)
        assert not_taken(model, tok, REQUESTS) == failing
    assert 0 < len(failing) < len(REQUESTS)
    second = compute_edits(model, tok, [REQUESTS[i] for i in failing], cfg, stats=stats, on_top_of=[first],
                           progress=False)
    pack = compute_edits(model, tok, REQUESTS, cfg.replace(repair_rounds=1), stats=stats, progress=False)
    assert pack.requests == REQUESTS and pack.targets is None and pack.parents == []
    assert pack.fingerprint == first.fingerprint and set(pack.deltas) == set(first.deltas)
    for name, d in pack.deltas.items():
        want = first.deltas[name].weight_delta() + second.deltas[name].weight_delta()
        torch.testing.assert_close(d.weight_delta(), want, rtol=1e-4, atol=1e-6)
    with pack.applied(model):
        after = _failing(model, tok, REQUESTS)
    assert pack.report["repair"]["failing"] == [len(failing), len(after)]
    assert len(after) < len(failing)
    assert set(pack.report["seconds"]) == {"statistics", "targets", "update"}


def test_rounds_stop_once_every_edit_takes(setup, monkeypatch):
    """A round runs only while requests fail: failures 2, then 0 -> one round, on the two failing requests."""
    import memit_adapter.repair as repair

    model, tok, cfg, stats, REQUESTS = setup
    first = compute_edits(model, tok, REQUESTS, cfg, stats=stats, progress=False)
    answers = iter([[1, 3], []])
    monkeypatch.setattr(repair, "not_taken", lambda *_: next(answers))
    calls = []

    def edit(requests, under):
        calls.append((requests, under))
        return compute_edits(model, tok, requests, cfg, stats=stats, on_top_of=under, progress=False)

    pack = repair.repaired(model, tok, first, 5, [], edit, _active)
    assert pack.report["repair"]["failing"] == [2, 0]
    assert [reqs for reqs, _ in calls] == [[REQUESTS[1], REQUESTS[3]]]
    assert calls[0][1] == [first]  # on top of the first pack


def test_nothing_failing_gives_the_first_pack_itself(setup):
    model, tok, cfg, stats, REQUESTS = setup
    strong = cfg.replace(v_num_grad_steps=40, mom2_update_weight=10.0)
    plain = compute_edits(model, tok, REQUESTS, strong, stats=stats, progress=False)
    with plain.applied(model):
        assert _failing(model, tok, REQUESTS) == []
    pack = compute_edits(model, tok, REQUESTS, strong.replace(repair_rounds=3), stats=stats, progress=False)
    assert pack.report["repair"]["failing"] == [0] and pack.targets is not None
    for name, d in pack.deltas.items():
        torch.testing.assert_close(d.weight_delta(), plain.deltas[name].weight_delta())


def test_only_requests_with_a_true_target_are_tested(setup, caplog):
    model, tok, cfg, stats, REQUESTS = setup
    untested = [EditRequest(r.prompt, r.subject, r.target_new) for r in REQUESTS]
    assert not_taken(model, tok, untested) == []
    with caplog.at_level("WARNING", logger="memit_adapter.repair"):
        pack = compute_edits(model, tok, untested, cfg.replace(repair_rounds=2), stats=stats, progress=False)
    assert pack.report["repair"]["failing"] == [0] and "no request has a target_true" in caplog.text


def test_the_test_runs_in_eval_mode(setup, monkeypatch):
    """A model left in train mode (dropout on) is scored in eval mode, and left in train mode."""
    import memit_adapter.evaluation as evaluation

    model, tok, _, _, REQUESTS = setup
    modes, score = [], evaluation.target_nll
    monkeypatch.setattr(evaluation, "target_nll", lambda m, *a, **k: (modes.append(m.training), score(m, *a, **k))[1])
    model.train()
    try:
        assert not_taken(model, tok, REQUESTS) == list(range(len(REQUESTS)))
        assert modes == [False, False] and model.training
    finally:
        model.eval()


def test_repair_rounds_refuse_joint_chains_and_bad_counts(setup):
    model, tok, cfg, stats, REQUESTS = setup
    with pytest.raises(ConfigError, match="joint"):
        compute_edits(model, tok, REQUESTS, cfg.replace(repair_rounds=1), stats=stats, joint=True, progress=False)
    with pytest.raises(ConfigError, match="repair_rounds"):
        cfg.replace(repair_rounds=-1)
    with pytest.raises(ConfigError, match="repair_rounds"):
        cfg.replace(repair_rounds=1.5)
