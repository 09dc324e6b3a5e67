"""Baseline credit-assignment rules with a fixed (not learned) feedback weight, beside PFA (docs/design.md §3).

Each is backpropagation's backward with W replaced by a feedback weight W_fb of W's shape in dL/dx;
W learns from its ordinary gradient and nothing else learns:

    fa     feedback alignment (Lillicrap et al. 2016): W_fb = F, fixed random, drawn like W's own init
    usf    uniform sign-concordant feedback: W_fb = sign(W) * rms(W) (one magnitude, W's RMS)
    frsf   fixed random-magnitude sign-concordant: W_fb = sign(W) * |F|, F fixed random
    brsf   batchwise random-magnitude sign-concordant: W_fb = sign(W) * |F_t|, F_t redrawn every forward

(sign-symmetry rules: Moskovitz et al. 2018; Liao et al. 2016). KP, PFA and PFA-o are PFAFeedback (feedback.py)
(learned feedback). F is drawn from the layer's seed like nn's default init of W: U(-1/sqrt(fan_in),
1/sqrt(fan_in)), so W_fb's scale matches W's at initialisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .feedback_state import loads_feedback

FIXED_RULES = ("fa", "usf", "frsf", "brsf")


class FixedFeedback(nn.Module):
    """A fixed-feedback rule's state: `rule`, and F (buffer, W's shape) for fa / frsf; brsf keeps a generator.

    weight_shape: W's shape (C_out, C_in/groups, *kernel), groups as in the layer.
    """

    def __init__(self, rule: str, weight_shape: tuple[int, ...], seed: int | None = None, device=None, dtype=None):
        super().__init__()
        if rule not in FIXED_RULES:
            raise ValueError(f"rule must be one of {FIXED_RULES}; got {rule!r}")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"feedback_seed must be an int or None; got {seed!r}")
        self.rule, self.weight_shape = rule, tuple(weight_shape)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        self.parametrization = "direct"
        self.mid_channels = 0
        self.register_buffer("F", torch.empty(self.weight_shape, device=device, dtype=dtype)
                             if rule in ("fa", "frsf") else None)
        self._batch_generator = None
        self.last_feedback_weight = None  # brsf: the W_fb of the latest forward (for checks and metrics)
        self.reset_parameters()

    @property
    def bound(self) -> float:
        fan_in = math.prod(self.weight_shape[1:])
        return 1 / math.sqrt(fan_in)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        if self.F is not None:
            F = torch.empty(self.weight_shape, dtype=torch.float64).uniform_(-self.bound, self.bound,
                                                                              generator=generator)
            self.F.copy_(F)
        self._batch_generator = None

    def _batch_magnitudes(self, weight: torch.Tensor) -> torch.Tensor:
        if self._batch_generator is None or self._batch_generator.device != weight.device:
            self._batch_generator = torch.Generator(device=weight.device).manual_seed(self.seed)
        draw = torch.rand(self.weight_shape, generator=self._batch_generator, device=weight.device, dtype=weight.dtype)
        return draw * self.bound

    @torch.no_grad()
    def feedback_weight_for(self, weight: torch.Tensor, new_batch: bool = False) -> torch.Tensor:
        """W_fb for forward weight `weight` (W's shape). brsf draws new magnitudes when new_batch is True."""
        if self.rule == "fa":
            return self.F.detach().clone()
        if self.rule == "usf":
            return torch.sign(weight) * weight.detach().square().mean().sqrt()
        if self.rule == "frsf":
            return torch.sign(weight) * self.F.abs()
        if new_batch or self.last_feedback_weight is None:
            self.last_feedback_weight = torch.sign(weight) * self._batch_magnitudes(weight)
        return self.last_feedback_weight

    def generator_state(self):
        """The brsf draw generator's state (None before the first draw, and for the other rules): for checkpoints."""
        if self._batch_generator is None:
            return None
        return {"device": str(self._batch_generator.device), "state": self._batch_generator.get_state()}

    def load_generator_state(self, saved) -> None:
        if saved is None:
            self._batch_generator = None
            return
        self._batch_generator = torch.Generator(device=saved["device"])
        self._batch_generator.set_state(saved["state"])

    def op_arguments(self, weight: torch.Tensor, strategy: str = "auto"):
        """(weight, B, M, feedback tensor, parametrization) for the PFA ops: W_fb used directly, nothing learned."""
        return weight, None, None, self.feedback_weight_for(weight, new_batch=True).detach(), "direct"

    @property
    def parameter(self):
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # As PFAFeedback: a backpropagation checkpoint keeps F as drawn, a partial one is reported (feedback.py).
        if loads_feedback(self, state_dict, prefix, missing_keys):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, weight: {self.weight_shape}, seed={self.seed}"
