"""Live parity: random small configs, the official implementation and minimimo on the same weights.

The official implementation (transformers' MiMoV2FlashForCausalLM) reads the folder minimimo
writes, so this also checks that our hub layout is the one the official loader expects. Its
built-in values must equal the config's (layer rule, SWA kv heads = 2 x kv heads, thetas 5e6/1e4,
rotary factor 0.334, eps 1e-5), so the configs are drawn within those rules.
"""

import random

import pytest
import torch

import minimimo
from minimimo import MiMoConfig, MiMoForCausalLM
from minimimo.hub import save_checkpoint
from minimimo.rope import rope_cos_sin

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.official


def random_config(seed: int) -> MiMoConfig:
    rnd = random.Random(seed)
    layers = rnd.choice([2, 3, 6, 7])
    kv = rnd.choice([1, 2, 4])
    n_experts = rnd.choice([4, 8, 16])
    n_group = rnd.choice([g for g in (1, 2, 4) if n_experts // g >= 2])
    top_k = rnd.choice([1, 2, 3])
    topk_group = rnd.choice(range(1, n_group + 1))
    while top_k > topk_group * (n_experts // n_group):
        topk_group += 1
    head_dim, v_head_dim = rnd.choice([12, 24]), rnd.choice([8, 16])
    return MiMoConfig.tiny(
        num_hidden_layers=layers, hidden_size=rnd.choice([32, 48]), num_attention_heads=4 * kv if kv < 4 else 8,
        num_key_value_heads=kv, swa_num_attention_heads=4 * kv if kv < 4 else 8, swa_num_key_value_heads=2 * kv,
        head_dim=head_dim, v_head_dim=v_head_dim, swa_head_dim=head_dim, swa_v_head_dim=v_head_dim, vocab_size=rnd.choice([64, 128]),
        sliding_window_size=rnd.choice([1, 3, 8, 40]), n_routed_experts=n_experts, num_experts_per_tok=top_k,
        n_group=n_group, topk_group=topk_group, norm_topk_prob=rnd.random() < 0.7,
        routed_scaling_factor=rnd.choice([None, 1.0, 2.5]), attention_value_scale=rnd.choice([0.707, 1.0]),
    )


def official(directory, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager", experts_implementation="grouped_mm").eval()


@pytest.mark.parametrize("seed", range(6))
def test_random_configs_float32(seed, tmp_path):
    config = random_config(seed)
    ours = MiMoForCausalLM(config).init_weights(seed)
    save_checkpoint(ours, tmp_path, dtype=torch.float32, layout="single")
    theirs = official(tmp_path, torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, hidden = minimimo.load(tmp_path, progress=False)(ids, return_hidden_states=True)
        out = theirs(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    for k, (a, b) in enumerate(zip(hidden, out.hidden_states, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"hidden_states.{k}: {m}")


@pytest.mark.parametrize("seed", [10, 11, 12, 16])
def test_random_configs_bfloat16_layer_by_layer(seed, tmp_path):
    """bf16 follows the official op order: fed the official model's inputs, every attention and
    FFN output agrees to bf16 rounding (GEMM shapes differ: we keep the GQA group axis instead of
    repeating keys, which can move the last bit), and the logits agree closely end to end.

    transformers holds the router weight as a bf16 parameter in a bf16 model (minimimo keeps the
    checkpoint's float32), so the router weights are made bf16-representable, as in the golden cases.
    """
    config = random_config(seed)
    ours = MiMoForCausalLM(config).init_weights(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(p.bfloat16().float())
    save_checkpoint(ours, tmp_path, dtype=torch.bfloat16, layout="hub")
    ids = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(seed))
    mine = minimimo.load(tmp_path, dtype=torch.bfloat16, progress=False)
    theirs = official(tmp_path, torch.bfloat16)
    seen = {}
    for i, layer in enumerate(theirs.model.layers):
        layer.self_attn.register_forward_hook(
            lambda m, args, kwargs, out, i=i: seen.__setitem__(("attn", i), (kwargs["hidden_states"], out[0])),
            with_kwargs=True)
        layer.mlp.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("ffn", i), (args[0], out)))
    with torch.no_grad():
        their_logits = theirs(ids).logits
        my_logits = mine(ids)
        positions = torch.arange(30).expand(2, 30)
        for i, layer in enumerate(mine.model.layers):
            g = layer.geometry
            cos, sin = rope_cos_sin(positions, g.rotary_dim, g.rope_theta, torch.bfloat16)
            x, expected = seen["attn", i]
            torch.testing.assert_close(layer.self_attn(x, cos, sin, positions), expected, atol=1e-2, rtol=1.6e-2)
            x, expected = seen["ffn", i]
            torch.testing.assert_close(layer.mlp(x), expected, atol=1e-2, rtol=1.6e-2)
    assert (my_logits.float() - their_logits.float()).abs().mean() < 0.02
