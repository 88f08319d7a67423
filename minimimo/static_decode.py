"""A decode step whose shapes never change, for `torch.compile`: `generate(..., compile=True)`.

Why. Decoding a small model is bound by per-op cost, not arithmetic: a step of the benchmark
model issues ~650 torch calls from Python, each a few microseconds of dispatch for a tiny matmul.
`torch.compile` removes that cost by turning the step into one generated program, but only if
nothing in the step depends on data: gpt-fast's recipe (github.com/pytorch-labs/gpt-fast) is a
static KV cache written in place and a step with fixed shapes. The eager step has three such
dependencies, each one a graph break: the global buffers grow, the ring concatenates the new
token before writing it, and the MoE groups (token, expert) pairs on Python ints.

This step does the same arithmetic with fixed shapes:

* `StaticCache`: per layer, keys [b, g, slots, d], values [b, g, slots, e] and positions
  [b, slots] (-1 = empty), written in place at slot = position % slots, *before* attention.
  Global layers get `max_length` slots rounded up to whole 256s (slot = position; torch compiles
  again for every new shape, so the next prompt of about the same length reuses the program);
  sliding layers W + 1: a query at p sees the keys p - W .. p (`attention.visibility_mask`),
  W + 1 consecutive positions, which fall in W + 1 distinct slots. The mask comes from the
  stored positions, so left padding (never written) and a wrapped ring need nothing special, as
  in `cache.py`.
* The MoE runs every token's k experts on gathered weights (`gate_proj[expert_ids]`, [n, k, m, c]):
  the shapes depend on k, not on which experts were chosen. Once the n * k pairs reach the number
  of experts, all experts run on every token instead (one matmul per projection; the outputs of
  experts nobody chose get weight 0), which reads each expert's weights once rather than copying
  them per pair.
* Everything else is the model's own modules (norms, projections, router, LM head) and the
  package's tensor functions (`cos_sin_of`, `apply_rope`, `visibility_mask`, `sdpa_attention`).

The prompt is prefilled by the ordinary forward pass (its cost is in its matmuls, not in op
overhead); `StaticCache.from_hybrid` copies what that left in the `HybridCache`. The logits equal
the eager step's up to float rounding (the experts' products are summed in another order);
tests/test_static_decode.py holds the greedy ids equal across batches, left padding, ring wrap,
bfloat16 and sampling. Not covered, with an error saying so: MTP drafting, FP8 experts kept
on the device (their weights exist only one expert at a time), several processes (tensor and
expert parallelism).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from .attention import additive_mask, merge_heads, sdpa_attention, split_heads, visibility_mask
from .cache import HybridCache, LayerCache
from .mlp import MLP
from .moe import Experts, MoE
from .rope import apply_rope, cos_sin_of, inverse_frequencies


def check_compile_args(model, compile: bool, mtp_steps: int) -> None:
    """`generate`/`stream`'s compile option: a bool, not with MTP drafting, on a model it can run."""
    if compile not in (True, False):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if compile and mtp_steps:
        raise ValueError("compile=True decodes one token per step; it does not draft with MTP (use mtp_steps=0)")
    if compile:
        check_static_model(model)


def check_static_model(model) -> None:
    """Raise a ValueError naming what `static_decode_step` cannot run; the message says why."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError("compile=True decodes in one process; a tensor- or expert-parallel model decodes eagerly")
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if type(mlp) is MoE and type(mlp.experts) is not Experts:
            raise ValueError(f"compile=True needs the experts of model.layers.{i} in high precision "
                             f"({type(mlp.experts).__name__} keeps them FP8, dequantizing one expert at a "
                             f"time); load the checkpoint without keeping FP8 weights")
        if type(mlp) not in (MoE, MLP):
            raise ValueError(f"compile=True cannot run model.layers.{i}.mlp ({type(mlp).__name__})")


class StaticCache:
    """Fixed-size per-layer caches (see the module docstring): `layers[i]` is a `cache.LayerCache`
    (keys, values, positions) of window + 1 or `max_length` rounded up slots, written in place."""

    SLOT_CHUNK = 256  # global slots are rounded up to whole chunks: a new prompt length seldom recompiles

    def __init__(self, model, batch: int, max_length: int):
        global_slots = -(-max_length // self.SLOT_CHUNK) * self.SLOT_CHUNK
        self.layers, self.inv_freq = [], {}
        for layer in model.model.layers:
            g, device = layer.geometry, layer.device
            slots = global_slots if g.window is None else g.window + 1
            self.layers.append(LayerCache(g, batch, slots, model.dtype, device))
            key = (g.rotary_dim, g.rope_theta, device)  # made here: the step only reads them
            self.inv_freq[key] = inverse_frequencies(g.rotary_dim, g.rope_theta, str(device))

    @classmethod
    def from_hybrid(cls, model, cache: HybridCache, max_length: int) -> "StaticCache":
        """The same keys, values and positions as a filled `HybridCache`, in fixed slots.
        max_length: 1 + the largest position the decode will reach (prompt + new tokens)."""
        static = cls(model, cache.next_positions.shape[0], max_length)
        for held, fixed in zip(cache.layers, static.layers):
            if held.pos.numel() and int(held.pos.max()) >= max_length:
                raise ValueError(f"the cache holds position {int(held.pos.max())}, beyond max_length {max_length}")
            slots = held.pos.remainder(fixed.pos.shape[1])  # empty slots (-1) are not written
            fixed.write(held.k, held.v, held.pos, slots)
        return static


def static_decode_step(model, cache: StaticCache, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """token [b] at positions [b] -> next-token logits [b, vocab]; `cache` takes this token.

    `model(token[:, None], positions=..., cache=hybrid)[:, -1]` with fixed shapes."""
    q_pos = positions[:, None]  # [b, 1]
    embed = model.model.embed_tokens
    x = embed(token[:, None].to(embed.weight.device))  # [b, 1, c]
    tables = {}  # (rotary_dim, theta, device) -> cos, sin [b, 1, rotary_dim]
    for i, layer in enumerate(model.model.layers):
        g, attn = layer.geometry, layer.self_attn
        x, pos_here = x.to(layer.device), q_pos.to(layer.device)
        key = (g.rotary_dim, g.rope_theta, layer.device)
        if key not in tables:
            tables[key] = cos_sin_of(pos_here, cache.inv_freq[key], x.dtype)
        cos, sin = tables[key]
        h = layer.input_layernorm(x)
        q = apply_rope(split_heads(attn.q_proj(h), g.num_heads, g.head_dim), cos, sin)  # [b, h, 1, d]
        k = apply_rope(split_heads(attn.k_proj(h), g.num_kv_heads, g.head_dim), cos, sin)  # [b, g, 1, d]
        v = split_heads(attn.v_proj(h), g.num_kv_heads, g.v_head_dim) * attn.value_scale  # [b, g, 1, e]
        fixed = cache.layers[i]
        fixed.write(k, v, pos_here, pos_here % fixed.pos.shape[1], all_real=True)  # before attention
        mask = additive_mask(visibility_mask(pos_here, fixed.pos, g.window), x.dtype)  # [b, 1, 1, slots]
        out = sdpa_attention(q, fixed.k, fixed.v, mask, attn.attention_sink_bias, attn.scale)  # [b, h, 1, e]
        x = x + attn.o_proj(merge_heads(out))
        h = layer.post_attention_layernorm(x)
        x = x + (static_moe(layer.mlp, h) if isinstance(layer.mlp, MoE) else layer.mlp(h))
    return model.logits(x[:, -1])


def static_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x [b, t, c] -> [b, t, c]: `moe(x)` with shapes that do not depend on the routing (n = b t)."""
    b, t, c = x.shape
    tokens = x.reshape(b * t, c)
    gate_weights, expert_ids = moe.gate(tokens)  # [n, k] float32, [n, k]
    experts = moe.experts
    n, k = expert_ids.shape
    num_experts = experts.gate_proj.shape[0]
    if n * k < num_experts:  # few pairs: each runs on its own expert's gathered weights
        gate = torch.einsum("nc,nkmc->nkm", tokens, experts.gate_proj[expert_ids])
        up = torch.einsum("nc,nkmc->nkm", tokens, experts.up_proj[expert_ids])
        out = torch.einsum("nkm,nkcm->nkc", F.silu(gate) * up, experts.down_proj[expert_ids])
        summed = (out.float() * gate_weights[..., None]).sum(1)  # [n, c]
    else:  # every expert on every token, unchosen experts weighing 0. gate and up with the
        # weights on the left, W [e m, c] @ tokens^T: for a few tokens a CPU reads the stacked
        # matrices ~1.5x as fast that way as in tokens @ W^T (one thread, 8 tokens, measured here)
        m = experts.gate_proj.shape[1]
        tokens_t = tokens.t()  # [c, n]
        gate = (experts.gate_proj.reshape(num_experts * m, c) @ tokens_t).view(num_experts, m, n)
        up = (experts.up_proj.reshape(num_experts * m, c) @ tokens_t).view(num_experts, m, n)
        hidden = (F.silu(gate) * up).transpose(1, 2)  # [e, n, m]
        out = torch.bmm(hidden, experts.down_proj.transpose(1, 2))  # [e, n, c]
        weights = torch.zeros(n, num_experts, dtype=torch.float32, device=x.device)
        weights = weights.scatter(1, expert_ids, gate_weights)  # [n, e]
        summed = torch.einsum("enc,ne->nc", out.float(), weights)
    return summed.to(x.dtype).view(b, t, c)


class CompileError(RuntimeError):
    """torch.compile could not build the decode step (on a CPU it needs a C++ compiler)."""

    @classmethod
    def from_failure(cls, error: Exception) -> "CompileError":
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        return cls(f"torch.compile could not compile the decode step ({type(error).__name__}: {first_line}); "
                   "on a CPU it needs a working C++ compiler. Generate without compile=True (--compile)")


@functools.cache
def compiled_decode_step():
    """`static_decode_step` under `torch.compile` (whole graph, static shapes), made on first use.
    torch compiles it again for each new batch size, cache length, dtype or model shape (another
    model of the same shape reuses the program: the weights are its inputs, not constants)."""
    return torch.compile(static_decode_step, fullgraph=True, dynamic=False)


class CompiledDecode:
    """The decode steps of one generation, compiled: `decode(token [b], positions [b]) -> logits [b, V]`.

    Built after the prefill from its `HybridCache` (copied into a `StaticCache` of `max_length`).
    The first call checks all of torch.compile's guards (and compiles when no program fits: a
    failure becomes a `CompileError`); later calls skip the guards that cannot change within one
    generation (the same model, cache tensors and shapes), which saves ~10% of a small model's
    step (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`; guards that tell compiled
    programs apart are still checked)."""

    def __init__(self, model, cache: HybridCache, max_length: int):
        self.model, self.cache = model, StaticCache.from_hybrid(model, cache, max_length)
        self.step, self.calls = compiled_decode_step(), 0

    def __call__(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            try:
                return self.step(self.model, self.cache, token, positions)
            except Exception as error:
                raise CompileError.from_failure(error) from error
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self.step(self.model, self.cache, token, positions)
