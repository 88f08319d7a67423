"""A slice of MiMo-V2-Flash at its true sizes, written on the fly, then loaded, planned and decoded.

The released checkpoint is 292 GiB; nothing here downloads it. Instead this script writes a
checkpoint with the release's exact tensor names, shapes, dtypes, FP8 block layout (128 x 128
blocks, float32 `weight_scale_inv`, the per-head [8, 32] grid of the global-layer `k_proj`) and
shard names, but only a few layers and random weights:

* layer 0: global attention (64 query heads of 192, 4 kv heads, v 128), dense SwiGLU 16384;
* layer 1: sliding-window attention (8 kv heads, sink bias), MoE with 256 experts of 2048, top-8;
* one MTP block (sliding attention, dense SwiGLU 16384);
* the 152,576-token embedding and LM head.

That is 9.8 GB as stored (6.4 GB of it the 768 FP8 expert matrices of layer 1), 8.4 billion parameters.
Random FP8 bytes are drawn directly (no float32 copy of a 6 GB layer), with every 128 x 128
block's largest magnitude at the FP8 maximum 448, as block quantization leaves it, so that the
loader's amax test sees a real-looking file.

    python bench/real_slice.py                     # write to a temp folder, run every check, delete it
    python bench/real_slice.py --keep DIR          # write (or reuse) DIR and keep it
    python bench/real_slice.py --skip-bf16 --skip-tp

It prints: the bytes planned and actually held, seconds per decoded token with and without MTP,
peak resident memory of each step (each runs in its own process so one does not inflate the next),
and tensor parallelism at world size 2 (gloo) against the single process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from minimimo import MiMoConfig
from minimimo.hub import INDEX, SCALE_SUFFIX, hub_file, is_fp8_stored, tensor_specs

BLOCK = 128
FP8_MAX_BYTE = 0x7E  # 0 1111 110 = 448 in float8_e4m3fn; 0x7F is NaN


def slice_config() -> MiMoConfig:
    """MiMo-V2-Flash's own config, cut to layer 0 (global, dense), layer 1 (sliding, MoE), one MTP block."""
    return MiMoConfig.flash().replace(num_hidden_layers=2, hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 1],
                                      num_mtp_layers=1)


def random_fp8(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random FP8 E4M3 values whose 128 x 128 blocks each reach +-448 somewhere, like quantized weights."""
    magnitude = torch.randint(0, 0x70, (rows, cols), dtype=torch.uint8, generator=gen)  # |x| <= 240, never NaN
    sign = torch.randint(0, 2, (rows, cols), dtype=torch.uint8, generator=gen) << 7
    raw = magnitude | sign
    raw[::BLOCK, ::BLOCK] = FP8_MAX_BYTE  # one element per block at the FP8 maximum
    return raw.view(torch.float8_e4m3fn)


def scale_rows(rows: int, head_size: int | None) -> int:
    """Rows of `weight_scale_inv`: ceil(rows / 128), or per head (the global k_proj: 4 x ceil(192 / 128))."""
    if head_size is None:
        return -(-rows // BLOCK)
    return (rows // head_size) * -(-head_size // BLOCK)


def write_slice(directory: Path, seed: int = 0) -> Path:
    """Write the slice in the release's layout: one shard file at a time, so memory stays at one file."""
    config = slice_config()
    specs = tensor_specs(config)
    gen = torch.Generator().manual_seed(seed)
    files: dict[str, list[str]] = {}
    for name in specs:
        files.setdefault(hub_file(name), []).append(name)
    weight_map, total = {}, 0
    directory.mkdir(parents=True, exist_ok=True)
    for file, names in files.items():
        tensors = {}
        for name in names:
            spec = specs[name]
            if spec.float32:  # router weight and correction bias
                tensors[name] = torch.randn(spec.shape, generator=gen) * (0.02 if len(spec.shape) == 2 else 1e-3)
            elif is_fp8_stored(name, spec):
                rows, cols = spec.shape
                sliding = not name.startswith("model.layers.") or config.is_sliding(int(name.split(".")[2]))
                per_head = spec.head_size if name.endswith("k_proj.weight") and not sliding else None
                tensors[name] = random_fp8(rows, cols, gen)
                # |w| <= 448 * scale: scales near 2e-5 keep a 4096-wide matmul's outputs O(1)
                s = torch.rand(scale_rows(rows, per_head), -(-cols // BLOCK), generator=gen) * 2e-5 + 1e-5
                tensors[name + SCALE_SUFFIX] = s
            elif name.endswith("norm.weight"):
                tensors[name] = torch.ones(spec.shape, dtype=torch.bfloat16)
            else:  # embedding, LM head, o_proj, eh_proj, sinks: bf16
                tensors[name] = (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16)
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config.save(directory)
    return directory


@contextlib.contextmanager
def slice_folder(keep: str | None):
    """The slice's folder: `keep` (written there unless it holds one already, and kept), or a
    temporary folder that is deleted afterwards."""
    path = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mimo-real-slice-"))
    try:
        if not (path / INDEX).exists():
            t0 = time.perf_counter()
            write_slice(path)
            print(f"wrote the slice ({sum(f.stat().st_size for f in path.iterdir()) / 2**30:.2f} GiB, "
                  f"{len(list(path.glob('*.safetensors')))} shards) in {time.perf_counter() - t0:.0f} s")
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def step(path: str, mode: str, new_tokens: int, mtp_steps: int) -> dict:
    """One measurement in this process: load (FP8 kept or bf16), plan vs held bytes, decode."""
    import minimimo
    from minimimo.plan import weight_bytes

    torch.set_num_threads(int(os.environ.get("SLICE_THREADS", 2)))
    t0 = time.perf_counter()
    if mode == "fp8":
        model = minimimo.load(path, dtype=torch.bfloat16, weight_dtype="fp8", progress=False)
    else:
        model = minimimo.load(path, dtype=torch.bfloat16, progress=False)
    load_s = time.perf_counter() - t0
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    planned = sum(weight_bytes(model.config, mode).values())  # counted from the config before loading
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    out = {"mode": mode, "load_s": round(load_s, 1), "held_bytes": held, "planned_bytes": planned}
    for k in sorted({0, mtp_steps}):
        t0 = time.perf_counter()
        generated = minimimo.generate(model, ids, new_tokens, mtp_steps=k)
        out[f"s_per_token_mtp{k}"] = round((time.perf_counter() - t0) / new_tokens, 3)
        out[f"ids_mtp{k}"] = generated[0, ids.shape[1]:].tolist()
    out["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return out


def _tp_worker(rank: int, world: int, port: int, path: str, ids: torch.Tensor, new_tokens: int, out: str) -> None:
    import torch.distributed as dist

    import minimimo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = minimimo.load(path, dtype=torch.bfloat16, weight_dtype="fp8", tensor_parallel=True, progress=False)
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        with torch.no_grad():
            logits = model(ids)[:, -1].float()
        t0 = time.perf_counter()
        generated = minimimo.generate(model, ids, new_tokens)
        seconds = (time.perf_counter() - t0) / new_tokens
        torch.save({"held": held, "logits": logits, "ids": generated, "s_per_token": seconds,
                    "peak_rss_gib": peak_rss_gib()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def tensor_parallel_step(path: str, new_tokens: int) -> dict:
    """World size 2 over gloo, FP8 kept, against one process loading the same way."""
    import socket

    import torch.multiprocessing as mp

    import minimimo
    from minimimo.plan import rank_weight_bytes

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_tp_worker, args=(2, port, path, ids, new_tokens, out), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]
    model = minimimo.load(path, dtype=torch.bfloat16, weight_dtype="fp8", progress=False)
    with torch.no_grad():
        single = model(ids)[:, -1].float()
    greedy = minimimo.generate(model, ids, new_tokens)
    config = model.config
    return {"mode": "tensor parallel, world 2, FP8 kept, bf16",
            "held_bytes_per_rank": [r["held"] for r in ranks],
            "planned_bytes_per_rank": [sum(rank_weight_bytes(config, r, 2, "fp8").values()) for r in range(2)],
            "single_process_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
            "max_logit_diff_vs_single": max((r["logits"] - single).abs().max().item() for r in ranks),
            "same_greedy_ids_as_single": all(torch.equal(r["ids"], greedy) for r in ranks),
            "s_per_token": [round(r["s_per_token"], 3) for r in ranks],
            "peak_rss_gib_per_rank": [round(r["peak_rss_gib"], 2) for r in ranks]}


def run_step(path: Path, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--step", mode, "--keep", str(path), "--new-tokens", str(args.new_tokens),
           "--mtp-steps", str(args.mtp_steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", help="write the slice here (reused if it is already there) and keep it")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--mtp-steps", type=int, default=1, help="MTP drafts per cycle (the slice has one MTP block)")
    p.add_argument("--skip-bf16", action="store_true", help="skip the dequantized bf16 load (17 GB resident)")
    p.add_argument("--skip-tp", action="store_true", help="skip tensor parallelism at world size 2")
    p.add_argument("--step", choices=["fp8", "bf16", "tp"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step == "tp":
        print(json.dumps(tensor_parallel_step(args.keep, args.new_tokens)))
        return 0
    if args.step:
        print(json.dumps(step(args.keep, args.step, args.new_tokens, args.mtp_steps)))
        return 0
    with slice_folder(args.keep) as path:
        results = [run_step(path, "fp8", args)]
        if not args.skip_bf16:
            results.append(run_step(path, "bf16", args))
        if not args.skip_tp:
            results.append(run_step(path, "tp", args))
        for r in results:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
