"""Multi-token prediction (MTP): three light blocks that draft the tokens after the next one.

MiMo-V2-Flash ships three MTP blocks (`model.mtp.layers.{0,1,2}`, ~0.33B parameters each). Block
k at position q reads two things and predicts token q + k + 2:

    u      = eh_proj( concat[ enorm(embed(t_{q+k+1})), hnorm(h_q) ] )       embedding first
    x      = u + sliding_attention(input_layernorm(u))                        sinks, theta 1e4, own cache
    x      = x + dense_mlp(pre_mlp_layernorm(x))                              SwiGLU, 16384
    logits = lm_head( final_layernorm(x) )                                    the main model's head

* `h_q` is the **main model's** hidden state at q for every block (not the previous block's
  output); by default the residual stream before the final norm (`config.mtp_hidden`).
* The **token** input is chained: block k takes t_{q+k+1}, so at draft time block 0 takes the
  verified next token, block 1 the draft of block 0, block 2 the draft of block 1.
* RoPE uses position q (the hidden state's position) in every block.
* Each block keeps its own sliding-window KV cache (`config.mtp_sliding_window`, default the
  main model's window), position-indexed like the main model's.

There is no per-block embedding or LM head: both are shared with the main model.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .config import MiMoConfig
from .mlp import MLP
from .norm import RMSNorm
from .rope import RopeTables


class MTPBlock(nn.Module):
    def __init__(self, config: MiMoConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.geometry = config.attention(None)
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(h, self.geometry, config.value_scale, config.attention_bias)
        self.pre_mlp_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(h, config.intermediate_size)
        self.final_layernorm = RMSNorm(h, eps)

    def forward(self, token_embedding, main_hidden, cos, sin, positions, kv_cache=None, at: int | None = None):
        """token_embedding, main_hidden [b, t, c] -> normalised output [b, t, c] (feed to lm_head),
        or with `at` only column `at`'s, [b, 1, c]: every position's keys and values still enter
        the cache, but the MLP and the final norm run where a prediction is wanted."""
        u = self.eh_proj(torch.cat([self.enorm(token_embedding), self.hnorm(main_hidden)], dim=-1))
        x = u + self.self_attn(self.input_layernorm(u), cos, sin, positions, kv_cache)
        if at is not None:
            x = x.narrow(1, at % x.shape[1], 1)  # [b, 1, c]
        x = x + self.mlp(self.pre_mlp_layernorm(x))
        return self.final_layernorm(x)


class MTP(nn.Module):
    """The stack of MTP blocks (`model.mtp.layers.k`)."""

    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.layers = nn.ModuleList(MTPBlock(config) for _ in range(config.num_mtp_layers))


def mtp_logits(model, k: int, tokens, main_hidden, positions, kv_cache=None, *, at: int | None = None,
               cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of MTP block k: tokens [b, t] (the t_{q+k+1}), main_hidden [b, t, c] (the h_q,
    already pre- or post-norm as configured), positions [b, t] (the q) -> [b, t, V].

    at=i: only column i's logits, [b, V] (equal to `mtp_logits(...)[:, i]`). Drafting needs one
    prediction per row, at the newest position (the last column: catch-up positions are
    right-aligned), while training needs them all. On MiMo-V2-Flash the LM head (4096 x 152k) and
    the MLP (16384) cost far more per position than the keys and values the cache needs.
    cos_sin: `mtp_rope(model, positions, dtype)` when the caller has it already (the blocks of one
    draft share one table; each takes its columns).
    """
    block, embed, head = model.model.mtp.layers[k], model.model.embed_tokens, model.lm_head
    device = block.enorm.weight.device  # blocks may sit on other devices than the embedding and head
    positions = on_device(positions, device)
    cos, sin = mtp_rope(model, positions, main_hidden.dtype) if cos_sin is None else cos_sin
    token_embedding = on_device(embed(on_device(tokens, embed.weight.device)), device)
    out = block(token_embedding, on_device(main_hidden, device), on_device(cos, device), on_device(sin, device),
                positions, kv_cache, at)
    logits = head(on_device(out, head.weight.device))
    return logits if at is None else logits[:, 0]


def mtp_rope(model, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [b, t, rotary_dim] of the MTP blocks at positions [b, t] (all blocks share one
    geometry: a sliding-window one, rope theta 1e4, like the main model's sliding layers); as
    `RopeTables` makes them, so with its fast path they carry their folded form (`rope.FoldedRope`)."""
    g = model.model.mtp.layers[0].geometry
    return RopeTables(positions, dtype).cos_sin(g.rotary_dim, g.rope_theta)


def on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device`, without a torch call when it is there already (a decode step is bound by calls)."""
    return x if x.device == device else x.to(device)


def mtp_hidden_input(model, h_pre_norm: torch.Tensor) -> torch.Tensor:
    """The main hidden state the blocks read, per `config.mtp_hidden`."""
    if model.config.mtp_hidden == "pre_norm":
        return h_pre_norm
    return model.model.norm(h_pre_norm.to(model.model.norm.weight.device)).to(h_pre_norm.device)
