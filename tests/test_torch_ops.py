"""Building blocks of the PyTorch backend against direct computations."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_projection

from pfa_kernels import reference
from pfa_kernels.backends import torch_ops


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_pieces_of_the_dense_correlation(groups):
    x = torch.randn(2, 2 * groups, 6, 5, dtype=torch.float64)
    g = torch.randn(2, 3 * groups, 4, 3, dtype=torch.float64)
    B = torch.randn(3 * groups, 4 * groups, dtype=torch.float64)
    args = dict(stride=1, padding=0, dilation=1)
    correlation = torch.nn.grad.conv2d_weight(x, (3 * groups, 2 * groups, 3, 3), g, **args, groups=1)
    grad_weight = torch.nn.grad.conv2d_weight(x, (3 * groups, 2, 3, 3), g, **args, groups=groups)
    torch.testing.assert_close(torch_ops.weight_grad_from_correlation(correlation, groups), grad_weight)
    g_mid = torch.einsum("nohw,om->nmhw", g, B)
    grad_R = torch.nn.grad.conv2d_weight(x, (4 * groups, 2, 3, 3), g_mid, **args, groups=groups)
    torch.testing.assert_close(torch_ops.feedback_grad_from_correlation(B, correlation, groups), grad_R)


@pytest.mark.parametrize("groups", [1, 4])
def test_feedback_product_against_literal(groups):
    B = torch.randn(8, 12, dtype=torch.float64)
    R = torch.randn(12, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(torch_ops.feedback_product(B, R, groups), reference.feedback_weight(B, R, groups))


def test_mid_error_any_channel_dim():
    g = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    B = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(torch_ops.mid_error(g, B, 1), torch.einsum("nohw,om->nmhw", g, B))
    torch.testing.assert_close(torch_ops.mid_error(g.movedim(1, -1), B, -1), torch.einsum("nhwo,om->nhwm",
                                                                                          g.movedim(1, -1), B))


@pytest.mark.parametrize("keep_M", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_projected_pieces_against_explicit(groups, keep_M):
    """M·Z (M kept, or applied as B (B^T ·)) equals B·R for Z = pinv(B^T) R; M_j g per position, per group."""
    B = torch.randn(6, 12, dtype=torch.float64)
    R = torch.randn(12, 2, 3, dtype=torch.float64)
    Z, M = dense_projection(B, R, groups, keep_M)
    assert Z.shape == (6, 2 * groups, 3)
    torch.testing.assert_close(torch_ops.projected_feedback_product(B, M, Z, groups),
                               torch_ops.feedback_product(B, R, groups))
    g = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    expected = torch.cat([torch.einsum("nohw,po->nphw", g, B_j @ B_j.t())
                          for B_j in B.reshape(6, groups, -1).unbind(1)], dim=1)
    torch.testing.assert_close(torch_ops.projected_error(g, B, M, groups, channel_dim=1), expected)
