import pickle

import pytest
import torch

from memit_adapter.errors import StatisticsError
from memit_adapter.solve import (
    cached_null_space,
    cov_factor,
    layer_update,
    null_space,
    projected_update,
    woodbury_pays,
)
from memit_adapter.stats import SecondMoment


@pytest.mark.parametrize("d_in,d_out,n,lam", [(24, 16, 5, 3.0), (16, 24, 30, 0.5), (32, 8, 1, 100.0)])
def test_layer_update_matches_dense_least_squares(d_in, d_out, n, lam):
    """ΔW minimises ||ΔK - R||² + λ E||Δk||² over corpus keys X: solve the stacked system with lstsq."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, d_in, generator=g, dtype=torch.float64)  # corpus keys
    cov = X.T @ X / X.shape[0]
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    B, A = layer_update(K.float(), R.float(), cov.float(), lam)
    assert B.shape == (d_out, n) and A.shape == (n, d_in) and B.dtype == torch.float64
    lhs = torch.cat([K.T, (lam / X.shape[0]) ** 0.5 * X])  # (n + N, d_in)
    rhs = torch.cat([R.T, torch.zeros(X.shape[0], d_out, dtype=torch.float64)])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T  # (d_out, d_in)
    torch.testing.assert_close(B @ A, expected, rtol=1e-4, atol=1e-5)


def test_dead_inputs_get_no_update_and_the_rest_is_exact():
    """Inputs that never fire (zero rows of C and K) make λC + KKᵀ singular: their update is zero, and the
    live inputs get the solution of the reduced system."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(100, 12, generator=g, dtype=torch.float64)
    X[:, [3, 7]] = 0
    K = torch.randn(12, 4, generator=g, dtype=torch.float64)
    K[[3, 7]] = 0
    R = torch.randn(6, 4, generator=g, dtype=torch.float64)
    B, A = layer_update(K, R, X.T @ X / 100, 2.0)
    assert torch.isfinite(A).all() and A[:, [3, 7]].abs().max() < 1e-12
    live = [i for i in range(12) if i not in (3, 7)]
    _, A_live = layer_update(K[live], R, (X.T @ X / 100)[live][:, live], 2.0)
    torch.testing.assert_close(A[:, live], A_live, rtol=1e-6, atol=1e-9)


def test_layer_update_rejects_non_finite_system():
    with pytest.raises(StatisticsError, match="positive definite"):
        layer_update(torch.ones(8, 2), torch.ones(4, 2), torch.full((8, 8), float("nan")), 1.0)


def _problem(d_in, d_out, n, n_corpus=200, seed=0, dead=()):
    """Corpus keys of uneven scales (a condition number like real MLP keys'), their second moment, keys, residuals."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d_in, dtype=torch.float64)
    X = torch.randn(n_corpus, d_in, generator=g, dtype=torch.float64) * scales
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    X[:, list(dead)], K[list(dead)] = 0, 0
    return (X.T @ X / n_corpus).float(), K.float(), torch.randn(d_out, n, generator=g, dtype=torch.float64).float()


@pytest.mark.parametrize("d_in,d_out,n,lam", [(24, 16, 5, 3.0), (64, 8, 1, 100.0), (48, 24, 30, 0.5),
                                              (40, 8, 60, 1e4)])
def test_woodbury_route_equals_dense_route(d_in, d_out, n, lam):
    """Given a factor of C, an n x n system replaces the d_in x d_in one: same A within float64 rounding (also
    with more edits than inputs, where the route is allowed though dearer)."""
    cov, K, R = _problem(d_in, d_out, n)
    factor = cov_factor(cov)
    assert factor.ridge == 0.0 and factor.chol.dtype == torch.float64
    B_dense, A_dense = layer_update(K, R, cov, lam)
    B, A = layer_update(K, R, cov, lam, factor=factor)
    assert torch.equal(B, B_dense) and A.shape == (n, d_in) and A.dtype == torch.float64 and A.device == K.device
    torch.testing.assert_close(A, A_dense, rtol=1e-9, atol=1e-12)


def test_woodbury_route_with_dead_inputs():
    """Dead inputs make C singular: the factor decouples them without a ridge, so their update is exactly zero and
    the live inputs get the reduced system's solution; the dense route's ridge moves it by about 1e-7."""
    dead = [3, 7, 20]
    cov, K, R = _problem(32, 8, 6, dead=dead)
    factor = cov_factor(cov)
    assert factor.ridge == 0.0
    _, A = layer_update(K, R, cov, 2.0, factor=factor)
    assert torch.equal(A[:, dead], torch.zeros(6, 3, dtype=torch.float64))
    live = [i for i in range(32) if i not in dead]
    _, A_live = layer_update(K[live], R, cov[live][:, live], 2.0)  # no dead input: no ridge
    torch.testing.assert_close(A[:, live], A_live, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(A, layer_update(K, R, cov, 2.0)[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", ["fires_where_C_is_zero", "fewer_corpus_keys_than_inputs"])
def test_woodbury_route_gives_way_to_the_dense_one(case, caplog):
    """A key firing on an input that never fired in the corpus (the normal equations catch it), or a C singular
    beyond its dead inputs (its factor needed a ridge that would move the result): the dense route answers."""
    if case == "fires_where_C_is_zero":
        cov, K, R = _problem(32, 8, 6, dead=[3, 7])
        K[3, 0] = 1.0
    else:
        cov, K, R = _problem(64, 8, 30, n_corpus=40)
    factor = cov_factor(cov)
    assert (factor.ridge > 0) == (case == "fewer_corpus_keys_than_inputs")
    with caplog.at_level("INFO", logger="memit_adapter.solve"):
        _, A = layer_update(K, R, cov, 1.0, factor=factor)
    assert "solving densely" in caplog.text
    assert torch.equal(A, layer_update(K, R, cov, 1.0)[1])


def test_woodbury_pays_for_small_packs_only():
    d = 16384
    assert woodbury_pays(1000, d, factored=False) and woodbury_pays(7000, d, factored=False)
    assert not woodbury_pays(9000, d, factored=False) and woodbury_pays(9000, d, factored=True)
    assert not woodbury_pays(11000, d, factored=True) and not woodbury_pays(20000, d, factored=True)


def test_cov_factor_rejects_non_finite_statistics():
    with pytest.raises(StatisticsError, match="not positive definite"):
        cov_factor(torch.full((8, 8), float("nan")))


def test_second_moment_keeps_its_factor_until_it_changes():
    cov, K, R = _problem(24, 8, 4)
    stat = SecondMoment(mom2=cov.clone(), count=200)
    assert not stat.has_factor()
    first = stat.factor()
    assert stat.has_factor() and stat.factor().chol is first.chol  # reused, not recomputed
    torch.testing.assert_close(first.chol, cov_factor(cov).chol, rtol=0, atol=0)
    restored = pickle.loads(pickle.dumps(stat))  # the cache is not pickled
    assert not restored.has_factor() and torch.equal(restored.mom2, stat.mom2) and restored.count == 200
    stat.mom2.mul_(2.0)  # changed in place: factored again
    assert not stat.has_factor()
    torch.testing.assert_close(stat.factor().chol, cov_factor(2 * cov).chol, rtol=0, atol=0)
    stat.mom2 = cov.clone()  # replaced
    assert not stat.has_factor()


# -- AlphaEdit-style null-space projection ----------------------------------------------------------------------

def _published_alphaedit(cov, K, R, threshold, l2, K_p=None):
    """The published form, independently: P from an SVD of C (singular values below the threshold), then
    ΔWᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ with a plain (non-symmetric) solve."""
    C = cov.double()
    U, S, _ = torch.linalg.svd(0.5 * (C + C.T))
    small = U[:, S < threshold]
    P = small @ small.T
    K = K.double()
    M = K @ K.T + (0 if K_p is None else K_p.double() @ K_p.double().T)
    upd = torch.linalg.solve(P @ M + l2 * torch.eye(C.shape[0], dtype=torch.float64), P @ K @ R.double().T)
    return upd.T, small.shape[1]  # (d_out, d_in)


@pytest.mark.parametrize("d_in,d_out,n,n_p,threshold,l2", [
    (24, 16, 5, 0, 0.5, 10.0),     # n + n_p < m: the (n + n_p)-square system
    (24, 8, 20, 0, 1.5, 0.1),      # n > m: the m-square system
    (32, 8, 4, 6, 1.0, 1.0),       # earlier edits' keys join the system
    (32, 8, 4, 40, 1.0, 3.0),      # ... more of them than the null space has directions
])
def test_projected_update_equals_the_published_solve(d_in, d_out, n, n_p, threshold, l2):
    cov, K, R = _problem(d_in, d_out, n, seed=2)
    K_p = _problem(d_in, d_out, n_p, seed=3)[1] if n_p else None
    space = null_space(cov, threshold)
    expected, m = _published_alphaedit(cov, K, R, threshold, l2, K_p)
    assert space.dim == m and 0 < m < d_in
    B, A = projected_update(K, R, space, l2, prior_keys=K_p)
    assert B.shape == (d_out, n) and A.shape == (n, d_in) and A.dtype == torch.float64 and torch.equal(B, R.double())
    torch.testing.assert_close(B @ A, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def test_projected_update_leaves_the_retained_directions_alone():
    """ΔW v = 0 for the eigenvectors of C above the threshold (the preserved keys' directions), while it writes
    the edits' keys; relative and absolute thresholds pick the same eigenvectors for the same cut."""
    cov, K, R = _problem(40, 8, 6, seed=4)
    evals, vecs = torch.linalg.eigh(cov.double())
    mean = float(cov.double().diagonal().mean())
    space = null_space(cov, 0.3, "mean_eigenvalue")
    assert space.threshold == pytest.approx(0.3 * mean)
    kept = vecs[:, evals >= 0.3 * mean]
    assert 0 < kept.shape[1] < 40 and space.dim + kept.shape[1] == 40
    assert torch.equal(space.basis, null_space(cov, 0.3 * mean).basis)
    top = float(evals[-1])
    assert null_space(cov, 0.02, "max_eigenvalue").dim == int((evals < 0.02 * top).sum())
    B, A = projected_update(K, R, space, 0.01)
    dW = B @ A
    assert float((dW @ kept).abs().max()) < 1e-10 * float(dW.abs().max())
    assert float((dW @ K.double() - R.double()).norm()) < 0.5 * float(R.norm())  # the edits are (mostly) written
    # MEMIT's update, for contrast, moves the preserved directions
    dW_memit = torch.matmul(*layer_update(K, R, cov, 1.0))
    assert float((dW_memit @ kept).abs().max()) > 1e-3 * float(dW_memit.abs().max())


def test_null_space_edge_cases():
    cov, K, R = _problem(16, 4, 3, seed=5)
    empty = null_space(cov, 1e-12)
    assert empty.dim == 0
    B, A = projected_update(K, R, empty, 10.0)
    assert torch.equal(A, torch.zeros(3, 16, dtype=torch.float64))
    assert null_space(cov, 1e6).dim == 16
    with pytest.raises(ValueError, match="relative_to"):
        null_space(cov, 0.1, "median")
    with pytest.raises(ValueError, match="l2"):
        projected_update(K, R, empty, 0.0)
    dead = _problem(16, 4, 3, seed=5, dead=[2, 9])
    _, A = projected_update(dead[1], dead[2], null_space(dead[0], 0.05), 1.0)
    assert float(A[:, [2, 9]].abs().max()) < 1e-12  # inputs that never fire are not written


def test_cached_null_space_is_reused_until_c_changes():
    cov, _, _ = _problem(24, 8, 4, seed=6)
    first = cached_null_space(cov, 0.1, "mean_eigenvalue")
    again = cached_null_space(cov, 0.1, "mean_eigenvalue")
    assert again.basis.data_ptr() == cached_null_space(cov, 0.1, "mean_eigenvalue").basis.data_ptr()  # the kept one
    assert torch.equal(first.basis, again.basis)
    other = cached_null_space(cov, 0.5, "mean_eigenvalue")  # another threshold: computed afresh
    assert other.dim > first.dim
    cov.mul_(4.0)  # changed in place: recomputed (the relative threshold scales with C: the same directions)
    scaled = cached_null_space(cov, 0.5, "absolute")
    assert scaled.threshold == 0.5 and scaled.dim < null_space(cov / 4.0, 0.5).dim
    assert cached_null_space(cov, 0.5, "mean_eigenvalue").dim == other.dim


def test_config_validates_the_null_space_fields():
    from memit_adapter import ConfigError, MemitConfig

    cfg = MemitConfig()
    assert cfg.nullspace_threshold == 0.0 and cfg.nullspace_threshold_of == "absolute" and cfg.nullspace_l2 == 10.0
    on = MemitConfig(nullspace_threshold=0.1, nullspace_threshold_of="mean_eigenvalue", nullspace_l2=0.5)
    assert MemitConfig.from_json(on.to_json()) == on
    for bad in (dict(nullspace_threshold=-1.0), dict(nullspace_l2=0.0), dict(nullspace_threshold_of="median"),
                dict(nullspace_threshold="0.1"), dict(nullspace_l2=True), dict(nullspace_threshold=float("nan"))):
        with pytest.raises(ConfigError, match="nullspace"):
            MemitConfig(**bad)


def test_engine_option_off_is_memits_solve_and_on_is_the_projected_one(monkeypatch):
    """Off (the default): the projection is never computed and fields it alone reads change nothing, bit for bit.
    On: every layer's delta is the null-space solve of the keys the engine measured (rank n, B = R), zero on the
    retained directions of C; sequential packs pass the earlier packs' keys to it instead of folding them into C."""
    from engine_setup import config, corpus, model_and_tokenizer, requests

    from memit_adapter import compute_edits
    from memit_adapter import engine as engine_mod
    from memit_adapter.stats import collect_stats

    model, tok = model_and_tokenizer("gpt2")
    stats = collect_stats(model, tok, corpus(), [1, 2], progress=False)
    reqs = requests()
    base = compute_edits(model, tok, reqs, config(v_num_grad_steps=5), stats=stats, progress=False)

    def forbidden(*a, **k):
        raise AssertionError("the null-space solve ran with the option off")

    monkeypatch.setattr(engine_mod, "projected_update", forbidden)
    other = compute_edits(model, tok, reqs, config(v_num_grad_steps=5, nullspace_l2=0.5,
                                                   nullspace_threshold_of="max_eigenvalue"),
                          stats=stats, progress=False)
    for name in base.deltas:
        assert torch.equal(base.deltas[name].A, other.deltas[name].A)
        assert torch.equal(base.deltas[name].B, other.deltas[name].B)
    monkeypatch.undo()

    calls = []
    real = engine_mod.projected_update

    def spy(keys, residuals, space, l2, *, prior_keys=None):
        calls.append((space, l2, None if prior_keys is None else prior_keys.shape))
        return real(keys, residuals, space, l2, prior_keys=prior_keys)

    monkeypatch.setattr(engine_mod, "projected_update", spy)
    cfg = config(v_num_grad_steps=5, nullspace_threshold=0.5, nullspace_threshold_of="mean_eigenvalue",
                 nullspace_l2=0.5)
    on = compute_edits(model, tok, reqs, cfg, stats=stats, progress=False)
    assert len(calls) == 2 and all(c[1] == 0.5 and c[2] is None for c in calls)
    for (space, _, _), (layer, name) in zip(calls, zip(cfg.layers, on.deltas)):
        C = stats[layer].mom2.double()
        evals, vecs = torch.linalg.eigh(0.5 * (C + C.T))
        kept = vecs[:, evals >= 0.5 * float(C.diagonal().mean())]
        assert space.dim + kept.shape[1] == C.shape[0] and 0 < space.dim
        d = on.deltas[name]
        assert d.A.shape == (len(reqs), C.shape[0]) and d.B.shape[1] == len(reqs)
        dW = d.weight_delta().double()
        assert float((dW @ kept).abs().max()) < 1e-5 * float(dW.abs().max())
        assert not torch.allclose(dW, base.deltas[name].weight_delta().double())

    first = compute_edits(model, tok, reqs[:3], cfg, stats=stats, progress=False)
    calls.clear()
    compute_edits(model, tok, reqs[3:], cfg, stats=stats, on_top_of=[first], progress=False)
    assert [c[2] for c in calls] == [(C.shape[0], 3)] * 2  # the 3 earlier requests' keys, at each layer
