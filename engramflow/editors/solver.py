"""The preservation–memorization solver (Gupta et al. 2024): one function, two constraints, optional
null-space projection. Notation as in REFERENCE.md; W is [d_out, d_in] (nn.Linear orientation).

    equality      (ROME, EMMET):  Δ = R (Kᵀ C⁻¹ K + λ I)⁻¹ Kᵀ C⁻¹      U = R (Kᵀ C⁻¹ K + λ I)⁻¹,  V = C⁻¹ K
    least squares (MEMIT):        Δ = R Kᵀ (C + K Kᵀ)⁻¹                 U = R,                     V = (C + K Kᵀ)⁻¹ K
    with C = mom2_weight · E[k₀ k₀ᵀ] and Δ = U Vᵀ.

AlphaEdit: with a projector P onto the null space of the preserved keys, the update is Δ = D P, so
it cannot move any preserved key. The projection then does the preserving, so K ← P K and C ← I
(mom2_weight becomes AlphaEdit's L2 ridge); the least-squares form is then exactly AlphaEdit's
Δ = R Kᵀ P (K Kᵀ P + L2 I)⁻¹.
"""

from __future__ import annotations

from typing import Literal

import torch

Constraint = Literal["equality", "least_squares"]


class SolverError(ValueError):
    pass


def _check_finite(layer: int | None, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise SolverError(f"layer {layer}: {name} has non-finite entries")


def _cholesky(A: torch.Tensor, what: str, layer: int | None, max_condition: float) -> torch.Tensor:
    """Cholesky factor of a symmetric positive-definite matrix, refusing ill-conditioned ones.
    (max diag L / min diag L)² is a cheap lower bound on the condition number."""
    L, info = torch.linalg.cholesky_ex(A)
    if info != 0:
        raise SolverError(f"layer {layer}: {what} is not positive definite (Cholesky failed at column {int(info)})")
    diag = L.diagonal()
    cond = float((diag.max() / diag.min()) ** 2)
    if cond > max_condition:
        raise SolverError(f"layer {layer}: {what} is ill-conditioned (condition number ≥ {cond:.3g} > {max_condition:.3g}); "
                          "raise mom2_update_weight / emmet_lambda or use more covariance samples")
    return L


def null_space_projector(C: torch.Tensor, threshold: float, layer: int | None = None) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C with eigenvalue < threshold (AlphaEdit), [d_in, d_in].
    Computed once per layer and reused for every batch."""
    _check_finite(layer, C=C)
    evals, evecs = torch.linalg.eigh(C.double())
    U_null = evecs[:, evals < threshold]
    if U_null.shape[1] == 0:
        raise SolverError(f"layer {layer}: no eigenvalue of C below the null-space threshold {threshold:g} "
                          f"(smallest {float(evals[0]):.3g}); the projection would forbid every update")
    return U_null @ U_null.T


def solve(
    W0: torch.Tensor,  # [d_out, d_in] the current weight
    C: torch.Tensor,  # [d_in, d_in] E[k₀ k₀ᵀ] of the preserved keys
    K: torch.Tensor,  # [d_in, n] edit keys
    R: torch.Tensor,  # [d_out, n] residuals V − W0 K that the update must add
    constraint: Constraint,
    *,
    mom2_weight: float = 1.0,
    emmet_lambda: float = 0.0,
    projector: torch.Tensor | None = None,  # [d_in, d_in] AlphaEdit's P, or None
    layer: int | None = None,
    max_condition: float = 1e12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update Δ = U Vᵀ ([d_out, n] and [d_in, n], float64) for one layer."""
    d_out, d_in = W0.shape
    if K.shape[0] != d_in or R.shape != (d_out, K.shape[1]) or C.shape != (d_in, d_in):
        raise SolverError(f"layer {layer}: shapes W0 {tuple(W0.shape)}, C {tuple(C.shape)}, K {tuple(K.shape)}, "
                          f"R {tuple(R.shape)} do not fit W0 [d_out, d_in], C [d_in, d_in], K [d_in, n], R [d_out, n]")
    _check_finite(layer, C=C, K=K, R=R)
    K, R = K.double(), R.double()
    n = K.shape[1]
    if projector is None:
        C = mom2_weight * C.double()
    else:
        K = projector.double() @ K
        C = mom2_weight * torch.eye(d_in, dtype=torch.float64, device=K.device)

    if constraint == "equality":
        Lc = _cholesky(C, "C", layer, max_condition)
        CinvK = torch.cholesky_solve(K, Lc)  # [d_in, n]
        A = K.T @ CinvK + emmet_lambda * torch.eye(n, dtype=torch.float64, device=K.device)  # [n, n]
        La = _cholesky(A, "Kᵀ C⁻¹ K + λI", layer, max_condition)
        U = torch.cholesky_solve(R.T, La).T  # R A⁻¹ (A symmetric), [d_out, n]
        V = CinvK
    elif constraint == "least_squares":
        L = _cholesky(C + K @ K.T, "C + K Kᵀ", layer, max_condition)
        U = R
        V = torch.cholesky_solve(K, L)  # [d_in, n]
    else:
        raise ValueError(f"unknown constraint {constraint!r}; expected 'equality' or 'least_squares'")
    _check_finite(layer, U=U, V=V)
    return U, V
