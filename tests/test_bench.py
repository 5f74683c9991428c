import json

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
