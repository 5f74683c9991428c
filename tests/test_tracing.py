"""Causal tracing: invariants on tiny random models of every architecture, and the trace of the world model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ARCHS, make_tokenizer, tiny_model

from memit_adapter.errors import ConfigError, InvalidRequestError
from memit_adapter.requests import EditRequest
from memit_adapter.tracing import (
    _encode_fact,
    _noise,
    _Row,
    _Runner,
    average_traces,
    best_range,
    subject_token_range,
    suggest_layers,
    trace_fact,
    trace_facts,
    trace_severed,
)

PROMPT, SUBJECT = "the {} plays the sport of", "michael jordan"
FACTS = [EditRequest("{} plays the sport of", "michael jordan", " baseball", target_true=" basketball"),
         EditRequest("the native language of {} is", "danielle darrieux", " english", target_true=" french"),
         EditRequest("{} works for", "toko yuki", " google")]  # no target_true: the model's own prediction


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_subject_range_counts_the_bos_token():
    plain, with_bos = make_tokenizer(), make_tokenizer(add_bos=True)
    assert subject_token_range(plain, PROMPT, SUBJECT) == (1, 3)
    assert subject_token_range(with_bos, PROMPT, SUBJECT) == (2, 4)
    assert subject_token_range(with_bos, "{} plays", "jordan") == (1, 2)
    ids = with_bos(PROMPT.format(SUBJECT))["input_ids"]
    assert with_bos.convert_ids_to_tokens(ids[3]) == "jordan"


def test_restoring_a_clean_run_is_the_identity():
    model, tok = tiny_model("gpt2"), make_tokenizer(add_bos=True)
    fact = _encode_fact(tok, PROMPT, SUBJECT, " basketball", model)
    runner = _Runner(model, fact, _noise(2, 2, 32, 1.0, seed=0), None)
    with torch.no_grad():
        high, _ = runner.baseline(runner.names["hidden"])
        every_state = tuple((n, t, True) for n in runner.names["hidden"] for t in range(len(fact.input_ids)))
        probs = runner.run([_Row(-1), _Row(-1, every_state), _Row(0, every_state)], batch_size=8)
    assert probs.tolist() == pytest.approx([high] * 3, rel=1e-6)
    # Zero noise: every restored state leaves the clean probability.
    res = trace_fact(model, tok, PROMPT, SUBJECT, " basketball", embed_std=0.0, samples=2)
    assert torch.allclose(res.scores, torch.full_like(res.scores, res.high), rtol=1e-5)
    assert res.low == pytest.approx(res.high, rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_restoring_the_last_state_recovers_the_clean_probability(arch):
    model, tok = tiny_model(arch, init_std=0.2), make_tokenizer(add_bos=True)  # sharper outputs
    res = trace_fact(model, tok, "{} plays the sport of", "jordan", " golf", samples=3)
    assert abs(res.low - res.high) > 0.1 * res.high  # the noise does change the output
    # The last layer's state at the last token alone fixes the output.
    assert res.scores[-1, -1].item() == pytest.approx(res.high, rel=1e-5)
    assert torch.allclose(res.scores[0], torch.tensor(res.low))  # BOS never sees the noise


def test_batching_and_seed():
    model, tok = tiny_model("gptj"), make_tokenizer()
    kw = dict(kind="mlp", window=3, samples=3, embed_std=0.5)
    a = trace_fact(model, tok, PROMPT, SUBJECT, " golf", batch_size=7, **kw)
    b = trace_fact(model, tok, PROMPT, SUBJECT, " golf", batch_size=1000, **kw)
    c = trace_fact(model, tok, PROMPT, SUBJECT, " golf", batch_size=1000, seed=1, **kw)
    assert torch.allclose(a.scores, b.scores, rtol=1e-5) and a.low == pytest.approx(b.low, rel=1e-6)
    assert not torch.allclose(b.scores, c.scores, rtol=1e-5)
    assert a.window == 3 and a.scores.shape == (len(a.tokens), 4)


def test_model_is_bit_identical_after_tracing_and_after_an_error():
    model, tok = tiny_model("gpt_neox"), make_tokenizer(add_bos=True)
    model.train()  # dropout on: tracing must switch to eval and back
    before = _snapshot(model)
    for kind in ("hidden", "mlp", "attn"):
        trace_facts(model, tok, FACTS, kind=kind, samples=2, progress=False)
    trace_severed(model, tok, FACTS, samples=2, progress=False)
    suggest_layers(model, tok, FACTS, samples=2, progress=False)
    _assert_unchanged(model, before)
    assert all(m.training for m in model.modules())

    def fail(*_):
        raise RuntimeError("boom")

    handle = model.gpt_neox.layers[2].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        trace_fact(model, tok, PROMPT, SUBJECT, kind="attn", samples=2)
    handle.remove()
    _assert_unchanged(model, before)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_traces_and_plots(arch, tmp_path):
    pytest.importorskip("matplotlib")
    from memit_adapter.plots import plot_severed, plot_trace, plot_traces

    model, tok = tiny_model(arch), make_tokenizer(add_bos=arch in ("llama", "mistral", "gemma"))
    traces = [trace_fact(model, tok, PROMPT, SUBJECT, " soccer", kind=k, samples=2, window=2)
              for k in ("hidden", "mlp", "attn")]
    sev = trace_severed(model, tok, FACTS[:2], samples=2, progress=False)
    for t in traces:
        assert t.scores.shape == (len(t.tokens), 4) and torch.isfinite(t.scores).all()
    assert set(sev.scores) == {"none", "attn", "mlp"} and all(v.shape == (4,) for v in sev.scores.values())
    plot_trace(traces[0], tmp_path / "hidden.png")
    plot_traces(traces, tmp_path / "all.png")
    plot_severed(sev, tmp_path / "severed.png")
    for name in ("hidden.png", "all.png", "severed.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_options_and_facts_are_rejected():
    model, tok = tiny_model("gpt2"), make_tokenizer()
    with pytest.raises(ConfigError, match="samples"):
        trace_fact(model, tok, PROMPT, SUBJECT, samples=0)
    with pytest.raises(ConfigError, match="window"):
        trace_fact(model, tok, PROMPT, SUBJECT, kind="mlp", window=0)
    with pytest.raises(ValueError, match="kind"):
        trace_fact(model, tok, PROMPT, SUBJECT, kind="mlps")
    with pytest.raises(InvalidRequestError, match="no token"):
        trace_fact(model, tok, "{} plays", "", " golf")
    with pytest.raises(InvalidRequestError):
        suggest_layers(model, tok, [])


def test_average_traces_by_token_category():
    model, tok = tiny_model("qwen2"), make_tokenizer()
    results = trace_facts(model, tok, FACTS, samples=2, progress=False)
    avg = average_traces(results)
    assert avg.tokens == ["first subject token", "last subject token", "first subsequent token", "further tokens",
                          "last token"]  # every subject has two tokens: no middle ones
    assert avg.subject_range == (0, 2) and avg.n_facts == 3
    expected_last = torch.stack([r.scores[r.subject_range[1] - 1] for r in results]).mean(0)
    assert torch.allclose(avg.scores[1], expected_last)
    assert results[2].target.strip()  # the model's own prediction was traced


def test_best_range_and_suggest_layers():
    gap = torch.tensor([0.1, 0.5, 0.9, 0.6, 0.2, 0.0])
    assert best_range(gap) == [1, 2, 3]
    assert best_range(gap, 2) == [2, 3]
    assert best_range(gap, threshold=0.0) == [0, 1, 2, 3, 4, 5]
    assert best_range(-gap) == [5]  # nothing opens a gap: the least negative layer only
    tok = make_tokenizer()
    for arch in ("gpt2", "mistral"):
        model = tiny_model(arch, **({"n_layer": 6} if arch == "gpt2" else {"num_hidden_layers": 6}))
        layers = suggest_layers(model, tok, FACTS, samples=2, progress=False)
        assert layers and layers == list(range(layers[0], layers[-1] + 1)) and 0 <= layers[0] <= layers[-1] < 6
        assert len(suggest_layers(model, tok, FACTS, size=3, samples=2, progress=False)) == 3


def test_cli_single_fact_and_batch(tmp_path):
    pytest.importorskip("matplotlib")
    from memit_adapter.cli import main

    model, tok = tiny_model("llama"), make_tokenizer(add_bos=True)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "one"
    assert main(["trace", "--model", str(tmp_path / "m"), "--prompt", "michael jordan plays the sport of",
                 "--subject", "michael jordan", "--object", " tennis", "--samples", "2", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "trace.json").read_text())
    assert report["traces"]["hidden"]["tokens"][:3] == ["<s>", "michael", "jordan"]
    assert sorted(p.name for p in out.glob("*.png")) == ["severed.png", "trace_attn.png", "trace_hidden.png",
                                                         "trace_mlp.png", "traces.png"]
    records = [{"case_id": i, "requested_rewrite": r.to_dict() | {"target_new": {"str": r.target_new}}}
               for i, r in enumerate(FACTS)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    out = tmp_path / "many"
    assert main(["trace", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "records.json"), "--kinds",
                 "hidden", "--samples", "2", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "trace.json").read_text())
    assert report["n_facts"] == 3 and report["traces"]["hidden"]["n_facts"] == 3
    layers = report["suggested_layers"]
    assert layers == list(range(layers[0], layers[-1] + 1))


def test_cli_checks_matplotlib_before_loading_anything(tmp_path, monkeypatch):
    import importlib.util

    from memit_adapter import tracing
    from memit_adapter.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(tracing, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    with pytest.raises(SystemExit, match="matplotlib"):
        main(["trace", "--model", "m", "--prompt", "{} plays", "--subject", "x", "--out", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()


# -- the shipped world model ---------------------------------------------------------------------
def _world():
    from memit_adapter.demo import load_world_model

    model, tok, records = load_world_model("gpt2")  # shipped with the package: a missing one is a failure
    facts = [EditRequest.from_dict(r) for r in records]
    return model, tok, facts


@pytest.fixture(scope="module")
def world_traces():
    model, tok, facts = _world()
    facts = facts[::53][:12]  # a spread of subjects and relations
    results = trace_facts(model, tok, facts, samples=5, progress=False)
    return model, tok, facts, results


def test_world_last_subject_token_carries_the_fact(world_traces):
    model, _, _, results = world_traces
    n_layers = results[0].scores.shape[1]
    early_middle = slice(0, max(1, (n_layers + 1) // 2))
    last, others = [], []
    for r in results:
        s0, s1 = r.subject_range
        assert s1 - s0 >= 2  # every world subject has a first name and a surname
        last.append(r.scores[s1 - 1, early_middle])
        others.append(r.scores[s0:s1 - 1, early_middle].mean(0))
    last, others = torch.stack(last).mean(0), torch.stack(others).mean(0)
    assert (last > others).all(), (last, others)
    assert sum(r.high for r in results) / len(results) > 2 * sum(r.low for r in results) / len(results)


def test_world_suggested_layers_in_the_first_two_thirds(world_traces):
    model, tok, facts, _ = world_traces
    layers = suggest_layers(model, tok, facts, samples=5, progress=False)
    n_layers = model.config.n_layer
    assert layers == list(range(layers[0], layers[-1] + 1))
    assert layers[-1] < 2 * n_layers / 3, layers


def test_world_cli_traces_the_shipped_records(tmp_path):
    _world()
    from memit_adapter.cli import main

    assert main(["trace", "--model", "world-gpt2", "--limit", "3", "--kinds", "hidden", "--samples", "2",
                 "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "trace.json").read_text())
    assert report["n_facts"] == 3 and (tmp_path / "severed.png").is_file()
