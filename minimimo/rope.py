"""Partial rotary position embedding (RoPE), rotate-half convention.

Only the first `rotary_dim = int(head_dim * partial_rotary_factor)` channels of every query and
key head are rotated (64 of 192 in MiMo-V2-Flash); the other channels carry position-free
content. Inside the rotated slice, channel i is paired with channel i + rotary_dim/2 (the
"rotate-half" or GPT-NeoX layout, not interleaved pairs):

    inv_freq_i = theta^(-2i / rotary_dim),  angle = position * inv_freq_i
    x_rot' = x_rot * cos(angle) + rotate_half(x_rot) * sin(angle)

Global layers use theta = 5,000,000 (long context), sliding-window layers and MTP blocks use
theta = 10,000: a sliding layer never sees a key more than 128 positions away, so it can afford
fast-turning frequencies.

Axes: b batch, t positions, h heads, d channels.

`apply_rope` below is the formula as written. The tables `RopeTables` makes for the model carry a
second form of themselves, `FoldedRope`, that turns a whole head in four torch calls instead of
eleven (a decode step rotates q and k in every layer, and each call costs microseconds of dispatch
whatever its size); `apply_rope` uses it when given such tables, with the same result.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange


@functools.lru_cache(maxsize=None)
def inverse_frequencies(rotary_dim: int, theta: float, device: str) -> torch.Tensor:
    """inv_freq_i = theta^(-2i / rotary_dim), i < rotary_dim / 2 (float32; the same for every step)."""
    with torch.inference_mode(False):  # kept across calls: usable with autograd even if made while generating
        return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """positions [b, t] (int) -> cos, sin [b, t, rotary_dim], angles computed in float32."""
    return cos_sin_of(positions, inverse_frequencies(rotary_dim, theta, str(positions.device)), dtype)


def cos_sin_of(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """`rope_cos_sin` with the frequencies given (`inverse_frequencies`' cached table)."""
    angles = positions.float()[..., None] * inv_freq  # [b, t, rotary_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # both halves of a pair turn by the same angle
    cos, sin = angles.cos(), angles.sin()
    return (cos, sin) if dtype == torch.float32 else (cos.to(dtype), sin.to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, t, d]; rotates x[..., :rotary_dim] and passes the rest through unchanged.

    cos, sin [b, t, rotary_dim]: `rope_cos_sin`'s tables, or `RopeTables`', which run as `FoldedRope`."""
    folded = getattr(cos, "folded", None)
    if folded is not None and getattr(sin, "folded", None) is folded:
        return folded(x)
    rotary_dim = cos.shape[-1]
    cos, sin = rearrange(cos, "b t d -> b 1 t d"), rearrange(sin, "b t d -> b 1 t d")
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


@functools.lru_cache(maxsize=None)
def partner_channels(r: int, d: int, device: str) -> torch.Tensor:
    """[d] channel indices: rotate-half's partner of each rotated channel, itself for the others."""
    with torch.inference_mode(False):  # kept across calls: usable with autograd even if made while generating
        return torch.tensor([*range(r // 2, r), *range(r // 2), *range(r, d)], device=device)


class FoldedRope:
    """`apply_rope` over a whole head in four torch calls, for tables shared by many calls.

    Two rewrites of x_rot * cos + rotate_half(x_rot) * sin, exact in every dtype:
    * rotate_half's minus sign moves into sin: -x2 * sin1 == x2 * (-sin1), so rotate-half becomes
      a fixed permutation of the channels, `partner` = [r/2..r-1, 0..r/2-1];
    * the pass-through channels turn by angle 0: cos 1, sin 0, so x * 1 + x * 0 == x (for finite
      x; an inf there would become nan) and no slicing or concatenation is needed.

        x' = x[..., partner_d] * sin_d + x * cos_d          cos_d, sin_d [b, 1, t, d]

    The head-wide tables are built once per head size d from the [b, t, r] ones (one pair per
    theta and step in the model, used by q and k of every layer with that theta)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, whole: "FoldedRope | None" = None):
        self.cos, self.sin, self.by_width = cos, sin, {}
        self.whole = whole  # the tables these are the last columns of (`last_columns`), or None

    def tables(self, d: int):
        """-> cos_d, sin_d [b, 1, t, d] and partner_d [d] for heads of d channels."""
        if d not in self.by_width and self.whole is not None:  # views of the whole tables' columns
            t = self.cos.shape[1]
            cos_d, sin_d, partner = self.whole.tables(d)
            self.by_width[d] = (cos_d[:, :, -t:], sin_d[:, :, -t:], partner)
        if d not in self.by_width:
            cos, sin, r = self.cos, self.sin, self.cos.shape[-1]
            passed = cos.new_zeros(*cos.shape[:-1], d - r)  # [b, t, d - r]: angle 0
            cos_d = torch.cat((cos, passed + 1), dim=-1)
            sin_d = torch.cat((-sin[..., :r // 2], sin[..., r // 2:], passed), dim=-1)
            self.by_width[d] = (rearrange(cos_d, "b t d -> b 1 t d"), rearrange(sin_d, "b t d -> b 1 t d"),
                                partner_channels(r, d, str(cos.device)))
        return self.by_width[d]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, h, t, d] -> x rotated, as `apply_rope(x, self.cos, self.sin)`."""
        cos_d, sin_d, partner = self.tables(x.shape[-1])
        return x.index_select(-1, partner) * sin_d + x * cos_d  # this order: the result is contiguous, as cat's


def last_columns(cos: torch.Tensor, sin: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables [b, T, r] of the last t positions, [b, t, r]; folded ones stay folded (their
    head-wide tables are sliced, not rebuilt)."""
    cos_t, sin_t = cos[:, -t:], sin[:, -t:]
    folded = getattr(cos, "folded", None)
    if folded is not None and getattr(sin, "folded", None) is folded:
        cos_t.folded = sin_t.folded = FoldedRope(cos_t, sin_t, whole=folded)
    return cos_t, sin_t


class RopeTables:
    """cos/sin for one set of positions, computed once per (rotary_dim, theta, device) and shared
    by every layer that rotates with the same theta (all 9 global layers share one table, all 39
    sliding layers another)."""

    use_folded = True  # False: plain tables, which `apply_rope` applies as written (the reference)

    def __init__(self, positions: torch.Tensor, dtype: torch.dtype):
        self.positions, self.dtype, self.tables = positions, dtype, {}

    def cos_sin(self, rotary_dim: int, theta: float, device=None):
        """-> cos, sin [b, t, rotary_dim] for these positions, rotating with `theta`; with
        `use_folded`, both carry their `FoldedRope` as `.folded` (which `apply_rope` then runs)."""
        device = self.positions.device if device is None else device
        key = (rotary_dim, theta, str(device))
        if key not in self.tables:
            positions = self.positions if self.positions.device == torch.device(device) else self.positions.to(device)
            cos, sin = rope_cos_sin(positions, rotary_dim, theta, self.dtype)
            if self.use_folded:
                cos.folded = sin.folded = FoldedRope(cos, sin)
            self.tables[key] = cos, sin
        return self.tables[key]

    def __call__(self, geometry, device=None):
        """The tables for one attention geometry (its rotary_dim and rope_theta)."""
        return self.cos_sin(geometry.rotary_dim, geometry.rope_theta, device)
