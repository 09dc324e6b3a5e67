"""The literal algorithm itself, checked against the formulas of docs/design.md section 1 written by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfa_kernels import reference


def test_linear_reference_follows_the_formulas():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 11, dtype=torch.float64)
    R = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = reference.pfa_linear(x, weight, bias, B, R)
    g = torch.randn_like(y)
    y.backward(g)
    g_rows, x_rows = g.reshape(-1, 6), x.detach().reshape(-1, 5)
    g_mid = g_rows @ B                                   # B^T g per row
    torch.testing.assert_close(y, x @ weight.t() + bias)
    torch.testing.assert_close(x.grad, (g_mid @ R.detach()).reshape(x.shape))
    torch.testing.assert_close(weight.grad, g_rows.t() @ x_rows)
    torch.testing.assert_close(R.grad, g_mid.t() @ x_rows)
    torch.testing.assert_close(bias.grad, g_rows.sum(0))


def test_conv_reference_follows_the_formulas_with_groups():
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 8, dtype=torch.float64)
    R = torch.randn(8, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    args = dict(stride=2, padding=1, dilation=1, groups=2)
    y = reference.pfa_conv(x, weight, None, B, R, **args)
    g = torch.randn_like(y)
    y.backward(g)
    g_mid = torch.einsum("nohw,om->nmhw", g, B)
    expected_x = torch.nn.grad.conv2d_input(x.shape, R.detach(), g_mid, **args)
    expected_R = torch.nn.grad.conv2d_weight(x.detach(), R.shape, g_mid, **args)
    expected_W = torch.nn.grad.conv2d_weight(x.detach(), weight.shape, g, **args)
    torch.testing.assert_close(y, F.conv2d(x, weight, None, **args))
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(R.grad, expected_R)
    torch.testing.assert_close(weight.grad, expected_W)


def test_grouped_feedback_weight_is_dense_and_gives_the_input_gradient():
    """docs/design.md §2.3: the product order with a dense W_fb equals the literal grouped sequence."""
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    B = torch.randn(4, 9, dtype=torch.float64)
    R = torch.randn(9, 2, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    dense = reference.feedback_weight(B, R, groups=3)
    assert dense.shape == (4, 6, 3, 3)
    g_mid = torch.einsum("nohw,om->nmhw", g, B)
    literal = torch.nn.grad.conv2d_input(x.shape, R, g_mid, groups=3)
    torch.testing.assert_close(torch.nn.grad.conv2d_input(x.shape, dense, g), literal)


def test_reference_runs_and_keeps_the_mid_forward():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    y = reference.pfa_conv(x, torch.randn(4, 3, 3, 3), None, torch.randn(4, 40), torch.randn(40, 3, 3, 3))
    saved_shapes = [tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None]
    assert (2, 40, 3, 3) in saved_shapes  # the authors' extra forward through R, stored until backward
