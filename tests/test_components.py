"""Each component against a plain-loop or plain-matmul twin written from the formulas."""

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from minimimo import MiMoConfig
from minimimo.attention import Attention, sink_attention, visibility_mask
from minimimo.moe import MoE, Router
from minimimo.norm import RMSNorm
from minimimo.rope import apply_rope, rope_cos_sin

torch.manual_seed(0)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    expected = norm.weight * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)


def test_rope_rotates_pairs_i_and_i_plus_half_and_leaves_the_rest():
    d, rot, theta = 24, 8, 10_000.0
    pos = torch.arange(7)[None]
    x = torch.randn(1, 2, 7, d)
    cos, sin = rope_cos_sin(pos, rot, theta, torch.float32)
    out = apply_rope(x, cos, sin)
    expected = x.clone()
    for t in range(7):
        for i in range(rot // 2):
            angle = t * theta ** (-2 * i / rot)
            a, b = x[..., t, i], x[..., t, i + rot // 2]
            expected[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[..., t, i + rot // 2] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[..., rot:], x[..., rot:])


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = rope_cos_sin(torch.arange(40)[None], 8, 10_000.0, torch.float32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    qs = apply_rope(q.expand(1, 1, 40, 8), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 40, 8), cos, sin)[0, 0]
    torch.testing.assert_close(qs[10] @ ks[7], qs[30] @ ks[27], atol=1e-4, rtol=1e-4)


def test_visibility_mask_window_boundary():
    pos = torch.arange(10)[None]
    visible = visibility_mask(pos, pos, window=3)[0]
    assert visible[9, 6] and not visible[9, 5]  # distance 3 seen (window + the query), 4 not
    assert visible.sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert torch.equal(visibility_mask(pos, pos, None)[0], torch.ones(10, 10, dtype=torch.bool).tril())
    padded = torch.tensor([[-1, -1, 0, 1]])
    assert not visibility_mask(padded, padded, None)[0, 3, :2].any()


def loop_attention(q, k, v, visible, sink, scale):
    """One query at a time, one head at a time, the sink as an explicit extra exp term."""
    b, h, t, _ = q.shape
    g = k.shape[1]
    out = torch.zeros(b, h, t, v.shape[-1])
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // g)
            for ti in range(t):
                keys = visible[bi, ti].nonzero().flatten()
                logits = torch.stack([q[bi, hi, ti] @ k[bi, kv, s] * scale for s in keys]) if len(keys) else torch.zeros(0)
                denom = logits.exp().sum() + (sink[hi].exp() if sink is not None else 0)
                for j, s in enumerate(keys):
                    out[bi, hi, ti] += logits[j].exp() / denom * v[bi, kv, s]
    return out


@pytest.mark.parametrize("window,with_sink", [(None, False), (3, True), (3, False), (None, True)])
def test_sink_attention_matches_loop(window, with_sink):
    b, h, g, t, d, e = 2, 4, 2, 9, 6, 5
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, g, t, d), torch.randn(b, g, t, e)
    sink = torch.randn(h) if with_sink else None
    pos = torch.arange(t).expand(b, t)
    visible = visibility_mask(pos, pos, window)
    out = sink_attention(q, k, v, visible, sink, d ** -0.5)
    torch.testing.assert_close(out, loop_attention(q, k, v, visible, sink, d ** -0.5), atol=1e-5, rtol=1e-5)


def test_sink_takes_mass_and_value_scale_applies():
    config = MiMoConfig.tiny()
    geometry = config.attention(1)
    attn = Attention(config.hidden_size, geometry, config.value_scale)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 12, config.hidden_size)
    pos = torch.arange(12)[None]
    cos, sin = rope_cos_sin(pos, geometry.rotary_dim, geometry.rope_theta, torch.float32)
    base = attn(x, cos, sin, pos)
    with torch.no_grad():
        attn.attention_sink_bias.fill_(-1e4)  # a sink that takes no mass = plain softmax
        no_sink = attn(x, cos, sin, pos)
        attn.value_scale = 1.0
        unscaled = attn(x, cos, sin, pos)
    assert (base - no_sink).abs().max() > 1e-3
    torch.testing.assert_close(unscaled * config.value_scale, no_sink, atol=1e-5, rtol=1e-5)


def loop_router(x, router: Router, n_group, topk_group):
    """Per token: sigmoid, biased choice within the best groups, unbiased normalised weights."""
    weights, ids = [], []
    for token in x:
        scores = torch.sigmoid(router.weight @ token)
        choice = scores + router.e_score_correction_bias
        per_group = choice.view(n_group, -1)
        group_score = per_group.sort(-1, descending=True).values[:, :2].sum(-1)
        allowed = group_score.argsort(descending=True)[:topk_group]
        candidates = [e for e in range(len(scores)) if e // per_group.shape[1] in allowed.tolist()]
        chosen = sorted(candidates, key=lambda e: -choice[e].item())[:router.top_k]
        w = scores[chosen]
        w = w / w.sum() if router.norm_topk_prob else w
        weights.append(w * router.scaling_factor)
        ids.append(torch.tensor(chosen))
    return torch.stack(weights), torch.stack(ids)


@pytest.mark.parametrize("n_group,topk_group,norm,scale", [(1, 1, True, 1.0), (4, 2, True, 2.5), (2, 1, False, 1.0)])
def test_router_matches_loop(n_group, topk_group, norm, scale):
    router = Router(16, 8, 2, n_group, topk_group, norm, scale)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.e_score_correction_bias, std=0.3)
    x = torch.randn(20, 16)
    w, ids = router(x)
    w_ref, ids_ref = loop_router(x, router, n_group, topk_group)
    order, order_ref = ids.argsort(-1), ids_ref.argsort(-1)
    assert torch.equal(ids.gather(1, order), ids_ref.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref))


def test_router_bias_only_chooses():
    router = Router(8, 4, 1)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, 8)
    with torch.no_grad():
        router.e_score_correction_bias[:] = torch.tensor([0.0, 0.0, 0.0, 10.0])
    w, ids = router(x)
    assert (ids == 3).all()  # the bias forces the choice...
    torch.testing.assert_close(w, torch.ones(5, 1))  # ...but the weight is the normalised unbiased score


def test_moe_matches_dense_per_token_loop():
    config = MiMoConfig.tiny(n_routed_experts=8, num_experts_per_tok=3, routed_scaling_factor=1.5)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, config.hidden_size)
    out = moe(x)
    tokens = x.reshape(-1, config.hidden_size)
    weights, ids = moe.gate(tokens)
    expected = torch.zeros_like(tokens)
    for n, token in enumerate(tokens):
        for w, e in zip(weights[n], ids[n]):
            ex = moe.experts
            hidden = F.silu(ex.gate_proj[e] @ token) * (ex.up_proj[e] @ token)
            expected[n] += w * (ex.down_proj[e] @ hidden)
    torch.testing.assert_close(out.reshape(-1, config.hidden_size), expected, atol=1e-5, rtol=1e-5)


def test_moe_runs_only_experts_that_received_tokens(monkeypatch):
    config = MiMoConfig.tiny(n_routed_experts=64, num_experts_per_tok=2)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.experts.use_grouped_mm = False  # the per-expert loop (grouped_mm skips empty groups itself)
    calls = []
    original = moe.experts.expert
    monkeypatch.setattr(moe.experts, "expert", lambda e, x: calls.append(e) or original(e, x))
    moe(torch.randn(1, 1, config.hidden_size))
    assert len(calls) == 2


def test_grouped_mm_fast_path_equals_the_expert_loop():
    config = MiMoConfig.tiny(n_routed_experts=16, num_experts_per_tok=4)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 9, config.hidden_size)
    fast = moe(x)
    moe.experts.use_grouped_mm = False
    torch.testing.assert_close(fast, moe(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1, 256, 10**6])
def test_model_names_a_token_id_outside_the_vocabulary(tiny_model, bad):
    ids = torch.tensor([[1, 2, bad, 3], [4, 5, 6, 7]])
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary \[0, 256\)"):
        tiny_model(ids)


def test_building_on_meta_is_cheap_and_a_real_build_keeps_the_embedding_init():
    """On meta, nn.Embedding's N(0, 1) initializer imports torch._dynamo (seconds of a cold start);
    the model skips it there, and only there."""
    import subprocess
    import sys

    code = ("import sys, torch; from minimimo import MiMoConfig, MiMoForCausalLM\n"
            "with torch.device('meta'): MiMoForCausalLM(MiMoConfig.tiny())\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from minimimo import MiMoForCausalLM

    torch.manual_seed(3)
    weight = MiMoForCausalLM(MiMoConfig.tiny()).model.embed_tokens.weight
    torch.manual_seed(3)
    assert torch.equal(weight, torch.nn.Embedding(256, MiMoConfig.tiny().hidden_size).weight)


def test_moe_decoding_visits_only_the_experts_with_tokens_and_equals_the_loop(monkeypatch):
    """With fewer (token, expert) pairs than experts (a few tokens, as in decoding) the dispatch
    loops over the experts that received tokens instead of torch's grouped_mm, whose CPU kernel
    runs a matmul for every expert; from 1 token (2 pairs for 16 experts) to 64 (128 pairs) both
    paths give the loop's output, on the sorted dispatch and on the few-pairs one."""
    config = MiMoConfig.tiny(n_routed_experts=16, num_experts_per_tok=2)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    grouped_calls, loop_calls, seen = [], [], set()
    grouped_mm, expert = F.grouped_mm, moe.experts.expert
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: grouped_calls.append(1) or grouped_mm(*a, **kw))
    monkeypatch.setattr(moe.experts, "expert", lambda e, x: loop_calls.append(e) or expert(e, x))
    for tokens, few_pairs in itertools.product((1, 2, 3, 7, 8, 24, 64), (True, False)):
        x = torch.randn(1, tokens, config.hidden_size)
        active = moe.gate(x[0])[1].unique().tolist()
        grouped_calls.clear(), loop_calls.clear()
        moe.experts.use_grouped_mm, moe.experts.use_few_pairs = True, few_pairs
        fast = moe(x)
        grouped = 2 * tokens >= 16  # as many (token, expert) pairs as experts, or more
        assert len(grouped_calls) == (3 if grouped else 0), (tokens, active)
        assert sorted(loop_calls) == ([] if grouped else active), (tokens, active)
        seen.add(grouped)
        moe.experts.use_grouped_mm = False
        torch.testing.assert_close(fast, moe(x), atol=1e-5, rtol=1e-5)
    assert seen == {True, False}  # both paths were taken
