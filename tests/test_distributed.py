"""Several processes (``torchrun``, two ranks, gloo on the CPU) give what one process gives: the statistics, the
target vectors, the pack, and the ``edit`` command's saved pack, written by rank 0 alone.

Run as a script (``torchrun ... tests/test_distributed.py OUT``) this file is the worker: it computes under the
process group and saves each rank's results to ``OUT/rank{r}.pt``; the tests compare them with one process. After
leaving the group it saves the names of its gloo threads still running to ``OUT/threads{r}.pt``.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer, requests, write_edit_inputs

from memit_adapter import EditRequest, MemitConfig, compute_edits
from memit_adapter.arch import get_arch_spec
from memit_adapter.models import load_model
from memit_adapter.pack import EditPack
from memit_adapter.stats import collect_stats
from memit_adapter.targets import compute_targets

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [1, 2]
BATCH, BUDGET = 4, 300  # stats batches of 4 texts a rank; a token budget that stops the pass early


def _texts() -> list[str]:
    return [t[: 20 + 7 * (i % 20)] for i, t in enumerate(corpus(40))]  # different lengths: padding is masked


def _requests() -> list[EditRequest]:  # 5 subjects, one with two requests (one δ row): shares of 3 and 2
    return requests() + [EditRequest("the city of {}", "michael jordan", " london")]


def _config() -> MemitConfig:
    return config(layers=LAYERS, v_num_grad_steps=20)


# -- the worker ----------------------------------------------------------------------------------------------

def _worker(out: Path) -> None:
    from memit_adapter import stats as stats_module
    from memit_adapter.distributed import process_group, rank

    torch.set_num_threads(1)
    with process_group() as distributed:
        assert distributed
        importlib.import_module("torch._dynamo")  # as from_pretrained does: it must not keep the group alive
        model, tok = model_and_tokenizer("gpt2")
        saved: list[int] = []
        save = stats_module.StatsCache.save

        def counted(self, key, stat):
            saved.append(key["layer"])
            return save(self, key, stat)

        stats_module.StatsCache.save = counted
        full = collect_stats(model, tok, _texts(), LAYERS, batch_size=BATCH, cache=out / "cache", progress=False)
        budget = collect_stats(model, tok, _texts(), LAYERS, batch_size=BATCH, max_tokens=BUDGET, progress=False)

        def no_pass(*_args, **_kwargs):
            raise AssertionError("a cached layer was computed again")

        stats_module._accumulate = no_pass  # every rank reads the cache
        cached = collect_stats(model, tok, _texts(), LAYERS, batch_size=BATCH, cache=out / "cache", progress=False)
        pack = compute_edits(model, tok, _requests(), _config(), stats=full, progress=False)
        spec = get_arch_spec(model)
        one_z, _, one_nll = compute_targets(model, spec, tok, requests()[:1], ["{}"], _config(), 2, progress=False,
                                            return_loss=True)  # rank 1 has no subject
        torch.save({"mom2": {layer: s.mom2 for layer, s in full.items()},
                    "count": {layer: s.count for layer, s in full.items()},
                    "budget_mom2": {layer: s.mom2 for layer, s in budget.items()},
                    "budget_count": {layer: s.count for layer, s in budget.items()},
                    "cached_equal": all(torch.equal(cached[layer].mom2, full[layer].mom2) for layer in LAYERS),
                    "saved": saved, "pack_id": pack.pack_id, "z_nll": pack.report["z_nll"],
                    "deltas": {name: (d.B, d.A) for name, d in pack.deltas.items()},
                    "one_z": one_z, "one_nll": one_nll}, out / f"rank{rank()}.pt")
        r = rank()
    # the group is gone, its threads too (a thread left running into interpreter shutdown can abort the process)
    torch.save(_gloo_threads(), out / f"threads{r}.pt")


def _gloo_threads() -> list[str] | None:
    """The names of this process's gloo threads (None where ``/proc`` lists no threads)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    return [n for n in ((t / "comm").read_text().strip() for t in tasks.iterdir()) if "gloo" in n]


# -- launching -----------------------------------------------------------------------------------------------

def _torchrun(*args: str, timeout: float = 240) -> str:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` on this host; its output. ``--standalone``: the launcher
    binds a free port itself (a port picked here first could be taken before it binds it). Fails the test on a
    non-zero exit or a hang (the launcher and its workers, a process group of their own, are killed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict, Path]:
    out = tmp_path_factory.mktemp("ranks")
    _torchrun(str(Path(__file__).resolve()), str(out))
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt"), out


@pytest.fixture(scope="module")
def single() -> dict:
    """The same work in this one process."""
    model, tok = model_and_tokenizer("gpt2")
    full = collect_stats(model, tok, _texts(), LAYERS, batch_size=BATCH, progress=False)
    # two ranks of BATCH texts read the texts one process reads in batches of 2 x BATCH
    budget = collect_stats(model, tok, _texts(), LAYERS, batch_size=2 * BATCH, max_tokens=BUDGET, progress=False)
    pack = compute_edits(model, tok, _requests(), _config(), stats=full, progress=False)
    one_z, _, one_nll = compute_targets(model, get_arch_spec(model), tok, requests()[:1], ["{}"], _config(), 2,
                                        progress=False, return_loss=True)
    return {"full": full, "budget": budget, "pack": pack, "one_z": one_z, "one_nll": one_nll}


# -- the tests -----------------------------------------------------------------------------------------------

def test_leaving_the_process_group_stops_its_threads(ranks):
    _, _, out = ranks
    for r in (0, 1):
        threads = torch.load(out / f"threads{r}.pt")
        if threads is None:
            pytest.skip("no /proc/self/task here to list a process's threads")
        assert threads == [], f"rank {r} still runs {threads} after leaving the group"


def test_statistics_are_all_reduced_to_those_of_one_process(ranks, single):
    r0, r1, _ = ranks
    for layer in LAYERS:
        assert torch.equal(r0["mom2"][layer], r1["mom2"][layer]) and r0["count"] == r1["count"]
        assert r0["count"][layer] == single["full"][layer].count
        torch.testing.assert_close(r0["mom2"][layer], single["full"][layer].mom2, rtol=1e-5, atol=1e-6)


def test_a_token_budget_reads_what_one_process_reads_in_batches_of_all_ranks(ranks, single):
    r0, r1, _ = ranks
    total = single["full"][LAYERS[0]].count
    for layer in LAYERS:
        count = r0["budget_count"][layer]
        assert count == r1["budget_count"][layer] == single["budget"][layer].count
        assert BUDGET <= count < total  # the budget stopped the pass
        assert torch.equal(r0["budget_mom2"][layer], r1["budget_mom2"][layer])
        torch.testing.assert_close(r0["budget_mom2"][layer], single["budget"][layer].mom2, rtol=1e-5, atol=1e-6)


def test_rank_0_alone_writes_the_cache_and_every_rank_reads_it(ranks):
    r0, r1, out = ranks
    assert sorted(r0["saved"]) == LAYERS and r1["saved"] == []
    assert len(list((out / "cache").glob("mom2_layer*.safetensors"))) == len(LAYERS)
    assert r0["cached_equal"] and r1["cached_equal"]


def test_every_rank_holds_the_pack_of_one_process(ranks, single):
    r0, r1, _ = ranks
    want = single["pack"]
    assert r0["pack_id"] == r1["pack_id"]  # the very same tensors on both ranks
    assert r0["z_nll"] == r1["z_nll"]
    torch.testing.assert_close(torch.tensor(r0["z_nll"]), torch.tensor(want.report["z_nll"]), rtol=1e-3, atol=1e-4)
    assert sorted(r0["deltas"]) == sorted(want.deltas)
    for name, (B, A) in r0["deltas"].items():
        assert torch.equal(B, r1["deltas"][name][0]) and torch.equal(A, r1["deltas"][name][1])
        expected = want.deltas[name].weight_delta()  # float32 solves of slightly different z: compare the whole update
        assert float((B @ A - expected).norm()) <= 1e-2 * float(expected.norm()), name  # another pack: O(1)


def test_a_rank_without_a_subject_still_gets_every_target(ranks, single):
    r0, r1, _ = ranks
    assert torch.equal(r0["one_z"], r1["one_z"]) and torch.equal(r0["one_nll"], r1["one_nll"])
    torch.testing.assert_close(r0["one_z"], single["one_z"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r0["one_nll"], single["one_nll"], rtol=1e-3, atol=1e-4)


FIELDS = dict(layers=LAYERS, mom2_update_weight=10.0, context_templates=["{}", "the man said . {}"],
              clamp_norm_factor=4.0, v_weight_decay=1e-3, v_num_grad_steps=5, mom2_n_samples=40)


def test_edit_command_under_torchrun_saves_one_pack_equal_to_one_process(tmp_path):
    write_edit_inputs(tmp_path, _requests(), FIELDS)
    output = _torchrun("-m", "memit_adapter.cli", "edit", "--model", str(tmp_path / "m"), "--requests",
                       str(tmp_path / "edits.jsonl"), "--corpus", str(tmp_path / "corpus.txt"), "--config",
                       str(tmp_path / "cfg.json"), "--stats-cache", str(tmp_path / "cache"), "--quiet", "--out",
                       str(tmp_path / "pack"))
    assert output.count("Editing 6 facts") == 1 and output.count("rewrite prompts now give") == 1
    assert output.count(f"Saved to {tmp_path / 'pack'}") == 1
    assert len(list((tmp_path / "cache").glob("mom2_layer*.safetensors"))) == len(LAYERS)
    saved = EditPack.from_pretrained(str(tmp_path / "pack"))
    model, tok = model_and_tokenizer("gpt2")  # the model write_edit_inputs saved (seeded)
    cfg = MemitConfig.for_model(model, **FIELDS)
    want = compute_edits(model, tok, _requests(), cfg, corpus=str(tmp_path / "corpus.txt"), progress=False)
    assert saved.requests == want.requests and saved.config == want.config
    for name, delta in want.deltas.items():
        torch.testing.assert_close(saved.deltas[name].weight_delta(), delta.weight_delta(), rtol=1e-3, atol=1e-5)


def test_stats_command_under_torchrun_caches_the_statistics_of_one_process(tmp_path, monkeypatch):
    from memit_adapter import stats as stats_module

    model, tok = model_and_tokenizer("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("\n".join(_texts()) + "\n")
    output = _torchrun("-m", "memit_adapter.cli", "stats", "--model", str(tmp_path / "m"), "--corpus",
                       str(tmp_path / "corpus.txt"), "--cache", str(tmp_path / "cache"), "--layers", "1-2", "--quiet")
    assert output.count("second moments of layers [1, 2]") == 1
    model, tok, _ = load_model(str(tmp_path / "m"))  # as the command did: the cache key names the folder
    cfg = MemitConfig.for_model(model, layers=LAYERS)
    kwargs = dict(max_length=cfg.mom2_max_length, max_tokens=cfg.mom2_max_tokens, batch_size=cfg.stats_batch_size,
                  dtype=cfg.mom2_dtype, seed=cfg.seed, progress=False)
    want = collect_stats(model, tok, str(tmp_path / "corpus.txt"), LAYERS, **kwargs)
    assert want[1].count < cfg.mom2_max_tokens  # no budget reached: the same texts as one process
    monkeypatch.setattr(stats_module, "_accumulate", lambda *a, **k: pytest.fail("the entry was not cached"))
    cached = collect_stats(model, tok, str(tmp_path / "corpus.txt"), LAYERS, cache=tmp_path / "cache", **kwargs)
    for layer in LAYERS:
        assert cached[layer].count == want[layer].count
        torch.testing.assert_close(cached[layer].mom2, want[layer].mom2, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
