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
from .rope import rope_cos_sin


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

    def forward(self, token_embedding, main_hidden, cos, sin, positions, kv_cache=None):
        """token_embedding, main_hidden [b, t, c] -> normalised output [b, t, c] (feed to lm_head)."""
        u = self.eh_proj(torch.cat([self.enorm(token_embedding), self.hnorm(main_hidden)], dim=-1))
        x = u + self.self_attn(self.input_layernorm(u), cos, sin, positions, kv_cache)
        x = x + self.mlp(self.pre_mlp_layernorm(x))
        return self.final_layernorm(x)


class MTP(nn.Module):
    """The stack of MTP blocks (`model.mtp.layers.k`)."""

    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.layers = nn.ModuleList(MTPBlock(config) for _ in range(config.num_mtp_layers))


def mtp_logits(model, k: int, tokens, main_hidden, positions, kv_cache=None) -> torch.Tensor:
    """Logits of MTP block k: tokens [b, t] (the t_{q+k+1}), main_hidden [b, t, c] (the h_q,
    already pre- or post-norm as configured), positions [b, t] (the q)."""
    block, embed = model.model.mtp.layers[k], model.model.embed_tokens
    device = block.enorm.weight.device  # blocks may sit on other devices than the embedding and head
    positions = positions.to(device)
    g = block.geometry  # a sliding-window geometry: rope theta 1e4, like the main model's sliding layers
    cos, sin = rope_cos_sin(positions, g.rotary_dim, g.rope_theta, main_hidden.dtype)
    token_embedding = embed(tokens.to(embed.weight.device)).to(device)
    out = block(token_embedding, main_hidden.to(device), cos, sin, positions, kv_cache)
    return model.lm_head(out.to(model.lm_head.weight.device))


def mtp_hidden_input(model, h_pre_norm: torch.Tensor) -> torch.Tensor:
    """The main hidden state the blocks read, per `config.mtp_hidden`."""
    if model.config.mtp_hidden == "pre_norm":
        return h_pre_norm
    return model.model.norm(h_pre_norm.to(model.model.norm.weight.device)).to(h_pre_norm.device)
