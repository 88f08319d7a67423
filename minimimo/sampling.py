"""Choosing tokens, and the options every decoding loop shares.

Plain decoding (`generate.py`) and speculative decoding (`speculative.py`) check the same options
and pick tokens the same way; both take them from here, so neither imports the other's insides.

    logits --/ temperature--> --top-k--> --top-p--> softmax = distribution --multinomial--> token

Temperature 0 is greedy: the argmax, no randomness. top-k keeps the k most likely tokens (0 = off);
top-p keeps the nucleus, the smallest set of most likely tokens whose probability reaches p (1 = off).

A batch of prompts of different lengths is left-padded; `positions_from_mask` gives every real
token its position 0, 1, 2, ... and every padding token -1, which no query can see.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, t] of 1 (token) / 0 (left padding) -> positions 0, 1, ... for tokens and -1 for padding."""
    mask = attention_mask.long()
    return torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> logits with -inf outside the top-k tokens and outside the top-p nucleus.

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


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [..., V] -> the float32 probabilities a token is sampled from (temperature > 0)."""
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


def sample(probs: torch.Tensor, generator) -> torch.Tensor:
    """probs [b, V] -> one token id per row [b]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits [b, V] -> token ids [b]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    return sample(distribution(logits, temperature, top_k, top_p), generator)


@dataclass(frozen=True)
class Sampler:
    """The sampling options of one run (temperature > 0), for loops that draw from several places."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        return distribution(logits, self.temperature, self.top_k, self.top_p)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        return sample(probs, self.generator)


def stop_token_set(stop_token_ids, device) -> torch.Tensor:
    """None, one id or a list of ids -> a sorted LongTensor of distinct ids (maybe empty)."""
    ids = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids or [])
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)


def whole_number(name: str, value, minimum: int = 0) -> int:
    """An option that counts something: an int (not a bool, not a float) >= minimum, or a named error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def real_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_generation_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask):
    """Every option of `generate` / `stream`, checked before any work: a named error for each."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor [batch, seq]")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    whole_number("max_new_tokens", max_new_tokens)
    if real_number("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    whole_number("top_k", top_k)  # 0 = off
    if not 0 < real_number("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({limit})")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= model.config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {model.config.vocab_size})")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor [batch, seq], got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != "
                             f"input_ids {tuple(input_ids.shape)}")
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
        if odd.numel():
            raise ValueError(f"attention_mask may hold only 0 (padding) and 1 (token), found {odd[0].item()}")
        m = attention_mask.long()
        if (m.diff(dim=1) < 0).any():
            raise ValueError("attention_mask must be left padding: zeros, then ones, in every row")
        if (m.sum(1) == 0).any():
            raise ValueError("attention_mask has a row without any token")
