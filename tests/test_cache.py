"""The hybrid KV cache: memory follows the tokens actually written, decode across growth == full forward."""

import pytest
import torch

from minimimo import HybridCache, MiMoConfig, MiMoForCausalLM
from minimimo.cache import GlobalLayerCache, PositionFacts, RingLayerCache


@pytest.fixture(scope="module")
def model():
    config = MiMoConfig.tiny(sliding_window_size=3, num_key_value_heads=2, swa_num_key_value_heads=4)
    return MiMoForCausalLM(config).init_weights(5).eval()


def slot_bytes(cache, kind) -> int:
    """Bytes of keys + values per slot, summed over the layers of one kind (one batch row)."""
    return sum((c.k.shape[1] * c.k.shape[3] + c.v.shape[1] * c.v.shape[3]) * c.k.element_size()
               for c in cache.layers if isinstance(c, kind))


def test_a_huge_max_length_reserves_nothing_for_tokens_never_generated(model):
    config = model.config
    cache = HybridCache(config, 2, max_length=1_000_000, chunk=16)  # "a million new tokens, please"
    rings = [c for c in cache.layers if isinstance(c, RingLayerCache)]
    ring_bytes = sum(c.nbytes() for c in rings)
    assert ring_bytes == 2 * slot_bytes(cache, RingLayerCache) * config.sliding_window_size  # W slots each
    assert cache.nbytes() == ring_bytes  # the global buffers hold nothing before the first token
    with torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)  # prompt of 5
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)  # one new token, then the caller stops
    assert cache.nbytes() == ring_bytes + 2 * slot_bytes(cache, GlobalLayerCache) * 16  # one chunk of 16 slots


def test_global_buffers_grow_geometrically_and_never_past_max_length(model):
    capacities = {}
    for max_length in (None, 100):
        cache = HybridCache(model.config, 1, max_length=max_length, chunk=4)
        layer = next(c for c in cache.layers if isinstance(c, GlobalLayerCache))
        seen = []
        with torch.no_grad():
            for p in range(100):
                model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
                seen.append(layer.k.shape[2])
                assert p + 1 <= layer.k.shape[2] <= max(4, 2 * (p + 1))  # holds what was written, at most 2x
        capacities[max_length] = sorted(set(seen))
    assert capacities[None] == [4, 8, 16, 32, 64, 128]  # 5 copies for 100 tokens, not 25
    assert capacities[100] == [4, 8, 16, 32, 64, 100]


@pytest.mark.parametrize("chunk,max_length", [(2, None), (4, 23), (5, None)])
def test_decode_across_growth_boundaries_equals_the_full_forward(model, chunk, max_length):
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(chunk))
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, 2, chunk=chunk, max_length=max_length)
        steps = [model(ids[:, :3], cache=cache)]
        steps += [model(ids[:, i:i + 1], cache=cache) for i in range(3, 40)]  # window 3: rings wrap too
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_truncate_then_growth_keeps_forgotten_slots_invisible(model):
    """Rolled-back positions are rewritten after the buffers have grown: the result is still the
    full forward over the tokens finally kept."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=gen)
    wrong = torch.randint(0, model.config.vocab_size, (1, 4), generator=gen)
    with torch.no_grad():
        cache = HybridCache(model.config, 1, chunk=2, reserve=4)
        model(ids[:, :8], cache=cache)
        model(wrong, cache=cache)  # positions 8..11, then rolled back
        cache.truncate(torch.tensor([8]))
        tail = model(ids[:, 8:], cache=cache)
    torch.testing.assert_close(tail, model(ids)[:, 8:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [
    [[5], [9]],  # a decode step: every token real
    [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]],  # a padded prefill longer than the ring: the padding is dropped
    [[-1, 0, 1], [-1, -1, 0]],  # padding among the tokens kept
])
def test_writes_told_the_positions_facts_equal_writes_that_ask(model, rows):
    """`PositionFacts` (asked once per forward pass and handed to every layer) changes nothing a
    cache stores or returns, for the ring (which keeps only its newest W tokens) and the global buffer."""
    positions = torch.tensor(rows)
    b, t = positions.shape
    for geometry, make in ((model.config.attention(1), lambda g: RingLayerCache(g, b, torch.float32, "cpu")),
                           (model.config.attention(0), lambda g: GlobalLayerCache(g, b, torch.float32, "cpu"))):
        k = torch.randn(b, geometry.num_kv_heads, t, geometry.head_dim)
        v = torch.randn(b, geometry.num_kv_heads, t, geometry.v_head_dim)
        told, asking = make(geometry), make(geometry)
        for got, want in zip(told.update(k, v, positions, PositionFacts(positions)), asking.update(k, v, positions)):
            assert torch.equal(got, want)
        assert torch.equal(told.k, asking.k) and torch.equal(told.v, asking.v) and torch.equal(told.pos, asking.pos)
        assert sorted(told.pos[told.pos >= 0].tolist()) == sorted(p for row in rows for p in row[-told.k.shape[2]:] if p >= 0)
