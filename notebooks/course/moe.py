"""The mixture of experts of MiMo-V2-Flash, as notebook 04 builds it from scratch.

Axes: n tokens (batch and positions flattened), c hidden channels, e experts, k chosen experts,
G expert groups, j experts in a group, m expert intermediate channels.

    route      sigmoid scores in float32, top-k of (score + correction bias), weights from the
               unbiased scores, normalised and scaled                              (notebook 04)
    swiglu     one SwiGLU MLP: down(silu(gate x) * up x); the dense layer 0 and each expert
    dispatch   sort the (token, expert) pairs by expert, run each expert once on its slice
    moe_layer  route + dispatch on [b t c], from the hub's tensors of one layer     (notebook 06)

Each is asserted against `minimimo.moe` in notebook 04 and, inside the whole model, in notebook 06.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange, reduce
from torch.nn import functional as F


def route(x, weight, bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0):
    """x [n c], weight [e c], bias [e] -> gate_weights [n k] (float32), expert_ids [n k].

    The bias only chooses (it enters the top-k); the weights are the unbiased scores of the chosen
    experts. With n_group groups, only the topk_group groups whose two best biased scores sum highest
    stay in the race (DeepSeek-V3's device limit; MiMo-V2-Flash has one group, a no-op)."""
    scores = einsum(x.float(), weight.float(), "n c, e c -> n e").sigmoid()
    choice = rearrange(scores + bias.float(), "n (G j) -> n G j", G=n_group)
    group_score = reduce(choice.topk(2, dim=-1).values, "n G two -> n G", "sum")
    dropped = group_score.topk(n_group - topk_group, dim=-1, largest=False).indices      # [n, G - topk_group]
    choice = choice.scatter(1, dropped[..., None].expand(-1, -1, choice.shape[-1]), float("-inf"))
    # sorted=False: the package's slot order, so that float32 sums over k add in the same order
    expert_ids = rearrange(choice, "n G j -> n (G j)").topk(top_k, dim=-1, sorted=False).indices
    gate_weights = scores.gather(1, expert_ids)                    # unbiased scores of the chosen experts
    if norm_topk_prob:
        gate_weights = gate_weights / reduce(gate_weights, "n k -> n 1", "sum")
    return gate_weights * scaling, expert_ids


def swiglu(x, gate, up, down):
    """x [n c], gate/up [m c], down [c m] -> [n c]: down(silu(gate x) * up x)."""
    hidden = F.silu(einsum(x, gate, "n c, m c -> n m")) * einsum(x, up, "n c, m c -> n m")
    return einsum(hidden, down, "n m, c m -> n c")


def dispatch(x, gate_weights, expert_ids, gate_proj, up_proj, down_proj):
    """x [n c], gate_weights/expert_ids [n k], stacked experts gate/up [e m c], down [e c m] -> [n c].

    Experts that received no token are never touched: at decode time that is most of them, and
    skipping their weights is what makes a 256-expert layer cheap to run."""
    k = expert_ids.shape[1]
    pair_expert = rearrange(expert_ids, "n k -> (n k)")
    order = pair_expert.argsort(stable=True)                       # pairs grouped by expert
    sizes = pair_expert.bincount(minlength=gate_proj.shape[0]).tolist()
    slices = x[order // k].split(sizes)                            # one slice per expert, many empty
    out_sorted = torch.cat([swiglu(rows, gate_proj[e], up_proj[e], down_proj[e])
                            for e, rows in enumerate(slices) if len(rows)])
    out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)     # back to (n k) order
    weighted = rearrange(out, "(n k) c -> n k c", k=k).float() * gate_weights[..., None]
    return reduce(weighted, "n k c -> n c", "sum").to(x.dtype)     # weighted in float32, one cast


def moe_layer(x, weights, config):
    """x [b t c] -> [b t c]. weights: {"gate.weight" [e c], "gate.e_score_correction_bias" [e],
    "experts.gate_proj"/"experts.up_proj" [e m c], "experts.down_proj" [e c m]} (stacked experts)."""
    tokens = rearrange(x, "b t c -> (b t) c")
    gate_weights, expert_ids = route(tokens, weights["gate.weight"], weights["gate.e_score_correction_bias"],
                                     config.num_experts_per_tok, config.n_group, config.topk_group,
                                     config.norm_topk_prob, config.scaling_factor)
    out = dispatch(tokens, gate_weights, expert_ids, weights["experts.gate_proj"], weights["experts.up_proj"],
                   weights["experts.down_proj"])
    return rearrange(out, "(b t) c -> b t c", b=x.shape[0])
