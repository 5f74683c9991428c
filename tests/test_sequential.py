"""Packs computed on top of packs (``compute_edits(on_top_of=...)``): the sequential form of MEMIT."""

import copy
import warnings

import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer

from memit_adapter import EditRequest, active_packs, compute_edits
from memit_adapter.arch import get_arch_spec
from memit_adapter.stats import SecondMoment, collect_stats

FIRST = [EditRequest("the sport played by {}", s, t) for s, t in
         [("michael jordan", " tennis"), ("lebron james", " golf"), ("toko yuki", " hockey")]]
SECOND = [EditRequest("the sport played by {}", s, t) for s, t in
          [("danielle darrieux", " tennis"), ("alpha beta", " golf")]]


@pytest.fixture(scope="module")
def setup():
    model, tok = model_and_tokenizer("gpt2")
    cfg = config(layers=[2], context_templates=["{}"])  # one layer, bare prompts: keys are easy to read here
    stats = collect_stats(model, tok, corpus(40), cfg.layers, progress=False)
    first = compute_edits(model, tok, FIRST, cfg, stats=stats, progress=False)
    return model, tok, cfg, stats, first


def _keys(model, tok, requests, layer):
    """Input of layer ``layer``'s W_out at each prompt's last token (the subject's: it ends every prompt)."""
    spec, seen = get_arch_spec(model), []
    handle = spec.mlp_out_module(model, layer).register_forward_pre_hook(lambda m, a: seen.append(a[0][0, -1]))
    with torch.no_grad():
        for r in requests:
            model(**tok(r.text, return_tensors="pt"))
    handle.remove()
    return torch.stack(seen).double()


def _kept_solve(merged, tok, cfg, stats, k0):
    """SECOND's update of layer 2 solved plainly on ``merged`` with the keys ``k0`` added to C: C + K0 K0ᵀ / λ."""
    kept = {2: SecondMoment(mom2=(stats[2].mom2.double() + k0.T @ k0 / cfg.mom2_update_weight).float(),
                            count=stats[2].count)}
    pack = compute_edits(merged, tok, SECOND, cfg, stats=kept, progress=False)
    return next(iter(pack.deltas.values())).weight_delta()


def test_on_top_of_keeps_earlier_keys_in_the_solve(setup):
    """The pack equals a plain solve on the model with the first pack merged, whose second moment holds the first
    pack's keys: C + K0 K0ᵀ / λ (keys read here with a hook, independently of the engine)."""
    model, tok, cfg, stats, first = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    second = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], progress=False)
    assert second.parents == [first.pack_id] and set(second.deltas) == set(first.deltas)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not active_packs(model)

    merged = copy.deepcopy(model)
    first.merge(merged)
    name = next(iter(second.deltas))
    got = second.deltas[name].weight_delta()
    expected = _kept_solve(merged, tok, cfg, stats, _keys(merged, tok, FIRST, 2))
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    plain = compute_edits(model, tok, SECOND, cfg, stats=stats, progress=False).deltas[name].weight_delta()
    assert float((got - expected).norm()) < 0.1 * float((plain - expected).norm())  # not the independent solve


def test_on_top_of_reads_the_earlier_keys_as_it_reads_the_new_ones(setup):
    """With ``subject_keys`` the earlier packs' keys kept in C are read the same way as the new ones: the mean of the
    bare prompt's key and the subject alone's (one template, "{}")."""
    model, tok, cfg, stats, first = setup
    cfg = cfg.replace(subject_keys=True)
    second = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], progress=False)
    merged = copy.deepcopy(model)
    first.merge(merged)
    alone = [EditRequest("{}", r.subject, r.target_new) for r in FIRST]
    bare = _keys(merged, tok, FIRST, 2)
    got = second.deltas[next(iter(second.deltas))].weight_delta()
    expected = _kept_solve(merged, tok, cfg, stats, 0.5 * (bare + _keys(merged, tok, alone, 2)))
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    differs = _kept_solve(merged, tok, cfg, stats, bare)  # the published key alone: another C, another update
    assert float((got - expected).norm()) < 0.1 * float((differs - expected).norm())


def test_a_pack_on_top_disturbs_the_earlier_keys_less_than_an_independent_one(setup):
    model, tok, cfg, stats, first = setup
    k0 = _keys(model, tok, FIRST, 2).float()
    sequential = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], progress=False)
    independent = compute_edits(model, tok, SECOND, cfg, stats=stats, progress=False)
    name = next(iter(sequential.deltas))
    on_old = lambda pack: float((pack.deltas[name].weight_delta() @ k0.T).norm())  # noqa: E731
    assert on_old(sequential) < 0.5 * on_old(independent)


@pytest.mark.filterwarnings("error")  # no "already attached" warning either
def test_packs_already_active_are_left_as_the_caller_had_them(setup):
    model, tok, cfg, stats, first = setup
    with first.applied(model):
        second = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], progress=False)
        assert [p.pack_id for p in active_packs(model)] == [first.pack_id]
    assert not active_packs(model) and second.parents == [first.pack_id]


@pytest.mark.parametrize("how", ["attached", "merged"])
def test_switching_off_a_pack_that_an_active_pack_was_computed_on_warns(setup, how):
    model, tok, cfg, stats, first = setup
    second = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], progress=False)
    on, off = (first.attach, first.detach) if how == "attached" else (first.merge, first.unmerge)
    on(model)
    with second.applied(model):
        with pytest.warns(UserWarning, match=f"{first.pack_id} was switched off while pack.*{second.pack_id}"):
            off(model)
    on(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        off(model)  # nothing built on it is active: no warning
    assert not active_packs(model)
