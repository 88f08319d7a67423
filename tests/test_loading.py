"""Strict loading: every tensor accounted for; every bad input names the tensor and the file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minimimo
from minimimo import CheckpointError, MiMoConfig, MiMoForCausalLM
from minimimo.checkpoint import compute_dtype
from minimimo.fp8 import dequantize, quantize
from minimimo.hub import hub_state, is_fp8_stored, save_checkpoint, tensor_specs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model written in the release's layout with FP8 blocks (per-layer files)."""
    model = MiMoForCausalLM(MiMoConfig.tiny(num_key_value_heads=2, swa_num_key_value_heads=4)).init_weights(3)
    directory = save_checkpoint(model, tmp_path_factory.mktemp("hub") / "ckpt", dtype=torch.float32, fp8_block=16)
    return model, directory


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy to break."""
    return shutil.copytree(saved[1], tmp_path / "ckpt")


def edit_index(directory, change):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    change(index["weight_map"])
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_shard(directory, file, change):
    tensors = load_file(str(directory / file))
    change(tensors)
    save_file(tensors, str(directory / file))


def test_round_trip_fp8_hub_layout(saved):
    model, directory = saved
    assert (directory / "model_1_linear_fc1.safetensors").is_file()
    loaded = minimimo.load(directory, dtype=torch.float32, progress=False)
    assert loaded.load_report.grids == {"uniform": 193, "per-head": 2}  # global k_proj: 2 heads of 24 rows
    # every tensor equals the original, or its FP8 round trip on the grid the release would use
    loaded_state, config = hub_state(loaded), model.config
    for name, original in hub_state(model).items():
        spec = tensor_specs(config)[name]
        expected = original
        if is_fp8_stored(name, spec):
            per_head = name.endswith("k_proj.weight") and not config.is_sliding(int(name.split(".")[2]))
            head_size = spec.head_size if per_head else None
            expected = dequantize(*quantize(original, (16, 16), head_size=head_size), (16, 16), head_size=head_size)
        assert torch.equal(loaded_state[name], expected), name
    assert not any(p.is_meta for p in loaded.parameters()) and not loaded.training
    assert loaded.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_exact_round_trip_float32_single_file(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path, dtype=torch.float32, layout="single")
    loaded = minimimo.load(tmp_path, progress=False)  # dtype from config.json: float32
    for (name, a), (_, b) in zip(tiny_model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    (tmp_path / "model.safetensors.index.json").unlink()  # a plain single-file folder loads too
    assert torch.equal(minimimo.load(tmp_path, progress=False).lm_head.weight, tiny_model.lm_head.weight)


def test_float32_on_a_cpu_bf16_on_request_and_router_stays_fp32(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path, dtype=torch.bfloat16)  # config.json says torch_dtype bfloat16
    assert minimimo.load(tmp_path, progress=False).dtype == torch.float32  # a CPU computes in float32
    loaded = minimimo.load(tmp_path, dtype="bf16", progress=False)
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[2].mlp.gate.weight.dtype == torch.float32
    assert loaded.model.layers[2].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_default_compute_dtype_follows_the_device():
    config = MiMoConfig.tiny(torch_dtype="bfloat16")
    assert compute_dtype(None, config, [torch.device("cpu")]) == torch.float32
    assert compute_dtype(None, config, [torch.device("cuda", 0)]) == torch.bfloat16  # the config's, on CUDA
    assert compute_dtype("bfloat16", config, [torch.device("cpu")]) == torch.bfloat16
    assert compute_dtype(None, config, [torch.device("cpu")], keep_fp8=True) == torch.bfloat16
    with pytest.raises(ValueError, match="storage dtype"):
        compute_dtype("fp8", config, [torch.device("cpu")])


def test_dtype_and_weight_dtype_do_not_overlap(saved):
    with pytest.raises(ValueError, match=r"weight_dtype 'bf16'.*pass dtype='bf16'"):
        minimimo.load(saved[1], weight_dtype="bf16", progress=False)


def test_partial_mtp_block_is_a_missing_tensor_error(ckpt):
    edit_shard(ckpt, "model_final.safetensors", lambda t: t.update({"model.mtp.layers.0.enorm.weight": torch.ones(64)}))
    edit_index(ckpt, lambda m: m.update({"model.mtp.layers.0.enorm.weight": "model_final.safetensors"}))
    with pytest.raises(CheckpointError, match=r"'model.mtp.layers.0.hnorm.weight' is missing"):
        minimimo.load(ckpt, progress=False)


def test_mtp_blocks_round_trip_and_a_checkpoint_without_them_loads(tmp_path, saved):
    model = MiMoForCausalLM(MiMoConfig.tiny(num_mtp_layers=3)).init_weights(4)
    save_checkpoint(model, tmp_path, dtype=torch.float32, fp8_block=16)
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sum(n.startswith("model.mtp.layers.") for n in names) == 3 * 20  # 14 tensors + 6 scales each
    assert names["model.mtp.layers.2.eh_proj.weight"] == "model_mtp.safetensors"
    loaded = minimimo.load(tmp_path, progress=False)
    assert loaded.config.num_mtp_layers == loaded.load_report.mtp_blocks == 3
    assert minimimo.load(saved[1], progress=False).config.num_mtp_layers == 0  # no drafting, loads fine


def test_missing_tensor(ckpt):
    edit_index(ckpt, lambda m: m.pop("model.layers.3.mlp.experts.5.up_proj.weight"))
    edit_shard(ckpt, "model_3_linear_fc1.safetensors", lambda t: t.pop("model.layers.3.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model.layers.3.mlp.experts.5.up_proj.weight' is missing"):
        minimimo.load(ckpt, progress=False)


def test_unexpected_tensor(ckpt):
    edit_shard(ckpt, "model_2.safetensors", lambda t: t.update({"model.layers.2.self_attn.q_norm.weight": torch.ones(24)}))
    edit_index(ckpt, lambda m: m.update({"model.layers.2.self_attn.q_norm.weight": "model_2.safetensors"}))
    with pytest.raises(CheckpointError, match=r"model_2.safetensors: unexpected tensor 'model.layers.2.self_attn.q_norm"):
        minimimo.load(ckpt, progress=False)


def test_tensor_in_file_but_not_in_index(ckpt):
    edit_shard(ckpt, "model_2.safetensors", lambda t: t.update({"model.layers.2.extra": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"model_2.safetensors: tensor 'model.layers.2.extra' is in the file but not in the index"):
        minimimo.load(ckpt, progress=False)


def test_tensor_in_index_but_not_in_file(ckpt):
    edit_shard(ckpt, "model_final.safetensors", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"model_final.safetensors: tensor 'model.norm.weight' is listed in the index but not"):
        minimimo.load(ckpt, progress=False)


def test_shape_mismatch(ckpt):
    edit_shard(ckpt, "model_4.safetensors", lambda t: t.update({"model.layers.4.self_attn.attention_sink_bias": torch.ones(5)}))
    with pytest.raises(CheckpointError, match=r"model_4.safetensors: tensor 'model.layers.4.self_attn.attention_sink_bias' has shape \[5\]"):
        minimimo.load(ckpt, progress=False)


def test_dtype_mismatch(ckpt):
    edit_shard(ckpt, "model_final.safetensors", lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model_final.safetensors: tensor 'model.norm.weight' has dtype torch.int32"):
        minimimo.load(ckpt, progress=False)


def test_fp8_without_scale(ckpt):
    edit_index(ckpt, lambda m: m.pop("model.layers.1.self_attn.q_proj.weight_scale_inv"))
    edit_shard(ckpt, "model_1.safetensors", lambda t: t.pop("model.layers.1.self_attn.q_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"model_1.safetensors: tensor 'model.layers.1.self_attn.q_proj.weight' is float8_e4m3fn but has no"):
        minimimo.load(ckpt, progress=False)


def test_scale_with_a_shape_no_grid_explains(ckpt):
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    edit_shard(ckpt, "model_1.safetensors", lambda t: t.update({name: torch.ones(5, 4)}))
    with pytest.raises(CheckpointError, match=r"model_1.safetensors: model.layers.1.self_attn.q_proj.weight_scale_inv: 5 scale rows"):
        minimimo.load(ckpt, progress=False)


def test_index_names_a_missing_shard(ckpt):
    (ckpt / "model_3_linear_fc2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"is in shard 'model_3_linear_fc2.safetensors', which does not exist"):
        minimimo.load(ckpt, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_shard(ckpt, damage):
    shard = ckpt / "model_5_linear_fc1.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"model_5_linear_fc1.safetensors: cannot read"):
        minimimo.load(ckpt, progress=False)


def test_hub_state_names_match_the_release(tiny_model):
    names = set(hub_state(tiny_model))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.self_attn.attention_sink_bias" in names
    assert "model.layers.0.self_attn.attention_sink_bias" not in names  # global layers have no sink
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
