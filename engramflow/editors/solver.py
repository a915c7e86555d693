"""The preservation–memorization solver (Gupta et al. 2024): one function, two constraints, optional
null-space projection. Notation as in REFERENCE.md; W is [d_out, d_in] (nn.Linear orientation).

    equality      (ROME, EMMET):  Δ = R (Kᵀ C⁻¹ K + λ I)⁻¹ Kᵀ C⁻¹      U = R (Kᵀ C⁻¹ K + λ I)⁻¹,  V = C⁻¹ K
    least squares (MEMIT):        Δ = R Kᵀ (C + K Kᵀ)⁻¹                 U = R,                     V = (C + K Kᵀ)⁻¹ K
    with C = mom2_weight · E[k₀ k₀ᵀ] and Δ = U Vᵀ. EMMET's λ applies to batches of more than one key
    (the reference adds it only there): a single edit is ROME's exact rank-one update.

ROME takes its direction C⁻¹k from the prefix-averaged key but divides by the bare prompt's key, so the
bare prompt gets exactly its residual: with `K_exact` (the keys at which the equality must hold),
U = R (K_exactᵀ C⁻¹ K + λ I)⁻¹, and Δ K_exact = R.

AlphaEdit: with a projector P onto the null space of the preserved keys, the update is Δ = D P, so
it cannot move any preserved key. The projection then does the preserving, so K ← P K and C ← I
(mom2_weight becomes AlphaEdit's L2 ridge); the least-squares form is then exactly AlphaEdit's
Δ = R Kᵀ P (K Kᵀ P + L2 I)⁻¹. `preserved` holds the keys of earlier edits that later ones must
keep (AlphaEdit's K_p, [d_in, m]): solved as if appended to K with zero residual, which is the
reference's Δᵀ = (P (K Kᵀ + K_p K_pᵀ) + L2 I)⁻¹ P K Rᵀ.
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
    K_exact: torch.Tensor | None = None,  # [d_in, n] where the equality holds exactly (default K)
    preserved: torch.Tensor | None = None,  # [d_in, m] earlier edits' keys to keep (least squares)
    layer: int | None = None,
    max_condition: float = 1e12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update Δ = U Vᵀ ([d_out, n] and [d_in, n], float64, on K's device) for one layer."""
    d_out, d_in = W0.shape
    n = K.shape[1]
    if K.shape[0] != d_in or R.shape != (d_out, n) or C.shape != (d_in, d_in):
        raise SolverError(f"layer {layer}: shapes W0 {tuple(W0.shape)}, C {tuple(C.shape)}, K {tuple(K.shape)}, "
                          f"R {tuple(R.shape)} do not fit W0 [d_out, d_in], C [d_in, d_in], K [d_in, n], R [d_out, n]")
    for name, t in (("K_exact", K_exact), ("preserved", preserved)):
        if t is not None and t.shape[0] != d_in:
            raise SolverError(f"layer {layer}: {name} {tuple(t.shape)} is not [d_in={d_in}, ...]")
    # Every input on the keys' device, in float64: the one place where devices and dtypes meet.
    device = K.device

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=torch.float64)

    C, K, R, projector, K_exact, preserved = map(f64, (C, K, R, projector, K_exact, preserved))
    _check_finite(layer, C=C, K=K, R=R)
    eye = torch.eye(d_in, dtype=torch.float64, device=device)
    if projector is None:
        C = mom2_weight * C
    else:
        K = projector @ K
        K_exact = None if K_exact is None else projector @ K_exact
        preserved = None if preserved is None else projector @ preserved
        C = mom2_weight * eye

    if constraint == "equality":
        if preserved is not None:
            raise SolverError(f"layer {layer}: preserved keys are a least-squares term; the equality constraint "
                              "preserves through C")
        Lc = _cholesky(C, "C", layer, max_condition)
        CinvK = torch.cholesky_solve(K, Lc)  # [d_in, n]
        lam = emmet_lambda if n > 1 else 0.0
        if K_exact is None:
            A = K.T @ CinvK + lam * torch.eye(n, dtype=torch.float64, device=device)  # [n, n], symmetric
            La = _cholesky(A, "Kᵀ C⁻¹ K + λI", layer, max_condition)
            U = torch.cholesky_solve(R.T, La).T  # R A⁻¹, [d_out, n]
        else:
            A = K_exact.T @ CinvK + lam * torch.eye(n, dtype=torch.float64, device=device)  # [n, n]
            U = torch.linalg.solve(A.T, R.T).T  # R A⁻¹
        V = CinvK
    elif constraint == "least_squares":
        system = C + K @ K.T
        if preserved is not None:
            system = system + preserved @ preserved.T
        L = _cholesky(system, "C + K Kᵀ", layer, max_condition)
        U = R
        V = torch.cholesky_solve(K, L)  # [d_in, n]
    else:
        raise ValueError(f"unknown constraint {constraint!r}; expected 'equality' or 'least_squares'")
    _check_finite(layer, U=U, V=V)
    return U, V
