"""The examples/ scripts run end to end on the toy model (slow: each is a fresh interpreter)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.slow
def test_examples_run_in_order(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), HF_HUB_OFFLINE="1")
    steps = [["01_edit_and_save.py"], ["02_load_from_hub.py", "out/pack-sports"],
             ["03_toggle_service.py", "out/pack-sports"], ["04_stack_packs.py"],
             ["05_export_merged.py", "out/pack-sports"]]
    outputs = []
    for step in steps:
        r = subprocess.run([sys.executable, f"examples/{step[0]}", *step[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{step}: {r.stderr[-2000:]}"
        outputs.append(r.stdout)
    assert "-> 'baseball' (wanted 'baseball')" in outputs[0]
    assert "'the sport played by michael jordan' -> 'baseball'" in outputs[1]  # stock load_adapter
    assert "[edits off] 'the sport played by michael jordan' -> 'baseball'" not in outputs[2]
    assert "refused:" in outputs[3] and "michael jordan" in outputs[3]
    assert "chained pack parents: ['sha256:" in outputs[3] and (tmp_path / "out" / "pack-day-2" /
                                                                "edit_targets.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "deltas.safetensors").is_file()
