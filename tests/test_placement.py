"""Layer placement in one process, FP8 kept on the device, the planner against real bytes, verify."""

import pytest
import torch

import minimimo
from minimimo import MiMoConfig, MiMoForCausalLM
from minimimo.cli import main
from minimimo.fp8 import FP8Experts, FP8Linear
from minimimo.hub import save_checkpoint
from minimimo.plan import PlanError, plan, unit_of


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    config = MiMoConfig.tiny(num_key_value_heads=2, swa_num_key_value_heads=4, num_mtp_layers=3)
    model = MiMoForCausalLM(config).init_weights(0)
    return save_checkpoint(model, tmp_path_factory.mktemp("place") / "ckpt", dtype=torch.bfloat16, fp8_block=16)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))


def held_per_device(model, the_plan):
    held = [0] * len(the_plan.devices)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        held[the_plan.placement[unit_of(name)]] += t.numel() * t.element_size()
    return held


@pytest.mark.parametrize("weight_dtype", ["fp8", "bf16"])
def test_placed_model_equals_the_unplaced_one_and_holds_what_the_plan_says(fp8_dir, ids, weight_dtype):
    reference = minimimo.load(fp8_dir, dtype=torch.bfloat16, progress=False)
    devices = ["cpu", "cpu", "cpu"]
    kept = {"weight_dtype": "fp8"} if weight_dtype == "fp8" else {}  # else FP8 dequantized into bfloat16
    placed = minimimo.load(fp8_dir, devices=devices, dtype=torch.bfloat16, progress=False, **kept)
    assert torch.equal(placed(ids), reference(ids))
    assert torch.equal(minimimo.generate(placed, ids, 8, mtp_steps=2), minimimo.generate(reference, ids, 8))
    the_plan = plan(fp8_dir, devices=devices, device_memory=1 << 40, weight_dtype=weight_dtype)
    assert len(set(the_plan.placement.values())) == 3  # the units really are spread
    expected = [sum(the_plan.weights[d].values()) for d in range(3)]
    assert held_per_device(placed, the_plan) == expected


@pytest.fixture(scope="module")
def small_head_fp8_dir(tmp_path_factory):
    """Heads of 24 rows under 32-row FP8 blocks: a global k_proj (2 kv heads, 48 rows) has 2 scale rows
    on the uniform grid and on the per-head one alike; the saver used the per-head one, as the release."""
    config = MiMoConfig.tiny(num_key_value_heads=2, swa_num_key_value_heads=4)
    model = MiMoForCausalLM(config).init_weights(0)
    return save_checkpoint(model, tmp_path_factory.mktemp("grid") / "ckpt", dtype=torch.bfloat16, fp8_block=32)


@pytest.mark.parametrize("dtype, devices", [(torch.bfloat16, None), (torch.float32, None),
                                            (torch.bfloat16, ["cpu", "cpu"])])
def test_fp8_kept_on_the_device_computes_with_the_grid_the_loader_chose(small_head_fp8_dir, ids, dtype, devices):
    reference = minimimo.load(small_head_fp8_dir, dtype=dtype, progress=False)  # dequantized at load
    kept = minimimo.load(small_head_fp8_dir, dtype=dtype, weight_dtype="fp8", devices=devices, progress=False)
    assert kept.load_report.grids == reference.load_report.grids and kept.load_report.grids["per-head"] == 2
    k_proj = kept.model.layers[0].self_attn.k_proj  # global layer: 2 heads of 24 rows, blocks restart per head
    assert isinstance(k_proj, FP8Linear) and k_proj.weight_row_block.tolist() == [0] * 24 + [1] * 24
    assert torch.equal(kept(ids), reference(ids))  # batch 2


def test_fp8_stays_fp8_on_the_device(fp8_dir):
    model = minimimo.load(fp8_dir, weight_dtype="fp8", devices=["cpu"], progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, FP8Linear) and q.weight.dtype == torch.float8_e4m3fn
    experts = model.model.layers[3].mlp.experts
    assert isinstance(experts, FP8Experts) and experts.down_proj.dtype == torch.float8_e4m3fn
    assert model.model.layers[3].self_attn.o_proj.weight.dtype == torch.bfloat16  # stored bf16 on the hub too
    dequantized = minimimo.load(fp8_dir, dtype="bfloat16", progress=False)
    full = sum(t.numel() * t.element_size() for t in dequantized.parameters())
    kept = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert kept < 0.7 * full


def test_explicit_placement_and_bad_placements(fp8_dir, ids):
    units = ["embedding"] + [f"layer.{i}" for i in range(8)] + ["head", "mtp.0", "mtp.1", "mtp.2"]
    placement = {u: (1 if u.startswith("layer.") and int(u[6:]) % 2 else 0) for u in units}  # not contiguous
    model = minimimo.load(fp8_dir, devices=["cpu", "cpu"], placement=placement, progress=False, dtype="bfloat16")
    assert torch.equal(model(ids), minimimo.load(fp8_dir, dtype="bfloat16", progress=False)(ids))
    with pytest.raises(ValueError, match="layer"):
        minimimo.load(fp8_dir, devices=["cpu", "cpu"], placement={"embedding": 0}, progress=False)


def test_a_device_list_that_cannot_hold_the_model_is_refused_before_allocating(fp8_dir):
    with pytest.raises(PlanError, match="cpu"):
        minimimo.load(fp8_dir, devices=["cpu", "cpu"], device_memory="256KiB", weight_dtype="fp8", progress=False)


def test_cli_plan_refuses_what_does_not_fit(capsys):
    assert main(["plan", "--flash", "--gpus", "8", "--gpu-memory", "80GiB"]) == 0
    assert main(["plan", "--flash", "--gpus", "8", "--gpu-memory", "80GiB", "--weight-dtype", "bf16"]) == 1
    assert "does not fit" in capsys.readouterr().err


@pytest.mark.official
def test_verify_end_to_end_on_a_hub_layout_checkpoint(tmp_path, capsys):
    pytest.importorskip("transformers")
    save_checkpoint(MiMoForCausalLM(MiMoConfig.tiny()).init_weights(1), tmp_path, dtype=torch.float32)
    assert main(["verify", "--model", str(tmp_path), "--devices", "cpu,cpu"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement      100.00%" in out
