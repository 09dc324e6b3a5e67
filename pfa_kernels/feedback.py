"""Feedback parametrisations: how a layer forms its feedback weight W_fb and how that learns.

PFAFeedback is PFA with an explicit feedback population (DESIGN.md section 1): a fixed random
B (C_out, C_mid) and a learned R (C_mid, C_in/groups, *kernel), with W_fb = B·R.

Everything random (B, R and the sparse masks) is drawn from the layer's own seed on a CPU
generator, so every process that builds the same model with the same seed gets the same B, on any
device (what DDP needs), and reset_parameters() redraws the same values.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .backends.torch_ops import feedback_product

FEEDBACK_INITS = ("random", "orthogonal", "identity")
PARAMETRIZATIONS = ("explicit",)


def mid_channels_for(out_channels: int, expand_ratio, groups: int = 1) -> int:
    """C_mid = round(expand_ratio * C_out) (half up), at least 1; checked to be divisible by groups."""
    if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, numbers.Real):
        raise TypeError(f"expand_ratio must be a number; got {expand_ratio!r}")
    if not math.isfinite(expand_ratio) or expand_ratio <= 0:
        raise ValueError(f"expand_ratio must be a finite number > 0; got {expand_ratio!r}")
    mid_channels = max(1, math.floor(expand_ratio * out_channels + 0.5))
    if mid_channels % groups:
        raise ValueError(
            f"expand_ratio={expand_ratio} gives C_mid = {mid_channels} feedback channels for C_out = {out_channels}, "
            f"which groups={groups} does not divide; choose an expand_ratio that makes C_mid a multiple of groups")
    return mid_channels


def check_feedback_options(feedback_init, feedback_density, parametrization):
    """Validate the feedback keyword arguments shared by every PFA layer and pk.convert."""
    if feedback_init not in FEEDBACK_INITS:
        raise ValueError(f"feedback_init must be one of {FEEDBACK_INITS}; got {feedback_init!r}")
    if isinstance(feedback_density, bool) or not isinstance(feedback_density, numbers.Real):
        raise TypeError(f"feedback_density must be a number in (0, 1]; got {feedback_density!r}")
    if not 0 < feedback_density <= 1:
        raise ValueError(f"feedback_density must be in (0, 1]; got {feedback_density!r}")
    if feedback_init == "identity" and feedback_density < 1:
        raise ValueError("feedback_init='identity' (Kolen-Pollack) takes no sparse mask: feedback_density must be 1")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}; got {parametrization!r}")


class PFAFeedback(nn.Module):
    """Explicit PFA feedback: fixed B (buffer, (C_out, C_mid)) and learned R (Parameter,
    (C_mid, C_in/groups, *kernel)); optional fixed Bernoulli masks B_mask and R_mask (buffers).

    Masked entries of R are zero from the start and stay zero: layers use R * R_mask, so they get no
    gradient and no optimizer update (weight decay on a zero is zero).
    """

    def __init__(self, out_channels: int, in_channels_per_group: int, kernel_size: tuple[int, ...] = (),
                 groups: int = 1, expand_ratio=10, feedback_init: str = "random", feedback_density=1.0,
                 seed: int | None = None, device=None, dtype=None):
        super().__init__()
        check_feedback_options(feedback_init, feedback_density, "explicit")
        mid_channels = mid_channels_for(out_channels, expand_ratio, groups)
        if feedback_init == "identity" and mid_channels != out_channels:
            raise ValueError(
                f"feedback_init='identity' (Kolen-Pollack) needs C_mid == C_out; expand_ratio={expand_ratio} gives "
                f"C_mid = {mid_channels} for C_out = {out_channels} (use expand_ratio=1)")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"feedback_seed must be an int or None; got {seed!r}")
        factory = {"device": device, "dtype": dtype}
        self.out_channels, self.mid_channels, self.groups = out_channels, mid_channels, groups
        self.expand_ratio, self.feedback_init, self.feedback_density = expand_ratio, feedback_init, feedback_density
        # Without an explicit seed, take one from the global RNG: torch.manual_seed(s) then fixes it.
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        self.register_buffer("B", torch.empty(out_channels, mid_channels, **factory))
        self.R = nn.Parameter(torch.empty(mid_channels, in_channels_per_group, *kernel_size, **factory))
        if feedback_density < 1:
            self.register_buffer("B_mask", torch.empty(self.B.shape, dtype=torch.bool, device=device))
            self.register_buffer("R_mask", torch.empty(self.R.shape, dtype=torch.bool, device=device))
        else:
            self.B_mask = self.R_mask = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw masks, B and R from the layer's seed (the same values every time)."""
        generator = torch.Generator().manual_seed(self.seed)
        density = self.feedback_density
        B = torch.empty(self.B.shape, dtype=torch.float64)
        if self.feedback_init == "random":
            # Var(B_ij) = gain^2 * 2 / (C_out + C_mid) = 1 / C_mid for gain^2 = (1 + 1/r) / 2 (r = C_mid/C_out),
            # so E[B B^T] = I; a mask keeps that by dividing the gain by sqrt(density).
            ratio = self.mid_channels / self.out_channels
            gain = math.sqrt((1 + 1 / ratio) / 2) / math.sqrt(density)
            nn.init.xavier_uniform_(B, gain=gain, generator=generator)
        elif self.feedback_init == "orthogonal":
            nn.init.orthogonal_(B, gain=1 / math.sqrt(density), generator=generator)
        else:
            B.copy_(torch.eye(self.out_channels, dtype=torch.float64))
        R = torch.empty(self.R.shape, dtype=torch.float64)
        nn.init.xavier_uniform_(R, generator=generator)
        if self.B_mask is not None:
            B_mask = torch.rand(B.shape, generator=generator, dtype=torch.float64) < density
            R_mask = torch.rand(R.shape, generator=generator, dtype=torch.float64) < density
            self.B_mask.copy_(B_mask)
            self.R_mask.copy_(R_mask)
            B.mul_(B_mask)
            R.mul_(R_mask)
        self.B.copy_(B)
        self.R.copy_(R)

    def effective_R(self) -> torch.Tensor:
        """R as the layer uses it: R * R_mask with a sparse mask, else R. (C_mid, C_in/groups, *kernel)."""
        return self.R if self.R_mask is None else self.R * self.R_mask

    def feedback_weight(self) -> torch.Tensor:
        """W_fb = B·R: W's shape, or dense (C_out, C_in, *kernel) when groups > 1 (DESIGN §2.3)."""
        return feedback_product(self.B, self.effective_R(), self.groups)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A backpropagation checkpoint (nn.Conv2d, nn.Linear, torchvision weights) has no feedback
        # state at all: load its weight and bias and keep this layer's feedback as drawn.
        if not any(key.startswith(prefix) for key in state_dict):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        text = f"B: ({self.out_channels}, {self.mid_channels}), R: {tuple(self.R.shape)}, init={self.feedback_init!r}"
        if self.feedback_density < 1:
            text += f", density={self.feedback_density}"
        return text + f", seed={self.seed}"
