"""The Triton backend's feedback-product kernels, in the form the PyTorch backward takes them
(torch_ops.Pieces): grouped GEMMs for B·R, B^T·C and M·Z (one launch for all groups of a layer), and the
fused sequence-order input gradient. BP's own GEMMs and convolutions stay with cuBLAS/cuDNN."""

from __future__ import annotations

import torch

from ..torch_ops import Pieces
from . import grouped_matmul as _grouped_matmul  # noqa: F401  (registers pfa_kernels::triton_grouped_matmul)
from . import sequence_backward as _sequence_backward  # noqa: F401  (registers the fused op)


def columns_by_group(dense: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """(C_out, C_in, *kernel) -> [group j's columns as a (C_out, C_in/G * prod(kernel)) strided view]."""
    columns = dense.reshape(dense.shape[0], groups, -1)
    return [columns[:, j] for j in range(groups)]


def B_by_group(B: torch.Tensor, groups: int) -> list[torch.Tensor]:
    per_group = B.shape[1] // groups
    return [B[:, j * per_group:(j + 1) * per_group] for j in range(groups)]


def feedback_product(B, R, groups=1):
    """W_fb = B·R, dense (C_out, C_in, *kernel): one grouped launch over the groups."""
    R_rows = R.reshape(groups, R.shape[0] // groups, -1)
    products = torch.ops.pfa_kernels.triton_grouped_matmul(B_by_group(B, groups), list(R_rows.unbind(0)))
    return torch.stack(products, dim=1).reshape(B.shape[0], R.shape[1] * groups, *R.shape[2:])


def feedback_grad_from_correlation(B, correlation, groups=1):
    """dL/dR = B_j^T C_j per group: (C_mid, C_in/G, *kernel), one grouped launch."""
    lefts = [B_j.t() for B_j in B_by_group(B, groups)]
    products = torch.ops.pfa_kernels.triton_grouped_matmul(lefts, columns_by_group(correlation, groups))
    return torch.cat(products, dim=0).reshape(B.shape[1], correlation.shape[1] // groups, *correlation.shape[2:])


def projected_feedback_product(B, M, Z, groups=1):
    """W_fb = M_j Z_j per group, or B_j (B_j^T Z_j) when M is None: dense (C_out, C_in, *kernel)."""
    columns = columns_by_group(Z, groups)
    if M is not None:
        products = torch.ops.pfa_kernels.triton_grouped_matmul(list(M.unbind(0)), columns)
    else:
        B_groups = B_by_group(B, groups)
        inner = torch.ops.pfa_kernels.triton_grouped_matmul([B_j.t() for B_j in B_groups], columns)
        products = torch.ops.pfa_kernels.triton_grouped_matmul(B_groups, inner)
    return torch.stack(products, dim=1).reshape(Z.shape)


TRITON_PIECES = Pieces(feedback_product, feedback_grad_from_correlation, projected_feedback_product,
                       torch.ops.pfa_kernels.triton_sequence_input_grad)
