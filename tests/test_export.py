"""``export --format vllm``: one rank, scale 1, padded or SVD-cut; applied the way vLLM applies LoRA."""

import json

import pytest
import torch
from pack_utils import logits, random_pack
from safetensors.torch import load_file
from tiny import tiny_model

from memit_adapter.cli import main
from memit_adapter.errors import OverwriteError, PackError
from memit_adapter.export import export_vllm
from memit_adapter.pack import EditPack

IDS = torch.tensor([[5, 9, 14, 3, 27, 8]])


def _mixed_pack(model):
    """Layer 1 of rank 6, layer 2 of rank 2 (its deltas sum two random packs)."""
    six = random_pack(model, layers=(1,), rank=6, seed=1, rel=0.3)
    two = random_pack(model, layers=(2,), rank=2, seed=2, rel=0.3)
    return EditPack(deltas={**six.deltas, **two.deltas}, requests=six.requests, config=six.config,
                    model_type="llama", base_model=six.base_model, fingerprint=None)


def _vllm_apply(model, folder):
    """What vLLM does: W += (lora_alpha / r) * B @ A for every module listed in target_modules, nothing else."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert "rank_pattern" not in cfg and "alpha_pattern" not in cfg
    tensors = load_file(folder / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    with torch.no_grad():
        for name in cfg["target_modules"]:
            A, B = (tensors[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
            assert A.shape[0] == B.shape[1] == cfg["r"]
            model.get_submodule(name).weight += scale * B @ A
    return cfg


@pytest.mark.parametrize("max_rank, r", [(8, 6), (4, 4)])
def test_the_export_is_the_pack_padded_or_cut_to_one_rank(tmp_path, max_rank, r):
    model = tiny_model("llama")
    pack = _mixed_pack(model)
    report = export_vllm(pack, tmp_path / "v", max_rank=max_rank)
    assert report["r"] == r
    served = tiny_model("llama")
    cfg = _vllm_apply(served, tmp_path / "v")
    assert cfg["r"] == cfg["lora_alpha"] == r
    layer1, layer2 = sorted(pack.deltas)
    expected = dict(pack.deltas)
    if r < 6:  # the rank-6 module is cut to its best rank-r approximation, the error reported
        expected[layer1], discarded, total = pack.deltas[layer1].truncated(r)
        assert report["modules"][layer1]["relative_error"] == pytest.approx((discarded / total) ** 0.5)
        assert report["modules"][layer1]["relative_error"] > 0.01
    else:
        assert report["modules"][layer1]["relative_error"] == 0
    assert report["modules"][layer2] == {"rank": 2, "relative_error": 0.0}  # padded with zeros: exact
    want = EditPack(deltas=expected, requests=pack.requests, config=pack.config, model_type="llama")
    with want.applied(model):
        torch.testing.assert_close(logits(served, IDS), logits(model, IDS), rtol=1e-4, atol=1e-5)


def test_architectures_vllm_serves_without_lora_are_refused_naming_merge(tmp_path):
    model = tiny_model("gpt2")
    with pytest.raises(PackError, match="memit-adapter merge"):
        export_vllm(random_pack(model), tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_the_command_writes_and_reports(tmp_path, capsys):
    model = tiny_model("llama")
    _mixed_pack(model).save_pretrained(str(tmp_path / "pack"))
    assert main(["export", str(tmp_path / "pack"), "--out", str(tmp_path / "v"), "--max-rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "rank 4 everywhere" in out and "cut by SVD" in out and "padded" in out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "pack"), "--out", str(tmp_path / "mine")]) == 1
    assert "OverwriteError" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    with pytest.raises(OverwriteError):
        export_vllm(EditPack.from_pretrained(str(tmp_path / "pack")), tmp_path / "mine")
    with pytest.raises(SystemExit, match="max-rank"):
        main(["export", str(tmp_path / "pack"), "--out", str(tmp_path / "w"), "--max-rank", "1024"])
