"""The hybrid KV cache: full history for the 9 global layers, a ring buffer for the 39 sliding ones.

Axes: b batch, g kv heads, s cache slots, d key channels, e value channels.

Both caches are **indexed by position**. A global layer stores the token at position p in slot p
(buffers grown as tokens arrive, at least doubling each time, never re-concatenated per step). A sliding-window layer
never looks more than `W = sliding_window_size` tokens back, so it keeps W slots and the token at
position p lives in slot p % W, overwriting the token W positions older.

Every slot also records the position it holds (-1 = empty). Attention builds its mask from
positions (`attention.visibility_mask`), so slot order never matters: a wrapped ring buffer, a
batch with left padding (padding tokens have position -1 and are never written), a prefill longer
than the window and rows that advance at different speeds all use one mask rule. Rolling back
speculative tokens is `truncate(keep)`: forget every position >= keep. For the ring to survive
that, it must not have overwritten anything still needed: a ring with `reserve = k` extra slots
(W + k in all) can take a verify block of k + 1 tokens (the verified token + k drafts) and roll
back any of the k drafts (rolling back the first token too would need k + 1 spare slots).

Memory per sequence in bf16 for MiMo-V2-Flash (`MiMoConfig.kv_cache_bytes`):
    global:  9 layers x 4 kv heads x (192 + 128) x 2 B = 23,040 B per token, growing with context
    sliding: 39 layers x 8 kv heads x (192 + 128) x 2 B x 128 slots = 25.6 MB, constant
"""

from __future__ import annotations

from functools import cached_property

import torch

from .config import AttentionGeometry, MiMoConfig


class PositionFacts:
    """Two facts about the positions [b, t] of one forward pass that a cache write needs, each a
    device-to-host sync (`bool`, `int`). Every layer's cache writes the same positions, so a
    forward pass asks once and hands this object to all its layers (48 syncs become one)."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions

    @cached_property
    def all_real(self) -> bool:
        """No padding (no position -1): every token is written, one scatter per tensor."""
        return bool((self.positions >= 0).all())

    @cached_property
    def end(self) -> int:
        """1 + the largest position."""
        return int(self.positions.max()) + 1


class LayerCache:
    """Keys, values and positions in `capacity` slots; subclasses decide slot = f(position)."""

    def __init__(self, geometry: AttentionGeometry, batch: int, capacity: int, dtype, device):
        self.k = torch.zeros(batch, geometry.num_kv_heads, capacity, geometry.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, geometry.num_kv_heads, capacity, geometry.v_head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long, device=device)

    def write(self, k, v, positions, slots, all_real: bool | None = None) -> None:
        """Store the tokens with a position >= 0 (padding is never written) in their slots.
        all_real: `PositionFacts.all_real` of these positions when the caller knows it."""
        if all_real is None:
            all_real = bool((positions >= 0).all())
        if all_real:  # the common case (decode): one scatter per tensor
            index = slots.view(slots.shape[0], 1, slots.shape[1], 1)  # [b, 1, t, 1]
            self.k.scatter_(2, index.expand_as(k), k)
            self.v.scatter_(2, index.expand_as(v), v)
            self.pos.scatter_(1, slots, positions)
            return
        rows, cols = (positions >= 0).nonzero(as_tuple=True)
        slot = slots[rows, cols]
        self.k[rows, :, slot] = k[rows, :, cols]
        self.v[rows, :, slot] = v[rows, :, cols]
        self.pos[rows, slot] = positions[rows, cols]

    def truncate(self, keep: torch.Tensor) -> None:
        """Forget every position >= keep[b] (per row): the rollback of rejected speculative tokens."""
        self.pos.masked_fill_(self.pos >= keep[:, None], -1)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class GlobalLayerCache(LayerCache):
    """Slot = position. Starts empty and grows as positions arrive, never ahead of them.

    A growth step allocates at least twice the old capacity, rounded up to whole `chunk`s (so a
    long decode copies each slot O(1) times on average, not once per chunk), and never more than
    `max_length` slots when that bound is known. Asking for a million new tokens and stopping
    after one therefore holds one chunk, not a million slots.
    """

    def __init__(self, geometry, batch, dtype, device, max_length: int | None = None, chunk: int = 256):
        super().__init__(geometry, batch, 0, dtype, device)
        self.max_length, self.chunk, self.length = max_length, chunk, 0  # length: 1 + largest position seen

    def _grow(self, needed: int) -> None:
        capacity = self.k.shape[2]
        if needed <= capacity:
            return
        new_capacity = -(-max(needed, 2 * capacity) // self.chunk) * self.chunk
        if self.max_length is not None:
            new_capacity = max(needed, min(new_capacity, self.max_length))
        extra = new_capacity - capacity
        self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], extra, self.k.shape[3])], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], extra, self.v.shape[3])], dim=2)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], extra), -1)], dim=1)

    def update(self, k, v, positions, facts: PositionFacts | None = None):
        """k [b, g, t, d], v [b, g, t, e], positions [b, t] -> keys, values, key positions to attend.
        facts: the `PositionFacts` of these positions, shared by the layers of one forward pass."""
        facts = PositionFacts(positions) if facts is None else facts
        self.length = max(self.length, facts.end)
        self._grow(self.length)
        self.write(k, v, positions, positions, facts.all_real)
        return self.k[:, :, :self.length], self.v[:, :, :self.length], self.pos[:, :self.length]


class RingLayerCache(LayerCache):
    """W + reserve slots; the token at position p lives in slot p % (W + reserve)."""

    def __init__(self, geometry: AttentionGeometry, batch: int, dtype, device, reserve: int = 0):
        if not geometry.window:
            raise ValueError("a ring cache needs sliding_window_size >= 1")
        super().__init__(geometry, batch, geometry.window + reserve, dtype, device)
        self.capacity = geometry.window + reserve

    def update(self, k, v, positions, facts: PositionFacts | None = None):
        """Returns the stored slots followed by the t new tokens (queries of this step may need keys
        that the write below overwrites), then stores the newest `capacity` tokens.
        facts: the `PositionFacts` of these positions, shared by the layers of one forward pass."""
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        key_pos = torch.cat([self.pos, positions], dim=1)
        all_real = None if facts is None else facts.all_real  # of all t tokens: then also of the newest
        if k.shape[2] > self.capacity:  # older ones leave every later window
            newest = slice(k.shape[2] - self.capacity, None)
            k, v, positions = k[:, :, newest], v[:, :, newest], positions[:, newest]
            all_real = all_real or None  # False may have been the dropped tokens' padding: ask again
        self.write(k, v, positions, positions.remainder(self.capacity), all_real)
        return keys, values, key_pos


class HybridCache:
    """One cache per decoder layer: ring buffers for sliding layers, growing buffers for global ones.

    The rings (W + reserve slots each) are allocated when the cache is created; the global buffers
    start empty and grow as tokens arrive (`GlobalLayerCache`). max_length (e.g. prompt + new
    tokens) only caps that growth: nothing is reserved for tokens that are never generated.
    reserve adds slots to every ring so that a verify block of `reserve` drafts after a verified
    token can be rolled back (MTP drafting).
    """

    def __init__(self, config: MiMoConfig, batch: int = 1, *, dtype=torch.float32, device="cpu",
                 max_length: int | None = None, chunk: int = 256, reserve: int = 0):
        self.config = config
        self.layers = []
        devices = device if isinstance(device, (list, tuple)) else [device] * config.num_hidden_layers
        for i, layer_device in enumerate(devices):  # one device per layer when the model is placed
            g = config.attention(i)
            if g.window is not None:
                self.layers.append(RingLayerCache(g, batch, dtype, layer_device, reserve))
            else:
                self.layers.append(GlobalLayerCache(g, batch, dtype, layer_device, max_length, chunk))
        self.next_positions = torch.zeros(batch, dtype=torch.long, device=devices[0])  # per row

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    @property
    def next_position(self) -> int:
        return int(self.next_positions.max())

    def advance(self, positions: torch.Tensor) -> None:
        latest = positions.max(dim=1).values.to(self.next_positions.device) + 1
        self.next_positions = torch.maximum(self.next_positions, latest)

    def truncate(self, keep: torch.Tensor) -> None:
        for layer in self.layers:
            layer.truncate(keep.to(layer.pos.device))
        self.next_positions = torch.minimum(self.next_positions, keep.to(self.next_positions.device))

    def nbytes(self) -> int:
        """Bytes of keys and values actually allocated (position bookkeeping not included)."""
        return sum(layer.nbytes() for layer in self.layers)
