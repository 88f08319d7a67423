"""Block FP8: quantize/dequantize round trips, the per-head grid, and grid errors."""

import math

import pytest
import torch

from minimimo.fp8 import FP8, blocks_below_max, choose_grid, dequantize, per_head_rows, quantize, uniform_rows


@pytest.mark.parametrize("shape,block", [((32, 48), 16), ((24, 40), 16), ((7, 5), 4), ((128, 64), 128)])
def test_round_trip_with_edge_blocks(shape, block):
    magnitude = 2.0 ** torch.randint(-3, 4, (math.ceil(shape[0] / block), 1)).float()  # one per row block
    w = torch.randn(shape) * magnitude.repeat_interleave(block, 0)[: shape[0]]
    fp8, scale = quantize(w, (block, block))
    assert fp8.dtype == FP8 and scale.shape == (math.ceil(shape[0] / block), math.ceil(shape[1] / block))
    back = dequantize(fp8, scale, (block, block))
    spacing = scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]] * 2 ** -9
    assert ((back - w).abs() <= w.abs() * 0.07 + spacing).all()  # 3 mantissa bits; subnormal spacing 2^-9
    assert blocks_below_max(fp8, uniform_rows(shape[0], block), block) == 0  # the amax property


def test_dequantize_formula_elementwise():
    fp8 = (torch.randn(20, 20) * 100).clamp(-448, 448).to(FP8)
    scale = torch.rand(2, 2) + 0.1
    out = dequantize(fp8, scale, (16, 16))
    for r, c in [(0, 0), (15, 16), (16, 15), (19, 19)]:
        assert out[r, c] == fp8[r, c].float() * scale[r // 16, c // 16]


def test_per_head_grid_is_chosen_from_the_scale_shape():
    # the real global k_proj: 4 heads of 192 rows with 128-row blocks -> 8 scale rows, not 6
    rows = per_head_rows(768, 128, 192)
    assert rows[:192].unique().tolist() == [0, 1] and rows[127] == 0 and rows[128] == 1 and rows[192] == 2
    w = torch.randn(48, 64) * (4 ** torch.randn(4, 1)).repeat_interleave(torch.tensor([16, 8, 16, 8]), 0)
    fp8, scale = quantize(w, (16, 16), head_size=24)
    assert scale.shape == (4, 4)
    kind, grid = choose_grid(fp8, scale, (16, 16), head_size=24)
    assert kind == "per-head"
    torch.testing.assert_close(dequantize(fp8, scale, (16, 16), head_size=24), w, atol=0.1 * w.abs().max(), rtol=0.07)
    wrong = fp8.float() * scale[uniform_rows(48, 12)][:, torch.arange(64) // 16]  # rows // scale_rows blocks
    assert (wrong - w).abs().max() > 0.2 * w.abs().max()


def test_amax_breaks_a_tie_between_grids():
    # 2 heads of 32 rows, block 16: uniform and per-head grids coincide -> one candidate only
    fp8, scale = quantize(torch.randn(64, 32), (16, 16), head_size=32)
    assert choose_grid(fp8, scale, (16, 16), head_size=32)[0] == "uniform"
    # 4 heads of 12 rows, block 16: uniform needs 3 rows, per-head 4*1 = 4 -> per-head only
    fp8, scale = quantize(torch.randn(48, 32), (16, 16), head_size=12)
    assert choose_grid(fp8, scale, (16, 16), head_size=12)[0] == "per-head"


def test_unexplained_scale_shapes_raise():
    fp8, _ = quantize(torch.randn(48, 64), (16, 16))
    with pytest.raises(ValueError, match="fit neither"):
        dequantize(fp8, torch.ones(5, 4), (16, 16), head_size=24, name="k_proj.weight")
    with pytest.raises(ValueError, match="does not fit weight"):
        dequantize(fp8, torch.ones(3, 3), (16, 16), name="k_proj.weight")
    with pytest.raises(ValueError, match="not float8"):
        dequantize(torch.randn(48, 64), torch.ones(3, 4), (16, 16))
