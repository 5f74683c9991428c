"""Stock transformers/PEFT load a saved pack and reproduce the edited logits, without importing memit_adapter."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pack_utils import logits, random_pack
from safetensors.torch import save_file
from tiny import tiny_model

from memit_adapter.pack import EditPack

# Runs in a fresh interpreter: only torch, transformers, peft and safetensors; memit_adapter must stay unimported.
STOCK_CLIENT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    root = sys.argv[1]
    ref = load_file(root + "/expected.safetensors")
    ids = ref["ids"]
    def out(m):
        with torch.no_grad():
            return m(input_ids=ids).logits
    for arch in sys.argv[2:]:
        base = root + "/" + arch
        m = AutoModelForCausalLM.from_pretrained(base + "/base").eval()
        m.load_adapter(base + "/a", adapter_name="a")
        torch.testing.assert_close(out(m), ref[arch + ".a"], atol=1e-5, rtol=0)
        m.load_adapter(base + "/b", adapter_name="b")
        m.set_adapter(["a", "b"])
        torch.testing.assert_close(out(m), ref[arch + ".ab"], atol=1e-5, rtol=0)
        p = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base + "/base").eval(), base + "/a")
        torch.testing.assert_close(out(p), ref[arch + ".a"], atol=1e-5, rtol=0)
        merged = p.merge_and_unload()
        torch.testing.assert_close(out(merged), ref[arch + ".merged_a"], atol=1e-5, rtol=0)
        print(arch, "ok")
    assert "memit_adapter" not in sys.modules
    print("stock ok")
""")


def _run(args, env=None):
    return subprocess.run([sys.executable, "-c", STOCK_CLIENT, *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("archs", [("gpt2", "llama")], ids=["gpt2+llama"])
def test_stock_peft_reproduces_edited_logits(tmp_path, archs):
    torch.set_num_threads(1)
    ids = torch.tensor([[5, 9, 14, 22, 7, 30], [11, 12, 13, 40, 41, 42]])
    expected = {"ids": ids}
    for arch in archs:
        model = tiny_model(arch)
        model.save_pretrained(tmp_path / arch / "base")
        a = random_pack(model, layers=(0, 2), rank=3, rel=0.5, seed=1)
        # b: more edits than min(d_in, d_out) on layer 2 (dense, saved with an identity factor), rank 2 on layer 3
        b = EditPack.stack([random_pack(model, layers=(2,), rank=40, rel=0.5, seed=2, offset=5),
                            random_pack(model, layers=(3,), rank=2, rel=0.5, seed=3, offset=50)])
        assert b.deltas[next(iter(b.deltas))].is_dense
        a.save_pretrained(tmp_path / arch / "a")
        b.save_pretrained(tmp_path / arch / "b")
        with a.applied(model):
            expected[f"{arch}.a"] = logits(model, ids)
            with b.applied(model):
                expected[f"{arch}.ab"] = logits(model, ids)
        a.merge(model)
        expected[f"{arch}.merged_a"] = logits(model, ids)
        a.unmerge(model)
        assert (expected[f"{arch}.a"] - logits(model, ids)).abs().max() > 1e-3
    save_file(expected, str(tmp_path / "expected.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the child cannot find memit_adapter via tests/
    result = _run([str(tmp_path), *archs], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stock ok" in result.stdout
