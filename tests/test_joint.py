"""Joint chains (``compute_edits(on_top_of=chain, joint=True)``): a chain of packs equals one batch of its edits."""

import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer

from memit_adapter import EditPack, EditRequest, compute_edits
from memit_adapter.errors import ConfigError, PackError
from memit_adapter.joint import chain_requests, supersedes
from memit_adapter.persistence import TARGETS_FILE
from memit_adapter.stats import collect_stats

SPORT, TEAM = "the sport played by {}", "the team of {}"


def _req(prompt, subject, target):
    return EditRequest(prompt, subject, target, relation_id="sport" if prompt == SPORT else "team")


FIRST = [_req(SPORT, "michael jordan", " tennis"), _req(SPORT, "lebron james", " golf"),
         _req(TEAM, "toko yuki", " rome")]
# a new relation of a subject the first pack edits (optimised again with it), a rewrite of a fact the first pack
# wrote (supersedes it), a new subject
SECOND = [_req(TEAM, "michael jordan", " paris"), _req(SPORT, "lebron james", " hockey"),
          _req(SPORT, "danielle darrieux", " tennis")]


@pytest.fixture(scope="module")
def setup():
    model, tok = model_and_tokenizer("gpt2")
    cfg = config(preserve_factor=0.5)
    stats = collect_stats(model, tok, corpus(40), cfg.layers, progress=False)
    first = compute_edits(model, tok, FIRST, cfg, stats=stats, progress=False)
    second = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], joint=True, progress=False)
    return model, tok, cfg, stats, first, second


def test_chain_requests_drop_what_a_later_pack_rewrites():
    assert supersedes(SECOND[1], FIRST[1]) and not supersedes(SECOND[0], FIRST[0])
    assert supersedes(EditRequest(SPORT, "lebron james", " x"), FIRST[1])  # same prompt, no relation_id
    assert not supersedes(SECOND[2], FIRST[0])


def test_a_joint_chain_equals_one_batch_of_its_edits(setup):
    model, tok, cfg, stats, first, second = setup
    union = [FIRST[0], FIRST[2]] + SECOND
    batch = compute_edits(model, tok, union, cfg, stats=stats, progress=False)
    assert second.parents == [first.pack_id] and second.requests == SECOND
    assert chain_requests([first, second]) == union
    torch.testing.assert_close(second.targets, batch.targets, rtol=1e-4, atol=1e-4 * float(batch.targets.abs().max()))
    for name, d in batch.deltas.items():
        want = d.weight_delta()
        got = first.deltas[name].weight_delta() + second.deltas[name].weight_delta()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    # the stored target vectors of the first pack's untouched subject were reused, not optimised again
    assert torch.equal(second.targets[1], first.targets[2])
    # against the sequential form, which keeps the first pack's delta and adds its own: not this
    sequential = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], progress=False)
    name = next(iter(batch.deltas))
    seq = first.deltas[name].weight_delta() + sequential.deltas[name].weight_delta()
    assert float((seq - batch.deltas[name].weight_delta()).norm()) > 0.05 * float(batch.deltas[name].weight_delta()
                                                                                  .norm())
    assert sequential.targets is None


def test_the_chain_applied_gives_the_one_batchs_logits(setup):
    model, tok, cfg, stats, first, second = setup
    union = [FIRST[0], FIRST[2]] + SECOND
    batch = compute_edits(model, tok, union, cfg, stats=stats, progress=False)
    ids = tok([r.text for r in union], return_tensors="pt", padding=True)
    with torch.no_grad():
        with first.applied(model), second.applied(model):
            chained = model(**ids).logits
        with batch.applied(model):
            single = model(**ids).logits
        base = model(**ids).logits
    torch.testing.assert_close(chained, single, rtol=1e-3, atol=1e-3 * float(single.abs().max()))
    assert float((single - base).abs().max()) > 100 * float((chained - single).abs().max())


def test_targets_are_saved_and_a_loaded_chain_extends_alike(setup, tmp_path):
    model, tok, cfg, stats, first, second = setup
    for i, p in enumerate((first, second)):
        p.save_pretrained(str(tmp_path / f"p{i}"))
    assert (tmp_path / "p1" / TARGETS_FILE).is_file()
    loaded = [EditPack.from_pretrained(str(tmp_path / f"p{i}")) for i in range(2)]
    assert torch.equal(loaded[1].targets, second.targets) and loaded[1].pack_id == second.pack_id
    third = [_req(TEAM, "alpha beta", " rome")]
    from_memory = compute_edits(model, tok, third, cfg, stats=stats, on_top_of=[first, second], joint=True,
                                progress=False)
    from_disk = compute_edits(model, tok, third, cfg, stats=stats, on_top_of=loaded, joint=True, progress=False)
    for name, d in from_memory.deltas.items():
        torch.testing.assert_close(from_disk.deltas[name].weight_delta(), d.weight_delta())
    assert from_disk.targets.shape[0] == 6


def test_a_damaged_targets_file_is_refused(setup, tmp_path):
    second = setup[5]
    second.save_pretrained(str(tmp_path / "p"))
    path = tmp_path / "p" / TARGETS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(PackError, match="does not match the hash"):
        EditPack.from_pretrained(str(tmp_path / "p"))


def test_joint_refuses_what_it_cannot_re_solve(setup):
    model, tok, cfg, stats, first, second = setup
    extra = [_req(TEAM, "alpha beta", " rome")]
    alone = compute_edits(model, tok, extra, cfg, stats=stats, progress=False)
    root = compute_edits(model, tok, extra, cfg, stats=stats, joint=True, progress=False)  # a chain's first pack
    assert root.pack_id == alone.pack_id and torch.equal(root.targets, alone.targets)
    with pytest.raises(ConfigError, match="not the packs before it"):
        compute_edits(model, tok, extra, cfg, stats=stats, on_top_of=[second], joint=True, progress=False)
    sequential = compute_edits(model, tok, SECOND, cfg, stats=stats, on_top_of=[first], progress=False)
    with pytest.raises(ConfigError, match="target vectors of its chain"):
        compute_edits(model, tok, extra, cfg, stats=stats, on_top_of=[first, sequential], joint=True, progress=False)
    with pytest.raises(ConfigError, match="layers"):
        compute_edits(model, tok, extra, config(layers=[2]), stats=stats, on_top_of=[first], joint=True,
                      progress=False)
    with first.applied(model), pytest.raises(ConfigError, match="detach or unmerge"):
        compute_edits(model, tok, extra, cfg, stats=stats, on_top_of=[first], joint=True, progress=False)
