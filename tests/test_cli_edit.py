"""``memit-adapter edit``: requests files of every format, the pack it saves, its checks before any work."""

import csv
import json

import pytest
import torch
from engine_setup import model_and_tokenizer, requests, write_edit_inputs

from memit_adapter import EditRequest, MemitConfig, compute_edits
from memit_adapter.cli import main
from memit_adapter.errors import ConflictingRequestsError, InvalidRequestError
from memit_adapter.pack import EditPack
from memit_adapter.requests import load_requests

FIELDS = dict(layers=[1, 2], mom2_update_weight=10.0, context_templates=["{}", "the man said . {}"],
              clamp_norm_factor=4.0, v_weight_decay=1e-3, v_num_grad_steps=5, mom2_n_samples=40)


@pytest.fixture
def setup(tmp_path):
    write_edit_inputs(tmp_path, requests(), FIELDS)
    return tmp_path


def _edit(tmp_path, *extra):
    return main(["edit", "--model", str(tmp_path / "m"), "--requests", str(tmp_path / "edits.jsonl"),
                 "--corpus", str(tmp_path / "corpus.txt"), "--config", str(tmp_path / "cfg.json"), "--quiet",
                 "--out", str(tmp_path / "pack"), *extra])


def test_edit_saves_the_pack_the_library_computes_and_summarises_it(setup, capsys):
    assert _edit(setup) == 0
    out = capsys.readouterr().out
    saved = EditPack.from_pretrained(str(setup / "pack"))
    model, tok = model_and_tokenizer("gpt2")
    cfg = MemitConfig.for_model(model, **FIELDS)  # the model's defaults, then the --config file
    want = compute_edits(model, tok, requests(), cfg, corpus=str(setup / "corpus.txt"), progress=False)
    assert saved.requests == want.requests and saved.config == want.config
    for name, delta in want.deltas.items():
        torch.testing.assert_close(saved.deltas[name].weight_delta(), delta.weight_delta(), rtol=1e-4, atol=1e-6)
    assert "of 5 rewrite prompts now give the new target greedily" in out
    assert "Time: load" in out and "targets" in out and f"Saved to {setup / 'pack'}" in out
    assert "5 requests ended their target optimisation below even odds" in out  # 5 steps are too few here
    moved = [r for r in saved.requests if r.subject_token != -1]  # for_model's edit_token "reach" chose them
    assert all(r.subject_token is not None for r in saved.requests)
    assert (f"{len(moved)} requests are edited at a subject token before the last" in out) == bool(moved)


def test_edit_on_top_of_a_chain_computes_the_librarys_joint_pack(setup, capsys):
    from memit_adapter import EditRequest

    assert _edit(setup) == 0
    more = [EditRequest("the sport played by {}", "gamma delta", " rome"),
            EditRequest("the sport played by {}", "michael jordan", " golf")]  # rewrites a fact of the first pack
    (setup / "more.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in more))
    args = ["edit", "--model", str(setup / "m"), "--requests", str(setup / "more.jsonl"), "--corpus",
            str(setup / "corpus.txt"), "--quiet", "--on-top-of", str(setup / "pack"), "--out", str(setup / "p2")]
    assert main(args + ["--joint"]) == 0
    assert "of 2 rewrite prompts now give the new target greedily" in capsys.readouterr().out
    first, second = (EditPack.from_pretrained(str(setup / p)) for p in ("pack", "p2"))
    assert second.parents == [first.pack_id] and second.config == first.config  # the chain's config
    model, tok = model_and_tokenizer("gpt2")
    want = compute_edits(model, tok, more, first.config, corpus=str(setup / "corpus.txt"), on_top_of=[first],
                         joint=True, progress=False)
    for name, delta in want.deltas.items():
        torch.testing.assert_close(second.deltas[name].weight_delta(), delta.weight_delta(), rtol=1e-4, atol=1e-6)
    assert main(args[:-2] + ["--out", str(setup / "p3"), "--method", "rome"]) == 1  # one line, not a traceback
    assert "--on-top-of/--joint compute MEMIT packs" in capsys.readouterr().err


def test_a_joint_edit_on_a_pack_made_with_repair_rounds_inherits_its_config_without_them(setup, capsys):
    (setup / "cfg.json").write_text(json.dumps({**FIELDS, "repair_rounds": 1}))
    assert _edit(setup) == 0
    assert EditPack.from_pretrained(str(setup / "pack")).config.repair_rounds == 1
    assert main(["inspect", str(setup / "pack")]) == 0
    assert "repair_rounds" in capsys.readouterr().out
    args = ["edit", "--model", str(setup / "m"), "--requests", str(setup / "edits.jsonl"), "--corpus",
            str(setup / "corpus.txt"), "--quiet", "--on-top-of", str(setup / "pack"), "--out", str(setup / "p2")]
    assert main(args + ["--joint"]) == 0  # a joint pack is one solve: the chain's config less its repair rounds
    second = EditPack.from_pretrained(str(setup / "p2"))
    assert second.config == EditPack.from_pretrained(str(setup / "pack")).config.replace(repair_rounds=0)


def test_layers_flag_overrides_the_config(setup):
    assert _edit(setup, "--layers", "2") == 0
    assert list(EditPack.from_pretrained(str(setup / "pack")).config.layers) == [2]


def test_requests_files_of_every_format_read_the_same(tmp_path):
    reqs = [r for r in requests()]
    reqs[1] = EditRequest(reqs[1].prompt, reqs[1].subject, reqs[1].target_new, subject_token=-2)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    counterfact = [{"case_id": i, "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
                                                        "target_new": {"str": r.target_new},
                                                        "subject_token": r.subject_token}}
                   for i, r in enumerate(reqs)]
    (tmp_path / "b.json").write_text(json.dumps(counterfact))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "subject", "target_new", "subject_token"])
        writer.writeheader()
        writer.writerows({"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                          "subject_token": "" if r.subject_token is None else r.subject_token} for r in reqs)
    a, b, c = (load_requests(tmp_path / n) for n in ("a.jsonl", "b.json", "c.csv"))
    assert a == reqs and reqs[1].subject_token == -2
    assert [(r.prompt, r.subject, r.target_new, r.subject_token) for r in b] == [
        (r.prompt, r.subject, r.target_new, r.subject_token) for r in reqs]
    assert [r.case_id for r in b] == list(range(5)) and c == reqs
    (tmp_path / "d.csv").write_text("prompt,subject,target_new,subject_token\n{} plays,x,y,last\n")
    with pytest.raises(InvalidRequestError, match="d.csv, line 2: subject_token"):
        load_requests(tmp_path / "d.csv")


@pytest.mark.parametrize("content, error, where", [
    ('{"prompt": "{} plays", "subject": "x", "target_new": " a"}\n{"prompt": "{} plays", "subject": "x", '
     '"target_new": " b"}\n', ConflictingRequestsError, "conflicting"),
    ('{"prompt": "{} plays", "subject": "x", "target_new": " a"}\n{"prompt": "plays", "subject": "x", '
     '"target_new": " b"}\n', InvalidRequestError, "line 2"),
    ('{"prompt": "{} plays", "subject": "x", "target_new": " a"}\nnot json\n', InvalidRequestError, "line 2"),
])
def test_bad_requests_are_refused_before_the_model_is_loaded(setup, monkeypatch, capsys, content, error, where):
    from memit_adapter import edit

    (setup / "edits.jsonl").write_text(content)
    with pytest.raises(error, match=where):
        load_requests(setup / "edits.jsonl")
    monkeypatch.setattr(edit, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    assert _edit(setup) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memit-adapter edit: error:") and where in err[0]
    assert not (setup / "pack").exists()


def test_a_folder_of_someone_elses_files_is_refused_before_the_work(setup, monkeypatch, capsys):
    from memit_adapter import edit

    (setup / "pack").mkdir()
    (setup / "pack" / "README.md").write_text("mine")
    monkeypatch.setattr(edit, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    assert _edit(setup) == 1
    assert "OverwriteError" in capsys.readouterr().err
    assert (setup / "pack" / "README.md").read_text() == "mine"


def test_bad_config_fields_are_refused_before_the_work(setup, capsys):
    (setup / "cfg.json").write_text(json.dumps({"v_num_grad_steps": 2.5}))
    assert _edit(setup) == 1 and "v_num_grad_steps must be an int" in capsys.readouterr().err
    assert _edit(setup, "--layers", "a-b") == 1 and "--layers takes" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("memit-adapter 0.")


def test_inspect_describes_the_saved_pack(setup, capsys):
    assert _edit(setup) == 0
    capsys.readouterr()
    pack = EditPack.from_pretrained(str(setup / "pack"))
    assert main(["inspect", str(setup / "pack"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pack_id"] == pack.pack_id and info["n_edits"] == 5 and info["fingerprint"] == pack.fingerprint
    assert set(info["modules"]) == set(pack.deltas)
    for name, m in info["modules"].items():
        assert m["rank"] == pack.deltas[name].rank and m["bytes"] == pack.deltas[name].nbytes
    assert main(["inspect", str(setup / "pack")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"pack {pack.pack_id}: 5 edits") and "transformer.h.2.mlp.c_proj" in text
    assert info["chain_targets"] == 5 and "target vectors: 5, of its chain's requests" in text
    assert repr(requests()[0].text) in text


def test_merge_writes_a_model_that_loads_without_the_library(setup, capsys):
    from transformers import AutoModelForCausalLM

    assert _edit(setup) == 0
    out = setup / "merged"
    assert main(["merge", "--model", str(setup / "m"), "--packs", str(setup / "pack"), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tok = model_and_tokenizer("gpt2")
    ids = tok([r.text for r in requests()], return_tensors="pt", padding=True)["input_ids"]
    with EditPack.from_pretrained(str(setup / "pack")).applied(model), torch.no_grad():
        want = model(ids).logits
    with torch.no_grad():
        got = merged(ids).logits
        before = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, before)
    with pytest.raises(SystemExit, match="not an empty folder"):
        main(["merge", "--model", str(setup / "m"), "--packs", str(setup / "pack"), "--out", str(out)])


def test_eval_of_a_pack_on_its_own_requests_writes_its_card(setup, capsys):
    from memit_adapter.evaluation import evaluate_pack

    with open(setup / "edits.jsonl", "w") as f:
        for r in requests():
            f.write(json.dumps({**r.to_dict(), "target_true": " basketball"}) + "\n")
    assert _edit(setup) == 0
    out = setup / "res.json"
    assert main(["eval", "--model", str(setup / "m"), "--pack", str(setup / "pack"), "--no-generation",
                 "--write-card", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())["results"]
    pack = EditPack.from_pretrained(str(setup / "pack"))
    model, tok = model_and_tokenizer("gpt2")
    records = [{"requested_rewrite": {"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new},
                                      "target_true": {"str": r.target_true}}} for r in pack.requests]
    want = evaluate_pack(model, tok, records, pack, generation=False)
    assert saved["post"]["efficacy_score"] == want["post"].efficacy_score and saved["pre"]["n_records"] == 5
    assert pack.metrics["efficacy_score"] == want["post"].efficacy_score  # in the card and the sidecar
    assert "efficacy_score" in (setup / "pack" / "README.md").read_text()


def test_eval_of_a_pack_without_true_targets_says_what_to_give(setup):
    assert _edit(setup) == 0
    with pytest.raises(SystemExit, match="target_true.*--data"):
        main(["eval", "--model", str(setup / "m"), "--pack", str(setup / "pack"), "--out", str(setup / "r.json")])


def test_stats_fills_a_cache_that_edit_then_reads_without_a_corpus(setup, capsys, monkeypatch):
    from memit_adapter import stats as stats_module

    cache = setup / "cache"
    assert main(["stats", "--model", str(setup / "m"), "--corpus", str(setup / "corpus.txt"), "--cache", str(cache),
                 "--layers", "1-2", "--quiet"]) == 0
    assert "second moments of layers [1, 2]" in capsys.readouterr().out
    assert len(list(cache.glob("mom2_layer*.safetensors"))) == 2
    monkeypatch.setattr(stats_module, "_accumulate", lambda *a, **k: pytest.fail("recomputed cached statistics"))
    assert main(["edit", "--model", str(setup / "m"), "--requests", str(setup / "edits.jsonl"), "--stats-cache",
                 str(cache), "--config", str(setup / "cfg.json"), "--quiet", "--out", str(setup / "pack")]) == 0


def test_stats_from_a_dataset_with_another_text_column(setup, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    texts = (setup / "corpus.txt").read_text().splitlines()
    calls = []

    def fake_load(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        ds = datasets.Dataset.from_dict({"content": texts})
        return ds.to_iterable_dataset() if streaming else ds
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert main(["stats", "--model", str(setup / "m"), "--corpus", "wiki", "20220301.en", "--streaming",
                 "--text-column", "content", "--cache", str(setup / "c"), "--layers", "1", "--quiet"]) == 0
    assert calls == [("wiki", "20220301.en", "train", True)]
    assert len(list((setup / "c").glob("mom2_layer1_*.safetensors"))) == 1


def test_compress_command_matches_the_library(setup, capsys):
    assert _edit(setup) == 0
    pack = EditPack.from_pretrained(str(setup / "pack"))
    want = pack.compress(2)
    assert main(["compress", str(setup / "pack"), "--rank", "2", "--out", str(setup / "small")]) == 0
    assert f"relative error {want:.2e}" in capsys.readouterr().out
    small = EditPack.from_pretrained(str(setup / "small"))
    assert all(d.rank <= 2 for d in small.deltas.values()) and small == pack
    assert EditPack.from_pretrained(str(setup / "pack")) != small  # the original is kept with --out


def test_a_folder_loaded_base_fails_fast_in_auto_loaders_and_base_model_records_an_id(setup):
    from peft import AutoPeftModelForCausalLM, PeftModel

    from memit_adapter.persistence import UNRECORDED_BASE

    assert _edit(setup) == 0  # --model is a local folder: no Hub id to record
    config = json.loads((setup / "pack" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == UNRECORDED_BASE
    assert EditPack.from_pretrained(str(setup / "pack")).base_model is None
    with pytest.raises(OSError, match="base model not recorded"):  # at once, not retries of huggingface.co/None
        AutoPeftModelForCausalLM.from_pretrained(str(setup / "pack"))
    model, _ = model_and_tokenizer("gpt2")
    PeftModel.from_pretrained(model, str(setup / "pack"))  # the loaders that take the base still work

    assert _edit(setup, "--base-model", "openai-community/gpt2", "--overwrite") == 0
    config = json.loads((setup / "pack" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "openai-community/gpt2"
    assert "base_model: openai-community/gpt2" in (setup / "pack" / "README.md").read_text()
    assert EditPack.from_pretrained(str(setup / "pack")).base_model == "openai-community/gpt2"


def test_the_summary_names_the_requests_edited_before_their_subjects_last_token():
    from types import SimpleNamespace

    from memit_adapter.edit import summary

    reqs = [EditRequest("{} plays", "michael jordan", " golf", subject_token=-2),
            EditRequest("{} plays", "lebron james", " golf", subject_token=-1)]
    report = {"z_nll": [0.0, 0.0], "unconverged": [], "off_last_token": [0], "seconds": {}}
    out = summary(SimpleNamespace(requests=reqs, report=report, deltas={}, nbytes=0), [True, True], 0.0)
    assert "1 requests are edited at a subject token before the last" in out
    assert "token -2 of 'michael jordan': 'michael jordan plays'" in out and "lebron" not in out
    assert "before the last" not in summary(SimpleNamespace(requests=reqs, report={**report, "off_last_token": []},
                                                            deltas={}, nbytes=0), [True, True], 0.0)
