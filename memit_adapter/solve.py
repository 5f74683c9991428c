"""Step 3 of MEMIT for one layer: the closed-form update ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` as ``B @ A``.

Usage::

    B, A = layer_update(keys, residuals, cov, lam=15000.0)   # keys (d_in, n), residuals (d_out, n)
    delta_w = B @ A                                            # (d_out, d_in)
"""

from __future__ import annotations

import logging

import torch

from .errors import StatisticsError

logger = logging.getLogger(__name__)


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
        The system matrix is symmetric positive semi-definite and is solved by Cholesky. Inputs that
        never fire (dead MLP units: a zero row in ``C`` and in ``K``) make it singular; a ridge of
        ``1e-10``-``1e-4`` x its mean diagonal is then added, which leaves those inputs' update at zero.
    """
    K = keys.double()
    system = lam * cov.double() + K @ K.T  # (d_in, d_in)
    system = 0.5 * (system + system.T)
    scale = system.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(system.shape[0], dtype=system.dtype, device=system.device)
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        chol, info = torch.linalg.cholesky_ex(system + jitter * scale * eye if jitter else system)
        if int(info) == 0:
            if jitter:
                logger.info("λC + KKᵀ is singular (dead inputs?); solved with a ridge of %.0e x mean diagonal", jitter)
            X = torch.cholesky_solve(K, chol)  # (d_in, n)
            if torch.isfinite(X).all():
                return residuals.double(), X.T.contiguous()
    raise StatisticsError(
        "λC + KKᵀ is not positive definite even with a ridge: the second-moment statistics are degenerate "
        "or not finite; collect them over more text or raise mom2_update_weight"
    )
