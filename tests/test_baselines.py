"""ROME and FT-W: the paper's baselines, as packs, against independent computations of what each must do."""

import copy

import pytest
import torch
from engine_setup import corpus, model_and_tokenizer, requests

from memit_adapter import ConfigError
from memit_adapter.arch import get_arch_spec
from memit_adapter.finetune import compute_ft_edits
from memit_adapter.method_configs import FtConfig, RomeConfig
from memit_adapter.pack import EditPack
from memit_adapter.rome import compute_rome_edits
from memit_adapter.stats import collect_stats
from memit_adapter.targets import compute_targets, context_templates

TEMPLATES = ["{}", "the man said . {}"]


def _rome_config(**kw) -> RomeConfig:
    base = dict(layer=2, v_num_grad_steps=30, context_templates=TEMPLATES, mom2_n_samples=200)
    return RomeConfig(**{**base, **kw})


def _key(model, spec, layer, template, subject):
    """The input of ``layer``'s output projection at the subject's last token, from a plain forward."""
    from memit_adapter.tokens import encode_fact

    fact = encode_fact(_key.tok, template, subject)
    seen = []
    handle = spec.mlp_out_module(model, layer).register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    try:
        with torch.no_grad():
            model(torch.tensor([fact.ids]))
    finally:
        handle.remove()
    return seen[0][fact.lookup].double()


@pytest.mark.parametrize("original_key", [False, True])
def test_a_rome_update_writes_its_value_at_its_key(original_key):
    model, tok = model_and_tokenizer("gpt2")
    _key.tok = tok
    spec = get_arch_spec(model)
    cfg = _rome_config(original_key=original_key)
    stats = collect_stats(model, tok, corpus(), [2], progress=False)
    req = requests()[0]
    pack = compute_rome_edits(model, tok, [req], cfg, stats=stats, progress=False)
    delta = pack.deltas[spec.mlp_out_name(2)].weight_delta().double()
    assert pack.config == cfg and pack.deltas[spec.mlp_out_name(2)].rank == 1
    # δ exactly as the target-vector optimisation gives it on the unedited model
    z, h = compute_targets(model, spec, tok, [req], context_templates(model, tok, cfg.z_config()), cfg.z_config(), 2,
                           batch_size=1, progress=False)
    dz = (z - h)[0].double()
    bare = _key(model, spec, 2, req.prompt, req.subject)
    star = 0.5 * (bare + _key(model, spec, 2, "the man said . " + req.prompt, req.subject))
    W = spec.mlp_out_module(model, 2).weight.detach().double().T  # Conv1D: (d_in, d_out) stored
    if original_key:
        torch.testing.assert_close(delta @ bare, dz, rtol=1e-4, atol=1e-5)  # ΔW k = δ
    else:
        torch.testing.assert_close((W + delta) @ star, W @ bare + dz, rtol=1e-4, atol=1e-5)  # (W+ΔW) k* = v*
    # the row space is C⁻¹k* (the update is the smallest in C's norm that does it)
    u = torch.linalg.solve(stats[2].mom2.double(), star)
    torch.testing.assert_close(delta[0] / delta[0].norm(), u / u.norm() * torch.sign(delta[0] @ u), rtol=1e-4,
                               atol=1e-6)


def test_rome_edits_one_after_the_other_and_the_targets_take():
    model, tok = model_and_tokenizer("gpt2")
    stats = collect_stats(model, tok, corpus(), [2], progress=False)
    reqs = requests()
    cfg = _rome_config(v_num_grad_steps=40)
    pack = compute_rome_edits(model, tok, reqs, cfg, stats=stats, progress=False)
    first = compute_rome_edits(model, tok, reqs[:1], cfg, stats=stats, progress=False)
    name = get_arch_spec(model).mlp_out_name(2)
    d, d1 = pack.deltas[name], first.deltas[name]
    assert d.rank == len(reqs) and set(pack.report["seconds"]) == {"statistics", "targets", "update"}
    torch.testing.assert_close(d.B[:, :1], d1.B)  # the first update does not depend on the later ones
    torch.testing.assert_close(d.A[:1], d1.A)
    # the second update is the one a single edit computes on the model whose weights hold the first
    first.merge(model)
    second = compute_rome_edits(model, tok, reqs[1:2], cfg, stats=stats, progress=False).deltas[name]
    first.unmerge(model)
    torch.testing.assert_close(d.B[:, 1:2], second.B, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(d.A[1:2], second.A, rtol=1e-3, atol=1e-5)
    targets = [tok.convert_tokens_to_ids(r.target_new.strip()) for r in reqs]
    with torch.no_grad():
        before = [model(tok(r.text, return_tensors="pt")["input_ids"]).logits[0, -1].argmax().item() for r in reqs]
        with pack.applied(model):
            tops = [model(tok(r.text, return_tensors="pt")["input_ids"]).logits[0, -1].argmax().item() for r in reqs]
    assert sum(b == t for b, t in zip(before, targets)) == 0
    assert tops[-1] == targets[-1]  # the last edit takes; later edits may undo earlier ones (ROME's weakness)
    from memit_adapter.evaluation import target_nll

    texts, news = [r.text for r in reqs], [r.target_new for r in reqs]
    nll_before = target_nll(model, tok, texts, news)
    with pack.applied(model):
        nll_after = target_nll(model, tok, texts, news)
    assert float(nll_after.mean()) < float(nll_before.mean()) - 0.5


def test_baseline_packs_save_and_load_with_their_method(tmp_path, capsys):
    from memit_adapter.cli import main

    model, tok = model_and_tokenizer("gpt2")
    stats = collect_stats(model, tok, corpus(), [2], progress=False)
    rome = compute_rome_edits(model, tok, requests()[:2], _rome_config(v_num_grad_steps=3), stats=stats,
                              progress=False)
    ft = compute_ft_edits(model, tok, requests()[:2], FtConfig(layer=1, num_steps=2), progress=False)
    for pack, method in ((rome, "rome"), (ft, "ft")):
        pack.save_pretrained(tmp_path / method)
        back = EditPack.from_pretrained(str(tmp_path / method))
        assert back == pack and type(back.config) is type(pack.config) and back.config.method == method
        assert "## Provenance" in (tmp_path / method / "README.md").read_text()
        assert main(["inspect", str(tmp_path / method)]) == 0
        assert f"method {method}" in capsys.readouterr().out


def test_ft_w_equals_adam_with_weight_decay_on_the_weight_itself():
    """FT-W trains ΔW through a hook; the same Adam run with weight_decay on a copy's real weight ends at W + ΔW."""
    model, tok = model_and_tokenizer("gpt2")
    reqs = requests()
    cfg = FtConfig(layer=1, lr=1e-2, num_steps=4, weight_decay=0.05, batch_size=2, loss_threshold=0.0)
    pack = compute_ft_edits(model, tok, reqs, cfg, progress=False)
    spec = get_arch_spec(model)
    name = spec.mlp_out_name(1)

    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    w = ref.get_submodule(name).weight
    w.requires_grad_(True)
    w0 = w.detach().clone()
    opt = torch.optim.Adam([w], lr=cfg.lr, weight_decay=cfg.weight_decay)
    from memit_adapter.tokens import encode_continuation

    enc = [encode_continuation(tok, r.text, r.target_new) for r in reqs]
    for _ in range(cfg.num_steps):
        for start in range(0, len(enc), cfg.batch_size):
            losses = []
            for prompt, target in enc[start:start + cfg.batch_size]:  # one text at a time: no padding at all
                logits = ref(torch.tensor([prompt + target])).logits[0]
                at = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
                losses.append(torch.nn.functional.cross_entropy(logits[at], torch.tensor(target)))
            opt.zero_grad()
            torch.stack(losses).mean().backward()
            opt.step()
    want = (w.detach() - w0).T  # GPT-2's Conv1D stores (d_in, d_out)
    torch.testing.assert_close(pack.deltas[name].weight_delta(), want, rtol=1e-3, atol=1e-6)
    assert pack.report["epochs"] == 4 and pack.report["epoch_loss"][-1] < pack.report["epoch_loss"][0]


def test_ft_w_stops_once_an_epoch_is_below_the_threshold_and_refuses_bad_settings():
    model, tok = model_and_tokenizer("gpt2")
    pack = compute_ft_edits(model, tok, requests(), FtConfig(layer=1, lr=5e-2, num_steps=50, loss_threshold=3.0),
                            progress=False)
    losses = pack.report["epoch_loss"]
    assert pack.report["epochs"] == len(losses) < 50 and losses[-1] < 3.0 <= min(losses[:-1])
    with pytest.raises(ConfigError, match="layer 9 out of range"):
        compute_ft_edits(model, tok, requests(), FtConfig(layer=9), progress=False)
    for bad in (dict(lr=0), dict(num_steps=0), dict(layer=-1), dict(norm_constraint=-1.0)):
        with pytest.raises(ConfigError):
            FtConfig(**bad)
    with pytest.raises(ConfigError):
        RomeConfig(original_key="yes")


def test_for_model_presets():
    from types import SimpleNamespace

    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    from memit_adapter import MemitConfig

    def shaped(cfg):
        return SimpleNamespace(config=cfg)

    assert RomeConfig.for_model(shaped(GPTJConfig(n_layer=28, n_embd=4096))).layer == 5
    assert RomeConfig.for_model(shaped(GPT2Config(n_layer=48, n_embd=1600))).layer == 17
    llama = RomeConfig.for_model(shaped(LlamaConfig(num_hidden_layers=32, hidden_size=4096)))
    assert llama.layer == 5 and llama.v_weight_decay == 1e-3
    assert FtConfig.for_model(shaped(GPTJConfig(n_layer=28, n_embd=4096))).layer == 21  # the paper's layer
    model, _ = model_and_tokenizer("gpt2")  # 4 layers, not a published shape: MEMIT's range and z settings
    rome, ft, memit = RomeConfig.for_model(model), FtConfig.for_model(model), MemitConfig.for_model(model)
    assert rome.layer == memit.layers[(len(memit.layers) - 1) // 2] and rome.v_lr == memit.v_lr
    assert rome.v_num_grad_steps == memit.v_num_grad_steps and rome.v_lr_relative == memit.v_lr_relative
    assert ft.layer == 3 and ft.lr == 5e-4 and ft.num_steps == 25 and ft.weight_decay == 5e-4


def test_eval_methods_compares_them_on_the_same_requests(tmp_path, capsys):
    import json
    import random

    from engine_setup import write_edit_inputs
    from test_evaluation import RECORDS

    from memit_adapter.cli import main
    from memit_adapter.evaluation import evaluate_counterfact
    from memit_adapter.requests import EditRequest

    write_edit_inputs(tmp_path, requests(), {})
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    args = ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.json"), "--methods", "memit",
            "rome", "ft", "--sizes", "1", "2", "--corpus", str(tmp_path / "corpus.txt"), "--no-generation",
            "--retention", "--out", str(tmp_path / "cmp.json"), "--plot", str(tmp_path / "scaling.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    runs = json.loads((tmp_path / "cmp.json").read_text())["runs"]
    assert [(r["method"], r["n_edits"]) for r in runs] == [("none", 2)] + [
        (m, n) for n in (1, 2) for m in ("memit", "rome", "ft")]
    assert out.count("\nrome ") == 2 and (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    # the FT-W row is what the method and the evaluation give on the same sample, computed apart
    from memit_adapter.models import load_model

    model, tok, _ = load_model(str(tmp_path / "m"))
    sample = random.Random(0).sample(RECORDS, 2)
    pack = compute_ft_edits(model, tok, [EditRequest.from_dict(r) for r in sample], FtConfig.for_model(model),
                            progress=False)
    with pack.applied(model):
        want = evaluate_counterfact(model, tok, sample, generation=False, retention_records=RECORDS)
    got = runs[-1]
    assert got["method"] == "ft" and got["efficacy_score"] == want.efficacy_score
    assert got["neighborhood_score"] == want.neighborhood_score and got["retention"] == want.retention


def test_compare_methods_sets_memits_published_settings_beside_its_defaults():
    import random

    from test_evaluation import RECORDS

    from memit_adapter import MemitConfig, compute_edits
    from memit_adapter.compare import compare_methods, format_comparison
    from memit_adapter.evaluation import evaluate_counterfact
    from memit_adapter.requests import EditRequest
    from memit_adapter.stats import collect_stats_for

    model, tok = model_and_tokenizer("gpt2")
    texts = corpus()
    fast = {"memit": MemitConfig.for_model(model, v_num_grad_steps=3),
            "memit-published": MemitConfig.published_for(model, v_num_grad_steps=3)}
    kept = {"prompt": "the sport played by {}", "subject": "lebron james", "target_new": {"str": " golf"},
            "target_true": {"str": " tennis"}}
    world = RECORDS + [{"case_id": 9, "requested_rewrite": kept}]  # a fact both batches leave alone
    runs = compare_methods(model, tok, RECORDS, ["memit", "memit-published"], [2], configs=fast, corpus=texts,
                           generation_records=0, retention_records=world, progress=False)
    assert [r.method for r in runs] == ["none", "memit", "memit-published"]
    assert "memit-published" in format_comparison(runs)
    # the published row is MEMIT with the published settings on the same sample, computed apart
    sample = random.Random(0).sample(RECORDS, 2)
    stats = collect_stats_for(model, tok, texts, fast["memit"].layers, fast["memit"], progress=False)
    pack = compute_edits(model, tok, [EditRequest.from_dict(r) for r in sample], fast["memit-published"],
                         stats=stats, progress=False)
    assert pack.config.method == "memit" and not pack.config.subject_keys
    with pack.applied(model):
        want = evaluate_counterfact(model, tok, sample, generation=False, retention_records=world)
    got = runs[-1].result
    assert got.retention_facts == 1
    assert got.to_dict() == want.to_dict() and runs[1].result.to_dict() != got.to_dict()
    pytest.importorskip("matplotlib")
    from dataclasses import replace

    from memit_adapter.compare import MethodRun, plot_method_scaling

    axes = plot_method_scaling(runs).axes
    assert [ax.get_title().split()[0] for ax in axes] == ["Score", "Neighbourhood", "Retention"]
    assert list(axes[2].lines[1].get_ydata()) == [100 * got.retention]  # line 0: MEMIT, 1: the published settings
    bare = [MethodRun(r.method, r.n_edits, r.seconds, replace(r.result, retention=None)) for r in runs]
    assert len(plot_method_scaling(bare).axes) == 2
    with pytest.raises(ConfigError, match="memit-published"):
        compare_methods(model, tok, RECORDS, ["memit-publish"], [2], corpus=texts, progress=False)


def test_edit_command_computes_the_baselines(tmp_path, capsys):
    from engine_setup import write_edit_inputs

    from memit_adapter.cli import main

    write_edit_inputs(tmp_path, requests()[:2], {"v_num_grad_steps": 3, "context_templates": TEMPLATES})
    common = ["edit", "--model", str(tmp_path / "m"), "--requests", str(tmp_path / "edits.jsonl"), "--corpus",
              str(tmp_path / "corpus.txt"), "--quiet"]
    assert main(common + ["--method", "rome", "--config", str(tmp_path / "cfg.json"), "--layers", "2", "--out",
                          str(tmp_path / "rome")]) == 0
    pack = EditPack.from_pretrained(str(tmp_path / "rome"))
    assert isinstance(pack.config, RomeConfig) and pack.config.layer == 2 and pack.config.v_num_grad_steps == 3
    assert "(ROME)" in capsys.readouterr().out
    assert main(common + ["--method", "ft", "--layers", "1", "--out", str(tmp_path / "ft")]) == 0
    assert EditPack.from_pretrained(str(tmp_path / "ft")).config == FtConfig.for_model(
        model_and_tokenizer("gpt2")[0], layer=1)
    capsys.readouterr()
    assert main(common + ["--method", "ft", "--layers", "1-2", "--out", str(tmp_path / "x")]) == 1
    assert "edits one layer" in capsys.readouterr().err
    assert main(common + ["--method", "ft", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "x")]) == 1
    assert "unknown FtConfig field" in capsys.readouterr().err and not (tmp_path / "x").exists()
