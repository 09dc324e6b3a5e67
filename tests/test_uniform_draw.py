"""uniform_draw.uniform_ (pfa_kernels/uniform_draw.py, csrc/seeded_uniform.cpp): torch's uniform_ values and
generator state, through each of the extension's variants that reproduces uniform_ here and through uniform_ itself;
a variant that does not reproduce it is never used."""

from __future__ import annotations

import math
import platform

import pytest
import torch

from pfa_kernels import uniform_draw
from pfa_kernels.backends import cpp as cpp_backend

MODULE = cpp_backend.PYTHON_MODULE
needs_extension = pytest.mark.skipif(MODULE is None, reason="the compiled extension is not built")


def _generators(seed=11):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


def _draws(generator, draw, lengths, dtype):
    """Consecutive draws of `lengths` values from `generator` by `draw` (target, generator), each into a new target."""
    targets = [torch.empty(length, dtype=dtype) for length in lengths]
    for target in targets:
        draw(target, generator)
    return targets


# Consecutive draws that start and stop at every parity within the generator's 624-word state, cross many twists,
# and end with a long one (1.5 M values: the extension works in pieces of 2048 values).
LENGTHS = (1, 1, 310, 313, 624, 625, 2047, 2048, 2049, 100_003, 1_500_001)


def _torch_draw(low, high):
    def draw(target, generator):
        target.copy_(torch.empty(target.shape, dtype=torch.float64).uniform_(low, high, generator=generator))
    return draw


def _extension_draw(low, high, variant):
    def draw(target, generator):
        MODULE.seeded_uniform_(target, low, high, generator, variant)
    return draw


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("low, high", [(-0.0123, 0.0123), (0.0, 1.0), (-3.0, 0.5), (2.0, 2.0)])
def test_each_variant_that_reproduces_uniform_draws_its_values_and_state(dtype, low, high):
    """Every variant that passes the trial draws uniform_'s values (float32: rounded) and leaves the generator as
    uniform_ does, over long and short consecutive draws and at other bounds than the trial's."""
    passing = [variant for variant in MODULE.seeded_uniform_variants() if uniform_draw.reproduces_uniform(variant)]
    if not passing:
        pytest.skip(uniform_draw.route())
    for variant in passing:
        expected_generator, generator = _generators()
        expected = _draws(expected_generator, _torch_draw(low, high), LENGTHS, dtype)
        drawn = _draws(generator, _extension_draw(low, high, variant), LENGTHS, dtype)
        assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True)), variant
        assert torch.equal(generator.get_state(), expected_generator.get_state()), variant
        # and the generator goes on as uniform_'s would, for any later draw
        assert torch.equal(torch.randn(5, generator=generator), torch.randn(5, generator=expected_generator))


@needs_extension
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the extension's fast variants are x86-64's")
def test_a_variant_is_chosen_on_this_machine():
    """On an x86-64 CPU with AVX2 one variant reproduces uniform_ (torch's CPU kernels fuse its multiply-add where
    FMA exists, and not otherwise): the seeded draw does not quietly fall back to uniform_'s 4x slower draw."""
    assert uniform_draw.chosen_variant() is not None, uniform_draw.route()
    assert uniform_draw.route() == f"extension ({uniform_draw.chosen_variant()})"


@needs_extension
def test_a_variant_that_differs_in_one_value_is_not_used(monkeypatch):
    """A variant whose draw differs from uniform_'s in one value, or leaves the generator elsewhere, fails the trial;
    with none left, uniform_ draws (the same values as ever)."""
    class OffByOneValue:
        def seeded_uniform_variants(self):
            return ["wrong value", "wrong state"]

        def seeded_uniform_(self, out, low, high, generator, variant):
            out.copy_(torch.empty(out.shape, dtype=torch.float64).uniform_(low, high, generator=generator))
            if variant == "wrong value" and out.numel() > 600:
                out[600] = torch.nextafter(out[600], torch.tensor(2.0, dtype=out.dtype))
            if variant == "wrong state" and out.numel() > 3000:
                torch.empty(1).uniform_(generator=generator)

    monkeypatch.setattr(cpp_backend, "PYTHON_MODULE", OffByOneValue())
    uniform_draw.chosen_variant.cache_clear()
    try:
        assert uniform_draw.chosen_variant() is None
        assert "no variant" in uniform_draw.route()
        expected_generator, generator = _generators()
        drawn = uniform_draw.uniform_(torch.empty(700, dtype=torch.float64), -1.0, 1.0, generator)
        assert torch.equal(drawn, torch.empty(700, dtype=torch.float64).uniform_(-1, 1, generator=expected_generator))
    finally:
        uniform_draw.chosen_variant.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_uniform_draws_uniform_values_rounded_to_the_target(draw_route, monkeypatch, dtype, layout):
    """uniform_draw.uniform_ on any target is a float64 uniform_ of its shape and strides (uniform_ fills a strided
    tensor in memory order), rounded to its dtype (float32 and other dtypes through float64 chunks where the extension
    does not draw them)."""
    monkeypatch.setattr(uniform_draw, "CHUNK_VALUES", 7)
    expected_generator, generator = _generators()
    target = torch.empty(9, 5, dtype=dtype)
    if layout == "transposed":
        target = torch.empty(5, 9, dtype=dtype).t()
    uniform_draw.uniform_(target, -0.5, 0.25, generator)
    expected = torch.empty_like(target, dtype=torch.float64).uniform_(-0.5, 0.25, generator=expected_generator)
    assert torch.equal(target, expected.to(dtype))
    assert torch.equal(generator.get_state(), expected_generator.get_state())


@needs_extension
@pytest.mark.parametrize("out, message", [
    (lambda: torch.empty(4, 3).t(), "out must be a contiguous CPU float64 or float32"),
    (lambda: torch.empty(4, dtype=torch.bfloat16), "out must be a contiguous CPU float64 or float32"),
    (lambda: torch.empty(4, device="meta"), "out must be a contiguous CPU float64 or float32"),
])
def test_seeded_uniform_refuses_a_target_it_cannot_fill(out, message):
    with pytest.raises(RuntimeError, match=message):
        MODULE.seeded_uniform_(out(), 0.0, 1.0, torch.Generator(), "baseline")


@needs_extension
def test_seeded_uniform_counts_as_an_in_place_write():
    """The draw bumps the target's version counter as uniform_ does: autograd sees a saved tensor overwritten."""
    target = torch.empty(3, dtype=torch.float64)
    MODULE.seeded_uniform_(target, 0.0, 1.0, torch.Generator(), "baseline")
    assert target._version == torch.empty(3, dtype=torch.float64).uniform_(0.0, 1.0)._version == 1


@needs_extension
def test_seeded_uniform_refuses_bad_bounds_and_variants():
    for low, high in [(1.0, 0.0), (-math.inf, 0.0), (0.0, math.nan), (-1e308, 1e308)]:
        with pytest.raises(RuntimeError, match=r"low \(.*\) and high \(.*\) must be finite, low <= high"):
            MODULE.seeded_uniform_(torch.empty(4, dtype=torch.float64), low, high, torch.Generator(), "baseline")
        with pytest.raises(RuntimeError):  # as uniform_ refuses them
            torch.empty(4, dtype=torch.float64).uniform_(low, high)
    with pytest.raises(RuntimeError, match="variant 'sse9' does not run on this CPU"):
        MODULE.seeded_uniform_(torch.empty(4, dtype=torch.float64), 0.0, 1.0, torch.Generator(), "sse9")
