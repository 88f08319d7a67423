"""Block FP8: how the released checkpoint stores its big matrices, and how to undo it.

Most linear weights of MiMo-V2-Flash are stored as `float8_e4m3fn` (4 exponent bits, 3 mantissa
bits, largest value 448) with one float32 multiplier per block of 128 x 128 weights, stored
beside the weight as `<name>_scale_inv`:

    weight[r, c] = float32(fp8[r, c]) * scale_inv[row_block[r], c // 128]

Each block was quantized as `scale_inv = amax(block) / 448`, so in every block of the *true*
grid the largest |fp8| value is exactly 448 ("the amax property").

The grid of rows is not always uniform. The global-attention `k_proj` ([768, 4096]: 4 kv heads
of 192 rows) has a [8, 32] scale, not [6, 32]: the checkpoint was quantized per kv head, so the
128-row blocks restart at every head (rows 0-127 -> scale row 0, 128-191 -> 1, 192-319 -> 2,
...). A loader that assumes uniform 128-row blocks (or 96-row ones, 768 / 8) silently corrupts
three of the four heads. `choose_grid` reads the grid off the scale's shape:

* `ceil(rows / b)` scale rows -> uniform grid, `row_block[r] = r // b`;
* `(rows / D) * ceil(D / b)` scale rows for the tensor's head size D -> per-head grid,
  `row_block[r] = (r // D) * ceil(D / b) + (r % D) // b`;
* anything else -> an error naming the tensor. When both rules fit the shape but disagree (head
  size below the block: 2 heads of 24 rows with b = 32 need 2 scale rows either way), the amax
  property decides.

That is the only place the grid is decided. Its answer, the index `row_block` (one scale row per
weight row), is kept with the weight: `FP8Linear` and `FP8Experts` hold it as a buffer beside the
FP8 weight and its scale, and every matmul uses it. A slice of the weight's rows takes the same
slice of its `row_block`, so a shard of an FP8 weight still knows its scale rows.

`FP8Linear` and `FP8Experts` are what the loader swaps in (`load(..., weight_dtype="fp8")`) for a
linear layer or a stack of experts whose checkpoint tensors are FP8: one byte per weight on the
device, dequantized into the activation dtype inside the matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from .moe import Experts

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
ROW_BLOCK_SUFFIX = "_row_block"  # `<weight>_row_block`: the weight's row -> scale row index, kept beside it
ROW_BLOCK_DTYPE = torch.int32  # 4 bytes per weight row (the planner counts them)


def uniform_rows(rows: int, block: int) -> torch.Tensor:
    """row -> scale row when blocks of `block` rows run through the whole tensor."""
    return torch.arange(rows) // block


def per_head_rows(rows: int, block: int, head_size: int) -> torch.Tensor:
    """row -> scale row when blocks of `block` rows restart at every head of `head_size` rows."""
    r = torch.arange(rows)
    return (r // head_size) * math.ceil(head_size / block) + (r % head_size) // block


def row_grid(rows: int, block: int, head_size: int | None = None) -> torch.Tensor:
    """The grid a weight is quantized on: per head when `head_size` is given, else uniform."""
    return per_head_rows(rows, block, head_size) if head_size else uniform_rows(rows, block)


@lru_cache(maxsize=None)
def scale_shape(shape: tuple[int, int], block: tuple[int, int], head_size: int | None = None) -> tuple[int, int]:
    """The `_scale_inv` shape of a weight quantized on `row_grid(rows, block[0], head_size)`."""
    rows, cols = shape
    return int(row_grid(rows, block[0], head_size).max()) + 1, math.ceil(cols / block[1])


def candidate_grids(rows: int, scale_rows: int, block: int, head_size: int | None) -> dict[str, torch.Tensor]:
    """The row grids that explain a scale with `scale_rows` rows (the per-head one only when it differs)."""
    grids = {}
    if math.ceil(rows / block) == scale_rows:
        grids["uniform"] = uniform_rows(rows, block)
    if head_size and rows % head_size == 0 and (rows // head_size) * math.ceil(head_size / block) == scale_rows:
        grid = per_head_rows(rows, block, head_size)
        if "uniform" not in grids or not torch.equal(grid, grids["uniform"]):
            grids["per-head"] = grid
    return grids


def blocks_below_max(fp8: torch.Tensor, row_block: torch.Tensor, col_block_size: int) -> int:
    """How many blocks of this grid have max |fp8| < 448 (0 for the true grid)."""
    amax = fp8.float().abs()
    n_rb = int(row_block.max()) + 1
    n_cb = math.ceil(fp8.shape[1] / col_block_size)
    col_block = torch.arange(fp8.shape[1]) // col_block_size
    block_id = (row_block[:, None] * n_cb + col_block[None, :]).flatten()
    per_block = torch.zeros(n_rb * n_cb).scatter_reduce(0, block_id, amax.flatten().cpu(), "amax")
    return int((per_block < FP8_MAX).sum())


def choose_grid(shape, scale_shape, block: tuple[int, int], *, head_size: int | None = None, name: str = "weight",
                fp8: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> tuple[str, torch.Tensor]:
    """The row grid of an FP8 weight: decided here and nowhere else.

    shape, scale_shape: the weight's [rows, cols] and its scale's. The scale's shape decides; when
    two grids fit it, the amax property does, on `fp8` (the weight, or a function that reads it:
    called only then, so a loader reading a slice reads the whole tensor only for such a tie).
    Returns the grid's kind ("uniform" or "per-head") and `row_block` [rows] (row -> scale row);
    raises ValueError naming the tensor when no grid explains the scale."""
    rows, cols = shape
    block_r, block_c = block
    if len(scale_shape) != 2 or scale_shape[1] != math.ceil(cols / block_c):
        raise ValueError(f"{name}_scale_inv: shape {list(scale_shape)} does not fit weight {list(shape)} "
                         f"with {block_c}-wide column blocks (expected [*, {math.ceil(cols / block_c)}])")
    grids = candidate_grids(rows, scale_shape[0], block_r, head_size)
    if not grids:
        per_head = f" nor the per-head grid (head size {head_size})" if head_size else ""
        raise ValueError(f"{name}_scale_inv: {scale_shape[0]} scale rows for a weight of {rows} rows fit neither "
                         f"the uniform {block_r}-row grid ({math.ceil(rows / block_r)} rows){per_head}")
    if len(grids) > 1:  # both fit the shape: the amax property tells them apart
        if fp8 is None:
            raise ValueError(f"{name}: uniform and per-head grids both fit its scale; the weight itself is needed")
        weight = fp8() if callable(fp8) else fp8
        misses = {kind: blocks_below_max(weight, grid, block_c) for kind, grid in grids.items()}
        kind = min(misses, key=misses.get)
        return kind, grids[kind]
    return next(iter(grids.items()))


def apply_scales(fp8: torch.Tensor, scale_inv: torch.Tensor, row_block: torch.Tensor, col_block_size: int,
                 dtype: torch.dtype = torch.float32, first_col: int = 0) -> torch.Tensor:
    """float32(fp8) * the scale of each element's block (row grid given), rounded to `dtype`.

    For a column slice starting at `first_col`, scale_inv holds the scale columns from the block of
    `first_col` on (what a tensor-parallel rank reads).

    The scale is never expanded to [rows, cols]: the row grid picks each row's scales first
    ([rows, column blocks], a small gather), then the weight is viewed as [rows, column blocks,
    b] and each block multiplied by its one scale. A slice that starts or ends inside a block is
    padded to whole blocks for the multiply (the padding is cut off again): same products, same
    result, element for element."""
    rows, cols = fp8.shape
    b = col_block_size
    scale_rows = scale_inv[row_block.to(scale_inv.device)]  # [rows, n_blocks]: per row grid first
    lead = first_col % b  # columns of the first block before the slice starts
    n_blocks = math.ceil((lead + cols) / b)
    if lead == 0 and cols == n_blocks * b:  # whole blocks (every real weight): no padding
        weight = fp8.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # ours to scale in place
    else:
        weight = fp8.new_zeros(rows, n_blocks * b, dtype=torch.float32)
        weight[:, lead:lead + cols] = fp8.float()
    weight.view(rows, n_blocks, b).mul_(scale_rows[:, :n_blocks, None])  # in place: [r, n, b] * [r, n, 1]
    return weight[:, lead:lead + cols].to(dtype).contiguous()


def dequantize(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], *,
               head_size: int | None = None, dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """fp8 [rows, cols] with scale_inv [scale_rows, ceil(cols / b)] -> dense weight of `dtype`."""
    if fp8.dtype != FP8:
        raise ValueError(f"{name}: has a _scale_inv but is stored as {fp8.dtype}, not float8_e4m3fn")
    if scale_inv.dtype != torch.float32:
        raise ValueError(f"{name}_scale_inv: must be float32, got {scale_inv.dtype}")
    _, row_block = choose_grid(fp8.shape, scale_inv.shape, block, head_size=head_size, name=name, fp8=fp8)
    return apply_scales(fp8, scale_inv, row_block, block[1], dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int], *, head_size: int | None = None):
    """Dense weight -> (fp8, scale_inv), amax/448 per block; `head_size` restarts blocks per head."""
    rows, cols = weight.shape
    row_block = row_grid(rows, block[0], head_size)
    col_block = torch.arange(cols) // block[1]
    n_rb, n_cb = int(row_block.max()) + 1, int(col_block.max()) + 1
    block_id = (row_block[:, None] * n_cb + col_block[None, :]).flatten()
    w = weight.float()
    amax = torch.zeros(n_rb * n_cb).scatter_reduce(0, block_id, w.abs().flatten(), "amax")
    scale_inv = (amax.clamp_min(1e-12) / FP8_MAX).view(n_rb, n_cb)
    fp8 = (w / scale_inv[row_block][:, col_block]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return fp8, scale_inv


class FP8Linear(nn.Module):
    """A linear layer that keeps its weight in FP8 on the device (1 byte per weight instead of 2)
    and dequantizes it strip by strip inside the matmul: each strip of `strip_rows` output rows is
    turned into the activation dtype, multiplied, and dropped, so at most one strip exists in
    high precision at a time.

    Buffers, filled by the loader: `weight` [out, in] FP8, `weight_scale_inv` [scale rows, in / b]
    float32 and `weight_row_block` [out] (row -> scale row, from `choose_grid`)."""

    def __init__(self, in_features: int, out_features: int, scale_shape, block: tuple[int, int],
                 strip_rows: int = 1024):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.strip_rows = max(block[0], strip_rows // block[0] * block[0])
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale_inv", torch.empty(tuple(scale_shape), dtype=torch.float32))
        self.register_buffer("weight" + ROW_BLOCK_SUFFIX, torch.empty(out_features, dtype=ROW_BLOCK_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for r in range(0, self.out_features, self.strip_rows):
            strip = slice(r, r + self.strip_rows)
            w = apply_scales(self.weight[strip], self.weight_scale_inv, self.weight_row_block[strip], self.block[1],
                             x.dtype)
            outs.append(F.linear(x, w))
        return torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 block={self.block}"


class FP8Experts(Experts):
    """`Experts` whose three stacked matrices stay FP8 on the device: for each of gate/up/down_proj
    the buffers `<proj>` [e, rows, cols] FP8, `<proj>_scale_inv` [e, scale rows, cols / b] float32
    and `<proj>_row_block` [rows] (one grid for all experts: every expert matrix has the same shape
    and no heads, so `choose_grid` gives them all the uniform grid).

    Only `expert_weights` differs from `Experts`: expert e's matrices are dequantized for the call
    and dropped after it; the sorted dispatch over the experts is `Experts.weighted_sum`."""

    use_grouped_mm = False  # the matrices exist in high precision only one expert at a time

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 scale_shapes: dict[str, tuple[int, int]], block: tuple[int, int]):
        super().__init__(num_experts, hidden_size, intermediate_size)
        self.block = block
        for name in self.PROJECTIONS:  # the float parameters become FP8 buffers
            shape = getattr(self, name).shape
            delattr(self, name)
            self.register_buffer(name, torch.empty(shape, dtype=FP8))
            scales = torch.empty(num_experts, *scale_shapes[name], dtype=torch.float32)
            self.register_buffer(name + "_scale_inv", scales)
            self.register_buffer(name + ROW_BLOCK_SUFFIX, torch.empty(shape[1], dtype=ROW_BLOCK_DTYPE))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(apply_scales(getattr(self, name)[e], getattr(self, name + "_scale_inv")[e],
                                  getattr(self, name + ROW_BLOCK_SUFFIX), self.block[1], dtype)
                     for name in self.PROJECTIONS)

    def extra_repr(self) -> str:
        return f"experts={self.gate_proj.shape[0]}, fp8 block={self.block}"
