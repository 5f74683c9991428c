"""Second moments from the published ``.npz`` layout and through a Hub dataset repo."""

import numpy as np
import pytest
import torch
from engine_setup import corpus, model_and_tokenizer
from hub_server import LocalHub
from test_stats import _independent_mom2

from memit_adapter import StatisticsError
from memit_adapter.stats import StatsCache, collect_stats, read_entry_keys
from memit_adapter.stats_files import import_published_stats, pull_stats, push_stats, stats_card


def _published_npz(folder, module: str, total: torch.Tensor, count: int, size: int = 100000):
    """A file as the published implementation writes it: the running sum and its count under ``mom2.``."""
    path = folder / f"{module}_float32_mom2_{size}.npz"
    np.savez(path, constructor="util.runningstats.CombinedStat()", **{
        "mom2.constructor": "util.runningstats.SecondMoment()", "mom2.count": count,
        "mom2.mom2": total.float().numpy()})
    return path


def test_published_statistics_import_into_entries_edits_use(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    texts = corpus(12)
    src = tmp_path / "wikipedia_stats"
    src.mkdir()
    want = {}
    for layer in (1, 2):
        mom2, count = _independent_mom2(model, tok, texts, layer)
        _published_npz(src, f"transformer.h.{layer}.mlp.c_proj", mom2 * count, count)
        want[layer] = (mom2, count)
    written = import_published_stats(model, [src], tmp_path / "cache")
    assert sorted(written) == [1, 2]
    key, count = read_entry_keys(written[1])
    assert key["corpus"].startswith("published-npz:wikipedia_stats/") and key["n_samples"] == 100000
    got = collect_stats(model, tok, None, [1, 2], cache=tmp_path / "cache", progress=False)  # no corpus: cached
    for layer, (mom2, count) in want.items():
        assert got[layer].count == count
        torch.testing.assert_close(got[layer].mom2.double(), mom2, rtol=1e-5, atol=1e-7)


def test_published_files_that_do_not_fit_are_refused_and_nothing_is_written(tmp_path):
    model, _ = model_and_tokenizer("gpt2")
    d_ff = model.config.n_inner or 4 * model.config.n_embd
    good = _published_npz(tmp_path, "transformer.h.1.mlp.c_proj", torch.eye(d_ff), 10)
    cases = [
        (_published_npz(tmp_path, "transformer.h.9.mlp.c_proj", torch.eye(d_ff), 10), "none of this model"),
        (_published_npz(tmp_path, "transformer.h.2.mlp.c_proj", torch.eye(d_ff - 1), 10), "expected for layer 2"),
        (tmp_path / "notes.npz", "not a published MEMIT statistics file"),
    ]
    (tmp_path / "notes.npz").write_bytes(b"x")
    for bad, match in cases:
        with pytest.raises(StatisticsError, match=match):
            import_published_stats(model, [good, bad], tmp_path / "cache")
    broken = tmp_path / "transformer.h.2.mlp.c_proj_float32_mom2.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(StatisticsError, match="unreadable"):
        import_published_stats(model, [good, broken], tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_statistics_push_with_a_card_and_pull_into_another_cache(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    first = collect_stats(model, tok, corpus(10), [1, 2], cache=tmp_path / "a", progress=False)
    card = stats_card(tmp_path / "a")
    assert card.count("| `mom2_layer") == 2 and f"| {first[1].count} |" in card
    with LocalHub() as hub:
        kw = dict(endpoint=hub.endpoint, token="hf_test")
        push_stats(tmp_path / "a", "me/gpt2-mom2", **kw)
        files = hub.repos["datasets~me/gpt2-mom2"].commits[hub.repos["datasets~me/gpt2-mom2"].resolve("main")]
        assert sorted(set(files) - {".gitattributes"}) == ["README.md"] + sorted(p.name for p in (tmp_path / "a").glob(
            "mom2_*"))
        assert "memit-adapter stats --pull me/gpt2-mom2" in files["README.md"].decode()
        paths = pull_stats("me/gpt2-mom2", tmp_path / "b", **kw)
        assert hub.unhandled == []
    assert sorted(p.name for p in paths) == sorted(p.name for p in (tmp_path / "a").glob("mom2_*"))
    again = collect_stats(model, tok, corpus(10), [1, 2], cache=StatsCache(tmp_path / "b"), progress=False)
    for layer in (1, 2):
        assert torch.equal(again[layer].mom2, first[layer].mom2)


def test_stats_command_imports_published_files_and_edit_reads_them(tmp_path, capsys, monkeypatch):
    from engine_setup import requests, write_edit_inputs

    from memit_adapter import stats as stats_module
    from memit_adapter.cli import main

    write_edit_inputs(tmp_path, requests(), {"layers": [1, 2], "v_num_grad_steps": 2})
    model, tok = model_and_tokenizer("gpt2")
    src = tmp_path / "npz"
    src.mkdir()
    for layer in (1, 2):
        mom2, count = _independent_mom2(model, tok, corpus(8), layer)
        _published_npz(src, f"transformer.h.{layer}.mlp.c_proj", mom2 * count, count)
    with pytest.raises(SystemExit, match="--model is needed"):
        main(["stats", "--import-npz", str(src), "--cache", str(tmp_path / "c")])
    assert main(["stats", "--model", str(tmp_path / "m"), "--import-npz", str(src), "--cache", str(tmp_path / "c")]
                ) == 0
    assert "imported the published statistics of layers [1, 2]" in capsys.readouterr().out
    monkeypatch.setattr(stats_module, "_accumulate", lambda *a, **k: pytest.fail("recomputed imported statistics"))
    assert main(["edit", "--model", str(tmp_path / "m"), "--requests", str(tmp_path / "edits.jsonl"), "--stats-cache",
                 str(tmp_path / "c"), "--config", str(tmp_path / "cfg.json"), "--quiet", "--out",
                 str(tmp_path / "pack")]) == 0
