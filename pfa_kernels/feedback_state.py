"""How PFA feedback state is saved and loaded: which checkpoints carry it, and which do not.

A backpropagation checkpoint (nn.Conv2d, nn.Linear, torchvision weights) has no feedback state at all; a PFA
checkpoint has it for every PFA layer: the learned R or Z (and a projected layer's R_null), and "_extra_state", the
seed B, M and the masks are drawn from with a checksum of what they were. B, M and the masks themselves are not
saved (a ResNet-18 checkpoint: 517 MB with B, explicit, against 45 MB of weights); checkpoints written before
(which carry them) still load, B as saved.
"""

from __future__ import annotations

import hashlib
import threading

import torch
from torch import nn

from .feedback_options import feedback_densities


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


# What a PFA feedback's "_extra_state" entry holds since B left the checkpoint: B, M and the masks are functions of
# the seed and are drawn again on load; the checksum proves they came out as when the checkpoint was written.
STATE_FORMAT = 2
_CHECKSUM_SAMPLES = 65536


def fixed_state_checksum(B: torch.Tensor, R_mask: torch.Tensor | None) -> str:
    """A fingerprint of the drawn B (float64 as drawn, or any float32/float64 copy of it) and R's mask: sha256 of up to
    65,536 evenly spaced entries of B rounded to float32 (and of the mask), 16 hex digits. A generator that draws
    differently changes every entry; hashing a sample keeps a ResNet-50's 321 M entries of B out of the load time."""
    digest = hashlib.sha256()
    for tensor in (B, R_mask):
        if tensor is None:
            continue
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _CHECKSUM_SAMPLES:
            # Integer positions: a float32 linspace rounds 41,943,039 (a ResNet-50 layer's last entry) up past the end.
            count = flat.numel()
            positions = torch.arange(_CHECKSUM_SAMPLES, device=flat.device) * (count - 1) // (_CHECKSUM_SAMPLES - 1)
            flat = flat[positions]
        if flat.is_floating_point():
            flat = flat.float()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def checksum_mismatch_message(name: str, seed: int, saved: str, drawn: str) -> str:
    return (f"{name}: the feedback B drawn from the checkpoint's feedback_seed={seed} has checksum {drawn}, but the "
            f"checkpoint was written with B of checksum {saved}. This torch draws different random numbers than the "
            f"one that wrote it (torch {torch.__version__} here), so training would go on with another B. Load it "
            f"with the torch version that wrote it")


@torch.no_grad()
def load_fixed_state(feedback, own: dict, prefix: str, error_msgs: list) -> bool:
    """A PFA feedback module's (feedback.py) B, M and masks for this checkpoint (`own`: its entries under the module's
    prefix, edited in place): drawn again from its seed and checked against its checksum, or, from a checkpoint
    written before they left it, copied from it. False when the checkpoint cannot be loaded (reported in
    error_msgs)."""
    name = prefix[:-1] or "feedback"
    grouping_hint = (f" (the layer has feedback_groups={feedback.feedback_groups!r}; checkpoints written before "
                     f"grouped feedback existed, and those of feedback_groups='dense', need feedback_groups='dense')"
                     if feedback.groups > 1 else "")
    saved = {key: own.pop(prefix + key) for key in ("B", "B_mask", "R_mask", "M") if prefix + key in own}
    if saved:  # an older checkpoint, which carries them: B as saved (its seed is not recorded), held from now on
        B_density = feedback_densities(feedback.feedback_density)[0]
        expected = {"B": feedback.B_shape, "B_mask": feedback.B_shape if B_density < 1 else None,
                    "R_mask": None if feedback.R_mask is None else feedback.R_mask.shape,
                    "M": None if getattr(feedback, "M", None) is None else feedback.M.shape}
        for key, value in saved.items():
            if expected[key] is None or tuple(expected[key]) != tuple(value.shape):
                error_msgs.append(f"{name}: the checkpoint's {key} has shape {tuple(value.shape)}, this layer's "
                                  f"is {None if expected[key] is None else tuple(expected[key])}{grouping_hint}")
                return False
        like = feedback.parameter
        for key, value in saved.items():
            if key in ("B", "B_mask"):  # held (a projected layer with M holds B only when it is not the seed's)
                setattr(feedback, key, value.to(like.device, like.dtype if key == "B" else torch.bool))
            else:
                getattr(feedback, key).copy_(value)
        if "B" in saved:
            feedback.B_from_seed = False
        if "M" not in saved:
            feedback._fixed_state_changed()
        exact = feedback.B.dtype in (torch.float32, torch.float64)
        feedback.fixed_checksum = fixed_state_checksum(feedback.B, feedback.R_mask) if exact else None
        own[prefix + "_extra_state"] = feedback.get_extra_state()
        return True
    state = own.get(prefix + "_extra_state")
    if state is None:  # torch reports the missing key (strict) or keeps the drawn state
        return True
    if state.get("feedback_groups", feedback.feedback_groups) != feedback.feedback_groups and feedback.groups > 1:
        error_msgs.append(f"{name}: the checkpoint has feedback_groups={state['feedback_groups']!r}, this layer "
                          f"{feedback.feedback_groups!r}; build the model with feedback_groups="
                          f"{state['feedback_groups']!r} to load it")
        return False
    if state["seed"] != feedback.seed:
        feedback.seed = state["seed"]
        feedback._reset_fixed_state(with_R=False)
        feedback._fixed_state_changed()
    if state.get("checksum") is not None and state["checksum"] != feedback.fixed_checksum:
        error_msgs.append(checksum_mismatch_message(name, feedback.seed, state["checksum"], feedback.fixed_checksum))
        return False
    return True

