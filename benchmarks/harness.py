"""Shared benchmark machinery: interleaved timing, peak memory, the environment, and result files.

Timing (CPU): torch.utils.benchmark.Timer, one call per implementation per round, rounds interleaved
(A, B, C, A, B, C, ...) after a warm-up call each, so that slow drifts of a noisy machine hit every
implementation alike; the median and the 20th/80th percentiles of the rounds are reported.
Timing (GPU): triton.testing.do_bench per implementation per round, interleaved the same way.

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the call; on CPU, a dispatch mode that
counts the bytes of every storage created during the call and still alive (run separately from the
timed calls, since it slows every op down). Both are memory *added* by the call: inputs and parameters
that exist before it are not counted.
"""

from __future__ import annotations

import json
import platform
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

# Every record carries at least these keys (one record per measurement, one JSON object per line).
RECORD_KEYS = ("benchmark", "shape", "impl", "dtype", "batch", "expand_ratio", "median_ms", "p20_ms", "p80_ms",
               "peak_mb", "ratio_vs_bp")


def environment() -> dict:
    """Machine, library versions and thread count, stored with every record."""
    info = {
        "machine": platform.processor() or platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


class _LiveStorageBytes(TorchDispatchMode):
    """Counts the bytes of storages created under the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _track(self, value):
        if not isinstance(value, torch.Tensor):
            return
        storage = value.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key, size):
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        _pytree.tree_map(self._track, out)
        return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB) that one call of fn adds on `device`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    with _LiveStorageBytes() as counter:
        fn()
    return counter.peak / 2**20


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, list]:
    """Seconds per call of each fn, `rounds` samples each, taken in interleaved rounds after a warm-up."""
    if device.type == "cuda":
        import triton.testing

        def measure(name):
            return triton.testing.do_bench(fns[name], warmup=5, rep=20) / 1e3
    else:
        from torch.utils.benchmark import Timer

        timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                  for name, fn in fns.items()}

        def measure(name):
            return timers[name].timeit(1).times[0]
    for fn in fns.values():
        fn()  # warm-up: allocator, oneDNN primitive caches, optimizer state
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name in fns:
            samples[name].append(measure(name))
    return samples


def summarize(samples: list[float]) -> dict:
    """median / p20 / p80 in milliseconds."""
    values = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(values)), "p20_ms": float(np.percentile(values, 20)),
            "p80_ms": float(np.percentile(values, 80)), "samples_ms": [float(v) for v in values]}


def write_jsonl(records: list[dict], path: Path) -> None:
    """Append records (one JSON object per line), each checked to carry RECORD_KEYS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for record in records:
            missing = [key for key in RECORD_KEYS if key not in record]
            if missing:
                raise ValueError(f"benchmark record lacks {missing}: {record}")
            out.write(json.dumps(record) + "\n")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows as a markdown table; columns are (key, header, format spec)."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
