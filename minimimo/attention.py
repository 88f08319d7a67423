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
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

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


class Attention(nn.Module):
    """One layer's self-attention; `geometry` says global or sliding, heads, dims and theta."""

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

    def forward(self, x, cos, sin, positions, kv_cache=None):
        """x [b, t, hidden]; cos/sin [b, t, rotary_dim]; positions [b, t] (-1 = padding).

        `kv_cache`, when given, is this layer's cache: it stores the new keys/values and returns
        everything this layer may attend to, with the key positions.
        """
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

    def extra_repr(self) -> str:
        g = self.geometry
        kind = f"sliding window {g.window}" if g.sliding else "global"
        return f"{kind}, heads={g.num_heads}, kv_heads={g.num_kv_heads}, sink={g.has_sink}, theta={g.rope_theta:g}"
