"""Feedback parametrizations: how a PFA layer forms its feedback weight W_fb and how that learns.

PFA keeps a feedback population (docs/design.md §1): a fixed random B and a learned R (C_mid, C_in/groups,
*kernel), with W_fb = B·R. One class per parametrization (docs/design.md §2.4), picked by
feedback_choice.make_feedback:

    ExplicitFeedback   R itself, a Parameter.
    ProjectedFeedback  Z, a Parameter, with W_fb_j = M_j Z_j per group j, M_j = B_j B_j^T fixed. Under SGD-family
                       optimizers this reproduces explicit training of R exactly, and no per-step tensor scales with
                       C_mid. R = B^T Z + N, where the null-space part N (B N = 0) never affects training; it is kept
                       (R_null) only when the layer was switched from an explicit R, else it is the null-space part
                       of the layer's seeded R_0.

A grouped convolution (groups G > 1) has two feedback structures (feedback_groups, docs/design.md §2.5):

    "grouped"  B block-diagonal: B_j (C_out/G, C_mid/G) feeds group j's mid population back to group j's outputs
               only. B is held as (C_out, C_mid/G), like a grouped 1x1 convolution's weight; W_fb, Z and M are
               grouped like W (Z has W's shape, M is (G, C_out/G, C_out/G)), so every cost stays at BP's.
    "dense"    one dense B (C_out, C_mid), the authors' code: B_j = B[:, group j's mid channels] mixes group j's mid
               population into every output channel, so W_fb and Z are dense (C_out, C_in, *kernel) and a
               depthwise layer's input gradient costs C_out times BP's.

Everything random (B, R_0 and the sparse masks) is drawn from the layer's own seed on a CPU generator, so every
process that builds the same model with the same seed gets the same B, on any device (what DDP needs), and
reset_parameters() redraws the same values. Explicit and projected layers with the same seed have the same W_fb.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
from torch import nn

from . import projection
from .feedback_layout import FeedbackLayout
from .feedback_options import (  # noqa: F401  (re-exported: the options belong to the feedback's interface)
    FEEDBACK_GROUPS,
    FEEDBACK_INITS,
    MASKED_R_MESSAGE,
    PARAMETRIZATION_CHOICES,
    PARAMETRIZATIONS,
    check_feedback_options,
    feedback_densities,
    mid_channels_for,
)
from .feedback_state import STATE_FORMAT, fixed_state_checksum, load_fixed_state, loads_feedback
from .seeded_draw import FixedDraw, SeededDraw

# cond(B) above which projected feedback warns: float32 rounding in M·Z (~6e-8) may then exceed ~1e-5 relative.
CONDITION_WARNING = 100.0


class PFAFeedback(FeedbackLayout, nn.Module):
    """What every PFA feedback parametrization shares: the fixed B (buffer), the optional fixed Bernoulli masks
    B_mask (B's shape) and R_mask (R's shape), the seed they are drawn from, and the group structure.

    B is (C_out, C_mid), or (C_out, C_mid/G) with grouped feedback (row block j is B_j). Masked entries of R are zero
    from the start and stay zero: explicit layers use R * R_mask, so they get no gradient and no optimizer update.
    Subclasses (ExplicitFeedback, ProjectedFeedback) hold the learned tensor; feedback_choice.make_feedback picks one.
    The shapes of B, R, Z and W_fb and their views by group are FeedbackLayout's (feedback_layout.py).
    """

    parametrization: str

    def __init__(self, out_channels: int, in_channels_per_group: int, kernel_size: tuple[int, ...] = (),
                 groups: int = 1, expand_ratio=10, feedback_init: str = "random", feedback_density=1.0,
                 seed: int | None = None, device=None, dtype=None, feedback_groups: str = "grouped"):
        super().__init__()
        check_feedback_options(feedback_init, feedback_density, self.parametrization, feedback_groups)
        mid_channels = mid_channels_for(out_channels, expand_ratio, groups)
        if feedback_init == "identity" and mid_channels != out_channels:
            raise ValueError(
                f"feedback_init='identity' (Kolen-Pollack) needs C_mid == C_out; expand_ratio={expand_ratio} gives "
                f"C_mid = {mid_channels} for C_out = {out_channels} (use expand_ratio=1)")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"feedback_seed must be an int or None; got {seed!r}")
        if out_channels % groups:
            raise ValueError(f"groups={groups} must divide C_out = {out_channels}")
        self.out_channels, self.mid_channels, self.groups = out_channels, mid_channels, groups
        self.in_channels_per_group, self.kernel_size = in_channels_per_group, tuple(kernel_size)
        self.expand_ratio, self.feedback_init, self.feedback_density = expand_ratio, feedback_init, feedback_density
        self.feedback_groups = feedback_groups
        # Without an explicit seed, take one from the global RNG: torch.manual_seed(s) then fixes it.
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        B_density, R_density = feedback_densities(feedback_density)
        self._factory = {"device": device, "dtype": dtype}  # of the tensors the constructors allocate
        # The dtypes the layer has been held in, in order: a B drawn again on demand is rounded through them, so that
        # it equals the B a layer holds (float32 at construction stays float32-rounded after .double()).
        self._B_dtypes = [dtype or torch.get_default_dtype()]
        self.B_from_seed = True  # False once a checkpoint written with B in it has replaced it
        # Not in the state dict: drawn from the seed again on load (feedback_state.py), checked by fixed_checksum.
        # Held on the device unless the parametrization does without B (a projected layer with M: .B is then drawn
        # from the seed where it is read, for conversions and checks).
        held = self._holds_B()
        self.register_buffer("B_held", torch.empty(self.B_shape, device=device, dtype=dtype) if held else None,
                             persistent=False)
        self.register_buffer("B_mask_held", torch.empty(self.B_shape, dtype=torch.bool, device=device)
                             if held and B_density < 1 else None, persistent=False)
        self.register_buffer("R_mask", torch.empty(self.R_shape, dtype=torch.bool, device=device)
                             if R_density < 1 else None, persistent=False)
        self.fixed_checksum = None  # of B and R's mask as drawn (feedback_state.fixed_state_checksum)

    def _holds_B(self) -> bool:
        """Whether B (and B's mask) is held on the device: wherever the parametrization's ops read it."""
        return True

    @property
    def B(self) -> torch.Tensor:
        """The fixed feedback matrix, (C_out, C_mid) or (C_out, C_mid/G) grouped: held, or drawn from the seed."""
        return self.fixed_B_and_mask()[0]

    @B.setter
    def B(self, value: torch.Tensor | None) -> None:
        self.B_held = value

    @property
    def B_mask(self) -> torch.Tensor | None:
        """B's Bernoulli mask (B's shape, bool), or None without one: held with B, or drawn from the seed."""
        if self._buffers["B_held"] is None and feedback_densities(self.feedback_density)[0] == 1:
            return None  # no mask to draw
        return self.fixed_B_and_mask()[1]

    @B_mask.setter
    def B_mask(self, value: torch.Tensor | None) -> None:
        self.B_mask_held = value

    def fixed_B_and_mask(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, B's mask or None) as held, or drawn from the seed once for both where B is not held: B rounded as a
        held B would be, on the device of the learned tensor."""
        held = self._buffers["B_held"]
        if held is not None:
            return held, self._buffers["B_mask_held"]
        drawn = self._draw_as_held(with_R=False)
        B, B_mask = self._rounded_as_held(drawn.B), drawn.B_mask
        device = self.parameter.device
        return B.to(device), None if B_mask is None else B_mask.to(device)

    def _rounded_as_held(self, B: torch.Tensor) -> torch.Tensor:
        for dtype in self._B_dtypes:
            B = B.to(dtype)
        return B

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        dtype = self.parameter.dtype
        if dtype != self._B_dtypes[-1]:  # .double(), .half(), .to(dtype): a held B would be rounded to it
            self._B_dtypes.append(dtype)
        return result

    def _settings(self) -> dict:
        """The constructor arguments that rebuild this feedback (another parametrization of the same B)."""
        return dict(out_channels=self.out_channels, in_channels_per_group=self.in_channels_per_group,
                    kernel_size=self.kernel_size, groups=self.groups, expand_ratio=self.expand_ratio,
                    feedback_init=self.feedback_init, feedback_density=self.feedback_density, seed=self.seed,
                    device=self.parameter.device, dtype=self.parameter.dtype, feedback_groups=self.feedback_groups)

    def _share_fixed_state(self, other: PFAFeedback) -> None:
        """Take `other`'s B and masks (the same tensors: they are fixed). B is left out where this parametrization
        does without it and it is the seed's (it is drawn again where it is read)."""
        self.R_mask = other.R_mask
        self.fixed_checksum, self.B_from_seed = other.fixed_checksum, other.B_from_seed
        self._B_dtypes = list(other._B_dtypes)
        if self._holds_B() or not other.B_from_seed:
            self.B, self.B_mask = other.fixed_B_and_mask()
        else:
            self.B = self.B_mask = None

    def _draw(self, with_R: bool = True, B_dtype: torch.dtype = torch.float64) -> FixedDraw:
        """B (in B_dtype: float64, or rounded to float32 as drawn), R_0 (float64, masked; None without with_R) and
        the masks (or None), drawn from the layer's seed."""
        return SeededDraw.of(self).draw(with_R, B_dtype)

    def _draw_as_held(self, with_R: bool) -> FixedDraw:
        """The draw, with B in float32 where that is its first rounding as held (_B_dtypes), else float64."""
        return self._draw(with_R, torch.float32 if self._B_dtypes[0] == torch.float32 else torch.float64)

    def _reset_fixed_state(self, with_R: bool = True) -> FixedDraw:
        """Draw B and the masks into their buffers (B where it is held); return the draw (CPU; R_0 float64, only with
        with_R; B as _draw_as_held gives it)."""
        drawn = self._draw_as_held(with_R)
        B, B_mask, R_mask = drawn.B, drawn.B_mask, drawn.R_mask
        if R_mask is not None:
            self.R_mask.copy_(R_mask)
        held = self._buffers["B_held"]
        if held is not None:
            held.copy_(self._rounded_as_held(B))  # as a B drawn where it is read (fixed_B_and_mask)
            if B_mask is not None:
                self.B_mask_held.copy_(B_mask)
        self.B_from_seed = True
        self.fixed_checksum = fixed_state_checksum(B, R_mask)
        return drawn

    def feedback_weight_for(self, weight: torch.Tensor) -> torch.Tensor:
        """W_fb (PFA's does not depend on W; the interface of baselines.FixedFeedback)."""
        return self.feedback_weight()

    def op_arguments(self, weight: torch.Tensor, strategy: str = "auto"):
        """(weight, B, M, feedback tensor, parametrization) as the PFA ops take them.

        Grouped feedback goes through the op's "direct" parametrization with W_fb (W's shape) and a weight that
        teaches the feedback (grouped_feedback.py), except under strategy "reference": the literal algorithm with
        the block-diagonal B."""
        if not self.grouped:
            return (weight, *self._op_tensors())
        if strategy == "reference":
            return weight, self.dense_B(), None, self.effective_R(), "explicit"
        from .grouped_feedback import teach_feedback
        taught = teach_feedback(weight, self.parameter if self.parametrization == "projected" else self.effective_R(),
                                None if self.parametrization == "projected" else self.B_by_group())
        return taught, None, None, self.feedback_weight().detach(), "direct"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not loads_feedback(self, state_dict, prefix, missing_keys):
            return
        held = "R" if prefix + "R" in state_dict else "Z" if prefix + "Z" in state_dict else None
        mine = "R" if self.parametrization == "explicit" else "Z"
        if held is not None and held != mine:
            other = "explicit" if held == "R" else "projected"
            error_msgs.append(
                f"{prefix[:-1] or 'feedback'}: the checkpoint holds {other} feedback ({held}) but this layer is "
                f"{self.parametrization}; build the model with parametrization={other!r} to load it, then switch with "
                f"pk.reparametrize(model, {self.parametrization!r})")
            return
        own = {key: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not load_fixed_state(self, own, prefix, error_msgs):
            return
        self._prepare_load(own, prefix)
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def get_extra_state(self) -> dict:
        """What the state dict keeps of the fixed state (B, M, masks): the seed it is drawn from and its checksum."""
        return {"format": STATE_FORMAT, "seed": self.seed, "checksum": self.fixed_checksum,
                "feedback_groups": self.feedback_groups}

    def set_extra_state(self, state) -> None:
        """Applied by feedback_state.load_fixed_state (which can report a mismatch through load_state_dict's error
        list)."""

    def _fixed_state_changed(self) -> None:
        """After B changed on load: what is derived from it (a projected layer's M)."""

    def _prepare_load(self, state_dict, prefix) -> None:
        """Shape optional state after the checkpoint before torch copies it in."""

    def extra_repr(self) -> str:
        learned = f"R: {self.R_shape}" if self.parametrization == "explicit" else f"Z: {self.Z_shape}"
        text = f"B: {tuple(self.B_shape)}, {learned}, init={self.feedback_init!r}"
        if min(feedback_densities(self.feedback_density)) < 1:
            text += f", density={self.feedback_density}"
        if self.groups > 1:
            text += f", feedback_groups={self.feedback_groups!r}"
        return text + f", parametrization={self.parametrization!r}, seed={self.seed}"


class ExplicitFeedback(PFAFeedback):
    """PFA feedback holding R (Parameter, (C_mid, C_in/groups, *kernel)); W_fb = B·R per group."""

    parametrization = "explicit"
    condition_number = None
    M = R_null = None  # the projected parametrization's state: none here

    def __init__(self, *args, reset: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.R = nn.Parameter(torch.empty(self.R_shape, **self._factory))
        if reset:
            self.reset_parameters()

    @property
    def parameter(self) -> nn.Parameter:
        """The learned feedback tensor."""
        return self.R

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw masks, B and R_0 from the layer's seed (the same values every time). R_0 goes into R in chunks
        (seeded_draw.py) unless R is masked or not contiguous (channels_last: a reshape would copy): no float64 R_0
        of twice R's size."""
        if self.R_mask is not None or not self.R.is_contiguous():
            self.R.copy_(self._reset_fixed_state().R)
            return
        drawn = self._reset_fixed_state(with_R=False)
        R_by_group = self.R_by_group(self.R)
        # Rounded to R's dtype as R.copy_(R_0) would: float32 chunks for a float32 R, float64 for the others (a
        # bfloat16 value rounded from float32 may not be the one rounded from float64).
        chunk_dtype = torch.float32 if self.R.dtype == torch.float32 else torch.float64
        for group_slice, row_slice, values in SeededDraw.of(self).R_chunks(drawn.R_state, chunk_dtype):
            R_by_group[group_slice, row_slice] = values

    def effective_R(self) -> torch.Tensor:
        """R as the layer uses it: R * R_mask with a sparse mask, else R. (C_mid, C_in/groups, *kernel)."""
        return self.R if self.R_mask is None else self.R * self.R_mask

    @torch.no_grad()
    def explicit_R(self) -> torch.Tensor:
        """The explicit R this feedback is (a copy). (C_mid, C_in/groups, *kernel)."""
        return self.effective_R().detach().clone()

    def _op_tensors(self):
        return self.B_held, None, self.effective_R(), "explicit"

    def feedback_weight(self) -> torch.Tensor:
        """W_fb = B·R: W's shape with grouped feedback, dense (C_out, C_in, *kernel) otherwise (docs/design.md §2.3)."""
        R = self.effective_R()
        return self.from_columns(torch.bmm(self.B_by_group().to(R.dtype), self.R_by_group(R)))

    @torch.no_grad()
    def as_projected(self) -> ProjectedFeedback:
        """The projected parametrization of this feedback (a new module sharing B and the masks): Z = pinv(B^T) R,
        so M·Z = B·R exactly; R's null-space part N is kept as R_null when it is not rounding noise."""
        if self.R_mask is not None:
            raise ValueError(MASKED_R_MESSAGE.format(f"this layer has feedback_density={self.feedback_density!r}"))
        R = self.R
        Z_by_group, null, condition = projection.project_onto_feedback(self.B_by_group(), self.R_by_group(R))
        null = null.reshape(self.R_shape)
        # For C_mid/G <= rows (and a full-rank B) R lies in B^T's range and N is rounding noise: keep nothing.
        null = None if null.norm() <= 1e-10 * R.double().norm() else null.to(R.dtype)
        projected = ProjectedFeedback(**self._settings(), reset=False)
        projected._share_fixed_state(self)
        projected._set_state(self.from_columns(Z_by_group).to(R.dtype), null, condition, R.requires_grad,
                             B_by_group=self.B_by_group())
        return projected


class ProjectedFeedback(PFAFeedback):
    """PFA feedback holding Z (Parameter, W_fb's shape: W's with grouped feedback, else (C_out, C_in, *kernel)) with
    W_fb_j = M_j Z_j; M (buffer, (G, rows, rows), or None when applying B_j (B_j^T ·) is cheaper) and R_null (buffer,
    R's shape, or None)."""

    parametrization = "projected"

    def __init__(self, *args, reset: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        LIVE_PROJECTED.add(self)  # for the optimizer check (parametrize.py)
        self.condition_number = None  # max cond(B_j), set when projecting
        self.Z = nn.Parameter(torch.empty(self.Z_shape, **self._factory))
        rows = self.rows_per_group
        self.register_buffer("M", torch.empty(self.groups, rows, rows, **self._factory)
                             if self.keeps_projection_matrix else None, persistent=False)  # a function of B
        self.register_buffer("R_null", None)
        if reset:
            self.reset_parameters()

    @property
    def parameter(self) -> nn.Parameter:
        """The learned feedback tensor."""
        return self.Z

    @property
    def keeps_projection_matrix(self) -> bool:
        """Whether M is held: M_j·Z_j costs rows^2 per column of Z_j, B_j (B_j^T Z_j) costs 2 * rows * C_mid/G (and M
        takes G * rows^2 memory), so M is kept when rows <= 2 * C_mid/G (dense: expand_ratio >= G / 2; grouped:
        expand_ratio >= 1/2)."""
        return self.rows_per_group <= 2 * (self.mid_channels // self.groups)

    def _holds_B(self) -> bool:
        # With M, the ops read M and Z alone: B (321 M floats at r = 10 in a ResNet-50) stays off the device.
        return not self.keeps_projection_matrix

    def _set_state(self, Z, R_null, condition, requires_grad=True, B_by_group=None):
        """Z (Parameter), M from B_by_group (default: this feedback's B), R_null and cond(B)."""
        self.Z = nn.Parameter(Z, requires_grad=requires_grad)
        if self.M is not None:
            self.M = projection.projection_matrix(self.B_by_group() if B_by_group is None else B_by_group).to(Z.dtype)
        self.R_null = R_null
        self.condition_number = condition
        self._warn_if_ill_conditioned()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw masks, B and R_0 from the layer's seed (the same values every time); Z_0 = M^+ B R_0, with R_0 streamed
        in chunks (seeded_draw.py): never held whole."""
        drawn = self._reset_fixed_state(with_R=False)
        dtype, device = self._B_dtypes[-1], self.Z.device
        # The projection's GEMMs on the layer's device (a GPU forms a ResNet-50's M in a fraction of the CPU's
        # time); B as a held B is rounded (float32/float64 layers), R in the precision the projection works in.
        B = self._rounded_as_held(drawn.B) if dtype in (torch.float32, torch.float64) else drawn.B
        Z_by_group, M, self.condition_number = projection.initial_projection(
            self.B_by_group(B.to(device)), functools.partial(SeededDraw.of(self).R_chunks, drawn.R_state),
            math.prod(self.R_shape[1:]), self.Z.dtype, with_M=self.M is not None, drawn_B=self.B_by_group(B))
        self.Z.copy_(self.from_columns(Z_by_group))
        self._warn_if_ill_conditioned()
        if self.M is not None:
            self.M.copy_(M)
        self.R_null = None

    def __setstate__(self, state):  # copy.deepcopy, pickle: a new module the optimizer check must see too
        super().__setstate__(state)
        LIVE_PROJECTED.add(self)

    def _fixed_state_changed(self) -> None:
        self.refresh_projection_matrix()

    @torch.no_grad()
    def refresh_projection_matrix(self) -> None:
        """M = B_j B_j^T again from B, in M's dtype (after a change of precision: a float32 M is B B^T rounded)."""
        if self.M is not None:
            self.M.copy_(projection.projection_matrix(self.B_by_group()))

    def _op_tensors(self):
        return self.B_held, self.M, self.Z, "projected"  # B_held: None where M is kept (the ops need only M)

    def feedback_weight(self) -> torch.Tensor:
        """W_fb = M·Z per group (B_j (B_j^T Z_j) without M): Z's shape (docs/design.md §2.4)."""
        columns = self.columns_by_group(self.Z)
        if self.M is not None:
            return self.from_columns(torch.bmm(self.M, columns))
        B_by_group = self.B_by_group().to(columns.dtype)
        return self.from_columns(torch.bmm(B_by_group, torch.bmm(B_by_group.transpose(1, 2), columns)))

    def effective_R(self) -> torch.Tensor:
        raise RuntimeError("effective_R() is for explicit feedback; this layer is projected (see explicit_R())")

    @torch.no_grad()
    def explicit_R(self, with_null: bool = True) -> torch.Tensor:
        """The explicit R this feedback is: B^T Z + N (N left out without with_null: it changes no W_fb and no
        gradient). (C_mid, C_in/groups, *kernel), in Z's dtype."""
        R = projection.explicit_from_projected(self.B_by_group(), self.columns_by_group(self.Z)).reshape(self.R_shape)
        if with_null:
            R = R + self._null_part()
        return R.to(self.Z.dtype)

    def _null_part(self) -> torch.Tensor:
        if self.R_null is not None:
            return self.R_null.double()
        # Built projected: the null-space part of the seeded R_0 (it never affects training).
        R_0 = self._draw().R.to(self.Z.device)
        null = projection.project_onto_feedback(self.B_by_group(), self.R_by_group(R_0))[1]
        return null.reshape(self.R_shape)

    @torch.no_grad()
    def as_explicit(self, with_null: bool = True) -> ExplicitFeedback:
        """The explicit parametrization of this feedback (a new module sharing B): R = B^T Z + N."""
        explicit = ExplicitFeedback(**self._settings(), reset=False)
        explicit._share_fixed_state(self)
        explicit.R = nn.Parameter(self.explicit_R(with_null), requires_grad=self.Z.requires_grad)
        return explicit

    def _warn_if_ill_conditioned(self) -> None:
        # Z = pinv(B^T) R, so W_fb = M·Z cancels large terms when B is ill-conditioned: rounding in M·Z grows by up to
        # cond(B). Random B: cond ~ (1 + r^-1/2) / (1 - r^-1/2), 1.9 at r = 10, 5.8 at r = 2, unbounded near r = 1.
        if self.condition_number > CONDITION_WARNING:
            # One message text (the figures are in .condition_number), so that a converted model warns once.
            warnings.warn(
                f"projected feedback with an ill-conditioned B (cond(B) > {CONDITION_WARNING:.0f}; see "
                f"layer.feedback.condition_number): rounding errors in W_fb = M·Z are amplified up to that factor. "
                f"A random B with expand_ratio >= 2 per group, or feedback_init='orthogonal', is well "
                "conditioned; parametrization='explicit' has no such amplification", stacklevel=4)

    def _prepare_load(self, state_dict, prefix) -> None:
        # R_null is None (seeded) unless the layer was switched from an explicit R; follow the checkpoint.
        key = prefix + "R_null"
        self.R_null = torch.empty_like(state_dict[key], device=self.Z.device) if key in state_dict else None


LIVE_PROJECTED: weakref.WeakSet = weakref.WeakSet()  # every ProjectedFeedback alive (its Z must meet SGD-family steps)
