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


def test_layer_update_rejects_singular_system():
    K = torch.zeros(8, 2)
    with pytest.raises(StatisticsError, match="singular"):
        layer_update(K, torch.ones(4, 2), torch.zeros(8, 8), 1.0)
