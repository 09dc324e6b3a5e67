"""Launching a Triton kernel on the device its tensors live on.

Triton compiles for and launches on torch.cuda.current_device(), not on the device of its arguments: a layer
on cuda:1 called while cuda:0 is current would run its kernels on cuda:0 with cuda:1 pointers (an illegal
address). Every launch in this package goes through launch(), which makes the tensors' device current for the
duration of the call (and with it that device's current stream, which Triton launches on).

Autograd runs the backward of each device on its own thread, and DataParallel-style code calls one layer from
several threads at once. Triton's autotuner is not thread-safe: its first call for a key benchmarks every
configuration and fills a shared cache, so two threads tuning one key race on it. Autotuned launches therefore
hold one lock (a launch costs microseconds; the benchmark happens once per key).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner

_AUTOTUNE_LOCK = threading.Lock()


def device_guard(device: torch.device):
    """A context that makes `device` the current CUDA device; nothing for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on `device` (the device of the kernel's tensor arguments), through
    torch.library.wrap_triton so that torch.compile sees the launch inside a triton_op."""
    tuning = isinstance(kernel, Autotuner) and not torch.compiler.is_compiling()
    with _AUTOTUNE_LOCK if tuning else contextlib.nullcontext(), device_guard(device):
        wrap_triton(kernel)[grid](*args, **kwargs)
