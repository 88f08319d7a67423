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
"""

import torch
from einops import rearrange


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """positions [b, t] (int) -> cos, sin [b, t, rotary_dim], angles computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim))
    angles = positions.float()[..., None] * inv_freq  # [b, t, rotary_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # both halves of a pair turn by the same angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, t, d]; rotates x[..., :rotary_dim] and passes the rest through unchanged."""
    rotary_dim = cos.shape[-1]
    cos, sin = rearrange(cos, "b t d -> b 1 t d"), rearrange(sin, "b t d -> b 1 t d")
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


class RopeTables:
    """cos/sin for one set of positions, computed once per (rotary_dim, theta, device) and shared
    by every layer that rotates with the same theta (all 9 global layers share one table, all 39
    sliding layers another)."""

    def __init__(self, positions: torch.Tensor, dtype: torch.dtype):
        self.positions, self.dtype, self.tables = positions, dtype, {}

    def cos_sin(self, rotary_dim: int, theta: float, device=None):
        """-> cos, sin [b, t, rotary_dim] for these positions, rotating with `theta`."""
        device = self.positions.device if device is None else device
        key = (rotary_dim, theta, str(device))
        if key not in self.tables:
            self.tables[key] = rope_cos_sin(self.positions.to(device), rotary_dim, theta, self.dtype)
        return self.tables[key]

    def __call__(self, geometry, device=None):
        """The tables for one attention geometry (its rotary_dim and rope_theta)."""
        return self.cos_sin(geometry.rotary_dim, geometry.rope_theta, device)
