"""The projected parametrization's linear algebra: Z from R, R from Z, and M = B_j B_j^T (docs/design.md §2.4).

Every function works group by group on B_by_group (G, rows, C_mid/G): rows = C_out for dense feedback (each
group's B_j mixes its mid population into every output channel) and C_out/G for grouped feedback (B
block-diagonal, B_j feeds its own group's outputs). R_by_group is (G, C_mid/G, K) and Z_by_group (G, rows, K),
K = C_in/G * prod(kernel); the feedback classes (feedback.py) turn those into R's and Z's shapes.
"""

from __future__ import annotations

import contextlib
import math

import torch

# Above this cond(B_j) the Cholesky route (error ~ cond(B)^2 * eps) gives way to the SVD (~ cond(B) * eps): at 1e3 the
# Cholesky solve of M_j Z_j = B_j R_j is still exact to ~1e-10 in float64.
CHOLESKY_MAX_CONDITION = 1e3


@contextlib.contextmanager
def _full_float32_matmul():
    """float32 GEMMs at full precision while M or a projection is formed: a user's torch.set_float32_matmul_precision
    ("high" allows TF32 on a GPU, 10 mantissa bits) would otherwise make M = B B^T wrong by ~1e-3."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@_full_float32_matmul()
def projection_matrix(B_by_group: torch.Tensor) -> torch.Tensor:
    """M_j = B_j B_j^T for each group j: (G, rows, rows) in B's dtype, formed in float64 for a float64 B and in float32
    otherwise: the same product whether a layer builds M at its initialisation (initial_projection) or again on load,
    bit for bit (a 2048-channel layer's M at r = 10 is 172 GFLOP: float64 would double its time)."""
    work = torch.float64 if B_by_group.dtype == torch.float64 else torch.float32
    B_work = B_by_group.to(work)
    return torch.bmm(B_work, B_work.transpose(1, 2)).to(B_by_group.dtype)


def project_onto_feedback(B_by_group: torch.Tensor, R_by_group: torch.Tensor, with_null: bool = True):
    """Split R = B^T Z + N per group (float64): Z_j = pinv(B_j^T) R_j, the minimum-norm Z_j with B_j Z_j =
    M_j^+ B_j R_j, so M_j Z_j = B_j R_j exactly (for C_mid/G < rows, B_j^T Z_j = R_j and N = 0).

    Returns Z_by_group (G, rows, K), N (R_by_group's shape, or None without with_null: it costs another
    R-sized GEMM), both float64, and the largest condition number sigma_max / sigma_min of the B_j (singular values
    below pinv's cutoff belong to B's null space and are left out).

    Where B_j has full rank (cond(B_j) <= CHOLESKY_MAX_CONDITION), pinv(B_j^T) R_j by a Cholesky solve
    (_solve_by_cholesky: M_j^{-1} B_j R_j for r >= 1, B_j (B_j^T B_j)^{-1} R_j for r < 1) instead of an SVD of B_j
    (rows x C_mid/G): 0.08 s instead of 1.3 s for a 512 -> 512 3x3 layer at r = 10. Elsewhere (a rank-deficient or
    ill-conditioned B_j) the SVD.
    """
    B64, R64 = B_by_group.double(), R_by_group.double()
    solved = _solve_by_cholesky(B64, R64)
    Z_by_group, condition = _solve_by_svd(B64, R64) if solved is None else solved[:2]
    null = R64 - B64.transpose(1, 2) @ Z_by_group if with_null else None
    return Z_by_group, null, condition


def initial_projection(B_by_group: torch.Tensor, R_by_group: torch.Tensor, dtype: torch.dtype, drawn=None):
    """Z_0 (G, rows, K) and M (G, rows, rows) in `dtype`, and max cond(B_j), of a projected layer of `dtype` from
    its seeded B and R_0 (float64).

    Where the Cholesky route applies, M_j and B_j R_j are formed in the layer's precision (float32 for fp32, fp16 and
    bf16 layers), which is what the layer stores, and only the rows x rows system is solved in float64: float64
    GEMMs took half of a ResNet-50's conversion, and M was formed twice. Elsewhere the float64 SVD.

    drawn: (B_by_group, R_by_group) as drawn (float64, CPU) to check the result against (check_projection), before
    it is rounded to `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    with _full_float32_matmul():
        solved = _solve_by_cholesky(B_by_group.to(work), R_by_group.to(work))
        if solved is None:  # the SVD, in float64 (the Cholesky attempt is not repeated)
            Z_by_group, condition = _solve_by_svd(B_by_group.double(), R_by_group.double())
            M = projection_matrix(B_by_group.to(work))
        else:
            Z_by_group, condition, M = solved
    if drawn is not None:
        check_projection(*drawn, Z_by_group, M, condition, work)
    return Z_by_group.to(dtype), M.to(dtype), condition


# The residual check of a layer's initial projection: M_j Z_j = B_j R_j holds for every B (B B^T pinv(B^T) = B), so
# up to rounding, which grows as cond(B_j)^2 through M. A faulty factorization or GEMM (an untried device) gives a
# residual of order 1; above RESIDUAL_LIMIT rounding alone could explain it, and nothing is concluded.
RESIDUAL_SAMPLES = 8
RESIDUAL_LIMIT = 0.1


def check_projection(B_by_group: torch.Tensor, R_by_group: torch.Tensor, Z_by_group: torch.Tensor, M: torch.Tensor,
                     condition: float, work_dtype: torch.dtype) -> None:
    """Raise if M_j Z_j and B_j R_j disagree, on up to RESIDUAL_SAMPLES evenly spaced columns, by more than rounding
    (64 unit roundoffs of the working precision times cond(B_j)^2): a projection computed wrongly (on a device
    whose linear algebra has not been tried) is refused, never trained with. B_by_group and R_by_group as drawn
    (float64), Z_by_group and M as computed, on any device."""
    columns = R_by_group.shape[-1]
    if columns == 0 or B_by_group.numel() == 0:
        return
    tolerance = 64 * torch.finfo(work_dtype).eps * max(condition, 1.0) ** 2
    if tolerance > RESIDUAL_LIMIT:
        return
    sample = torch.linspace(0, columns - 1, min(RESIDUAL_SAMPLES, columns)).round().long()
    expected = B_by_group.double() @ R_by_group.double()[:, :, sample]
    actual = M.double().cpu() @ Z_by_group[:, :, sample.to(Z_by_group.device)].double().cpu()
    residual = ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()
    if not residual <= tolerance:
        raise RuntimeError(
            f"pfa_kernels: the projected feedback computed on {Z_by_group.device} is wrong: M Z differs from B R by "
            f"{residual:.3g} (relative) where rounding allows {tolerance:.3g}. Build the layer on the CPU "
            f"(device='cpu') and move it, or use parametrization='explicit'; please report this with the output of "
            f"`python -m pfa_kernels.check`")


def explicit_from_projected(B_by_group: torch.Tensor, Z_by_group: torch.Tensor) -> torch.Tensor:
    """B_j^T Z_j per group in float64: (G, C_mid/G, K)."""
    return B_by_group.double().transpose(1, 2) @ Z_by_group.double()


def _solve_by_cholesky(B_by_group, R_by_group):
    """(pinv(B_j^T) R_j in float64, max cond(B_j), M_j = B_j B_j^T) when B_j has full rank and is well conditioned,
    else None. The GEMMs in the operands' precision, the factorization and the triangular solves in float64:

    - C_mid/G >= rows (r >= 1): M_j Z_j = B_j R_j, a Cholesky solve of the rows x rows system M_j;
    - C_mid/G < rows (r < 1, M_j singular): pinv(B_j^T) = B_j (B_j^T B_j)^{-1}, so Z_j = B_j Y_j with Y_j the Cholesky
      solve of the C_mid/G square system (B_j^T B_j) Y_j = R_j (then B_j^T Z_j = R_j: N = 0). An SVD of B_j costs
      4 s for AlexNet's 4096 x 1024 B at r = 0.25; this, 0.2 s."""
    rows, mid_per_group = B_by_group.shape[1:]
    if rows == 0 or mid_per_group == 0:
        return None
    wide = mid_per_group >= rows
    products = B_by_group @ B_by_group.transpose(1, 2)
    gram = products if wide else B_by_group.transpose(1, 2) @ B_by_group
    # Ascending; cond(B_j) = sqrt(cond(gram_j)) (a cube of the smaller side, not a product with the larger). In the
    # products' precision: float32 takes 0.27 s for a 2048-row M where float64 takes 1.2 s, and its error in
    # cond(B_j), about 6e-8 cond(B_j)^2, is 6% at CHOLESKY_MAX_CONDITION, where the threshold is a choice of route,
    # not a bound the result depends on (the float64 factorization below fails on a gram that is not positive
    # definite).
    eigenvalues = torch.linalg.eigvalsh(gram).double()
    if not bool((eigenvalues[:, 0] > 0).all()):
        return None
    condition = (eigenvalues[:, -1] / eigenvalues[:, 0]).sqrt().max().item()
    if condition > CHOLESKY_MAX_CONDITION:
        return None
    factor, info = torch.linalg.cholesky_ex(gram.double())
    if bool(info.any()):
        return None
    if wide:
        return torch.cholesky_solve((B_by_group @ R_by_group).double(), factor), condition, products
    solved = torch.cholesky_solve(R_by_group.double(), factor)
    return (B_by_group @ solved.to(B_by_group.dtype)).double(), condition, products


def _solve_by_svd(B_by_group, R_by_group):
    """(pinv(B_j^T) R_j, max cond(B_j) over the kept singular values), float64."""
    U, S, Vh = torch.linalg.svd(B_by_group, full_matrices=False)
    cutoff = max(B_by_group.shape[1:]) * torch.finfo(torch.float64).eps * S[:, :1]
    kept = S > cutoff
    inverse = torch.where(kept, 1 / torch.where(kept, S, 1.0), 0.0)
    pinv = U @ (inverse.unsqueeze(-1) * Vh)                                    # pinv(B_j^T): (G, rows, C_mid/G)
    if bool(kept.any()):  # (rows = 0 leaves B no singular values: nothing to condition)
        smallest = torch.where(kept, S, math.inf).amin(dim=1)
        condition = (S[:, 0] / smallest).max().item()
    else:
        condition = 1.0
    return pinv @ R_by_group, condition
