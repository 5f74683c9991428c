"""Facts to keep (``compute_edits(keep=...)``): their keys' second moment joins the solve's, ``C + β·C_keep``."""

import json
import warnings

import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer, write_edit_inputs

from memit_adapter import EditPack, EditRequest, MemitConfig, compute_edits, edit
from memit_adapter.arch import get_arch_spec
from memit_adapter.cli import main
from memit_adapter.errors import ConfigError, InvalidRequestError, StatisticsError
from memit_adapter.requests import load_prompts
from memit_adapter.stats import SecondMoment, collect_stats, prompt_moments

EDITS = [EditRequest("the sport played by {}", s, t) for s, t in
         [("michael jordan", " tennis"), ("lebron james", " golf")]]
KEEP = ["the sport played by toko yuki", "the sport played by danielle darrieux", "the sport played by alpha beta",
        "toko yuki lives in"]


@pytest.fixture(scope="module")
def setup():
    model, tok = model_and_tokenizer("gpt2")
    cfg = config(layers=[1, 2])
    stats = collect_stats(model, tok, corpus(40), cfg.layers, progress=False)
    return model, tok, cfg, stats


def _moments(model, tok, prompts, layers):
    """Mean k kᵀ over every token of ``prompts``, each run alone through the model (no padding), read with hooks."""
    spec, seen = get_arch_spec(model), {layer: [] for layer in layers}
    handles = [spec.mlp_out_module(model, layer).register_forward_pre_hook(
        lambda m, a, layer=layer: seen[layer].append(a[0][0].double())) for layer in layers]
    with torch.no_grad():
        for p in prompts:
            model(**tok(p, return_tensors="pt"))
    for h in handles:
        h.remove()
    return {layer: torch.cat(k).T @ torch.cat(k) / torch.cat(k).shape[0] for layer, k in seen.items()}


def test_prompt_moments_equal_the_mean_over_every_token(setup):
    model, tok, cfg, _ = setup
    got = prompt_moments(model, tok, KEEP, [2, 1], batch_size=3, progress=False)  # padded batches of unequal prompts
    expected = _moments(model, tok, KEEP, [1, 2])
    assert sorted(got) == [1, 2]
    n_tokens = sum(len(tok(p)["input_ids"]) for p in KEEP)
    for layer in (1, 2):
        assert got[layer].count == n_tokens
        torch.testing.assert_close(got[layer].mom2.double(), expected[layer], rtol=1e-5, atol=1e-6)


def test_kept_facts_join_the_solve_at_keep_weight(setup):
    """The pack equals a plain one solved with C + β·C_keep (C_keep from hooks, independently of the engine), and
    differs from the pack without them."""
    model, tok, cfg, stats = setup
    cfg = cfg.replace(keep_weight=3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = compute_edits(model, tok, EDITS, cfg, stats=stats, keep=KEEP, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert got.report["kept_prompts"] == len(KEEP) and got.report["seconds"]["keep"] > 0
    m = _moments(model, tok, KEEP, cfg.layers)
    mixed = {layer: SecondMoment(mom2=(stats[layer].mom2.double() + 3.0 * m[layer]).float(), count=stats[layer].count)
             for layer in cfg.layers}
    expected = compute_edits(model, tok, EDITS, cfg, stats=mixed, progress=False)
    plain = compute_edits(model, tok, EDITS, cfg, stats=stats, progress=False)
    assert plain.report["kept_prompts"] == 0 and "keep" not in plain.report["seconds"]
    for name in got.deltas:
        g, e, p = (pack.deltas[name].weight_delta() for pack in (got, expected, plain))
        torch.testing.assert_close(g, e, rtol=2e-3, atol=2e-3 * float(e.abs().max()))
        assert float((g - e).norm()) < 0.05 * float((p - e).norm())
    assert torch.equal(stats[1].mom2, collect_stats(model, tok, corpus(40), [1], progress=False)[1].mom2)  # untouched


def _last_logits(model, tok, prompts):
    with torch.no_grad():
        return torch.stack([model(**tok(p, return_tensors="pt")).logits[0, -1] for p in prompts])


def test_kept_facts_move_less_and_the_edits_still_take(setup):
    """The kept prompts' next-token logits move less than without them, while every edit's target still gains."""
    model, tok, cfg, stats = setup
    base = _last_logits(model, tok, KEEP)
    edited = [r.text for r in EDITS]
    targets = torch.tensor([tok(r.target_new)["input_ids"][0] for r in EDITS])
    gain = lambda logits: logits.log_softmax(-1)[torch.arange(len(EDITS)), targets]  # noqa: E731
    before = gain(_last_logits(model, tok, edited))
    moved = {}
    for weight in (None, 30.0):
        pack = compute_edits(model, tok, EDITS, cfg.replace(keep_weight=weight or 1.0), stats=stats,
                             keep=KEEP if weight else (), progress=False)
        with pack.applied(model):
            moved[weight] = float((_last_logits(model, tok, KEEP) - base).norm())
            assert (gain(_last_logits(model, tok, edited)) > before + 1.0).all()
    assert moved[30.0] < 0.5 * moved[None]


@pytest.mark.parametrize("keep, match", [
    ("the sport played by toko yuki", "list of prompts"),
    (["the sport played by toko yuki", "  "], "non-empty strings"),
    (["the sport played by toko yuki", None], "non-empty strings"),
])
def test_bad_keep_prompts_are_refused_before_any_work(setup, keep, match):
    """Refused before the statistics are looked for: with none given, a late check would fail on them instead."""
    model, tok, cfg, _ = setup
    with pytest.raises(InvalidRequestError, match=match):
        compute_edits(model, tok, EDITS, cfg, stats=None, corpus=None, keep=keep, progress=False)


def test_prompts_that_name_an_edited_subject_are_left_out_with_a_warning(setup):
    """They read the key the edit writes: the pack equals the one kept on the other prompts; repeats count once."""
    model, tok, cfg, stats = setup
    named = ["michael jordan lives in", "the home of lebron james is", EDITS[0].text]
    with pytest.warns(UserWarning, match=r"3 of 7 keep prompts name a subject being edited"):
        got = compute_edits(model, tok, EDITS, cfg, stats=stats, keep=[*named, *KEEP, KEEP[0]], progress=False)
    assert got.report["kept_prompts"] == len(KEEP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = compute_edits(model, tok, EDITS, cfg, stats=stats, keep=KEEP, progress=False)
    for name, delta in expected.deltas.items():
        torch.testing.assert_close(got.deltas[name].weight_delta(), delta.weight_delta())
    with pytest.warns(UserWarning, match="1 of 1 keep prompts"):
        alone = compute_edits(model, tok, EDITS, cfg, stats=stats, keep=named[:1], progress=False)
    plain = compute_edits(model, tok, EDITS, cfg, stats=stats, progress=False)
    assert alone.report["kept_prompts"] == 0
    for name, delta in plain.deltas.items():
        torch.testing.assert_close(alone.deltas[name].weight_delta(), delta.weight_delta())


def test_a_joint_chain_leaves_out_prompts_about_the_chains_subjects_too(setup):
    model, tok, cfg, stats = setup
    first = compute_edits(model, tok, EDITS[:1], cfg, stats=stats, progress=False)
    with pytest.warns(UserWarning, match="1 of 2 keep prompts"):
        joint = compute_edits(model, tok, EDITS[1:], cfg, stats=stats, on_top_of=[first], joint=True,
                              keep=["michael jordan lives in", KEEP[0]], progress=False)
    assert joint.report["kept_prompts"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on top, not joint: the chain's subject is not this solve's
        on_top = compute_edits(model, tok, EDITS[1:], cfg, stats=stats, on_top_of=[first],
                               keep=["michael jordan lives in", KEEP[0]], progress=False)
    assert on_top.report["kept_prompts"] == 2


def test_second_moments_add_in_the_first_ones_dtype_and_leave_both_alone():
    a = SecondMoment(mom2=torch.eye(3, dtype=torch.float64), count=5)
    b = SecondMoment(mom2=torch.full((3, 3), 2.0), count=7)
    c = a.plus(b, 0.5, device="cpu")
    assert c.mom2.dtype == torch.float64 and c.count == 5
    torch.testing.assert_close(c.mom2, torch.eye(3, dtype=torch.float64) + 1.0)
    assert torch.equal(a.mom2, torch.eye(3, dtype=torch.float64)) and torch.equal(b.mom2, torch.full((3, 3), 2.0))


def test_prompt_moments_refuses_prompts_without_a_token(setup):
    model, tok, _, _ = setup
    with pytest.raises(StatisticsError, match="has a token"):
        prompt_moments(model, tok, ["", ""], [1], progress=False)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), "1"])
def test_keep_weight_must_be_a_positive_number(weight):
    with pytest.raises(ConfigError, match="keep_weight"):
        MemitConfig(keep_weight=weight)


def test_prompts_files(tmp_path):
    (tmp_path / "keep.txt").write_text("the sport played by toko yuki\n\n  michael jordan lives in  \n")
    assert load_prompts(tmp_path / "keep.txt") == ["the sport played by toko yuki", "michael jordan lives in"]
    (tmp_path / "keep.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in EDITS))
    assert load_prompts(tmp_path / "keep.jsonl") == [r.text for r in EDITS]
    # targets that disagree do not matter to facts kept: only their prompts are read
    (tmp_path / "keep.csv").write_text("prompt,subject,target_new\n{} lives in,toko yuki,rome\n"
                                       "{} lives in,toko yuki,paris\n")
    assert load_prompts(tmp_path / "keep.csv") == ["toko yuki lives in"] * 2
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InvalidRequestError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "keep.md").write_text("x\n")
    with pytest.raises(InvalidRequestError, match="a .txt file, or a .jsonl"):
        load_prompts(tmp_path / "keep.md")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.txt")


def _edit(tmp_path, *extra):
    return main(["edit", "--model", str(tmp_path / "m"), "--requests", str(tmp_path / "edits.jsonl"), "--corpus",
                 str(tmp_path / "corpus.txt"), "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "out"),
                 "--quiet", *extra])


def test_edit_command_keeps_a_file_of_facts(tmp_path, capsys):
    fields = config(layers=[2], keep_weight=2.0).to_dict()
    write_edit_inputs(tmp_path, EDITS, fields)
    (tmp_path / "keep.txt").write_text("\n".join(KEEP) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corpus's texts are short
        assert _edit(tmp_path, "--keep", str(tmp_path / "keep.txt")) == 0
    out = capsys.readouterr().out
    assert f"{len(KEEP)} facts to keep held in the solve (keep_weight 2)" in out
    model, tok = model_and_tokenizer("gpt2")
    expected = compute_edits(model, tok, EDITS, MemitConfig.from_dict(fields), corpus=str(tmp_path / "corpus.txt"),
                             keep=KEEP, progress=False)
    pack = EditPack.from_pretrained(str(tmp_path / "out"))
    assert pack.config.keep_weight == 2.0
    for name, delta in expected.deltas.items():
        torch.testing.assert_close(pack.deltas[name].weight_delta(), delta.weight_delta(), rtol=1e-4, atol=1e-6)


def test_edit_command_checks_keep_before_loading_the_model(tmp_path, capsys, monkeypatch):
    write_edit_inputs(tmp_path, EDITS, config(layers=[2]).to_dict())

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(edit, "load_model", no_model)
    (tmp_path / "keep.txt").write_text(KEEP[0] + "\n")
    (tmp_path / "cfg.json").write_text("{}")
    assert _edit(tmp_path, "--keep", str(tmp_path / "keep.txt"), "--method", "rome") == 1
    assert "--keep is MEMIT's" in capsys.readouterr().err
    (tmp_path / "keep.md").write_text(KEEP[0] + "\n")
    assert _edit(tmp_path, "--keep", str(tmp_path / "keep.md")) == 1
    assert "a .txt file, or a .jsonl" in capsys.readouterr().err
    (tmp_path / "keep.txt").write_text(EDITS[1].text + "\n")
    with pytest.warns(UserWarning, match="1 of 1 keep prompts name a subject being edited"):
        with pytest.raises(AssertionError, match="the model was loaded"):
            _edit(tmp_path, "--keep", str(tmp_path / "keep.txt"))
    assert not (tmp_path / "out").exists()
