"""checkpoint.pt of a run folder: written atomically, read with errors that name the file and what is wrong.

save() writes a temporary file beside the checkpoint, flushes it to disk and renames it over the old one, so a save
that dies half-way (a full disk, a killed job) leaves the previous checkpoint whole. load() tells an empty, a
truncated and a foreign file apart.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import torch

from .values import ConfigError

NAME = "checkpoint.pt"
# The state after the epoch with the best validation top-1 (log.keep_best): the same keys as NAME.
BEST = "best.pt"
# --eval <file>.pt writes its metrics to <file>.eval.json.
EVAL_SUFFIX = ".eval.json"
# What the training loop saves and needs back.
KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "batch_in_epoch", "rng", "config",
        "feedback_generators")
TEMPORARY_PREFIX = f".{NAME}."


def save(state: dict, path: Path) -> None:
    """torch.save(state, path), atomically: the file at `path` is the old checkpoint or the new one, never a part."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 gives the file the permissions the umask allows, as a plain open() would.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    # The rename is durable once the folder's entry is on disk; folders cannot be opened for this on every system.
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def load(path: Path) -> dict:
    """The training state saved at `path` (tensors on the CPU); ConfigError naming the file if it cannot be one."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"checkpoint {path} is empty (0 bytes): it was never completely written. Start a new run "
                          f"(--overwrite, or another --set log.dir), or put back a copy of the checkpoint")
    try:
        # Not weights_only: the state holds the RNG states (numpy arrays, tuples) as well as tensors. The file is
        # this run folder's own.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(f"checkpoint {path} cannot be read ({size} bytes, truncated or corrupt: "
                          f"{type(error).__name__}: {error})") from error
    problem = _not_a_training_state(state)
    if problem:
        raise ConfigError(f"{path} is not a training checkpoint of python -m pfa_kernels.train: {problem}")
    return state


def _not_a_training_state(state) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict of training state"
    if state and all(torch.is_tensor(value) for value in state.values()):
        return ("it holds a model state dict (tensors only); to start a new run from its weights, pass it as "
                "--set model.checkpoint=<file>")
    missing = [key for key in KEYS if key not in state]
    if missing:
        return f"it lacks {missing} (it has {sorted(map(str, state))[:8]})"
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        return "its 'config' and 'model' entries are not dicts"
    return None
