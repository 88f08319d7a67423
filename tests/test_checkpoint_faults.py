"""Bad and hostile checkpoints: each fault is refused at load with an error naming the key,
tensor or file, before anything is built where the fault allows it. (Tensor-parallel ranks that
read different checkpoints: tests/test_parallel.py.)"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import minimimo
import minimimo.checkpoint
from minimimo import CheckpointError, MiMoConfig, MiMoForCausalLM
from minimimo.hub import save_checkpoint
from helpers import hub_cache

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny FP8 checkpoint (block 16) in the release's per-layer files."""
    model = MiMoForCausalLM(MiMoConfig.tiny()).init_weights(3)
    return save_checkpoint(model, tmp_path_factory.mktemp("faults") / "ckpt", dtype=torch.bfloat16, fp8_block=16)


@pytest.fixture
def ckpt(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


def edit_shard(directory, file, change):
    tensors = load_file(str(directory / file))
    change(tensors)
    save_file(tensors, str(directory / file))


def edit_json(file, change):
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


# ------------------------------------------------------------------ non-finite weights and scales
def poke(name, index, value):
    def change(tensors):
        t = tensors[name].clone()
        if t.dtype == torch.float8_e4m3fn:
            t.view(torch.uint8)[index] = value  # a raw byte: 0x7F / 0xFF are e4m3fn's NaN
        else:
            t[index] = value
        tensors[name] = t
    return change


@pytest.mark.parametrize("weight_dtype", [None, "fp8"])
@pytest.mark.parametrize("name, file, index, value, message", [
    ("model.norm.weight", "model_final.safetensors", (5,), float("nan"), "holds NaN or Inf"),
    ("model.layers.2.self_attn.o_proj.weight", "model_2.safetensors", (3, 4), float("inf"), "holds NaN or Inf"),
    ("model.layers.1.self_attn.q_proj.weight", "model_1.safetensors", (7, 9), 0x7F, "holds the FP8 NaN byte"),
    ("model.layers.3.mlp.experts.2.down_proj.weight", "model_3_linear_fc2.safetensors", (0, 1), 0xFF, "holds the FP8 NaN byte"),
    ("model.layers.1.self_attn.q_proj.weight_scale_inv", "model_1.safetensors", (0, 0), float("inf"), "holds NaN or Inf"),
])
def test_a_non_finite_value_is_named_at_load(ckpt, weight_dtype, name, file, index, value, message):
    edit_shard(ckpt, file, poke(name, index, value))
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '{name}' {message}"):
        minimimo.load(ckpt, weight_dtype=weight_dtype, progress=False)


# ------------------------------------------------------------------ config keys
def test_a_missing_config_key_is_named_at_load(ckpt):
    edit_json(ckpt / "config.json", lambda c: [c.pop("sliding_window_size"), c.pop("sliding_window")])
    with pytest.raises(ValueError, match="required key `sliding_window_size` is missing"):
        minimimo.load(ckpt, progress=False)


# ------------------------------------------------------------------ files outside the folder
@pytest.mark.parametrize("entry", ["../elsewhere/model_2.safetensors", "/tmp/model_2.safetensors", "sub/../../x"])
def test_index_entries_outside_the_folder_are_refused(ckpt, entry):
    edit_json(ckpt / INDEX, lambda i: i["weight_map"].update({"model.layers.2.input_layernorm.weight": entry}))
    with pytest.raises(CheckpointError, match=rf"{INDEX}: file entry '{entry}' points outside the checkpoint"):
        minimimo.load(ckpt, progress=False)


def test_a_shard_that_links_outside_the_folder_is_refused(ckpt, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(ckpt / "model_2.safetensors", outside)
    os.symlink(outside, ckpt / "model_2.safetensors")
    with pytest.raises(CheckpointError, match=r"file entry 'model_2.safetensors' is a symbolic link to .*outside the"):
        minimimo.load(ckpt, progress=False)


def test_a_huggingface_hub_cache_snapshot_loads(saved, tmp_path):
    """The layout huggingface_hub writes: snapshots/<revision>/<file> -> ../../blobs/<sha256>."""
    snapshot = hub_cache(saved, tmp_path / "hub")
    assert (snapshot / "config.json").is_symlink()
    loaded = minimimo.load(snapshot, progress=False)
    reference = minimimo.load(saved, progress=False)
    for (name, a), (_, b) in zip(reference.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_a_hub_id_loads_offline_from_the_huggingface_hub_cache(saved, tmp_path):
    """`load("org/name")` goes through huggingface_hub: offline, the cached snapshot is read."""
    pytest.importorskip("huggingface_hub")
    hub_cache(saved, tmp_path / "hub", "org/tiny-mimo")
    script = textwrap.dedent("""
        import minimimo
        model = minimimo.load("org/tiny-mimo", progress=False)
        print(model.load_report.directory.name, model.load_report.tensors, float(model.lm_head.weight.double().sum()))
        try:
            minimimo.load("org/not-cached", progress=False)
        except FileNotFoundError as err:
            print(err)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    reference = minimimo.load(saved, progress=False)
    first, second = run.stdout.splitlines()[:2]
    revision = first.split()[0]
    assert first == f"{revision} {reference.load_report.tensors} {float(reference.lm_head.weight.double().sum())}"
    assert second.startswith("'org/not-cached' is neither a folder nor a checkpoint found in the local cache (offline)")


# ------------------------------------------------------------------ configs that ask for too much
def test_a_million_experts_fail_before_the_tensors_are_listed(ckpt, monkeypatch):
    edit_json(ckpt / "config.json", lambda c: c.update(n_routed_experts=1_000_000))

    def no_listing(config):
        raise AssertionError("tensor_specs ran for a config the index cannot back")

    monkeypatch.setattr(minimimo.checkpoint, "tensor_specs", no_listing)
    with pytest.raises(CheckpointError, match=r"config.json: n_routed_experts = 1,000,000 over 7 MoE layers"):
        minimimo.load(ckpt, progress=False)


def test_a_huge_vocabulary_fails_before_anything_is_built(ckpt, monkeypatch):
    edit_json(ckpt / "config.json", lambda c: c.update(vocab_size=10**12))

    def no_model(config):
        raise AssertionError("the model was built for a config the shard headers contradict")

    monkeypatch.setattr(minimimo.checkpoint, "MiMoForCausalLM", no_model)
    with pytest.raises(CheckpointError, match=r"model_embedding.safetensors: tensor 'model.embed_tokens.weight' has "
                                              r"shape \[256, 64\], the config implies \[1000000000000, 64\]"):
        minimimo.load(ckpt, progress=False)


# ------------------------------------------------------------------ a shard truncated while it is read
def test_a_shard_truncated_while_read_is_an_error_naming_it_not_a_crash(ckpt):
    """The reader has checked the header; then the file shrinks (a copy in progress) and the read
    runs past its end. Through a memory map that is SIGBUS; here it must be a CheckpointError."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from minimimo.checkpoint import CheckpointError, ShardReader, read_index
        directory = Path({str(ckpt)!r})
        file, name = "model_embedding.safetensors", "model.embed_tokens.weight"
        reader = ShardReader(directory, read_index(directory))
        reader.handle(file)  # header read and checked: the file was whole
        os.truncate(directory / file, 4096)
        try:
            reader.read(name)
        except CheckpointError as err:
            print(err)
            sys.exit(0)
        sys.exit(5)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, f"exit status {run.returncode} (-7 is SIGBUS): {run.stderr[-2000:]}"
    assert "model_embedding.safetensors: cannot read tensor 'model.embed_tokens.weight'" in run.stdout


# ------------------------------------------------------------------ FP8 slices a rank keeps
def test_fp8_slices_are_cut_on_the_checkpoints_blocks(saved):
    """A rank's rows take the scale rows covering them (a block cut in half is read by both ranks);
    a column split inside a block cannot be kept in FP8 and is refused by name."""
    from minimimo.checkpoint import ShardReader, read_index
    from minimimo.parallel import fp8_slice
    from minimimo.hub import tensor_specs

    config = MiMoConfig.from_pretrained(saved)
    reader, specs = ShardReader(saved, read_index(saved)), tensor_specs(config)
    name = "model.layers.1.self_attn.k_proj.weight"  # sliding: 2 kv heads x 24 rows, 16-row blocks
    second = fp8_slice(reader, name, specs[name], config, (24, 48), None)
    assert second.scale_rows == (1, 3) and second.row_block.tolist() == [0] * 8 + [1] * 16
    down = "model.layers.0.mlp.down_proj.weight"
    assert fp8_slice(reader, down, specs[down], config, None, (64, 128)).scale_cols == (4, 8)
    with pytest.raises(CheckpointError, match=r"model_0.safetensors: this rank's columns 8..16 of "
                                              r"'model.layers.0.mlp.down_proj.weight' start inside a 16-column"):
        fp8_slice(reader, down, specs[down], config, None, (8, 16))


def test_a_model_too_big_for_its_gpu_is_refused_before_allocation(saved, monkeypatch):
    """On CUDA the weights' bytes are checked against the device's free memory first (no GPU
    needed here: the free memory is given, and nothing is allocated because the check refuses)."""
    model = minimimo.load(saved, dtype=torch.bfloat16, progress=False)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (held - 1, 80 * 2**30))
    with pytest.raises(MemoryError, match=r"cuda:0: the weights need 0.00 GiB, but 0.00 GiB of its 80.00 GiB"):
        minimimo.load(saved, device="cuda:0", progress=False)  # bfloat16: the config's dtype on CUDA
