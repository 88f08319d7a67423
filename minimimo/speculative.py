"""Speculative decoding with the MTP blocks: draft k tokens, verify them in one main-model pass.

One cycle, for a row whose main hidden states are known up to position `last` and whose tokens
are verified up to `last + 1`:

1. **extend** — each MTP block k catches up on the positions q whose input token t_{q+k+1} is
   now verified (block 0 up to `last`, block k up to `last - k`). Block 0's output at `last` is
   the first draft d1 (a guess for t_{last+2}).
2. **draft** — in the same pass, block k (k >= 1) also runs positions last-k+1 .. last with the
   drafts d1 .. dk as its tokens (its chain of inputs) and drafts d_{k+1} at `last`. Those
   positions stay speculative: the block's cache is rolled back right after.
3. **verify** — the main model runs [t_{last+1}, d1, ..., dk] at positions last+1 .. last+k+1
   in one forward. Greedy: accept the longest prefix of drafts equal to the main model's argmax,
   plus one token from the main model (the first disagreement, or the token after the last
   draft). Sampling: accept d_j with probability min(1, p(d_j) / q(d_j)) and on rejection sample
   from max(0, p - q), renormalised, so the output distribution is exactly the main model's.
4. **roll back** — every cache forgets the positions of rejected drafts (`truncate`): caches are
   position-indexed and every ring has k spare slots, so nothing a later query needs was
   overwritten.

Each cycle produces 1 .. k+1 tokens per main-model forward; their mean is the acceptance length.
Rows of a batch advance at their own speed (positions are per row; shorter inputs are padded
with position -1, which nothing sees).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import HybridCache, RingLayerCache
from .generate import check_generation_args, filter_logits, positions_from_mask
from .mtp import mtp_hidden_input, mtp_logits


@dataclass
class SpeculativeStats:
    mtp_steps: int
    accept_lengths: list[int] = field(default_factory=list)  # tokens per main forward, per row

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / max(1, len(self.accept_lengths))

    def histogram(self) -> dict[int, int]:
        return {n: self.accept_lengths.count(n) for n in range(1, self.mtp_steps + 2)}


def ragged_positions(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Per row the positions start..end-1, left-aligned, padded with -1: [b, max(end - start)]."""
    width = max(1, int((end - start).max()))
    pos = start[:, None] + torch.arange(width, device=start.device)
    return torch.where((pos < end[:, None]) & (pos >= 0), pos, -1)


def gather_rows(buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """buffer [b, s, ...] at positions [b, t] (-1 -> slot 0, a harmless filler)."""
    index = positions.clamp_min(0)
    if buffer.dim() == 3:
        index = index[..., None].expand(-1, -1, buffer.shape[-1])
    return buffer.gather(1, index)


def scatter_rows(buffer: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    rows, cols = (positions >= 0).nonzero(as_tuple=True)
    buffer[rows, positions[rows, cols]] = values[rows, cols]


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


@torch.no_grad()
def speculative_generate(model, input_ids, max_new_tokens: int, *, mtp_steps: int, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_token_ids=None,
                         attention_mask=None, pad_token_id: int | None = None):
    """Same contract as `generate.generate`, drafting `mtp_steps` tokens per cycle. -> (ids, stats)."""
    check_generation_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    config, K = model.config, mtp_steps
    if not 1 <= K <= config.num_mtp_layers:
        raise ValueError(f"mtp_steps={K}, but this checkpoint has {config.num_mtp_layers} MTP blocks "
                         f"(drafting needs 1..{config.num_mtp_layers})")
    device, dtype = model.device, model.dtype
    b, width = input_ids.shape
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    stop = torch.tensor(sorted(set([stop_token_ids] if isinstance(stop_token_ids, int) else stop_token_ids or [])),
                        dtype=torch.long, device=device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    stats = SpeculativeStats(K)

    capacity = width + max_new_tokens + K + 2
    tokens = torch.zeros(b, capacity, dtype=torch.long, device=device)  # by position, no padding
    hidden = torch.zeros(b, capacity, config.hidden_size, dtype=dtype, device=device)  # MTP input per position
    cache = HybridCache(config, b, dtype=dtype, device=model.layer_devices(), max_length=capacity, reserve=K)
    mtp_caches = [RingLayerCache(block.geometry, b, dtype, block.enorm.weight.device, reserve=K)
                  for block in model.model.mtp.layers]

    # prefill: the prompt through the main model
    positions = positions_from_mask(mask)
    prompt_len = mask.sum(1)
    scatter_rows(tokens, positions, input_ids)
    h = model.trunk(input_ids, positions=positions, cache=cache)[-1]
    scatter_rows(hidden, positions, mtp_hidden_input(model, h.to(device)))
    logits = model.logits(h[:, -1])
    first = logits.argmax(-1) if temperature == 0 else torch.multinomial(
        distribution(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)
    last = prompt_len - 1  # last position with a main hidden state
    tokens[torch.arange(b), last + 1] = first
    produced = torch.ones(b, dtype=torch.long, device=device)  # new tokens so far (first included)
    done = torch.isin(first, stop) if len(stop) else torch.zeros(b, dtype=torch.bool, device=device)
    mtp_done = [torch.zeros(b, dtype=torch.long, device=device) for _ in range(K)]  # clean up to here
    rows = torch.arange(b, device=device)

    while not bool((done | (produced >= max_new_tokens)).all()):
        # 1-2. block k runs once over positions mtp_done[k]..last: up to last-k its input tokens are
        # verified (extend), after that they are the drafts d1..dk (draft); its output at `last`
        # is the next draft. The draft positions are rolled back right after.
        draft_tokens, draft_probs = [], []
        for k in range(K):
            pos = ragged_positions(mtp_done[k], last + 1)
            out = mtp_logits(model, k, gather_rows(tokens, (pos + k + 1).where(pos >= 0, pos)),
                             gather_rows(hidden, pos), pos, mtp_caches[k])
            mtp_caches[k].truncate((last - k + 1).to(mtp_caches[k].pos.device))
            mtp_done[k] = torch.maximum(mtp_done[k], last - k + 1)
            draft_logits = out[rows, (last - pos[:, 0]).clamp(0, out.shape[1] - 1)]  # at q = last
            if temperature == 0:
                draft = draft_logits.argmax(-1)
            else:
                q = distribution(draft_logits, temperature, top_k, top_p)
                draft_probs.append(q)
                draft = torch.multinomial(q, 1, generator=generator).squeeze(-1)
            draft_tokens.append(draft)
            tokens[rows, last + 2 + k] = draft  # uncommitted slot: the next block's chained input
        drafts = torch.stack(draft_tokens, 1)  # [b, K]

        # 3. verify [t_{last+1}, d1..dK] at positions last+1..last+K+1 in one main forward
        verify_pos = last[:, None] + 1 + torch.arange(K + 1, device=device)
        verify_ids = torch.cat([tokens[rows, last + 1][:, None], drafts], 1)
        h = model.trunk(verify_ids, positions=verify_pos, cache=cache)[-1]
        logits = model.logits(h)  # [b, K+1, V]
        if temperature == 0:
            target = logits.argmax(-1)  # [b, K+1]
            accepted = (target[:, :K] == drafts).long().cumprod(1).sum(1)  # [b]
            bonus = target[rows, accepted]
        else:
            p = distribution(logits, temperature, top_k, top_p)  # [b, K+1, V]
            q = torch.stack(draft_probs, 1)  # [b, K, V]
            p_d = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
            q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
            u = torch.rand(p_d.shape, generator=generator, device=device)
            accepted = (u * q_d < p_d).long().cumprod(1).sum(1)
            residual = p[rows, accepted].clone()  # after all K accepted: the next-token distribution
            rejected = accepted < K
            q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, accepted]
            residual[rejected] = (residual[rejected] - q_pad[rejected]).clamp_min(0)
            total = residual.sum(-1, keepdim=True)
            residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p[rows, accepted])  # p == q: any
            bonus = torch.multinomial(residual, 1, generator=generator).squeeze(-1)

        # 4. commit accepted drafts + bonus, roll back the rest
        active = ~done & (produced < max_new_tokens)
        new = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], 1)
        new[rows, accepted] = bonus  # [b, K+1]: d1..d_a, bonus, (ignored)
        count = accepted + 1
        if len(stop):
            is_stop = torch.isin(new, stop) & (torch.arange(K + 1, device=device) < count[:, None])
            first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, count)
            done |= is_stop.any(1) & active
            count = torch.minimum(count, first_stop)
        count = torch.where(active, count, 0)
        stats.accept_lengths += [int(n) for n in (accepted + 1)[active]]
        new_pos = last[:, None] + 2 + torch.arange(K + 1, device=device)
        new_pos = new_pos.where(torch.arange(K + 1, device=device) < count[:, None], -1)
        scatter_rows(tokens, new_pos, new)
        hidden_pos = verify_pos.where(torch.arange(K + 1, device=device) < count[:, None], -1)
        scatter_rows(hidden, hidden_pos, mtp_hidden_input(model, h.to(device)))
        last = last + count
        produced = produced + count
        cache.truncate(last + 1)  # keep t_{last+1} .. d_a; the bonus is the next verify's first token
        for k in range(K):
            mtp_caches[k].truncate(mtp_done[k].to(mtp_caches[k].pos.device))

    new_ids = gather_rows(tokens, (prompt_len[:, None] + torch.arange(max_new_tokens, device=device)))
    filler = torch.full_like(new_ids, -1)
    produced_ok = torch.arange(max_new_tokens, device=device) < produced.clamp_max(max_new_tokens)[:, None]
    if len(stop):
        fill = new_ids.gather(1, (produced.clamp_max(max_new_tokens) - 1)[:, None])
        if pad_token_id is not None:
            fill = torch.full_like(fill, pad_token_id)
        filler = fill.expand_as(new_ids)
    new_ids = torch.where(produced_ok, new_ids, filler)
    if len(stop) and bool(done.all()):
        new_ids = new_ids[:, :int(produced.clamp_max(max_new_tokens).max())]
    return torch.cat([input_ids, new_ids], 1), stats
