"""Tensor and expert parallelism with `torch.distributed`: each rank holds and reads only its shard.

    torchrun --nproc-per-node 8 -m minimimo generate --model path/to/MiMo-V2-Flash --prompt ...
    # or, under an initialised process group:
    model = minimimo.load(path, tensor_parallel=True)     # this rank's shard
    logits = model(input_ids)                             # the full logits, on every rank

How the weights are split over a world of W ranks (DeepSeek-V3-style plain plumbing):

* **Attention**: each rank owns H/W consecutive query heads and the kv heads they use. When a
  layer has at least W kv heads they are split too; when it has fewer (the global layers have 4,
  so on 8 ranks) each kv head is *replicated* on the W/kv ranks whose query heads read it. q, k, v
  are column-parallel (rows of the weights), `o_proj` is row-parallel (its input columns): each
  rank's output is a partial sum, completed by one all-reduce. The sink logits follow the heads.
* **Dense MLP** (layer 0, MTP blocks): gate/up column-parallel, down row-parallel, one all-reduce.
* **Experts** (expert parallelism): rank r owns experts [r*E/W, (r+1)*E/W). The router is
  replicated (every rank routes every token the same way), each rank runs its own experts on the
  tokens routed to them, and one all-reduce sums the weighted outputs.
* **Embedding, norms, router, LM head, `eh_proj`**: replicated. Splitting the vocabulary would save
  2 x 1.25 GB per rank for Flash at the price of a gather per step; replicated keeps `model(ids)`
  returning full logits on every rank with no extra collective.

Reading: every tensor is read with `safe_open(...).get_slice` — only the rank's rows or columns
leave the disk. An FP8 weight's scale is sliced consistently: the rank reads the scale rows that
cover its weight rows, even when its first or last row falls inside a 128-row block (the real
sliding-layer `k_proj`, 1536 rows over 8 ranks = 192 rows each, cuts blocks in half: the block is
shared, so both ranks read its scale row).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from .checkpoint import (CheckpointError, LoadReport, ShardReader, _allocate, _check_names, _resolve_dtype,
                         read_index, read_weight)
from .config import MiMoConfig
from .hub import tensor_specs
from .model import MiMoForCausalLM
from .moe import MoE


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; a dead or stuck peer becomes an error that says so (no hang:
    the process group's timeout bounds the wait)."""
    try:
        dist.all_reduce(t)
    except RuntimeError as err:
        raise RuntimeError(f"tensor-parallel all_reduce failed on rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}: another rank died or timed out ({err})") from err
    return t


class AllReduceLinear(nn.Linear):
    """A row-parallel linear: this rank's input columns give a partial sum, summed over ranks."""

    def forward(self, x):
        return all_reduce(super().forward(x))


class ExpertParallelMoE(MoE):
    """Replicated router; this rank's experts [first, first + local) run on the tokens routed to them."""

    def __init__(self, config: MiMoConfig, first: int, local: int):
        super().__init__(config)
        self.first = first
        self.experts = type(self.experts)(local, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x):
        b = x.shape[0]
        tokens = rearrange(x, "b t c -> (b t) c")
        gate_weights, expert_ids = self.gate(tokens)
        mine = (expert_ids >= self.first) & (expert_ids < self.first + self.experts.gate_proj.shape[0])
        token, slot = mine.nonzero(as_tuple=True)
        local_ids = expert_ids[token, slot] - self.first
        out = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
        for e in local_ids.unique().tolist():
            rows = local_ids == e
            y = self.experts.expert(e, tokens[token[rows]])
            out.index_add_(0, token[rows], y.float() * gate_weights[token[rows], slot[rows], None])
        all_reduce(out)
        return rearrange(out.to(x.dtype), "(b t) c -> b t c", b=b)


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """The query heads [q0, q1) and kv heads [k0, k1) one rank owns in one kind of layer."""

    q0: int
    q1: int
    k0: int
    k1: int


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world: int, what: str) -> HeadShard:
    if num_heads % world:
        raise ValueError(f"{what}: {num_heads} query heads cannot be split over {world} ranks")
    if num_kv_heads % world and world % num_kv_heads:
        raise ValueError(f"{what}: {num_kv_heads} kv heads can be neither split over nor replicated on "
                         f"{world} ranks (one must divide the other)")
    per_rank, group = num_heads // world, num_heads // num_kv_heads
    q0 = rank * per_rank
    return HeadShard(q0, q0 + per_rank, q0 // group, (q0 + per_rank - 1) // group + 1)


def local_config(config: MiMoConfig, world: int) -> MiMoConfig:
    """The shapes one rank holds: heads and intermediate sizes divided, kv heads divided or 1."""
    if config.intermediate_size % world:
        raise ValueError(f"intermediate_size {config.intermediate_size} cannot be split over {world} ranks")
    if any(config.moe_layer_freq) and config.n_routed_experts % world:
        raise ValueError(f"{config.n_routed_experts} experts cannot be split over {world} ranks")
    shards = {}
    for prefix in ("", "swa_"):
        heads, kv = getattr(config, f"{prefix}num_attention_heads"), getattr(config, f"{prefix}num_key_value_heads")
        s = head_shard(heads, kv, 0, world, f"{prefix}num_attention_heads/{prefix}num_key_value_heads")
        shards[f"{prefix}num_attention_heads"] = s.q1 - s.q0
        shards[f"{prefix}num_key_value_heads"] = s.k1 - s.k0
    return config.replace(intermediate_size=config.intermediate_size // world, **shards)


def shard_ranges(config: MiMoConfig, rank: int, world: int):
    """hub tensor name -> (rows, cols) this rank reads (None = whole dimension), or 'skip'."""
    e_local = config.n_routed_experts // world
    ranges = {}
    for name, spec in tensor_specs(config).items():
        parts = name.split(".")
        layer = int(parts[2]) if parts[1] == "layers" else None
        g = config.attention(layer)
        h = head_shard(g.num_heads, g.num_kv_heads, rank, world, name)
        i_local = config.intermediate_size // world
        if spec.expert is not None:
            mine = rank * e_local <= spec.expert < (rank + 1) * e_local
            ranges[name] = (None, None) if mine else "skip"
        elif name.endswith("q_proj.weight"):
            ranges[name] = ((h.q0 * g.head_dim, h.q1 * g.head_dim), None)
        elif name.endswith("k_proj.weight"):
            ranges[name] = ((h.k0 * g.head_dim, h.k1 * g.head_dim), None)
        elif name.endswith("v_proj.weight"):
            ranges[name] = ((h.k0 * g.v_head_dim, h.k1 * g.v_head_dim), None)
        elif name.endswith("o_proj.weight"):
            ranges[name] = (None, (h.q0 * g.v_head_dim, h.q1 * g.v_head_dim))
        elif name.endswith("attention_sink_bias"):
            ranges[name] = ((h.q0, h.q1), None)
        elif name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            ranges[name] = ((rank * i_local, (rank + 1) * i_local), None)
        elif name.endswith("mlp.down_proj.weight"):
            ranges[name] = (None, (rank * i_local, (rank + 1) * i_local))
        else:
            ranges[name] = (None, None)
    return ranges


def load_tensor_parallel(path: str | Path, *, dtype=None, device=None, progress: bool = False) -> MiMoForCausalLM:
    """This rank's shard of a hub checkpoint (process group already initialised)."""
    if not dist.is_initialized():
        raise RuntimeError("tensor_parallel=True needs an initialised torch.distributed process group "
                           "(launch with torchrun, or call torch.distributed.init_process_group)")
    rank, world = dist.get_rank(), dist.get_world_size()
    directory = Path(path)
    config = MiMoConfig.from_pretrained(directory)
    dtype = _resolve_dtype(dtype, config)
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu"
    weight_map = read_index(directory)
    specs = tensor_specs(config)
    _check_names(weight_map, specs, directory)
    shard_config = local_config(config, world)
    ranges = shard_ranges(config, rank, world)
    e_local = config.n_routed_experts // world

    with torch.device("meta"):
        model = MiMoForCausalLM(shard_config)
        for i, layer in enumerate(model.model.layers):
            o = layer.self_attn.o_proj
            layer.self_attn.o_proj = AllReduceLinear(o.in_features, o.out_features, bias=False)
            if config.is_moe(i):
                layer.mlp = ExpertParallelMoE(config, rank * e_local, e_local)
            else:
                layer.mlp.down_proj = AllReduceLinear(layer.mlp.down_proj.in_features, config.hidden_size, bias=False)
        for block in model.model.mtp.layers:
            o = block.self_attn.o_proj
            block.self_attn.o_proj = AllReduceLinear(o.in_features, o.out_features, bias=False)
            block.mlp.down_proj = AllReduceLinear(block.mlp.down_proj.in_features, config.hidden_size, bias=False)
    _allocate(model, specs, dtype, lambda name: torch.device(device))

    params = dict(model.named_parameters())
    reader = ShardReader(directory, weight_map, device)
    report = LoadReport(directory)
    filled = set()
    for name, spec in specs.items():
        if ranges[name] == "skip":
            continue
        rows, cols = ranges[name]
        tensor = read_weight(reader, name, spec, config, dtype, report, rows=rows, cols=cols)
        target = params[spec.param]
        if spec.expert is not None:
            target = target[spec.expert - rank * e_local]
        if tensor.shape != target.shape:
            raise CheckpointError(f"{reader.where(name)}: slice of {name!r} has shape {list(tensor.shape)}, "
                                  f"rank {rank} expects {list(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        filled.add((spec.param, spec.expert))
        report.tensors += 1
    expected = {(s.param, s.expert) for n, s in specs.items() if ranges[n] != "skip"}
    if filled != expected:
        raise CheckpointError(f"{directory}: rank {rank} left parameters unfilled: {sorted(expected - filled)[:5]}")
    report.files = len({weight_map[n] for n in specs if ranges[n] != "skip"})
    report.mtp_blocks = config.num_mtp_layers
    report.bytes_read = reader.bytes_read
    model.load_report = report
    model.full_config = config
    model.rank, model.world_size = rank, world
    return model.eval().requires_grad_(False)


def init_from_env(timeout_s: float = 60.0) -> bool:
    """Initialise the process group torchrun describes (NCCL on CUDA, gloo on CPU); False if not under torchrun."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from datetime import timedelta

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def held_bytes(model) -> int:
    """Bytes of parameters this process holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters())




def _local_worker(rank, world, port, path, input_ids, dtype, new_tokens, out_dir, timeout_s, die_rank):
    from datetime import timedelta

    from .generate import generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        model = load_tensor_parallel(path, dtype=dtype, device="cpu")
        if rank == die_rank:
            os._exit(3)  # a rank that dies: the others must fail cleanly, not hang
        with torch.no_grad():
            logits = model(input_ids)
        ids = generate(model, input_ids, new_tokens) if new_tokens else None
        torch.save({"logits": logits, "ids": ids, "held_bytes": held_bytes(model),
                    "bytes_read": model.load_report.bytes_read}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(path, input_ids: torch.Tensor, world: int, *, dtype="float32", new_tokens: int = 0,
              timeout_s: float = 30.0, die_rank: int | None = None) -> list[dict]:
    """Run `world` CPU processes (gloo on 127.0.0.1), each loading its shard of `path`, and
    return per rank: logits, greedy ids (`new_tokens`), bytes held and bytes read from disk."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_local_worker, args=(world, port, str(path), input_ids, dtype, new_tokens, out_dir, timeout_s,
                                      -1 if die_rank is None else die_rank), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
