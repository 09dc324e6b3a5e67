"""Which feedback class a PFA layer gets: make_feedback, the one place that picks it (docs/design.md §2.4, "Which
one a layer gets")."""

from __future__ import annotations

import warnings

from .feedback import CONDITION_WARNING, ExplicitFeedback, PFAFeedback, ProjectedFeedback
from .feedback_options import check_feedback_options, feedback_densities, mid_channels_for

_FEEDBACK_CLASSES = {"explicit": ExplicitFeedback, "projected": ProjectedFeedback}


def _near_square_random(out_channels, in_channels_per_group, kernel_size, groups, expand_ratio, feedback_init,
                        feedback_density, seed, feedback_groups) -> bool:
    """Whether B_j is random and near square, 2/3 <= (C_mid/G) / rows <= 3/2, where cond(B_j) ~ (1 + s) / (1 - s),
    s = min(r_j, 1/r_j)^(1/2), exceeds 10 and reaches the hundreds near r_j = 1 (Marchenko-Pastur): "auto" keeps
    such a layer explicit without projecting it first (the projection of an ill-conditioned B takes the SVD)."""
    if feedback_init != "random":
        return False
    rows = out_channels // groups if groups > 1 and feedback_groups == "grouped" else out_channels
    ratio = mid_channels_for(out_channels, expand_ratio, groups) / groups / max(rows, 1)
    return 2 / 3 <= ratio <= 3 / 2


def make_feedback(out_channels: int, in_channels_per_group: int, kernel_size: tuple[int, ...] = (), groups: int = 1,
                  expand_ratio=10, feedback_init: str = "random", feedback_density=1.0, seed: int | None = None,
                  device=None, dtype=None, parametrization: str = "auto",
                  feedback_groups: str = "grouped") -> PFAFeedback:
    """The PFA feedback module of a layer with these settings: the one place that picks the parametrization's class.
    A layer with weight (C_out, C_in/groups, *kernel) passes out_channels = C_out, in_channels_per_group = C_in/groups.
    """
    check_feedback_options(feedback_init, feedback_density, parametrization, feedback_groups)
    arguments = (out_channels, in_channels_per_group, kernel_size, groups, expand_ratio, feedback_init,
                 feedback_density, seed)
    options = dict(device=device, dtype=dtype, feedback_groups=feedback_groups)
    if parametrization != "auto":
        return _FEEDBACK_CLASSES[parametrization](*arguments, **options)
    # "auto": projected (BP's cost at any r; exact under SGD-family optimizers, which the optimizer hook of
    # parametrize.py enforces) unless R is masked (not exact) or B is ill-conditioned (rounding in M·Z amplified by
    # cond(B), > 100: a random B with r near 1 per group), where it is explicit.
    if feedback_densities(feedback_density)[1] < 1 or _near_square_random(*arguments, feedback_groups):
        return ExplicitFeedback(*arguments, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="projected feedback with an ill-conditioned B")
        projected = ProjectedFeedback(*arguments, **options)
    if projected.condition_number > CONDITION_WARNING:
        return ExplicitFeedback(*arguments, **options)
    return projected
