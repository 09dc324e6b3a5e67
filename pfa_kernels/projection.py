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


# Rows per block of symmetric_product: blocks of 256-384 rows keep the GEMMs at full speed (a 2048-row M at r = 10:
# 0.59 s against 1.09 s for the whole product on this CPU; 3072 rows, 1.76 s against 3.14 s).
SYMMETRIC_BLOCK_ROWS = 256

# Where cond(B_j) comes from: for more than LANCZOS_MIN_ROWS rows, the largest Ritz values of LANCZOS_STEPS Lanczos
# steps on B_j B_j^T and on its inverse (float32 matrix-vector products and triangular solves); else, or where that
# estimate exceeds EXACT_CONDITION_ABOVE, every eigenvalue (eigvalsh: 1.4 s of a ResNet-50's conversion). Ritz
# values lie inside the spectrum, so the estimate is low but for the float32 operators' rounding (~1e-8 either way);
# it decides nothing near a threshold (CHOLESKY_MAX_CONDITION, CONDITION_WARNING = 100 in feedback.py) and is within
# 1e-6 of the true value for a random B at r >= 2 (tests/test_projection.py).
LANCZOS_STEPS = 48
LANCZOS_MIN_ROWS = 256
EXACT_CONDITION_ABOVE = 10.0


def symmetric_blocks(rows: int) -> list[tuple[slice, slice]]:
    """The (rows, columns) blocks on and below the diagonal that symmetric_product forms for an n = rows square
    product, each within 0..rows (n / SYMMETRIC_BLOCK_ROWS blocks a side: 10 of 16 for n = 1024, 36 of 64 for 2048;
    one block, the whole product, up to SYMMETRIC_BLOCK_ROWS, empty for none)."""
    block = max(SYMMETRIC_BLOCK_ROWS, rows // 8)
    return [(slice(start, min(start + block, rows)), slice(other, min(other + block, rows)))
            for start in range(0, rows, block) for other in range(0, start + 1, block)] or [(slice(0, 0),) * 2]


def symmetric_product(A: torch.Tensor) -> torch.Tensor:
    """A_j A_j^T for each j of A (G, n, k): (G, n, n), exactly symmetric, from symmetric_blocks(n) only."""
    groups, rows, _ = A.shape
    blocks = symmetric_blocks(rows)
    if len(blocks) == 1:
        product = torch.bmm(A, A.transpose(1, 2))
    else:
        product = A.new_empty(groups, rows, rows)
        for row_block, column_block in blocks:
            product[:, row_block, column_block] = torch.bmm(A[:, row_block], A[:, column_block].transpose(1, 2))
    lower = product.tril()
    return lower + lower.tril(-1).transpose(1, 2)


@_full_float32_matmul()
def projection_matrix(B_by_group: torch.Tensor) -> torch.Tensor:
    """M_j = B_j B_j^T for each group j: (G, rows, rows) in B's dtype, formed in float64 for a float64 B and in float32
    otherwise: the same product whether a layer builds M at its initialisation (initial_projection) or again on load,
    bit for bit (a 2048-channel layer's M at r = 10 is 172 GFLOP: float64 would double its time)."""
    work = torch.float64 if B_by_group.dtype == torch.float64 else torch.float32
    return symmetric_product(B_by_group.to(work)).to(B_by_group.dtype)


def whole(R_by_group: torch.Tensor):
    """R_by_group (G, C_mid/G, K) as one chunk of a stream that product_with_R takes (see R_chunks there)."""
    return lambda dtype: [(slice(0, R_by_group.shape[0]), slice(0, R_by_group.shape[1]), R_by_group.to(dtype))]


def product_with_R(left: torch.Tensor, R_chunks, columns: int, sample: torch.Tensor | None = None):
    """left_j R_j for each group j: left (G, rows, C_mid/G) times R (G, C_mid/G, K = columns) given in chunks, in
    left's dtype and on its device. R_chunks(dtype) gives the chunks, rounded to dtype on the CPU: (groups, mid rows,
    values (groups, mid rows, K)), as seeded_draw.SeededDraw.R_chunks does (a float32 layer's R_0 drawn straight into
    float32: rounding a float64 chunk took 0.5 s of a ResNet-50's conversion). Returns the product (G, rows, K) and,
    with sample (column indices), R's sampled columns (G, C_mid/G, len(sample)) as multiplied, in float64 (for
    check_projection)."""
    groups, rows, mid_per_group = left.shape
    product = left.new_zeros(groups, rows, columns)
    sampled = None if sample is None else torch.zeros(groups, mid_per_group, len(sample), dtype=torch.float64)
    covered = 0  # rows of R given, over all groups: a stream that ends early must not leave Z partly zero
    for group_slice, row_slice, values in R_chunks(left.dtype):
        covered += values.shape[0] * values.shape[1]
        if sampled is not None:
            sampled[group_slice, row_slice] = values[:, :, sample]
        # A blocking copy to another device: the next chunk overwrites the buffer.
        product[group_slice].baddbmm_(left[group_slice, :, row_slice], values.to(left.device))
    if columns and covered != groups * mid_per_group:  # (no columns: R is empty, and so is every chunk)
        raise RuntimeError(f"pfa_kernels: R's chunks gave {covered} of its {groups * mid_per_group} rows")
    return product, sampled


def project_onto_feedback(B_by_group: torch.Tensor, R_by_group: torch.Tensor, with_null: bool = True):
    """Split R = B^T Z + N per group (float64): Z_j = pinv(B_j^T) R_j, the minimum-norm Z_j with B_j Z_j =
    M_j^+ B_j R_j, so M_j Z_j = B_j R_j exactly (for C_mid/G < rows, B_j^T Z_j = R_j and N = 0).

    Returns Z_by_group (G, rows, K), N (R_by_group's shape, or None without with_null: it costs another
    R-sized GEMM), both float64, and the largest condition number sigma_max / sigma_min of the B_j (singular values
    below pinv's cutoff belong to B's null space and are left out). The routes are _project's.
    """
    B64, R64 = B_by_group.double(), R_by_group.double()
    Z_by_group, condition = _project(B64, whole(R64), R64.shape[-1])[:2]
    null = R64 - B64.transpose(1, 2) @ Z_by_group if with_null else None
    return Z_by_group, null, condition


def initial_projection(B_by_group: torch.Tensor, R_chunks, columns: int, dtype: torch.dtype, with_M: bool = True,
                       drawn_B: torch.Tensor | None = None):
    """Z_0 (G, rows, K) and M (G, rows, rows; None without with_M) in `dtype`, and max cond(B_j), of a projected
    layer of `dtype` from its seeded B (by group, as held, on the layer's device) and R_0 (R_chunks(dtype): its
    chunks, see product_with_R; K = columns).

    Where the Cholesky route applies, M_j and B_j R_j are formed in the layer's precision (float32 for fp32, fp16 and
    bf16 layers), which is what the layer stores, and only the rows x rows system is solved in float64: float64
    GEMMs took half of a ResNet-50's conversion. Elsewhere the float64 SVD.

    drawn_B: B by group as drawn (float64, or its float32 rounding; CPU) and rounded as B_by_group is, to check the
    result against (check_projection) before it is rounded to `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    sample = None if drawn_B is None else _residual_sample(columns)
    B_work = B_by_group.to(work)  # (the SVD route forms M from it as well)
    with _full_float32_matmul():
        Z_by_group, condition, M, R_sample = _project(B_work, R_chunks, columns, sample)
        if M is None and with_M:
            M = projection_matrix(B_work)
    if drawn_B is not None:
        check_projection(drawn_B, R_sample, sample, Z_by_group, M, condition, work)
    return Z_by_group.to(dtype), M.to(dtype) if with_M else None, condition


# The residual check of a layer's initial projection: M_j Z_j = B_j R_j holds for every B (B B^T pinv(B^T) = B), so
# up to rounding, which grows as cond(B_j)^2 through M. A faulty factorization or GEMM (an untried device) gives a
# residual of order 1; above RESIDUAL_LIMIT rounding alone could explain it, and nothing is concluded.
RESIDUAL_SAMPLES = 8
RESIDUAL_ROWS = 64
RESIDUAL_LIMIT = 0.1


def _residual_sample(size: int, count: int = RESIDUAL_SAMPLES) -> torch.Tensor:
    """Up to `count` evenly spaced indices of 0..size-1 (integer arithmetic: exact at any size)."""
    count = min(count, size)
    return torch.arange(count) * (size - 1) // max(count - 1, 1)


def check_projection(B_by_group: torch.Tensor, R_sample: torch.Tensor, sample: torch.Tensor, Z_by_group: torch.Tensor,
                     M: torch.Tensor | None, condition: float, work_dtype: torch.dtype) -> None:
    """Raise if M_j Z_j and B_j R_j disagree on R's sampled columns and up to RESIDUAL_ROWS sampled rows by more than
    rounding (64 unit roundoffs of the working precision times cond(B_j)^2): a projection computed wrongly (on a
    device whose linear algebra has not been tried) is refused, never trained with. B_by_group as drawn (float64 or
    float32), R_sample = R_0[:, :, sample] as multiplied (float64; rounded to the working precision), Z_by_group and
    M (or None: B_j (B_j^T Z_j) is used) as computed, on any device. Sampled rows: B in float64 was 1.5 s of a
    ResNet-50's conversion."""
    if len(sample) == 0 or B_by_group.numel() == 0:
        return
    tolerance = 64 * torch.finfo(work_dtype).eps * max(condition, 1.0) ** 2
    if tolerance > RESIDUAL_LIMIT:
        return
    rows = _residual_sample(B_by_group.shape[1], RESIDUAL_ROWS)
    B_rows = B_by_group[:, rows].double()
    expected = B_rows @ R_sample
    Z_sample = Z_by_group[:, :, sample.to(Z_by_group.device)].double().cpu()
    if M is None:
        actual = B_rows @ (B_by_group.double().transpose(1, 2) @ Z_sample)
    else:
        actual = M[:, rows.to(M.device)].double().cpu() @ Z_sample
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


def _project(B_by_group, R_chunks, columns, sample=None):
    """(pinv(B_j^T) R_j (G, rows, K) float64, max cond(B_j), M_j = B_j B_j^T in B's precision or None where it was
    not formed, R's sampled columns or None; see product_with_R). pinv(B_j^T) R_j by:

    - C_mid/G >= rows (r >= 1) and a well-conditioned B_j: M_j Z_j = B_j R_j, the Cholesky solve of the rows x rows
      system M_j (float64) with B_j R_j formed in B's precision;
    - C_mid/G < rows (r < 1, M_j singular): pinv(B_j^T) = B_j (B_j^T B_j)^{-1}, by a Cholesky solve of the C_mid/G
      square system (B_j^T B_j), then its product with R_j in B's precision (then B^T Z = R: N = 0). An SVD of B_j
      costs 4 s for AlexNet's 4096 x 1024 B at r = 0.25; this, 0.2 s;
    - a rank-deficient or ill-conditioned B_j (cond > CHOLESKY_MAX_CONDITION): pinv(B_j^T) from the SVD of B_j, its
      product with R_j in float64 (an SVD costs 1.3 s for a 512 -> 512 3x3 layer at r = 10, Cholesky 0.08 s)."""
    route = _cholesky_route(B_by_group)
    if route is None:
        left, condition = _pinv_transpose_by_svd(B_by_group.double())
        Z_by_group, R_sample = product_with_R(left, R_chunks, columns, sample)
        return Z_by_group, condition, None, R_sample
    factor, condition, products = route
    if products is not None:
        product, R_sample = product_with_R(B_by_group, R_chunks, columns, sample)
        return torch.cholesky_solve(product.double(), factor), condition, products, R_sample
    left = torch.cholesky_solve(B_by_group.double().transpose(1, 2), factor).transpose(1, 2)
    Z_by_group, R_sample = product_with_R(left.to(B_by_group.dtype), R_chunks, columns, sample)
    return Z_by_group.double(), condition, None, R_sample


def _cholesky_route(B_by_group):
    """(Cholesky factor (float64) of M_j = B_j B_j^T for r >= 1, of B_j^T B_j for r < 1; max cond(B_j); M_j in B's
    precision for r >= 1, else None) where every B_j has full rank and cond(B_j) <= CHOLESKY_MAX_CONDITION, else
    None."""
    rows, mid_per_group = B_by_group.shape[1:]
    if rows == 0 or mid_per_group == 0:
        return None
    wide = mid_per_group >= rows
    gram = symmetric_product(B_by_group if wide else B_by_group.transpose(1, 2))
    gram64 = gram.double()
    factor, info = torch.linalg.cholesky_ex(gram64)
    if bool(info.any()):  # not positive definite: B_j is rank deficient
        return None
    condition = _condition(gram64, factor, gram.float())
    if not condition <= CHOLESKY_MAX_CONDITION:
        return None
    return factor, condition, gram if wide else None


@_full_float32_matmul()
def _condition(gram: torch.Tensor, factor: torch.Tensor, gram32: torch.Tensor) -> float:
    """max over j of cond(B_j) = sqrt(cond(gram_j)), gram (G, n, n) float64 positive definite with its Cholesky factor
    and gram32, gram in float32: Lanczos's estimate, or every eigenvalue where the estimate cannot settle it (see
    LANCZOS_STEPS)."""
    if gram.shape[1] > LANCZOS_MIN_ROWS:
        # The largest eigenvalue of gram and of its inverse (the smallest's reciprocal: each an isolated end of its
        # spectrum, where Lanczos converges fastest; gram's own small end converged to 1% in 48 steps at r = 2). The
        # operators in float32 (each step reads them whole: 3.5 ms a step for 2048 rows in float64), a perturbation
        # of ~1e-7 of an estimate; the basis in float64.
        factor32 = factor.float()
        largest = _lanczos_largest_eigenvalue(lambda vectors: (gram32 @ vectors.float()).double(), gram,
                                              LANCZOS_STEPS)

        def inverse(vectors):  # two triangular solves: cholesky_solve took 12 ms a vector for 2048 rows, these 1.8 ms
            lower_solved = torch.linalg.solve_triangular(factor32, vectors.float(), upper=False)
            return torch.linalg.solve_triangular(factor32.mT, lower_solved, upper=True).double()

        inverse_largest = _lanczos_largest_eigenvalue(inverse, gram, LANCZOS_STEPS)
        if largest is not None and inverse_largest is not None:
            condition = (largest * inverse_largest).sqrt().max().item()
            if condition <= EXACT_CONDITION_ABOVE:
                return condition
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return (eigenvalues[:, -1] / eigenvalues[:, 0]).sqrt().max().item()


# A Lanczos step whose new direction is below this fraction of the operator's scale has closed the Krylov space
# (up to the float32 operators' rounding, ~1e-7: B B^T = I gives 1e-8 where float64 gives 0).
LANCZOS_BREAKDOWN = 1e-5


def _lanczos_largest_eigenvalue(apply, like: torch.Tensor, steps: int):
    """The largest Ritz value (G,) of the symmetric operator `apply` ((G, n, 1) -> (G, n, 1), float64 like `like`
    (G, n, n)) after `steps` Lanczos steps with full reorthogonalization from a fixed start (drawn on the CPU: the
    same estimate every time, on every device). None if the Krylov space closes first (B B^T = I: every start is an
    eigenvector), where the Ritz values need not reach the end of the spectrum. One host sync, after the steps."""
    groups, rows, _ = like.shape
    start = torch.randn(groups, rows, 1, generator=torch.Generator().manual_seed(0), dtype=like.dtype)
    vector = start.to(like.device)
    vector = vector / vector.norm(dim=1, keepdim=True)
    basis = like.new_empty(groups, rows, steps)
    diagonal, off_diagonal = like.new_empty(groups, steps), like.new_empty(groups, steps - 1)
    for step in range(steps):
        basis[:, :, step:step + 1] = vector
        image = apply(vector)
        diagonal[:, step] = (vector * image).sum(dim=(1, 2))
        done = basis[:, :, :step + 1]
        for _ in range(2):  # twice is enough (Kahan): the basis stays orthogonal to working precision
            image = image - done @ (done.transpose(1, 2) @ image)
        if step == steps - 1:
            break
        norm = image.norm(dim=1).squeeze(1)
        off_diagonal[:, step] = norm
        vector = image / norm.clamp_min(torch.finfo(like.dtype).tiny).view(groups, 1, 1)
    scale = diagonal.abs().amax(dim=1, keepdim=True)
    if not bool((off_diagonal > LANCZOS_BREAKDOWN * scale).all()):
        return None
    tridiagonal = torch.diag_embed(diagonal) + torch.diag_embed(off_diagonal, 1) + torch.diag_embed(off_diagonal, -1)
    return torch.linalg.eigvalsh(tridiagonal)[:, -1]


def _pinv_transpose_by_svd(B_by_group):
    """(pinv(B_j^T) (G, rows, C_mid/G), max cond(B_j) over the kept singular values), float64."""
    U, S, Vh = torch.linalg.svd(B_by_group, full_matrices=False)
    cutoff = max(B_by_group.shape[1:]) * torch.finfo(torch.float64).eps * S[:, :1]
    kept = S > cutoff
    inverse = torch.where(kept, 1 / torch.where(kept, S, 1.0), 0.0)
    pinv = U @ (inverse.unsqueeze(-1) * Vh)
    if bool(kept.any()):  # (rows = 0 leaves B no singular values: nothing to condition)
        smallest = torch.where(kept, S, math.inf).amin(dim=1)
        condition = (S[:, 0] / smallest).max().item()
    else:
        condition = 1.0
    return pinv, condition
