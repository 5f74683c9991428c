import pytest
import torch
import transformers.integrations.peft as tf_peft
from tiny import tiny_model

from memit_adapter.compat import stock_adapter_refusal
from memit_adapter.demo.run import run_demo
from memit_adapter.pack import EditPack


def test_demo_runs_end_to_end_offline(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "pack"
    result = run_demo(n_edits=4, out=out, progress=False)  # the default world: world-gpt2-bpe
    text = capsys.readouterr().out
    for expected in ("What it believes now", "Editing 4 facts at once", "rewrite prompts now give",
                     "efficacy_score", "stock model.load_adapter", "adapter off", "Done in"):
        assert expected in text, expected
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "requests.jsonl"} <= names
    pack = EditPack.from_pretrained(str(out))
    assert len(pack.requests) == 4 and pack.metrics["efficacy_score"] == result["post"].efficacy_score
    assert result["pre"].neighborhood_score > 0.9
    assert result["pre"].retention > 0.95 and result["post"].retention_facts == result["pre"].retention_facts > 2000
    on, off, on_again = result["stock_on_off_on"]
    assert on == on_again != off


@pytest.fixture
def peft_floor_above_installed(monkeypatch):
    """transformers 5.24 with peft 0.21.2: the adapter methods' version gate asks for an unreleased peft."""
    monkeypatch.setattr(tf_peft, "MIN_PEFT_VERSION", "99.0.0")


def test_refusal_is_one_line_naming_versions(peft_floor_above_installed):
    reason = stock_adapter_refusal()
    assert reason is not None and "\n" not in reason
    assert "peft >= 99.0.0" in reason and "PeftModel" in reason
    with pytest.raises(ValueError, match="not compatible"):  # the gate we read is the one transformers runs
        tiny_model("gpt2").disable_adapters()


def test_no_refusal_with_the_tested_set():
    assert stock_adapter_refusal() is None


def test_demo_falls_back_to_peft_when_transformers_refuses(tmp_path, capsys, peft_floor_above_installed):
    result = run_demo("gpt2", n_edits=4, out=tmp_path / "pack", progress=False)  # the small shaped world: quicker
    text = capsys.readouterr().out
    assert "refuses its adapter methods" in text and "stock PeftModel.from_pretrained" in text
    on, off, on_again = result["stock_on_off_on"]
    assert on == on_again != off
