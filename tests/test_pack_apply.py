"""Applying packs: exact merge/unmerge, NaN refusal, bf16 loss warning, hooks, generate, stacking, fingerprints."""

import warnings

import pytest
import torch
from pack_utils import logits, random_pack, same_weights, weights
from tiny import ARCHS, make_tokenizer, tiny_model

from memit_adapter.apply import active_packs
from memit_adapter.errors import ConflictingRequestsError, FingerprintMismatchError, PackError
from memit_adapter.pack import EditPack
from memit_adapter.requests import EditRequest

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IDS = torch.tensor([[5, 9, 14, 22, 7, 30], [11, 12, 13, 40, 41, 42]])


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_unmerge_restores_every_weight_bit_for_bit(arch, dtype):
    model = tiny_model(arch, dtype=dtype)
    pack = random_pack(model, layers=(0, 2), rank=3, rel=0.05)
    before, out_before = weights(model), logits(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bf16 loss warning is tested below
        report = pack.merge(model)
    assert not same_weights(before, weights(model))
    assert 0 < report.restore_fraction < 0.2  # only the elements where (W + Δ) − Δ != W are kept
    assert report.restore_bytes < report.weight_bytes / 4
    pack.unmerge(model)
    assert same_weights(before, weights(model))
    assert torch.equal(logits(model, IDS), out_before)
    assert active_packs(model) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_delta_restore_costs_at_most_one_copy(dtype):
    model = tiny_model("gptj", dtype=dtype)
    pack = random_pack(model, rank=4, rel=3.0)  # ‖Δ‖ > ‖W‖: most elements are not recoverable by subtraction
    before = weights(model)
    report = pack.merge(model)
    assert report.restore_bytes <= report.weight_bytes
    pack.unmerge(model)
    assert same_weights(before, weights(model))


def test_factors_with_odd_strides():
    model = tiny_model("gpt2")
    pack = random_pack(model, rank=1)
    for d in pack.deltas.values():  # (d_out, 1) and (1, d_in) views with non-unit strides, as an engine may return
        d.B, d.A = d.B.T.contiguous().T, d.A.T.contiguous().T
    assert pack.pack_id == random_pack(model, rank=1).pack_id
    before = weights(model)
    pack.merge(model)
    pack.unmerge(model)
    assert same_weights(before, weights(model))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_logits_equal_hooked_logits(dtype):
    model = tiny_model("gpt2", dtype=dtype)
    pack = random_pack(model, rank=2, rel=1.0)
    base = logits(model, IDS)
    with pack.applied(model):
        hooked = logits(model, IDS)
    assert torch.equal(logits(model, IDS), base)  # detaching restores the exact outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack.merge(model)
    merged = logits(model, IDS)
    pack.unmerge(model)
    effect = float((hooked.float() - base.float()).abs().max())
    assert effect > 1e-2  # the pack does change the outputs
    if dtype == torch.float32:
        torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=0)
    else:  # the merged weights and the outputs are rounded to 8 (bf16) or 11 (fp16) bits
        share = {torch.float16: 0.05, torch.bfloat16: 0.25}[dtype]
        assert float((hooked.float() - merged.float()).abs().max()) < share * effect


def test_merge_twice_and_unmerge_clean_warn():
    model = tiny_model("llama")
    pack = random_pack(model)
    with pytest.warns(UserWarning, match="not merged"):
        pack.unmerge(model)
    pack.merge(model)
    once = weights(model)
    with pytest.warns(UserWarning, match="already merged"):
        assert pack.merge(model) is None
    assert same_weights(once, weights(model))
    with pytest.warns(UserWarning, match="already"):
        pack.attach(model)
    pack.unmerge(model)
    with pytest.warns(UserWarning, match="not attached"):
        pack.detach(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_merge_that_would_overflow_is_refused_with_nothing_changed(dtype):
    model = tiny_model("gptj", dtype=dtype)
    good = random_pack(model, layers=(0,), seed=1)
    bad = random_pack(model, layers=(1, 2), seed=2, rel=1.0)
    name = "transformer.h.2.mlp.fc_out"
    bad.deltas[name].B[0, 0] = float("inf") if dtype == torch.float32 else 1e5
    bad.deltas[name].A[0, 0] = 1e3
    before = weights(model)
    with pytest.raises(PackError, match="NaN/inf.*nothing was changed"):
        bad.merge(model)
    assert same_weights(before, weights(model))
    assert active_packs(model) == []
    good.merge(model)  # the model is still usable
    good.unmerge(model)
    assert same_weights(before, weights(model))


def test_bf16_merge_warns_when_it_loses_the_delta():
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    small = random_pack(model, rel=1e-3)
    with pytest.warns(UserWarning, match="rounded away .*attach"):
        report = small.merge(model)
    assert report.delta_rel_error > 0.5  # most of a 1e-3 delta vanishes in bf16
    small.unmerge(model)
    fp32 = tiny_model("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = random_pack(fp32, rel=1e-3).merge(fp32)
    assert report.delta_rel_error < 1e-4


def test_bf16_hooks_keep_what_a_bf16_merge_loses():
    """The hooked path computes the delta in fp32: its effect tracks the fp32 model, the bf16 merge's does not."""
    ref, model = tiny_model("llama"), tiny_model("llama", dtype=torch.bfloat16)
    pack = random_pack(ref, rel=3e-3, fingerprint=None)
    base32 = logits(ref, IDS)
    with pack.applied(ref):
        effect32 = logits(ref, IDS) - base32
    base16 = logits(model, IDS).float()
    with pack.applied(model):
        effect_hook = logits(model, IDS).float() - base16
    with pytest.warns(UserWarning):
        pack.merge(model)
    effect_merge = logits(model, IDS).float() - base16
    pack.unmerge(model)
    err_hook = float((effect_hook - effect32).norm() / effect32.norm())
    err_merge = float((effect_merge - effect32).norm() / effect32.norm())
    assert err_hook < err_merge


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_hooks_work_with_generate_and_padded_batches(arch):
    model = tiny_model(arch)
    tok = make_tokenizer(padding_side="left")
    pack = random_pack(model, rank=2, rel=2.0)
    prompts = ["michael jordan plays the sport of", "paris is the capital city of the"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(**batch, **kwargs)
    pack.merge(model)
    merged = model.generate(**batch, **kwargs)
    pack.unmerge(model)
    with pack.applied(model):
        hooked = model.generate(**batch, **kwargs)
        single = model.generate(**tok(prompts[:1], return_tensors="pt"), **kwargs)
    assert torch.equal(hooked, merged)
    assert not torch.equal(hooked, plain)
    assert torch.equal(single[0], hooked[0][-single.shape[1]:])  # batching does not change the answer
    assert torch.equal(model.generate(**batch, **kwargs), plain)


def test_applied_detaches_on_error():
    model = tiny_model("gpt_neox")
    pack = random_pack(model)
    base = logits(model, IDS)
    with pytest.raises(RuntimeError, match="boom"):
        with pack.applied(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, IDS), base)
    assert active_packs(model) == []


def test_several_packs_active_at_once_equal_the_stacked_pack():
    model = tiny_model("gpt2")
    a = random_pack(model, layers=(1, 2), seed=1, rel=0.2)
    b = random_pack(model, layers=(2, 3), seed=2, rel=0.2, offset=5)
    base_w = weights(model)
    with a.applied(model), b.applied(model):
        both = logits(model, IDS)
        assert len(active_packs(model)) == 2
    stacked = EditPack.stack([a, b])
    with stacked.applied(model):
        torch.testing.assert_close(logits(model, IDS), both, atol=1e-5, rtol=0)
    a.merge(model)
    b.merge(model)
    torch.testing.assert_close(logits(model, IDS), both, atol=1e-5, rtol=0)
    a.unmerge(model)  # not the last merged: b is taken off and put back
    with pytest.warns(UserWarning, match="already"), b.applied(model):  # merged: nothing to do, nothing to undo
        pass
    assert [p.pack_id for p in active_packs(model)] == [b.pack_id]
    b.unmerge(model)
    assert same_weights(base_w, weights(model))


def test_contradicting_pack_is_refused_while_another_is_active():
    model = tiny_model("gpt2")
    a = random_pack(model, seed=1)
    b = random_pack(model, seed=2)
    b.requests = [EditRequest("{} plays the sport of", "lebron james", " golf")]
    a.attach(model)
    with pytest.raises(ConflictingRequestsError, match="lebron james plays the sport of"):
        b.attach(model)
    with pytest.raises(ConflictingRequestsError):
        b.merge(model)
    a.detach(model)
    b.attach(model)
    b.detach(model)


def test_fingerprint_mismatch_is_an_error_unless_forced():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)  # same shapes, other weights
    pack = random_pack(model)
    before = weights(other)
    with pytest.raises(FingerprintMismatchError, match="force=True"):
        pack.merge(other)
    with pytest.raises(FingerprintMismatchError):
        pack.attach(other)
    assert same_weights(before, weights(other)) and active_packs(other) == []
    pack.merge(other, force=True)
    pack.unmerge(other)
    assert same_weights(before, weights(other))
    with pytest.raises(FingerprintMismatchError):  # the fingerprint covers the dtype
        pack.attach(tiny_model("llama", seed=0, dtype=torch.bfloat16))


def test_sequential_pack_fits_the_edited_model():
    model = tiny_model("gpt2")
    first = random_pack(model, seed=1)
    first.merge(model)
    second = random_pack(model, seed=2, offset=5, parents=[first.pack_id])  # fingerprint of the edited weights
    second.merge(model)
    independent = random_pack(tiny_model("gpt2"), seed=3, offset=9)  # computed on the base: also accepted
    independent.merge(model)
    for p in (independent, second, first):
        p.unmerge(model)
    assert same_weights(weights(model), weights(tiny_model("gpt2")))


def test_pack_for_other_shapes_is_refused():
    pack = random_pack(tiny_model("gpt2"))
    with pytest.raises(PackError, match="no module"):
        pack.merge(tiny_model("llama"))
    with pytest.raises(PackError, match="does not fit"):
        pack.attach(tiny_model("gpt2", n_embd=64), force=True)


def test_fingerprint_is_checked_once_per_weight_state(monkeypatch):
    from memit_adapter import apply

    model = tiny_model("gpt2")
    pack = random_pack(model)
    calls = []
    real = apply.weights_fingerprint
    monkeypatch.setattr(apply, "weights_fingerprint", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):  # a service toggling per request hashes the weights once
        with pack.applied(model):
            pass
    assert len(calls) == 1
    other = random_pack(model, seed=5, offset=7)
    other.merge(model)  # weights changed: check again
    with pack.applied(model):
        pass
    assert len(calls) == 4  # other: 1; pack: the current weights, then with other taken off
    other.unmerge(model)
