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

Loading: `checkpoint.load(path, tensor_parallel=True)` is the one loader. This module gives it a
`ShardPlan` (the rank's shapes, and for every hub tensor the rows and columns the rank reads, or
nothing), builds the rank's model on the meta device, and makes every rank agree that it read the
same checkpoint before anything is allocated. `ShardReader.read(name, rows, cols)` then reads
only the rank's rows or columns from disk. An FP8 weight's scale is sliced consistently: the rank reads the scale rows that
cover its weight rows, even when its first or last row falls inside a 128-row block (the real
sliding-layer `k_proj`, 1536 rows over 8 ranks = 192 rows each, cuts blocks in half: the block is
shared, so both ranks read its scale row).

FP8 kept (`load(path, tensor_parallel=True, weight_dtype="fp8")`): each rank keeps its rows or
columns in FP8 with the scale rows and columns that cover them and the slice's own row grid
(`fp8_slice`), so a rank of the real model holds about 1/8 of the 292 GiB release plus
the replicated tensors; the row-parallel FP8 linears sum over ranks (`AllReduceFP8Linear`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from .config import MiMoConfig
from .fp8 import FP8Linear, choose_grid
from .hub import SCALE_SUFFIX, TensorSpec, tensor_specs
from .model import MiMoForCausalLM
from .moe import MoE
from .shards import CheckpointError, ShardReader

T = TypeVar("T")


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; a dead or stuck peer becomes an error that says so (no hang:
    the process group's timeout bounds the wait)."""
    try:
        dist.all_reduce(t)
    except RuntimeError as err:
        raise RuntimeError(f"tensor-parallel all_reduce failed on rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}: another rank died or timed out ({err})") from err
    return t


ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")  # the linears whose outputs are summed over ranks


class AllReduceLinear(nn.Linear):
    """A row-parallel linear: this rank's input columns give a partial sum, summed over ranks."""

    def forward(self, x):
        return all_reduce(super().forward(x))


class AllReduceFP8Linear(FP8Linear):
    """`AllReduceLinear` with its weight kept in FP8 (`weight_dtype="fp8"`)."""

    def forward(self, x):
        return all_reduce(super().forward(x))


def sum_fp8_over_ranks(model: nn.Module) -> None:
    """After the loader swapped FP8 modules in (on meta): an `FP8Linear` in a row-parallel place
    sums over ranks like the `AllReduceLinear` it replaced (same buffers, one more step)."""
    for name, module in model.named_modules():
        if type(module) is FP8Linear and name.endswith(ROW_PARALLEL):
            module.__class__ = AllReduceFP8Linear


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
        out = self.experts.weighted_sum(tokens, gate_weights, expert_ids - self.first)  # float32; others' add 0
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


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds: `config` is the whole model's, `ranges` maps every hub
    tensor to the (rows, cols) this rank reads (None = the whole dimension) or "skip"."""

    rank: int
    world: int
    config: MiMoConfig
    ranges: dict[str, tuple | str]

    @property
    def first_expert(self) -> int:
        return self.rank * (self.config.n_routed_experts // self.world)

    def expert_row(self, spec: TensorSpec) -> int | None:
        """The row of this rank's stacked experts that a hub expert tensor fills (None: not an expert)."""
        return None if spec.expert is None else spec.expert - self.first_expert


def shard_plan(config: MiMoConfig, rank: int | None = None, world: int | None = None) -> ShardPlan:
    """The plan of `rank` in `world` (default: this process in the initialised process group)."""
    if rank is None or world is None:
        require_process_group()
        rank, world = dist.get_rank(), dist.get_world_size()
    local_config(config, world)  # raises when the world cannot split the model
    return ShardPlan(rank, world, config, shard_ranges(config, rank, world))


def sharded_model(plan: ShardPlan) -> MiMoForCausalLM:
    """This rank's model (build it under `torch.device("meta")`): the local shapes, `o_proj` and
    the dense `down_proj` summing over ranks, the MoE layers running this rank's experts."""
    config, world = plan.config, plan.world
    e_local = config.n_routed_experts // world
    model = MiMoForCausalLM(local_config(config, world))
    for i, layer in enumerate(model.model.layers):  # the ROW_PARALLEL linears sum over ranks
        o = layer.self_attn.o_proj
        layer.self_attn.o_proj = AllReduceLinear(o.in_features, o.out_features, bias=False)
        if config.is_moe(i):
            layer.mlp = ExpertParallelMoE(config, plan.first_expert, e_local)
        else:
            layer.mlp.down_proj = AllReduceLinear(layer.mlp.down_proj.in_features, config.hidden_size, bias=False)
    for block in model.model.mtp.layers:
        o = block.self_attn.o_proj
        block.self_attn.o_proj = AllReduceLinear(o.in_features, o.out_features, bias=False)
        block.mlp.down_proj = AllReduceLinear(block.mlp.down_proj.in_features, config.hidden_size, bias=False)
    return model


@dataclasses.dataclass(frozen=True)
class FP8Slice:
    """The block of an FP8 weight one tensor-parallel rank holds, cut on the weight's own grid:
    rows [r0, r1) and columns [c0, c1), the scale rows and columns that cover them, and the row
    grid of the slice (row -> row of the sliced scale)."""

    kind: str  # the grid: "uniform" or "per-head" (`fp8.choose_grid`)
    rows: tuple[int, int]
    cols: tuple[int, int]
    scale_rows: tuple[int, int]
    scale_cols: tuple[int, int]
    row_block: torch.Tensor


def fp8_slice(reader: ShardReader, name: str, spec: TensorSpec, config: MiMoConfig, rows, cols) -> FP8Slice:
    """Where a rank's rows/columns of FP8 weight `name` fall on its block grid. A rank whose rows
    start or end inside a block reads that block's scale row too (the block is shared, as when a
    rank dequantizes its slice); a column split must fall on a block edge, because `FP8Linear`
    multiplies whole column blocks."""
    shape, scale_name = reader.shape(name), name + SCALE_SUFFIX
    block_c = config.fp8_block[1]
    try:
        kind, grid = choose_grid(shape, reader.shape(scale_name), config.fp8_block, head_size=spec.head_size,
                                 name=name, fp8=lambda: reader.read(name))
    except ValueError as err:
        raise CheckpointError(f"{reader.where(scale_name)}: {err}") from None
    (r0, r1), (c0, c1) = rows or (0, shape[0]), cols or (0, shape[1])
    if c0 % block_c:
        raise CheckpointError(f"{reader.where(name)}: this rank's columns {c0}..{c1} of {name!r} start inside a "
                              f"{block_c}-column FP8 block; keep FP8 under tensor parallelism only where column "
                              "splits fall on block edges, or load with weight_dtype=None")
    local = grid[r0:r1]
    s_r0, s_r1 = int(local.min()), int(local.max()) + 1
    return FP8Slice(kind, (r0, r1), (c0, c1), (s_r0, s_r1), (c0 // block_c, -(-c1 // block_c)), local - s_r0)


def slice_fp8_storage(model: nn.Module, reader: ShardReader, specs: dict[str, TensorSpec], fp8_names: set[str],
                      plan: ShardPlan) -> dict[str, FP8Slice]:
    """Under tensor parallelism with FP8 kept: each sliced FP8 weight's scale buffer takes the
    shape of the scale rows and columns the rank reads (still on meta)."""
    slices = {}
    for name in sorted(fp8_names):
        where = plan.ranges[name]
        if where == "skip" or where == (None, None):
            continue  # not on this rank, or whole on it (experts): read as without tensor parallelism
        cut = slices[name] = fp8_slice(reader, name, specs[name], plan.config, *where)
        module = model.get_submodule(specs[name].param.rpartition(".")[0])
        scale_shape = (cut.scale_rows[1] - cut.scale_rows[0], cut.scale_cols[1] - cut.scale_cols[0])
        module.register_buffer("weight" + SCALE_SUFFIX, torch.empty(scale_shape, dtype=torch.float32, device="meta"))
    return slices


def same_on_every_rank(read: Callable[[], tuple[T, dict[str, str]]], source: str) -> T:
    """Run `read` on every rank (it returns what it read and a fingerprint {part: digest}), then
    compare the fingerprints of all ranks. A rank that failed, or fingerprints that differ, raise
    the same `CheckpointError` on every rank: no rank goes on to compute with other weights, and
    none dies later in a collective of mismatched sizes."""
    require_process_group()
    try:
        value, digests = read()
        mine = {"source": source, "digests": digests, "error": None}
    except (CheckpointError, ValueError, OSError) as err:
        value, mine = None, {"source": source, "digests": None, "error": f"{type(err).__name__}: {err}"}
    everyone: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [f"rank {r} ({e['source']}): {e['error']}" for r, e in enumerate(everyone) if e["error"]]
    if failed:
        raise CheckpointError("tensor-parallel load failed on " + "; ".join(failed))
    parts = [part for part in everyone[0]["digests"] if len({e["digests"][part] for e in everyone}) > 1]
    if parts:
        seen = ", ".join(f"rank {r} {e['source']} ({e['digests'][parts[0]]})" for r, e in enumerate(everyone))
        raise CheckpointError(f"tensor-parallel ranks read different checkpoints: {', '.join(parts)} differ "
                              f"({parts[0]}: {seen}); every rank must load the same checkpoint")
    return value


def require_process_group() -> None:
    if not dist.is_initialized():
        raise RuntimeError("tensor_parallel=True needs an initialised torch.distributed process group "
                           "(launch with torchrun, or call torch.distributed.init_process_group)")


def rank_device() -> str:
    """The device a rank computes on by default: its local GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', dist.get_rank() if dist.is_initialized() else 0))}"
    return "cpu"


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


def end_process_group() -> None:
    """Destroy the process group, if there is one, while the interpreter is still whole. torch's
    docs ask for it before exit (distributed.html#shutdown); left to interpreter teardown, gloo's
    worker threads can abort the process with SIGABRT ("terminate called without an active
    exception"; pytorch/pytorch#179291), which failed a torchrun test here once in a few dozen runs."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
