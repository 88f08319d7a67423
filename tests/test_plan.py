"""Memory planner: Flash figures (computed from the release's shapes), bytes equal to real checkpoints,
optimal placement."""

import itertools
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minimimo import MiMoConfig, MiMoForCausalLM
from minimimo.hub import save_checkpoint
from minimimo.plan import (Plan, PlanError, describe_units, kv_bytes_per_layer, parse_memory, partition, plan,
                           storage_summary, stored_tensors, unit_of, units, weight_bytes, weight_parts)

GB, GiB = 10**9, 2**30


@pytest.fixture(scope="module")
def flash():
    return MiMoConfig.flash()


@pytest.fixture(scope="module")
def flash_fp8(flash):
    return storage_summary(flash, "fp8")


def test_flash_figures_match_spec(flash_fp8, flash):
    s = flash_fp8
    for key, spec_gb in (("fp8", 305.87), ("bf16", 5.72), ("main", 311.9), ("mtp", 1.19), ("total", 313)):
        assert s[key] == pytest.approx(spec_gb * GB, rel=1e-3), key
    # the two small items, to two decimals: 0.197 GB and 0.075 GB
    assert round(s["fp32"] / GB, 2) == 0.20 and round(s["scale"] / GB, 2) == 0.07
    assert s["total"] / GiB == pytest.approx(291.6, rel=1e-3)
    bf16 = storage_summary(flash, "bf16")
    assert bf16["main"] == pytest.approx(617.6 * GB, rel=1e-3)
    assert bf16["fp8"] == bf16["scale"] == 0 and bf16["fp32"] == s["fp32"]  # the router stays float32
    # every parameter counted exactly once: 1 byte (fp8), 2 (bf16) or 4 (fp32) each
    params = flash.parameter_counts()
    assert s["fp8"] + s["bf16"] // 2 + s["fp32"] // 4 == params["total"]
    assert storage_summary(flash, "fp32")["main"] == 4 * params["total"]


def test_flash_units_sum_to_totals(flash, flash_fp8):
    wb = weight_bytes(flash)
    assert list(wb) == units(flash) == ["embedding"] + [f"layer.{i}" for i in range(48)] + ["head", "mtp.0", "mtp.1",
                                                                                         "mtp.2"]
    assert sum(wb.values()) == flash_fp8["total"]
    assert sum(b for u, b in wb.items() if u.startswith("mtp.")) == flash_fp8["mtp"]
    assert wb["embedding"] == wb["head"] - 2 * 4096 == 2 * 152576 * 4096
    parts = weight_parts(flash)
    assert {unit: sum(p.values()) for unit, p in parts.items()} == wb
    moe = parts["layer.1"]
    assert set(moe) == {"attention", "router", "experts", "norms"}
    # FP8 + scales + one row grid per stacked matrix
    assert moe["experts"] == 256 * 3 * 2048 * 4096 + 256 * (16 * 32 + 16 * 32 + 32 * 16) * 4 + (2048 + 2048 + 4096) * 4
    assert moe["router"] == (256 * 4096 + 256) * 4
    assert set(parts["layer.0"]) == {"attention", "dense", "norms"}
    assert set(parts["mtp.0"]) == {"attention", "dense", "norms", "eh_proj"}
    assert parts["embedding"] == {"embedding": 2 * 152576 * 4096}
    # the global k_proj scale is on the per-head grid [8, 32], the sliding one uniform [12, 32]
    tensors = stored_tensors(flash)
    assert tensors["model.layers.5.self_attn.k_proj.weight_scale_inv"].shape == (8, 32)
    assert tensors["model.layers.1.self_attn.k_proj.weight_scale_inv"].shape == (12, 32)
    assert tensors["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"].shape == (32, 16)
    assert tensors["model.layers.1.self_attn.o_proj.weight"].kind == "bf16"
    # in memory each FP8 module keeps its row grid, 4 bytes a row; a stack of experts shares one
    assert tensors["model.layers.5.self_attn.k_proj.weight_row_block"].nbytes == 4 * 768
    assert tensors["model.layers.1.mlp.experts.down_proj_row_block"].shape == (4096,)
    grids = [t for t in tensors.values() if t.kind == "grid"]
    assert len(grids) == 48 * 3 + 3 + 47 * 3 + 3 * 6  # q/k/v, dense layer 0, expert stacks, MTP q/k/v + dense
    assert flash_fp8["grid"] == sum(t.nbytes for t in grids if not t.unit.startswith("mtp."))


# ------------------------------------------------------------------------------ against real checkpoints
TINY = {
    "tiny": dict(num_mtp_layers=3),
    "tiny-2kv": dict(num_mtp_layers=3, num_key_value_heads=2, swa_num_key_value_heads=4),  # per-head k grid differs
}


def checkpoint_bytes(directory: Path) -> dict[str, int]:
    """hub tensor name -> bytes, read from the safetensors files of a saved folder."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = t.numel() * t.element_size()
    return out


def per_unit(tensor_bytes: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in tensor_bytes.items():
        out[unit_of(name)] = out.get(unit_of(name), 0) + n
    return out


@pytest.fixture(scope="module", params=list(TINY))
def tiny_model(request):
    return MiMoForCausalLM(MiMoConfig.tiny(**TINY[request.param])).init_weights(seed=1)


@pytest.mark.parametrize("weight_dtype, dtype, fp8_block", [("fp8", torch.bfloat16, 16), ("bf16", torch.bfloat16, None),
                                                            ("fp32", torch.float32, None)])
def test_tiny_weight_bytes_equal_saved_checkpoint(tiny_model, tmp_path, weight_dtype, dtype, fp8_block):
    directory = save_checkpoint(tiny_model, tmp_path / "ckpt", dtype=dtype, fp8_block=fp8_block)
    saved = checkpoint_bytes(directory)
    config = MiMoConfig.from_pretrained(directory)  # carries quantization_config (block 16) for the fp8 save
    assert config.num_mtp_layers == 3 and config.fp8_block == ((16, 16) if fp8_block else None)
    predicted = stored_tensors(config, weight_dtype)
    grids = {name: t.nbytes for name, t in predicted.items() if t.kind == "grid"}  # held in memory, not saved
    on_disk = {name: t for name, t in predicted.items() if name not in grids}
    assert set(on_disk) == set(saved)
    for name, t in on_disk.items():
        assert t.nbytes == saved[name], name
    assert weight_bytes(config, weight_dtype) == per_unit({**saved, **grids})
    p = plan(directory, devices=["cpu", "cpu"], device_memory="1GiB", weight_dtype=weight_dtype)
    assert sum(sum(w.values()) for w in p.weights.values()) == sum(saved.values()) + sum(grids.values())


# ------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("context, batch, kv_dtype, reserve", [(4096, 1, "bfloat16", 0), (100, 3, "float32", 2),
                                                               (5, 2, "bfloat16", 3), (262144, 1, "fp8", 3)])
def test_kv_per_layer_sums_to_config(flash, context, batch, kv_dtype, reserve):
    kv = kv_bytes_per_layer(flash, context, batch, kv_dtype, reserve)
    main = sum(b for u, b in kv.items() if u.startswith("layer."))
    assert main == flash.kv_cache_bytes(context, kv_dtype, "hybrid", batch, reserve)
    width = {"bfloat16": 2, "float32": 4, "fp8": 1}[kv_dtype]
    assert kv["layer.0"] == batch * context * 4 * (192 + 128) * width  # global: every token
    for k in range(3):  # MTP blocks: their own sliding caches
        assert kv[f"mtp.{k}"] == batch * min(context, 128 + reserve) * 8 * (192 + 128) * width


def test_kv_per_layer_tiny_matches_config():
    config = MiMoConfig.tiny(num_mtp_layers=2, mtp_sliding_window=4)
    kv = kv_bytes_per_layer(config, 50, 2, torch.float32, reserve=1)
    assert sum(kv[f"layer.{i}"] for i in range(8)) == config.kv_cache_bytes(50, torch.float32, "hybrid", 2, 1)
    assert kv["mtp.1"] == 2 * (4 + 1) * 2 * (24 + 16) * 4


# ------------------------------------------------------------------------------ placement
def brute_force(loads, usable):
    """Smallest worst fill over every contiguous split (devices in order, >= 0 units each)."""
    n, m = len(loads), len(usable)
    best = None
    for cuts in itertools.combinations_with_replacement(range(n + 1), m - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(loads[bounds[d]:bounds[d + 1]]) / usable[d] for d in range(m))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_partition_is_contiguous_and_optimal(seed):
    rng = random.Random(seed)
    n, m = rng.randint(1, 8), rng.randint(1, 4)
    loads = [rng.choice([0, rng.randint(1, 100)]) for _ in range(n)]
    usable = [100] * m if seed % 2 else [rng.randint(50, 200) for _ in range(m)]
    assignment = partition(loads, usable, must_fit=False)
    assert assignment == sorted(assignment) and all(0 <= d < m for d in assignment)
    worst = max(sum(x for x, a in zip(loads, assignment) if a == d) / usable[d] for d in range(m))
    assert worst == pytest.approx(brute_force(loads, usable))
    assert partition([150], [100]) is None and partition([150], [100], must_fit=False) == [0]


def test_flash_80gib_fp8_fits_bf16_does_not(flash):
    fp8 = plan(flash, devices=8, device_memory="80GiB")
    assert fp8.fits and fp8.check() is fp8
    order = units(flash)
    assert list(fp8.placement) == order
    assigned = [fp8.placement[u] for u in order]
    assert assigned == sorted(assigned) and set(assigned) == set(range(8))  # contiguous, every GPU used
    rows = fp8.per_device()
    assert [r["name"] for r in rows] == [f"cuda:{i}" for i in range(8)]
    assert sum(r["weights"] for r in rows) == storage_summary(flash)["total"]
    assert max(r["total"] for r in rows) < 40 * GiB
    assert rows[0]["units"] == "embedding, layers 0-6" and rows[-1]["units"].endswith("head, mtp 0-2")

    bf16 = plan(flash, devices=8, device_memory="80GiB", weight_dtype="bf16")
    assert not bf16.fits
    with pytest.raises(PlanError) as err:
        bf16.check()
    message = str(err.value)
    over = [r["name"] for r in bf16.per_device() if not r["fits"]]
    assert over == [f"cuda:{i}" for i in range(7)]  # six MoE layers each: 73 GiB > 72 GiB usable
    for name in over:
        assert f"{name} (" in message
    assert "cuda:7 (" not in message and "over by" in message
    assert "more devices: 10 x" in message and "fp8 weights" in message
    assert "shorter context" not in message  # 0.1 GiB of KV is not the problem
    assert isinstance(err.value, ValueError) and isinstance(err.value, MemoryError)
    assert plan(flash, devices=8, device_memory="80GiB", weight_dtype="bf16", headroom=0).fits  # 93% full


def test_flash_141gb_fp8_long_context(flash):
    p = plan(flash, devices=8, device_memory="141GB", context=262144, batch=8).check()
    assert sum(p.kv.values()) == sum(kv_bytes_per_layer(flash, 262144, 8, "bf16", 3).values())
    assert p.capacity == [141 * GB] * 8
    per_unit_kv = kv_bytes_per_layer(flash, 262144, 8, "bf16", 3)
    for d in range(8):
        assert p.kv[d] == sum(per_unit_kv.get(u, 0) for u in p.weights[d])
    assert max(r["total"] for r in p.per_device()) < 0.5 * 141 * GB  # 45 GiB of KV spread with the layers
    assert not plan(flash, devices=1, device_memory="141GB").fits  # 313 GB on one H200
    crowded = plan(flash, devices=8, device_memory="80GiB", context=262144, batch=64)  # 361 GiB of KV
    with pytest.raises(PlanError, match="shorter context"):
        crowded.check()


def test_memory_units_and_devices():
    assert parse_memory("80GiB") == 80 * 2**30 and parse_memory("141GB") == 141 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20 and parse_memory("1.5 TB") == 1_500_000_000_000
    assert parse_memory("0.5GiB") == 2**29 and parse_memory(1234) == 1234 and parse_memory("64") == 64
    for bad in ("80G", "eighty GiB", "-1GB", "", True):
        with pytest.raises(ValueError):
            parse_memory(bad)
    config = MiMoConfig.tiny(num_mtp_layers=1)
    p = plan(config, devices=["cpu", "cuda:1"], device_memory=["1MiB", "2MiB"])
    assert p.devices == ["cpu", "cuda:1"] and p.capacity == [2**20, 2 * 2**20]
    with pytest.raises(ValueError, match="3 entries for 2 devices"):
        plan(config, devices=2, device_memory=["1MiB"] * 3)


def test_explicit_placement(flash):
    config = MiMoConfig.tiny(num_mtp_layers=2)
    order = units(config)
    everything_on_1 = dict.fromkeys(order, 1)
    p = plan(config, devices=2, device_memory="1GiB", placement=everything_on_1)
    assert p.weights[0] == {} and sum(p.weights[1].values()) == sum(weight_bytes(config).values())
    assert p.per_device()[0]["units"] == "-" and p.fits
    for broken, culprit in ((dict(everything_on_1, **{"layer.3": 2}), "layer.3"),
                            (dict(everything_on_1, **{"layer.3": -1}), "layer.3"),
                            ({u: 0 for u in order if u != "mtp.1"}, "mtp.1"),
                            (dict(everything_on_1, **{"layer.99": 0}), "layer.99")):
        with pytest.raises(ValueError, match=f"'{culprit}'"):
            plan(config, devices=2, device_memory="1GiB", placement=broken)
    without_mtp = plan(config, devices=2, device_memory="1GiB", mtp=False)
    assert "mtp.0" not in without_mtp.placement and without_mtp.placement["head"] in (0, 1)
    # a lopsided layout overflows where the balanced one fits: the error says so
    lopsided = plan(flash, devices=8, device_memory="80GiB", placement=dict.fromkeys(units(flash), 0))
    with pytest.raises(PlanError, match=r"cuda:0 \(embedding, layers 0-47, head, mtp 0-2\)") as err:
        lopsided.check()
    assert "balanced placement (placement=None) fits" in str(err.value)


def test_table_and_device_map(flash):
    p = plan(flash, devices=8, device_memory="80GiB")
    table = p.table()
    assert "cuda:0" in table and "layers 7-12" in table and "291.6" in table and "46%" in table
    assert len(table.splitlines()) == 8 + 4
    device_map = p.device_map()
    assert device_map["model.embed_tokens"] == "cuda:0" and device_map["lm_head"] == "cuda:7"
    assert device_map["model.mtp.layers.2"] == "cuda:7" and len(device_map) == 1 + 48 + 2 + 3
    names = ["layer.1", "layer.2", "layer.4", "head", "mtp.0", "mtp.1"]
    assert describe_units(names) == "layers 1-2, layer 4, head, mtp 0-1"
    assert isinstance(p, Plan)


# ---------------------------------------------------------------------------------------------- tensor parallel
def test_tensor_parallel_plan_at_world_one_is_the_whole_model(flash):
    from minimimo.plan import rank_weight_bytes

    for weight_dtype in ("fp8", "bf16"):
        assert rank_weight_bytes(flash, 0, 1, weight_dtype) == weight_bytes(flash, weight_dtype)


def test_flash_tensor_parallel_8x80gib_fp8_fits_bf16_does_not(flash):
    from minimimo.plan import tensor_parallel_plan

    fp8 = tensor_parallel_plan(flash, world=8, device_memory="80GiB").check()
    per_rank = [r["weights"] for r in fp8.per_device()]
    # the replicated part (embedding + lm_head 2.5 GB, routers 0.2 GB, eh_proj, norms) plus 1/8 of the rest
    replicated = 2 * 152_576 * 4096 * 2
    assert all(w == pytest.approx(per_rank[0], rel=1e-3) for w in per_rank)
    assert replicated + storage_summary(flash)["total"] / 8 < per_rank[0] < replicated + storage_summary(flash)["total"] / 7
    assert per_rank[0] / GiB == pytest.approx(38.8, abs=0.05)
    with pytest.raises(PlanError, match="rank 0 .* over by 2.53 GiB"):
        tensor_parallel_plan(flash, world=8, device_memory="80GiB", weight_dtype="bf16").check()
    assert tensor_parallel_plan(flash, world=8, device_memory="141GB", weight_dtype="bf16").fits
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        tensor_parallel_plan(flash, world=3, device_memory="80GiB")


def test_tensor_parallel_plan_equals_what_each_rank_holds(tmp_path):
    """Two gloo ranks keeping FP8 hold exactly the bytes the per-rank plan counts (blocks cut by a
    rank boundary counted on both ranks, replicated kv heads, row grids)."""
    from helpers import run_local
    from minimimo.plan import rank_weight_bytes

    config = MiMoConfig.tiny(num_key_value_heads=1, swa_num_key_value_heads=2, head_dim=24, num_mtp_layers=1)
    path = save_checkpoint(MiMoForCausalLM(config).init_weights(1), tmp_path / "ckpt", dtype=torch.bfloat16,
                           fp8_block=16)
    ranks = run_local(path, torch.tensor([[1, 2, 3]]), 2, dtype="bfloat16", weight_dtype="fp8")
    saved = MiMoConfig.from_pretrained(path)
    for r, rank in enumerate(ranks):
        assert rank["error"] is None
        assert rank["all_bytes"] == sum(rank_weight_bytes(saved, r, 2, "fp8").values())
