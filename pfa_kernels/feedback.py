"""Feedback parametrisations: how a layer forms its feedback weight W_fb and how that learns.

PFAFeedback is PFA with a feedback population (docs/design.md §1): a fixed random B (C_out, C_mid)
and a learned R (C_mid, C_in/groups, *kernel), with W_fb = B·R. It holds that state in one of two
parametrizations (docs/design.md §2.4):

    "explicit"   R itself, a Parameter.
    "projected"  Z, a Parameter of W's shape (dense (C_out, C_in, *kernel) if groups > 1), with
                 W_fb_j = M_j Z_j per group j, M_j = B_j B_j^T fixed. Under SGD-family optimizers
                 this reproduces explicit training of R exactly, and no per-step tensor scales
                 with C_mid. R = B^T Z + N, where the null-space part N (B N = 0) never affects
                 training; it is kept (R_null) only when the layer was switched from an explicit R,
                 else it is the null-space part of the layer's seeded R_0.

Everything random (B, R_0 and the sparse masks) is drawn from the layer's own seed on a CPU
generator, so every process that builds the same model with the same seed gets the same B, on any
device (what DDP needs), and reset_parameters() redraws the same values. Explicit and projected
layers with the same seed have the same W_fb.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings

import torch
from torch import nn

from .backends.torch_ops import feedback_product, grouped_B, grouped_columns, projected_feedback_product

FEEDBACK_INITS = ("random", "orthogonal", "identity")
PARAMETRIZATIONS = ("explicit", "projected")
# cond(B) above which projected feedback warns: float32 rounding in M·Z (~6e-8) may then exceed ~1e-5 relative.
CONDITION_WARNING = 100.0


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


def feedback_densities(feedback_density) -> tuple[float, float]:
    """(B density, R density) from feedback_density: one number for both, or a pair (B, R)."""
    pair = tuple(feedback_density) if isinstance(feedback_density, (tuple, list)) else None
    values = pair if pair is not None else (feedback_density, feedback_density)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
        raise TypeError(f"feedback_density must be a number in (0, 1] or a pair (B density, R density); "
                        f"got {feedback_density!r}")
    if not all(0 < v <= 1 for v in values):
        raise ValueError(f"feedback_density must be in (0, 1]; got {feedback_density!r}")
    return float(values[0]), float(values[1])


def check_feedback_options(feedback_init, feedback_density, parametrization):
    """Validate the feedback keyword arguments shared by every PFA layer and pk.convert."""
    if feedback_init not in FEEDBACK_INITS:
        raise ValueError(f"feedback_init must be one of {FEEDBACK_INITS}; got {feedback_init!r}")
    B_density, R_density = feedback_densities(feedback_density)
    if feedback_init == "identity" and min(B_density, R_density) < 1:
        raise ValueError("feedback_init='identity' (Kolen-Pollack) takes no sparse mask: feedback_density must be 1")
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}; got {parametrization!r}")
    if parametrization == "projected" and R_density < 1:
        raise ValueError(_MASKED_R_MESSAGE.format(f"feedback_density={feedback_density!r}"))


_MASKED_R_MESSAGE = (
    "parametrization='projected' cannot hold a masked R ({}): re-zeroing R elementwise after every update "
    "leaves the row space of B^T, so the projected Z no longer reproduces B·R. Use parametrization='explicit', "
    "or mask B alone with feedback_density=(B_density, 1.0)")


def projection_matrix(B: torch.Tensor, groups: int) -> torch.Tensor:
    """M_j = B_j B_j^T for each group j: (G, C_out, C_out) from B (C_out, C_mid), in B's dtype."""
    B_by_group = grouped_B(B.double(), groups)
    return torch.bmm(B_by_group, B_by_group.transpose(1, 2)).to(B.dtype)


# Above this cond(B_j) the Cholesky route (error ~ cond(B)^2 * eps) gives way to the SVD (~ cond(B) * eps): at 1e3 the
# Cholesky solve of M_j Z_j = B_j R_j is still exact to ~1e-10 in float64.
CHOLESKY_MAX_CONDITION = 1e3


def project_onto_feedback(B: torch.Tensor, R: torch.Tensor, groups: int, with_null: bool = True):
    """Split R = B^T Z + N per group (float64): Z = pinv(B_j^T) R_j, the minimum-norm Z with B_j Z_j = M_j^+ B_j R_j,
    so M_j Z_j = B_j R_j exactly (for C_mid/G < C_out, B_j^T Z_j = R_j and N = 0).

    B (C_out, C_mid), R (C_mid, C_in/G, *kernel). Returns Z (C_out, C_in, *kernel) and N (R's shape, or None
    without with_null: it costs another R-sized GEMM), float64,
    and the largest condition number sigma_max / sigma_min of the B_j (singular values below pinv's cutoff
    belong to B's null space and are left out).

    Where C_mid/G >= C_out and B_j has full row rank (cond(B_j) <= CHOLESKY_MAX_CONDITION), pinv(B_j^T) R_j =
    M_j^{-1} B_j R_j: a Cholesky solve of the C_out x C_out system M_j = B_j B_j^T instead of an SVD of B_j (C_out x
    C_mid/G): 0.08 s instead of 1.3 s for a 512 -> 512 3x3 layer at r = 10. Elsewhere (r < 1, a rank-deficient
    or ill-conditioned B_j) the SVD.
    """
    B_by_group, R_by_group = _by_group(B, R, groups, torch.float64)
    solved = _solve_by_cholesky(B_by_group, R_by_group)
    Z_by_group, condition = _solve_by_svd(B_by_group, R_by_group) if solved is None else solved[:2]
    null = R_by_group - B_by_group.transpose(1, 2) @ Z_by_group if with_null else None
    return _Z_from_groups(Z_by_group, R.shape), None if null is None else null.reshape(R.shape), condition


def _by_group(B: torch.Tensor, R: torch.Tensor, groups: int, dtype: torch.dtype):
    """B (C_out, C_mid) -> (G, C_out, C_mid/G) and R (C_mid, C_in/G, *kernel) -> (G, C_mid/G, K), in `dtype`.
    Explicit sizes, not -1: reshape cannot infer a size from zero elements (C_out = 0 or C_in = 0)."""
    return grouped_B(B.to(dtype), groups), R.to(dtype).reshape(groups, R.shape[0] // groups, math.prod(R.shape[1:]))


def _Z_from_groups(Z_by_group: torch.Tensor, R_shape) -> torch.Tensor:
    """(G, C_out, K) -> Z (C_out, C_in, *kernel), the groups' columns side by side (R_shape: (C_mid, C_in/G, *k))."""
    groups, out_channels = Z_by_group.shape[:2]
    Z = Z_by_group.reshape(groups, out_channels, *R_shape[1:]).transpose(0, 1)
    return Z.reshape(out_channels, groups * R_shape[1], *R_shape[2:])


def _solve_by_cholesky(B_by_group, R_by_group):
    """(M_j^{-1} B_j R_j in float64, max cond(B_j), M_j) when every M_j = B_j B_j^T is well conditioned, else None.
    The products M_j and B_j R_j in the operands' precision, the C_out x C_out factorization and solve in float64."""
    out_channels, mid_per_group = B_by_group.shape[1:]
    if out_channels == 0 or mid_per_group < out_channels:
        return None
    products = B_by_group @ B_by_group.transpose(1, 2)
    M = products.double()
    eigenvalues = torch.linalg.eigvalsh(M)  # ascending; cond(B_j) = sqrt(cond(M_j)) (C_out^3, not C_out^2 C_mid)
    if not bool((eigenvalues[:, 0] > 0).all()):
        return None
    condition = (eigenvalues[:, -1] / eigenvalues[:, 0]).sqrt().max().item()
    if condition > CHOLESKY_MAX_CONDITION:
        return None
    factor, info = torch.linalg.cholesky_ex(M)
    if bool(info.any()):
        return None
    return torch.cholesky_solve((B_by_group @ R_by_group).double(), factor), condition, products


def initial_projection(B: torch.Tensor, R: torch.Tensor, groups: int, dtype: torch.dtype):
    """Z_0, M (G, C_out, C_out) and max cond(B_j) of a projected layer of `dtype`, from its seeded B (C_out, C_mid)
    and R_0 (C_mid, C_in/G, *kernel), both float64. Z_0 (C_out, C_in, *kernel) and M in `dtype`.

    Where the Cholesky route applies, M_j and B_j R_j are formed in the layer's precision (float32 for fp32, fp16 and
    bf16 layers), which is what the layer stores, and only the C_out x C_out system is solved in float64: float64
    GEMMs took half of a ResNet-50's conversion, and M was formed twice. Elsewhere the float64 SVD."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    solved = _solve_by_cholesky(*_by_group(B, R, groups, work))
    if solved is None:  # the SVD, in float64 (the Cholesky attempt is not repeated)
        Z_by_group, condition = _solve_by_svd(*_by_group(B, R, groups, torch.float64))
        M = projection_matrix(B.to(dtype), groups)
    else:
        Z_by_group, condition, M = solved
    return _Z_from_groups(Z_by_group, R.shape).to(dtype), M.to(dtype), condition


def _solve_by_svd(B_by_group, R_by_group):
    """(pinv(B_j^T) R_j, max cond(B_j) over the kept singular values)."""
    U, S, Vh = torch.linalg.svd(B_by_group, full_matrices=False)
    cutoff = max(B_by_group.shape[1:]) * torch.finfo(torch.float64).eps * S[:, :1]
    kept = S > cutoff
    inverse = torch.where(kept, 1 / torch.where(kept, S, 1.0), 0.0)
    pinv = U @ (inverse.unsqueeze(-1) * Vh)                                    # pinv(B_j^T): (G, C_out, C_mid/G)
    if bool(kept.any()):  # (C_out = 0 leaves B no singular values: nothing to condition)
        smallest = torch.where(kept, S, math.inf).amin(dim=1)
        condition = (S[:, 0] / smallest).max().item()
    else:
        condition = 1.0
    return pinv @ R_by_group, condition


def explicit_from_projected(B: torch.Tensor, Z: torch.Tensor, groups: int) -> torch.Tensor:
    """B^T Z per group (float64): (C_mid, C_in/G, *kernel) from B (C_out, C_mid) and Z (C_out, C_in, *kernel)."""
    product = grouped_B(B.double(), groups).transpose(1, 2) @ grouped_columns(Z.double(), groups)
    return product.reshape(B.shape[1], Z.shape[1] // groups, *Z.shape[2:])


class _FeedbackLoad(threading.local):
    """What the feedback modules of the load_state_dict call in progress (on this thread) have found. One call is
    recognised by its missing_keys list, which torch shares among all the modules of the call."""

    missing_keys: list | None = None
    found = False        # some module's feedback was in the state dict
    skipped: list = ()   # the keys of the modules whose feedback was not


_LOAD = _FeedbackLoad()


def loads_feedback(module: nn.Module, state_dict, prefix: str, missing_keys: list) -> bool:
    """Whether a feedback module (PFAFeedback, FixedFeedback) loads its state from this state dict.

    A backpropagation checkpoint (nn.Conv2d, nn.Linear, torchvision weights) has no feedback state at all: every
    layer loads its weight and bias and keeps its feedback as drawn. A checkpoint with the feedback of some layers
    but not of others (converted with another exclude list, or cut short) is not one: the missing layers' feedback
    keys are reported as missing, an error under load_state_dict(strict=True). torch hands each module only its own
    keys, so the modules of one call pool what they found: a layer without feedback that loads before any layer
    with feedback has its keys reported as missing when the first layer with feedback is found.
    """
    if _LOAD.missing_keys is not missing_keys:  # a new load_state_dict call
        _LOAD.missing_keys, _LOAD.found, _LOAD.skipped = missing_keys, False, []
    if any(key.startswith(prefix) for key in state_dict):
        if not _LOAD.found:
            _LOAD.found = True
            missing_keys.extend(_LOAD.skipped)
            _LOAD.skipped = []
        return True
    expected = [prefix + name for name in module.state_dict(keep_vars=True)]
    if _LOAD.found:
        missing_keys.extend(expected)
    else:
        _LOAD.skipped.extend(expected)
    return False


class PFAFeedback(nn.Module):
    """PFA feedback: fixed B (buffer, (C_out, C_mid)) and a learned feedback parameter, optional fixed
    Bernoulli masks B_mask / R_mask (buffers, B's / R's shape).

    explicit:  R (Parameter, (C_mid, C_in/groups, *kernel)); W_fb = B·R.
    projected: Z (Parameter, (C_out, C_in, *kernel)), M (buffer, (groups, C_out, C_out), or None when
               applying B_j (B_j^T ·) is cheaper), R_null (buffer, R's shape, or None); W_fb = M·Z.
               (M and R_null are None on explicit feedback.)

    Masked entries of R are zero from the start and stay zero: layers use R * R_mask, so they get no
    gradient and no optimizer update (weight decay on a zero is zero).
    """

    def __init__(self, out_channels: int, in_channels_per_group: int, kernel_size: tuple[int, ...] = (),
                 groups: int = 1, expand_ratio=10, feedback_init: str = "random", feedback_density=1.0,
                 seed: int | None = None, device=None, dtype=None, parametrization: str = "explicit"):
        super().__init__()
        check_feedback_options(feedback_init, feedback_density, parametrization)
        mid_channels = mid_channels_for(out_channels, expand_ratio, groups)
        if feedback_init == "identity" and mid_channels != out_channels:
            raise ValueError(
                f"feedback_init='identity' (Kolen-Pollack) needs C_mid == C_out; expand_ratio={expand_ratio} gives "
                f"C_mid = {mid_channels} for C_out = {out_channels} (use expand_ratio=1)")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"feedback_seed must be an int or None; got {seed!r}")
        factory = {"device": device, "dtype": dtype}
        self.out_channels, self.mid_channels, self.groups = out_channels, mid_channels, groups
        self.in_channels_per_group, self.kernel_size = in_channels_per_group, tuple(kernel_size)
        self.expand_ratio, self.feedback_init, self.feedback_density = expand_ratio, feedback_init, feedback_density
        self.parametrization = parametrization
        self.condition_number = None  # cond(B) of a projected layer (the largest over groups), set when projecting
        # Without an explicit seed, take one from the global RNG: torch.manual_seed(s) then fixes it.
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
        B_density, R_density = feedback_densities(feedback_density)
        self.register_buffer("B", torch.empty(out_channels, mid_channels, **factory))
        self.register_buffer("B_mask", torch.empty(self.B.shape, dtype=torch.bool, device=device)
                             if B_density < 1 else None)
        self.register_buffer("R_mask", torch.empty(self.R_shape, dtype=torch.bool, device=device)
                             if R_density < 1 else None)
        if parametrization == "explicit":
            self.R = nn.Parameter(torch.empty(self.R_shape, **factory))
            self.register_buffer("M", None)
            self.register_buffer("R_null", None)
        else:
            self._add_projected_state(torch.empty(self.Z_shape, **factory), compute_M=False)
        self.reset_parameters()

    @property
    def R_shape(self) -> tuple[int, ...]:
        return (self.mid_channels, self.in_channels_per_group, *self.kernel_size)

    @property
    def Z_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels_per_group * self.groups, *self.kernel_size)

    @property
    def keeps_projection_matrix(self) -> bool:
        """Whether M is held: M·Z costs G * C_out^2 per column of Z, B_j (B_j^T Z_j) costs 2 * C_out * C_mid (and
        M takes G * C_out^2 memory), so M is kept when G * C_out <= 2 * C_mid, i.e. expand_ratio >= G / 2."""
        return self.groups * self.out_channels <= 2 * self.mid_channels

    @property
    def parameter(self) -> nn.Parameter:
        """The learned feedback tensor: R (explicit) or Z (projected)."""
        return self.R if self.parametrization == "explicit" else self.Z

    def _add_projected_state(self, Z: torch.Tensor, R_null: torch.Tensor | None = None, requires_grad=True,
                             compute_M: bool = True):
        """Z as the feedback Parameter, M = B_j B_j^T (computed now, or left for reset_parameters to fill when B is
        not drawn yet: a 2048-channel layer's M is 2 * C_out^2 * C_mid = 172 GFLOP at r = 10) and R_null."""
        self.Z = nn.Parameter(Z, requires_grad=requires_grad)
        if not self.keeps_projection_matrix:
            M = None
        elif compute_M:
            M = projection_matrix(self.B, self.groups)
        else:
            M = self.B.new_empty(self.groups, self.out_channels, self.out_channels)
        self.register_buffer("M", M)
        self.register_buffer("R_null", R_null)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """B, R_0 (float64, masked) and the masks (or None), drawn from the layer's seed."""
        generator = torch.Generator().manual_seed(self.seed)
        B_density, R_density = feedback_densities(self.feedback_density)
        B = torch.empty(self.B.shape, dtype=torch.float64)
        if self.feedback_init == "random":
            # Var(B_ij) = gain^2 * 2 / (C_out + C_mid) = 1 / C_mid for gain^2 = (1 + 1/r) / 2 (r = C_mid/C_out),
            # so E[B B^T] = I; a mask keeps that by dividing the gain by sqrt(density).
            ratio = self.mid_channels / max(self.out_channels, 1)  # C_out = 0: B is empty, any gain
            gain = math.sqrt((1 + 1 / ratio) / 2) / math.sqrt(B_density)
            nn.init.xavier_uniform_(B, gain=gain, generator=generator)
        elif self.feedback_init == "orthogonal":
            nn.init.orthogonal_(B, gain=1 / math.sqrt(B_density), generator=generator)
        else:
            B.copy_(torch.eye(self.out_channels, dtype=torch.float64))
        R = torch.empty(self.R_shape, dtype=torch.float64)
        nn.init.xavier_uniform_(R, generator=generator)
        B_mask = R_mask = None
        if B_density < 1:
            B_mask = torch.rand(B.shape, generator=generator, dtype=torch.float64) < B_density
            B.mul_(B_mask)
        if R_density < 1:
            R_mask = torch.rand(R.shape, generator=generator, dtype=torch.float64) < R_density
            R.mul_(R_mask)
        return B, R, B_mask, R_mask

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw masks, B and R_0 from the layer's seed (the same values every time); projected: Z_0 = M^+ B R_0."""
        B, R, B_mask, R_mask = self._draw()
        if B_mask is not None:
            self.B_mask.copy_(B_mask)
        if R_mask is not None:
            self.R_mask.copy_(R_mask)
        self.B.copy_(B)
        if self.parametrization == "explicit":
            self.R.copy_(R)
        else:
            Z, M, self.condition_number = initial_projection(B, R, self.groups, self.Z.dtype)
            self.Z.copy_(Z)
            self._warn_if_ill_conditioned()
            if self.M is not None:
                self.M.copy_(M)
            self.R_null = None

    def effective_R(self) -> torch.Tensor:
        """R as an explicit layer uses it: R * R_mask with a sparse mask, else R. (C_mid, C_in/groups, *kernel)."""
        if self.parametrization != "explicit":
            raise RuntimeError("effective_R() is for explicit feedback; this layer is projected (see explicit_R())")
        return self.R if self.R_mask is None else self.R * self.R_mask

    @torch.no_grad()
    def explicit_R(self) -> torch.Tensor:
        """The explicit R this feedback is: R itself, or B^T Z + N for a projected layer. (C_mid, C_in/groups, *k)."""
        if self.parametrization == "explicit":
            return self.effective_R().detach().clone()
        return (explicit_from_projected(self.B, self.Z, self.groups) + self._null_part()).to(self.Z.dtype)

    def _null_part(self) -> torch.Tensor:
        if self.R_null is not None:
            return self.R_null.double()
        # Built projected: the null-space part of the seeded R_0 (it never affects training).
        R_0 = self._draw()[1].to(self.B.device)
        return project_onto_feedback(self.B, R_0, self.groups)[1]

    def op_arguments(self, weight: torch.Tensor):
        """(B, M, feedback tensor, parametrization) as the PFA ops take them; weight is unused (the interface of
        baselines.FixedFeedback)."""
        if self.parametrization == "explicit":
            return self.B, None, self.effective_R(), "explicit"
        return self.B, self.M, self.Z, "projected"

    def feedback_weight_for(self, weight: torch.Tensor) -> torch.Tensor:
        """W_fb (PFA's does not depend on W)."""
        return self.feedback_weight()

    def feedback_weight(self) -> torch.Tensor:
        """W_fb = B·R (or M·Z): W's shape, or dense (C_out, C_in, *kernel) when groups > 1 (docs/design.md §2.3)."""
        if self.parametrization == "explicit":
            return feedback_product(self.B, self.effective_R(), self.groups)
        return projected_feedback_product(self.B, self.M, self.Z, self.groups)

    @torch.no_grad()
    def to_projected(self) -> None:
        """Switch to the projected parametrization in place, keeping B·R exactly (R's null part is kept)."""
        if self.parametrization == "projected":
            return
        if self.R_mask is not None:
            raise ValueError(_MASKED_R_MESSAGE.format(f"this layer has feedback_density={self.feedback_density!r}"))
        Z, null, self.condition_number = project_onto_feedback(self.B, self.R, self.groups)
        R = self.R
        # For C_mid/G <= C_out (and a full-rank B) R lies in B^T's range and N is rounding noise: keep nothing.
        null = None if null.norm() <= 1e-10 * R.double().norm() else null.to(R.dtype)
        del self.R
        self.parametrization = "projected"
        self._add_projected_state(Z.to(R.dtype), null, R.requires_grad)
        self._warn_if_ill_conditioned()

    def _warn_if_ill_conditioned(self) -> None:
        # Z = pinv(B^T) R, so W_fb = M·Z cancels large terms when B is ill-conditioned: rounding in M·Z grows by up to
        # cond(B). Random B: cond ~ (1 + r^-1/2) / (1 - r^-1/2), 1.9 at r = 10, 5.8 at r = 2, unbounded near r = 1.
        if self.condition_number > CONDITION_WARNING:
            # One message text (the figures are in .condition_number), so that a converted model warns once.
            warnings.warn(
                f"projected feedback with an ill-conditioned B (cond(B) > {CONDITION_WARNING:.0f}; see "
                f"layer.feedback.condition_number): rounding errors in W_fb = M·Z are amplified up to that factor. "
                f"A random B with expand_ratio >= 2 per group, or feedback_init='orthogonal', is well "
                "conditioned; parametrization='explicit' has no such amplification", stacklevel=3)

    @torch.no_grad()
    def to_explicit(self) -> None:
        """Switch to the explicit parametrization in place: R = B^T Z + N."""
        if self.parametrization == "explicit":
            return
        R = self.explicit_R()
        requires_grad = self.Z.requires_grad
        del self.Z
        self.M = self.R_null = None
        self.parametrization, self.condition_number = "explicit", None
        self.R = nn.Parameter(R, requires_grad=requires_grad)

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
        if self.parametrization == "projected":
            # R_null is None (seeded) unless the layer was switched from an explicit R; follow the checkpoint.
            key = prefix + "R_null"
            self.R_null = torch.empty_like(state_dict[key], device=self.B.device) if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        learned = f"R: {self.R_shape}" if self.parametrization == "explicit" else f"Z: {self.Z_shape}"
        text = f"B: ({self.out_channels}, {self.mid_channels}), {learned}, init={self.feedback_init!r}"
        if min(feedback_densities(self.feedback_density)) < 1:
            text += f", density={self.feedback_density}"
        return text + f", parametrization={self.parametrization!r}, seed={self.seed}"
