"""Packs on a Hub: push as one commit, subfolders, revisions, load by repo id, offline reload, stock load_adapter.

The Hub is tests/hub_server.py on 127.0.0.1. In-process tests pass ``endpoint=``; the full round trip runs
clients in fresh interpreters with ``HF_ENDPOINT`` set before huggingface_hub is imported.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from pack_utils import logits, random_pack
from safetensors.torch import save_file
from tiny import tiny_model

from memit_adapter.errors import PackError
from memit_adapter.pack import EditPack

IDS = torch.tensor([[5, 9, 14, 22, 7, 30]])


@pytest.fixture
def hub():
    with LocalHub() as server:
        yield server
    assert server.unhandled == []


def test_push_and_load_in_process(hub, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model("gpt2")
    a, b = random_pack(model, seed=1, rel=0.5), random_pack(model, seed=2, offset=5, rel=0.5)
    b.targets = torch.randn(len(b.requests), 8)  # the target vectors of a joint chain travel with the pack
    kw = dict(endpoint=hub.endpoint, token="hf_test")
    commits_before = hub.commit_count
    a.push_to_hub("alice/facts", subfolder="batch-a", private=True, commit_message="first batch", **kw)
    assert hub.commit_count == commits_before + 1  # one commit for the whole folder
    b.push_to_hub("alice/facts", subfolder="batch-b", revision="v2", **kw)
    repo = hub.repos["alice/facts"]
    assert repo.private
    main, v2 = repo.commits[repo.refs["main"]], repo.commits[repo.refs["v2"]]
    assert {p for p in main if p.startswith("batch-a/")} == {f"batch-a/{f}" for f in (
        "README.md", "adapter_config.json", "adapter_model.safetensors", "edit_pack.json", "requests.jsonl")}
    assert "batch-b/edit_pack.json" in v2 and "batch-b/edit_pack.json" not in main
    assert "batch-b/edit_targets.safetensors" in v2
    assert hub.validated_cards and hub.validated_cards[0]["library_name"] == "peft"  # our card, not PEFT's
    card = main["batch-a/README.md"].decode()  # its loading code names the repo and subfolder it was pushed to
    assert 'model.load_adapter("alice/facts", adapter_kwargs={"subfolder": "batch-a"})' in card
    assert 'EditPack.from_pretrained("alice/facts", subfolder="batch-a")' in card

    cache = tmp_path / "cache"
    load = dict(cache_dir=cache, **kw)
    got_a = EditPack.from_pretrained("alice/facts", subfolder="batch-a", **load)
    got_b = EditPack.from_pretrained("alice/facts", subfolder="batch-b", revision="v2", **load)
    assert got_a == a and got_b == b
    assert got_a.targets is None and torch.equal(got_b.targets, b.targets)
    with pytest.raises(PackError, match="not found"):
        EditPack.from_pretrained("alice/facts", subfolder="batch-b", **load)  # not on main
    with got_a.applied(model):
        hub_logits = logits(model, IDS)
    with a.applied(model):
        assert torch.equal(hub_logits, logits(model, IDS))

    # a later push to the same place replaces the pack, and a dense file replaces the PEFT weights
    a.push_to_hub("alice/facts", subfolder="batch-a", dense_file=True, **kw)
    main = repo.commits[repo.refs["main"]]
    assert "batch-a/edit_deltas.safetensors" in main and "batch-a/adapter_model.safetensors" not in main
    assert EditPack.from_pretrained("alice/facts", subfolder="batch-a", **load) == a

    hub.stop()  # offline: the cache answers for revisions it has seen
    cached = EditPack.from_pretrained("alice/facts", subfolder="batch-b", revision="v2", local_files_only=True,
                                      cache_dir=cache)
    assert cached == b


ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    step, root = sys.argv[1], sys.argv[2]
    ref = load_file(root + "/expected.safetensors")
    model = AutoModelForCausalLM.from_pretrained(root + "/base").eval()
    def out(m):
        with torch.no_grad():
            return m(input_ids=ref["ids"]).logits
    if step == "stock":  # inference code without memit_adapter, from the Hub at a revision
        model.load_adapter("bob/edits", adapter_kwargs={"revision": "v1", "subfolder": "p1"})
        torch.testing.assert_close(out(model), ref["edited"], atol=1e-5, rtol=0)
        assert "memit_adapter" not in sys.modules
    else:
        from memit_adapter.pack import EditPack
        if step == "push":
            pack = EditPack.from_pretrained(root + "/pack")
            pack.push_to_hub("bob/edits", subfolder="p1", revision="v1", commit_message="edits")
        pack = EditPack.from_pretrained("bob/edits", subfolder="p1", revision="v1")
        with pack.applied(model):
            assert torch.equal(out(model), ref["edited"])
    print(step, "ok")
""")


@pytest.mark.slow
def test_hub_round_trip_with_env_endpoint_and_offline_reload(hub, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model("llama")
    pack = random_pack(model, rel=0.5)
    model.save_pretrained(tmp_path / "base")
    pack.save_pretrained(tmp_path / "pack")
    with pack.applied(model):
        save_file({"ids": IDS, "edited": logits(model, IDS)}, str(tmp_path / "expected.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_test",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(Path(__file__).parents[1]))
    for step, extra in (("push", {}), ("stock", {}), ("offline", {"HF_HUB_OFFLINE": "1"})):
        if step == "offline":
            hub.stop()
        r = subprocess.run([sys.executable, "-c", ROUND_TRIP, step, str(tmp_path)], env={**env, **extra},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and f"{step} ok" in r.stdout, r.stderr[-3000:]
    cfg = json.loads(hub.repos["bob/edits"].commits[hub.repos["bob/edits"].refs["v1"]]["p1/adapter_config.json"])
    assert cfg["target_modules"] == pack.module_names


def test_push_and_pull_commands(hub, tmp_path):
    """memit-adapter push / pull in fresh interpreters against the local Hub: the pulled pack is the pushed one."""
    model = tiny_model("gpt2")
    pack = random_pack(model, seed=4)
    pack.save_pretrained(str(tmp_path / "pack"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_test",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cli = [sys.executable, "-m", "memit_adapter.cli"]
    for argv in (["push", str(tmp_path / "pack"), "carol/packs", "--subfolder", "day-1"],
                 ["pull", "carol/packs", "--subfolder", "day-1", "--out", str(tmp_path / "pulled")]):
        r = subprocess.run(cli + argv, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert EditPack.from_pretrained(str(tmp_path / "pulled")) == pack
    card = hub.repos["carol/packs"].commits[hub.repos["carol/packs"].refs["main"]]["day-1/README.md"].decode()
    assert 'EditPack.from_pretrained("carol/packs", subfolder="day-1")' in card
