"""The attention side of MiMo-V2-Flash, as notebooks 01-03 build it from scratch.

Axes: b batch, t query positions, s key positions, h query heads, g kv heads, r query heads per kv
head (h = g * r), d query/key channels, e value channels, r_dim rotary channels, f frequency pairs.

    rms_norm                  y = w * x / sqrt(mean(x^2) + eps)                       (notebook 00)
    inv_freq, cos_sin, rope   partial RoPE, rotate-half pairs (i, i + r/2)            (notebook 01)
    mask_from_positions       visible(t, s) = 0 <= pos_k <= pos_q and pos_q - pos_k <= W  (02)
    attention_with_sink       GQA softmax attention with one sink column per head     (notebook 02)
    attention_layer           projections, value scale, RoPE, sink attention, o_proj  (notebook 02)
    GrowingCache, RingCache   the plain KV cache and the ring buffer of a window      (notebook 03)

Each is asserted against `minimimo` in the notebook named beside it (notebook 03 also checks RingCache and
GrowingCache slot for slot against `minimimo.cache`). They follow the package's dtype
conventions (statistics and softmax in float32, RoPE angles in float32), so the capstone (06) can
compare whole-model logits with `MiMoForCausalLM` in bfloat16 too.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat


# ---------------------------------------------------------------- RMSNorm (notebook 00)
def rms_norm(x, weight, eps=1e-5):                                 # x [... c], weight [c]
    """Unit root-mean-square per vector, then a learned per-channel weight. The statistics are taken
    in float32 and the result is cast back to x's dtype *before* the weight multiply (Llama order)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# ---------------------------------------------------------------- partial RoPE (notebook 01)
def inv_freq(rotary_dim, theta):                                   # -> [f], f = rotary_dim / 2
    """omega_i = theta^(-2i / rotary_dim): pair 0 turns 1 rad per token, the last pair the slowest."""
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)


def cos_sin(positions, rotary_dim, theta, dtype=torch.float32):    # positions [b t] -> cos, sin [b t r_dim]
    """Angles p * omega_i in float32 (as the official code), repeated for both halves of each pair."""
    frequencies = inv_freq(rotary_dim, theta).to(positions.device)
    angles = rearrange(positions.float(), "b t -> b t 1") * frequencies                # [b t f]
    angles = repeat(angles, "b t f -> b t (two f)", two=2)       # channel i and i + f turn together
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):                                                # [... (two f)]: [x1, x2] -> [-x2, x1]
    x1, x2 = rearrange(x, "... (two f) -> two ... f", two=2)
    return torch.cat([-x2, x1], dim=-1)


def rope(x, cos, sin):                                             # x [b h t d], cos/sin [b t r_dim]
    """Rotate the first r_dim channels of every head (rotate-half pairs); pass the others through."""
    r_dim = cos.shape[-1]
    cos, sin = rearrange(cos, "b t r -> b 1 t r"), rearrange(sin, "b t r -> b 1 t r")
    x_rot, x_pass = x[..., :r_dim], x[..., r_dim:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


# ---------------------------------------------------------------- masks and attention (notebook 02)
def mask_from_positions(q_pos, k_pos, window=None):                # [b t], [b s] -> bool [b t s]
    """Query t sees key s if 0 <= pos_k[s] <= pos_q[t] and, in a sliding layer, pos_q - pos_k <= W:
    the W previous tokens and itself, W + 1 keys. Position -1 (padding, empty slot) is never seen."""
    distance = rearrange(q_pos, "b t -> b t 1") - rearrange(k_pos, "b s -> b 1 s")
    visible = (distance >= 0) & rearrange(k_pos >= 0, "b s -> b 1 s")
    return visible if window is None else visible & (distance <= window)


def ascii_grid(mask):                                              # [t s] bool -> lines, "x" = visible
    return ["".join("x" if v else "." for v in row) for row in mask.tolist()]


def attention_with_sink(q, k, v, visible, sink_logit, scale):
    """q [b (g r) t d], k [b g s d], v [b g s e], visible [b t s], sink_logit [(g r)] or None -> [b (g r) t e].

    GQA without copies: query head h uses kv head h // r through the r axis of one einsum. The sink
    is one more softmax column per head that takes mass and gives no value. As the package does,
    hidden keys get the dtype's most negative number (a row with no visible key, a padding query,
    stays finite) and the softmax runs in float32."""
    g = k.shape[1]
    q = rearrange(q, "b (g r) t d -> b g r t d", g=g)
    scores = torch.einsum("bgrtd,bgsd->bgrts", q, k) * scale
    scores = scores.masked_fill(~rearrange(visible, "b t s -> b 1 1 t s"), torch.finfo(scores.dtype).min)
    if sink_logit is not None:                                     # one extra column per head ...
        sink = repeat(sink_logit.to(scores.dtype), "(g r) -> b g r t 1", g=g, b=q.shape[0], t=q.shape[3])
        scores = torch.cat([scores, sink], dim=-1)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    if sink_logit is not None:                                     # ... that gives no value
        probs = probs[..., :-1]
    out = torch.einsum("bgrts,bgse->bgrte", probs, v)
    return rearrange(out, "b g r t e -> b (g r) t e")


def attention_layer(x, positions, weights, geometry, value_scale, cache=None):
    """One layer's self-attention, x [b t c] -> [b t c].

    weights: {"q_proj", "k_proj", "v_proj", "o_proj": [out, in], "attention_sink_bias": [h] (sliding
    layers only)}, the hub's tensor names without the `self_attn.` prefix and `.weight` suffix.
    geometry: `MiMoConfig.attention(layer)`. cache: a GrowingCache or RingCache for this layer, or None.
    """
    G = geometry
    q = rearrange(x @ weights["q_proj"].T, "b t (h d) -> b h t d", d=G.head_dim)
    k = rearrange(x @ weights["k_proj"].T, "b t (g d) -> b g t d", d=G.head_dim)
    v = rearrange(x @ weights["v_proj"].T, "b t (g e) -> b g t e", e=G.v_head_dim) * value_scale
    cos, sin = cos_sin(positions, G.rotary_dim, G.rope_theta, x.dtype)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k_pos = positions
    if cache is not None:                                          # what this step's queries may read
        k, v, k_pos = cache.update(k, v, positions)
    visible = mask_from_positions(positions, k_pos, G.window)
    out = attention_with_sink(q, k, v, visible, weights.get("attention_sink_bias"), G.head_dim ** -0.5)
    return rearrange(out, "b h t e -> b t (h e)") @ weights["o_proj"].T


# ---------------------------------------------------------------- KV caches (notebook 03)
class GrowingCache:
    """The plain KV cache of a global layer: every token appended, nothing ever dropped.

    One concatenation per step (the package preallocates and grows in chunks instead; the stored
    tensors are the same)."""

    def __init__(self, batch, kv_heads, d, e, dtype=torch.float32):
        self.k = torch.zeros(batch, kv_heads, 0, d, dtype=dtype)             # [b g s d]
        self.v = torch.zeros(batch, kv_heads, 0, e, dtype=dtype)             # [b g s e]
        self.pos = torch.zeros(batch, 0, dtype=torch.long)                   # [b s]

    def update(self, k, v, positions):          # k [b g t d], v [b g t e], positions [b t]
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.pos = torch.cat([self.pos, positions], dim=1)
        return self.k, self.v, self.pos

    def truncate(self, keep):                   # keep [b]: forget every position >= keep
        self.pos[self.pos >= rearrange(keep, "b -> b 1")] = -1

    def nbytes(self):
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class RingCache:
    """The cache of a sliding-window layer: `slots` slots (W, or W + k to roll back k drafts); the
    token at position p lives in slot p % slots and overwrites the token `slots` positions older.

    update() returns the stored slots followed by the new tokens BEFORE writing: a query at p needs
    keys p - W .. p, W + 1 of them, and key p - W sits in the very slot that p is about to take."""

    def __init__(self, batch, kv_heads, slots, d, e, dtype=torch.float32):
        self.slots = slots
        self.k = torch.zeros(batch, kv_heads, slots, d, dtype=dtype)         # [b g slots d]
        self.v = torch.zeros(batch, kv_heads, slots, e, dtype=dtype)         # [b g slots e]
        self.pos = torch.full((batch, slots), -1)                            # [b slots], -1 = empty

    def update(self, k, v, positions):          # k [b g t d], v [b g t e], positions [b t]
        keys = torch.cat([self.k, k], dim=2)                                 # read: stored, then new
        values = torch.cat([self.v, v], dim=2)
        key_pos = torch.cat([self.pos, positions], dim=1)
        newest = slice(-self.slots, None)                                    # older new tokens: never read again
        k, v, positions = k[:, :, newest], v[:, :, newest], positions[:, newest]
        rows, cols = (positions >= 0).nonzero(as_tuple=True)                 # then write; padding (-1) never
        slot = positions[rows, cols] % self.slots
        self.k[rows, :, slot] = k[rows, :, cols]                             # k[b, :, p % slots] = k_new[b, :, t]
        self.v[rows, :, slot] = v[rows, :, cols]
        self.pos[rows, slot] = positions[rows, cols]
        return keys, values, key_pos

    def truncate(self, keep):                   # keep [b]: forget every position >= keep
        self.pos[self.pos >= rearrange(keep, "b -> b 1")] = -1

    def nbytes(self):
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
