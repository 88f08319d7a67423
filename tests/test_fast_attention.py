"""The fast attention path (`Attention.use_sdpa`, the default) against the einops reference.

`Attention.use_sdpa = False` runs `visibility_mask` + `sink_attention` in every layer, as the
notebooks teach; True runs `sdpa_attention` on additive masks that `SharedMasks` builds once per
forward pass and key layout (on the CPU two products of its own; elsewhere torch's fused kernel,
the sink as one more key: zero key and value, its logit in the mask). Here both run on the same weights and inputs: the attention alone (fully masked rows too),
then whole models: left padding, rings that wrap, chunked prefill, bfloat16, MTP speculative
decoding with rollback. Then what the fast path is for: fewer torch calls per decode step.

Tolerances: float32 within rounding (atol 1e-5 on the attention, 1e-5 on logits of magnitude ~5);
bfloat16 within one bf16 rounding of the output (atol = rtol = 2^-7 ~ 0.008) for torch's fused
kernel. The CPU path does the reference's operations in the reference's order and dtypes, so the
attention alone is held equal to the last bit there (float32 and bfloat16); whole models are
held to the tolerances above.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import minimimo.attention
from minimimo import HybridCache, MiMoConfig, MiMoForCausalLM, generate
from minimimo.attention import Attention, SharedMasks, additive_mask, sdpa_attention, sink_attention, visibility_mask
from minimimo.cache import GlobalLayerCache, RingLayerCache
from minimimo.model import prefill
from minimimo.sampling import positions_from_mask

W = 4  # window of the models below: prompts of 11 and 12 new tokens wrap every ring several times


@pytest.fixture
def reference(monkeypatch):
    """Call reference(True) for the einops reference, reference(False) for the fast path."""
    return lambda on: monkeypatch.setattr(Attention, "use_sdpa", not on)


@pytest.fixture(scope="module")
def model():
    config = MiMoConfig.tiny(sliding_window_size=W, num_key_value_heads=2, swa_num_key_value_heads=4, num_mtp_layers=3)
    return MiMoForCausalLM(config).init_weights(3).eval()


def padded_prompt(batch=3, width=11, pads=(0, 4, 9), seed=0):
    ids = torch.randint(0, 256, (batch, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, width, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids, mask


def fast(q, k, v, q_pos, k_pos, window, sink, fused=None):
    return sdpa_attention(q, k, v, SharedMasks(q_pos).mask(k_pos, window, q.dtype), sink, q.shape[-1] ** -0.5, fused)


def attention_case(dtype, seed=0):
    """Two rows: row 0 a ring read (stored slots in ring order, one empty, then 3 new tokens);
    row 1 a left-padded prompt: its 2 padding queries see no key at all."""
    gen = torch.Generator().manual_seed(seed)
    b, h, g, t, s, d, e = 2, 8, 2, 3, 9, 24, 16
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype) for shape in
               ((b, h, t, d), (b, g, s, d), (b, g, s, e)))
    q_pos = torch.tensor([[7, 8, 9], [-1, -1, 0]])
    k_pos = torch.tensor([[6, 3, 4, 5, -1, 2, 7, 8, 9], [-1, -1, -1, -1, -1, -1, -1, -1, 0]])
    return q, k, v, q_pos, k_pos, torch.randn(h, generator=gen) * 2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("window,with_sink", [(3, True), (None, False), (3, False), (None, True)])
def test_sdpa_attention_equals_sink_attention_padding_rows_included(window, with_sink, fused):
    q, k, v, q_pos, k_pos, sink = attention_case(torch.float32)
    sink = sink if with_sink else None
    expected = sink_attention(q, k, v, visibility_mask(q_pos, k_pos, window), sink, 24 ** -0.5)
    got = fast(q, k, v, q_pos, k_pos, window, sink, fused)
    assert torch.isfinite(expected).all() and torch.isfinite(got).all()  # rows that see no key: no 0/0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # padding rows included
    assert fused or torch.equal(got, expected)  # the CPU path: the reference's operations in its order


@pytest.mark.parametrize("fused", [False, True])
def test_sdpa_attention_in_bfloat16_within_one_rounding(fused):
    q, k, v, q_pos, k_pos, sink = attention_case(torch.bfloat16, seed=1)
    exact = sink_attention(q.float(), k.float(), v.float(), visibility_mask(q_pos, k_pos, 3), sink, 24 ** -0.5)
    expected = sink_attention(q, k, v, visibility_mask(q_pos, k_pos, 3), sink, 24 ** -0.5)
    got = fast(q, k, v, q_pos, k_pos, 3, sink, fused)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), atol=2 ** -7, rtol=2 ** -7)
    assert (got.float() - exact).abs().max() <= 2 * (expected.float() - exact).abs().max() + 2 ** -8
    assert fused or torch.equal(got, expected)  # the CPU path rounds where the reference does


def test_a_padding_only_row_gives_the_reference_output_not_nan():
    """The mask's invisible entries are the lowest finite value, not -inf: a query that sees no
    key gets what the reference gives it (a plain average over the slots; zero with a sink)."""
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 3)
    q_pos, k_pos = torch.tensor([[-1]]), torch.tensor([[-1, 0, 1, -1]])
    for sink in (None, torch.zeros(2)):
        for fused in (False, True):
            got = fast(q, k, v, q_pos, k_pos, None, sink, fused)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, sink_attention(q, k, v, visibility_mask(q_pos, k_pos, None), sink, 8 ** -0.5))
    assert torch.equal(additive_mask(torch.tensor([[[True, False]]]), torch.bfloat16),
                       torch.tensor([[[[0.0, torch.finfo(torch.bfloat16).min]]]], dtype=torch.bfloat16))


# --- whole models: fast == reference --------------------------------------------------------------

def decode(model, ids, mask, steps, chunk):
    """Chunked prefill, then `steps` greedy steps, one token each -> (logits [b, steps + 1, V], ids)."""
    positions = positions_from_mask(mask)
    cache = HybridCache(model.config, ids.shape[0], dtype=model.dtype)
    with torch.no_grad():
        logits = [model.logits(prefill(model, ids, cache, positions=positions, chunk=chunk)[:, -1:])]
        next_pos = positions[:, -1:] + 1
        for _ in range(steps):
            token = logits[-1][:, -1].argmax(-1, keepdim=True)
            logits.append(model(token, positions=next_pos, cache=cache))
            next_pos = next_pos + 1
    logits = torch.cat(logits, 1)
    return logits, logits.argmax(-1)


@pytest.mark.parametrize("chunk", [3, 11])
def test_whole_model_fast_equals_reference_padded_batch_wrapping_rings(model, reference, chunk):
    ids, mask = padded_prompt()
    positions = positions_from_mask(mask)
    runs = {}
    for on in (True, False):
        reference(on)
        with torch.no_grad():
            full = model(ids, positions=positions)  # no cache: every query position, padding included
        runs[on] = full, *decode(model, ids, mask, steps=12, chunk=chunk), generate(model, ids, 12, attention_mask=mask)
    (full_ref, logits_ref, ids_ref, gen_ref), (full, logits, ids_fast, gen) = runs[True], runs[False]
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, full_ref, atol=1e-5, rtol=1e-5)  # padding positions too
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids_fast, ids_ref) and torch.equal(gen, gen_ref)


def test_whole_model_in_bfloat16_same_greedy_ids(model, reference):
    model16 = MiMoForCausalLM(model.config).init_weights(3).to(torch.bfloat16).eval()
    ids, mask = padded_prompt(seed=1)
    runs = {}
    for on in (True, False):
        reference(on)
        runs[on] = decode(model16, ids, mask, steps=12, chunk=5)
    (logits_ref, ids_ref), (logits, ids_fast) = runs[True], runs[False]
    assert torch.equal(ids_fast, ids_ref)
    torch.testing.assert_close(logits.float(), logits_ref.float(), atol=0.05, rtol=2 ** -7)  # bf16 rounding


@pytest.mark.parametrize("mtp_steps", [2, 3])
def test_mtp_speculative_decoding_on_the_fast_path_equals_plain_greedy(model, reference, mtp_steps):
    """Drafts are rejected and rolled back (random MTP blocks guess badly), rings wrap, rows finish
    apart: the fast path's speculative tokens == the reference's plain greedy tokens."""
    ids, mask = padded_prompt(seed=2)
    reference(True)
    plain = generate(model, ids, 14, attention_mask=mask)
    reference(False)
    speculative = generate(model, ids, 14, attention_mask=mask, mtp_steps=mtp_steps)
    assert torch.equal(speculative, plain)


def test_layers_of_one_kind_hold_the_same_positions(model):
    """Why `SharedMasks` may share a mask between layers: after padding, wrapping and a rollback,
    every ring layer of a HybridCache holds the same positions slot for slot, and so does every
    global layer."""
    ids, mask = padded_prompt(seed=3)
    cache = HybridCache(model.config, 3, reserve=2, chunk=4)
    with torch.no_grad():
        prefill(model, ids, cache, positions=positions_from_mask(mask), chunk=4)
        model(ids[:, :3], positions=positions_from_mask(mask)[:, -1:] + torch.arange(1, 4), cache=cache)
        cache.truncate(torch.tensor([12, 8, 3]))  # roll back the last one or two tokens of each row
        model(ids[:, :1], cache=cache)
    for kind in (RingLayerCache, GlobalLayerCache):
        layers = [c for c in cache.layers if isinstance(c, kind)]
        assert len(layers) > 1 and all(torch.equal(c.pos, layers[0].pos) for c in layers)


@pytest.mark.parametrize("reserve", [0, 3])
def test_fast_sliding_layers_score_window_plus_chunk_keys_and_the_sink(model, monkeypatch, reserve):
    """The memory bound of chunked prefill holds on the fast path: a sliding layer scores W +
    reserve + chunk keys, a global layer the positions seen so far (tests/test_prefill.py: the same
    on the reference path)."""
    seen = []
    original = minimimo.attention.sdpa_attention
    monkeypatch.setattr(minimimo.attention, "sdpa_attention",
                        lambda q, k, v, mask, sink, scale: seen.append((sink is not None, k.shape[2])) or
                        original(q, k, v, mask, sink, scale))
    ids, _ = padded_prompt(batch=2, width=23, pads=(0, 0))
    with torch.no_grad():
        prefill(model, ids, HybridCache(model.config, 2, reserve=reserve), chunk=5)
    sliding = {keys for has_sink, keys in seen if has_sink}
    assert max(sliding) == W + reserve + 5 and min(sliding) == W + reserve + 3
    assert sorted({keys for has_sink, keys in seen if not has_sink}) == [5, 10, 15, 20, 23]


# --- what the fast path is for ----------------------------------------------------------------------

def traced_decode_step(model, monkeypatch):
    """Profiles one cached decode step (batch 2, after a prompt) with every `Attention.forward` and
    cache `update` labelled -> (torch calls issued from Python inside attention per layer,
    host syncs inside cache updates, visibility masks built)."""
    def labelled(cls, name, label):
        method = getattr(cls, name)

        def run(*args, **kwargs):
            with record_function(label):
                return method(*args, **kwargs)
        monkeypatch.setattr(cls, name, run)
    masks_built = []
    original_mask = minimimo.attention.visibility_mask
    monkeypatch.setattr(minimimo.attention, "visibility_mask",
                        lambda *a: masks_built.append(1) or original_mask(*a))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = HybridCache(model.config, 2)
    with torch.no_grad():
        model(ids, cache=cache)
        labelled(Attention, "forward", "attention")
        labelled(RingLayerCache, "update", "cache")
        labelled(GlobalLayerCache, "update", "cache")
        masks_built.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids[:, :1], cache=cache)
    calls, syncs = 0, 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        labels, parent, nested = [], event.cpu_parent, False
        while parent is not None:
            nested |= parent.name.startswith("aten::")
            labels.append(parent.name)
            parent = parent.cpu_parent
        calls += not nested and "attention" in labels
        syncs += event.name == "aten::_local_scalar_dense" and "cache" in labels
    return calls / model.config.num_hidden_layers, syncs, len(masks_built)


def test_a_decode_step_builds_each_mask_once_and_issues_fewer_calls(model, reference, monkeypatch):
    reference(True)
    calls_ref, syncs_ref, masks_ref = traced_decode_step(model, monkeypatch)
    monkeypatch.undo()
    reference(False)
    calls, syncs, masks = traced_decode_step(model, monkeypatch)
    layers = model.config.num_hidden_layers
    assert masks_ref == layers and masks == 2  # one per layer before; one per kind (global, sliding) now
    assert syncs_ref >= layers and syncs <= 2  # the positions asked once per pass (PositionFacts), not per layer
    assert calls < 0.75 * calls_ref, (calls, calls_ref)  # per layer, attention and its cache write: ~44 against ~63
