"""Pack files: PEFT LoRA format, sidecar, requests, card, dense option, atomic writes, damaged files."""

import json
import pickle

import pytest
import torch
import yaml
from pack_utils import random_pack
from peft import LoraConfig
from safetensors import safe_open
from tiny import tiny_model

from memit_adapter import persistence
from memit_adapter.errors import OverwriteError, PackError
from memit_adapter.pack import EditPack

# keys every PEFT version since 0.7 accepts in a LoRA adapter_config.json
PEFT_LONGSTANDING_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r",
                          "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "bias", "modules_to_save",
                          "init_lora_weights", "rank_pattern", "alpha_pattern"}


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


def test_save_load_is_the_identity(gpt2, tmp_path):
    pack = random_pack(gpt2, layers=(0, 1, 3), rank=3, metrics={"efficacy": 0.9, "n": 3}, revision="abc123",
                       parents=["sha256:parent"])
    pack.deltas["transformer.h.3.mlp.c_proj"] = pack.deltas["transformer.h.3.mlp.c_proj"].to_dense()
    pack.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "edit_pack.json", "requests.jsonl"]
    loaded = EditPack.from_pretrained(str(tmp_path / "p"))
    assert loaded == pack
    assert loaded.deltas["transformer.h.3.mlp.c_proj"].is_dense
    assert loaded.pack_id == pack.pack_id
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary folder left


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_factors_round_trip(gpt2, tmp_path, dtype):
    pack = random_pack(gpt2, dtype=dtype)
    pack.save_pretrained(tmp_path)
    loaded = EditPack.from_pretrained(str(tmp_path))
    assert loaded == pack and next(iter(loaded.deltas.values())).dtype == dtype


def test_adapter_config_is_plain_peft_lora(gpt2, tmp_path):
    pack = random_pack(gpt2, layers=(0, 1, 2), rank=2)
    pack.deltas["transformer.h.2.mlp.c_proj"] = pack.deltas["transformer.h.2.mlp.c_proj"].to_dense()  # rank 32
    pack.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(cfg) <= PEFT_LONGSTANDING_KEYS
    assert cfg["target_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj",
                                     "transformer.h.2.mlp.c_proj"]  # full names: c_proj would hit attn.c_proj
    assert cfg["fan_in_fan_out"] is True and cfg["lora_alpha"] == cfg["r"] == 2
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"transformer.h.2.mlp.c_proj": 32}
    LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})  # PEFT accepts it
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        A = f.get_tensor("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight")
        B = f.get_tensor("base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight")
    assert len(keys) == 6 and meta["format"] == "pt"
    assert A.shape == (2, 128) and B.shape == (32, 2)  # (r, d_in), (d_out, r) also for GPT-2's Conv1D
    assert torch.equal(B @ A, pack.deltas["transformer.h.0.mlp.c_proj"].weight_delta())
    llama_cfg = tmp_path / "llama"
    random_pack(tiny_model("llama")).save_pretrained(llama_cfg)
    assert json.loads((llama_cfg / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_sidecar_requests_and_card(gpt2, tmp_path):
    pack = random_pack(gpt2, rank=3, metrics={"efficacy_score": 0.97}, revision="0123abcd")
    pack.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "edit_pack.json").read_text())
    assert meta["format"] == "memit_adapter.edit_pack" and meta["format_version"] == 1
    assert meta["library_version"] and meta["fingerprint"] == pack.fingerprint and meta["revision"] == "0123abcd"
    assert meta["config"] == pack.config.to_dict() and meta["base_model"] == "tiny-random/gpt2"
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [r.to_dict() for r in pack.requests]
    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny-random/gpt2" and front["library_name"] == "peft"
    assert {"memit", "knowledge-editing", "base_model:adapter:tiny-random/gpt2"} <= set(front["tags"])
    assert "| 0 | michael jordan | michael jordan plays the sport of |  baseball |  basketball |" in card
    assert "efficacy_score | 0.97" in card
    index = front["model-index"][0]
    assert index["name"] == "memit-edit-pack" and index["results"][0]["metrics"] == [
        {"type": "efficacy_score", "value": 0.97}]
    assert front["license"] == "other" and "## Limitations" in card and "deliberately rewrites facts" in card
    assert "$" not in card.replace("$", "", 0) or "${" not in card


def test_card_without_base_model_and_with_pipes(gpt2, tmp_path):
    pack = random_pack(gpt2, base_model=None)
    pack.requests[0] = type(pack.requests[0])("{} is | a", "x|y", " z")
    pack.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and "memit" in front["tags"] and "model-index" not in front  # no metrics
    assert "x\\|y" in card
    assert "Hub id was not recorded" in card and "BASE_MODEL_ID" not in card and "THIS_REPO" not in card


def test_more_edits_than_min_dim_saved_exactly(gpt2, tmp_path):
    pack = random_pack(gpt2, rank=40, n_requests=40)  # > min(32, 128): held dense
    assert all(d.is_dense for d in pack.deltas.values())
    pack.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 32
    assert EditPack.from_pretrained(str(tmp_path / "peft")) == pack
    pack.save_pretrained(tmp_path / "dense", dense_file=True)
    files = sorted(p.name for p in (tmp_path / "dense").iterdir())
    assert files == ["README.md", "edit_deltas.safetensors", "edit_pack.json", "requests.jsonl"]
    size = lambda d, f: (tmp_path / d / f).stat().st_size  # noqa: E731
    assert size("dense", "edit_deltas.safetensors") < size("peft", "adapter_model.safetensors")
    assert EditPack.from_pretrained(str(tmp_path / "dense")) == pack


def test_dense_file_keeps_low_rank_factors(gpt2, tmp_path):
    pack = random_pack(gpt2, rank=2)
    pack.save_pretrained(tmp_path, dense_file=True)
    assert EditPack.from_pretrained(str(tmp_path)) == pack


def test_resave_replaces_the_pack_and_removes_stale_files(gpt2, tmp_path):
    random_pack(gpt2, seed=1).save_pretrained(tmp_path, dense_file=True)
    second = random_pack(gpt2, seed=2)
    second.save_pretrained(tmp_path)  # a folder of ours: replaced, no option needed
    assert not (tmp_path / "edit_deltas.safetensors").exists()
    assert EditPack.from_pretrained(str(tmp_path)) == second
    (tmp_path / "other.txt").write_text("kept")
    with pytest.raises(OverwriteError, match="other.txt"):  # a file of someone else's: refused (tests/test_faults.py)
        random_pack(gpt2, seed=3).save_pretrained(tmp_path, dense_file=True)
    random_pack(gpt2, seed=3).save_pretrained(tmp_path, dense_file=True, overwrite=True)
    assert (tmp_path / "other.txt").read_text() == "kept" and not (tmp_path / "adapter_model.safetensors").exists()


def test_interrupted_save_leaves_nothing_half_written(gpt2, tmp_path, monkeypatch):
    first = random_pack(gpt2, seed=1)
    first.save_pretrained(tmp_path / "existing")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(persistence, "_write_json", boom)  # dies while the new folder is being written
    with pytest.raises(KeyboardInterrupt):
        random_pack(gpt2, seed=2).save_pretrained(tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        random_pack(gpt2, seed=3).save_pretrained(tmp_path / "existing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert EditPack.from_pretrained(str(tmp_path / "existing")) == first


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_weights", "bad_json", "missing_requests",
                                    "extra_request", "sidecar_missing", "target_modules", "newer_format"])
def test_damaged_files_give_clear_errors(gpt2, tmp_path, damage):
    random_pack(gpt2).save_pretrained(tmp_path)
    w, meta = tmp_path / "adapter_model.safetensors", tmp_path / "edit_pack.json"
    if damage == "truncate_weights":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "flip_weights":
        data = bytearray(w.read_bytes())
        data[-3] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "bad_json":
        meta.write_text(meta.read_text()[:-20])
    elif damage == "missing_requests":
        (tmp_path / "requests.jsonl").unlink()
    elif damage == "extra_request":
        with open(tmp_path / "requests.jsonl", "a") as f:
            f.write(json.dumps({"prompt": "{} is", "subject": "a", "target_new": " b"}) + "\n")
    elif damage == "sidecar_missing":
        meta.unlink()
    elif damage == "target_modules":
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg["target_modules"] = ["c_proj"]
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    elif damage == "newer_format":
        m = json.loads(meta.read_text())
        m["format_version"] = 99
        meta.write_text(json.dumps(m))
    with pytest.raises(PackError) as err:
        EditPack.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_truncated_weights_without_hash_check_still_raise_pack_error(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(PackError, match="not a readable safetensors"):
        persistence._read_safetensors(tmp_path / "x.safetensors")


def test_loading_never_unpickles(gpt2, tmp_path, monkeypatch):
    random_pack(gpt2).save_pretrained(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    EditPack.from_pretrained(str(tmp_path))


def test_missing_folder_is_a_pack_error(tmp_path):
    with pytest.raises(PackError, match="no edit pack folder"):
        EditPack.from_pretrained(str(tmp_path / "nope"))
