"""What a feedback layer's seed draws, in the order of its generator's stream: B, R_0, B's mask, R's mask.

Every value comes from one CPU generator seeded with the layer's feedback_seed (docs/design.md §2.6), so every
process and every device gets the same B and R_0. R_0 (C_mid, C_in/G, *kernel) is the largest: 10x its layer's
weight at r = 10, 2 GB of float64 for a ResNet-50. A projected layer reads it once, in the products B_j R_j of its
initial projection, so it is streamed (SeededDraw.R_chunks): drawn in chunks of at most CHUNK_VALUES values into one
reused buffer, never held whole. The chunks are the values of one draw of the whole R_0: the CPU's uniform_ takes
one value of the stream per element, in memory order (tests/test_seeded_draw.py checks this against
nn.init.xavier_uniform_ on the whole tensor). Every uniform value is drawn by uniform_draw.uniform_: uniform_'s values,
faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import uniform_draw
from .feedback_options import feedback_densities

# 4 M float64 values (32 MB) per chunk of R_0: B_j's GEMM with a chunk keeps a few hundred rows or more of R_0
# (910 for a 512-channel 3x3 layer), and a fresh multi-GB tensor doubled the draw's time (page faults: 0.38 s
# against 0.21 s for 50 M values drawn into a reused buffer on this CPU).
CHUNK_VALUES = 1 << 22


@dataclass
class FixedDraw:
    """B (B's shape, float64 or float32 as asked, masked), R_0 (R's shape, float64, masked) or None where it was not
    asked for, the masks (bool, or None without one), and the generator's state where R_0's values begin (for
    SeededDraw.R_chunks)."""

    B: torch.Tensor
    R: torch.Tensor | None
    B_mask: torch.Tensor | None
    R_mask: torch.Tensor | None
    R_state: torch.Tensor


@dataclass(frozen=True)
class SeededDraw:
    """The draw of one feedback layer, from the shapes and options of a PFAFeedback (feedback.py)."""

    seed: int
    B_shape: tuple[int, int]
    R_shape: tuple[int, ...]
    groups: int
    grouped: bool
    out_channels: int
    mid_channels: int
    feedback_init: str
    feedback_density: object

    @classmethod
    def of(cls, feedback) -> SeededDraw:
        return cls(feedback.seed, feedback.B_shape, feedback.R_shape, feedback.groups, feedback.grouped,
                   feedback.out_channels, feedback.mid_channels, feedback.feedback_init, feedback.feedback_density)

    @property
    def rows_per_group(self) -> int:
        return self.out_channels // self.groups if self.grouped else self.out_channels

    def draw(self, with_R: bool = True, B_dtype: torch.dtype = torch.float64) -> FixedDraw:
        """B, the masks and, with with_R, the whole R_0. Without it, R_0's values are passed over (in chunks) only
        where a mask follows them in the stream. B_dtype float32: B rounded to float32 as it is drawn (a float32 layer
        needs no float64 B)."""
        generator = torch.Generator().manual_seed(self.seed)
        B_density, R_density = feedback_densities(self.feedback_density)
        B = self._draw_B(generator, B_dtype)
        R_state = generator.get_state()
        R = None
        if with_R:
            bound = _xavier_bound(self.R_shape)  # nn.init.xavier_uniform_(R) is R.uniform_(-bound, bound)
            R = uniform_draw.uniform_(torch.empty(self.R_shape, dtype=torch.float64), -bound, bound, generator)
        elif B_density < 1 or R_density < 1:
            for _ in self._chunks(generator):
                pass
        B_mask = R_mask = None
        if B_density < 1:
            B_mask = torch.rand(B.shape, generator=generator, dtype=torch.float64) < B_density
            B.mul_(B_mask)
        if R_density < 1:
            R_mask = torch.rand(self.R_shape, generator=generator, dtype=torch.float64) < R_density
            if R is not None:
                R.mul_(R_mask)
        return FixedDraw(B, R, B_mask, R_mask, R_state)

    def R_chunks(self, R_state: torch.Tensor, dtype: torch.dtype = torch.float64
                 ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """R_0 by group, (G, C_mid/G, K), in chunks: (groups, rows within each group, values (groups, rows, K),
        drawn in float64 and rounded to `dtype`). The values are a view of one buffer that the next chunk
        overwrites: use them before asking for the next. Unmasked: a layer with R's mask keeps R whole (explicit).
        (Drawing the next chunk in a thread beside the caller's GEMMs gained nothing: 10.3 s against 10.1 s for a
        ResNet-50, best of 3.)"""
        generator = torch.Generator()
        generator.set_state(R_state)
        return self._chunks(generator, dtype)

    def _chunk_layout(self):
        """(groups, rows within each group, chunk shape) of each chunk of R_0 by group, in stream order: whole groups
        per chunk where a group has at most CHUNK_VALUES values (a depthwise layer's groups are 10 x 9), else rows
        of one group."""
        mid_per_group = self.mid_channels // self.groups
        columns = math.prod(self.R_shape[1:])
        group_values = mid_per_group * columns
        if group_values == 0:
            return
        if group_values <= CHUNK_VALUES:
            per_chunk = CHUNK_VALUES // group_values
            for start in range(0, self.groups, per_chunk):
                stop = min(start + per_chunk, self.groups)
                yield slice(start, stop), slice(0, mid_per_group), (stop - start, mid_per_group, columns)
            return
        rows_per_chunk = max(1, CHUNK_VALUES // columns)
        for group in range(self.groups):
            for start in range(0, mid_per_group, rows_per_chunk):
                stop = min(start + rows_per_chunk, mid_per_group)
                yield slice(group, group + 1), slice(start, stop), (1, stop - start, columns)

    def _chunks(self, generator: torch.Generator, dtype: torch.dtype = torch.float64):
        """The chunks of _chunk_layout drawn from `generator` into one reused buffer of `dtype` (or passed over: the
        caller need not look at them)."""
        layout = list(self._chunk_layout())
        if not layout:
            return
        bound = _xavier_bound(self.R_shape)
        buffer = torch.empty(max(math.prod(shape) for _, _, shape in layout), dtype=dtype)
        for group_slice, row_slice, shape in layout:
            values = uniform_draw.uniform_(buffer[:math.prod(shape)], -bound, bound, generator)
            yield group_slice, row_slice, values.view(shape)

    def _draw_B(self, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        B = torch.empty(self.B_shape, dtype=dtype)
        rows, mid_per_group = self.rows_per_group, self.mid_channels // self.groups
        B_density = feedback_densities(self.feedback_density)[0]
        if self.feedback_init == "random":
            # Var(B_ij) = gain^2 * 2 / (rows + C_mid_j) = 1 / C_mid_j for gain^2 = (1 + 1/r) / 2 (r = C_mid/C_out), so
            # E[B_j B_j^T] = I; a mask keeps that by dividing the gain by sqrt(density). (Dense: nn's xavier init of
            # the whole B, C_mid_j = C_mid, as the authors' code draws it.)
            ratio = self.mid_channels / max(self.out_channels, 1)  # C_out = 0: B is empty, any gain
            gain = math.sqrt((1 + 1 / ratio) / 2) / math.sqrt(B_density)
            bound = gain * math.sqrt(6 / (rows + mid_per_group)) if self.grouped else _xavier_bound(B.shape, gain)
            uniform_draw.uniform_(B, -bound, bound, generator)
        elif self.feedback_init == "orthogonal":
            B = torch.empty(self.B_shape, dtype=torch.float64)
            blocks = B.reshape(self.groups, rows, mid_per_group).unbind(0) if self.grouped else (B,)
            for block in blocks:
                nn.init.orthogonal_(block, gain=1 / math.sqrt(B_density), generator=generator)
        else:
            B.copy_(torch.eye(rows, dtype=torch.float64).repeat(self.groups, 1) if self.grouped
                    else torch.eye(self.out_channels, dtype=torch.float64))
        return B.to(dtype)


def _xavier_bound(shape: tuple[int, ...], gain: float = 1.0) -> float:
    """nn.init.xavier_uniform_'s bound for a tensor of `shape`, computed as it computes it."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return math.sqrt(3.0) * std
