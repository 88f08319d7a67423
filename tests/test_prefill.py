"""Chunked prefill (`minimimo.model.prefill`) against one pass over the whole prompt.

Window 4 and prompts of 23 tokens: chunks of 3, 5 and 8 cut across window boundaries, the rings
wrap several times inside the prompt, and left padding puts whole chunks of one row in padding.
"""

import pytest
import torch

import minimimo.attention
from minimimo import HybridCache, MiMoConfig, MiMoForCausalLM
from minimimo.generate import positions_from_mask
from minimimo.model import prefill

T, W = 23, 4


@pytest.fixture(scope="module")
def model():
    config = MiMoConfig.tiny(sliding_window_size=W, num_key_value_heads=2, swa_num_key_value_heads=4)
    return MiMoForCausalLM(config).init_weights(7).eval()


def prompt(pad: tuple[int, int]):
    """Two rows of T columns, row r left-padded by pad[r] tokens -> ids, positions."""
    ids = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(sum(pad)))
    mask = torch.ones(2, T, dtype=torch.long)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids, positions_from_mask(mask)


def greedy(model, cache, last_logits, positions, n: int) -> torch.Tensor:
    """n greedy tokens after a prefill, one cached decode step each -> [b, n]."""
    token, next_pos, out = last_logits.argmax(-1), positions[:, -1] + 1, []
    for _ in range(n):
        out.append(token)
        token = model(token[:, None], positions=next_pos[:, None], cache=cache)[:, -1].argmax(-1)
        next_pos = next_pos + 1
    return torch.stack(out, 1)


@pytest.mark.parametrize("pad", [(0, 0), (0, 7), (2, 9)])  # (2, 9): both rows padded, 2 columns of padding only
@pytest.mark.parametrize("chunk", [3, 5, 8])
def test_chunked_prefill_equals_one_pass(model, chunk, pad):
    ids, positions = prompt(pad)
    real = positions >= 0
    with torch.no_grad():
        reference = model(ids, positions=positions)  # one pass, no cache
        one_pass = HybridCache(model.config, 2)
        h_one = prefill(model, ids, one_pass, positions=positions, chunk=T)
        chunked = HybridCache(model.config, 2)
        h = prefill(model, ids, chunked, positions=positions, chunk=chunk)
        logits = model.logits(h)
        torch.testing.assert_close(logits[real], reference[real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.logits(h_one)[real], reference[real], atol=1e-4, rtol=1e-4)
        assert chunked.next_position == one_pass.next_position == T - min(pad)
        ids_chunked = greedy(model, chunked, logits[:, -1], positions, 12)  # 12 more steps: rings keep wrapping
        ids_one = greedy(model, one_pass, model.logits(h_one[:, -1]), positions, 12)
    assert torch.equal(ids_chunked, ids_one)


def test_chunked_prefill_in_bfloat16_stays_close(model):
    ids, positions = prompt((0, 7))
    real = positions >= 0
    model16 = MiMoForCausalLM(model.config).init_weights(7).to(torch.bfloat16).eval()
    with torch.no_grad():
        exact = model(ids, positions=positions)  # float32
        one = model16.logits(prefill(model16, ids, HybridCache(model.config, 2, dtype=torch.bfloat16),
                                     positions=positions, chunk=T)).float()
        chunked = model16.logits(prefill(model16, ids, HybridCache(model.config, 2, dtype=torch.bfloat16),
                                         positions=positions, chunk=5)).float()
    one_pass_error = (one - exact)[real].abs().max()
    chunked_error = (chunked - exact)[real].abs().max()
    assert chunked_error < 0.1 * exact.abs().max()  # bf16 rounding, not a wrong mask
    assert chunked_error < 3 * one_pass_error + 1e-2  # chunking adds no error of its own kind
    assert (chunked[real].argmax(-1) == exact[real].argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("reserve", [0, 3])
def test_sliding_layers_score_window_plus_chunk_keys(model, monkeypatch, reserve):
    """The memory bound itself: a sliding layer never scores more than W + reserve + chunk keys,
    a global layer never more than the positions seen so far. (The reference path, which calls
    `sink_attention`; tests/test_fast_attention.py checks the same bound on the fast path.)"""
    monkeypatch.setattr(minimimo.attention.Attention, "use_sdpa", False)
    seen = []
    original = minimimo.attention.sink_attention
    monkeypatch.setattr(minimimo.attention, "sink_attention",
                        lambda q, k, v, visible, sink, scale: seen.append((sink is not None, q.shape[2], k.shape[2]))
                        or original(q, k, v, visible, sink, scale))
    ids, positions = prompt((0, 0))
    with torch.no_grad():
        prefill(model, ids, HybridCache(model.config, 2, reserve=reserve), positions=positions, chunk=5)
    sliding = {keys for has_sink, _, keys in seen if has_sink}
    global_ = [keys for has_sink, _, keys in seen if not has_sink]
    assert max(sliding) == W + reserve + 5 and min(sliding) == W + reserve + 3  # last chunk: 3 tokens
    assert sorted(set(global_)) == [5, 10, 15, 20, 23]  # chunk x (all previous) keys
    assert max(queries for _, queries, _ in seen) == 5


def test_prefill_continues_a_cache_and_rejects_a_bad_chunk(model):
    ids, _ = prompt((0, 0))
    with torch.no_grad():
        cache = HybridCache(model.config, 2, reserve=2)
        prefill(model, ids[:, :9], cache, chunk=4)
        h = prefill(model, ids[:, 9:], cache, chunk=3)  # positions continue from the cache: 9..22
        torch.testing.assert_close(model.logits(h), model(ids)[:, 9:], atol=1e-4, rtol=1e-4)
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="chunk must be a positive integer"):
            prefill(model, ids, HybridCache(model.config, 2), chunk=bad)
