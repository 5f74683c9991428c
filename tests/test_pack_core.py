"""EditPack as an object: representation by size, SVD compression, stacking, identity."""

import pytest
import torch
from pack_utils import make_requests, random_pack
from tiny import tiny_model

from memit_adapter.config import MemitConfig
from memit_adapter.errors import ConflictingRequestsError, FingerprintMismatchError, PackError
from memit_adapter.pack import EditPack, LayerDelta
from memit_adapter.requests import EditRequest


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2")


def test_layer_delta_validates_and_compares():
    B, A = torch.randn(4, 2), torch.randn(2, 6)
    with pytest.raises(PackError):
        LayerDelta(B=B)
    with pytest.raises(PackError):
        LayerDelta(B=B, A=A, dense=B @ A)
    with pytest.raises(PackError, match="rank"):
        LayerDelta(B=B, A=torch.randn(3, 6))
    d = LayerDelta(B=B, A=A)
    assert d.shape == (4, 6) and d.rank == 2 and not d.is_dense
    assert d == LayerDelta(B=B.clone(), A=A.clone())
    assert d != LayerDelta(B=B.half(), A=A.half())
    torch.testing.assert_close(d.to_dense().dense, B @ A)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4)])
def test_dense_to_low_rank_is_exact(shape):
    dense = torch.randn(*shape)
    B, A = LayerDelta(dense=dense).lora_factors()
    assert B.shape[1] == min(shape)
    assert torch.equal(B @ A, dense)


def test_representation_chosen_by_size(model):
    # c_proj is (d_out, d_in) = (32, 128): n* = 32*128/160 = 25.6
    small, big = random_pack(model, rank=25), random_pack(model, rank=26)
    assert not any(d.is_dense for d in small.deltas.values())
    assert all(d.is_dense for d in big.deltas.values())
    assert big.nbytes < 26 * (32 + 128) * 4 * len(big.deltas)
    low = random_pack(model, rank=26, representation="low_rank")
    assert not any(d.is_dense for d in low.deltas.values())
    dense = random_pack(model, rank=2).set_representation("dense")
    assert all(d.is_dense for d in dense.deltas.values())
    with pytest.raises(PackError, match="representation"):
        random_pack(model, representation="sparse")


def test_compress_matches_independent_svd(model):
    pack = random_pack(model, rank=6)
    before = {n: d.weight_delta().double() for n, d in pack.deltas.items()}
    err = pack.compress(2)
    num = den = 0.0
    for name, full in before.items():
        S = torch.linalg.svdvals(full)
        num, den = num + float((S[2:] ** 2).sum()), den + float((S**2).sum())
        assert pack.deltas[name].rank == 2
        U, S_, Vh = torch.linalg.svd(full)
        best = (U[:, :2] * S_[:2]) @ Vh[:2]
        torch.testing.assert_close(pack.deltas[name].weight_delta().double(), best, atol=1e-5, rtol=1e-4)
    assert err == pytest.approx((num / den) ** 0.5, rel=1e-6)
    assert 0 < err < 1
    assert pack.compress(2) == pytest.approx(0.0, abs=1e-6)  # already rank 2
    with pytest.raises(PackError):
        pack.compress(0)


def test_pack_id_changes_with_content(model):
    a, b = random_pack(model, seed=0), random_pack(model, seed=0)
    assert a.pack_id == b.pack_id and a == b
    assert random_pack(model, seed=1).pack_id != a.pack_id
    b.requests[0] = EditRequest("{} plays the sport of", "alpha", " golf")
    assert b.pack_id != a.pack_id


def test_stack_sums_deltas_exactly(model):
    a = random_pack(model, layers=(1, 2), rank=2, seed=1)
    b = random_pack(model, layers=(2, 3), rank=3, seed=2, offset=5)
    s = EditPack.stack([a, b])
    assert sorted(s.deltas) == sorted(set(a.deltas) | set(b.deltas))
    shared = "transformer.h.2.mlp.c_proj"
    assert s.deltas[shared].rank == 5
    torch.testing.assert_close(s.deltas[shared].weight_delta(),
                               a.deltas[shared].weight_delta() + b.deltas[shared].weight_delta())
    assert torch.equal(s.deltas["transformer.h.1.mlp.c_proj"].B, a.deltas["transformer.h.1.mlp.c_proj"].B)
    assert s.requests == a.requests + b.requests
    assert s.fingerprint is None  # roots on different module sets: no common base fingerprint


def test_stack_refuses_contradicting_facts_and_names_them(model):
    a = random_pack(model, seed=1)
    b = random_pack(model, seed=2, n_requests=2)
    b.requests = [EditRequest("{} plays the sport of", "michael jordan", " hockey")]
    with pytest.raises(ConflictingRequestsError, match="michael jordan plays the sport of.*baseball.*hockey"):
        EditPack.stack([a, b])
    with pytest.raises(PackError):
        EditPack.stack([])


def test_stack_records_parents_and_checks_base(model):
    a = random_pack(model, seed=1)
    child = random_pack(model, seed=2, offset=5, parents=[a.pack_id], fingerprint="sha256:after-a")
    s = EditPack.stack([a, child])
    assert s.parents == [] and s.fingerprint == a.fingerprint  # the root's base
    grand = random_pack(model, seed=3, offset=9, parents=["sha256:elsewhere"])
    assert EditPack.stack([a, grand]).parents == ["sha256:elsewhere"]
    other = random_pack(model, seed=4, offset=12, fingerprint="sha256:another-model")
    with pytest.raises(FingerprintMismatchError):
        EditPack.stack([a, other])
    assert EditPack.stack([a, other], force=True).fingerprint is None


def test_stack_refuses_other_model_type(model):
    a = random_pack(model)
    b = EditPack(deltas=dict(a.deltas), requests=make_requests(1, offset=7), config=MemitConfig(layers=[1]),
                 model_type="gptj")
    with pytest.raises(PackError, match="model types"):
        EditPack.stack([a, b])


def test_pack_validates_fields(model):
    with pytest.raises(PackError):
        EditPack(deltas={}, requests=[], config=MemitConfig(), model_type="gpt2")
    with pytest.raises(PackError):
        EditPack(deltas={"x": torch.zeros(2, 2)}, requests=[], config=MemitConfig(), model_type="gpt2")
    with pytest.raises(PackError):
        EditPack(deltas={"x": LayerDelta(dense=torch.zeros(2, 2))}, requests=[], config={}, model_type="gpt2")
