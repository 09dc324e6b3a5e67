"""The Triton backend's feedback-product kernels, in the form the PyTorch backward takes them
(torch_ops.Pieces): strided batched GEMMs for B·R, B^T·C and M·Z (one launch for all groups of a layer, the
groups being strided views of one tensor, so no pointer table and no host-to-device copy), and the fused
sequence-order input gradient. BP's own GEMMs and convolutions stay with cuBLAS/cuDNN.

Shapes: B (C_out, C_mid), R (C_mid, C_in/G, *kernel), correlation and Z (C_out, C_in, *kernel) dense over the
G groups, M (G, C_out, C_out).
"""

from __future__ import annotations

import torch

from ..torch_ops import Pieces, grouped_B, grouped_columns
from . import batched_matmul as _batched_matmul  # noqa: F401  (registers pfa_kernels::triton_batched_matmul)
from . import sequence_backward as _sequence_backward  # noqa: F401  (registers the fused op)


def columns_by_group(dense: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """(C_out, C_in, *kernel) -> [group j's columns as a (C_out, C_in/G * prod(kernel)) strided view]."""
    return list(grouped_columns(dense, groups).unbind(0))


def B_by_group(B: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """B (C_out, C_mid) -> [B_j, group j's (C_out, C_mid/G) columns, a strided view]."""
    return list(grouped_B(B, groups).unbind(0))


def _dense_over_groups(products: torch.Tensor, like_shape) -> torch.Tensor:
    """(G, C_out, C_in/G * prod(kernel)) -> (C_out, C_in, *kernel) = like_shape, groups side by side."""
    return products.transpose(0, 1).reshape(like_shape)


def feedback_product(B, R, groups=1):
    """W_fb = B·R, dense (C_out, C_in, *kernel): one batched launch over the groups."""
    R_groups = R.reshape(groups, R.shape[0] // groups, -1)
    products = torch.ops.pfa_kernels.triton_batched_matmul(grouped_B(B, groups), R_groups)
    return _dense_over_groups(products, (B.shape[0], R.shape[1] * groups, *R.shape[2:]))


def feedback_grad_from_correlation(B, correlation, groups=1):
    """dL/dR = B_j^T C_j per group: (C_mid, C_in/G, *kernel), one batched launch."""
    B_transposed = grouped_B(B, groups).transpose(1, 2)  # (G, C_mid/G, C_out), no copy
    products = torch.ops.pfa_kernels.triton_batched_matmul(B_transposed, grouped_columns(correlation, groups))
    return products.reshape(B.shape[1], correlation.shape[1] // groups, *correlation.shape[2:])


def projected_feedback_product(B, M, Z, groups=1):
    """W_fb = M_j Z_j per group, or B_j (B_j^T Z_j) when M is None: dense (C_out, C_in, *kernel)."""
    columns = grouped_columns(Z, groups)
    if M is not None:
        products = torch.ops.pfa_kernels.triton_batched_matmul(M, columns)
    else:
        B_groups = grouped_B(B, groups)
        inner = torch.ops.pfa_kernels.triton_batched_matmul(B_groups.transpose(1, 2), columns)
        products = torch.ops.pfa_kernels.triton_batched_matmul(B_groups, inner)
    return _dense_over_groups(products, Z.shape)


TRITON_PIECES = Pieces(feedback_product, feedback_grad_from_correlation, projected_feedback_product,
                       torch.ops.pfa_kernels.triton_sequence_input_grad)
