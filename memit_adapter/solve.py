"""Step 3 of MEMIT for one layer: the closed-form update ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` as ``B @ A``.

Usage::

    B, A = layer_update(keys, residuals, cov, lam=15000.0)   # keys (d_in, n), residuals (d_out, n)
    delta_w = B @ A                                            # (d_out, d_in)
    factor = cov_factor(cov)                                   # once per layer, reused by every pack
    B, A = layer_update(keys, residuals, cov, lam=15000.0, factor=factor)   # an n x n system per pack

Two routes to the same ``A`` (within float64 rounding): the dense one factors the ``d_in x d_in`` matrix
``λC + KKᵀ`` for every pack; the Woodbury one solves an ``n x n`` system given a Cholesky factor of ``C``
(which does not depend on λ or on the pack). :func:`woodbury_pays` says which is cheaper.

The AlphaEdit-style alternative (Fang et al., ICLR 2025), ``MemitConfig.nullspace_threshold > 0``: the update is
confined to the (approximate) null space of the preserved keys, the eigenvectors ``U`` of ``C`` whose eigenvalues
are below a threshold, ``P = U Uᵀ``, and solves ``ΔWᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ``::

    space = null_space(cov, 2e-2)                              # or cached_null_space(cov, ...), once per layer
    B, A = projected_update(keys, residuals, space, l2=10.0)   # ΔW = B @ A, ΔW·v = 0 for v ⟂ range(U)
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from .errors import StatisticsError

logger = logging.getLogger(__name__)

_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4)  # ridges tried, x the mean diagonal, until Cholesky succeeds
_WOODBURY_RTOL = 1e-8  # relative residual of the normal equations above which the Woodbury route is not trusted


@dataclass(frozen=True)
class CovFactor:
    """Lower Cholesky factor ``L`` of ``C`` in float64 (dead inputs decoupled, see :func:`cov_factor`), so that
    ``(λC)⁻¹ x = L⁻ᵀ L⁻¹ x / λ`` for any λ."""

    chol: torch.Tensor  # (d_in, d_in) float64, lower triangular
    ridge: float  # added to the whole diagonal: 0 unless C is singular beyond its dead inputs (then unused)

    def to(self, device: torch.device | str | None) -> CovFactor:
        return CovFactor(self.chol.to(device), self.ridge)


def cov_factor(cov: torch.Tensor) -> CovFactor:
    """Cholesky factor of the second moment ``cov`` ``(d_in, d_in)`` in float64, on ``cov``'s device.

    Inputs that never fire (dead MLP units: a zero row of ``C``) get a unit of the mean diagonal on their diagonal:
    it decouples them, and as their keys are zero too their update stays exactly zero while the other inputs' is
    untouched. A ``C`` singular beyond its dead inputs (fewer corpus keys than inputs) is factored with the smallest
    ridge of ``1e-10``-``1e-4`` x the mean diagonal that lets Cholesky succeed; :func:`layer_update` does not use
    such a factor, since that ridge would move the update. Raises :class:`StatisticsError` when no ridge helps.
    """
    C = cov.double()
    C = 0.5 * (C + C.T)
    scale = C.diagonal().mean().clamp_min(1e-30)
    dead = C.diagonal() == 0
    C.diagonal().copy_(torch.where(dead, scale, C.diagonal()))
    chol, jitter = _cholesky_with_ridge(C)
    if chol is None:
        raise StatisticsError("the second moment C is not positive definite even with a ridge: the statistics are "
                              "degenerate or not finite; collect them over more text")
    return CovFactor(chol, jitter * float(scale))


def woodbury_pays(n: int, d_in: int, factored: bool) -> bool:
    """Whether the Woodbury route takes fewer flops than the dense one for ``n`` edits of ``d_in`` inputs.

    Dense: ``KKᵀ`` (2d²n), Cholesky (d³/3), two triangular solves with n columns (2d²n). Woodbury: two triangular
    solves with ``L`` (2d²n), ``YᵀY`` and the solve with ``S`` (4dn²), Cholesky of ``S`` (n³/3), plus d³/3 when the
    factor of ``C`` must first be computed. It pays below about n = 0.61·d_in with a cached factor, 0.49·d_in
    without (d_in = 16,384: up to 10,000 or 8,000 edits).
    """
    d = float(d_in)
    woodbury = 2 * d * d * n + 4 * d * n * n + n ** 3 / 3 + (0.0 if factored else d ** 3 / 3)
    dense = 4 * d * d * n + d ** 3 / 3
    return woodbury < dense


def layer_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, lam: float, *,
                 factor: CovFactor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of the MEMIT update of one layer, computed in float64 on ``keys``' device.

    Args:
        keys: ``(d_in, n)`` the requests' keys ``K`` at this layer.
        residuals: ``(d_out, n)`` the part ``R`` of ``z - cur`` this layer must write.
        cov: ``(d_in, d_in)`` the keys' uncentered second moment ``C``.
        lam: ``λ``, the weight of ``C`` (``mom2_update_weight``).
        factor: :func:`cov_factor` of ``cov``. When given, the Woodbury identity
            ``(λC + KKᵀ)⁻¹K = (λC)⁻¹K (I + Kᵀ(λC)⁻¹K)⁻¹`` leaves an ``n x n`` system to solve; else the
            ``d_in x d_in`` system ``λC + KKᵀ`` is factored (cheaper once n is near d_in, see :func:`woodbury_pays`).

    Returns:
        ``B = R`` ``(d_out, n)`` and ``A = ((λC + K Kᵀ)⁻¹ K)ᵀ`` ``(n, d_in)``, float64 on ``keys``' device, with
        ``ΔW = B @ A``. The dense system is symmetric positive semi-definite and is solved by Cholesky. Inputs that
        never fire (dead MLP units: a zero row in ``C`` and in ``K``) make it singular; a ridge of ``1e-10``-``1e-4``
        x its mean diagonal is then added, which leaves those inputs' update at zero. The Woodbury route (taken when
        ``factor`` needed no ridge, see :func:`cov_factor`) leaves them at zero exactly; its result is checked
        against the normal equations, and the dense route answers when it fails (a key that fires on an input
        that never fired in the corpus).

    Peak memory on ``keys``' device, in float64 words, plus ``cov`` (``d_in²`` of its dtype): dense
    ``2·d_in² + 2·d_in·n``; Woodbury ``d_in² + 3·d_in·n + 2·n²``. GPT-J (d_in 16,384), 10,000 edits, dense: 8 GB.
    """
    device = keys.device
    K = keys.double()  # (d_in, n)
    if factor is not None and factor.ridge == 0:
        A = _woodbury(K, cov.to(device), lam, factor.to(device))
        if A is not None:
            return residuals.double().to(device), A
        logger.info("the Woodbury solve does not meet the normal equations (a key fires where C is zero?); "
                    "solving densely")
    elif factor is not None:
        logger.info("C is singular beyond its dead inputs (factored with a ridge); solving densely")
    return residuals.double().to(device), _dense(K, cov.to(device), lam)


def _dense(K: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    system = K @ K.T  # (d_in, d_in)
    system.add_(cov, alpha=lam)
    system = system + system.T
    system.mul_(0.5)
    chol, jitter = _cholesky_with_ridge(system)
    if chol is not None:
        if jitter:
            logger.info("λC + KKᵀ is singular (dead inputs?); solved with a ridge of %.0e x mean diagonal", jitter)
        X = torch.cholesky_solve(K, chol)  # (d_in, n)
        if torch.isfinite(X).all():
            return X.T.contiguous()
    raise StatisticsError(
        "λC + KKᵀ is not positive definite even with a ridge: the second-moment statistics are degenerate "
        "or not finite; collect them over more text or raise mom2_update_weight"
    )


def _woodbury(K: torch.Tensor, cov: torch.Tensor, lam: float, factor: CovFactor) -> torch.Tensor | None:
    """``A`` from ``C = L Lᵀ``: with ``Y = L⁻¹K`` and ``S = I + YᵀY / λ``, ``A = S⁻¹ Yᵀ L⁻¹ / λ``; None when the
    result does not satisfy ``(λC + KKᵀ) Aᵀ = K`` to ``_WOODBURY_RTOL``."""
    L = factor.chol
    Y = torch.linalg.solve_triangular(L, K, upper=False)  # (d_in, n)
    S = Y.T @ Y
    S.div_(lam).diagonal().add_(1.0)  # (n, n), eigenvalues >= 1
    chol_s, info = torch.linalg.cholesky_ex(0.5 * (S + S.T))
    if int(info) != 0:
        return None
    Z = torch.cholesky_solve(Y.T, chol_s)  # (n, d_in)
    del Y
    A = torch.linalg.solve_triangular(L, Z, upper=False, left=False).div_(lam)  # (n, d_in): Z L⁻¹ / λ
    # one random combination of the columns checks the whole solve: r = λC Aᵀw + KKᵀ Aᵀw - Kw, against the size
    # of its terms (what rounding alone leaves); C in row blocks, so that no float64 copy of it is made
    w = torch.randn(K.shape[1], generator=torch.Generator().manual_seed(0), dtype=K.dtype).to(K.device)
    x = w @ A  # (d_in,)
    terms = (lam * torch.cat([block.double() @ x for block in cov.split(4096)]), K @ (K.T @ x), K @ w)
    r = terms[0] + terms[1] - terms[2]
    ok = torch.isfinite(A).all() & (r.norm() <= _WOODBURY_RTOL * sum(t.norm() for t in terms))
    return A if bool(ok) else None


def _cholesky_with_ridge(system: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Lower Cholesky factor of ``system`` + the smallest ridge of ``_JITTERS`` (x its mean diagonal) that
    succeeds, and that ridge; ``(None, 0.0)`` when none does."""
    scale = system.diagonal().mean().clamp_min(1e-30)
    diagonal = system.diagonal().clone()
    for jitter in _JITTERS:
        if jitter:
            system.diagonal().copy_(diagonal + jitter * scale)
        chol, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0 and torch.isfinite(chol).all():
            return chol, jitter
    return None, 0.0


# -- AlphaEdit-style null-space projection -------------------------------------------------------------------------

NULLSPACE_REFERENCES = ("absolute", "max_eigenvalue", "mean_eigenvalue")


@dataclass(frozen=True)
class NullSpace:
    """The approximate null space of a second moment ``C``: ``basis`` ``U`` ``(d_in, m)`` float64, orthonormal
    eigenvectors of ``C`` whose eigenvalues are below ``threshold`` (absolute, after the reference was applied),
    so that ``P = U Uᵀ`` projects onto it; ``eigenvalues`` ``(d_in,)`` all of ``C``'s, ascending (the first m
    are the null space's)."""

    basis: torch.Tensor  # (d_in, m) float64
    threshold: float
    eigenvalues: torch.Tensor  # (d_in,) float64, ascending

    @property
    def dim(self) -> int:
        return self.basis.shape[1]

    def projector(self) -> torch.Tensor:
        """``P = U Uᵀ`` ``(d_in, d_in)`` float64 (not kept: the solve uses ``U``)."""
        return self.basis @ self.basis.T

    def to(self, device: torch.device | str | None) -> NullSpace:
        return NullSpace(self.basis.to(device), self.threshold, self.eigenvalues.to(device))


def null_space(cov: torch.Tensor, threshold: float, relative_to: str = "absolute") -> NullSpace:
    """Eigenvectors of the symmetric part of ``cov`` ``(d_in, d_in)`` (in float64, on its device) with eigenvalue
    ``< threshold x reference``, the reference being 1 (``"absolute"``: AlphaEdit's published rule, threshold 2e-2
    on GPT-2 XL, GPT-J and Llama3-8B statistics), the largest eigenvalue (``"max_eigenvalue"``) or the mean one
    (``"mean_eigenvalue"``, i.e. the mean diagonal of ``C``, ``E‖k‖² / d_in``). Inputs that never fire (zero
    rows of ``C``) have eigenvalue 0 and are in the null space; their keys are zero too, so their update stays 0.

    Cost: one ``d_in x d_in`` symmetric eigendecomposition (``eigh``, about ``9·d_in³`` flops; GPT-J's 16,384
    inputs: tens of seconds on a GPU). Memory: ``C`` in float64 and its eigenvectors, ``2·d_in²`` float64 words.
    """
    if relative_to not in NULLSPACE_REFERENCES:
        raise ValueError(f"relative_to must be one of {NULLSPACE_REFERENCES}, got {relative_to!r}")
    C = cov.double()
    C = 0.5 * (C + C.T)
    if not torch.isfinite(C).all():
        raise StatisticsError("the second moment C is not finite: no null space can be taken from it")
    eigenvalues, vectors = torch.linalg.eigh(C)  # ascending
    reference = {"absolute": 1.0, "max_eigenvalue": float(eigenvalues[-1].clamp_min(0)),
                 "mean_eigenvalue": float(C.diagonal().mean().clamp_min(0))}[relative_to]
    cut = threshold * reference
    m = int((eigenvalues < cut).sum())
    return NullSpace(vectors[:, :m].contiguous(), cut, eigenvalues)


# id(C) -> (weak reference to C, C._version when computed, (threshold, relative_to), the space, in host memory)
_NULL_SPACES: dict[int, tuple[weakref.ref, int, tuple[float, str], NullSpace]] = {}


def cached_null_space(cov: torch.Tensor, threshold: float, relative_to: str = "absolute",
                      device: torch.device | str | None = None) -> NullSpace:
    """:func:`null_space` of ``cov`` on ``device``, computed there the first time, then kept in host memory and
    reused for the same tensor, threshold and reference, until ``cov`` is changed in place, replaced by another
    tensor or freed (the entry goes with it), like ``SecondMoment.factor`` keeps the Cholesky factor. Memory kept
    per layer: ``d_in·(m + 1)`` float64 words for a null space of dimension ``m`` (at most ``d_in²``: GPT-J's
    16,384 inputs, 2.1 GB a layer were every direction in it)."""
    key = (float(threshold), relative_to)
    entry = _NULL_SPACES.get(id(cov))
    if entry is not None and entry[0]() is cov and entry[1] == cov._version and entry[2] == key:
        return entry[3].to(device)
    space = null_space(cov.to(device), threshold, relative_to)
    ident = id(cov)

    def forget(ref: weakref.ref) -> None:  # C is freed: its entry goes (unless a newer tensor took the id)
        if ident in _NULL_SPACES and _NULL_SPACES[ident][0] is ref:
            del _NULL_SPACES[ident]

    _NULL_SPACES[ident] = (weakref.ref(cov, forget), cov._version, key, space.to("cpu"))
    return space


def projected_update(keys: torch.Tensor, residuals: torch.Tensor, space: NullSpace, l2: float, *,
                     prior_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of the AlphaEdit update of one layer, float64 on ``keys``' device.

    Args:
        keys: ``(d_in, n)`` the requests' keys ``K``.
        residuals: ``(d_out, n)`` the part ``R`` of ``z - cur`` this layer must write.
        space: the null space ``U`` of the preserved keys' second moment (:func:`null_space`), ``P = U Uᵀ``.
        l2: ``α`` > 0, the ridge on the update (AlphaEdit's ``L2``; published 10).
        prior_keys: ``(d_in, n_p)`` keys of earlier edits ``K_p`` (sequential editing), kept like the new ones:
            their term ``P K_pK_pᵀ`` asks ``ΔW K_p ≈ 0``.

    Returns:
        ``B = R`` ``(d_out, n)`` and ``A = Xᵀ`` ``(n, d_in)`` with ``X = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K``, so
        ``ΔW = B @ A`` is the published ``ΔWᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ``. As ``P`` is a projector,
        ``X = U Y`` with ``(Uᵀ M U + αI) Y = UᵀK``, ``M = KKᵀ + K_pK_pᵀ``: ``ΔW v = 0`` exactly for every ``v``
        orthogonal to the null space. With ``G = Uᵀ[K, K_p]`` (``m x (n + n_p)``), that symmetric positive
        definite system is solved as the ``m x m`` one, or, when ``n + n_p < m``, as the ``(n + n_p)`` square one
        ``Y = G (GᵀG + αI)⁻¹ E`` (push-through identity; ``E`` the first n columns of the identity). Both have
        eigenvalues ``>= α``, so Cholesky needs no ridge. An empty null space gives ``A = 0``.

    Peak memory on ``keys``' device, float64 words, for ``n_a = n + n_p`` keys and a null space of dimension m:
    ``d_in·m`` (``U``) + ``m·n_a`` + ``min(m, n_a)²`` + ``d_in·n``.
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2!r}")
    device = keys.device
    K = keys.double()
    n, d_in = K.shape[1], K.shape[0]
    B = residuals.double().to(device)
    U = space.basis.to(device=device, dtype=torch.float64)
    if U.shape[1] == 0:
        logger.warning("the null space is empty (threshold %.3g below every eigenvalue of C): no update",
                       space.threshold)
        return B, torch.zeros(n, d_in, dtype=torch.float64, device=device)
    Ka = K if prior_keys is None or prior_keys.shape[1] == 0 else torch.cat([K, prior_keys.double().to(device)], 1)
    G = U.T @ Ka  # (m, n_a)
    m, n_a = G.shape
    if n_a < m:
        S = G.T @ G
        S.diagonal().add_(l2)
        chol = torch.linalg.cholesky(0.5 * (S + S.T))
        E = torch.eye(n_a, n, dtype=torch.float64, device=device)
        Y = G @ torch.cholesky_solve(E, chol)  # (m, n)
    else:
        S = G @ G.T
        S.diagonal().add_(l2)
        chol = torch.linalg.cholesky(0.5 * (S + S.T))
        Y = torch.cholesky_solve(G[:, :n], chol)  # (m, n)
    A = (U @ Y).T.contiguous()  # (n, d_in)
    if not torch.isfinite(A).all():
        raise StatisticsError("the null-space projected update is not finite: the keys or statistics are not finite")
    return B, A
