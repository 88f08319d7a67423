"""MiMo-V2-Flash assembled: embedding, 48 pre-norm decoder layers, final norm, LM head.

    h_0 = embed_tokens[ids]                                  (no embedding scaling)
    x   = h + attention_L(input_layernorm(h))                 (global or sliding window)
    h   = x + ffn_L(post_attention_layernorm(x))              (dense MLP at layer 0, MoE after)
    logits = lm_head(norm(h_48))                              (lm_head not tied to the embedding)

Parameter names equal the hub's tensor names (`model.layers.3.self_attn.q_proj.weight`, ...),
except that each MoE layer's experts are stacked (`mlp.experts.gate_proj` [e, m, c]) where the
hub stores `mlp.experts.E.gate_proj.weight` one by one; `checkpoint.py` maps between the two.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, SharedMasks
from .config import MiMoConfig
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm
from .mtp import MTP, on_device
from .rope import RopeTables


class DecoderLayer(nn.Module):
    def __init__(self, config: MiMoConfig, layer: int):
        super().__init__()
        self.geometry = config.attention(layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attn = Attention(config.hidden_size, self.geometry, config.value_scale, config.attention_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MoE(config) if config.is_moe(layer) else MLP(config.hidden_size, config.intermediate_size)

    @property
    def device(self) -> torch.device:
        return self.input_layernorm.weight.device

    def forward(self, h, rope: RopeTables, positions, kv_cache=None, shared: SharedMasks | None = None):
        """h [b, t, c] -> h [b, t, c]: a pre-norm attention block, then a pre-norm FFN block.
        shared: what the attention layers of this forward pass share (its masks), see `SharedMasks`."""
        g = self.geometry
        cos, sin = rope.cos_sin(g.rotary_dim, g.rope_theta, h.device)  # theta 5e6 if global, 1e4 if sliding
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, kv_cache, shared)
        return h + self.mlp(self.post_attention_layernorm(h))


class MiMoModel(nn.Module):
    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        if not self.embed_tokens.weight.is_meta:  # nn.Embedding's own N(0, 1) init, but not on meta,
            nn.init.normal_(self.embed_tokens.weight)  # where it would import torch._dynamo (seconds)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mtp = MTP(config)  # empty when the checkpoint has no MTP blocks


class MiMoForCausalLM(nn.Module):
    """The complete main model. `model(input_ids)` -> logits [batch, seq, vocab]."""

    # attached by `minimimo.load` (None on a model built here): what was read, and the memory plan when placed
    load_report: checkpoint.LoadReport | None = None  # noqa: F821 (never evaluated: model.py imports no loader)
    plan: plan.Plan | None = None  # noqa: F821

    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.config = config
        self.model = MiMoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "MiMoForCausalLM":
        """Random but plausible weights (for demos, tests and training from scratch).

        Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ U(0.8, 1.2),
        sinks ~ N(0, 1), a router bias comparable to the spread of the sigmoid scores.
        """
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                new = torch.empty(p.shape).uniform_(0.8, 1.2, generator=gen)
            elif name.endswith("attention_sink_bias") or name.endswith("embed_tokens.weight"):
                new = torch.randn(p.shape, generator=gen)
            elif name.endswith("e_score_correction_bias"):
                new = 0.05 * torch.randn(p.shape, generator=gen)
            else:  # [.., out, in] linear weights, stacked experts included
                new = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
            p.copy_(new.to(p.dtype))
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the residual stream that `trunk` returns."""
        return self.lm_head(self.model.norm(h_last.to(self.model.norm.weight.device)))

    def layer_devices(self) -> list[torch.device]:
        return [layer.device for layer in self.model.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache=None,
        return_hidden_states: bool = False,
    ):
        """input_ids [b, t] -> logits [b, t, vocab] (float of the model's dtype).

        positions [b, t]: absolute token positions (default 0..t-1, or continuing the cache);
        -1 marks a padding token, which no query can see.
        cache: a cache object (see `cache.py`) holding one per-layer cache; the new keys and
        values are appended and only the new tokens' logits are returned.
        return_hidden_states: also return the list of L+1 hidden states, in the official
        convention: [embeddings, output of layer 0, ..., output of layer L-2, final-norm output].
        """
        states = self.trunk(input_ids, positions=positions, cache=cache, keep_all=return_hidden_states)
        states[-1] = self.model.norm(states[-1].to(self.model.norm.weight.device))
        logits = self.lm_head(states[-1])
        return (logits, states) if return_hidden_states else logits

    def trunk(self, input_ids, *, positions=None, cache=None, keep_all=False) -> list[torch.Tensor]:
        """The embedding and the decoder layers, one loop, no final norm.

        Returns [h_last] (the residual stream the MTP blocks read and `logits` finishes), or with
        keep_all [embeddings, output of layer 0, ..., output of layer L-1].
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.config.vocab_size)
        b, t = input_ids.shape
        if positions is None:
            start = 0 if cache is None else cache.next_position
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        embed = self.model.embed_tokens
        h = embed(on_device(input_ids, embed.weight.device))  # [b, t, c]
        rope = RopeTables(positions, h.dtype)  # cos/sin computed once per theta, shared by the layers
        shared = SharedMasks(positions)  # masks built once per key layout, shared by the layers
        states = [h] if keep_all else []
        for i, layer in enumerate(self.model.layers):
            h = on_device(h, layer.device)  # layers placed on several devices: the activations follow
            h = layer(h, rope, shared.positions_on(h.device), None if cache is None else cache.layer(i), shared)
            if keep_all and i < len(self.model.layers) - 1:
                states.append(h)
        if cache is not None:
            cache.advance(positions)
        states.append(h)
        return states


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError naming the first token id outside [0, vocab_size) (the embedding would
    otherwise fail with an IndexError on a CPU, or a device-side assert on a GPU)."""
    if input_ids.numel() == 0:
        return
    low, high = (int(extreme) for extreme in input_ids.aminmax())
    if low < 0 or high >= vocab_size:
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise ValueError(f"input_ids contains token id {int(bad)}, outside the vocabulary [0, {vocab_size})")


PREFILL_CHUNK = 256  # tokens per prefill pass: sliding layers score 256 x (W + 256) keys, not T x T


def prefill(model: MiMoForCausalLM, input_ids: torch.Tensor, cache, *, positions: torch.Tensor | None = None,
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Runs a prompt through the model `chunk` tokens at a time, filling `cache`.

    input_ids [b, t], positions [b, t] (default: continuing the cache; -1 = left padding)
    -> the residual stream h [b, t, c] of every prompt position, before the final norm
    (`model.logits(h[:, -1])` gives the next-token logits: the LM head runs on one position).

    Each chunk attends to what the cache already holds plus itself, so the result equals one pass
    over the whole prompt. What changes is the size of the score matrices: a sliding layer scores
    chunk x (W + reserve + chunk) keys and a global layer chunk x (positions so far), so peak memory
    stays bounded by the chunk and the sliding layers' cost grows with t * W instead of t^2.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer (tokens per prefill pass), got {chunk!r}")
    b, t = input_ids.shape
    if t == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if positions is None:
        start = cache.next_position
        positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
    if positions.shape != input_ids.shape:
        raise ValueError(f"positions shape {tuple(positions.shape)} != input_ids {tuple(input_ids.shape)}")
    pieces = [model.trunk(input_ids[:, a:a + chunk], positions=positions[:, a:a + chunk], cache=cache)[-1]
              for a in range(0, t, chunk)]
    return torch.cat(pieces, dim=1)
