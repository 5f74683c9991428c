"""Step 3 of MEMIT for one layer: the closed-form update ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` as ``B @ A``.

Usage::

    B, A = layer_update(keys, residuals, cov, lam=15000.0)   # keys (d_in, n), residuals (d_out, n)
    delta_w = B @ A                                            # (d_out, d_in)
"""

from __future__ import annotations

import torch

from .errors import StatisticsError


def layer_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, lam: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of the MEMIT update of one layer, computed in float64.

    Args:
        keys: ``(d_in, n)`` the requests' keys ``K`` at this layer.
        residuals: ``(d_out, n)`` the part ``R`` of ``z - cur`` this layer must write.
        cov: ``(d_in, d_in)`` the keys' uncentered second moment ``C``.
        lam: ``λ``, the weight of ``C`` (``mom2_update_weight``).

    Returns:
        ``B = R`` ``(d_out, n)`` and ``A = ((λC + K Kᵀ)⁻¹ K)ᵀ`` ``(n, d_in)``, float64, with ``ΔW = B @ A``.
        The system matrix is symmetric positive (semi-)definite: Cholesky, with an LU solve as fallback.
    """
    K = keys.double()
    system = lam * cov.double() + K @ K.T  # (d_in, d_in)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        X = torch.cholesky_solve(K, chol)  # (d_in, n)
    else:
        X, info = torch.linalg.solve_ex(system, K)
        if int(info) != 0 or not torch.isfinite(X).all():
            raise StatisticsError(
                "λC + KKᵀ is singular: the second-moment statistics are degenerate (too few corpus tokens "
                "for d_ff?); collect them over more text or raise mom2_update_weight"
            )
    return residuals.double(), X.T.contiguous()
