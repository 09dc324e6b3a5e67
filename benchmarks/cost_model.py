"""Cost model beside the measurements: multiply-adds and bytes of every kernel of a layer's forward +
backward, per implementation, and the time a roofline predicts for an H100.

Each implementation is a list of kernels (GEMMs / convolutions); a kernel's bytes are the tensors it
reads and writes once (no reuse across kernels). Roofline time of a kernel = max(2 * MACs / peak
FLOP/s, bytes / peak bandwidth); a path's time is the sum over its kernels. Peak figures used (NVIDIA
H100 SXM5 datasheet, dense, no sparsity): bf16 tensor cores 989.4 TFLOP/s, HBM3 3.35 TB/s, 2 bytes per
element. A CPU ratio carries over where the extra kernels are compute-bound on both machines; where
they are small GEMMs on weight-sized tensors (M·Z, B·R for small C_out) they are bandwidth-bound on
the GPU, and the roofline shows what that costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pfa_kernels import planner

H100_BF16_FLOPS = 989.4e12
H100_HBM_BYTES_PER_S = 3.35e12
H100_BYTES_PER_ELEMENT = 2


@dataclass(frozen=True)
class LayerSpec:
    """A conv2d or linear layer shape, per sample (batch applied separately).

    input_shape / output_shape: conv (C, H, W); linear (*tokens, C). names: the model layers with it.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple = ()
    stride: tuple = ()
    padding: tuple = ()
    groups: int = 1
    bias: bool = True
    input_shape: tuple = ()
    output_shape: tuple = ()
    names: tuple = field(default=(), compare=False)

    @property
    def label(self) -> str:
        if self.kind == "linear":
            tokens = math.prod(self.input_shape[:-1])
            return f"linear {self.in_channels}->{self.out_channels}" + (f" x{tokens} tokens" if tokens > 1 else "")
        k = "x".join(map(str, self.kernel_size))
        text = f"conv {self.in_channels}->{self.out_channels} k{k} s{self.stride[0]} @{self.input_shape[1]}"
        return text + (f" g{self.groups}" if self.groups > 1 else "")


def _sizes(spec: LayerSpec, batch: int, expand_ratio: float):
    positions_in = batch * math.prod(spec.input_shape[:-1] if spec.kind == "linear" else spec.input_shape[1:])
    positions = batch * math.prod(spec.output_shape[:-1] if spec.kind == "linear" else spec.output_shape[1:])
    kernel = math.prod(spec.kernel_size) if spec.kind != "linear" else 1
    groups = spec.groups
    mid = groups * max(1, math.floor(expand_ratio * spec.out_channels / groups + 0.5))  # feedback.mid_channels_for
    return positions_in, positions, kernel, mid


def kernels(spec: LayerSpec, batch: int, impl: str, expand_ratio: float,
            feedback_groups: str = "grouped") -> list[tuple[str, int, int]]:
    """(kernel name, MACs, elements read + written) of forward + backward for impl: "bp", "reference",
    or "<explicit|projected>-<auto|product|sequence>[-backend]"; feedback_groups as the layers take it (a grouped
    layer's default, "grouped", keeps B block-diagonal: docs/design.md §2.5)."""
    P_in, P, kernel, C_mid = _sizes(spec, batch, expand_ratio)
    C_in, C_out, G = spec.in_channels, spec.out_channels, spec.groups
    K = C_in // G * kernel            # inputs per output
    K_dense = C_in * kernel           # a dense (groups = 1) weight's fan-in
    x, y, W, W_dense = P_in * C_in, P * C_out, C_out * K, C_out * K_dense
    R, B, mid = C_mid * K, C_out * C_mid, P * C_mid
    work = [("forward", P * C_out * K, x + W + y)]
    if impl == "bp":
        return work + [("dgrad", P * C_out * K, y + W + x), ("wgrad", P * C_out * K, x + y + W)]
    if impl == "reference":
        return work + [("mid forward x->R", P * C_mid * K, x + R + mid), ("mid error B^T g", P * C_out * C_mid,
                                                                        y + B + mid),
                       ("dgrad through R", P * C_mid * K, mid + R + x), ("dR", P * C_mid * K, x + mid + R),
                       ("wgrad", P * C_out * K, x + y + W)]
    parametrization, strategy = (impl.split("-") + ["auto"])[:2]
    if G > 1 and feedback_groups == "grouped":
        # W_fb has W's shape: BP's GEMMs with W_fb in dL/dx, plus the per-group feedback products (one order).
        rows, B_grouped = C_out // G, C_out * (C_mid // G)
        work.append(("wgrad", P * C_out * K, x + y + W))
        if parametrization == "explicit":
            work += [("W_fb_j = B_j R_j", C_out * (C_mid // G) * K, B_grouped + R + W),
                     ("dR_j = B_j^T dW_j", C_out * (C_mid // G) * K, B_grouped + W + R)]
        elif rows <= 2 * (C_mid // G):  # M_j kept (feedback.keeps_projection_matrix)
            work.append(("W_fb_j = M_j Z_j", C_out * rows * K, G * rows * rows + 2 * W))
        else:
            work.append(("W_fb_j = B_j (B_j^T Z_j)", 2 * C_out * (C_mid // G) * K, B_grouped + 2 * W))
        return work + [("dgrad W_fb", P * C_out * K, y + W + x)]
    width = C_out if G * C_out <= 2 * C_mid else 2 * (C_mid // G)
    shape = planner.LayerShape(P, C_out, C_mid, K, G, parametrization, width if parametrization == "projected" else 0)
    plan = planner.choose_orders(shape, strategy, True, True, True)
    correlation_dense = G > 1 and (parametrization == "projected" or plan.feedback_grad_order == "product")
    work.append(("correlation (dense)" if correlation_dense else "wgrad", P * C_out * (K_dense if correlation_dense
                                                                                   else K), x + y + W_dense))
    if parametrization == "explicit":
        if "sequence" in (plan.input_order, plan.feedback_grad_order):
            work.append(("mid error B^T g", P * C_out * C_mid, y + B + mid))
        if plan.input_order == "product":
            work += [("W_fb = B R", C_out * C_mid * K, B + R + W_dense), ("dgrad W_fb", P * C_out * K_dense,
                                                                          y + W_dense + x)]
        else:
            work.append(("dgrad through R", P * C_mid * K, mid + R + x))
        if plan.feedback_grad_order == "product":
            work.append(("dR = B^T dW", C_out * C_mid * K, B + W_dense + R))
        else:
            work.append(("dR", P * C_mid * K, x + mid + R))
        return work
    projection = G * C_out * C_out if width == C_out else B
    if plan.input_order == "product":
        work += [("W_fb = M Z", G * C_out * width * K, projection + 2 * W_dense),
                 ("dgrad W_fb", P * C_out * K_dense, y + W_dense + x)]
    else:
        work += [("g' = M g", P * G * C_out * width, y + projection + P * G * C_out),
                 ("dgrad through Z", P * G * C_out * K, P * G * C_out + W_dense + x)]
    return work


def costs(spec: LayerSpec, batch: int, impl: str, expand_ratio: float, feedback_groups: str = "grouped") -> dict:
    """Totals: MACs, bytes (at H100_BYTES_PER_ELEMENT) and the H100 roofline time in ms."""
    work = kernels(spec, batch, impl, expand_ratio, feedback_groups)
    macs = sum(m for _, m, _ in work)
    elements = sum(e for _, _, e in work)
    seconds = sum(max(2 * m / H100_BF16_FLOPS, e * H100_BYTES_PER_ELEMENT / H100_HBM_BYTES_PER_S)
                  for _, m, e in work)
    return {"macs": macs, "bytes": elements * H100_BYTES_PER_ELEMENT, "h100_ms": seconds * 1e3}
