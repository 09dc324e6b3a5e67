"""Launching a Triton kernel on the device its tensors live on.

Triton compiles for and launches on torch.cuda.current_device(), not on the device of its arguments: a layer
on cuda:1 called while cuda:0 is current would run its kernels on cuda:0 with cuda:1 pointers (an illegal
address). Every launch in this package goes through launch(), which makes the tensors' device current for the
duration of the call (and with it that device's current stream, which Triton launches on).
"""

from __future__ import annotations

import contextlib

import torch
from torch.library import wrap_triton


def device_guard(device: torch.device):
    """A context that makes `device` the current CUDA device; nothing for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on `device` (the device of the kernel's tensor arguments), through
    torch.library.wrap_triton so that torch.compile sees the launch inside a triton_op."""
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **kwargs)
