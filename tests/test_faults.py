"""Faults and bad inputs on the pack side (issue 15): each case asserts the error type, the model bit-identical
(parameters, train/eval and requires_grad flags) and the files on disk as they were.

Principles: merge/unmerge is a transaction; a pack folder changes atomically as a whole; a user's own files are
never overwritten without ``overwrite=True``; non-finite tensors never enter a pack; a statistics cache can fail
without losing the work.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from engine_setup import corpus, model_and_tokenizer
from pack_utils import random_pack, same_weights, weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import tiny_model

from memit_adapter import persistence, stats
from memit_adapter.apply import active_packs
from memit_adapter.errors import (
    FingerprintMismatchError,
    InvalidRequestError,
    OverwriteError,
    PackError,
    StatisticsError,
    WeightsChangedError,
)
from memit_adapter.pack import EditPack, LayerDelta
from memit_adapter.stats import StatsCache, collect_stats

ROOT = Path(__file__).resolve().parent.parent


# -- invariants -------------------------------------------------------------------------------------
def snapshot(model) -> tuple:
    """Parameters and buffers (bits), every module's train/eval flag, every parameter's requires_grad."""
    return (weights(model), {n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_same_model(model, snap: tuple) -> None:
    params, training, grads = snapshot(model)
    assert same_weights(params, snap[0]), "weights changed"
    assert training == snap[1], "train/eval flags changed"
    assert grads == snap[2], "requires_grad flags changed"


def disk(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry under ``folder`` (hidden ones too): contents and mode."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mode)
            for p in sorted(folder.rglob("*"))}


def mixed_flags_model(arch: str = "gpt2", **kw):
    """A model whose submodules do not all share one train flag, with a frozen parameter."""
    model = tiny_model(arch, **kw)
    model.get_submodule("transformer.h.1" if arch == "gpt2" else "model.layers.1").train()
    next(model.parameters()).requires_grad_(False)
    return model


# -- 1. merge/unmerge is a transaction --------------------------------------------------------------
@pytest.mark.parametrize("path, rel", [("index", 0.05), ("full", 10.0)])
def test_unmerge_refuses_weights_changed_since_the_merge(path, rel):
    model = mixed_flags_model()
    base = snapshot(model)
    pack = random_pack(model, layers=(1, 2), rel=rel)
    report = pack.merge(model)
    assert (report.restore_fraction == 1.0) == (path == "full")  # the restore record is a copy, or an index
    name = "transformer.h.2.mlp.c_proj"  # the second module: the first must not be restored before the check
    with torch.no_grad():
        model.get_submodule(name).weight[3, 5] += 1.0
    changed = snapshot(model)
    for _ in range(2):  # a retry says the same, not "not merged"
        with pytest.raises(WeightsChangedError, match=r"transformer\.h\.2\.mlp\.c_proj \(1 of 128 stored rows, "
                                                      r"first \[3\]\).*force=True"):
            pack.unmerge(model)
        assert_same_model(model, changed)
        assert active_packs(model) == [pack]
    with pytest.warns(UserWarning, match=r"overwrote weights changed after the merge \(transformer\.h\.2\.mlp"):
        pack.unmerge(model, force=True)
    assert active_packs(model) == []
    restored = weights(model)
    key = name + ".weight"
    if path == "full":  # a copy of the original: exactly the base, the outside change discarded
        assert_same_model(model, base)
    else:  # every element nobody touched is back bit for bit; the touched one is (current - delta) or the base
        keep = torch.ones_like(restored[key], dtype=torch.bool)
        keep[3, 5] = False
        assert torch.equal(restored[key][keep], base[0][key][keep])
        assert same_weights({k: v for k, v in restored.items() if k != key},
                            {k: v for k, v in base[0].items() if k != key})
        assert snapshot(model)[1:] == base[1:]


def test_unmerge_of_a_pack_under_a_chain_of_later_merges():
    model = mixed_flags_model()
    base = snapshot(model)
    a = random_pack(model, layers=(1, 2), seed=1)
    b = random_pack(model, layers=(2, 3), seed=2, offset=5)
    c = random_pack(model, layers=(3,), seed=3, offset=9)  # shares a module with b only: still taken off and put back
    for p in (a, b, c):
        p.merge(model)
    with_bc = tiny_model("gpt2")
    for p in (b, c):
        p.merge(with_bc, force=True)
    a.unmerge(model)
    assert [p.pack_id for p in active_packs(model)] == [b.pack_id, c.pack_id]
    assert same_weights(weights(model), weights(with_bc))
    c.unmerge(model)
    b.unmerge(model)
    assert_same_model(model, base)


def test_unmerge_after_a_cast_is_refused_even_with_force():
    model = tiny_model("llama")
    pack = random_pack(model)
    pack.merge(model)
    model.to(torch.bfloat16)
    cast = snapshot(model)
    for force in (False, True):
        with pytest.raises(WeightsChangedError, match="now torch.bfloat16.*float32"):
            pack.unmerge(model, force=force)
        assert_same_model(model, cast)
    assert active_packs(model) == [pack]


def test_pack_on_the_base_is_refused_by_fingerprint_when_merged_weights_were_changed():
    model = tiny_model("gpt2")
    random_pack(model, seed=1).merge(model)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] += 1.0
    independent = random_pack(tiny_model("gpt2"), seed=2, offset=5)  # computed on the base
    before = snapshot(model)
    with pytest.raises(FingerprintMismatchError):  # not "device or library changed?"
        independent.merge(model)
    assert_same_model(model, before)


# -- 2. a pack folder changes atomically as a whole -------------------------------------------------
def test_new_folders_and_files_get_the_usual_permissions(tmp_path):
    model = tiny_model("gpt2")
    old = os.umask(0o022)
    try:
        random_pack(model).save_pretrained(tmp_path / "p")
        random_pack(model, seed=1).save_pretrained(tmp_path / "p")  # replaced: still readable by others
        (tmp_path / "private").mkdir(mode=0o700)
        random_pack(model).save_pretrained(tmp_path / "private")  # a folder's own mode is kept
    finally:
        os.umask(old)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "p").iterdir()} == dict.fromkeys(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "edit_pack.json", "requests.jsonl"], 0o644)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()} == {0o600}


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    model = tiny_model("gpt2")
    dead = tmp_path / ".p.memit-tmp-0123abcd"  # a save killed while writing
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    busy = tmp_path / ".q.memit-tmp-4567ef01"  # a save in progress in another process holds its lock
    busy.mkdir()
    lock = persistence._lock(busy, block=True)
    try:
        random_pack(model).save_pretrained(tmp_path / "other")
    finally:
        persistence._unlock(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.memit-tmp-4567ef01", "other"]


def test_folders_are_swapped_by_renames_where_they_cannot_be_exchanged(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    random_pack(model, seed=1).save_pretrained(tmp_path / "p")
    monkeypatch.setattr(persistence, "_exchange", lambda a, b: False)  # NFS, macOS, Windows
    new = random_pack(model, seed=2)
    new.save_pretrained(tmp_path / "p")
    assert EditPack.from_pretrained(str(tmp_path / "p")) == new
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


@pytest.mark.parametrize("why", ["mount_point", "working_directory"])
def test_a_folder_that_cannot_be_swapped_has_its_files_replaced_with_a_warning(tmp_path, monkeypatch, why):
    model = tiny_model("gpt2")
    folder = tmp_path / "p"
    random_pack(model, seed=1).save_pretrained(folder, dense_file=True)
    (folder / "notes.txt").write_text("mine")
    if why == "mount_point":
        real = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == folder or real(p))
    else:
        monkeypatch.chdir(folder)
    new = random_pack(model, seed=2)
    with pytest.raises(OverwriteError):
        new.save_pretrained(folder)
    with pytest.warns(UserWarning, match="cannot be replaced as a whole"):
        new.save_pretrained(folder, overwrite=True)
    assert EditPack.from_pretrained(str(folder)) == new
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors", "edit_pack.json", "notes.txt",
                                                         "requests.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


# Saves the pack in argv[2] to argv[3] and SIGKILLs itself at the point argv[1].
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from memit_adapter import persistence
    point, src, dst = sys.argv[1:4]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point.startswith("file"):  # after the k-th file of the new folder is complete
        real_fsync, n = persistence._fsync, [0]
        def fsync(path):
            real_fsync(path)
            n[0] += path.is_file()
            if n[0] == int(point[4:]):
                die()
        persistence._fsync = fsync
    elif point.endswith("swap"):
        real_swap = persistence._swap_in
        def swap(new, target):
            if point == "before_swap":
                die()
            real_swap(new, target)
            die()  # the old folder not deleted yet
        persistence._swap_in = swap
    else:  # between the two renames of the fallback swap
        persistence._exchange = lambda a, b: False
        real_rename = os.rename
        def rename(a, b):
            real_rename(a, b)
            die()
        os.rename = rename
    persistence.save_pack(persistence.load_pack_dir(src), dst)
    print("not killed")
""")
KILL_POINTS = ("file1", "file2", "file5", "before_swap", "after_swap", "between_renames")


def pack_files(folder: Path) -> dict:
    """A folder's files as comparable values: safetensors by tensors and metadata (their header order varies
    from save to save), the sidecar less its hashes, after checking that they hash the files beside it."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                out[p.name] = (f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()})
        elif p.name == "edit_pack.json":
            meta = json.loads(p.read_text())
            hashes = meta.pop("files")
            assert meta.pop("weights_sha256") == hashes[meta["weights_file"]]
            assert all(persistence._sha256(folder / n) == h for n, h in hashes.items()), "sidecar of another save"
            out[p.name] = meta
        else:
            out[p.name] = p.read_bytes()
        out[p.name] = (out[p.name], p.stat().st_mode)
    return out


def test_a_save_killed_anywhere_leaves_the_old_or_the_new_pack(tmp_path):
    from peft import PeftModel

    model = tiny_model("gpt2")
    old, new = random_pack(model, seed=1), random_pack(model, seed=2, rank=3)
    old.save_pretrained(tmp_path / "ref" / "old")
    new.save_pretrained(tmp_path / "ref" / "new")
    refs = {"old": pack_files(tmp_path / "ref" / "old"), "new": pack_files(tmp_path / "ref" / "new")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    children = {}
    for point in KILL_POINTS:
        old.save_pretrained(tmp_path / point / "p")
        children[point] = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, point, str(tmp_path / "ref" / "new"),
                                            str(tmp_path / point / "p")], env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
    for point, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == -signal.SIGKILL, (point, out, err)
        folder = tmp_path / point / "p"
        if point == "between_renames":  # the folder is missing until the next save into the parent rolls back
            assert not folder.exists()
            random_pack(model, seed=3).save_pretrained(tmp_path / point / "another")
        which = next((k for k, ref in refs.items() if pack_files(folder) == ref), None)
        assert which is not None, f"killed at {point}: the folder is a mixture: {sorted(disk(folder))}"
        assert which == ("new" if point == "after_swap" else "old"), point
        pack = {"old": old, "new": new}[which]
        assert EditPack.from_pretrained(str(folder)) == pack
        peft_model = PeftModel.from_pretrained(tiny_model("gpt2"), str(folder))  # stock PEFT reads the same pack
        for name, d in pack.deltas.items():
            lora = peft_model.get_submodule("base_model.model." + name)
            torch.testing.assert_close(lora.lora_B["default"].weight @ lora.lora_A["default"].weight,
                                       d.weight_delta(), rtol=0, atol=1e-7)
        random_pack(model, seed=4).save_pretrained(tmp_path / point / "another")  # cleans what the kill left
        assert sorted(p.name for p in (tmp_path / point).iterdir()) == ["another", "p"], point


# -- 3. a user's own files are never overwritten without overwrite=True -----------------------------
def _checkpoint(folder: Path) -> None:
    tiny_model("gpt2").save_pretrained(folder)


def _own_readme(folder: Path) -> None:
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")


def _other_file(folder: Path) -> None:
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n1,2\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.txt").write_text("x")


def _plain_peft_adapter(folder: Path) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))


def _edited_card(folder: Path) -> None:
    random_pack(tiny_model("gpt2"), seed=7).save_pretrained(folder)
    with open(folder / "README.md", "a") as f:
        f.write("\nMy own notes on this pack.\n")


FOREIGN = {"model_checkpoint": _checkpoint, "own_readme": _own_readme, "other_files": _other_file,
           "plain_peft_adapter": _plain_peft_adapter, "pack_with_edited_card": _edited_card}


@pytest.mark.parametrize("kind", FOREIGN)
def test_saving_over_someone_elses_files_is_refused_unless_asked(tmp_path, kind):
    folder = tmp_path / "target"
    FOREIGN[kind](folder)
    before = disk(tmp_path)
    pack = random_pack(tiny_model("gpt2"))
    with pytest.raises(OverwriteError, match="overwrite=True"):
        pack.save_pretrained(folder)
    assert disk(tmp_path) == before
    pack.save_pretrained(folder, overwrite=True)
    assert EditPack.from_pretrained(str(folder)) == pack
    after = disk(folder)
    kept = {k: v for k, v in before.items() if k.startswith("target/")}
    for rel, (data, _) in kept.items():  # the other files are kept, byte for byte; the pack's names are replaced
        name = rel.removeprefix("target/")
        if name.split("/")[0] not in persistence.PACK_FILES:
            assert after[name][0] == data, name
    assert "My own notes" not in (folder / "README.md").read_text()


def test_saving_over_a_pack_of_ours_replaces_it(tmp_path):
    model = tiny_model("gpt2")
    random_pack(model, seed=1).save_pretrained(tmp_path / "p", dense_file=True)
    new = random_pack(model, seed=2)
    new.save_pretrained(tmp_path / "p")  # the normal update flow: no option needed
    assert EditPack.from_pretrained(str(tmp_path / "p")) == new
    assert not (tmp_path / "p" / "edit_deltas.safetensors").exists()


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "p").write_text("not a folder")
    before = disk(tmp_path)
    with pytest.raises(PackError, match="not a directory"):
        random_pack(tiny_model("gpt2")).save_pretrained(tmp_path / "p")
    assert disk(tmp_path) == before


# -- 4. non-finite tensors never enter a pack -------------------------------------------------------
def _poisoned(model) -> EditPack:
    pack = random_pack(model, layers=(1, 2))
    pack.deltas["transformer.h.2.mlp.c_proj"].A[0, 3] = float("nan")  # changed in place after construction
    return pack


@pytest.mark.parametrize("action", ["attach", "applied", "merge", "save_pretrained", "compress", "stack"])
def test_a_pack_with_nan_is_refused_everywhere(tmp_path, action):
    model = mixed_flags_model()
    pack = _poisoned(model)
    random_pack(model, seed=5).save_pretrained(tmp_path / "p")
    before, files = snapshot(model), disk(tmp_path)
    held = {n: (d.B.clone(), d.A.clone()) for n, d in pack.deltas.items()}
    run = {"attach": lambda: pack.attach(model), "applied": lambda: pack.applied(model).__enter__(),
           "merge": lambda: pack.merge(model), "save_pretrained": lambda: pack.save_pretrained(tmp_path / "p"),
           "compress": lambda: pack.compress(1), "stack": lambda: EditPack.stack([pack, random_pack(model, seed=6,
                                                                                              offset=5)])}[action]
    with pytest.raises(PackError, match=r"NaN/inf"):
        run()
    assert_same_model(model, before)
    assert active_packs(model) == []
    assert disk(tmp_path) == files
    assert same_weights({f"{n}.{x}": t for n, d in pack.deltas.items() for x, t in zip("BA", (d.B, d.A))},
                        {f"{n}.{x}": t for n, bd in held.items() for x, t in zip("BA", bd)})  # the pack too


def test_a_non_finite_delta_cannot_be_made():
    with pytest.raises(PackError, match="1 NaN/inf"):
        LayerDelta(B=torch.ones(4, 1), A=torch.tensor([[1.0, float("inf"), 0.0]]))
    big = LayerDelta(dense=torch.full((2, 2), 1e6))
    with pytest.raises(PackError, match="NaN/inf"):  # overflows in the cast
        big.to(torch.float16)


def test_a_saved_pack_with_nan_is_refused_on_load(tmp_path):
    model = mixed_flags_model()
    random_pack(model).save_pretrained(tmp_path / "p")
    weights_file = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(weights_file))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    meta = json.loads((tmp_path / "p" / "edit_pack.json").read_text())  # a consistent but poisoned pack
    meta["weights_sha256"] = persistence._sha256(weights_file)
    (tmp_path / "p" / "edit_pack.json").write_text(json.dumps(meta))
    before, files = snapshot(model), disk(tmp_path)
    with pytest.raises(PackError, match=f"{key}.*1 NaN/inf"):
        EditPack.from_pretrained(str(tmp_path / "p"))
    assert_same_model(model, before)
    assert disk(tmp_path) == files


def test_compress_whose_svd_fails_is_a_pack_error_with_nothing_changed(monkeypatch):
    pack = random_pack(tiny_model("gpt2"), layers=(0, 1, 2), rank=3)
    held = {n: (d.B.clone(), d.A.clone()) for n, d in pack.deltas.items()}
    real, calls = torch.linalg.svd, []

    def svd(*args, **kwargs):  # the second module's SVD does not converge
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    with pytest.raises(PackError, match="transformer.h.1.mlp.c_proj.*did not converge.*nothing was changed"):
        pack.compress(1)
    assert all(torch.equal(d.B, held[n][0]) and torch.equal(d.A, held[n][1]) for n, d in pack.deltas.items())


# -- 5. a statistics cache can fail without losing the work -----------------------------------------
def _cache_in_the_way(tmp_path, monkeypatch) -> Path:
    (tmp_path / "cache").write_text("a file, not a folder")
    return tmp_path / "cache"


def _read_only_cache(tmp_path, monkeypatch) -> Path:
    (tmp_path / "cache").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through mode bits: refuse the write the way the kernel would
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(stats, "open", refuse, raising=False)
    return tmp_path / "cache"


def _disk_full(tmp_path, monkeypatch) -> Path:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stats, "save_file", full)
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


@pytest.mark.parametrize("fault", [_cache_in_the_way, _read_only_cache, _disk_full], ids=lambda f: f.__name__[1:])
def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_pass(tmp_path, monkeypatch, fault):
    model, tok = model_and_tokenizer("gpt2")
    model.transformer.h[1].train()
    expected = collect_stats(model, tok, corpus(10), [1, 2], progress=False)
    cache = fault(tmp_path, monkeypatch)
    before, files = snapshot(model), disk(tmp_path)
    try:
        with pytest.warns(UserWarning, match="could not write the statistics cache.*computed and returned"):
            got = collect_stats(model, tok, corpus(10), [1, 2], cache=cache, progress=False)
        assert all(torch.equal(got[k].mom2, expected[k].mom2) for k in (1, 2))
        assert_same_model(model, before)
        assert disk(tmp_path) == files  # no partial entry, no temporary file
    finally:
        if cache.is_dir():
            cache.chmod(0o755)


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors", "no_key"])
def test_a_damaged_cache_entry_without_a_corpus_is_a_statistics_error(tmp_path, damage):
    model, tok = model_and_tokenizer("gpt2")
    collect_stats(model, tok, corpus(5), [1], cache=tmp_path, progress=False)
    (entry,) = tmp_path.iterdir()
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:60])
    elif damage == "not_safetensors":
        entry.write_text("hello")
    else:
        save_file({"mom2": torch.eye(32)}, str(entry), metadata={"count": "3"})
    before, files = snapshot(model), disk(tmp_path)
    for corpus_ in (None, corpus(5)):
        with pytest.raises(StatisticsError, match=f"{entry.name} is unreadable.*delete it"):
            collect_stats(model, tok, corpus_, [1], cache=StatsCache(tmp_path), progress=False)
        assert_same_model(model, before)
        assert disk(tmp_path) == files


def test_an_unreadable_cache_directory_is_a_miss_with_a_warning(tmp_path, monkeypatch):
    model, tok = model_and_tokenizer("gpt2")
    real = Path.is_file

    def denied(self):
        if self.parent == tmp_path / "cache":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", denied)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = collect_stats(model, tok, corpus(5), [1], cache=tmp_path / "cache", progress=False)
    assert got[1].count > 0
    assert any("could not read the statistics cache" in str(w.message) for w in caught)


# -- 6. models that cannot be worked on, and every flag restored -----------------------------------------
def _edit(model, tok, **kw):
    from engine_setup import config, requests

    from memit_adapter import compute_edits

    return compute_edits(model, tok, requests(), config(v_num_grad_steps=2), corpus=corpus(20), progress=False, **kw)


def test_a_model_on_the_meta_device_is_refused_before_any_work():
    from transformers import AutoModelForCausalLM

    from memit_adapter.errors import ModelError

    _, tok = model_and_tokenizer()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_model("gpt2").config)
    with pytest.raises(ModelError, match="meta device"):
        _edit(model, tok)
    with pytest.raises(ModelError, match="meta device"):
        collect_stats(model, tok, corpus(5), [1], progress=False)


@pytest.mark.parametrize("bad", [dict(layers="transformer.blocks"), dict(mlp_out="mlp.out_proj"),
                                 dict(embed="transformer.embed"), dict(layers="transformer.ln_f")])
def test_an_arch_spec_whose_paths_miss_the_model_is_named_before_any_work(bad):
    from dataclasses import replace

    from memit_adapter.arch import ARCHITECTURES
    from memit_adapter.errors import UnsupportedArchitectureError

    model, tok = model_and_tokenizer()
    snap = snapshot(model)
    spec = replace(ARCHITECTURES["gpt2"], **bad)
    with pytest.raises(UnsupportedArchitectureError, match="ArchSpec does not fit GPT2LMHeadModel") as info:
        _edit(model, tok, arch=spec)
    assert next(iter(bad.values())) in str(info.value)
    assert_same_model(model, snap)


def test_a_tokenizer_larger_than_the_embedding_is_refused():
    from memit_adapter.errors import ModelError

    _, tok = model_and_tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tok) - 5)
    snap = snapshot(model)
    with pytest.raises(ModelError, match=rf"{len(tok)} tokens but .* {len(tok) - 5} rows"):
        _edit(model, tok)
    assert_same_model(model, snap)


def _fail_in_targets(monkeypatch):
    from memit_adapter import engine

    def boom(*a, **k):
        raise RuntimeError("injected")
    monkeypatch.setattr(engine, "compute_targets", boom)


@pytest.mark.parametrize("work", ["edit", "edit fails midway", "statistics", "evaluation", "tracing"])
def test_every_module_flag_and_grad_flag_comes_back(work, monkeypatch):
    """A model whose submodules do not share one train flag, with a frozen weight, comes back exactly so."""
    from memit_adapter import evaluate_counterfact, trace_fact

    _, tok = model_and_tokenizer()
    model = mixed_flags_model()
    snap = snapshot(model)
    if work == "edit":
        _edit(model, tok)
    elif work == "edit fails midway":
        _fail_in_targets(monkeypatch)
        with pytest.raises(RuntimeError, match="injected"):
            _edit(model, tok)
    elif work == "statistics":
        collect_stats(model, tok, corpus(5), [1, 2], progress=False)
    elif work == "evaluation":
        record = {"requested_rewrite": {"prompt": "{} lives in", "subject": "toko yuki",
                                        "target_new": {"str": "rome"}, "target_true": {"str": "tokyo"}},
                  "paraphrase_prompts": ["toko yuki lives in"], "neighborhood_prompts": ["alpha beta lives in"]}
        evaluate_counterfact(model, tok, [record], generation=False)
    else:
        trace_fact(model, tok, "{} lives in", "toko yuki", samples=2)
    assert_same_model(model, snap)


# -- 7. the command line: one line per error the user can act on, checked before the work -------------
@pytest.fixture
def saved_model(tmp_path):
    model, tok = model_and_tokenizer("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _cli(argv, capsys) -> tuple[int, str]:
    from memit_adapter.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" not in err
    return rc, err.strip().splitlines()[-1]  # progress bars before it are fine


def test_cli_runtime_errors_are_one_line_not_a_traceback(saved_model, tmp_path, capsys):
    records = tmp_path / "r.json"
    records.write_text(json.dumps([{"requested_rewrite": {"prompt": "{} lives in", "subject": "toko yuki",
                                                          "target_new": {"str": "rome"},
                                                          "target_true": {"str": "tokyo"}}}]))
    rc, err = _cli(["eval", "--model", str(saved_model), "--data", str(records), "--pack", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "x.json")], capsys)
    assert rc == 1 and err.startswith("memit-adapter eval: error:") and "nope" in err
    rc, err = _cli(["trace", "--model", str(saved_model), "--prompt", "{} and {} live in", "--subject", "toko yuki",
                    "--samples", "2", "--out", str(tmp_path / "t"), "--quiet"], capsys)
    assert rc == 1 and err.startswith("memit-adapter trace: error:")
    rc, err = _cli(["demo", "--n-edits", "0", "--out", str(tmp_path / "d"), "--quiet"], capsys)
    assert rc == 1 and err.startswith("memit-adapter demo: error:")
    from memit_adapter.cli import main

    with pytest.raises(InvalidRequestError):  # -v: the traceback, for a bug report
        main(["-v", "trace", "--model", str(saved_model), "--prompt", "{} and {} live in", "--subject", "toko yuki",
              "--samples", "2", "--out", str(tmp_path / "t"), "--quiet"])


def test_cli_trace_refuses_a_bad_fact_or_path_before_making_anything(saved_model, tmp_path, capsys, monkeypatch):
    from memit_adapter import tracing

    out = tmp_path / "traces"
    rc, err = _cli(["trace", "--model", str(saved_model), "--prompt", "the sport of", "--subject", "toko yuki",
                    "--out", str(out), "--quiet"], capsys)
    assert rc == 1 and "the sport of" in err and not out.exists()  # subject not in the prompt: no empty folder
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    monkeypatch.setattr(tracing, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    with pytest.raises(SystemExit, match="is a file"):
        _cli(["trace", "--model", str(saved_model), "--prompt", "{} lives in", "--subject", "toko yuki",
              "--out", str(a_file)], capsys)
    assert a_file.read_text() == "mine"


def test_cli_bench_refuses_an_unwritable_json_path_before_the_work(tmp_path, monkeypatch):
    from memit_adapter import bench
    from memit_adapter.cli import main

    monkeypatch.setattr(bench, "run_benchmark", lambda **k: pytest.fail("ran the benchmark before the check"))
    with pytest.raises(SystemExit, match="cannot write"):
        main(["bench", "--json", str(tmp_path / "missing" / "b.json")])
