"""launch(): autotuned Triton kernels are launched under one lock (Triton's autotuner is not thread-safe)."""

from __future__ import annotations

import threading

import pytest
import torch

triton = pytest.importorskip("triton")
from pfa_kernels.backends.triton import launch as launch_module  # noqa: E402


@triton.jit
def _noop_fwd_kernel(x_ptr, BLOCK: triton.language.constexpr):
    pass


def _recording_wrap(seen):
    """A stand-in for torch.library.wrap_triton whose launches record whether the autotune lock was held."""
    def wrap(kernel):
        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: seen.append((kernel, launch_module._AUTOTUNE_LOCK.locked()))
        return Launcher()
    return wrap


def test_autotuned_launches_hold_the_lock_and_plain_ones_do_not(monkeypatch):
    seen = []
    monkeypatch.setattr(launch_module, "wrap_triton", _recording_wrap(seen))
    autotuned = triton.autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=[])(_noop_fwd_kernel)
    x = torch.zeros(4)
    launch_module.launch(autotuned, (1,), x.device, x)
    launch_module.launch(_noop_fwd_kernel, (1,), x.device, x, BLOCK=16)
    assert seen == [(autotuned, True), (_noop_fwd_kernel, False)]
    assert not launch_module._AUTOTUNE_LOCK.locked()


def test_concurrent_autotuned_launches_never_overlap(monkeypatch):
    """Eight threads launching one autotuned kernel: never two inside a launch at once (a first call would
    benchmark every configuration and fill the autotuner's cache)."""
    inside, overlaps, barrier = [0], [], threading.Barrier(8)

    def wrap(kernel):
        class Launcher:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    inside[0] += 1
                    overlaps.append(inside[0])
                    threading.Event().wait(0.01)
                    inside[0] -= 1
                return run
        return Launcher()

    monkeypatch.setattr(launch_module, "wrap_triton", wrap)
    autotuned = triton.autotune([triton.Config({"BLOCK": 16})], key=[])(_noop_fwd_kernel)
    x = torch.zeros(4)

    def worker():
        barrier.wait()
        launch_module.launch(autotuned, (1,), x.device, x)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 8 and max(overlaps) == 1
