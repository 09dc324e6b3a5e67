"""The run folder (log.dir): a new run never mixes with an earlier one's files, --resume continues one run and says
what it changed, and nothing in the folder changes before the config has been validated.

    check_new(...)       a new run: refuse a folder with a checkpoint or metrics, unless --overwrite
    resume_changes(...)  --resume: the keys whose new values apply, or ConfigError for those that cannot change
    prepare(...)         after validation (rank 0): create, clear (--overwrite), write config.json, record a resume
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from pathlib import Path

from . import checkpoint
from .config import DEFAULTS, _flatten
from .plots import FILES as PLOTS
from .values import ConfigError

METRICS = "metrics.jsonl"
CONFIG = "config.json"
RESUMES = "resumes.jsonl"
TENSORBOARD = "tensorboard"

# Keys a resumed run cannot take new values for: they define the model, its feedback, the optimizer's state, the
# data order and the AMP scaler's state that the checkpoint holds.
FIXED_ON_RESUME = ("data.dataset", "model.*", "rule.mode", "rule.expand_ratio", "rule.parametrization",
                   "rule.feedback_density", "rule.exclude", "rule.feedback_seed", "optim.name", "optim.schedule",
                   "optim.no_weight_decay_norm_bias", "train.seed", "train.amp", "train.ema_decay", "train.fsdp")
# Keys that can change only at an epoch boundary: the rest of a started epoch is laid out by them.
FIXED_WITHIN_EPOCH = ("train.batch_size",)


def _elsewhere(run_dir: Path) -> str:
    return f"--set log.dir={run_dir.parent / (run_dir.name + '-2')}"


def check_new(run_dir: Path, overwrite: bool) -> None:
    """A new run (no --resume) into run_dir: ConfigError if an earlier run left its checkpoint or metrics there."""
    found = [name for name in (checkpoint.NAME, METRICS) if (run_dir / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"log.dir={run_dir} already holds {' and '.join(found)} of an earlier run. Continue that run with "
            f"--resume, start this one in another folder ({_elsewhere(run_dir)}), or replace the earlier run with "
            f"--overwrite")


def checkpoint_for_resume(run_dir: Path) -> Path:
    path = run_dir / checkpoint.NAME
    if not path.exists():
        raise ConfigError(f"--resume: there is no checkpoint {path} to continue from (log.dir={run_dir}); drop "
                          f"--resume to start a new run there")
    return path


def _fixed(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def resume_changes(saved_config: dict, config: dict, batch_in_epoch: int, path: Path) -> dict:
    """{key: (checkpoint's value, new value)} for the keys this resumed run changes; ConfigError naming every key
    that cannot change, with the value the checkpoint was trained with."""
    saved, new = _flatten(saved_config), _flatten(config)
    changes, refused = {}, []
    for key, value in new.items():
        before = saved.get(key, DEFAULTS[key][0])  # a key added since the checkpoint was written: its default
        try:
            before = DEFAULTS[key][1].coerce(key, before)
        except ConfigError:
            pass  # compared as it was saved
        if before == value:
            continue
        if _fixed(key, FIXED_ON_RESUME):
            refused.append(f"{key}={value!r}: {path} was trained with {key}={before!r}")
        elif _fixed(key, FIXED_WITHIN_EPOCH) and batch_in_epoch:
            refused.append(f"{key}={value!r} cannot change mid-epoch (the checkpoint is at batch {batch_in_epoch} "
                           f"of its epoch): {path} was trained with {key}={before!r}")
        else:
            changes[key] = (before, value)
    if refused:
        raise ConfigError("--resume cannot honour " + "; ".join(refused) + ". Resume with the checkpoint's values, "
                          f"or start a new run ({_elsewhere(path.parent)})")
    return changes


def prepare(run_dir: Path, config: dict, overwrite: bool, resumed: dict | None, changes: dict) -> None:
    """Rank 0, once the config, data, model and checkpoint have been validated: create the folder, clear an earlier
    run (--overwrite), write config.json, and on a resume record it and drop metrics written after the checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(run_dir)
    _write_atomically(run_dir / CONFIG, json.dumps(config, indent=2))
    if resumed is not None:
        _keep_metrics_before(run_dir / METRICS, resumed["epoch"])
        record = {"epoch": resumed["epoch"], "step": resumed["step"],
                  "changed": {key: list(pair) for key, pair in changes.items()}}
        with (run_dir / RESUMES).open("a") as out:
            out.write(json.dumps(record) + "\n")


def _clear(run_dir: Path) -> None:
    for name in (checkpoint.NAME, checkpoint.BEST, METRICS, CONFIG, RESUMES, *PLOTS):
        (run_dir / name).unlink(missing_ok=True)
    for evaluation in run_dir.glob(f"*{checkpoint.EVAL_SUFFIX}"):
        evaluation.unlink(missing_ok=True)
    for leftover in run_dir.glob(f"{checkpoint.TEMPORARY_PREFIX}*.tmp"):
        leftover.unlink(missing_ok=True)
    if (run_dir / TENSORBOARD).is_dir():
        shutil.rmtree(run_dir / TENSORBOARD)


def _keep_metrics_before(path: Path, epoch: int) -> None:
    # Epoch e's line is written before the checkpoint that ends epoch e, so lines for epochs >= the checkpoint's are
    # from a run that stopped before its next checkpoint: the resumed run writes them again.
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _epoch_of(line) < epoch]
    if len(kept) != len(lines):
        _write_atomically(path, "".join(line + "\n" for line in kept))


def _epoch_of(line: str) -> float:
    # A line cut short by a crash while it was written is not a record: dropped like the others after the checkpoint.
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
