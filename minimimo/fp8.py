"""Block FP8: how the released checkpoint stores its big matrices, and how to undo it.

Most linear weights of MiMo-V2-Flash are stored as `float8_e4m3fn` (4 exponent bits, 3 mantissa
bits, largest value 448) with one float32 multiplier per block of 128 x 128 weights, stored
beside the weight as `<name>_scale_inv`:

    weight[r, c] = float32(fp8[r, c]) * scale_inv[row_block(r), c // 128]

Each block was quantized as `scale_inv = amax(block) / 448`, so in every block of the *true*
grid the largest |fp8| value is exactly 448 ("the amax property").

The grid of rows is not always uniform. The global-attention `k_proj` ([768, 4096]: 4 kv heads
of 192 rows) has a [8, 32] scale, not [6, 32]: the checkpoint was quantized per kv head, so the
128-row blocks restart at every head (rows 0-127 -> scale row 0, 128-191 -> 1, 192-319 -> 2,
...). A loader that assumes uniform 128-row blocks (or 96-row ones, 768 / 8) silently corrupts
three of the four heads. We read the grid off the scale's shape:

* `ceil(rows / b)` scale rows -> uniform grid, `row_block(r) = r // b`;
* `(rows / D) * ceil(D / b)` scale rows for the tensor's head size D -> per-head grid,
  `row_block(r) = (r // D) * ceil(D / b) + (r % D) // b`;
* anything else -> an error naming the tensor. When both rules fit the shape but disagree, the
  amax property decides.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def uniform_rows(rows: int, block: int) -> torch.Tensor:
    return torch.arange(rows) // block


def per_head_rows(rows: int, block: int, head_size: int) -> torch.Tensor:
    r = torch.arange(rows)
    return (r // head_size) * math.ceil(head_size / block) + (r % head_size) // block


def candidate_grids(rows: int, scale_rows: int, block: int, head_size: int | None) -> dict[str, torch.Tensor]:
    """The row->scale-row maps that explain a scale with `scale_rows` rows."""
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


def choose_grid(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], *,
                head_size: int | None = None, name: str = "weight") -> tuple[str, torch.Tensor]:
    """Pick the row grid that the scale's shape implies; raise when no rule explains it."""
    rows, cols = fp8.shape
    block_r, block_c = block
    if scale_inv.dim() != 2 or scale_inv.shape[1] != math.ceil(cols / block_c):
        raise ValueError(f"{name}_scale_inv: shape {list(scale_inv.shape)} does not fit weight {list(fp8.shape)} "
                         f"with {block_c}-wide column blocks (expected [*, {math.ceil(cols / block_c)}])")
    grids = candidate_grids(rows, scale_inv.shape[0], block_r, head_size)
    if not grids:
        per_head = f" nor the per-head grid (head size {head_size})" if head_size else ""
        raise ValueError(f"{name}_scale_inv: {scale_inv.shape[0]} scale rows for a weight of {rows} rows fit neither "
                         f"the uniform {block_r}-row grid ({math.ceil(rows / block_r)} rows){per_head}")
    if len(grids) > 1:  # both fit the shape: the amax property tells them apart
        misses = {kind: blocks_below_max(fp8, grid, block_c) for kind, grid in grids.items()}
        kind = min(misses, key=misses.get)
        return kind, grids[kind]
    return next(iter(grids.items()))


def dequantize(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], *,
               head_size: int | None = None, dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """fp8 [rows, cols] with scale_inv [scale_rows, ceil(cols / b)] -> dense weight of `dtype`."""
    if fp8.dtype != FP8:
        raise ValueError(f"{name}: has a _scale_inv but is stored as {fp8.dtype}, not float8_e4m3fn")
    if scale_inv.dtype != torch.float32:
        raise ValueError(f"{name}_scale_inv: must be float32, got {scale_inv.dtype}")
    _, row_block = choose_grid(fp8, scale_inv, block, head_size=head_size, name=name)
    return apply_scales(fp8, scale_inv, row_block, block[1], dtype)


def apply_scales(fp8: torch.Tensor, scale_inv: torch.Tensor, row_block: torch.Tensor, col_block_size: int,
                 dtype: torch.dtype = torch.float32, first_col: int = 0) -> torch.Tensor:
    """float32(fp8) * the scale of each element's block (row grid given), rounded to float32.

    For a column slice starting at `first_col`, scale_inv holds the scale columns from the block of
    `first_col` on (what a tensor-parallel rank reads)."""
    cols = torch.arange(first_col, first_col + fp8.shape[1], device=scale_inv.device)
    col_block = cols // col_block_size - first_col // col_block_size
    scale = scale_inv[row_block.to(scale_inv.device)][:, col_block]  # [rows, cols]
    return (fp8.float() * scale).to(dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int], *, head_size: int | None = None):
    """Dense weight -> (fp8, scale_inv), amax/448 per block; `head_size` restarts blocks per head."""
    rows, cols = weight.shape
    row_block = per_head_rows(rows, block[0], head_size) if head_size else uniform_rows(rows, block[0])
    col_block = torch.arange(cols) // block[1]
    n_rb, n_cb = int(row_block.max()) + 1, int(col_block.max()) + 1
    block_id = (row_block[:, None] * n_cb + col_block[None, :]).flatten()
    w = weight.float()
    amax = torch.zeros(n_rb * n_cb).scatter_reduce(0, block_id, w.abs().flatten(), "amax")
    scale_inv = (amax.clamp_min(1e-12) / FP8_MAX).view(n_rb, n_cb)
    fp8 = (w / scale_inv[row_block][:, col_block]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return fp8, scale_inv


class FP8Linear(torch.nn.Module):
    """A linear layer that keeps its weight in FP8 on the device (1 byte per weight instead of 2)
    and dequantizes it strip by strip inside the matmul: each strip of `strip_rows` output rows is
    turned into the activation dtype, multiplied, and dropped, so at most one strip exists in
    high precision at a time. The row grid (uniform, or per head of `head_size` rows) is read off
    the scale's shape as at loading."""

    def __init__(self, in_features: int, out_features: int, scale_shape, block: tuple[int, int],
                 head_size: int | None = None, strip_rows: int = 1024):
        super().__init__()
        self.in_features, self.out_features, self.block, self.head_size = in_features, out_features, block, head_size
        self.strip_rows = max(block[0], strip_rows // block[0] * block[0])
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("weight_scale_inv", torch.empty(tuple(scale_shape), dtype=torch.float32))
        self._row_block = None

    def row_block(self) -> torch.Tensor:
        if self._row_block is None:
            grids = candidate_grids(self.out_features, self.weight_scale_inv.shape[0], self.block[0], self.head_size)
            self._row_block = next(iter(grids.values())).to(self.weight.device)
        return self._row_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.row_block()
        outs = []
        for r in range(0, self.out_features, self.strip_rows):
            strip = slice(r, r + self.strip_rows)
            w = apply_scales(self.weight[strip], self.weight_scale_inv, rows[strip], self.block[1], x.dtype)
            outs.append(torch.nn.functional.linear(x, w))
        return torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 block={self.block}"
