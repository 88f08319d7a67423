"""Attention of MiMo-V2-Flash: GQA, partial RoPE, value scale, sliding window and attention sinks.

Axes: b batch, t query positions, s key positions, h query heads, g kv heads,
r query heads per kv head (h = g * r), d query/key channels, e value channels.

Four things make it different from a textbook attention:

1. **Two geometries.** Global layers have 4 kv heads and see every previous token; the 39
   sliding-window layers have 8 kv heads and see only the last `window` tokens plus themselves
   (window = 128, so 129 keys). The query heads (64) and head dims (192 for q/k, 128 for v) are
   the same in both.
2. **Value scale.** v is multiplied by `attention_value_scale` (0.707 ~ sqrt(4096 / (64*128)))
   before attention, in every layer.
3. **Attention sink.** Sliding layers learn one logit per query head, `attention_sink_bias`, that
   joins the softmax as an extra key with no value:

       p_ts = exp(a_ts) / (exp(sink_h) + sum_s' exp(a_ts'))

   so a head can put attention mass "nowhere" instead of being forced onto the few keys its
   window holds. The probabilities over real keys then sum to less than one.
4. **Masks from positions.** Visibility is decided from the *positions* of queries and keys
   (key position -1 marks an empty cache slot or a padding token), so the same code serves a
   full forward, a ring-buffer cache and a batch with left padding:

       visible(t, s) = 0 <= pos_k[s] <= pos_q[t]  and  pos_q[t] - pos_k[s] <= window

   Window 3, positions 0..5 ("x" = visible):
       q0  x . . . . .
       q1  x x . . . .
       q2  x x x . . .
       q3  x x x x . .
       q4  . x x x x .
       q5  . . x x x x

**Two ways to compute it.** `visibility_mask` and `sink_attention` below are the formulas as
written (the reference the notebooks teach). `Attention.use_sdpa` (the default) computes the same
attention in fewer torch calls: `sdpa_attention` takes an *additive* mask (0 where visible, the
dtype's lowest value where not) that `SharedMasks` builds once per forward pass and key layout
instead of once per layer. A decode step is bound by per-call overhead (each torch call costs
microseconds whatever its size), so calls, not flops, are what the fast path saves.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .cache import PositionFacts
from .config import AttentionGeometry
from .rope import apply_rope


def visibility_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [b, t], k_pos [b, s] -> bool [b, t, s], True where query t may look at key s."""
    distance = rearrange(q_pos, "b t -> b t 1") - rearrange(k_pos, "b s -> b 1 s")
    visible = (distance >= 0) & rearrange(k_pos >= 0, "b s -> b 1 s")
    if window is not None:
        visible &= distance <= window
    return visible


def sink_attention(
    q: torch.Tensor,  # [b, h, t, d]
    k: torch.Tensor,  # [b, g, s, d]
    v: torch.Tensor,  # [b, g, s, e]
    visible: torch.Tensor,  # [b, t, s] bool
    sink_logit: torch.Tensor | None,  # [h] or None
    scale: float,
) -> torch.Tensor:
    """Softmax attention with an optional per-head sink column. Returns [b, h, t, e].

    The scores are computed in the activation dtype, the sink logit is appended as one more
    column, the row max is subtracted (in the activation dtype, as the official code does), and
    the exponentials and their sum are taken in float32.
    """
    g = k.shape[1]
    q = rearrange(q, "b (g r) t d -> b g r t d", g=g)  # keep the group axis: no repeated keys
    scores = torch.einsum("bgrtd,bgsd->bgrts", q, k) * scale
    masked = ~rearrange(visible, "b t s -> b 1 1 t s")
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    if sink_logit is not None:  # the sink: one more key with this logit, which takes mass and gives no value
        sink = rearrange(sink_logit.to(scores.dtype), "(g r) -> 1 g r 1 1", g=g)
        scores = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
    probs = probs[..., :k.shape[2]]  # drop the sink's column: its value would be zero
    out = torch.einsum("bgrts,bgse->bgrte", probs, v)
    return rearrange(out, "b g r t e -> b (g r) t e")


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [b, t, s] -> [b, 1, t, s] in `dtype`: 0 where visible, the dtype's lowest finite value where not.

    The lowest finite value and not -inf, as in `sink_attention`: a query that sees no key at all
    (a padding query) then gets the same finite, never-read output as the reference, not 0/0 = NaN.
    """
    mask = torch.where(visible, 0.0, torch.finfo(dtype).min)
    return (mask if mask.dtype == dtype else mask.to(dtype))[:, None]


def sdpa_attention(
    q: torch.Tensor,  # [b, h, t, d]
    k: torch.Tensor,  # [b, g, s, d]
    v: torch.Tensor,  # [b, g, s, e]
    mask: torch.Tensor,  # [b, 1, t, s] additive: 0 = visible (`additive_mask`)
    sink_logit: torch.Tensor | None,  # [h] or None
    scale: float,
    fused: bool | None = None,
) -> torch.Tensor:
    """`sink_attention` on an additive mask, in fewer torch calls. Returns [b, h, t, e].

    `fused` (default: off the CPU) calls torch's `scaled_dot_product_attention`, the sink being
    one more key: a zero key (score 0) whose mask entry is the sink logit, with a zero value, so
    the softmax denominator gains exp(sink_h) and the output nothing. On the CPU torch has a fused
    kernel only when keys and values have the same head dim, which MiMo's do not (192 and 128);
    its generic path repeats every kv head r times and rescales all keys on each call, slower
    here than the reference. So the CPU computes the two products itself, as `sink_attention`
    does, with its roundings (float32: the same to the last bits; bfloat16: scores in bf16, the
    row max subtracted in bf16, the exponentials summed in float32), in half the calls.
    """
    b, h, t, d = q.shape
    g, s = k.shape[1], k.shape[2]
    if fused is None:
        fused = q.device.type != "cpu"
    if fused:
        if sink_logit is not None:
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))  # [b, g, s + 1, d|e]: zero key, zero value
            sink = sink_logit.to(mask.dtype).view(1, h, 1, 1).expand(b, h, t, 1)
            mask = torch.cat([mask.expand(b, h, t, s), sink], dim=-1)  # [b, h, t, s + 1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    scores = torch.matmul(q.reshape(b, g, h // g * t, d), k.transpose(2, 3))  # [b, g, (r t), s]: no repeated keys
    scores = scores.view(b, h, t, s)  # head (g r) read kv head g
    if scores.dtype == torch.float32:  # mask + scale * scores in one call: the reference's scores * scale
        scores = torch.add(mask, scores, alpha=scale)  # where visible (0 + x is exact), the lowest value where not
    else:  # add would first round alpha to the (16-bit) dtype
        scores = scores * scale + mask
    if sink_logit is not None:  # the sink: one more column with its logit
        sink = sink_logit if sink_logit.dtype == scores.dtype else sink_logit.to(scores.dtype)
        scores = torch.cat([scores, sink.view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1)
    if scores.dtype != torch.float32:  # in float32 softmax subtracts the same max with the same rounding
        scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    if sink_logit is not None:
        probs = probs[..., :s]  # drop the sink's column: its value would be zero
    if probs.dtype != v.dtype:
        probs = probs.to(v.dtype)
    return torch.matmul(probs.view(b, g, h // g * t, s), v).view(b, h, t, v.shape[-1])


def split_heads(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """[b, t, (heads dim)] -> [b, heads, t, dim] as a view, `rearrange(x, "b t (h d) -> b h t d")`.
    One call instead of two when t = 1 (a decode step), where the transpose moves nothing."""
    b, t, _ = x.shape
    return x.view(b, heads, 1, dim) if t == 1 else x.view(b, t, heads, dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, h, t, e] -> [b, t, (h e)], `rearrange(x, "b h t e -> b t (h e)")`; one view when t = 1
    and x is contiguous (what `sdpa_attention` returns)."""
    b, h, t, e = x.shape
    if t == 1 and x.is_contiguous():
        return x.view(b, 1, h * e)
    return x.transpose(1, 2).reshape(b, t, h * e)


class SharedMasks:
    """What every attention layer of one forward pass needs and can share: the query positions per
    device, the additive masks per key layout, and the cache-write facts (`PositionFacts`).

    `MiMoForCausalLM.trunk` makes one per forward pass and hands it to all its layers, so a mask
    is built once per (window, key layout, device, dtype) instead of once per layer (48 times).

    Why two layers may share a mask: a mask is a function of the query positions (the same for
    every layer of one pass), the window and the key positions. Two layers that look up the same
    key get the same key positions: within one pass every layer's cache belongs to one
    `HybridCache`, whose ring layers (one window, the same W + reserve slots) have received the
    same writes and truncations and so hold the same positions slot for slot (their keys and
    values differ, their positions do not), and whose global layers likewise hold the same
    positions (0 .. length-1 written or empty); without a cache the keys are the queries. The
    lookup key separates the rest: the window (None for global layers), the number of key slots
    (a ring's W + reserve + t against a global buffer's length), the device (layers placed on
    several devices) and the dtype. Caches with their own histories (the MTP blocks') must not
    share one: `Attention` builds a private one when given none.
    """

    def __init__(self, positions: torch.Tensor):
        self.positions = positions  # [b, t], -1 = padding
        self.facts = PositionFacts(positions)
        self.on_device = {positions.device: positions}
        self.masks = {}

    def positions_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.on_device:
            self.on_device[device] = self.positions.to(device)
        return self.on_device[device]

    def mask(self, k_pos: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [b, 1, t, s] for key positions k_pos [b, s] (`additive_mask`)."""
        key = (window, k_pos.shape[1], k_pos.device, dtype)
        if key not in self.masks:
            self.masks[key] = additive_mask(visibility_mask(self.positions_on(k_pos.device), k_pos, window), dtype)
        return self.masks[key]


class Attention(nn.Module):
    """One layer's self-attention; `geometry` says global or sliding, heads, dims and theta."""

    use_sdpa = True  # False: always `visibility_mask` + `sink_attention` (the reference)

    def __init__(self, hidden_size: int, geometry: AttentionGeometry, value_scale: float, bias: bool = False):
        super().__init__()
        g = geometry
        self.geometry = g
        self.value_scale = value_scale
        self.scale = g.head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, g.num_heads * g.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, g.num_kv_heads * g.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, g.num_kv_heads * g.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(g.num_heads * g.v_head_dim, hidden_size, bias=False)
        self.attention_sink_bias = nn.Parameter(torch.zeros(g.num_heads)) if g.has_sink else None

    def forward(self, x, cos, sin, positions, kv_cache=None, shared: SharedMasks | None = None):
        """x [b, t, hidden]; cos/sin [b, t, rotary_dim]; positions [b, t] (-1 = padding).

        `kv_cache`, when given, is this layer's cache: it stores the new keys/values and returns
        everything this layer may attend to, with the key positions. `shared`: the masks of this
        forward pass, shared with the other layers (see `SharedMasks` for when that is valid).
        """
        if self.use_sdpa:
            return self.forward_sdpa(x, cos, sin, positions, kv_cache, shared)
        g = self.geometry
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=g.head_dim)
        k = rearrange(self.k_proj(x), "b t (g d) -> b g t d", d=g.head_dim)
        v = rearrange(self.v_proj(x), "b t (g e) -> b g t e", e=g.v_head_dim) * self.value_scale
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v, k_pos = kv_cache.update(k, v, positions)
        else:
            k_pos = positions
        visible = visibility_mask(positions, k_pos, g.window)
        out = sink_attention(q, k, v, visible, self.attention_sink_bias, self.scale)
        return self.o_proj(rearrange(out, "b h t e -> b t (h e)"))

    def forward_sdpa(self, x, cos, sin, positions, kv_cache=None, shared: SharedMasks | None = None):
        """`forward` with `sdpa_attention` on a shared additive mask: the same result (float32 and
        bfloat16 on the CPU: the same roundings; tests/test_fast_attention.py)."""
        g = self.geometry
        shared = SharedMasks(positions) if shared is None else shared
        q = split_heads(self.q_proj(x), g.num_heads, g.head_dim)  # [b, h, t, d]
        k = split_heads(self.k_proj(x), g.num_kv_heads, g.head_dim)  # [b, g, t, d]
        v = split_heads(self.v_proj(x), g.num_kv_heads, g.v_head_dim) * self.value_scale  # [b, g, t, e]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v, k_pos = kv_cache.update(k, v, positions, shared.facts)
        else:
            k_pos = positions
        mask = shared.mask(k_pos, g.window, q.dtype)  # [b, 1, t, s], built by the first layer that asks
        out = sdpa_attention(q, k, v, mask, self.attention_sink_bias, self.scale)  # [b, h, t, e]
        return self.o_proj(merge_heads(out))

    def extra_repr(self) -> str:
        g = self.geometry
        kind = f"sliding window {g.window}" if g.sliding else "global"
        return f"{kind}, heads={g.num_heads}, kv_heads={g.num_kv_heads}, sink={g.has_sink}, theta={g.rope_theta:g}"
