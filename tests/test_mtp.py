"""MTP blocks and speculative decoding: the equations, losslessness, exact sampling, loading."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

import minimimo
import minimimo.defaults
import minimimo.speculative as speculative
from minimimo import MiMoConfig, MiMoForCausalLM, generate
from minimimo.fp8 import blocks_below_max, choose_grid
from minimimo.generate import positions_from_mask
from minimimo.mtp import mtp_logits
from conftest import FIXTURES, SHARED_REFERENCE
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
            ours = mtp_logits(model, k, ids[:, k + 1:k + 1 + n], speculative.mtp_hidden_input(model, h)[:, :n],
                              torch.arange(n)[None])
            ref = loop_mtp_block(model, k, ids[0, k + 1:k + 1 + n], main_hidden[0, :n])
            torch.testing.assert_close(ours[0], ref, atol=1e-4, rtol=1e-4)


def padded_batch(lengths, vocab, seed=0):
    width = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths]).long()
    return ids * mask, mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculative_equals_plain_greedy_random_mtp(k):
    model = mtp_model(window=3)
    ids, mask = padded_batch([17, 9, 4], 256)  # prompts and generation many times the window
    plain = generate(model, ids, 30, attention_mask=mask)
    spec, stats = generate(model, ids, 30, attention_mask=mask, mtp_steps=k, return_stats=True)
    assert torch.equal(spec, plain)
    assert all(1 <= n <= k + 1 for n in stats.accept_lengths)


def oracle_drafts(model, ids, mask, n, wrong_every):
    """Drafts that copy the true greedy continuation except every `wrong_every`-th position."""
    plain = generate(model, ids, n, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(len(ids), n, dtype=torch.long)], 1)
    positions = positions_from_mask(full_mask)
    reference = torch.zeros(len(ids), positions.max() + 8, dtype=torch.long)
    for row in range(len(ids)):
        keep = positions[row] >= 0
        reference[row, positions[row][keep]] = plain[row][keep]

    def fake(model_, k, tokens, hidden, pos, cache=None):
        target = reference.gather(1, (pos.clamp_min(0) + k + 2).clamp_max(reference.shape[1] - 1))
        target = torch.where((pos + k) % wrong_every == 0, (target + 1) % model.config.vocab_size, target)
        return F.one_hot(target, model.config.vocab_size).float() * 30

    return plain, fake


@pytest.mark.parametrize("wrong_every", [10**6, 5, 2])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rejected_drafts_leave_no_trace_across_ring_wraps(monkeypatch, k, wrong_every):
    model = mtp_model(window=3)
    ids, mask = padded_batch([13, 6], 256, seed=2)
    plain, fake = oracle_drafts(model, ids, mask, 36, wrong_every)
    monkeypatch.setattr(speculative, "mtp_logits", fake)
    spec, stats = generate(model, ids, 36, attention_mask=mask, mtp_steps=k, return_stats=True)
    assert torch.equal(spec, plain)
    if wrong_every == 10**6:  # perfect drafts: every cycle accepts everything
        assert set(stats.accept_lengths) == {k + 1}
    else:
        assert len(set(stats.accept_lengths)) > 1


def test_speculative_sampling_matches_the_target_distribution():
    """Chi-square on the 2nd and 3rd sampled tokens (vocab 8): would fail if drafts were just accepted."""
    model = mtp_model(window=2, vocab=8, seed=3, layers=3)
    prompt = torch.tensor([[1, 5, 2]])
    with torch.no_grad():  # exact marginals of the 2nd and 3rd new tokens, by enumeration
        p1 = model(prompt)[0, -1].softmax(-1)
        seq2 = torch.cat([prompt.repeat(8, 1), torch.arange(8)[:, None]], 1)
        p2_given = model(seq2)[:, -1].softmax(-1)  # [t1, t2]
        seq3 = torch.cat([seq2.repeat_interleave(8, 0), torch.arange(8).repeat(8)[:, None]], 1)
        p3_given = model(seq3)[:, -1].softmax(-1).view(8, 8, 8)
        joint12 = p1[:, None] * p2_given
        marginal2, marginal3 = joint12.sum(0), (joint12[..., None] * p3_given).sum((0, 1))
    n = 6000
    out, stats = generate(model, prompt.repeat(n, 1), 3, temperature=1.0, seed=11, mtp_steps=2, return_stats=True)
    assert stats.mean_accept_length > 1.05  # some drafts were accepted (and some rejected)
    for column, expected in ((4, marginal2), (5, marginal3)):
        counts = torch.bincount(out[:, column], minlength=8).float()
        chi2 = ((counts - n * expected) ** 2 / (n * expected)).sum()
        assert chi2 < 24.3, f"token {column - 2}: chi2 {chi2:.1f} (7 dof, p = 0.001 bound 24.3)"
    # the draft distribution itself is far from the target: accepting drafts blindly would fail
    with torch.no_grad():
        h = model.trunk(prompt)[-1]
        q = mtp_logits(model, 0, torch.tensor([[3]]), h[:, -1:], torch.tensor([[2]]))[0, -1].softmax(-1)
    assert (q - p2_given[3]).abs().sum() > 0.2


def test_mtp_steps_beyond_the_checkpoint_is_an_error():
    model = MiMoForCausalLM(MiMoConfig.tiny()).init_weights(0).eval()
    with pytest.raises(ValueError, match="0 MTP blocks"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 4, mtp_steps=1)


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
                _, grid = choose_grid(w, s, (16, 16))
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
    """The bundled trained model on held-out code (this test file): high acceptance, exact output."""
    directory = minimimo.default_checkpoint()
    model = minimimo.load(directory, dtype=torch.float32, progress=False)
    tok = minimimo.Tokenizer.from_pretrained(directory)
    assert model.config.num_mtp_layers == 3 and model.config.sliding_window_size < 40
    text = open(__file__).read()
    a, b = tok.encode(text[200:1400])[:70], tok.encode(text[2000:3000])[:45]
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, 25:], mask[1, 25:] = torch.tensor(b), 1
    plain = generate(model, ids, 100, attention_mask=mask)  # 170 positions: 5x the window
    for k in (1, 2, 3):
        spec, stats = generate(model, ids, 100, attention_mask=mask, mtp_steps=k, return_stats=True)
        assert torch.equal(spec, plain), k
    assert stats.mean_accept_length > 1.8  # k = 3 drafts accepted often on code it never saw
