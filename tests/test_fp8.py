"""Block FP8: quantize/dequantize round trips, the per-head grid, grid errors, and the FP8 modules
(`FP8Linear`, `FP8Experts`) computing with the grid they hold."""

import math

import pytest
import torch
from torch.nn import functional as F

from minimimo.fp8 import (FP8, FP8Experts, FP8Linear, apply_scales, blocks_below_max, choose_grid, dequantize,
                          per_head_rows, quantize, scale_shape, uniform_rows)
from minimimo.moe import Experts


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
    kind, grid = choose_grid(fp8.shape, scale.shape, (16, 16), head_size=24)
    assert kind == "per-head" and torch.equal(grid, per_head_rows(48, 16, 24))
    torch.testing.assert_close(dequantize(fp8, scale, (16, 16), head_size=24), w, atol=0.1 * w.abs().max(), rtol=0.07)
    wrong = fp8.float() * scale[uniform_rows(48, 12)][:, torch.arange(64) // 16]  # rows // scale_rows blocks
    assert (wrong - w).abs().max() > 0.2 * w.abs().max()


def test_the_scale_shape_decides_when_one_grid_fits():
    # 2 heads of 32 rows, block 16: uniform and per-head grids coincide -> one candidate only
    fp8, scale = quantize(torch.randn(64, 32), (16, 16), head_size=32)
    assert choose_grid(fp8.shape, scale.shape, (16, 16), head_size=32)[0] == "uniform"
    # 4 heads of 12 rows, block 16: uniform needs 3 rows, per-head 4*1 = 4 -> per-head only
    fp8, scale = quantize(torch.randn(48, 32), (16, 16), head_size=12)
    assert choose_grid(fp8.shape, scale.shape, (16, 16), head_size=12)[0] == "per-head"
    assert scale_shape((48, 32), (16, 16), 12) == tuple(scale.shape) == (4, 2)


@pytest.mark.parametrize("quantized_per_head", [True, False])
def test_amax_breaks_a_tie_between_grids(quantized_per_head):
    # 2 heads of 24 rows, block 32: both grids have 2 scale rows (rows 0-31 | 32-47 against 0-23 | 24-47).
    # The largest weights sit where only the true grid has a 448 in every block
    w = torch.randn(48, 64)
    w[[0, 25] if quantized_per_head else [28, 40]] = 10.0
    fp8, scale = quantize(w, (32, 32), head_size=24 if quantized_per_head else None)
    calls = []
    kind, grid = choose_grid(fp8.shape, scale.shape, (32, 32), head_size=24, fp8=lambda: calls.append(1) or fp8)
    assert calls == [1]  # the weight is read only for a tie
    assert kind == ("per-head" if quantized_per_head else "uniform")
    assert torch.equal(grid, per_head_rows(48, 32, 24) if quantized_per_head else uniform_rows(48, 32))
    with pytest.raises(ValueError, match="both fit"):
        choose_grid(fp8.shape, scale.shape, (32, 32), head_size=24)


def test_unexplained_scale_shapes_raise():
    fp8, _ = quantize(torch.randn(48, 64), (16, 16))
    with pytest.raises(ValueError, match="fit neither"):
        dequantize(fp8, torch.ones(5, 4), (16, 16), head_size=24, name="k_proj.weight")
    with pytest.raises(ValueError, match="does not fit weight"):
        dequantize(fp8, torch.ones(3, 3), (16, 16), name="k_proj.weight")
    with pytest.raises(ValueError, match="not float8"):
        dequantize(torch.randn(48, 64), torch.ones(3, 4), (16, 16))


def filled_fp8_linear(w: torch.Tensor, block, head_size=None) -> FP8Linear:
    """An FP8Linear holding `w` quantized on its grid, the grid decided by choose_grid (as the loader does)."""
    fp8, scale = quantize(w, block, head_size=head_size)
    _, row_block = choose_grid(fp8.shape, scale.shape, block, head_size=24, fp8=fp8)
    linear = FP8Linear(w.shape[1], w.shape[0], scale.shape, block, strip_rows=w.shape[0])  # one strip: same matmul
    for buffer, value in (("weight", fp8), ("weight_scale_inv", scale), ("weight_row_block", row_block)):
        getattr(linear, buffer).copy_(value)
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized_per_head", [True, False])
def test_fp8_linear_computes_with_the_grid_it_holds(dtype, quantized_per_head):
    # the tie of the test above: the module must use the chosen grid, not the first one that fits
    w = torch.randn(48, 64) * torch.tensor([1.0, 8.0, 0.1, 3.0]).repeat_interleave(12)[:, None]
    w[[0, 25] if quantized_per_head else [28, 40]] = 30.0  # a tie of grids that the amax test breaks
    linear = filled_fp8_linear(w, (32, 32), head_size=24 if quantized_per_head else None)
    grid = per_head_rows(48, 32, 24) if quantized_per_head else uniform_rows(48, 32)  # the one quantize used
    assert torch.equal(linear.weight_row_block.long(), grid)
    dense = apply_scales(linear.weight, linear.weight_scale_inv, grid, 32, dtype)
    x = torch.randn(2, 5, 64).to(dtype)  # batch 2
    assert torch.equal(linear(x), F.linear(x, dense))
    linear.strip_rows = 32  # strips of 32 rows: the same outputs (a matmul of other width may round apart)
    torch.testing.assert_close(linear(x), F.linear(x, dense))


def test_a_row_slice_of_an_fp8_linear_carries_its_slice_of_the_grid():
    # what a tensor-parallel rank would hold: rows [r0, r1) of the weight, the scale rows they use, and
    # the same rows of row_block, shifted to the first scale row kept
    full = filled_fp8_linear(torch.randn(48, 64), (16, 16), head_size=24)  # per-head grid: 4 scale rows
    assert full.weight_row_block.tolist() == [0] * 16 + [1] * 8 + [2] * 16 + [3] * 8
    r0, r1 = 24, 48  # the second head
    rows = full.weight_row_block[r0:r1]
    s0, s1 = int(rows.min()), int(rows.max()) + 1
    part = FP8Linear(64, r1 - r0, (s1 - s0, 4), (16, 16))
    for buffer, value in (("weight", full.weight[r0:r1]), ("weight_scale_inv", full.weight_scale_inv[s0:s1]),
                          ("weight_row_block", rows - s0)):
        getattr(part, buffer).copy_(value)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(part(x), full(x)[..., r0:r1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_experts_equal_experts_with_the_dequantized_weights(dtype):
    torch.manual_seed(0)
    num_experts, hidden, inter, block = 4, 32, 24, (16, 16)
    plain = Experts(num_experts, hidden, inter)
    scale_shapes = {name: scale_shape(tuple(getattr(plain, name).shape[1:]), block) for name in plain.PROJECTIONS}
    fp8_experts = FP8Experts(num_experts, hidden, inter, scale_shapes, block)
    assert not any(True for _ in fp8_experts.parameters())  # all three matrices are FP8 buffers
    with torch.no_grad():
        for name in plain.PROJECTIONS:
            for e in range(num_experts):
                fp8, scale = quantize(torch.randn(getattr(plain, name).shape[1:]), block)
                getattr(fp8_experts, name)[e] = fp8
                getattr(fp8_experts, name + "_scale_inv")[e] = scale
                getattr(plain, name)[e] = dequantize(fp8, scale, block, dtype=dtype).float()
            getattr(fp8_experts, name + "_row_block").copy_(choose_grid(fp8.shape, scale.shape, block)[1])
    plain = plain.to(dtype)
    plain.use_grouped_mm = False  # the same per-expert loop on both sides
    x = torch.randn(10, hidden).to(dtype)
    gate_weights = torch.rand(10, 2).softmax(-1)
    expert_ids = torch.stack([torch.arange(10) % num_experts, (torch.arange(10) + 1) % num_experts], dim=1)
    assert torch.equal(fp8_experts(x, gate_weights, expert_ids), plain(x, gate_weights, expert_ids))


def test_expert_stacks_holding_part_of_the_experts_give_partial_sums():
    # expert parallelism: a rank holds experts [first, first + local) and passes ids shifted by `first`;
    # the pairs of other ranks' experts add nothing, so the ranks' partial sums add up to the whole
    torch.manual_seed(1)
    block, hidden, inter = (16, 16), 32, 24
    scale_shapes = {"gate_proj": (2, 2), "up_proj": (2, 2), "down_proj": (2, 2)}
    whole = FP8Experts(4, hidden, inter, scale_shapes, block)
    halves = [FP8Experts(2, hidden, inter, scale_shapes, block) for _ in range(2)]
    for name in whole.PROJECTIONS:
        fp8, scale = zip(*(quantize(torch.randn(getattr(whole, name).shape[1:]), block) for _ in range(4)))
        for stack, first in ((whole, 0), (halves[0], 0), (halves[1], 2)):
            getattr(stack, name).copy_(torch.stack(fp8)[first:first + len(stack.gate_proj)])
            getattr(stack, name + "_scale_inv").copy_(torch.stack(scale)[first:first + len(stack.gate_proj)])
            getattr(stack, name + "_row_block").copy_(choose_grid(fp8[0].shape, scale[0].shape, block)[1])
    x = torch.randn(9, hidden)
    gate_weights = torch.rand(9, 2)
    expert_ids = torch.stack([torch.arange(9) % 4, (torch.arange(9) + 3) % 4], dim=1)
    partial = [half.weighted_sum(x, gate_weights, expert_ids - first) for half, first in zip(halves, (0, 2))]
    assert torch.equal(partial[0] + partial[1], whole.weighted_sum(x, gate_weights, expert_ids))  # k = 2: exact
    assert (partial[0][expert_ids.ge(2).all(1)] == 0).all()  # tokens routed only to the other half


def scales_gathered_elementwise(fp8, scale_inv, row_block, col_block_size, dtype, first_col=0):
    """The plain formula apply_scales must equal bit for bit: a full [rows, cols] scale gathered
    element by element (scale row from the grid, scale column from the column's block)."""
    cols = torch.arange(first_col, first_col + fp8.shape[1])
    col_block = cols // col_block_size - first_col // col_block_size
    return (fp8.float() * scale_inv[row_block][:, col_block]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,head_size", [((48, 64), None), ((48, 70), None), ((48, 64), 24), ((5, 9), None)])
@pytest.mark.parametrize("first_col,last_col", [(0, None), (16, 48), (5, 61), (20, 30), (3, 4)])
def test_apply_scales_per_block_equals_the_elementwise_scale(dtype, shape, head_size, first_col, last_col):
    """Whole blocks, a last partial block (70 columns), a per-head grid, a tensor smaller than a
    block, and column slices that start and end on or inside blocks (what a rank reads)."""
    block = 16
    w = torch.randn(shape) * 4 ** torch.randn(shape[0], 1)
    fp8, scale = quantize(w, (block, block), head_size=head_size)
    grid = per_head_rows(shape[0], block, head_size) if head_size else uniform_rows(shape[0], block)
    last_col = min(shape[1] if last_col is None else last_col, shape[1])
    first_col = min(first_col, last_col - 1)
    piece = fp8[:, first_col:last_col]
    piece_scale = scale[:, first_col // block:(last_col - 1) // block + 1]  # the scale columns a rank reads
    out = apply_scales(piece, piece_scale, grid, block, dtype, first_col=first_col)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, scales_gathered_elementwise(piece, piece_scale, grid, block, dtype, first_col))


def test_apply_scales_leaves_its_input_alone():
    fp8, scale = quantize(torch.randn(32, 32), (16, 16))
    before = fp8.clone()
    apply_scales(fp8, scale, uniform_rows(32, 16), 16)
    assert torch.equal(fp8.view(torch.uint8), before.view(torch.uint8))
