"""One multi-token-prediction (MTP) block of MiMo-V2-Flash, as notebook 05 builds it from scratch.

Block k at position q reads the MAIN model's hidden state h_q and the embedding of token t_{q+k+1},
and predicts t_{q+k+2}:

    u      = eh_proj [ enorm(embed(t_{q+k+1})) ; hnorm(h_q) ]      embedding first, 2c -> c
    x      = u + sliding_attention(input_layernorm(u))              sinks, theta 1e4, RoPE at q
    x      = x + swiglu(pre_mlp_layernorm(x))                       dense MLP
    logits = lm_head(final_layernorm(x))                            the main model's head, shared

Built from `course.layers` (rms_norm, attention_layer) and `course.moe.swiglu`; asserted against
`minimimo.mtp` in notebook 05 and inside the whole model in notebook 06.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .layers import attention_layer, rms_norm
from .moe import swiglu


def mtp_block(weights, config, token_embedding, main_hidden, positions):
    """token_embedding, main_hidden [b t c], positions [b t] (= q) -> normalised output [b t c].

    weights: one block's tensors by the hub's names without the `model.mtp.layers.k.` prefix
    (`enorm.weight`, `eh_proj.weight`, `self_attn.q_proj.weight`, ...)."""
    W, eps = weights, config.layernorm_epsilon
    both = torch.cat([rms_norm(token_embedding, W["enorm.weight"], eps),
                      rms_norm(main_hidden, W["hnorm.weight"], eps)], dim=-1)          # [b t 2c]
    u = both @ W["eh_proj.weight"].T                                                    # [b t c]
    attention = {name: W[f"self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    attention["attention_sink_bias"] = W.get("self_attn.attention_sink_bias")
    x = u + attention_layer(rms_norm(u, W["input_layernorm.weight"], eps), positions, attention,
                            config.attention(None), config.value_scale)
    y = rearrange(rms_norm(x, W["pre_mlp_layernorm.weight"], eps), "b t c -> (b t) c")
    x = x + rearrange(swiglu(y, W["mlp.gate_proj.weight"], W["mlp.up_proj.weight"], W["mlp.down_proj.weight"]),
                      "(b t) c -> b t c", b=x.shape[0])
    return rms_norm(x, W["final_layernorm.weight"], eps)


def block_weights(weights, k):
    """The tensors of MTP block k, from a {hub name: tensor} dict, with the block prefix removed."""
    prefix = f"model.mtp.layers.{k}."
    return {name[len(prefix):]: tensor for name, tensor in weights.items() if name.startswith(prefix)}


def mtp_logits(weights, config, k, tokens, main_hidden, positions):
    """Logits of block k: tokens [b t] (the t_{q+k+1}), main_hidden [b t c] (h_q, as the block reads
    it), positions [b t] (the q). weights: the whole model's {hub name: tensor}."""
    embedding = weights["model.embed_tokens.weight"][tokens]                            # shared embedding
    out = mtp_block(block_weights(weights, k), config, embedding, main_hidden, positions)
    return out @ weights["lm_head.weight"].T                                            # shared head
