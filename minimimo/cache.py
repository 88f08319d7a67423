"""The hybrid KV cache: full history for the 9 global layers, a ring buffer for the 39 sliding ones.

Axes: b batch, g kv heads, s cache slots, d key channels, e value channels.

A sliding-window layer never looks more than `W = sliding_window_size` tokens back, so it keeps
exactly W slots and overwrites the oldest: the token at position p lives in slot p % W. A global
layer keeps every position, in buffers preallocated in chunks (never re-concatenated per step).

Every slot also stores the *position* of the token in it (-1 = empty or padding). Attention
builds its mask from positions (`attention.visibility_mask`), so the slot order does not matter:
a wrapped ring buffer, a batch with left padding and a prefill longer than the window all use
the same mask rule, and nothing is ever shifted.

Memory per sequence in bf16 for MiMo-V2-Flash (`MiMoConfig.kv_cache_bytes`):
    global:  9 layers x 4 kv heads x (192 + 128) x 2 B = 23,040 B per token, growing with context
    sliding: 39 layers x 8 kv heads x (192 + 128) x 2 B x 128 slots = 25.6 MB, constant
"""

from __future__ import annotations

import torch

from .config import AttentionGeometry, MiMoConfig


class GlobalLayerCache:
    """All positions, appended column by column into buffers that grow by `chunk` slots."""

    def __init__(self, geometry: AttentionGeometry, batch: int, dtype, device, capacity: int, chunk: int = 256):
        self.g, self.batch, self.dtype, self.device, self.chunk = geometry, batch, dtype, device, chunk
        self.k = torch.empty(batch, geometry.num_kv_heads, capacity, geometry.head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch, geometry.num_kv_heads, capacity, geometry.v_head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.length = 0  # filled columns

    def _grow(self, needed: int) -> None:
        capacity = self.k.shape[2]
        if needed <= capacity:
            return
        new = -(-needed // self.chunk) * self.chunk
        pad = new - capacity
        self.k = torch.cat([self.k, self.k.new_empty(*self.k.shape[:2], pad, self.k.shape[3])], dim=2)
        self.v = torch.cat([self.v, self.v.new_empty(*self.v.shape[:2], pad, self.v.shape[3])], dim=2)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.batch, pad), -1)], dim=1)

    def update(self, k, v, positions):
        """k [b, g, t, d], v [b, g, t, e], positions [b, t] -> all keys, values, key positions."""
        t = k.shape[2]
        self._grow(self.length + t)
        end = self.length + t
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.pos[:, self.length:end] = positions
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:, :end]

    def truncate(self, keep: torch.Tensor) -> None:
        """Forget every position >= keep[b] (per row): rollback for rejected speculative tokens."""
        self.pos[self.pos >= keep[:, None]] = -1

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class RingLayerCache:
    """Exactly W slots; the token at position p lives in slot p % W."""

    def __init__(self, geometry: AttentionGeometry, batch: int, dtype, device):
        w = geometry.window
        if not w:
            raise ValueError("a ring cache needs sliding_window_size >= 1")
        self.g, self.window = geometry, w
        self.k = torch.zeros(batch, geometry.num_kv_heads, w, geometry.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, geometry.num_kv_heads, w, geometry.v_head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, w), -1, dtype=torch.long, device=device)

    def update(self, k, v, positions):
        """Returns the W stored slots followed by the t new tokens (queries of this step may need
        keys that the write below overwrites), then stores the newest W tokens in their slots."""
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        key_pos = torch.cat([self.pos, positions], dim=1)
        newest = slice(max(0, k.shape[2] - self.window), None)  # older ones are out of every later window
        k_new, v_new, p_new = k[:, :, newest], v[:, :, newest], positions[:, newest]
        slot = p_new.remainder(self.window)  # padding (-1) lands in slot W-1 with position -1: invisible
        self.pos.scatter_(1, slot, p_new)
        self.k.scatter_(2, slot[:, None, :, None].expand_as(k_new), k_new)
        self.v.scatter_(2, slot[:, None, :, None].expand_as(v_new), v_new)
        return keys, values, key_pos

    def truncate(self, keep: torch.Tensor) -> None:
        """Forget positions >= keep[b]. The slots they overwrote are gone: use `snapshot`/`restore`
        around a speculative step, which is what MTP verification does."""
        self.pos[self.pos >= keep[:, None]] = -1

    def snapshot(self):
        return self.k.clone(), self.v.clone(), self.pos.clone()

    def restore(self, state) -> None:
        self.k, self.v, self.pos = (t.clone() for t in state)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class HybridCache:
    """One cache per decoder layer: ring buffers for sliding layers, growing buffers for global ones.

    `max_length` preallocates the global layers (e.g. prompt + new tokens); without it they grow
    in chunks of `chunk` tokens.
    """

    def __init__(self, config: MiMoConfig, batch: int = 1, *, dtype=torch.float32, device="cpu",
                 max_length: int | None = None, chunk: int = 256):
        self.config = config
        self.layers = []
        for i in range(config.num_hidden_layers):
            g = config.attention(i)
            if g.window is not None:
                self.layers.append(RingLayerCache(g, batch, dtype, device))
            else:
                self.layers.append(GlobalLayerCache(g, batch, dtype, device, max_length or chunk, chunk))
        self.next_positions = torch.zeros(batch, dtype=torch.long, device=device)  # per row

    def layer(self, i: int):
        return self.layers[i]

    @property
    def next_position(self) -> int:
        return int(self.next_positions.max())

    def advance(self, positions: torch.Tensor) -> None:
        self.next_positions = torch.maximum(self.next_positions, positions.max(dim=1).values + 1)

    def nbytes(self) -> int:
        """Bytes of keys and values actually allocated (position bookkeeping not included)."""
        return sum(layer.nbytes() for layer in self.layers)
