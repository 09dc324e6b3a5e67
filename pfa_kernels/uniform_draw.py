"""Uniform values from a CPU generator, exactly as torch's uniform_ draws them, in a quarter of its time.

A seeded layer's B and R_0 are uniform_ draws from its generator (seeded_draw.py): 547 M values for a ResNet-50 at
r = 10, which uniform_ draws at 4.2 ns a value on this CPU (2.3 s of a 10 s conversion). The extension's
seeded_uniform_ (csrc/seeded_uniform.cpp) draws the same values and leaves the generator in the same state at
1.0 ns. Which of its variants reproduces uniform_ depends on how torch's own kernel was compiled (a fused
multiply-add or not), so before the first draw each variant this CPU runs is tried against uniform_ on lengths that
start and end mid-way through the generator's 624-word state, in both dtypes, and the first that agrees bit for bit,
generator state included, is the one used; uniform_ itself where none does or the extension is not built. A variant
that would draw another B is never used: at worst the draw is slower, and route() says which one runs.
"""

from __future__ import annotations

import functools

import torch

from .backends import cpp as cpp_backend

# Values per float64 buffer where the extension does not draw a float32 target (32 MB).
CHUNK_VALUES = 1 << 22

# The trial of a variant: values 1 to 3001 long (a value takes two of the state's 624 words, so these end before, on
# and after a twist at both parities) from a seed, a bound and a low end like a layer's.
_TRIAL_LENGTHS = (1, 2, 311, 312, 313, 623, 624, 625, 3001)
_TRIAL_SEED = 2024
_TRIAL_RANGE = (-0.0731, 0.0731)


def uniform_(target: torch.Tensor, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """target.uniform_(low, high, generator=generator) as drawn in float64 (for a float64 target, what uniform_
    draws), rounded to target's dtype; returns target.
    target: any shape, on the CPU; float64 or float32 go through the extension where a variant reproduces uniform_
    (contiguous targets); other dtypes through float64 chunks of CHUNK_VALUES values."""
    variant = chosen_variant()
    if (variant is not None and target.device.type == "cpu" and target.dtype in (torch.float64, torch.float32)
            and target.is_contiguous()):
        cpp_backend.PYTHON_MODULE.seeded_uniform_(target, low, high, generator, variant)
        return target
    if target.dtype == torch.float64:
        return target.uniform_(low, high, generator=generator)
    if not target.is_contiguous():  # (values in the order uniform_ fills target's strides: empty_like keeps them)
        return target.copy_(torch.empty_like(target, dtype=torch.float64).uniform_(low, high, generator=generator))
    flat = target.view(-1)
    buffer = torch.empty(min(CHUNK_VALUES, flat.numel()), dtype=torch.float64)
    for start in range(0, flat.numel(), CHUNK_VALUES):
        values = buffer[:min(CHUNK_VALUES, flat.numel() - start)].uniform_(low, high, generator=generator)
        flat[start:start + values.numel()].copy_(values)
    return target


def route() -> str:
    """Which draw uniform_ runs: "extension (<variant>)" or "torch uniform_ (<why>)"."""
    variant = chosen_variant()
    if variant is not None:
        return f"extension ({variant})"
    if cpp_backend.PYTHON_MODULE is None:
        return f"torch uniform_ (the extension is not loaded: {cpp_backend.LOAD_ERROR})"
    return "torch uniform_ (no variant of the extension's draw reproduces it on this machine)"


@functools.cache
def chosen_variant() -> str | None:
    """The first of the extension's variants that reproduces uniform_ here, or None."""
    module = cpp_backend.PYTHON_MODULE
    if module is None or not hasattr(module, "seeded_uniform_"):
        return None
    return next((variant for variant in module.seeded_uniform_variants() if reproduces_uniform(variant)), None)


def reproduces_uniform(variant: str) -> bool:
    """Whether the extension's `variant` draws uniform_'s values, in float64 and rounded to float32, and leaves the
    generator in uniform_'s state, over _TRIAL_LENGTHS."""
    expected_generator = torch.Generator().manual_seed(_TRIAL_SEED)
    generator = torch.Generator().manual_seed(_TRIAL_SEED)
    for dtype in (torch.float64, torch.float32):
        for length in _TRIAL_LENGTHS:
            expected = torch.empty(length, dtype=torch.float64).uniform_(*_TRIAL_RANGE, generator=expected_generator)
            drawn = torch.empty(length, dtype=dtype)
            cpp_backend.PYTHON_MODULE.seeded_uniform_(drawn, *_TRIAL_RANGE, generator, variant)
            if not torch.equal(drawn, expected.to(dtype)) or not torch.equal(generator.get_state(),
                                                                               expected_generator.get_state()):
                return False
    return True
