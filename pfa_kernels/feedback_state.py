"""How PFA feedback state is saved and loaded: which checkpoints carry it, and which do not.

A backpropagation checkpoint (nn.Conv2d, nn.Linear, torchvision weights) has no feedback state at all; a PFA
checkpoint has it for every PFA layer.
"""

from __future__ import annotations

import threading

from torch import nn


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
