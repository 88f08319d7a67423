"""MiMoConfig: reading the hub config, the real Flash numbers, and inconsistent configs."""

import json

import pytest

from minimimo import MiMoConfig
from conftest import FIXTURES, SHARED_REFERENCE


def test_flash_parameter_counts_exact():
    counts = MiMoConfig.flash().parameter_counts()
    # computed from the tensor shapes of the hub checkpoint (its safetensors headers); the paper says 309B total, 15B active, 0.33B per MTP block
    assert counts["total"] == 308_778_780_864
    assert counts["active"] == 15_445_936_320
    assert counts["active_without_embedding"] == 14_820_985_024
    assert counts["mtp_per_block"] == 329_273_408 and counts["mtp"] == 3 * 329_273_408


def test_flash_layer_rule():
    c = MiMoConfig.flash()
    assert [i for i in range(48) if not c.is_sliding(i)] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    g, s = c.attention(0), c.attention(1)
    assert (g.num_kv_heads, g.has_sink, g.rope_theta, g.window) == (4, False, 5e6, None)
    assert (s.num_kv_heads, s.has_sink, s.rope_theta, s.window, s.rotary_dim) == (8, True, 1e4, 128, 64)
    assert c.attention(None) == s  # MTP blocks use the sliding geometry
    assert not c.is_moe(0) and all(c.is_moe(i) for i in range(1, 48))


def test_round_trip_through_config_json(tmp_path):
    c = MiMoConfig.flash()
    c.save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["routed_scaling_factor"] is None and raw["layernorm_epsilon"] == 1e-5
    assert "num_mtp_layers" not in raw  # not a hub key
    back = MiMoConfig.from_pretrained(tmp_path)
    assert back.to_dict() == c.to_dict() and back.scaling_factor == 1.0
    assert back.num_mtp_layers == 0  # no index with model.mtp.* tensors beside it


@pytest.mark.skipif(not SHARED_REFERENCE.is_dir(), reason="needs ../shared/reference")
def test_mtp_layers_counted_from_the_index():
    assert MiMoConfig.from_pretrained(SHARED_REFERENCE / "tiny-hub-fp8").num_mtp_layers == 3


def test_reads_every_fixture_config():
    for config_file in FIXTURES.glob("*/config.json"):
        c = MiMoConfig.from_pretrained(config_file)
        raw = json.loads(config_file.read_text())
        assert c.hybrid_layer_pattern == raw["hybrid_layer_pattern"]
        assert c.sliding_window_size == raw["sliding_window_size"]
        assert c.to_dict()["architectures"] == ["MiMoV2FlashForCausalLM"]


@pytest.mark.parametrize("changes,key", [
    (dict(hybrid_layer_pattern=[0, 1]), "hybrid_layer_pattern"),
    (dict(moe_layer_freq=[0] * 3), "moe_layer_freq"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(swa_num_key_value_heads=3), "swa_num_key_value_heads"),
    (dict(head_dim=16), "partial_rotary_factor"),  # int(16 * 0.334) = 5 is odd
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(topk_method="greedy"), "topk_method"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=2), "topk_group"),
    (dict(n_shared_experts=1), "n_shared_experts"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(quantization_config={"quant_method": "int4"}), "quantization_config"),
])
def test_inconsistent_configs_name_the_key(changes, key):
    with pytest.raises(ValueError, match=f"`{key}`"):
        MiMoConfig.tiny(**changes)


def test_from_pretrained_names_the_file(tmp_path):
    bad = MiMoConfig.tiny().to_dict()
    bad["hybrid_layer_pattern"] = [0, 1, 1]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="config.json.*hybrid_layer_pattern"):
        MiMoConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        MiMoConfig.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("key", ["sliding_window_size", "max_position_embeddings", "swa_rope_theta", "hidden_size",
                                 "hybrid_layer_pattern", "attention_value_scale", "n_routed_experts"])
def test_a_missing_key_that_shapes_the_computation_is_named(tmp_path, key):
    raw = MiMoConfig.tiny(sliding_window_size=32).to_dict()
    raw.pop(key)
    if key == "sliding_window_size":
        raw.pop("sliding_window")  # the hub's other spelling would fill it
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"config.json: required key `{key}` is missing"):
        MiMoConfig.from_pretrained(tmp_path)


def test_keys_the_hub_format_lets_go_missing_take_their_meaning(tmp_path):
    raw = MiMoConfig.tiny(sliding_window_size=32).to_dict()
    for key in ("quantization_config", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id",
                "n_shared_experts", "routed_scaling_factor", "sliding_window_size"):  # sliding_window stays
        raw.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = MiMoConfig.from_pretrained(tmp_path)
    assert c.sliding_window_size == 32 and c.fp8_block is None and c.scaling_factor == 1.0
