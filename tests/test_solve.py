import pickle

import pytest
import torch

from memit_adapter.errors import StatisticsError
from memit_adapter.solve import cov_factor, layer_update, woodbury_pays
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
