"""A feedback layer's seeded draw (pfa_kernels/seeded_draw.py): R_0 in chunks is R_0 drawn whole, and B and the
masks do not depend on whether R_0 is drawn; each through the extension's draw and through torch's uniform_."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pfa_kernels import seeded_draw, uniform_draw
from pfa_kernels.feedback_choice import make_feedback

pytestmark = pytest.mark.usefixtures("draw_route")

CASES = {  # (B's shape, R's shape, groups, grouped, C_out, C_mid)
    "linear": ((6, 60), (60, 5), 1, False, 6, 60),
    "dense groups": ((6, 24), (24, 2, 3, 3), 3, False, 6, 24),
    "grouped": ((6, 8), (24, 2, 3, 3), 3, True, 6, 24),
    "depthwise": ((4, 10), (40, 1, 3, 3), 4, True, 4, 40),
}


def _seeded(case, density=1.0):
    B_shape, R_shape, groups, grouped, out_channels, mid_channels = CASES[case]
    return seeded_draw.SeededDraw(7, B_shape, R_shape, groups, grouped, out_channels, mid_channels, "random", density)


@pytest.mark.parametrize("chunk_values", [1, 7, 18, 100, 1 << 22])
@pytest.mark.parametrize("case", list(CASES))
def test_R_in_chunks_is_R_drawn_whole(monkeypatch, case, chunk_values):
    """The chunks (a row or less, rows within a group, whole groups) put together are the R_0 of one
    nn.init.xavier_uniform_ on the whole tensor, bit for bit, in stream order."""
    monkeypatch.setattr(seeded_draw, "CHUNK_VALUES", chunk_values)
    seeded = _seeded(case)
    drawn = seeded.draw(with_R=False)
    generator = torch.Generator()
    generator.set_state(drawn.R_state)
    whole = nn.init.xavier_uniform_(torch.empty(seeded.R_shape, dtype=torch.float64), generator=generator)
    assert torch.equal(seeded.draw(with_R=True).R, whole)
    by_group = whole.reshape(seeded.groups, seeded.mid_channels // seeded.groups, -1)
    for dtype in (torch.float64, torch.float32):  # float32: each value rounded, as R_0.float() rounds it
        streamed = torch.full_like(by_group, float("nan"), dtype=dtype)
        order = []
        for groups, rows, values in seeded.R_chunks(drawn.R_state, dtype):
            assert values.dtype == dtype
            streamed[groups, rows] = values
            order.append((groups.start, rows.start))
        assert torch.equal(streamed, by_group.to(dtype))
        assert order == sorted(order)


@pytest.mark.parametrize("chunk_values", [1, 7, 100, 1 << 22])
@pytest.mark.parametrize("case", list(CASES))
def test_B_drawn_in_float32_is_the_float64_draw_rounded(monkeypatch, case, chunk_values):
    """B drawn in float32 (by the extension, or in chunks through a float64 buffer) is the float64 draw rounded, and
    the stream goes on where it would: R_0 and the masks are the same."""
    monkeypatch.setattr(uniform_draw, "CHUNK_VALUES", chunk_values)
    seeded = _seeded(case, density=(0.5, 0.5))
    in_float32, in_float64 = seeded.draw(B_dtype=torch.float32), seeded.draw()
    assert in_float32.B.dtype == torch.float32 and torch.equal(in_float32.B, in_float64.B.float())
    assert torch.equal(in_float32.R, in_float64.R) and torch.equal(in_float32.R_mask, in_float64.R_mask)


@pytest.mark.parametrize("density", [(0.5, 1.0), (1.0, 0.5), 0.5])
def test_B_and_the_masks_do_not_depend_on_drawing_R(monkeypatch, density):
    """Without R_0, its values are passed over where a mask follows them: B, B's mask and R's mask are those of the
    full draw, and so is R_0 streamed afterwards."""
    monkeypatch.setattr(seeded_draw, "CHUNK_VALUES", 25)
    seeded = _seeded("dense groups", density)
    full, without_R = seeded.draw(with_R=True), seeded.draw(with_R=False)
    assert without_R.R is None
    for name in ("B", "B_mask", "R_mask"):
        first, second = getattr(full, name), getattr(without_R, name)
        assert (first is None and second is None) or torch.equal(first, second), name
    assert full.B_mask is not None or full.R_mask is not None
    # (each chunk is a view of one buffer that the next overwrites: copied)
    unmasked_R = torch.cat([values.reshape(-1).clone() for _, _, values in seeded.R_chunks(without_R.R_state)])
    masked_R = unmasked_R * (1 if full.R_mask is None else full.R_mask.reshape(-1))
    assert torch.equal(masked_R.reshape(full.R.shape), full.R)


def test_a_layer_draws_through_its_seeded_draw():
    """A layer's _draw is SeededDraw.of(layer).draw: the same B and R_0 for the same seed and shapes."""
    layer = make_feedback(6, 2, (3, 3), groups=3, parametrization="explicit", seed=7, feedback_groups="grouped",
                          dtype=torch.float64)
    drawn = seeded_draw.SeededDraw.of(layer).draw()
    assert torch.equal(layer._draw().B, drawn.B) and torch.equal(layer.R, drawn.R) and torch.equal(layer.B, drawn.B)


@pytest.mark.parametrize("chunk_values", [1, 7, 1 << 22])
@pytest.mark.parametrize("settings", [dict(), dict(groups=3, feedback_groups="grouped"),
                                      dict(groups=3, feedback_groups="dense"), dict(feedback_density=(0.5, 1.0)),
                                      dict(feedback_density=0.5), dict(channels_last=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_an_explicit_layer_holds_R_0_as_drawn(monkeypatch, chunk_values, settings, dtype):
    """An explicit layer's R, filled chunk by chunk (or whole where R is masked or channels_last), is the whole
    draw of R_0 rounded to the layer's dtype, after reset_parameters() too."""
    monkeypatch.setattr(seeded_draw, "CHUNK_VALUES", chunk_values)
    settings = dict(settings)
    channels_last = settings.pop("channels_last", False)
    layer = make_feedback(6, 2, (3, 3), parametrization="explicit", seed=5, dtype=dtype, **settings)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        assert not layer.R.is_contiguous()
    expected = layer._draw().R.to(dtype)
    assert torch.equal(layer.R, expected)
    with torch.no_grad():
        layer.R.zero_()
    layer.reset_parameters()
    assert torch.equal(layer.R, expected)
