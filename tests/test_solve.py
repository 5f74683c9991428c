import pytest
import torch

from memit_adapter.errors import StatisticsError
from memit_adapter.solve import layer_update


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
