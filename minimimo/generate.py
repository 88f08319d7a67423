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
from .model import prefill
from .sampling import check_generation_args, next_token, positions_from_mask, stop_token_set, whole_number
from .speculative import SpeculativeStats, speculative_generate, speculative_stream
from .static_decode import CompiledDecode, check_compile_args


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: int | None = None, stop_token_ids=None,
           attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None, mtp_steps: int = 0,
           stats: SpeculativeStats | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yields the next token of every row ([batch] LongTensor) as soon as it is chosen.

    A row that has emitted a stop token keeps yielding `pad_token_id` (default: its stop token)
    until every row has stopped; then the stream ends. mtp_steps=k drafts with the MTP blocks
    (`speculative.speculative_stream`): the same tokens, in bursts of up to k + 1 per main forward;
    `stats` collects the acceptance lengths. compile=True decodes with `static_decode_step` under
    `torch.compile` (`static_decode.py`): the first call compiles for a while (tens of seconds on
    a CPU), then each step costs a fraction of an eager one; the tokens are the same.
    """
    check_compile_args(model, compile, mtp_steps)
    if whole_number("mtp_steps", mtp_steps):
        yield from speculative_stream(model, input_ids, max_new_tokens, mtp_steps=mtp_steps, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids,
                                      attention_mask=attention_mask, pad_token_id=pad_token_id, stats=stats)
        return
    check_generation_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    b, t = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    positions = positions_from_mask(mask)
    stop = stop_token_set(stop_token_ids, device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    cache = HybridCache(model.config, b, dtype=model.dtype, device=model.layer_devices(), max_length=t + max_new_tokens)
    logits = model.logits(prefill(model, input_ids, cache, positions=positions)[:, -1])  # in chunks
    if compile:  # the decode steps run on fixed-size copies of what the prefill cached
        compiled = CompiledDecode(model, cache, t + max_new_tokens)
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
        if compile:
            logits = compiled(token, next_pos)
        else:
            logits = model(token[:, None], positions=next_pos[:, None], cache=cache)[:, -1]
        next_pos = next_pos + 1


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, mtp_steps: int = 0,
             return_stats: bool = False, **kwargs):
    """Prompt [batch, prompt] -> [batch, prompt + new] token ids (see `stream` for the options:
    temperature, top_k, top_p, seed, stop_token_ids, attention_mask, pad_token_id, compile).

    mtp_steps=k (1..3) drafts k tokens per cycle with the MTP blocks and verifies them in one
    main-model forward (`speculative.py`): greedy output is the plain greedy one (token for token in
    float32; bfloat16 may round the verify pass differently, see there), sampled output has the
    main model's distribution. return_stats=True returns
    (ids, stats) with `stats.accept_lengths` (tokens produced per main-model decode forward).
    """
    check_compile_args(model, kwargs.get("compile", False), mtp_steps)
    if whole_number("mtp_steps", mtp_steps):
        kwargs.pop("compile", None)  # False here (checked above); speculative decoding has no such option
        ids, stats = speculative_generate(model, input_ids, max_new_tokens, mtp_steps=mtp_steps, **kwargs)
        return (ids, stats) if return_stats else ids
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    ids = input_ids.clone() if not new else torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)
    if return_stats:
        return ids, SpeculativeStats(0, [1] * max(0, len(new) - 1) * input_ids.shape[0])
    return ids
