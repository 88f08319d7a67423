"""The mixture of experts of MiMo-V2-Flash: a sigmoid router with a load-balancing bias.

Axes: n tokens (batch and positions flattened), c hidden channels, e experts, k chosen experts,
m expert intermediate channels.

Routing (layers 1..47; 256 experts, 8 chosen, no shared expert):

1. `scores = sigmoid(x @ W_gate^T)` computed in float32 (the router is stored in float32).
2. **Selection** uses `scores + e_score_correction_bias`. The bias is not learned by gradient:
   during training it is nudged up for under-used experts and down for over-used ones
   ("auxiliary-loss-free" balancing, `topk_method = "noaux_tc"`), so it only decides *which*
   experts run, never how much they count.
3. Optionally group-limited: experts form `n_group` groups, a group's score is the sum of its two
   best biased scores, only the best `topk_group` groups compete (MiMo-V2-Flash: 1 group, a no-op).
4. **Weights** are the *unbiased* sigmoid scores of the chosen experts, divided by their sum
   (`norm_topk_prob`) and multiplied by `routed_scaling_factor` (null on the hub, i.e. 1).

Dispatch: the n*k (token, expert) pairs are sorted by expert, so every expert that received
tokens runs one matmul over a contiguous slice; experts that received none are never touched.
On the CPU in float32, torch's `grouped_mm` runs all those slices in one call per projection,
once the (token, expert) pairs are at least as many as the experts (prefill): its CPU kernel runs
one matmul per expert, empty or not, so while decoding (one token, k pairs: 2 pairs for the
bundled default's 8 experts, 8 for Flash's 256) the per-expert loop, which visits only experts
with tokens, issues far fewer ops. (Measured on one thread, `bench/experts.py`: one token of the
bundled default 1.8x faster through the loop; from about one pair per expert the two are within
a few percent, and grouped_mm pulls ahead as pairs grow.) The loop is the readable reference
(and the path for bf16 and CUDA, where this file has not been measured). It asks
`expert_weights(e, dtype)` for expert e's three matrices: here slices of the stacked parameters;
`fp8.FP8Experts`, which the loader swaps in to keep FP8 weights on the device, answers with the
same matrices dequantized for that call.
Outputs are weighted in float32 and summed over the k choices before one cast back (in bfloat16
rounding per expert instead would flip downstream expert choices).

Decoding routes so few pairs (2 for one token, top-2) that the sorting itself (~30 torch calls,
each costing microseconds whatever its size) outweighs the experts; `few_pairs_sum` groups up to
`FEW_PAIRS` pairs on Python ints instead, runs the same experts on the same rows, and gives the
same sum bit for bit (`use_few_pairs = False`: always the sorted dispatch, the reference).
"""

from __future__ import annotations

import itertools

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F


class Router(nn.Module):
    def __init__(self, hidden_size, num_experts, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                 scaling_factor=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.scaling_factor = norm_topk_prob, scaling_factor

    def forward(self, x: torch.Tensor):
        """x [n, c] -> gate_weights [n, k] (float32), expert_ids [n, k]."""
        # float32 throughout; the tensors already float32 are used as they are (`.float()` would
        # still cost a dispatch each, and a decode step runs this once per MoE layer)
        x32 = x if x.dtype == torch.float32 else x.float()
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        bias = self.e_score_correction_bias
        scores = torch.sigmoid(F.linear(x32, weight))  # [n, e]
        choice = scores + (bias if bias.dtype == torch.float32 else bias.float())
        if self.n_group > 1:
            grouped = rearrange(choice, "n (G j) -> n G j", G=self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [n, G]
            best_groups = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
            keep = keep[..., None].expand_as(grouped)
            choice = rearrange(grouped.masked_fill(~keep, float("-inf")), "n G j -> n (G j)")
        expert_ids = choice.topk(self.top_k, dim=-1, sorted=False).indices  # official slot order (bf16 sums)
        gate_weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            gate_weights = gate_weights / (gate_weights.sum(-1, keepdim=True) + 1e-20)
        if self.scaling_factor != 1.0:  # (1 on the hub: multiplying by it changes nothing)
            gate_weights = gate_weights * self.scaling_factor
        return gate_weights, expert_ids


class Experts(nn.Module):
    """`num_experts` SwiGLU experts stored stacked: gate/up [e, m, c], down [e, c, m].

    The hub stores them one by one (`mlp.experts.E.gate_proj.weight`); the loader stacks them.
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Expert e's gate [m, c], up [m, c] and down [c, m] matrices for activations of `dtype`
        (stored in it already here; `FP8Experts` dequantizes into it)."""
        return self.gate_proj[e], self.up_proj[e], self.down_proj[e]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e applied to x [n, c] -> [n, c]."""
        gate, up, down = self.expert_weights(e, x.dtype)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    use_grouped_mm = True  # False: always the per-expert loop (the readable twin)

    def grouped_mm_ok(self, x: torch.Tensor, pairs: int) -> bool:
        # torch's grouped matmul runs the same sorted slices in one call. Used on the CPU in float32
        # only (bf16 needs 16-byte-aligned strides; CUDA untested here); the loop is its plain twin.
        # Its CPU kernel runs a matmul for every expert, even one without tokens, so it pays only
        # once the (token, expert) pairs are at least as many as the experts; with fewer (decoding)
        # the loop over the experts that received tokens is cheaper (bench/experts.py)
        return (self.use_grouped_mm and hasattr(F, "grouped_mm") and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.gate_proj.dtype == torch.float32
                and pairs >= self.gate_proj.shape[0])

    def forward(self, x: torch.Tensor, gate_weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [n, c], gate_weights / expert_ids [n, k] -> [n, c]."""
        out = self.weighted_sum(x, gate_weights, expert_ids)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    use_few_pairs = True  # False: always the sorted dispatch below (the reference)
    FEW_PAIRS = 64  # up to this many (token, expert) pairs the grouping is done on Python ints

    def weighted_sum(self, x: torch.Tensor, gate_weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """sum over k of gate_weights[:, k] * expert_{expert_ids[:, k]}(x), in float32 [n, c].

        A pair whose id is outside [0, e) names an expert this stack does not hold and adds nothing:
        under expert parallelism each rank holds a run of the experts, passes ids shifted to its
        first one, and the ranks' partial sums add up to the whole (`parallel.py`)."""
        n, k = expert_ids.shape
        if self.use_few_pairs and 0 < n * k <= self.FEW_PAIRS:
            return self.few_pairs_sum(x, gate_weights, expert_ids)
        num_experts = self.gate_proj.shape[0]
        flat_ids = rearrange(expert_ids, "n k -> (n k)")
        flat_ids = flat_ids.where((flat_ids >= 0) & (flat_ids < num_experts), num_experts)  # not held: last
        order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
        held = int(counts.sum())
        order = order[:held]
        starts, sizes = (counts.cumsum(0) - counts).tolist(), counts.tolist()
        x_sorted = x[order // k]  # the token of each held pair
        active = counts.nonzero().flatten().tolist()  # the experts that received tokens
        if self.grouped_mm_ok(x, held):  # one kernel call per projection over the contiguous groups
            out_sorted = self.grouped_experts(x_sorted, counts.cumsum(0).to(torch.int32))
        else:
            out_sorted = torch.empty_like(x_sorted)
            for e in active:  # only experts that received tokens
                rows = slice(starts[e], starts[e] + sizes[e])
                out_sorted[rows] = self.expert(e, x_sorted[rows])
        out = x.new_zeros(n * k, x.shape[1]).index_copy_(0, order, out_sorted)  # back to (n k) order
        weighted = rearrange(out, "(n k) c -> n k c", k=k).float() * gate_weights[..., None]
        return weighted.sum(dim=1)

    def grouped_experts(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Every expert on its contiguous group of rows: x_sorted [pairs, c] grouped by expert in
        expert order, offsets [e] (int32) where each group ends -> [pairs, c]."""
        gate = F.grouped_mm(x_sorted, self.gate_proj.mT, offs=offsets)
        up = F.grouped_mm(x_sorted, self.up_proj.mT, offs=offsets)
        return F.grouped_mm(F.silu(gate) * up, self.down_proj.mT, offs=offsets)

    def few_pairs_sum(self, x: torch.Tensor, gate_weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """`weighted_sum` for a few (token, expert) pairs, as while decoding: the same result, bit
        for bit, with far fewer torch calls.

        The sorted dispatch spends ~30 torch calls (where, argsort, bincount, cumsum, nonzero,
        index_copy_, ...) grouping the pairs by expert: for one token and top-2, more than the two
        experts cost. Here the ids are read once (`tolist`) and grouped on Python ints. Each expert
        still runs on its tokens in (n k) order, the rows of the sorted dispatch (grouped_mm gets
        the same groups and offsets), and the outputs are weighted and summed as there."""
        n, k = expert_ids.shape
        num_experts = self.gate_proj.shape[0]
        pairs_of = {}  # expert -> its pairs (index n * k + slot), in (n k) order, as the stable sort gives them
        for pair, e in enumerate(e for token_ids in expert_ids.tolist() for e in token_ids):
            if 0 <= e < num_experts:  # an expert not held adds nothing (expert parallelism)
                pairs_of.setdefault(e, []).append(pair)
        held = sum(len(pairs) for pairs in pairs_of.values())
        grouped = self.grouped_mm_ok(x, held)
        experts = sorted(pairs_of) if grouped else list(pairs_of)  # grouped_mm takes the groups in expert order
        if n == 1 and not grouped:  # one token: every expert runs on it, x itself
            outs = [self.expert(e, x) for e in experts]
        else:  # the held pairs' tokens grouped by expert, gathered once
            x_sorted = token_rows(x, [pair // k for e in experts for pair in pairs_of[e]])
            if grouped:  # offsets: where the group of every expert ends, empty ones included
                offsets = list(itertools.accumulate(len(pairs_of.get(e, ())) for e in range(num_experts)))
                outs = [self.grouped_experts(x_sorted, torch.tensor(offsets, dtype=torch.int32, device=x.device))]
            else:  # each expert on its slice
                ends = itertools.accumulate(len(pairs_of[e]) for e in experts)
                outs = [self.expert(e, x_sorted[end - len(pairs_of[e]):end]) for e, end in zip(experts, ends)]
        row_of_pair = [n * k] * (n * k)  # where each pair's output is in cat(outs); n * k: not held
        for row, pair in enumerate(pair for e in experts for pair in pairs_of[e]):
            row_of_pair[pair] = row
        if held < n * k:  # the pairs whose expert is not held read a row of zeros
            outs.append(x.new_zeros(1, x.shape[1]))
            row_of_pair = [min(row, held) for row in row_of_pair]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [rows, c]: the experts' outputs, one after another
        if row_of_pair != list(range(n * k)):  # back to (n k) order (one token: already in it)
            out = out[row_of_pair]
        out = out.view(n, k, -1)  # (n k) c -> n k c
        weighted = (out if out.dtype == torch.float32 else out.float()) * gate_weights.unsqueeze(-1)
        return weighted.sum(dim=1)


def token_rows(x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """x[tokens]: a view when the tokens are consecutive (x itself when they are all of them), one
    call (where indexing by a list takes four) when there is one token."""
    if x.shape[0] == 1:
        return x if len(tokens) == 1 else x.repeat(len(tokens), 1)
    first = tokens[0] if tokens else 0
    if tokens == list(range(first, first + len(tokens))):
        return x if len(tokens) == x.shape[0] else x[first:first + len(tokens)]
    return x[tokens]


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = Router(config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
                           config.n_group, config.topk_group, config.norm_topk_prob, config.scaling_factor)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tokens = rearrange(x, "b t c -> (b t) c")
        gate_weights, expert_ids = self.gate(tokens)
        return rearrange(self.experts(tokens, gate_weights, expert_ids), "(b t) c -> b t c", b=b)


@torch.no_grad()
def update_correction_bias_(router: Router, expert_ids: torch.Tensor, rate: float) -> torch.Tensor:
    """One step of auxiliary-loss-free balancing (training only): every expert's bias moves by
    `rate` towards the mean load, `bias += rate * sign(mean load - load)`. Returns the load."""
    load = torch.bincount(expert_ids.flatten(), minlength=router.e_score_correction_bias.shape[0]).float()
    router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
    return load
