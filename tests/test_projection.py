"""The projected parametrization's linear algebra (pfa_kernels/projection.py): the routes to Z_0 = pinv(B^T) R_0, M by
its symmetric blocks, the condition estimate, R_0 in chunks, and the residual check."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import relative_error

import pfa_kernels as pk
from pfa_kernels import projection, seeded_draw
from pfa_kernels.backends import torch_ops
from pfa_kernels.feedback_choice import make_feedback


def _by_group(B, R, groups):
    out_channels, mid = B.shape
    return (B.reshape(out_channels, groups, mid // groups).transpose(0, 1),
            R.reshape(groups, mid // groups, -1))


@pytest.mark.parametrize("out_channels, mid_per_group, groups",
                         [(8, 80, 1), (6, 12, 2), (5, 5, 1), (7, 3, 1), (12, 2, 3), (9, 9, 1)])
def test_cholesky_projection_equals_the_pseudoinverse(out_channels, mid_per_group, groups):
    """pinv(B_j^T) R_j by Cholesky (M_j^{-1} B_j R_j for r >= 1, B_j (B_j^T B_j)^{-1} R_j for r < 1: 7 -> 3, 12 -> 6
    in 3 groups) is the SVD's to 1e-12, M·Z = B·R, and for r < 1 B^T Z = R; an ill-conditioned square B (5 -> 5,
    cond ~ 1e4) takes the SVD."""
    generator = torch.Generator().manual_seed(out_channels)
    B = torch.randn(out_channels, mid_per_group * groups, generator=generator, dtype=torch.float64)
    if out_channels == 5:  # square: make it ill-conditioned on purpose
        U, _, Vh = torch.linalg.svd(B)
        B = U @ torch.diag(torch.logspace(0, -4, out_channels, dtype=torch.float64)) @ Vh
    B_by_group, R_by_group = _by_group(B, torch.randn(mid_per_group * groups, 4, 3, generator=generator,
                                                      dtype=torch.float64), groups)
    pinv, condition = projection._pinv_transpose_by_svd(B_by_group)
    by_svd = pinv @ R_by_group
    route = projection._cholesky_route(B_by_group)
    if condition > projection.CHOLESKY_MAX_CONDITION:
        assert out_channels == 5 and route is None
        return
    Z, cholesky_condition, M, _ = projection._project(B_by_group, projection.whole(R_by_group), 12)
    assert cholesky_condition == pytest.approx(condition, rel=1e-9)
    torch.testing.assert_close(Z, by_svd, rtol=1e-12, atol=1e-12)
    products = B_by_group @ B_by_group.transpose(1, 2)
    torch.testing.assert_close(products @ Z, B_by_group @ R_by_group, rtol=1e-12, atol=1e-12)
    if mid_per_group < out_channels:
        assert M is None  # singular for r < 1: not formed on this route
        torch.testing.assert_close(B_by_group.transpose(1, 2) @ Z, R_by_group, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(M, products, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("rows, dtype, tolerance", [(5, torch.float64, 1e-15), (300, torch.float64, 1e-13),
                                                    (700, torch.float32, 1e-5), (1030, torch.float32, 1e-5)])
def test_symmetric_product_is_the_product_made_symmetric(rows, dtype, tolerance):
    """M from the blocks on and below the diagonal (300 rows: 2 blocks a side, 1030: 5 with a short last one) is
    B B^T to rounding, and exactly symmetric."""
    A = torch.randn(2, rows, 37, generator=torch.Generator().manual_seed(rows), dtype=dtype)
    product = projection.symmetric_product(A)
    assert torch.equal(product, product.transpose(1, 2))
    assert relative_error(product.double(), A.double() @ A.double().transpose(1, 2)) < tolerance


@pytest.mark.parametrize("rows, expand_ratio", [(300, 10), (512, 2), (400, 4)])
def test_lanczos_condition_estimate_of_a_random_B(rows, expand_ratio):
    """For a random B (r >= 2) with more than LANCZOS_MIN_ROWS rows, cond(B) from LANCZOS_STEPS Lanczos steps on
    B B^T and on its inverse (float32 operators) is within 1e-6 of the exact one (every eigenvalue)."""
    B = torch.empty(2, rows, rows * expand_ratio, dtype=torch.float64).uniform_(
        -1, 1, generator=torch.Generator().manual_seed(rows))
    gram = B @ B.transpose(1, 2)
    eigenvalues = torch.linalg.eigvalsh(gram)
    exact = (eigenvalues[:, -1] / eigenvalues[:, 0]).sqrt().max().item()
    estimate = projection._condition(gram, torch.linalg.cholesky(gram), gram.float())
    assert estimate == pytest.approx(exact, rel=1e-6)
    steps = projection.LANCZOS_STEPS
    assert projection._lanczos_largest_eigenvalue(lambda vectors: gram @ vectors, gram, steps) == pytest.approx(
        eigenvalues[:, -1], rel=1e-6)


def test_condition_is_exact_where_the_estimate_cannot_decide():
    """B B^T = I closes the Krylov space at once (also with the float32 operators, whose rounding leaves ~1e-8 of a
    new direction): cond is every eigenvalue's, exactly 1; an ill-conditioned B's estimate (above
    EXACT_CONDITION_ABOVE) is replaced by the exact value."""
    identity = torch.eye(300, dtype=torch.float64).unsqueeze(0)
    assert projection._lanczos_largest_eigenvalue(lambda vectors: vectors, identity, projection.LANCZOS_STEPS) is None
    assert projection._condition(identity, identity, identity.float()) == 1.0
    generator = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(600, 300, generator=generator, dtype=torch.float64))[0]
    B = U @ torch.diag(torch.logspace(0, -1.7, 300, dtype=torch.float64)) @ V.T  # cond(B) = 50
    gram = (B @ B.T).unsqueeze(0)
    assert projection._condition(gram, torch.linalg.cholesky(gram), gram.float()) == pytest.approx(10 ** 1.7,
                                                                                         rel=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("groups, expand_ratio, feedback_groups", [(1, 10, "dense"), (2, 4, "dense"),
                                                                   (2, 4, "grouped"), (3, 0.5, "grouped"),
                                                                   (1, 0.5, "dense")])
def test_initial_projection_in_the_layers_precision(groups, expand_ratio, feedback_groups, dtype, tolerance):
    """A projected layer's Z_0 and M, formed in its own precision (the Cholesky route) or by the float64 SVD (r < 1):
    M·Z_0 = B·R_0 and Z_0 = pinv(B^T) R_0 to the layer's precision."""
    layer = make_feedback(12, 6, (3, 3), groups=groups, expand_ratio=expand_ratio, parametrization="projected",
                          seed=3, dtype=dtype, feedback_groups=feedback_groups)
    drawn = layer._draw()
    B, R = drawn.B, drawn.R
    Z_exact = layer.from_columns(projection.project_onto_feedback(layer.B_by_group(B), layer.R_by_group(R),
                                                                  with_null=False)[0])
    assert layer.Z.dtype == dtype and relative_error(layer.Z.double(), Z_exact) < tolerance
    expected = pk.reference.feedback_weight(pk.reference.block_diagonal_feedback(B, groups) if layer.grouped else B, R,
                                            groups)
    if layer.grouped:  # the diagonal blocks of the literal product (the others are zero)
        expected = torch_ops.weight_grad_from_correlation(expected, groups)
    assert relative_error(layer.feedback_weight().double(), expected) < tolerance


@pytest.mark.parametrize("chunk_values", [1, 10, 150, 1000])
@pytest.mark.parametrize("groups, expand_ratio, feedback_groups", [(1, 10, "dense"), (3, 4, "dense"),
                                                                   (3, 4, "grouped"), (6, 10, "grouped"),
                                                                   (2, 0.5, "grouped")])
def test_R_in_chunks_gives_the_projection_of_the_whole_R(monkeypatch, chunk_values, groups, expand_ratio,
                                                         feedback_groups):
    """Z_0 and M of a float64 layer whose R_0 is streamed in chunks of 1 to 1000 values (a row, rows within a group,
    whole groups) are those of one chunk for the whole R_0, to 1e-13."""
    settings = dict(groups=groups, expand_ratio=expand_ratio, parametrization="projected", seed=4,
                    dtype=torch.float64, feedback_groups=feedback_groups)
    whole = make_feedback(12, 2, (3, 3), **settings)
    monkeypatch.setattr(seeded_draw, "CHUNK_VALUES", chunk_values)
    chunked = make_feedback(12, 2, (3, 3), **settings)
    assert relative_error(chunked.Z, whole.Z) < 1e-13
    if whole.M is not None:
        assert relative_error(chunked.M, whole.M) < 1e-15


def test_a_wrong_projection_is_refused(monkeypatch):
    """A projection whose M Z is not B R (a faulty solve on an untried device) raises instead of training."""
    project = projection._project

    def faulty(*args, **kwargs):
        Z_by_group, *rest = project(*args, **kwargs)
        return Z_by_group * 1.01, *rest

    monkeypatch.setattr(projection, "_project", faulty)
    with pytest.raises(RuntimeError, match="M Z differs from B R by 0.01"):
        pk.PFALinear(16, 8, parametrization="projected")
    with pytest.raises(RuntimeError, match="M Z differs from B R by 0.01"):  # without M: B (B^T Z)
        pk.PFAConv2d(2, 12, 1, groups=2, expand_ratio=0.25, parametrization="projected")


def test_the_projection_is_formed_at_full_float32_precision():
    """torch.set_float32_matmul_precision("medium") (TF32 or bf16 GEMMs where a device has them) does not reach M,
    at initialisation or when M is formed again: the layer is the one built at "highest", and the user's setting
    is restored."""
    highest = pk.PFALinear(64, 32, parametrization="projected", feedback_seed=5)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        medium = pk.PFALinear(64, 32, parametrization="projected", feedback_seed=5)
        assert torch.get_float32_matmul_precision() == "medium"
        refreshed = copy.deepcopy(medium)
        refreshed.feedback.refresh_projection_matrix()  # M formed again (on load, after .to(dtype)): also at full
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(medium.feedback.M, highest.feedback.M) and torch.equal(medium.feedback.Z, highest.feedback.Z)
    assert torch.equal(refreshed.feedback.M, highest.feedback.M)


@pytest.mark.parametrize("parametrization", ["projected", "explicit"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float64), (torch.float32, torch.float64)])
def test_reset_after_a_change_of_precision(parametrization, dtypes):
    """reset_parameters() after .to(dtype) draws B again rounded through every dtype the layer has been held in:
    the projection is checked against that B (not refused), and a held B equals the one drawn where it is read."""
    built, now = dtypes
    layer = pk.PFALinear(8, 6, parametrization=parametrization, feedback_seed=3, dtype=built).to(now)
    twin = make_feedback(6, 8, parametrization=parametrization, seed=3, dtype=built).to(now)
    layer.feedback.reset_parameters()
    assert torch.equal(layer.feedback.B, twin.B)
    held = layer.feedback._buffers["B_held"]
    if held is not None:
        assert torch.equal(held, layer.feedback._rounded_as_held(layer.feedback._draw().B).to(held.dtype))
    B, R = layer.feedback.B.double(), layer.feedback._draw().R
    tolerance = 1e-5 if now == torch.float32 else 1e-12
    assert relative_error(layer.feedback.feedback_weight().double(), B @ R.to(now).double()) < tolerance
