"""The preservation–memorization solver on random matrices: each constraint does what its equation says."""

from __future__ import annotations

import pytest
import torch

from engramflow.editors.solver import SolverError, null_space_projector, solve

D_OUT, D_IN = 12, 20


def problem(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    K0 = torch.randn(D_IN, 500, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / K0.shape[1]
    K = torch.randn(D_IN, n, generator=g, dtype=torch.float64)
    V = torch.randn(D_OUT, n, generator=g, dtype=torch.float64)
    return W0, C, K, V - W0 @ K, V


@pytest.mark.parametrize("n", [1, 5])
def test_equality_puts_every_key_on_its_value(n: int) -> None:
    W0, C, K, R, V = problem(n)
    U, Vf = solve(W0, C, K, R, "equality", emmet_lambda=0.0)
    W = W0 + U @ Vf.T
    assert ((W @ K - V).norm(dim=0) / V.norm(dim=0)).max() < 1e-4


def test_equality_minimises_the_preservation_cost_among_exact_solutions() -> None:
    """Any other exact solution Δ + N (N K = 0) has a larger tr(Δ C Δᵀ)."""
    W0, C, K, R, _ = problem(3)
    U, Vf = solve(W0, C, K, R, "equality")
    D = U @ Vf.T
    Q, _ = torch.linalg.qr(K, mode="complete")
    N = torch.randn(D_OUT, D_IN - 3, dtype=torch.float64) @ Q[:, 3:].T * 0.1  # N K = 0
    cost = lambda X: torch.trace(X @ C @ X.T)  # noqa: E731
    assert cost(D + N) > cost(D)


def test_emmet_on_a_batch_of_one_equals_rome() -> None:
    """ROME's rank-one closed form: Δ = r (C⁻¹k)ᵀ / (kᵀC⁻¹k)."""
    W0, C, K, R, _ = problem(1)
    U, Vf = solve(W0, C, K, R, "equality", emmet_lambda=0.0)
    Cinv_k = torch.linalg.solve(C, K)
    rome = R @ Cinv_k.T / (K.T @ Cinv_k)
    torch.testing.assert_close(U @ Vf.T, rome, rtol=1e-9, atol=1e-10)


def test_emmet_lambda_trades_exactness_for_conditioning() -> None:
    W0, C, K, R, V = problem(4)
    exact = solve(W0, C, K, R, "equality", emmet_lambda=0.0)
    ridge = solve(W0, C, K, R, "equality", emmet_lambda=0.1)
    err = lambda f: ((W0 + f[0] @ f[1].T) @ K - V).norm()  # noqa: E731
    assert err(exact) < 1e-8 < err(ridge)


@pytest.mark.parametrize("mom2_weight", [0.5, 100.0])
def test_least_squares_satisfies_its_normal_equations(mom2_weight: float) -> None:
    """∂/∂Δ [λ tr(Δ C Δᵀ) + ‖(W0 + Δ) K − V‖²] = 0  ⇔  Δ (λC + K Kᵀ) = R Kᵀ."""
    W0, C, K, R, _ = problem(6)
    U, Vf = solve(W0, C, K, R, "least_squares", mom2_weight=mom2_weight)
    D = U @ Vf.T
    torch.testing.assert_close(D @ (mom2_weight * C + K @ K.T), R @ K.T, rtol=1e-9, atol=1e-9)


def test_least_squares_approaches_equality_as_preservation_weight_vanishes() -> None:
    W0, C, K, R, V = problem(3)
    U, Vf = solve(W0, C, K, R, "least_squares", mom2_weight=1e-8)
    assert ((W0 + U @ Vf.T) @ K - V).norm() / V.norm() < 1e-5


def low_rank_C(rank: int) -> torch.Tensor:
    """Preserved keys living in a `rank`-dimensional subspace, plus a little noise everywhere."""
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(D_IN, rank, generator=g, dtype=torch.float64))[0]
    K0 = basis @ torch.randn(rank, 400, generator=g, dtype=torch.float64) * 3
    return K0 @ K0.T / 400 + 1e-4 * torch.eye(D_IN, dtype=torch.float64)


@pytest.mark.parametrize("constraint", ["equality", "least_squares"])
def test_projected_update_leaves_the_preserved_subspace_unchanged(constraint: str) -> None:
    W0, _, K, R, _ = problem(3)
    C = low_rank_C(8)
    P = null_space_projector(C, threshold=2e-2)
    assert round(float(torch.trace(P))) == D_IN - 8
    U, Vf = solve(W0, C, K, R, constraint, mom2_weight=10.0, emmet_lambda=0.1, projector=P)
    D = U @ Vf.T
    evals, evecs = torch.linalg.eigh(C)
    preserved = evecs[:, evals >= 2e-2]  # [d_in, 8]
    assert (D @ preserved).abs().max() < 1e-10
    assert D.norm() > 1e-2  # and it still edits


def test_projected_least_squares_is_alphaedit() -> None:
    """AlphaEdit's closed form Δ = R Kᵀ P (K Kᵀ P + L2 I)⁻¹."""
    W0, _, K, R, _ = problem(3)
    P = null_space_projector(low_rank_C(8), threshold=2e-2)
    U, Vf = solve(W0, low_rank_C(8), K, R, "least_squares", mom2_weight=10.0, projector=P)
    alphaedit = torch.linalg.solve((K @ K.T @ P + 10.0 * torch.eye(D_IN, dtype=torch.float64)).T,
                                   (R @ K.T @ P).T).T
    torch.testing.assert_close(U @ Vf.T, alphaedit, rtol=1e-8, atol=1e-10)


def test_non_finite_input_names_the_layer() -> None:
    W0, C, K, R, _ = problem(2)
    K[0, 0] = float("nan")
    with pytest.raises(SolverError, match="layer 7: K has non-finite"):
        solve(W0, C, K, R, "equality", layer=7)


def test_singular_covariance_names_the_layer() -> None:
    W0, _, K, R, _ = problem(2)
    C = torch.zeros(D_IN, D_IN, dtype=torch.float64)
    C[0, 0] = 1.0
    with pytest.raises(SolverError, match="layer 3: C is not positive definite"):
        solve(W0, C, K, R, "equality", layer=3)


def test_ill_conditioned_system_names_the_layer() -> None:
    W0, C, K, R, _ = problem(2)
    C = C.clone()
    C[:, 0] *= 1e-5
    C[0, :] *= 1e-5
    with pytest.raises(SolverError, match="layer 2: C is ill-conditioned"):
        solve(W0, C, K, R, "equality", layer=2, max_condition=1e8)


def test_shape_mismatch_names_the_layer() -> None:
    W0, C, K, R, _ = problem(2)
    with pytest.raises(SolverError, match="layer 1: shapes"):
        solve(W0, C, K[:-1], R, "least_squares", layer=1)


def test_empty_null_space_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(SolverError, match="layer 4: no eigenvalue"):
        null_space_projector(torch.eye(D_IN, dtype=torch.float64), threshold=2e-2, layer=4)


def test_emmet_lambda_leaves_a_single_edit_exact_as_rome() -> None:
    """The reference EMMET adds λ only to batches of more than one key: at batch 1, EMMET with any λ
    and weight is ROME's update."""
    W0, C, K, R, _ = problem(1)
    Cinv_k = torch.linalg.solve(C, K)
    rome = R @ Cinv_k.T / (K.T @ Cinv_k)
    for lam, weight in ((0.1, 1000.0), (0.1, 2500.0), (1.0, 1.0)):
        U, Vf = solve(W0, C, K, R, "equality", emmet_lambda=lam, mom2_weight=weight)
        assert float((U @ Vf.T - rome).norm() / rome.norm()) < 1e-6


def test_rome_writes_exactly_the_residual_at_the_bare_prompt_key() -> None:
    """Direction from the prefix-averaged key, denominator from the bare prompt's key: the bare prompt
    gets exactly its residual, the averaged key only in proportion."""
    W0, C, K_avg, R, _ = problem(1)
    K_bare = K_avg + 0.3 * torch.randn(D_IN, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    U, Vf = solve(W0, C, K_avg, R, "equality", K_exact=K_bare)
    D = U @ Vf.T
    assert float(((D @ K_bare) - R).norm() / R.norm()) < 1e-5
    assert float(((D @ K_avg) - R).norm() / R.norm()) > 1e-2  # a different key gets a different share
    Cinv_k = torch.linalg.solve(C, K_avg)
    torch.testing.assert_close(Vf, Cinv_k)  # the direction is C⁻¹ k_avg


def test_alphaedit_with_earlier_keys_is_the_reference_and_a_one_shot_solve() -> None:
    """AlphaEdit's sequential update with K_p (the earlier batches' keys) equals the reference's
    ΔW = solve(P (K Kᵀ + K_p K_pᵀ) + L2 I, P K Rᵀ)ᵀ, and a one-shot solve with those keys appended at zero residual."""
    W0, _, K, R, _ = problem(3)
    K_p = torch.randn(D_IN, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    C = low_rank_C(8)
    P = null_space_projector(C, threshold=2e-2)
    U, Vf = solve(W0, C, K, R, "least_squares", mom2_weight=10.0, projector=P, preserved=K_p)
    eye = torch.eye(D_IN, dtype=torch.float64)
    reference = torch.linalg.solve(P @ (K @ K.T + K_p @ K_p.T) + 10.0 * eye, P @ K @ R.T).T
    torch.testing.assert_close(U @ Vf.T, reference, rtol=1e-9, atol=1e-11)
    zero = torch.zeros(D_OUT, K_p.shape[1], dtype=torch.float64)
    U1, V1 = solve(W0, C, torch.cat([K, K_p], 1), torch.cat([R, zero], 1), "least_squares", mom2_weight=10.0,
                   projector=P)
    torch.testing.assert_close(U @ Vf.T, U1 @ V1.T, rtol=1e-9, atol=1e-11)
    # and the earlier keys barely move: far less than without K_p
    without = solve(W0, C, K, R, "least_squares", mom2_weight=10.0, projector=P)
    assert (U @ Vf.T @ K_p).norm() < (without[0] @ without[1].T @ K_p).norm()


def test_inputs_on_other_devices_or_dtypes_are_brought_to_the_keys() -> None:
    """C in float32 and a projector in float32 (as loaded) still solve in float64 on K's device."""
    W0, C, K, R, _ = problem(2)
    P = null_space_projector(low_rank_C(8), threshold=2e-2)
    U, Vf = solve(W0.float(), C.float(), K, R.float(), "least_squares", mom2_weight=10.0, projector=P.float())
    assert U.dtype == Vf.dtype == torch.float64 and U.device == K.device
