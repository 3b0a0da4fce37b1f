"""The Fiedler vector of a batch of affinity graphs (docs/method.md §3 step 3): the eigenvector y of the
second-smallest eigenvalue of (D - W) y = lambda D y, found as z of the second-largest eigenvalue of
M = D^-1/2 W D^-1/2 and mapped back by y = D^-1/2 z.

Three solvers of the same vector: `eigh` (the reference, dense and exact), batched power iteration by repeated
squaring, and batched Lanczos (the default: one matrix-vector product per step). Graphs are W [B, N, N], symmetric
and positive; vectors are [B, N]. The power and Lanczos solvers return non-finite values where the operator vanishes,
so the masking can fall back to a random mask.
"""

from __future__ import annotations

import math
from typing import Literal

import torch


def normalized_affinity(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M = D^-1/2 W D^-1/2 and D^-1/2 (as a vector [B, N])."""
    inv_sqrt_degree = weights.sum(dim=2).rsqrt()
    return inv_sqrt_degree[:, :, None] * weights * inv_sqrt_degree[:, None, :], inv_sqrt_degree


def fiedler_vector_eigh(weights: torch.Tensor) -> torch.Tensor:
    """Reference solver: the second eigenvector of I - D^-1/2 W D^-1/2, mapped back by y = D^-1/2 z. [B, N]."""
    normalized, inv_sqrt_degree = normalized_affinity(weights.double())
    eye = torch.eye(weights.shape[1], dtype=normalized.dtype, device=weights.device)
    _, eigenvectors = torch.linalg.eigh(eye - normalized)
    return (eigenvectors[:, :, 1] * inv_sqrt_degree).to(weights.dtype)


def _project_out(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """P A P with P = I - v vᵀ, for unit v [B, N]: removes the trivial eigenvector from both sides of A."""
    a_v = matrix @ vector[:, :, None]
    v_a = vector[:, None, :] @ matrix
    v_a_v = v_a @ vector[:, :, None]
    return (
        matrix - a_v * vector[:, None, :] - vector[:, :, None] * v_a + vector[:, :, None] * v_a_v * vector[:, None, :]
    )


def _spectral_radius(matrix: torch.Tensor, squarings: int = 4) -> torch.Tensor:
    """Upper estimate of the spectral radius of symmetric matrices [B, N, N]: ||A^(2^k)||_F^(2^-k) >= rho. [B].

    With k = 4 squarings the estimate is at most N^(1/32) (< 1.2 for N <= 256) times too large, which is harmless
    for its one use, a shift that makes the deflated operator positive semi-definite.
    """
    power = matrix
    log_scale = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for _ in range(squarings):
        norm = power.norm(dim=(1, 2))
        log_scale = 2 * (log_scale + norm.log())
        power = power / norm[:, None, None]
        power = power @ power
    return ((log_scale + power.norm(dim=(1, 2)).log()) / 2**squarings).exp()


def fiedler_vector_power(weights: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Fiedler vector by batched power iteration, as repeated squaring of a shifted, deflated operator. [B, N].

    The Fiedler vector z is the eigenvector of the second-largest eigenvalue mu_2 of M = D^-1/2 W D^-1/2, whose
    largest is 1 with eigenvector sqrt(d). Projecting sqrt(d) out gives A; shifting by an estimate r of A's
    spectral radius makes A + rI positive semi-definite with top eigenvector z. The shift matters: feature graphs
    are near-complete (MAE features have mean cosine ~0.6), so mu_2 is tiny (~0.01) and close to mu_3; the
    textbook shift (M + I) / 2 squeezes the ratio (1 + mu_3) / (1 + mu_2) to within 1e-5 of 1, while
    (mu_3 + r) / (mu_2 + r) with r ~ mu_2 keeps it ~50x further from 1. Squaring `steps` times raises the operator
    to the power 2**steps in `steps` batched matmuls, which is fast on CPU and GPU alike (batched eigh is slow on
    CUDA). Returns non-finite values where the operator vanishes, so callers can fall back.
    """
    normalized, inv_sqrt_degree = normalized_affinity(weights)
    trivial = weights.sum(dim=2).sqrt()
    trivial = trivial / trivial.norm(dim=1, keepdim=True)
    deflated = _project_out(normalized, trivial)
    eye = torch.eye(weights.shape[1], dtype=weights.dtype, device=weights.device)
    shift = _spectral_radius(deflated)
    operator = _project_out(deflated + shift[:, None, None] * eye, trivial)
    power = operator
    for _ in range(steps):
        power = power / power.norm(dim=(1, 2), keepdim=True)
        power = _project_out(power @ power, trivial)
    # The power is (close to) rank one, z zᵀ: its largest column is a multiple of z.
    column = power.norm(dim=1).argmax(dim=1)
    z = power.gather(2, column[:, None, None].expand(-1, power.shape[1], 1)).squeeze(2)
    for _ in range(2):  # two plain power steps polish the direction
        z = (operator @ z[:, :, None]).squeeze(2)
        z = z - (z * trivial).sum(dim=1, keepdim=True) * trivial
        z = z / z.norm(dim=1, keepdim=True)
    return z * inv_sqrt_degree


def _ritz_pairs(alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values [B, k] (ascending) and vectors [B, k, k] of the Lanczos tridiagonal with diagonal `alphas` [B, k]
    and off-diagonal `betas` [B, k - 1], in float64."""
    tridiagonal = torch.diag_embed(alphas) + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)
    return torch.linalg.eigh(tridiagonal.double())


def fiedler_vector_lanczos(weights: torch.Tensor, steps: int = 32, tolerance: float | None = 1e-3) -> torch.Tensor:
    """Fiedler vector by batched Lanczos iteration with full re-orthogonalisation. [B, N].

    Krylov vectors of M = D^-1/2 W D^-1/2 are built from a fixed start vector with the trivial eigenvector sqrt(d)
    projected out, so the top Ritz vector of the small tridiagonal matrix is z, the eigenvector of mu_2. Each step
    costs one batched matrix-vector product (N^2 per image) instead of the power solver's matrix squarings (N^3 each):
    Lanczos converges on an extreme eigenvalue with the square root of the power method's gap dependence, and with
    `steps` >= N - 1 it is exact. Each new vector is orthogonalised against the earlier ones and the trivial vector
    twice (classical Gram-Schmidt). A row whose Krylov space is exhausted early stops growing
    (its later Ritz values are pushed below the spectrum).

    With a `tolerance`, the iteration stops once every row's top Ritz pair has converged: its residual
    ||M z - theta z|| = beta_k |y_k| is at most `tolerance` times the gap to the next Ritz value, which bounds the
    sine of z's angle to the true eigenvector by about `tolerance` (Davis-Kahan). It is checked after 12 steps and
    then at 1.5 times the last check (each check is a small batched `eigh`): graphs with a clear cut stop after a
    dozen steps; nearly degenerate ones (a sparse binary graph with several loose clusters) run up to `steps`.
    Returns non-finite values where the operator vanishes, so callers can fall back.
    """
    normalized, inv_sqrt_degree = normalized_affinity(weights)
    batch_size, num_nodes, _ = weights.shape
    steps = min(steps, num_nodes - 1)
    trivial, vector = _lanczos_start(weights)
    # Rows of the basis, with the trivial vector first: orthogonalising against it keeps sqrt(d) out.
    basis = torch.zeros(batch_size, steps + 1, num_nodes, dtype=weights.dtype, device=weights.device)
    basis[:, 0] = trivial
    alphas = torch.zeros(batch_size, steps, dtype=weights.dtype, device=weights.device)
    betas = torch.zeros(batch_size, steps, dtype=weights.dtype, device=weights.device)
    growing = torch.ones(batch_size, dtype=torch.bool, device=weights.device)
    size, next_check = steps, 12
    for step in range(steps):
        basis[:, step + 1] = vector
        product = torch.bmm(normalized, vector[:, :, None]).squeeze(2)
        alphas[:, step] = torch.where(growing, (product * vector).sum(dim=1), -3.0)  # -3: below M's spectrum
        known = basis[:, : step + 2]
        for _ in range(2):  # twice is enough (Kahan): once loses orthogonality when eigenvalues cluster
            product = product - torch.bmm(known.transpose(1, 2), torch.bmm(known, product[:, :, None])).squeeze(2)
        norm = product.norm(dim=1)
        if step + 1 == steps:
            break
        growing = growing & (norm > 1e-6)
        betas[:, step] = torch.where(growing, norm, 0.0)
        vector = torch.where(growing[:, None], product / norm.clamp(min=1e-30)[:, None], 0.0)
        if tolerance is not None and step + 1 == next_check:
            next_check = math.ceil(next_check * 1.5)
            if _top_ritz_pair_converged(alphas[:, : step + 1], betas[:, : step + 1], tolerance):
                size = step + 1
                break
    _, ritz_vectors = _ritz_pairs(alphas[:, :size], betas[:, : size - 1])
    z = torch.bmm(basis[:, 1 : size + 1].transpose(1, 2), ritz_vectors[:, :, -1:].to(weights.dtype)).squeeze(2)
    return z * inv_sqrt_degree


def _lanczos_start(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trivial eigenvector sqrt(d) / |sqrt(d)| [B, N], and a fixed, deterministic unit start vector [B, N]
    orthogonal to it, that no graph's Fiedler vector is orthogonal to in practice (no RNG drawn)."""
    batch_size, num_nodes, _ = weights.shape
    trivial = weights.sum(dim=2).sqrt()
    trivial = trivial / trivial.norm(dim=1, keepdim=True)
    start = torch.linspace(1.0, 2.0, num_nodes, dtype=weights.dtype, device=weights.device).sin() + 0.1
    vector = start.expand(batch_size, -1) - (start * trivial).sum(dim=1, keepdim=True) * trivial
    return trivial, vector / vector.norm(dim=1, keepdim=True)


def _top_ritz_pair_converged(alphas: torch.Tensor, betas: torch.Tensor, tolerance: float) -> bool:
    """Whether every row's top Ritz pair of the k-step tridiagonal (`alphas` [B, k], `betas` [B, k], the last being
    the next off-diagonal) has a residual beta_k |y_k| within `tolerance` times its gap to the next Ritz value."""
    values, vectors = _ritz_pairs(alphas, betas[:, :-1])
    residual = betas[:, -1].double() * vectors[:, -1, -1].abs()
    return bool((residual <= tolerance * (values[:, -1] - values[:, -2])).all())


def fiedler_vector(
    weights: torch.Tensor,
    solver: Literal["lanczos", "power", "eigh"] = "lanczos",
    lanczos_steps: int = 32,
    lanczos_tolerance: float | None = 1e-3,
    power_steps: int = 16,
) -> torch.Tensor:
    """The Fiedler vector [B, N] of graphs W [B, N, N] by `solver` (the config's `fiedler_*` fields); Lanczos with
    `lanczos_tolerance` None takes all its steps (its convergence check reads a value back from the device)."""
    if solver == "eigh":
        return fiedler_vector_eigh(weights)
    if solver == "power":
        return fiedler_vector_power(weights, power_steps)
    return fiedler_vector_lanczos(weights, lanczos_steps, lanczos_tolerance)
