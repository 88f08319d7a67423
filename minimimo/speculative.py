"""Speculative decoding with the MTP blocks: draft k tokens, verify them in one main-model pass.

Every row of the batch keeps its tokens by position (no padding) and `last`, the last position
whose main hidden state is known. Token t_{last+1} is verified (chosen by the main model) but has
not been run through it yet. One cycle:

    positions      ... last | last+1    | last+2  last+3  last+4
    tokens         ... t    | t_{last+1}| d1      d2      d3        (k = 3 drafts)

1. **draft** (`draft`): MTP block j reads the main hidden state h_q and token t_{q+j+1}. In one
   pass it catches up on the positions new since its last pass, up to `last`; at the last j of
   them its input tokens are the drafts d1 .. dj, and at `last` it guesses d_{j+1}. Those j
   positions are speculative: the block keeps them only if the drafts they read are accepted.
2. **verify** (`verify`): the main model runs [t_{last+1}, d1, ..., dk] at positions
   last+1 .. last+k+1 in one forward: k+1 next-token distributions for the price of one pass.
3. **accept** — pure functions of tensors, each tested alone:
   `accept_greedy` keeps the longest prefix of drafts equal to the main model's argmax, then
   takes the main model's own next token (the first disagreement, or the token after the last
   draft). `accept_sampled` keeps d_j with probability min(1, p(d_j) / q(d_j)) and, on the first
   rejection, samples from max(0, p - q) renormalised: the output has exactly the main model's
   distribution (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318).
4. **commit and roll back** (`commit`, `roll_back`): the accepted drafts and the next token join
   the row (up to its first stop token and `max_new_tokens`); every cache forgets the positions
   that read rejected drafts (`truncate`). Caches are position-indexed and every ring has k spare slots,
   so nothing a later query needs was overwritten.

Each cycle yields 1 .. k+1 tokens per main-model forward; their mean is the acceptance length.

**Batches.** Rows advance at their own speed: positions are per row, prompts are left-padded with
position -1, and a row that has finished (stop token or `max_new_tokens`) runs its later cycles
at position -1 too, so it writes nothing and moves no cache.

**"Lossless", and batch invariance.** In exact arithmetic greedy drafting returns the plain
greedy tokens and sampling the main model's distribution. On a computer, the verify pass scores
t_{last+1}, d1, ... in one (k+1)-token forward while plain decoding scores them one token at a
time; the matrix products then have other shapes and may sum in another order, so a logit can
differ in its last bits. In float32 on the CPU that has not changed a single argmax here (the
tests hold speculative == plain greedy token for token, batched, on the bundled checkpoint). In
bfloat16 (8 significant bits) two near-tied logits can swap, and from there the texts part: still
the main model's greedy text for *some* rounding, but not the plain loop's. GPU kernels in
bfloat16 are in general not batch-invariant (a row's result depends on how many rows or tokens
share the kernel call), so the same holds there; exactness needs float32 or batch-invariant
kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import HybridCache, RingLayerCache
from .model import prefill
from .mtp import mtp_hidden_input, mtp_logits, mtp_rope, on_device
from .rope import last_columns
from .sampling import Sampler, check_generation_args, positions_from_mask, stop_token_set, whole_number


@dataclass
class SpeculativeStats:
    mtp_steps: int
    accept_lengths: list[int] = field(default_factory=list)  # tokens per main forward, per row

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / max(1, len(self.accept_lengths))

    def histogram(self) -> dict[int, int]:
        return {n: self.accept_lengths.count(n) for n in range(1, self.mtp_steps + 2)}


# --- the state of every row ---------------------------------------------------------------------

@dataclass
class Rows:
    """Where each row of the batch stands (every tensor has the batch axis first)."""

    tokens: torch.Tensor  # [b, capacity] token ids by position: the prompt, then the new tokens
    hidden: torch.Tensor  # [b, capacity, c] the main hidden state per position, as the MTP blocks read it
    last: torch.Tensor  # [b] last position with a main hidden state (t_{last+1} is verified, not run)
    produced: torch.Tensor  # [b] new tokens so far
    stopped: torch.Tensor  # [b] bool: emitted a stop token
    mtp_next: torch.Tensor  # [k, b] per MTP block: the first position its cache does not hold

    def active(self, max_new_tokens: int) -> torch.Tensor:
        return ~self.stopped & (self.produced < max_new_tokens)

    def reserve(self, length: int) -> None:
        """Grow `tokens` and `hidden` to hold positions < length, at least doubling: memory follows
        the tokens generated, not `max_new_tokens` (asking for a million tokens and stopping after
        one must not hold a million hidden states)."""
        have = self.tokens.shape[1]
        if length > have:
            more = max(length, 2 * have) - have
            self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(self.tokens.shape[0], more)], 1)
            self.hidden = torch.cat([self.hidden, self.hidden.new_zeros(self.hidden.shape[0], more,
                                                                        self.hidden.shape[2])], 1)


def gather_rows(buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """buffer [b, s, ...] at positions [b, t] (-1 -> slot 0, a harmless filler)."""
    index = positions.clamp_min(0)
    if buffer.dim() == 3:
        index = index[..., None].expand(-1, -1, buffer.shape[-1])
    return buffer.gather(1, index)


def scatter_rows(buffer: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[b, positions[b, t]] = values[b, t] wherever positions >= 0."""
    rows, cols = (positions >= 0).nonzero(as_tuple=True)
    buffer[rows, positions[rows, cols]] = values[rows, cols]


def write_rows(buffer: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[b, positions[b, t]] = values[b, t] for every position (all >= 0): one scatter, no mask."""
    if buffer.dim() == 3:
        positions = positions[..., None].expand(-1, -1, buffer.shape[-1])
    buffer.scatter_(1, positions, values)


# --- 1. draft, 2. verify -----------------------------------------------------------------------

def draft(model, state: Rows, mtp_caches, active, sampler: Sampler | None):
    """Runs MTP block j over positions mtp_next[j] .. last of every active row -> drafts [b, k],
    and their distributions [b, k, V] when sampling (None when greedy).

    Every block's positions end at `last`, so one window of the newest W positions per row
    (W = the widest catch-up) serves them all, right-aligned: its positions, their rope table,
    their hidden states and the verified tokens after them are gathered once per cycle, and block
    j takes its last w_j columns. Columns before a row's mtp_next[j] (and every column of a
    finished row) get position -1: padding, which writes nothing. Block j's token at q is
    t_{q+j+1}: verified up to last + 1, then this cycle's drafts d1 .. dj.
    """
    k = len(mtp_caches)
    lowest = torch.where(active, state.mtp_next.clamp_min(0), state.last + 1)  # [k, b] first position to run
    widths = (state.last + 1 - lowest).amax(1).tolist()  # [k] catch-up width of each block (>= j + 1)
    width = max(widths)
    window = state.last[:, None] + (1 - width) + torch.arange(width, device=state.last.device)  # [b, W] .. last
    positions = window.where(window >= lowest[:, :, None], -1)  # [k, b, W]
    cos_sin = mtp_rope(model, window, state.hidden.dtype)  # padding columns' angles are never read
    hidden = gather_rows(state.hidden, window)  # h_q [b, W, c]
    verified = gather_rows(state.tokens, window + 1)  # t_{q+1} [b, W]: up to t_{last+1}
    drafts, draft_probs = [], []
    for j, (cache, w) in enumerate(zip(mtp_caches, widths)):
        tokens = torch.cat([verified, *drafts], 1)[:, -w:]  # t_{q+j+1}: the last j are d1 .. dj
        columns = (hidden, positions[j], *cos_sin) if w == width else \
            (hidden[:, -w:], positions[j, :, -w:], *last_columns(*cos_sin, w))
        logits = mtp_logits(model, j, tokens, *columns[:2], cache, at=-1, cos_sin=columns[2:])  # [b, V] at q = last
        if sampler is None:
            guess = logits.argmax(-1)
        else:
            draft_probs.append(sampler.distribution(logits))
            guess = sampler.sample(draft_probs[-1])
        drafts.append(guess[:, None])
    drafts = torch.cat(drafts, 1)  # [b, k]
    # kept in the row's buffer too, at last+2 .. last+k+1 (past what it has verified: finished rows
    # never read them, and commit overwrites what is accepted)
    write_rows(state.tokens, window[:, -1:] + 2 + torch.arange(k, device=drafts.device), drafts)
    state.mtp_next = torch.where(active, state.last + 1, state.mtp_next)
    return drafts, (torch.stack(draft_probs, 1) if draft_probs else None)


def verify(model, state: Rows, drafts, cache, active):
    """[t_{last+1}, d1..dk] at positions last+1 .. last+k+1 in one main forward -> logits
    [b, k+1, V] and the hidden states the MTP blocks read [b, k+1, c]."""
    k = drafts.shape[1]
    positions = state.last[:, None] + 1 + torch.arange(k + 1, device=drafts.device)
    positions = positions.where(active[:, None], -1)  # finished rows write nothing
    ids = torch.cat([state.tokens.gather(1, state.last[:, None] + 1), drafts], 1)
    h = model.trunk(ids, positions=positions, cache=cache)[-1]
    return model.logits(h), mtp_hidden_input(model, h.to(drafts.device))


# --- 3. accept: pure tensor functions -----------------------------------------------------------

def accept_greedy(drafts: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [b, k], the main model's argmax at the k+1 verify positions [b, k+1] ->
    (number of accepted drafts [b], the main model's next token after them [b])."""
    k = drafts.shape[1]
    accepted = (target_ids[:, :k] == drafts).long().cumprod(1).sum(1)  # length of the agreeing prefix
    return accepted, target_ids.gather(1, accepted[:, None]).squeeze(1)


def accept_sampled(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [b, k] drawn from draft_probs q [b, k, V]; target_probs p [b, k+1, V]; uniforms
    [b, k] in [0, 1) -> (number of accepted drafts a [b], distribution of the next token [b, V]).

    Draft j is kept while u_j < p(d_j) / q(d_j). After a rejection at j the next token comes from
    max(0, p_j - q_j) renormalised; after k acceptances from p_k, the target after the last draft.
    """
    b, k = drafts.shape
    p_draft = target_probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # p(d_j) [b, k]
    q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)  # q(d_j) [b, k]
    accepted = (uniforms * q_draft < p_draft).long().cumprod(1).sum(1)  # [b]
    rows = torch.arange(b, device=drafts.device)
    p_next = target_probs[rows, accepted]  # [b, V]
    q_next = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, accepted]  # 0 after k
    residual = (p_next - q_next).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # an all-zero residual means p == q at the rejected draft (rounding only): any p-sample is right
    return accepted, torch.where(total > 0, residual / total.clamp_min(1e-30), p_next)


# --- 4. commit and roll back --------------------------------------------------------------------

def commit(state: Rows, drafts, accepted, next_token, hidden, active, stop, max_new_tokens) -> torch.Tensor:
    """Appends d1..d_a and the next token to every active row, cut after its first stop token and
    at max_new_tokens; keeps the verified positions' hidden states and moves `last` past them.
    -> how many tokens each row took [b] (0 for a finished row).

    All k+1 slots are written, kept or not: what lies past a row's new `last` + 1 is never read
    before a later cycle writes it again (the drafts come from the blocks' own outputs, hidden
    states from a later verify), so one scatter per buffer does without a mask."""
    k = drafts.shape[1]
    slot = torch.arange(k + 1, device=drafts.device)
    new = torch.cat([drafts, next_token[:, None]], 1).scatter_(1, accepted[:, None], next_token[:, None])
    count = accepted + 1  # new [b, k+1]: d1 .. d_a, the next token, (not kept)
    if len(stop):
        is_stop = torch.isin(new, stop) & (slot < count[:, None])
        first_stop = is_stop.float().argmax(1) + 1
        state.stopped |= is_stop.any(1) & active
        count = torch.where(is_stop.any(1), first_stop, count)
    count = torch.where(active, torch.minimum(count, max_new_tokens - state.produced), 0)
    first = state.last[:, None] + slot  # [b, k+1] positions last .. last + k
    write_rows(state.tokens, first + 2, new)
    write_rows(state.hidden, first + 1, hidden)
    state.last += count
    state.produced += count
    return count


def roll_back(state: Rows, cache: HybridCache, mtp_caches, count: torch.Tensor, active) -> None:
    """Every cache forgets what was not verified: the main model keeps positions up to `last` (the
    next token t_{last+1} runs in the next verify), MTP block j the positions q whose input token
    t_{q+j+1} was already verified or an accepted draft (q + j + 1 <= last; t_{last+1} is the main
    model's own token, not the draft the block read there): accepted drafts need no second pass.

    count [b]: the tokens each row took this cycle (`commit`). Only a cache with something to
    forget is truncated: the main one when an active row took fewer than the k+1 positions the
    verify wrote, block j's when a row took j tokens or fewer (before that the block held positions
    up to the old `last`, which the row keeps: a cycle that accepts everything truncates nothing).
    """
    k = len(mtp_caches)
    shift = torch.arange(k + 1, device=state.last.device)  # blocks 0 .. k-1, then the main model
    forget = ((count <= shift[:, None]) & active).any(1).tolist()  # [k + 1]
    if forget[k]:
        cache.truncate(state.last + 1)
    state.mtp_next = torch.minimum(state.mtp_next, state.last - shift[:k, None])  # [k, b]
    for mtp_cache, keep, needed in zip(mtp_caches, state.mtp_next, forget):
        if needed:
            mtp_cache.truncate(on_device(keep, mtp_cache.pos.device))


# --- the loop -----------------------------------------------------------------------------------

def start(model, input_ids, mask, k: int, max_new_tokens: int, sampler: Sampler | None, stop):
    """The prompt through the main model (prefill) -> (Rows with the first new token, main cache, MTP caches)."""
    config, device, dtype = model.config, model.device, model.dtype
    b, width = input_ids.shape
    longest = width + max_new_tokens + k  # the prompt, the new tokens and one cycle's drafts: a cap, not a reservation
    cache = HybridCache(config, b, dtype=dtype, device=model.layer_devices(), max_length=longest, reserve=k)
    mtp_caches = [RingLayerCache(block.geometry, b, dtype, block.enorm.weight.device, reserve=k)
                  for block in model.model.mtp.layers[:k]]
    positions = positions_from_mask(mask)
    h = prefill(model, input_ids, cache, positions=positions)  # [b, t, c] before the final norm
    logits = model.logits(h[:, -1])
    first = logits.argmax(-1) if sampler is None else sampler.sample(sampler.distribution(logits))
    capacity = width + 2 * (k + 2)  # grown by `Rows.reserve` as tokens arrive
    state = Rows(tokens=torch.zeros(b, capacity, dtype=torch.long, device=device),
                 hidden=torch.zeros(b, capacity, config.hidden_size, dtype=dtype, device=device),
                 last=mask.sum(1) - 1, produced=torch.ones(b, dtype=torch.long, device=device),
                 stopped=torch.isin(first, stop),
                 mtp_next=torch.zeros(k, b, dtype=torch.long, device=device))
    scatter_rows(state.tokens, positions, input_ids)
    scatter_rows(state.hidden, positions, mtp_hidden_input(model, h.to(device)))
    state.tokens[torch.arange(b, device=device), state.last + 1] = first
    return state, cache, mtp_caches


def new_tokens(state: Rows, prompt_len, steps: torch.Tensor, pad_token_id) -> torch.Tensor:
    """The new tokens at `steps` [n] of every row -> [b, n], as plain decoding returns them: after its
    stop token (or its last token) a row repeats it, or pad_token_id."""
    produced = state.produced[:, None]
    ids = gather_rows(state.tokens, prompt_len[:, None] + torch.minimum(steps, produced - 1))
    last_ids = gather_rows(state.tokens, prompt_len[:, None] + produced - 1)  # [b, 1]
    filler = last_ids if pad_token_id is None else torch.full_like(last_ids, pad_token_id)
    return torch.where(steps < produced, ids, filler)


@torch.no_grad()
def speculative_stream(model, input_ids, max_new_tokens: int, *, mtp_steps: int, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_token_ids=None,
                       attention_mask=None, pad_token_id: int | None = None,
                       stats: SpeculativeStats | None = None) -> Iterator[torch.Tensor]:
    """Same contract as `generate.stream` (the next token of every row, [batch], step after step),
    drafting `mtp_steps` tokens per cycle: a step is yielded as soon as every unfinished row has
    it, so tokens come in bursts of up to k + 1. `stats` (a SpeculativeStats) collects the
    acceptance lengths."""
    check_generation_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    k, blocks = whole_number("mtp_steps", mtp_steps), model.config.num_mtp_layers
    if not 1 <= k <= blocks:
        raise ValueError(f"mtp_steps={k}, but this checkpoint has {blocks} MTP blocks (drafting needs 1..{blocks})")
    if max_new_tokens == 0:
        return
    device = model.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    stop = stop_token_set(stop_token_ids, device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    sampler = None if temperature == 0 else Sampler(temperature, top_k, top_p, generator)

    state, cache, mtp_caches = start(model, input_ids, mask, k, max_new_tokens, sampler, stop)
    prompt_len, emitted = mask.sum(1), 0
    while True:
        active = state.active(max_new_tokens)
        running = bool(active.any())
        if not running:  # done: all steps (fewer when every row met its stop token)
            ready = int(state.produced.max()) if len(stop) and bool(state.stopped.all()) else max_new_tokens
        else:  # the steps every unfinished row has (finished rows repeat their last token)
            ready = int(state.produced.where(active, max_new_tokens).min())
        if ready > emitted:
            yield from new_tokens(state, prompt_len, torch.arange(emitted, ready, device=device), pad_token_id).T
        emitted = ready
        if not running:
            return
        state.reserve(int(state.last.max()) + k + 3)  # this cycle writes up to position last + k + 2
        drafts, draft_probs = draft(model, state, mtp_caches, active, sampler)
        logits, hidden = verify(model, state, drafts, cache, active)
        if sampler is None:
            accepted, next_token = accept_greedy(drafts, logits.argmax(-1))
        else:
            uniforms = torch.rand(drafts.shape, generator=generator, device=device)
            accepted, next_probs = accept_sampled(drafts, draft_probs, sampler.distribution(logits), uniforms)
            next_token = sampler.sample(next_probs)
        if stats is not None:
            stats.accept_lengths += (accepted + 1)[active].tolist()
        count = commit(state, drafts, accepted, next_token, hidden, active, stop, max_new_tokens)
        roll_back(state, cache, mtp_caches, count, active)


def speculative_generate(model, input_ids, max_new_tokens: int, *, mtp_steps: int, **options):
    """Same contract as `generate.generate`, drafting `mtp_steps` tokens per cycle. -> (ids, stats)."""
    stats = SpeculativeStats(mtp_steps)
    new = list(speculative_stream(model, input_ids, max_new_tokens, mtp_steps=mtp_steps, stats=stats, **options))
    if not new:
        return input_ids.clone(), stats
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1), stats
