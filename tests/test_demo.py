import torch

from memit_adapter.demo import run_demo
from memit_adapter.pack import EditPack


def test_demo_runs_end_to_end_offline(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "pack"
    result = run_demo("gpt2", n_edits=4, out=out, progress=False)
    text = capsys.readouterr().out
    for expected in ("What it believes now", "Editing 4 facts at once", "rewrite prompts now give",
                     "efficacy_score", "stock model.load_adapter", "adapter off", "Done in"):
        assert expected in text, expected
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "requests.jsonl"} <= names
    pack = EditPack.from_pretrained(str(out))
    assert len(pack.requests) == 4 and pack.metrics["efficacy_score"] == result["post"].efficacy_score
    assert result["pre"].neighborhood_score > 0.9
