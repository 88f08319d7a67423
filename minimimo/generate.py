"""Text generation with the hybrid KV cache: greedy, temperature, top-k, top-p, batches with left padding.

    ids = minimimo.generate(model, prompt_ids, max_new_tokens=32)                   # greedy
    ids = minimimo.generate(model, prompt_ids, 32, temperature=0.8, top_p=0.95, seed=0)
    for token in minimimo.stream(model, prompt_ids, 32): ...                        # as they come

One prefill pass runs the whole prompt and fills the cache; then each step feeds one token per
row at its own position. Prompts of different lengths are left-padded: the attention mask gives
each real token its position (0, 1, 2, ...) and every padding token position -1, which no query
can see, so each row computes exactly what it would compute alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .cache import HybridCache


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, t] of 1 (token) / 0 (left padding) -> positions 0, 1, ... for tokens and -1 for padding."""
    mask = attention_mask.long()
    return torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [b, V] -> logits with -inf outside the top-k tokens and outside the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the
    token that crosses the threshold is kept, so at least one token always survives).
    """
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p
        logits[drop_sorted.scatter(-1, order, drop_sorted)] = float("-inf")
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits [b, V] -> token ids [b]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_generation_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor [batch, seq]")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({limit})")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= model.config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {model.config.vocab_size})")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        m = attention_mask.long()
        if (m.diff(dim=1) < 0).any():
            raise ValueError("attention_mask must be left padding: zeros, then ones, in every row")
        if (m.sum(1) == 0).any():
            raise ValueError("attention_mask has a row without any token")


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: int | None = None, stop_token_ids=None,
           attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row ([batch] LongTensor) as soon as it is chosen.

    A row that has emitted a stop token keeps yielding `pad_token_id` (default: its stop token)
    until every row has stopped; then the stream ends.
    """
    check_generation_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    b, t = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    positions = positions_from_mask(mask)
    stop = torch.tensor(sorted(set([stop_token_ids] if isinstance(stop_token_ids, int) else stop_token_ids or [])),
                        dtype=torch.long, device=device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    cache = HybridCache(model.config, b, dtype=model.dtype, device=model.layer_devices(), max_length=t + max_new_tokens)
    logits = model(input_ids, positions=positions, cache=cache)[:, -1]
    next_pos = positions[:, -1] + 1
    done = torch.zeros(b, dtype=torch.bool, device=device)
    filler = torch.full((b,), -1, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)
        token = torch.where(done, filler, token)
        yield token
        if len(stop):
            hit = torch.isin(token, stop) & ~done
            filler = torch.where(hit, token if pad_token_id is None else torch.full_like(token, pad_token_id), filler)
            done |= hit
            if done.all():
                return
        if step == max_new_tokens - 1:
            return  # the last token needs no forward
        logits = model(token[:, None], positions=next_pos[:, None], cache=cache)[:, -1]
        next_pos = next_pos + 1


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, mtp_steps: int = 0,
             return_stats: bool = False, **kwargs):
    """Prompt [batch, prompt] -> [batch, prompt + new] token ids (see `stream` for the options:
    temperature, top_k, top_p, seed, stop_token_ids, attention_mask, pad_token_id).

    mtp_steps=k (1..3) drafts k tokens per cycle with the MTP blocks and verifies them in one
    main-model forward (`speculative.py`): greedy output is token for token the plain greedy one,
    sampled output has exactly the main model's distribution. return_stats=True returns
    (ids, stats) with `stats.accept_lengths` (tokens produced per main-model decode forward).
    """
    if mtp_steps:
        from .speculative import speculative_generate

        ids, stats = speculative_generate(model, input_ids, max_new_tokens, mtp_steps=mtp_steps, **kwargs)
        return (ids, stats) if return_stats else ids
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    ids = input_ids.clone() if not new else torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)
    if return_stats:
        from .speculative import SpeculativeStats

        return ids, SpeculativeStats(0, [1] * max(0, len(new) - 1) * input_ids.shape[0])
    return ids
