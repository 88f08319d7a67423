"""MTP blocks: the equations, loading the released layout, drafting with loaded checkpoints.

The speculative decoding loop itself (acceptance rules, batches, stops, exact sampling) is tested in
test_speculative.py."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

import minimimo
import minimimo.defaults
from minimimo import MiMoConfig, MiMoForCausalLM, generate
from minimimo.cache import RingLayerCache
from minimimo.fp8 import blocks_below_max, choose_grid
from minimimo.mtp import mtp_hidden_input, mtp_logits, mtp_rope
from conftest import FIXTURES, REPO, SHARED_REFERENCE
from test_components import loop_attention


def mtp_model(window=3, vocab=256, seed=1, layers=8):
    config = MiMoConfig.tiny(num_hidden_layers=layers, sliding_window_size=window, num_mtp_layers=3, vocab_size=vocab)
    return MiMoForCausalLM(config).init_weights(seed).eval()


def rms(x, w, eps=1e-5):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def loop_mtp_block(model, k, tokens, hidden):
    """MTP block k written out per position: tokens [t], hidden [t, c] -> logits [t, V]."""
    blk, cfg = model.model.mtp.layers[k], model.config
    g = blk.geometry
    e = model.model.embed_tokens.weight[tokens]
    u = torch.cat([rms(e, blk.enorm.weight), rms(hidden, blk.hnorm.weight)], -1) @ blk.eh_proj.weight.T
    x = rms(u, blk.input_layernorm.weight)
    t = len(tokens)
    q = (x @ blk.self_attn.q_proj.weight.T).view(t, g.num_heads, g.head_dim)
    kk = (x @ blk.self_attn.k_proj.weight.T).view(t, g.num_kv_heads, g.head_dim)
    v = (x @ blk.self_attn.v_proj.weight.T).view(t, g.num_kv_heads, g.v_head_dim) * cfg.attention_value_scale
    half = g.rotary_dim // 2
    for p in range(t):  # rotate pairs (i, i + half) by p * theta^(-2i/rotary_dim)
        for i in range(half):
            angle = p * g.rope_theta ** (-2 * i / g.rotary_dim)
            c, s = math.cos(angle), math.sin(angle)
            for z in (q, kk):
                a, b = z[p, :, i].clone(), z[p, :, i + half].clone()
                z[p, :, i], z[p, :, i + half] = a * c - b * s, b * c + a * s
    visible = torch.tensor([[0 <= p - s <= g.window for s in range(t)] for p in range(t)])[None]
    attn = loop_attention(q.permute(1, 0, 2)[None], kk.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], visible,
                          blk.self_attn.attention_sink_bias, g.head_dim ** -0.5)
    x = u + attn[0].permute(1, 0, 2).reshape(t, -1) @ blk.self_attn.o_proj.weight.T
    y = rms(x, blk.pre_mlp_layernorm.weight)
    x = x + (F.silu(y @ blk.mlp.gate_proj.weight.T) * (y @ blk.mlp.up_proj.weight.T)) @ blk.mlp.down_proj.weight.T
    return rms(x, blk.final_layernorm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("hidden_switch", ["pre_norm", "post_norm"])
def test_mtp_block_matches_the_equations(hidden_switch):
    model = mtp_model(window=4)
    model.config.mtp_hidden = hidden_switch
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.trunk(ids)[-1]
        main_hidden = h if hidden_switch == "pre_norm" else model.model.norm(h)
        for k in range(3):  # every block reads the MAIN hidden state; tokens are shifted by k + 1
            n = 12 - k - 1
            ours = mtp_logits(model, k, ids[:, k + 1:k + 1 + n], mtp_hidden_input(model, h)[:, :n],
                              torch.arange(n)[None])
            ref = loop_mtp_block(model, k, ids[0, k + 1:k + 1 + n], main_hidden[0, :n])
            torch.testing.assert_close(ours[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not SHARED_REFERENCE.is_dir(), reason="needs ../shared/reference")
def test_released_layout_mtp_tensors_all_load_with_true_fp8_grids():
    from safetensors import safe_open

    case = SHARED_REFERENCE / "tiny-hub-fp8"
    weight_map = json.loads((case / "model.safetensors.index.json").read_text())["weight_map"]
    mtp_names = [n for n in weight_map if n.startswith("model.mtp.")]
    assert len(mtp_names) == 60
    model = minimimo.load(case, dtype=torch.float32, progress=False)
    assert model.config.num_mtp_layers == model.load_report.mtp_blocks == 3
    with safe_open(str(case / "model_mtp.safetensors"), "pt") as f:
        for name in mtp_names:
            if name.endswith("_scale_inv"):
                continue
            if name + "_scale_inv" in weight_map:
                w, s = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
                _, grid = choose_grid(w.shape, s.shape, (16, 16), fp8=w)
                assert blocks_below_max(w, grid, 16) == 0, name
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, ids, 20, mtp_steps=3), generate(model, ids, 20))


def test_repo_hub_fixture_with_one_mtp_block():
    model = minimimo.load(FIXTURES / "hub-fp8", dtype=torch.float32, progress=False)
    assert model.config.num_mtp_layers == 1
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, ids, 24, mtp_steps=1), generate(model, ids, 24))


@pytest.mark.skipif(not minimimo.defaults.BUNDLED.joinpath("config.json").is_file(), reason="no bundled checkpoint")
def test_trained_default_drafts_well_and_stays_lossless():
    """The bundled trained model on held-out code (bench/heldout_code.py, written for this repository
    and never trained on; a fixed file, so the prompts do not move when tests change): high
    acceptance, exact output."""
    directory = minimimo.default_checkpoint()
    model = minimimo.load(directory, dtype=torch.float32, progress=False)
    tok = minimimo.Tokenizer.from_pretrained(directory)
    assert model.config.num_mtp_layers == 3 and model.config.sliding_window_size <= 64
    text = (REPO / "bench" / "heldout_code.py").read_text()
    a, b = tok.encode(text[200:1400])[:70], tok.encode(text[2000:3000])[:45]
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, 25:], mask[1, 25:] = torch.tensor(b), 1
    plain = generate(model, ids, 100, attention_mask=mask)  # 170 positions: over twice the window
    for k in (1, 2, 3):
        spec, stats = generate(model, ids, 100, attention_mask=mask, mtp_steps=k, return_stats=True)
        assert torch.equal(spec, plain), k
    assert stats.mean_accept_length > 1.8  # k = 3 drafts accepted often on code it never saw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("at", [-1, 0, 5])
def test_mtp_logits_at_one_column_equal_the_full_computation(dtype, at):
    """at=i (drafting asks for the newest column only) == all columns, then column i: with and
    without a cache that wraps its ring, a left-padded row, a batch of 3, every block."""
    model = mtp_model(window=4).to(dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 16), generator=gen)
    hidden = torch.randn(3, 16, model.config.hidden_size, generator=gen).to(dtype)
    positions = torch.arange(16).expand(3, 16).clone()
    positions[1, :5] = -1  # row 1: five padding columns (never written, never seen)
    tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    with torch.no_grad():
        for k in range(3):
            full = mtp_logits(model, k, ids, hidden, positions)
            torch.testing.assert_close(mtp_logits(model, k, ids, hidden, positions, at=at), full[:, at], **tolerance)
            rings = [RingLayerCache(model.model.mtp.layers[k].geometry, 3, dtype, "cpu", reserve=3) for _ in range(2)]
            for ring in rings:  # 10 positions into 7 slots: the ring has wrapped
                mtp_logits(model, k, ids[:, :10], hidden[:, :10], positions[:, :10], ring)
            cached_full = mtp_logits(model, k, ids[:, 10:], hidden[:, 10:], positions[:, 10:], rings[0])
            cached_at = mtp_logits(model, k, ids[:, 10:], hidden[:, 10:], positions[:, 10:], rings[1], at=at)
            torch.testing.assert_close(cached_at, cached_full[:, at], **tolerance)
            torch.testing.assert_close(cached_full, full[:, 10:], **tolerance)
            assert torch.equal(rings[0].pos, rings[1].pos)  # at= still writes every position's keys
            torch.testing.assert_close(rings[0].k, rings[1].k, **tolerance)


def test_mtp_logits_with_a_shared_rope_table_equal_their_own():
    """cos_sin: the drafting loop computes one table per cycle and hands each block its columns."""
    model = mtp_model(window=4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=gen)
    positions = torch.arange(3, 12).expand(2, 9)
    cos, sin = mtp_rope(model, torch.arange(20).expand(2, 20), torch.float32)  # a wider table, sliced
    with torch.no_grad():
        for k in range(3):
            assert torch.equal(mtp_logits(model, k, ids, hidden, positions, cos_sin=(cos[:, 3:12], sin[:, 3:12])),
                               mtp_logits(model, k, ids, hidden, positions))
