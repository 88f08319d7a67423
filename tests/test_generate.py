"""The hybrid cache and generation: cached decode == full forward, ring buffer bytes, sampling, errors."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minimimo
from minimimo import HybridCache, MiMoConfig, MiMoForCausalLM, generate, stream
from minimimo.cache import RingLayerCache
from minimimo.sampling import filter_logits, next_token, positions_from_mask
from conftest import FIXTURES


@pytest.fixture(scope="module")
def model():
    config = MiMoConfig.tiny(sliding_window_size=3, num_key_value_heads=2, swa_num_key_value_heads=4)
    return MiMoForCausalLM(config).init_weights(5).eval()


@pytest.fixture(scope="module")
def mtp_model():
    config = MiMoConfig.tiny(num_hidden_layers=3, sliding_window_size=3, num_mtp_layers=3)
    return MiMoForCausalLM(config).init_weights(6).eval()


@pytest.mark.parametrize("prefill", [1, 2, 3, 4, 13])
def test_cached_decode_equals_full_forward_at_every_step(model, prefill):
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(prefill))
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, 2)
        steps = [model(ids[:, :prefill], cache=cache)]
        for i in range(prefill, 37):  # window 3: the ring wraps 11 times
            steps.append(model(ids[:, i:i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_one_shot(model):
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = HybridCache(model.config, 1)
        chunks = [model(ids[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 20), (20, 30)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=1e-4)


def test_ring_buffer_bytes_stay_constant_and_match_the_formula(model):
    config = model.config
    cache = HybridCache(config, 2, max_length=25)
    rings = [layer for layer in cache.layers if isinstance(layer, RingLayerCache)]
    sizes = []
    with torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
        for _ in range(20):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
            sizes.append(sum(r.nbytes() for r in rings))
    assert len(set(sizes)) == 1 and rings[0].k.shape[2] == config.sliding_window_size
    assert cache.nbytes() == config.kv_cache_bytes(25, "float32", "hybrid", batch=2)


def test_kv_cache_formula_for_flash():
    c = MiMoConfig.flash()
    per_token_global = 9 * 4 * (192 + 128) * 2
    ring = 39 * 8 * (192 + 128) * 2 * 128
    assert c.kv_cache_bytes(262144) == 262144 * per_token_global + ring
    assert c.kv_cache_bytes(262144, layout="all-global") == 48 * 262144 * 4 * 320 * 2
    ratio = c.kv_cache_bytes(262144, layout="all-global") / c.kv_cache_bytes(262144)
    assert 5.3 < ratio < 5.33  # -> 48/9 = 5.33 as context grows; "~6x" is the 5:1 SWA:GA ideal
    with pytest.raises(ValueError, match="layout"):
        c.kv_cache_bytes(10, layout="paged")


def test_greedy_matches_official_for_every_repo_fixture():
    for case in sorted(p.parent for p in FIXTURES.glob("*/expected.safetensors")):
        if case.name == "bf16":
            continue  # bf16 greedy is compared in test_official_outputs (informative)
        exp = load_file(str(case / "expected.safetensors"))
        m = minimimo.load(case, dtype=torch.float32, progress=False)
        n = exp["greedy_ids"].shape[1] - exp["input_ids"].shape[1]
        out = generate(m, exp["input_ids"], n, attention_mask=exp.get("attention_mask"))
        assert torch.equal(out, exp["greedy_ids"]), case.name
        for row in range(exp["input_ids"].shape[0]):
            if f"greedy_ids_unpadded.{row}" in exp:  # each padded row == that prompt alone
                alone = exp[f"greedy_ids_unpadded.{row}"]
                prompt = alone[:, : alone.shape[1] - n]
                assert torch.equal(generate(m, prompt, n), alone)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 11, 7)]
    width = max(p.shape[1] for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - p.shape[1], dtype=torch.long), p[0]]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - p.shape[1] for p in prompts]).long()
    batch = generate(model, ids, 15, attention_mask=mask)
    for row, p in enumerate(prompts):
        assert torch.equal(batch[row, width:], generate(model, p, 15)[0, p.shape[1]:])


def test_stream_yields_what_generate_returns(model):
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    streamed = torch.stack(list(stream(model, ids, 9, temperature=0.9, seed=3)), 1)
    assert torch.equal(generate(model, ids, 9, temperature=0.9, seed=3)[:, 6:], streamed)


def test_sampling_repeats_with_a_seed_and_varies_without(model):
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(2))
    a = generate(model, ids, 20, temperature=1.0, seed=7)
    assert torch.equal(a, generate(model, ids, 20, temperature=1.0, seed=7))
    assert not torch.equal(a, generate(model, ids, 20, temperature=1.0, seed=8))


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(next_token(logits, 1.0, 2, 1.0, gen).tolist()) == {0, 1}
    # probabilities ~ .64 .23 .09 .03 ...: nucleus 0.8 keeps the first two (0.64 < 0.8 <= 0.87)
    assert set(next_token(logits, 1.0, 0, 0.8, gen).tolist()) == {0, 1}
    assert set(next_token(logits, 1.0, 0, 0.5, gen).tolist()) == {0}
    filtered = filter_logits(logits[:1], top_k=3, top_p=0.95)
    assert torch.isinf(filtered[0, 3:]).all() and torch.isfinite(filtered[0, :3]).all()


def test_stop_tokens_end_rows_and_the_stream(model):
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    free = generate(model, ids, 12)
    stop = int(free[0, 7])  # the 3rd token row 0 emits
    out = generate(model, ids, 12, stop_token_ids=[stop], pad_token_id=0)
    first = int((free[0, 5:] == stop).nonzero()[0])
    assert torch.equal(out[0, 5:5 + first + 1], free[0, 5:5 + first + 1])
    assert (out[0, 5 + first + 1:] == 0).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=float("-inf")), ValueError, "temperature must be finite"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(temperature=True), TypeError, "temperature must be a number"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k must be an integer >= 0"),
    (dict(top_k=2.5, temperature=1.0), TypeError, "top_k must be an integer"),
    (dict(top_k=True, temperature=1.0), TypeError, "top_k must be an integer"),
    (dict(max_new_tokens=5000), ValueError, "max_position_embeddings"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer"),
    (dict(max_new_tokens=3.0), TypeError, "max_new_tokens must be an integer"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an integer"),
    (dict(mtp_steps=1.5), TypeError, "mtp_steps must be an integer"),
    (dict(mtp_steps=-1), ValueError, "mtp_steps must be an integer >= 0"),
    (dict(mtp_steps=True), TypeError, "mtp_steps must be an integer"),
    (dict(attention_mask=torch.tensor([[2, 2, 2]])), ValueError, "attention_mask may hold only 0 .* found 2"),
    (dict(attention_mask=torch.tensor([[0, 1, 2]])), ValueError, "attention_mask may hold only 0"),
    (dict(attention_mask=torch.tensor([[-1, 1, 1]])), ValueError, "attention_mask may hold only 0"),
    (dict(attention_mask=torch.tensor([[0.5, 1, 1]])), ValueError, "attention_mask may hold only 0"),
    (dict(attention_mask=[[1, 1, 1]]), TypeError, "attention_mask must be a tensor"),
])
@pytest.mark.parametrize("mtp", [0, 2])
def test_bad_arguments_get_an_error_that_names_them(mtp_model, kwargs, error, match, mtp):
    """Plain and speculative decoding check the same options, before any work."""
    kwargs = {"max_new_tokens": 4, "mtp_steps": mtp, **kwargs}
    with pytest.raises(error, match=match):
        generate(mtp_model, torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_good_edge_arguments_still_work(mtp_model):
    ids = torch.zeros(1, 3, dtype=torch.long)
    plain = generate(mtp_model, ids, 4)
    assert torch.equal(generate(mtp_model, ids, np.int64(4)), plain)  # numpy integers count as integers
    assert torch.equal(generate(mtp_model, ids, 4, attention_mask=torch.ones(1, 3, dtype=torch.bool)), plain)
    assert torch.equal(generate(mtp_model, ids, 4, attention_mask=torch.ones(1, 3)), plain)  # float 0./1. masks
    assert torch.equal(generate(mtp_model, ids, 4, temperature=0), plain)  # an int temperature
    assert generate(mtp_model, ids, 4, temperature=1, top_k=np.int32(3), seed=0).shape == plain.shape


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.zeros(1, 4097, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 3, attention_mask=torch.tensor([[1, 0, 1]]))


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3]]
