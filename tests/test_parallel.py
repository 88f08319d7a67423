"""Tensor and expert parallelism on the CPU: gloo process groups on 127.0.0.1, world sizes 1, 2, 4."""

import shutil
import time

import pytest
import torch
import torch.multiprocessing as mp

import minimimo
from minimimo import MiMoConfig, MiMoForCausalLM
from minimimo.hub import save_checkpoint, tensor_specs
from minimimo.parallel import head_shard, local_config, shard_ranges
from helpers import run_local

# gloo process groups on one CPU: a few seconds each, part of every CI run


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """FP8 (block 16, per-head global k grid), global layers with 1 kv head (< ranks), 3 MTP blocks."""
    config = MiMoConfig.tiny(num_key_value_heads=1, swa_num_key_value_heads=2, num_mtp_layers=3)
    model = MiMoForCausalLM(config).init_weights(0)
    return save_checkpoint(model, tmp_path_factory.mktemp("tp") / "ckpt", dtype=torch.bfloat16, fp8_block=16)


@pytest.fixture(scope="module")
def reference(fp8_checkpoint):
    model = minimimo.load(fp8_checkpoint, dtype=torch.float32, progress=False)
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, ids, model(ids), minimimo.generate(model, ids, 10)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_logits_and_greedy_equal_single_process(fp8_checkpoint, reference, world):
    model, ids, logits, greedy = reference
    ranks = run_local(fp8_checkpoint, ids, world, new_tokens=10)
    single_held = sum(p.numel() * p.element_size() for p in model.parameters())
    for rank in ranks:
        torch.testing.assert_close(rank["logits"], logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(rank["ids"], greedy)
    # what a rank holds and reads: its share of the split tensors plus the replicated ones
    specs = tensor_specs(model.config)
    replicated = split = 0
    for name, spec in specs.items():
        size = torch.Size(spec.shape).numel() * 4  # held in float32 here
        if spec.expert is None and shard_ranges(model.config, 0, world)[name] == (None, None):
            replicated += size
        else:
            split += size
    kv_copies = sum(torch.Size(s.shape).numel() * 4 for n, s in specs.items()
                    if n.endswith(("k_proj.weight", "v_proj.weight")))  # kv heads replicated when < ranks
    for rank in ranks:
        assert rank["held_bytes"] <= replicated + split / world + kv_copies
        assert world == 1 or rank["held_bytes"] < single_held
        assert rank["bytes_read"] <= ranks[0]["bytes_read"] * 1.01  # every rank reads its own share only
    if world > 1:
        whole = model.load_report.bytes_read
        assert max(r["bytes_read"] for r in ranks) < whole


def test_fp8_kept_under_tensor_parallel_equals_one_process(fp8_checkpoint, reference):
    """weight_dtype="fp8" under tensor parallelism: each rank keeps its slice in FP8, cut on the
    blocks of the checkpoint (a sliding k_proj of 2 heads x 24 rows splits inside a 16-row block:
    both ranks read its scale row), and computes what one process keeping FP8 computes."""
    from helpers import fp8_bytes

    _, ids, _, greedy = reference
    kept = minimimo.load(fp8_checkpoint, dtype=torch.float32, weight_dtype="fp8", progress=False)
    with torch.no_grad():
        logits = kept(ids)
    ranks = run_local(fp8_checkpoint, ids, 2, weight_dtype="fp8", new_tokens=10)
    for rank in ranks:
        assert rank["error"] is None
        torch.testing.assert_close(rank["logits"], logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(rank["ids"], greedy)
        assert 0 < rank["fp8_bytes"] < fp8_bytes(kept)  # FP8 kept, and only this rank's share of it
        assert sum(rank["grids"].values()) < sum(kept.load_report.grids.values())  # its experts only
    assert sum(r["fp8_bytes"] for r in ranks) >= fp8_bytes(kept)  # replicated kv heads are held twice


def test_speculative_greedy_under_tensor_parallel(fp8_checkpoint, reference):
    """The MTP blocks are sharded like the layers: drafting under TP is still lossless."""
    model, ids, _, greedy = reference
    assert torch.equal(minimimo.generate(model, ids, 10, mtp_steps=3), greedy)


def test_a_rank_that_dies_makes_the_others_fail_fast(fp8_checkpoint, reference):
    _, ids, _, _ = reference
    start = time.perf_counter()
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        run_local(fp8_checkpoint, ids, 2, timeout_s=15, die_rank=1)
    assert time.perf_counter() - start < 90


@pytest.mark.parametrize("other", ["weights", "sizes"])
def test_ranks_that_read_different_checkpoints_all_fail_with_one_error(fp8_checkpoint, reference, tmp_path, other):
    """Rank 1 reads another checkpoint: of the same shapes (other weights), or of other sizes.
    Every rank raises the same CheckpointError at load; none computes, none dies in a collective."""
    _, ids, _, _ = reference
    config = MiMoConfig.tiny(num_key_value_heads=1, swa_num_key_value_heads=2, num_mtp_layers=3)
    if other == "sizes":
        config = config.replace(intermediate_size=256)
    seed = 1 if other == "weights" else 0
    elsewhere = save_checkpoint(MiMoForCausalLM(config).init_weights(seed), tmp_path / "other", dtype=torch.bfloat16,
                                fp8_block=16)
    ranks = run_local([fp8_checkpoint, elsewhere], ids, 2)
    errors = [r["error"] for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "tensor-parallel ranks read different checkpoints" in errors[0]
    differ = "shard data" if other == "weights" else "config.json"
    assert differ in errors[0] and str(elsewhere) in errors[0] and str(fp8_checkpoint) in errors[0]
    if other == "weights":
        assert "config.json" not in errors[0].split(" differ")[0]  # the configs are equal: only the data differs


def test_a_rank_whose_checkpoint_is_broken_fails_every_rank(fp8_checkpoint, reference, tmp_path):
    _, ids, _, _ = reference
    broken = shutil.copytree(fp8_checkpoint, tmp_path / "broken")
    (broken / "model_final.safetensors").unlink()
    errors = [r["error"] for r in run_local([fp8_checkpoint, broken], ids, 2)]
    assert errors[0] == errors[1] and "rank 1" in errors[0] and "model_final.safetensors" in errors[0]


def test_world_sizes_that_cannot_split_raise():
    config = MiMoConfig.tiny()  # 4 query heads, 8 experts
    with pytest.raises(ValueError, match="intermediate_size 128 cannot be split over 3"):
        local_config(config, 3)
    with pytest.raises(ValueError, match="query heads cannot be split over 3"):
        local_config(config.replace(intermediate_size=384, n_routed_experts=6), 3)
    with pytest.raises(ValueError, match="experts cannot be split over 16"):
        local_config(config.replace(num_attention_heads=16, swa_num_attention_heads=16, intermediate_size=256), 16)
    with pytest.raises(ValueError, match="kv heads can be neither split"):
        head_shard(12, 3, 0, 4, "layer")


def test_head_shards_replicate_kv_heads_when_fewer_than_ranks():
    # the real global layers: 64 query heads, 4 kv heads, 8 ranks -> each kv head on 2 ranks
    shards = [head_shard(64, 4, r, 8, "global") for r in range(8)]
    assert [(s.q0, s.q1) for s in shards][:2] == [(0, 8), (8, 16)]
    assert [s.k0 for s in shards] == [0, 0, 1, 1, 2, 2, 3, 3] and all(s.k1 - s.k0 == 1 for s in shards)
    # the real sliding layers: 8 kv heads over 8 ranks -> one each; k_proj rows 192r..192r+191
    flash = MiMoConfig.flash()
    ranges = shard_ranges(flash, 3, 8)
    assert ranges["model.layers.1.self_attn.k_proj.weight"] == ((576, 768), None)  # cuts a 128-row block
    assert ranges["model.layers.1.self_attn.o_proj.weight"] == (None, (3 * 8 * 128, 4 * 8 * 128))
    assert ranges["model.layers.1.mlp.experts.96.up_proj.weight"] == (None, None)  # rank 3 owns 96..127
    assert ranges["model.layers.1.mlp.experts.95.up_proj.weight"] == "skip"


def test_generate_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m minimimo generate` prints what one process prints."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this python")
    args = ["-m", "minimimo", "generate", "--prompt", "def main():", "--max-new-tokens", "12", "--no-stop"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIMIMO_HOME": str(tmp_path)}
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", *args],
                         capture_output=True, text=True, env=env, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.startswith("def main():")


def test_the_cli_destroys_its_process_group_before_exit(tmp_path, capsys):
    """Left to interpreter teardown, a gloo process group can abort the process (SIGABRT from its
    worker threads), so every CLI command ends by destroying it."""
    import torch.distributed as dist

    from minimimo.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        status = main(["info", "--flash"])
    finally:
        left_alive = dist.is_initialized()
        if left_alive:
            dist.destroy_process_group()
    assert status == 0 and "layers       48" in capsys.readouterr().out
    assert not left_alive
