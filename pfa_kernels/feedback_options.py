"""The feedback keyword arguments shared by every PFA layer and pk.convert, and their validation."""

from __future__ import annotations

import math
import numbers

FEEDBACK_INITS = ("random", "orthogonal", "identity")
PARAMETRIZATIONS = ("explicit", "projected")
# "auto": projected wherever it is exact and well conditioned (feedback_choice.make_feedback), explicit elsewhere.
PARAMETRIZATION_CHOICES = ("auto", *PARAMETRIZATIONS)
FEEDBACK_GROUPS = ("grouped", "dense")


def mid_channels_for(out_channels: int, expand_ratio, groups: int = 1) -> int:
    """C_mid = round(expand_ratio * C_out) (half up), at least 1; with groups > 1, the nearest multiple of groups,
    at least groups (each group's population of the mid layer has round(r * C_out / G) >= 1 channels). Wherever
    round(r * C_out) is a multiple of groups the two agree; elsewhere (a depthwise layer at r = 0.25) the layer could
    not be built otherwise."""
    if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, numbers.Real):
        raise TypeError(f"expand_ratio must be a number; got {expand_ratio!r}")
    if not math.isfinite(expand_ratio) or expand_ratio <= 0:
        raise ValueError(f"expand_ratio must be a finite number > 0; got {expand_ratio!r}")
    return groups * max(1, math.floor(expand_ratio * out_channels / groups + 0.5))


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


def check_feedback_options(feedback_init, feedback_density, parametrization, feedback_groups="grouped"):
    """Validate the feedback keyword arguments shared by every PFA layer and pk.convert."""
    if feedback_init not in FEEDBACK_INITS:
        raise ValueError(f"feedback_init must be one of {FEEDBACK_INITS}; got {feedback_init!r}")
    B_density, R_density = feedback_densities(feedback_density)
    if feedback_init == "identity" and min(B_density, R_density) < 1:
        raise ValueError("feedback_init='identity' (Kolen-Pollack) takes no sparse mask: feedback_density must be 1")
    if parametrization not in PARAMETRIZATION_CHOICES:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATION_CHOICES}; got {parametrization!r}")
    if parametrization == "projected" and R_density < 1:
        raise ValueError(MASKED_R_MESSAGE.format(f"feedback_density={feedback_density!r}"))
    if feedback_groups not in FEEDBACK_GROUPS:
        raise ValueError(f"feedback_groups must be one of {FEEDBACK_GROUPS}; got {feedback_groups!r}")


MASKED_R_MESSAGE = (
    "parametrization='projected' cannot hold a masked R ({}): re-zeroing R elementwise after every update "
    "leaves the row space of B^T, so the projected Z no longer reproduces B·R. Use parametrization='explicit', "
    "or mask B alone with feedback_density=(B_density, 1.0)")
