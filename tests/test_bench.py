import json

import pytest
import torch

from memit_adapter.cli import main


def test_bench_cli_reports_consistent_figures(tmp_path, capsys):
    """The bench runs end to end; batched and serial z agree, one-pass and per-layer statistics agree."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--n-requests", "3", "--z-steps", "2", "--texts", "4",
                 "--text-length", "16", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_requests"] == 3 and report["edited_layers"] == [0, 1, 2]
    assert report["z_max_abs_diff"] < 1e-4 and report["stats_max_abs_diff"] < 1e-5
    assert report["z_batched_s"] > 0 and report["stats_one_pass_s"] > 0 and report["peak_mb"] > 0
    assert 0 < report["z_step_tokens"] < 0.5 * report["z_step_tokens_full_rows"]  # prefixed templates: mostly prefix
    text = capsys.readouterr().out
    assert "z vectors, 3 requests" in text and "one pass" in text and "of whole rows" in text


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("relative", [False, True])
def test_the_engine_finds_the_targets_of_the_published_way(arch, relative):
    """The engine's batched suffix-only steps and the reference (one request at a time, full forwards, δ hooked
    on the block) optimise the same objective to the same z."""
    from engine_setup import VARIED_TEMPLATES, config, model_and_tokenizer, varied_requests

    from memit_adapter.arch import get_arch_spec
    from memit_adapter.bench import reference_targets
    from memit_adapter.targets import compute_targets

    model, tok = model_and_tokenizer(arch)
    spec = get_arch_spec(model)
    cfg = config(v_num_grad_steps=8, share_subject_delta=False, preserve_factor=0.0, v_lr_relative=relative,
                 v_lr=0.1 if relative else 0.5, v_loss_threshold=0.0)
    reqs = varied_requests()
    z, h = compute_targets(model, spec, tok, reqs, VARIED_TEMPLATES, cfg, 2, progress=False)
    z_ref, h_ref = reference_targets(model, spec, tok, reqs, VARIED_TEMPLATES, cfg, 2)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
    moved = (z_ref - h_ref).norm(dim=-1)
    assert (moved > 0).all()
    assert ((z - z_ref).norm(dim=-1) <= 1e-3 * moved + 1e-5).all(), ((z - z_ref).norm(dim=-1), moved)


def test_bench_compare_reports_the_three_runs(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["bench", "--compare", "random", "--size", "tiny", "--n-requests", "3", "--quiet",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert set(runs) == {"a_published_way", "b_published_engine", "c_for_model"}
    for run in runs.values():
        assert set(run["seconds"]) == {"statistics", "targets", "update"} and run["total_s"] > 0
    assert runs["b_published_engine"]["z_steps"] == 20 and runs["c_for_model"]["z_steps"] == 60
    assert report["b_speedup_over_a"] == runs["a_published_way"]["total_s"] / runs["b_published_engine"]["total_s"]
    assert 0 < report["z_step_tokens"] < report["z_step_tokens_full_rows"]
    assert "| a_published_way |" in capsys.readouterr().out


def test_bench_compare_runs_both_methods_at_each_frontier_step_count(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["bench", "--compare", "random", "--size", "tiny", "--n-requests", "3", "--quiet",
                 "--frontier", "3", "2", "3x1", "20", "2x2.5", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]  # (b)'s default runs 20 steps: no b@20; c@20 runs
    assert set(runs) == {"a_published_way", "b_published_engine", "c_for_model", "b@2", "c@2", "b@3", "c@3", "c@20",
                         "b@2x2.5", "c@2x2.5"}
    assert [runs[n]["z_steps"] for n in ("b@2", "c@2", "b@3", "c@3", "b@2x2.5")] == [2, 2, 3, 3, 2]
    assert runs["c@2"]["lambda"] == runs["c_for_model"]["lambda"] and runs["b@2"]["layers"] == runs["c@2"]["layers"]
    for family in "bc":  # the lr factor scales each method's own learning rate
        default = runs["b_published_engine" if family == "b" else "c_for_model"]["v_lr"]
        assert runs[f"{family}@2"]["v_lr"] == default
        assert runs[f"{family}@2x2.5"]["v_lr"] == pytest.approx(2.5 * default)
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| a_published_way", "| b@2", "| b@2x2.5", "| b@3", "| b_published_engine", "| c@2",
                        "| c@2x2.5", "| c@3", "| c@20", "| c_for_model"]


def test_bench_compare_repeats_each_run_per_seed_and_reports_their_means(tmp_path, capsys, monkeypatch):
    import random

    from memit_adapter import engine
    from memit_adapter.bench import SIZES, _random_requests

    calls = []
    compute_edits = engine.compute_edits

    def recorded(model, tok, requests, cfg, **kwargs):
        calls.append((list(requests), cfg.seed, cfg.v_num_grad_steps))
        return compute_edits(model, tok, requests, cfg, **kwargs)

    monkeypatch.setattr(engine, "compute_edits", recorded)
    out = tmp_path / "cmp.json"
    assert main(["bench", "--compare", "random", "--size", "tiny", "--n-requests", "3", "--quiet",
                 "--seeds", "0", "5", "--json", str(out)]) == 0
    vocab = SIZES["tiny"]["vocab_size"]
    sample = {s: _random_requests(random.Random(s), 3, vocab) for s in (0, 5)}  # seed 0: the requests of old
    assert sample[0] != sample[5]
    assert calls == [(sample[0], 0, 20), (sample[5], 5, 20), (sample[0], 0, 60), (sample[5], 5, 60)]  # (b), (c)
    report = json.loads(out.read_text())
    assert report["seeds"] == [0, 5]
    for name in ("b_published_engine", "c_for_model"):
        run = report["runs"][name]
        per_seed = run["per_seed"]
        assert len(per_seed) == 2 and "sd" not in run  # a random model has no metrics
        assert run["total_s"] == pytest.approx(sum(r["total_s"] for r in per_seed) / 2, abs=0.01)
        assert run["seconds"]["targets"] == pytest.approx(sum(r["seconds"]["targets"] for r in per_seed) / 2,
                                                          abs=0.01)
    assert "per_seed" not in report["runs"]["a_published_way"]  # timed once, on the first seed's requests
    assert "over seeds [0, 5]" in capsys.readouterr().out


def test_mean_run_averages_times_and_metrics_and_gives_their_spread():
    from memit_adapter.bench import mean_run

    def run(total, z, es, score):
        return {"total_s": total, "seconds": {"statistics": 1.0, "targets": z, "update": 0.5}, "peak_mb": total,
                "z_steps": 20, "efficacy": es, "paraphrase": 0.5, "neighborhood": 0.9, "score": score,
                "retention": 0.95}

    one = run(10.0, 8.0, 0.9, 0.8)
    assert mean_run([one]) is one
    runs = [run(10.0, 8.0, 0.9, 0.8), run(14.0, 11.0, 0.7, 0.6), run(12.0, 8.0, 0.8, 0.9)]
    m = mean_run(runs)
    assert m["total_s"] == 12.0 and m["seconds"]["targets"] == 9.0 and m["peak_mb"] == 14.0 and m["z_steps"] == 20
    assert m["efficacy"] == pytest.approx(0.8) and m["score"] == pytest.approx(23 / 30)
    assert m["sd"]["efficacy"] == pytest.approx(0.1)  # sample sd of 0.9, 0.7, 0.8
    assert m["sd"]["score"] == pytest.approx(((0.8 - 23 / 30) ** 2 + (0.6 - 23 / 30) ** 2 + (0.9 - 23 / 30) ** 2)
                                             ** 0.5 / 2 ** 0.5)
    assert m["sd"]["paraphrase"] == 0.0 and m["per_seed"] == runs


@pytest.mark.slow
def test_bench_compare_on_a_world_runs_each_seed_on_its_own_sample():
    """Seed 1's (c) run is the pack of seed 1's sample and templates, scored as one would by hand."""
    import random

    from memit_adapter import EditRequest, MemitConfig, compute_edits
    from memit_adapter.bench import run_comparison
    from memit_adapter.demo.checkpoints import load_world_model, world_model_path
    from memit_adapter.evaluation import evaluate_counterfact
    from memit_adapter.stats import collect_stats

    report = run_comparison("world-gpt2-bpe", n_requests=3, seeds=[0, 1], progress=False)
    c = report["runs"]["c_for_model"]
    model, tok, everything = load_world_model("world-gpt2-bpe")
    records = random.Random(1).sample(everything, 3)
    assert records != random.Random(0).sample(everything, 3)
    base = MemitConfig.published_for(model)
    stats = collect_stats(model, tok, str(world_model_path("world-gpt2-bpe") / "corpus.txt"), base.layers,
                          max_tokens=base.mom2_max_tokens, batch_size=base.stats_batch_size, progress=False)
    pack = compute_edits(model, tok, [EditRequest.from_dict(r) for r in records],
                         MemitConfig.for_model(model, seed=1), stats=stats, progress=False)
    with pack.applied(model):
        r = evaluate_counterfact(model, tok, records, generation=False, retention_records=everything)
    seed1 = c["per_seed"][1]
    for key, value in (("efficacy", r.efficacy_score), ("paraphrase", r.paraphrase_score),
                       ("neighborhood", r.neighborhood_score), ("retention", r.retention)):
        assert seed1[key] == pytest.approx(value, abs=1e-6)
        assert c[key] == pytest.approx((c["per_seed"][0][key] + seed1[key]) / 2)
    assert set(c["sd"]) == {"efficacy", "paraphrase", "neighborhood", "score", "retention"}


@pytest.mark.parametrize("argv,message", [
    (["--frontier", "5"], "go with --compare"),
    (["--compare", "random", "--frontier", "0"], "must be positive"),
    (["--compare", "random", "--frontier", "10x0"], "must be positive"),
    (["--compare", "random", "--frontier", "10xfast"], "STEPS or STEPSxF"),
    (["--compare", "random", "--frontier", "10x"], "STEPS or STEPSxF"),
    (["--compare", "random", "--frontier", "2.5"], "STEPS or STEPSxF"),
    (["--compare", "random", "--plot", "f.png"], "needs a world"),
    (["--seeds", "1"], "go with --compare"),
    (["--seeds", "0"], "go with --compare"),
    (["--compare", "random", "--seeds", "1", "1"], "distinct"),
    (["--compare", "random", "--seeds", "0", "-2"], "non-negative"),
    (["--compare", "world-gpt2-bpe", "--plot", "no/such/folder/f.png"], "cannot write"),
])
def test_bench_compare_options_refuse_what_they_cannot_do(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quiet", *argv])
    assert message in str(e.value)


def test_fastest_run_at_a_score_and_the_frontier_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from memit_adapter.bench import _fastest_at_least
    from memit_adapter.plots import plot_frontier

    runs = {"a_published_way": {"total_s": 30.0},
            "b_published_engine": {"total_s": 10.0, "score": 0.6, "retention": 0.98, "z_steps": 20, "v_lr": 0.5},
            "b@10": {"total_s": 8.0, "score": 0.5, "retention": 0.99, "z_steps": 10, "v_lr": 0.5},
            "c_for_model": {"total_s": 40.0, "score": 0.95, "retention": 0.96, "z_steps": 60, "v_lr": 0.1},
            "c@10": {"total_s": 9.0, "score": 0.62, "retention": 0.98, "z_steps": 10, "v_lr": 0.1},
            "c@5": {"total_s": 6.0, "score": 0.3, "retention": 0.99, "z_steps": 5, "v_lr": 0.1},
            "c@5x3": {"total_s": 6.5, "score": 0.7, "retention": 0.9, "z_steps": 5, "v_lr": 0.3}}
    assert _fastest_at_least(runs, "c", 0.6) == "c@5x3" and _fastest_at_least(runs, "c", 0.99) is None
    assert _fastest_at_least(runs, "c", 0.8) == "c_for_model"
    assert _fastest_at_least(runs, "b", 0.6) == "b_published_engine"
    report = {"model": "w", "n_requests": 3, "threads": 2, "runs": runs}
    fig = plot_frontier(report, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    score_ax, retention_ax = fig.axes
    lines = [line for line in score_ax.get_lines() if len(line.get_xdata()) > 1]
    assert [list(line.get_xdata()) for line in lines] == [[8.0, 10.0], [6.0, 9.0, 40.0]]  # by time, b then c
    assert list(lines[1].get_ydata()) == pytest.approx([30.0, 62.0, 95.0])
    scaled = [line for line in score_ax.get_lines() if line.get_marker() == "^"]  # c@5x3: a marker off the line
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in scaled] == [([6.5], [pytest.approx(70.0)])]
    assert [t.get_text() for t in score_ax.texts if t.get_text().startswith("5")] == ["5", "5x3"]
    kept = [line for line in retention_ax.get_lines() if len(line.get_xdata()) > 1]
    assert list(kept[0].get_ydata()) == pytest.approx([99.0, 98.0])
    assert not score_ax.containers  # one seed: no error bars
    with pytest.raises(ValueError, match="no Scores"):
        plot_frontier({**report, "runs": {"a_published_way": {"total_s": 1.0}}})
    sd = {"score": 0.02, "retention": 0.01}
    fig = plot_frontier({**report, "seeds": [0, 1], "runs": {**runs, "c@10": {**runs["c@10"], "sd": sd}}})
    (bar,) = fig.axes[0].containers  # c@10's Score: 62 ± 2
    segment = bar.lines[2][0].get_segments()[0]
    assert [tuple(p) for p in segment] == [pytest.approx((9.0, 60.0)), pytest.approx((9.0, 64.0))]
    assert "seeds [0, 1]" in fig._suptitle.get_text()


@pytest.mark.parametrize("shape", ["tiny-gpt2", "tiny-llama"])
def test_bench_scale_times_each_size_and_skips_what_would_not_fit(tmp_path, capsys, shape):
    out = tmp_path / "scale.json"
    assert main(["bench", "--scale", shape, "--sizes", "6", "3", "--texts", "4", "--text-length", "12",
                 "--dtype", "float32", "--device", "cpu", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["shape"] == shape and report["dtype"] == "float32" and report["layers"]
    assert [r["n_requests"] for r in report["runs"]] == [3, 6]  # ascending
    for run in report["runs"]:
        assert set(run["seconds"]) == {"statistics", "targets", "update"} and run["total_s"] > 0
        assert 0 <= run["unconverged"] <= run["n_requests"]
    assert f"random {shape} (float32)" in capsys.readouterr().out
    # a budget the first size already spends: the second is skipped, with the reason
    assert main(["bench", "--scale", shape, "--sizes", "2", "50", "--texts", "4", "--text-length", "12",
                 "--dtype", "float32", "--device", "cpu", "--quiet", "--max-minutes", "1e-4", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert "total_s" in runs[0] and "--max-minutes" in runs[1]["skipped"] and "total_s" not in runs[1]


def test_bench_scale_refuses_sizes_below_one():
    with pytest.raises(SystemExit, match="--sizes must be positive"):
        main(["bench", "--scale", "tiny-gpt2", "--sizes", "0", "--device", "cpu"])
