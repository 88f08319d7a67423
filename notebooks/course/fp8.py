"""Block FP8 dequantization from scratch, as notebook 07 builds it.

The released checkpoint stores most linear weights as float8_e4m3fn (largest value 448) with one
float32 multiplier per block of b x b weights (b = 128), stored beside the weight as `_scale_inv`:

    W[r, c] = fp8[r, c] * scale_inv[row_block(r), c // b]

For most tensors row_block(r) = r // b. The global-attention k_proj was quantized per kv head: its
blocks restart at every head of D rows, so a head of D = 192 rows is one block of 128 rows and one of
64, and the scale has heads * ceil(D / b) rows (8 for Flash's [768, 4096], not ceil(768/128) = 6):

    row_block(r) = (r // D) * ceil(D / b) + (r % D) // b

    uniform_row_index, per_head_row_index   the two row maps, written out
    expand_scales                           the scale grid blown up to the weight's shape with einops
    dequantize                              fp8 * expanded scales, the grid read off the scale's shape
    blocks_without_448                      the amax test: in the true grid every block holds a 448
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, reduce, repeat

FP8_MAX = 448.0                                                    # largest float8_e4m3fn value


def uniform_row_index(rows, block):                                # -> [rows]
    return torch.arange(rows) // block


def per_head_row_index(rows, block, head_size):                    # -> [rows]; blocks restart per head
    r = torch.arange(rows)
    return (r // head_size) * math.ceil(head_size / block) + (r % head_size) // block


def expand_scales(scale_inv, rows, cols, block, heads=1):
    """scale_inv [(heads R) C] -> [rows cols]: every scale repeated over its b x b block.

    heads = 1 is the uniform grid. With heads > 1 each head's R = ceil(D / b) scale rows cover that
    head's D = rows / heads rows only, so we expand per head, cut each head's last block to D rows,
    and stack the heads again: the einops form of per_head_row_index."""
    b_rows, b_cols = block
    grid = repeat(scale_inv, "(g R) C -> g (R r) (C c)", g=heads, r=b_rows, c=b_cols)
    return rearrange(grid[:, : rows // heads, :cols], "g D n -> (g D) n")


def grid_heads(rows, scale_rows, block_rows, head_size=None):
    """How many row groups the scale's shape implies: 1 (uniform) or rows / head_size (per head)."""
    if scale_rows == math.ceil(rows / block_rows):
        return 1
    if head_size and rows % head_size == 0 and rows // head_size * math.ceil(head_size / block_rows) == scale_rows:
        return rows // head_size
    raise ValueError(f"{scale_rows} scale rows fit neither the uniform grid of {rows} rows "
                     f"({math.ceil(rows / block_rows)} rows) nor a per-head grid (head size {head_size})")


def dequantize(fp8, scale_inv, block, head_size=None, dtype=torch.float32):
    """fp8 [rows cols] + scale_inv -> dense weight; the row grid comes from the scale's shape."""
    rows, cols = fp8.shape
    heads = grid_heads(rows, scale_inv.shape[0], block[0], head_size)
    return (fp8.float() * expand_scales(scale_inv, rows, cols, block, heads)).to(dtype)


def blocks_without_448(fp8, row_index, block_cols):
    """The amax test: how many blocks of the grid `row_index` [rows] have max |fp8| < 448. Each block
    was quantized as scale = amax / 448, so the true grid has none; a wrong one usually has some."""
    magnitude = torch.nn.functional.pad(fp8.float().abs(), (0, -fp8.shape[1] % block_cols))  # partial edge block: 0s
    per_row = reduce(magnitude, "rows (C c) -> rows C", "max", c=block_cols)            # [rows C]
    index = repeat(row_index, "rows -> rows C", C=per_row.shape[1])                      # row -> its block row
    per_block = torch.zeros(int(row_index.max()) + 1, per_row.shape[1]).scatter_reduce(0, index, per_row, "amax")
    return int((per_block < FP8_MAX).sum())
