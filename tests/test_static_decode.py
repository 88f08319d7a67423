"""The fixed-shape decode step (`static_decode.py`) against the eager one, across the settings it
meets: batches with left padding, prompts and decodes longer than the window (the ring wraps), few
and many (token, expert) pairs (gathered vs all-experts MoE), bfloat16, sampling, stop tokens.

Most tests run the step eagerly (`compiled_decode_step` patched to return the plain function), so
they check the arithmetic and `stream`'s use of it without paying for a compile; one test compiles.
"""

import pytest
import torch

import minimimo
from minimimo import HybridCache, MiMoConfig, MiMoForCausalLM, generate
from minimimo.fp8 import FP8Experts
from minimimo.model import prefill
from minimimo.static_decode import StaticCache, check_static_model, static_decode_step, static_moe


def random_model(dtype=torch.float32, seed=0, **overrides) -> MiMoForCausalLM:
    config = MiMoConfig.tiny(**{"num_hidden_layers": 6, "sliding_window_size": 8, **overrides})
    model = MiMoForCausalLM(config).init_weights(seed)
    return model.to(dtype).eval() if dtype != torch.float32 else model.eval()


@pytest.fixture
def eager_static(monkeypatch):
    """`generate(..., compile=True)` running `static_decode_step` without compiling it."""
    monkeypatch.setattr(minimimo.static_decode, "compiled_decode_step", lambda: static_decode_step)


def left_padded(vocab: int, lengths: list[int], seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), t), generator=gen)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, t - n:] = 1
        ids[row, :t - n] = 0
    return ids, mask


@pytest.mark.parametrize("lengths, new", [([5], 6), ([20], 25), ([12, 5, 9], 20), ([3, 17], 12)])
@pytest.mark.parametrize("top_k", [1, 2, 4])  # 8 experts: n * k below and at/above 8 (gathered, all experts)
def test_static_step_logits_equal_the_eager_step(lengths, new, top_k):
    model = random_model(num_experts_per_tok=top_k)
    ids, mask = left_padded(model.config.vocab_size, lengths)
    b, t = ids.shape
    positions = minimimo.sampling.positions_from_mask(mask)
    with torch.no_grad():
        cache = HybridCache(model.config, b, max_length=t + new)
        eager_logits = model.logits(prefill(model, ids, cache, positions=positions)[:, -1])
        static = StaticCache.from_hybrid(model, cache, t + new)
        pos = positions[:, -1] + 1
        for _ in range(new):
            token = eager_logits.argmax(-1)
            eager_logits = model(token[:, None], positions=pos[:, None], cache=cache)[:, -1]
            static_logits = static_decode_step(model, static, token, pos)
            torch.testing.assert_close(static_logits, eager_logits, rtol=1e-5, atol=1e-5)
            pos = pos + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[7], [14, 4, 9]])
def test_generate_compile_gives_the_eager_ids(eager_static, dtype, lengths):
    model = random_model(dtype)
    ids, mask = left_padded(model.config.vocab_size, lengths, seed=3)
    eager = generate(model, ids, 24, attention_mask=mask)
    static = generate(model, ids, 24, attention_mask=mask, compile=True)
    assert torch.equal(static, eager)


def test_sampling_and_stop_tokens_follow_the_eager_stream(eager_static):
    model = random_model()
    ids, mask = left_padded(model.config.vocab_size, [10, 6], seed=4)
    greedy = generate(model, ids, 16, attention_mask=mask)
    stop = int(greedy[0, ids.shape[1] + 3])  # row 0 stops at its fourth new token
    kwargs = dict(attention_mask=mask, stop_token_ids=[stop], pad_token_id=0)
    assert torch.equal(generate(model, ids, 16, compile=True, **kwargs), generate(model, ids, 16, **kwargs))
    sampled = dict(attention_mask=mask, temperature=0.9, top_k=20, seed=7)
    assert torch.equal(generate(model, ids, 16, compile=True, **sampled), generate(model, ids, 16, **sampled))


def test_static_moe_equals_the_moe_for_gathered_and_all_experts():
    torch.manual_seed(0)
    for n, top_k in [(1, 2), (3, 2), (4, 2), (9, 4)]:  # n * k = 2, 6 < 8; 8, 36 >= 8
        model = random_model(num_experts_per_tok=top_k)
        moe = model.model.layers[1].mlp
        x = torch.randn(1, n, model.config.hidden_size)
        torch.testing.assert_close(static_moe(moe, x), moe(x), rtol=1e-5, atol=1e-6)


def test_from_hybrid_refuses_positions_beyond_max_length():
    model = random_model()
    cache = HybridCache(model.config, 1)
    with torch.no_grad():
        prefill(model, torch.arange(12)[None], cache)
    with pytest.raises(ValueError, match="position 11, beyond max_length 10"):
        StaticCache.from_hybrid(model, cache, 10)


def test_what_compile_cannot_run_is_refused_by_name():
    model = random_model()
    ids = torch.arange(4)[None]
    with pytest.raises(ValueError, match="MTP"):
        generate(model, ids, 4, compile=True, mtp_steps=2)
    with pytest.raises(ValueError, match="compile must be True or False"):
        generate(model, ids, 4, compile="yes")
    mtp_model = MiMoForCausalLM(MiMoConfig.tiny(num_hidden_layers=2, num_mtp_layers=2)).init_weights(0).eval()
    assert torch.equal(generate(mtp_model, ids, 4, compile=False, mtp_steps=2), generate(mtp_model, ids, 4))
    layer = model.model.layers[1]
    c = model.config
    layer.mlp.experts = FP8Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                                   {name: (2, 2) for name in ("gate_proj", "up_proj", "down_proj")}, (16, 16))
    with pytest.raises(ValueError, match="model.layers.1.*FP8"):
        check_static_model(model)


def test_the_compiled_step_gives_the_eager_ids():
    """One real `torch.compile` (about half a minute on 2 cores): a padded batch of two whose
    decode wraps the sliding rings; then a second model of the same shapes and other weights, and
    the first again (the steps after a generation's first skip guards: no stale program)."""
    config = MiMoConfig.tiny(num_hidden_layers=2, sliding_window_size=4)
    models = [MiMoForCausalLM(config).init_weights(seed).eval() for seed in (0, 1)]
    ids, mask = left_padded(config.vocab_size, [6, 3], seed=5)
    eager = [generate(model, ids, 10, attention_mask=mask) for model in models]
    assert not torch.equal(*eager)
    for i in (0, 1, 0):
        assert torch.equal(generate(models[i], ids, 10, attention_mask=mask, compile=True), eager[i])


def test_a_failed_compile_is_one_clear_error(monkeypatch, capsys):
    """No C++ compiler (or any failure in torch.compile): a CompileError that says what to do,
    and from the command line one line with status 2."""
    def broken():
        def step(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return step
    monkeypatch.setattr(minimimo.static_decode, "compiled_decode_step", broken)
    model = random_model()
    with pytest.raises(minimimo.static_decode.CompileError, match="No working C\\+\\+ compiler.*without compile=True"):
        generate(model, torch.arange(5)[None], 4, compile=True)
    from minimimo.cli import main
    assert main(["generate", "--prompt", "def f(x):", "--max-new-tokens", "4", "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minimimo generate: error: torch.compile could not compile") and "Traceback" not in err
