"""``evaluate_chain`` / ``eval --chain``: packs over time (sequential, joint, independent) against packs made apart."""

import json
import random

import pytest
from engine_setup import config, corpus, model_and_tokenizer, write_edit_inputs

from memit_adapter import ConfigError, EditRequest, compute_edits
from memit_adapter.chain import evaluate_chain, format_chain
from memit_adapter.cli import main
from memit_adapter.evaluation import evaluate_counterfact
from memit_adapter.pack import EditPack
from memit_adapter.stats import collect_stats

SUBJECTS = ["michael jordan", "lebron james", "toko yuki", "danielle darrieux", "alpha beta", "gamma delta"]
TARGETS = [" tennis", " golf", " hockey", " rome", " paris", " french"]


def _records():
    return [{"case_id": i, "requested_rewrite": {"prompt": "the sport played by {}", "subject": s,
                                                 "target_new": {"str": TARGETS[i]},
                                                 "target_true": {"str": TARGETS[(i + 1) % 6]}},
             "paraphrase_prompts": [f"the man said . the sport played by {s}"],
             "neighborhood_prompts": [f"the sport played by {SUBJECTS[(i + 1) % 6]}"]}
            for i, s in enumerate(SUBJECTS)]


def test_each_step_is_the_packs_so_far_made_apart():
    model, tok = model_and_tokenizer("gpt2")
    cfg = config(v_num_grad_steps=10)
    stats = collect_stats(model, tok, corpus(), cfg.layers, progress=False)
    records = _records()
    steps = evaluate_chain(model, tok, records, 2, 2, config=cfg, stats=stats, retention_records=records,
                           generation_records=0, progress=False)
    assert [(s.regime, s.pack, s.n_edits) for s in steps] == [
        ("none", 0, 0), ("sequential", 1, 2), ("sequential", 2, 4), ("joint", 1, 2), ("joint", 2, 4),
        ("independent", 1, 2), ("independent", 2, 4)]
    sample = random.Random(0).sample(records, 4)
    reqs = [[EditRequest.from_dict(r) for r in sample[i:i + 2]] for i in (0, 2)]
    first = compute_edits(model, tok, reqs[0], cfg, stats=stats, progress=False)
    on_top = compute_edits(model, tok, reqs[1], cfg, stats=stats, on_top_of=[first], progress=False)
    joint = compute_edits(model, tok, reqs[1], cfg, stats=stats, on_top_of=[first], joint=True, progress=False)
    apart = compute_edits(model, tok, reqs[1], cfg, stats=stats, progress=False)
    for pack, step in ((EditPack.stack([first, on_top]), steps[2]), (EditPack.stack([first, joint]), steps[4]),
                       (EditPack.stack([first, apart]), steps[6])):
        with pack.applied(model):
            want = evaluate_counterfact(model, tok, sample, generation=False, retention_records=records)
        got = step.result
        assert (got.efficacy_score, got.neighborhood_score, got.retention) == (
            want.efficacy_score, want.neighborhood_score, want.retention)
    assert steps[2].result.retention_facts == 2 * 1  # the two records no pack edits, one fact each
    assert "sequential" in format_chain(steps)
    with pytest.raises(ConfigError, match="need 8 records"):
        evaluate_chain(model, tok, records, 4, 2, config=cfg, stats=stats, progress=False)
    sparse = evaluate_chain(model, tok, records, 3, 1, config=cfg, stats=stats, regimes=["joint"], every=2,
                            generation_records=0, progress=False)
    assert [(s.regime, s.pack, s.n_edits) for s in sparse] == [("none", 0, 0), ("joint", 2, 2), ("joint", 3, 3)]
    with pytest.raises(ConfigError, match="every"):
        evaluate_chain(model, tok, records, 1, 2, config=cfg, stats=stats, every=0, progress=False)
    with pytest.raises(ConfigError, match="regimes"):
        evaluate_chain(model, tok, records, 1, 2, config=cfg, stats=stats, regimes=["stacked"], progress=False)


def test_eval_chain_command_writes_the_table_json_and_plot(tmp_path, capsys):
    write_edit_inputs(tmp_path, [], {})
    (tmp_path / "data.json").write_text(json.dumps(_records()))
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.json"), "--chain", "2",
                 "--n", "2", "--regimes", "sequential", "--corpus", str(tmp_path / "corpus.txt"), "--no-generation",
                 "--out", str(tmp_path / "chain.json"), "--plot", str(tmp_path / "chain.png")]) == 0
    runs = json.loads((tmp_path / "chain.json").read_text())["runs"]
    assert [(r["regime"], r["pack"]) for r in runs] == [("none", 0), ("sequential", 1), ("sequential", 2)]
    assert "sequential" in capsys.readouterr().out and (tmp_path / "chain.png").read_bytes()[:4] == b"\x89PNG"
