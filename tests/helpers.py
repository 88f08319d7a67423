"""Test machinery that does not belong in the package: several gloo ranks on one CPU, and a
byte count of what a model holds."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def held_bytes(model) -> int:
    """Bytes of parameters this process holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fp8_bytes(model) -> int:
    """Bytes of the FP8 weights this process keeps (`weight_dtype="fp8"`: buffers, not parameters)."""
    return sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype == torch.float8_e4m3fn)


def _local_worker(rank, world, port, paths, input_ids, dtype, weight_dtype, new_tokens, out_dir, timeout_s,
                  die_rank):
    from datetime import timedelta

    import minimimo
    from minimimo import CheckpointError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        try:
            model = minimimo.load(paths[rank], dtype=dtype, weight_dtype=weight_dtype, tensor_parallel=True,
                                  progress=False)
        except CheckpointError as err:  # recorded: the test checks that every rank says the same
            torch.save({"error": str(err)}, Path(out_dir) / f"rank{rank}.pt")
            return
        if rank == die_rank:
            os._exit(3)  # a rank that dies: the others must fail cleanly, not hang
        with torch.no_grad():
            logits = model(input_ids)
        ids = minimimo.generate(model, input_ids, new_tokens) if new_tokens else None
        torch.save({"logits": logits, "ids": ids, "held_bytes": held_bytes(model), "error": None,
                    "fp8_bytes": fp8_bytes(model), "grids": model.load_report.grids,
                    "all_bytes": held_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers()),
                    "bytes_read": model.load_report.bytes_read}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(path, input_ids: torch.Tensor, world: int, *, dtype="float32", weight_dtype: str | None = None,
              new_tokens: int = 0, timeout_s: float = 30.0, die_rank: int | None = None) -> list[dict]:
    """Run `world` CPU processes (gloo on 127.0.0.1), each loading its shard of `path` (or of
    `path[rank]` when given a list), and return per rank: logits, greedy ids (`new_tokens`),
    bytes held (parameters; FP8 buffers apart) and bytes read from disk, or the `CheckpointError` message of a failed load."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)] * world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_local_worker, args=(world, port, paths, input_ids, dtype, weight_dtype, new_tokens, out_dir, timeout_s,
                                      -1 if die_rank is None else die_rank), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


def demo_checkpoint(directory: Path) -> Path:
    """A small random MiMo written in the official hub layout with block-FP8 weights (16 x 16),
    bf16 norms and `o_proj`, a float32 router, and a byte-level BPE tokenizer trained on a few
    standard-library modules: its text is noise; its loading and generation paths are the real ones."""
    import inspect
    import json
    import textwrap

    from minimimo import MiMoConfig, MiMoForCausalLM
    from minimimo.hub import save_checkpoint
    from minimimo.tokenizer import save_tokenizer, train_bpe_tokenizer

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    tokenizer = train_bpe_tokenizer([inspect.getsource(m) for m in (json, textwrap, inspect)], vocab_size=512)
    model = MiMoForCausalLM(MiMoConfig.tiny(vocab_size=tokenizer.get_vocab_size())).init_weights(seed=0)
    save_checkpoint(model, directory, dtype=torch.bfloat16, fp8_block=16, layout="hub")
    save_tokenizer(tokenizer, directory)
    return directory


def hub_cache(checkpoint: Path, cache: Path, repo_id: str = "org/tiny-mimo") -> Path:
    """Lay `checkpoint`'s files out as huggingface_hub's cache does and return the snapshot folder:
    `models--org--name/refs/main` (the revision), `blobs/<hash>` (the contents) and
    `snapshots/<revision>/<file> -> ../../blobs/<hash>` (relative symbolic links)."""
    import hashlib
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    for folder in (repo / "blobs", repo / "refs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for file in sorted(Path(checkpoint).iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob}")
    return snapshot
