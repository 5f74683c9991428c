"""Models dispatched with accelerate's big-model inference (issue 16): layers offloaded to the disk or held by the
CPU offload hooks give the plain model's results, and come out of every call as they went in.

The dispatched tiny GPT-2 keeps blocks 1 and 3 on the disk (meta parameters that accelerate's AlignDevicesHook reads
from the offload folder for each forward) and the rest on the CPU; the edited layers are 1 (disk) and 2 (CPU). The
weights it serves are read back here with accelerate's own loader, independently of memit_adapter.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from accelerate import cpu_offload
from accelerate.big_modeling import dispatch_model
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module
from accelerate.utils import set_module_tensor_to_device
from accelerate.utils.offload import OffloadedWeightsLoader
from engine_setup import config, corpus, model_and_tokenizer, requests
from pack_utils import random_pack

from memit_adapter import ModelError, PackError, WeightsChangedError, active_packs, collect_stats, compute_edits
from memit_adapter.arch import check_model
from memit_adapter.devices import execution_device, input_device, module_weight
from memit_adapter.evaluation import evaluate_counterfact
from memit_adapter.stats import model_id
from memit_adapter.tracing import trace_fact

DEVICE_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
              "transformer.h.1": "disk", "transformer.h.2": "cpu", "transformer.h.3": "disk",
              "transformer.ln_f": "cpu", "lm_head": "cpu"}
IDS = torch.tensor([[4, 20, 30, 40, 50, 60], [7, 8, 9, 10, 11, 12]])
RECORDS = [
    {"case_id": 1, "requested_rewrite": {"prompt": "the sport played by {}", "subject": "michael jordan",
                                         "target_new": {"str": "tennis"}, "target_true": {"str": "basketball"}},
     "paraphrase_prompts": ["michael jordan plays the sport of"],
     "neighborhood_prompts": ["the sport played by lebron james"],
     "generation_prompts": ["michael jordan is a famous player of"]},
    {"case_id": 2, "requested_rewrite": {"prompt": "the sport played by {}", "subject": "toko yuki",
                                         "target_new": {"str": "hockey"}, "target_true": {"str": "golf"}},
     "paraphrase_prompts": ["toko yuki plays"], "neighborhood_prompts": ["the sport played by alpha beta"],
     "generation_prompts": ["toko yuki works for"]},
]


class Dispatched:
    """A plain tiny GPT-2 and a copy dispatched by ``DEVICE_MAP``, with the folder its disk layers live in."""

    def __init__(self, folder):
        self.model, self.tok = model_and_tokenizer("gpt2")
        self.folder = folder
        self.offloaded = dispatch_model(copy.deepcopy(self.model), device_map=DEVICE_MAP, offload_dir=str(folder))

    def served(self) -> dict[str, torch.Tensor]:
        """Every weight the dispatched model's forwards see: a meta parameter's from the offload folder."""
        disk = OffloadedWeightsLoader(save_folder=str(self.folder))
        return {n: (disk[n] if p.is_meta else p).detach().clone() for n, p in self.offloaded.named_parameters()}

    def hooks(self) -> dict[str, tuple]:
        """accelerate's hook and ``forward`` wrapper of each module, to check that they are the same objects."""
        modules = self.offloaded.named_modules()
        return {n: (m._hf_hook, vars(m)["forward"]) for n, m in modules if hasattr(m, "_hf_hook")}

    def assert_as_dispatched(self, served: dict[str, torch.Tensor], hooks: dict[str, tuple]) -> None:
        now = self.served()
        assert now.keys() == served.keys() and all(torch.equal(now[n], served[n]) for n in served)
        ids = {n: tuple(map(id, h)) for n, h in hooks.items()}
        assert {n: tuple(map(id, h)) for n, h in self.hooks().items()} == ids
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in self.offloaded.modules())
        assert all(p.is_meta for n, p in self.offloaded.named_parameters() if n.startswith(("transformer.h.1.",
                                                                                             "transformer.h.3.")))
        assert not active_packs(self.offloaded)
        grads = {n: p.requires_grad for n, p in self.offloaded.named_parameters()}
        assert grads == {n: p.requires_grad for n, p in self.model.named_parameters()}
        torch.testing.assert_close(_logits(self.offloaded), _logits(self.model), rtol=0, atol=0)


def _leaves(x) -> list:
    """The keys and values of nested dicts and lists, in order: pytest.approx compares flat sequences only."""
    if isinstance(x, dict):
        return [y for k, v in x.items() for y in (k, *_leaves(v))]
    if isinstance(x, list):
        return [y for v in x for y in _leaves(v)]
    return [x]


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Dispatched:
    return Dispatched(tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="module")
def packs(setup):
    """The pack computed on the plain model and on the dispatched one, and the dispatched model's state before."""
    served, hooks = setup.served(), setup.hooks()
    kw = dict(corpus=corpus(20), progress=False)
    plain = compute_edits(setup.model, setup.tok, requests(), config(v_num_grad_steps=5), **kw)
    offloaded = compute_edits(setup.offloaded, setup.tok, requests(), config(v_num_grad_steps=5), **kw)
    return plain, offloaded, served, hooks


def test_the_dispatched_model_offloads_layer_1_to_the_disk(setup):
    w = setup.offloaded.transformer.h[1].mlp.c_proj.weight
    assert w.is_meta and setup.offloaded.transformer.h[2].mlp.c_proj.weight.device.type == "cpu"
    assert torch.equal(module_weight(setup.offloaded, "transformer.h.1.mlp.c_proj"),
                       setup.model.transformer.h[1].mlp.c_proj.weight)
    assert execution_device(setup.offloaded, "transformer.h.1.mlp.c_proj") == torch.device("cpu")
    assert input_device(setup.offloaded) == torch.device("cpu")


def test_compute_edits_matches_the_plain_model(setup, packs):
    plain, offloaded, served, hooks = packs
    assert offloaded.fingerprint == plain.fingerprint
    assert list(offloaded.deltas) == list(plain.deltas) == ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"]
    for name, d in plain.deltas.items():
        assert offloaded.deltas[name].A.device.type == "cpu"
        torch.testing.assert_close(offloaded.deltas[name].weight_delta(), d.weight_delta())
    torch.testing.assert_close(torch.tensor(offloaded.report["z_nll"]), torch.tensor(plain.report["z_nll"]))
    setup.assert_as_dispatched(served, hooks)


def test_collect_stats_matches_the_plain_model(setup, tmp_path):
    served, hooks = setup.served(), setup.hooks()
    assert model_id(setup.offloaded) == model_id(setup.model)  # the cache key hashes the offloaded weights' values
    want = collect_stats(setup.model, setup.tok, corpus(20), [1, 2], progress=False)
    got = collect_stats(setup.offloaded, setup.tok, corpus(20), [1, 2], progress=False, cache=tmp_path)
    for layer in (1, 2):
        assert got[layer].count == want[layer].count
        torch.testing.assert_close(got[layer].mom2, want[layer].mom2)
    # the plain model finds the entries the dispatched one wrote: same model id, same statistics
    cached = collect_stats(setup.model, setup.tok, None, [1, 2], progress=False, cache=tmp_path)
    assert all(torch.equal(cached[layer].mom2, got[layer].mom2) for layer in (1, 2))
    setup.assert_as_dispatched(served, hooks)


def test_applied_attach_and_detach_match_the_plain_model(setup, packs):
    plain, offloaded, served, hooks = packs
    with plain.applied(setup.model):
        want = _logits(setup.model)
    assert not torch.allclose(want, _logits(setup.model))
    with offloaded.applied(setup.offloaded):
        torch.testing.assert_close(_logits(setup.offloaded), want)
    setup.assert_as_dispatched(served, hooks)
    assert plain.attach(setup.offloaded)
    torch.testing.assert_close(_logits(setup.offloaded), want)
    plain.detach(setup.offloaded)
    setup.assert_as_dispatched(served, hooks)


def test_merge_refuses_a_disk_offloaded_layer_and_changes_nothing(setup, packs):
    plain, _, served, hooks = packs
    with pytest.raises(PackError, match=r"h\.1\.mlp\.c_proj: .* to disk.*pack\.attach\(model\) / pack\.applied"):
        plain.merge(setup.offloaded)
    setup.assert_as_dispatched(served, hooks)
    with plain.applied(setup.offloaded):  # what the error proposes works
        want = _logits(setup.offloaded)
    with plain.applied(setup.model):
        torch.testing.assert_close(want, _logits(setup.model))


def test_merge_and_unmerge_a_layer_the_dispatched_model_keeps_on_the_cpu(setup):
    served, hooks = setup.served(), setup.hooks()
    pack = random_pack(setup.model, layers=(2,))
    merged = copy.deepcopy(setup.model)
    pack.merge(merged)
    pack.merge(setup.offloaded)
    torch.testing.assert_close(_logits(setup.offloaded), _logits(merged), rtol=0, atol=0)
    pack.unmerge(setup.offloaded)
    setup.assert_as_dispatched(served, hooks)


@pytest.fixture
def cpu_offloaded():
    """A plain model and a copy whose every weight accelerate's CPU offload serves from ``state``, in memory."""
    model, _ = model_and_tokenizer("gpt2")
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    offloaded = cpu_offload(copy.deepcopy(model), execution_device="cpu", state_dict=state)
    # a second hook on an edited module: accelerate wraps both in a SequentialHook
    add_hook_to_module(offloaded.transformer.h[1].mlp.c_proj, ModelHook(), append=True)
    assert isinstance(offloaded.transformer.h[1].mlp.c_proj._hf_hook, SequentialHook)
    assert all(p.is_meta for p in offloaded.parameters())
    return model, offloaded, state


def test_merge_writes_the_weights_the_cpu_offload_hook_serves_and_unmerge_restores_their_bits(cpu_offloaded):
    model, offloaded, state = cpu_offloaded
    before = {n: t.clone() for n, t in state.items()}
    pack = random_pack(model, layers=(1, 2))
    merged = copy.deepcopy(model)
    pack.merge(merged)
    report = pack.merge(offloaded)
    assert report.restore_fraction < 1 and active_packs(offloaded) == [pack]
    edited = {f"{n}.weight" for n in pack.deltas}
    assert all(torch.equal(state[n], merged.state_dict()[n]) for n in edited)
    assert all(torch.equal(state[n], before[n]) for n in state if n not in edited)
    assert all(p.is_meta for p in offloaded.parameters())
    torch.testing.assert_close(_logits(offloaded), _logits(merged), rtol=0, atol=0)
    pack.unmerge(offloaded)
    assert all(state[n].view(torch.int32).equal(before[n].view(torch.int32)) for n in state)
    torch.testing.assert_close(_logits(offloaded), _logits(model), rtol=0, atol=0)


def test_unmerge_sees_changes_to_the_served_weights(cpu_offloaded):
    model, offloaded, state = cpu_offloaded
    pack = random_pack(model, layers=(2,))
    pack.merge(offloaded)
    after = state["transformer.h.2.mlp.c_proj.weight"].clone()
    state["transformer.h.2.mlp.c_proj.weight"][5, 3] += 1.0
    with pytest.raises(WeightsChangedError, match=r"h\.2\.mlp\.c_proj \(1 of 128 stored rows, first \[5\]"):
        pack.unmerge(offloaded)
    state["transformer.h.2.mlp.c_proj.weight"].copy_(after)
    pack.unmerge(offloaded)
    assert torch.equal(state["transformer.h.2.mlp.c_proj.weight"], model.transformer.h[2].mlp.c_proj.weight)


def test_evaluate_counterfact_matches_the_plain_model(setup, packs):
    plain, _, served, hooks = packs
    kw = dict(batch_size=3, max_new_tokens=5, per_record=True)
    for active in (False, True):
        with (plain.applied(setup.model) if active else nullcontext()):
            want = evaluate_counterfact(setup.model, setup.tok, RECORDS, **kw)
        with (plain.applied(setup.offloaded) if active else nullcontext()):
            got = evaluate_counterfact(setup.offloaded, setup.tok, RECORDS, **kw)
        assert len(got.per_record) == len(RECORDS)
        assert _leaves(got.per_record) == pytest.approx(_leaves(want.per_record))  # generated texts: the same
        assert got.to_dict() == pytest.approx(want.to_dict())
    setup.assert_as_dispatched(served, hooks)


@pytest.mark.parametrize("kind", ["hidden", "mlp"])
def test_trace_fact_matches_the_plain_model(setup, kind):
    served, hooks = setup.served(), setup.hooks()
    kw = dict(kind=kind, samples=3, window=2)
    want = trace_fact(setup.model, setup.tok, "the sport played by {}", "michael jordan", " tennis", **kw)
    got = trace_fact(setup.offloaded, setup.tok, "the sport played by {}", "michael jordan", " tennis", **kw)
    torch.testing.assert_close(got.scores, want.scores)
    assert got.low == pytest.approx(want.low) and got.high == pytest.approx(want.high)
    setup.assert_as_dispatched(served, hooks)


def test_meta_weights_that_no_offloading_hook_serves_are_refused():
    model, tok = model_and_tokenizer("gpt2")
    module = model.transformer.h[1].mlp.c_proj
    add_hook_to_module(module, ModelHook())  # a hook of accelerate's, but none that loads the weights
    set_module_tensor_to_device(module, "weight", "meta")
    with pytest.raises(ModelError, match=r"1 weights of GPT2LMHeadModel are on the meta device \(e\.g\. transformer"):
        check_model(model, tok)
    with pytest.raises(ModelError, match="meta device"):
        module_weight(model, "transformer.h.1.mlp.c_proj")
