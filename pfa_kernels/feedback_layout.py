"""How a PFA feedback's tensors are laid out by group (docs/design.md §2.5): the shapes of B, R, Z and W_fb, and the
views of them by group that projection.py and the ops work on.

Dense feedback (groups = 1, or feedback_groups="dense") holds one B (C_out, C_mid) whose column block j mixes group
j's mid population into every output channel; grouped feedback holds B_j (C_out/G, C_mid/G) as the row blocks of B
(C_out, C_mid/G). Either way B_j, R_j and Z_j (or W_fb_j) of group j are B_by_group()[j], R_by_group(R)[j] and
columns_by_group(Z)[j].
"""

from __future__ import annotations

import math

import torch

from .backends.torch_ops import grouped_B, grouped_columns


class FeedbackLayout:
    """The group layout of a feedback (mixed into feedback.PFAFeedback, which sets out_channels, mid_channels, groups,
    in_channels_per_group, kernel_size and feedback_groups, and gives B)."""

    @property
    def grouped(self) -> bool:
        """Whether B is block-diagonal over the layer's groups (feedback_groups="grouped" and groups > 1)."""
        return self.groups > 1 and self.feedback_groups == "grouped"

    @property
    def rows_per_group(self) -> int:
        """The output channels each B_j reaches: C_out/G (grouped) or C_out (dense)."""
        return self.out_channels // self.groups if self.grouped else self.out_channels

    @property
    def B_shape(self) -> tuple[int, int]:
        return (self.out_channels, self.mid_channels // self.groups if self.grouped else self.mid_channels)

    @property
    def R_shape(self) -> tuple[int, ...]:
        return (self.mid_channels, self.in_channels_per_group, *self.kernel_size)

    @property
    def weight_like_shape(self) -> tuple[int, ...]:
        """The shape of W_fb and Z: W's (C_out, C_in/G, *kernel) with grouped feedback, else (C_out, C_in, *kernel)."""
        in_channels = self.in_channels_per_group * (1 if self.grouped else self.groups)
        return (self.out_channels, in_channels, *self.kernel_size)

    Z_shape = weight_like_shape

    def B_by_group(self, B: torch.Tensor | None = None) -> torch.Tensor:
        """B_j for every group: (G, rows_per_group, C_mid/G), a view of B (default: self.B)."""
        B = self.B if B is None else B
        if self.grouped:
            return B.reshape(self.groups, self.rows_per_group, B.shape[1])
        return grouped_B(B, self.groups)

    def R_by_group(self, R: torch.Tensor) -> torch.Tensor:
        """R (C_mid, C_in/G, *kernel) -> (G, C_mid/G, K). Explicit sizes: reshape cannot infer one from zero
        elements."""
        return R.reshape(self.groups, self.mid_channels // self.groups, math.prod(self.R_shape[1:]))

    def columns_by_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """A W_fb- or Z-shaped tensor -> (G, rows_per_group, K): what each M_j or B_j multiplies."""
        if self.grouped:
            return tensor.reshape(self.groups, self.rows_per_group, math.prod(self.R_shape[1:]))
        return grouped_columns(tensor, self.groups)

    def from_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """(G, rows_per_group, K) -> the W_fb/Z shape (the inverse of columns_by_group)."""
        if self.grouped:
            return columns.reshape(self.weight_like_shape)
        in_shape = self.R_shape[1:]
        dense = columns.reshape(self.groups, self.out_channels, *in_shape).transpose(0, 1)
        return dense.reshape(self.weight_like_shape)

    def dense_B(self) -> torch.Tensor:
        """B as the literal algorithm (reference.py) takes it, (C_out, C_mid): grouped feedback's B_j on the
        block diagonal, zeros elsewhere."""
        if not self.grouped:
            return self.B
        from .reference import block_diagonal_feedback
        return block_diagonal_feedback(self.B, self.groups)

    def R_grad_from_weight_grad(self, grad_weight_like: torch.Tensor) -> torch.Tensor:
        """B_j^T times a W_fb-shaped gradient per group: dL/dR from dL/dW_fb-like (dL/dZ of a projected layer,
        docs/design.md §2.4). Returns R's shape."""
        product = torch.bmm(self.B_by_group().transpose(1, 2).to(grad_weight_like.dtype),
                            self.columns_by_group(grad_weight_like))
        return product.reshape(self.R_shape)
