"""The decode fast paths against their readable references: MoE dispatch for a few (token, expert)
pairs (`Experts.use_few_pairs`), the fused RMSNorm (`RMSNorm.use_fused`) and the folded RoPE tables
(`RopeTables.use_folded`). Each switch False is the reference; each fast path must give the same
tensors, bit for bit, and issue fewer torch calls (counted with torch.profiler, not timed).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import minimimo
from minimimo import HybridCache, MiMoConfig, MiMoForCausalLM, generate
from minimimo.fp8 import FP8Experts, choose_grid, quantize, scale_shape
from minimimo.hub import save_checkpoint
from minimimo.model import prefill
from minimimo.moe import Experts, MoE
from minimimo.norm import RMSNorm
from minimimo.rope import FoldedRope, RopeTables, apply_rope, inverse_frequencies, last_columns, rope_cos_sin


def python_ops(fn) -> int:
    """How many aten operators `fn()` issues from Python (those with no aten operator above them)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for ev in prof.events():
        if ev.name.startswith("aten::"):
            parent = ev.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            count += parent is None
    return count


def random_moe(num_experts: int, top_k: int, dtype=torch.float32, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(MiMoConfig.tiny(n_routed_experts=num_experts, num_experts_per_tok=top_k))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.experts.to(dtype)  # the router stays float32, as loaded
    return moe


def both_ways(experts: Experts, x, gate_weights, expert_ids, monkeypatch):
    """weighted_sum with the few-pairs path, then with the sorted dispatch; and whether each used argsort."""
    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: sorts.append(1) or argsort(*a, **kw))
    outs, sorted_dispatch = [], []
    for few in (True, False):
        sorts.clear()
        experts.use_few_pairs = few
        outs.append(experts.weighted_sum(x, gate_weights, expert_ids))
        sorted_dispatch.append(bool(sorts))
    del experts.use_few_pairs
    return outs, sorted_dispatch


# ------------------------------------------------------------------------------------------------ MoE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, num_experts", [(1, 2, 16), (1, 4, 16), (8, 4, 16), (8, 4, 64), (5, 3, 8), (2, 8, 32)])
@pytest.mark.parametrize("shift", [0, 5, -3, 100])  # expert parallelism: ids shifted to a rank's first expert
def test_few_pairs_dispatch_equals_the_sorted_dispatch(dtype, n, k, num_experts, shift, monkeypatch):
    moe = random_moe(num_experts, k, dtype, seed=n * 31 + k)
    x = torch.randn(n, moe.gate.weight.shape[1]).to(dtype)
    gate_weights, expert_ids = moe.gate(x)
    (fast, ref), sorted_dispatch = both_ways(moe.experts, x, gate_weights, expert_ids - shift, monkeypatch)
    assert sorted_dispatch == [False, True]
    assert fast.dtype == torch.float32
    assert torch.equal(fast, ref)
    if shift == 100:  # no pair names an expert of this stack: nothing added
        assert not fast.any()


def test_few_pairs_dispatch_runs_grouped_mm_when_the_sorted_dispatch_would(monkeypatch):
    # float32, 32 pairs over 16 experts: most experts are busy, so both paths use grouped_mm
    moe = random_moe(16, 4, seed=3)
    x = torch.randn(8, moe.gate.weight.shape[1])
    gate_weights, expert_ids = moe.gate(x)
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    (fast, ref), _ = both_ways(moe.experts, x, gate_weights, expert_ids, monkeypatch)
    assert len(calls) == 6  # three projections on each path
    assert torch.equal(fast, ref)


def test_few_pairs_dispatch_visits_each_expert_with_tokens_once(monkeypatch):
    moe = random_moe(64, 4, seed=4)
    x = torch.randn(3, moe.gate.weight.shape[1])
    gate_weights, expert_ids = moe.gate(x)
    expert_ids[1] = expert_ids[0]  # tokens 0 and 1 share their experts: each of those runs once, on both
    seen = []
    expert = moe.experts.expert
    monkeypatch.setattr(moe.experts, "expert", lambda e, rows: seen.append((e, rows.shape[0])) or expert(e, rows))
    (fast, ref), _ = both_ways(moe.experts, x, gate_weights, expert_ids, monkeypatch)
    assert torch.equal(fast, ref)
    few = seen[:len(seen) // 2]
    assert sorted(few) == sorted(seen[len(seen) // 2:])  # the same experts on the same number of rows
    assert sorted(e for e, _ in few) == sorted(set(expert_ids.flatten().tolist()))


def fp8_experts(num_experts: int, hidden: int, inter: int, block=(16, 16), seed: int = 0) -> FP8Experts:
    torch.manual_seed(seed)
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    experts = FP8Experts(num_experts, hidden, inter, {n: scale_shape(s, block) for n, s in shapes.items()}, block)
    with torch.no_grad():
        for name, shape in shapes.items():
            for e in range(num_experts):
                fp8, scale = quantize(torch.randn(shape) / shape[1] ** 0.5, block)
                getattr(experts, name)[e] = fp8
                getattr(experts, name + "_scale_inv")[e] = scale
            getattr(experts, name + "_row_block").copy_(choose_grid(shape, scale.shape, block)[1])
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, shift", [(1, 2, 0), (8, 4, 0), (8, 4, 3), (1, 2, 7)])
def test_few_pairs_dispatch_of_fp8_experts_equals_the_sorted_dispatch(dtype, n, k, shift, monkeypatch):
    experts = fp8_experts(8, 32, 24, seed=n)
    x = torch.randn(n, 32).to(dtype)
    gate_weights = torch.rand(n, k).softmax(-1)
    expert_ids = torch.stack([torch.randperm(8)[:k] for _ in range(n)]) - shift
    (fast, ref), sorted_dispatch = both_ways(experts, x, gate_weights, expert_ids, monkeypatch)
    assert sorted_dispatch == [False, True]
    assert torch.equal(fast, ref)


def test_decoding_one_token_issues_few_torch_calls_in_the_moe():
    moe = random_moe(16, 2, seed=5)
    x = torch.randn(1, 1, moe.gate.weight.shape[1])
    with torch.inference_mode():
        moe(x)  # warm
        fast = python_ops(lambda: moe(x))
        moe.experts.use_few_pairs = False
        ref = python_ops(lambda: moe(x))
    assert ref >= 60  # the sorted dispatch: ~30 calls around the 2 experts' 16
    assert fast <= 33, fast  # router 8, ids 2, 2 experts x 8, stacking and weighting 5, reshapes 2


def test_router_gives_the_float32_formula():
    # the router skips the casts and the scaling that change nothing; the formula, spelled out:
    for scaling in (1.0, 2.5):
        moe = random_moe(16, 4, seed=6)
        moe.gate.scaling_factor = scaling
        x = torch.randn(5, moe.gate.weight.shape[1]).bfloat16()
        scores = torch.sigmoid(x.float() @ moe.gate.weight.float().T)
        ids = (scores + moe.gate.e_score_correction_bias.float()).topk(4, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * scaling
        got_weights, got_ids = moe.gate(x)
        assert torch.equal(got_ids, ids) and torch.equal(got_weights, weights)


# ------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 256), (3, 7, 1000)])
def test_fused_rmsnorm_equals_the_formula(dtype, shape):
    torch.manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.8, 1.2)
    norm.to(dtype)
    for scale in (1e-3, 1.0, 50.0):
        x = (torch.randn(shape) * scale).to(dtype)
        norm.use_fused = True
        fused = norm(x)
        norm.use_fused = False
        assert torch.equal(fused, norm(x))
        assert fused.dtype == dtype


def test_fused_rmsnorm_issues_fewer_torch_calls():
    norm, x = RMSNorm(64), torch.randn(1, 1, 64)
    with torch.inference_mode():
        fused = python_ops(lambda: norm(x))
        norm.use_fused = False
        assert (fused, python_ops(lambda: norm(x))) == (1, 8)
        norm.use_fused = True
        assert python_ops(lambda: norm(x.bfloat16())) == 5  # the input's cast, then float32, back, weight


def test_fused_rmsnorm_equals_the_formula_at_every_width():
    torch.manual_seed(1)
    for c in [*range(1, 140), 255, 511, 1000, 2048, 4096]:
        norm = RMSNorm(c, eps=1e-6)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3, c) * 10.0 ** torch.randint(-3, 3, (3, 1))
        for dtype in (torch.float32, torch.bfloat16):
            norm.to(dtype)
            norm.use_fused = True
            fused = norm(x.to(dtype))
            norm.use_fused = False
            assert torch.equal(fused, norm(x.to(dtype))), (c, dtype)


# ------------------------------------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim, head_dim", [(8, 24), (32, 96), (16, 16)])
@pytest.mark.parametrize("b, h, t", [(1, 2, 1), (2, 4, 7)])
def test_folded_rope_equals_apply_rope(dtype, rotary_dim, head_dim, b, h, t):
    positions = torch.randint(0, 5000, (b, t), generator=torch.Generator().manual_seed(t))
    positions[0, 0] = -1  # a padding position
    tables = RopeTables(positions, dtype)
    cos, sin = tables.cos_sin(rotary_dim, 1e4)
    plain_cos, plain_sin = rope_cos_sin(positions, rotary_dim, 1e4, dtype)
    assert isinstance(cos.folded, FoldedRope) and not hasattr(plain_cos, "folded")
    assert torch.equal(cos, plain_cos) and torch.equal(sin, plain_sin)  # the same tables, carrying their folding
    x = torch.randn(b, t, h, head_dim).to(dtype).transpose(1, 2)  # [b h t d], strided as from a projection
    folded, plain = apply_rope(x, cos, sin), apply_rope(x, plain_cos, plain_sin)
    assert torch.equal(folded, plain)
    assert folded.stride() == plain.stride()  # the same memory layout for the attention after it


@pytest.mark.parametrize("whole_first", [True, False])  # the whole tables built before or after the slice's
def test_the_last_columns_of_folded_tables_stay_folded(whole_first):
    """MTP drafting gives each block the last w columns of one table (`rope.last_columns`)."""
    positions = torch.arange(3, 10).expand(2, 7)
    cos, sin = RopeTables(positions, torch.float32).cos_sin(8, 1e4)
    x_whole, x_last = torch.randn(2, 3, 7, 12), torch.randn(2, 3, 4, 12)
    if whole_first:
        apply_rope(x_whole, cos, sin)
    cos4, sin4 = last_columns(cos, sin, 4)
    assert isinstance(cos4.folded, FoldedRope) and cos4.folded is sin4.folded
    plain_cos, plain_sin = rope_cos_sin(positions[:, -4:], 8, 1e4, torch.float32)
    assert torch.equal(apply_rope(x_last, cos4, sin4), apply_rope(x_last, plain_cos, plain_sin))
    assert torch.equal(apply_rope(x_whole, cos, sin), apply_rope(x_whole, *rope_cos_sin(positions, 8, 1e4, torch.float32)))
    with torch.inference_mode():
        assert python_ops(lambda: apply_rope(x_last, cos4, sin4)) == 4
    plain4 = last_columns(plain_cos, plain_sin, 2)  # plain tables: plain slices
    assert not hasattr(plain4[0], "folded") and torch.equal(plain4[0], plain_cos[:, -2:])


def test_folded_rope_has_the_gradient_of_apply_rope():
    cos, sin = RopeTables(torch.arange(5)[None], torch.float32).cos_sin(8, 1e4)
    x = torch.randn(1, 2, 5, 12, requires_grad=True)
    grads = []
    for tables in ((cos, sin), (cos.clone(), sin.clone())):  # a clone does not carry the folding
        x.grad = None
        (apply_rope(x, *tables) * torch.arange(12.0)).sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


def test_tables_without_folding_take_the_reference(monkeypatch):
    monkeypatch.setattr(RopeTables, "use_folded", False)
    cos, sin = RopeTables(torch.arange(3)[None], torch.float32).cos_sin(8, 1e4)
    assert not hasattr(cos, "folded")
    x = torch.randn(1, 2, 3, 12)
    with torch.inference_mode():
        assert python_ops(lambda: apply_rope(x, cos, sin)) == 11
        monkeypatch.setattr(RopeTables, "use_folded", True)
        cos, sin = RopeTables(torch.arange(3)[None], torch.float32).cos_sin(8, 1e4)
        apply_rope(x, cos, sin)  # builds the head-wide tables
        assert python_ops(lambda: apply_rope(x, cos, sin)) == 4


# ------------------------------------------------------------------------------------------------ model


def decode(model, ids, mask, new_tokens: int, chunk: int):
    """Chunked prefill of a left-padded batch, then greedy decode: -> (token ids, logits of every step)."""
    positions = minimimo.sampling.positions_from_mask(mask)
    cache = HybridCache(model.config, ids.shape[0], dtype=model.dtype)
    logits = [model.logits(prefill(model, ids, cache, positions=positions, chunk=chunk)[:, -1])]
    tokens, next_pos = [], positions[:, -1:] + 1
    for _ in range(new_tokens):
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        logits.append(model(tokens[-1], positions=next_pos, cache=cache)[:, -1])
        next_pos = next_pos + 1
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model with a 3-token window (the ring wraps), 8 experts top-2, MTP blocks: float32,
    bfloat16, and bfloat16 loaded with FP8 weights."""
    config = MiMoConfig.tiny(sliding_window_size=3, n_routed_experts=8, num_experts_per_tok=2, num_mtp_layers=2)
    model = MiMoForCausalLM(config).init_weights(7).eval()
    path = tmp_path_factory.mktemp("fp8")
    save_checkpoint(model, path, dtype=torch.bfloat16, fp8_block=16, layout="hub")
    fp8 = minimimo.load(path, dtype=torch.bfloat16, weight_dtype="fp8", progress=False)
    assert isinstance(fp8.model.layers[1].mlp.experts, FP8Experts)
    return {"float32": model, "bfloat16": MiMoForCausalLM(config).init_weights(7).to(torch.bfloat16).eval(),
            "fp8": fp8}


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "fp8"])
def test_model_with_fast_paths_decodes_as_the_reference(models, kind, monkeypatch):
    model = models[kind]
    ids = torch.randint(1, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded
    with torch.no_grad():
        runs = {True: decode(model, ids, mask, 9, chunk=4)}  # 20 positions through a 3-token window
        with minimimo.reference_paths():  # every fast path off, attention's included
            runs[False] = decode(model, ids, mask, 9, chunk=4)
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])


def test_speculative_decoding_with_fast_paths_gives_the_reference_tokens(models, monkeypatch):
    model = models["float32"]
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = {True: generate(model, ids, 12, mtp_steps=2, attention_mask=mask)}
    with minimimo.reference_paths():
        out[False] = generate(model, ids, 12, mtp_steps=2, attention_mask=mask)
    assert torch.equal(out[True], out[False])
    assert torch.equal(out[True], generate(model, ids, 12, attention_mask=mask))  # and plain greedy


def test_mtp_drafting_rotates_with_folded_tables(models, monkeypatch):
    """The MTP blocks get folded tables too (`mtp_rope`, and `last_columns` for the blocks that
    catch up fewer columns): no rotate-half runs while drafting, only the reference does."""
    import minimimo.rope as rope
    calls = []
    rotate_half = rope.rotate_half
    monkeypatch.setattr(rope, "rotate_half", lambda x: calls.append(1) or rotate_half(x))
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    fast = generate(models["float32"], ids, 12, mtp_steps=2)
    assert calls == []
    with minimimo.reference_paths():
        assert torch.equal(generate(models["float32"], ids, 12, mtp_steps=2), fast) and calls


def test_rope_tables_of_a_step_cost_few_torch_calls():
    # inv_freq depends on the geometry only: computed once (and outside inference mode, so that
    # training can use it after generation made it), not at every step
    with torch.inference_mode():
        assert not inverse_frequencies(6, 1234.5, "cpu").is_inference()
        positions = torch.arange(4)[None]
        rope_cos_sin(positions, 8, 1e4, torch.float32)
        assert python_ops(lambda: rope_cos_sin(positions, 8, 1e4, torch.float32)) <= 7


def test_reference_paths_turns_every_fast_path_off_and_back():
    from minimimo.fastpaths import FAST_PATHS
    before = [getattr(owner, name) for owner, name in FAST_PATHS]
    assert all(before)  # the fast paths are the default
    with pytest.raises(RuntimeError), minimimo.reference_paths():
        assert not any(getattr(owner, name) for owner, name in FAST_PATHS)
        raise RuntimeError("leaving the block by an exception restores the switches too")
    assert [getattr(owner, name) for owner, name in FAST_PATHS] == before
    switches = {name for owner, name in FAST_PATHS}  # every class switch of the package is listed
    for module in (minimimo.attention, minimimo.moe, minimimo.norm, minimimo.rope):
        for value in vars(module).values():
            if isinstance(value, type):
                assert {n for n in vars(value) if n.startswith("use_")} <= switches, value
