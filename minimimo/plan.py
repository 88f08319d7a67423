"""Memory planning: does MiMo-V2-Flash fit, and which device holds which layer?

Nothing is allocated here. The planner counts bytes from the tensor shapes (`hub.tensor_specs`),
so a loader can call `plan(...).check()` before touching a device and stop with a message that
names the device and the shortfall, instead of a CUDA out-of-memory error at layer 31.

What counts
-----------
*Weights*, as they sit in memory. The release stores q/k/v, the dense MLP and every expert as
1-byte FP8 plus one float32 scale per 128 x 128 block; o_proj, eh_proj, embedding, lm_head, norms
and sinks as bf16; the router as float32 (the shard headers and `quantization_config` of
huggingface.co/XiaomiMiMo/MiMo-V2-Flash). Counted from the shapes, `storage_summary(MiMoConfig.flash())`:

    FP8 payload    305.87 GB   305.9 B weights x 1 byte, 99% of them experts
    bf16             5.72 GB   embedding and lm_head (1.25 GB each), 48 o_proj, norms, sinks
    fp32 router      0.20 GB   47 x (256 x 4096 + 256) x 4 B
    block scales     0.07 GB   one float32 per 16,384 FP8 weights
    row grids        0.004 GB  one int32 per FP8 row, shared by a stack of experts (in memory only)
    main model     311.87 GB   + 3 MTP blocks x 0.40 GB = 313.06 GB (291.6 GiB)

The unit that decides everything is the MoE layer: 256 experts x 3 matrices x 2048 x 4096 = 6.44 B
weights, 6.44 GB in FP8, 12.9 GB in bf16. Dequantized to bf16 the model is 617.7 GB (+ 2.0 GB MTP).

*KV cache* (`kv_bytes_per_layer`). Per sequence and token, a global layer keeps 4 kv heads x
(192 + 128) channels x 2 B = 2,560 B for every token of the context; a sliding layer and each MTP
block keep only the last window + reserve tokens (8 x 320 x 2 B x 131 = 0.67 MB, whatever the
context). 0.1 GiB at 4K tokens; 5.65 GiB per sequence at 256K, nearly all of it in the 9 global layers.

*Not counted*, hence `headroom` (10% of every device by default): activations (the fp32 logits of
a 4K-token prefill alone are 4096 x 152576 x 4 B = 2.5 GB), the CUDA context, allocator
fragmentation, communication buffers. "fits" means weights + KV <= 90% of the device.

Why 8 GPUs
----------
313 GB is 2.2 H200s (141 GB) or 3.6 GPUs of 80 GiB: in FP8 the weights need at least 3 H200s or
5 x 80 GiB. Eight 80 GiB GPUs hold them at 46% each and leave the rest to the KV caches of many
sequences (the official SGLang recipe serves on 8 GPUs with `--mem-fraction-static 0.75`). In bf16,
620 GB on 8 x 80 GiB fills the fullest GPU to 93% before a single activation: it does not fit
(10 would); 8 x 141 GB holds bf16 at 57%.

Placement
---------
The units, in forward order, are `embedding`, `layer.0` .. `layer.47`, `head` (final norm +
lm_head) and `mtp.0` .. `mtp.2`. Each device gets a contiguous run of them (pipeline placement:
whole layers per device, the hidden state [b, t, 4096] crosses at each boundary), and the runs are
chosen to make the fullest device as empty as possible (`partition`, an exact DP):

    cuda:0  embedding, layers 0-6       38.2 GiB
    cuda:1  layers 7-12                 36.8 GiB      (six MoE layers, 6.1 GiB each)
    ...
    cuda:7  layers 43-47, head, mtp 0-2 32.9 GiB

The MTP blocks read the embedding and lm_head of the main model (shared, not copied): a runtime
sends them token embeddings from the embedding's device and runs their logits on the head's.

A loader that dequantizes FP8 into the compute dtype (as `checkpoint.load` does) holds the "bf16"
(or "fp32") plan; an "fp8" plan describes keeping FP8 weights with their scales on the device and
dequantizing per matmul, as serving engines and DeepSeek-V3's inference code do.

Tensor parallelism
------------------
Pipeline placement puts whole layers on devices; tensor + expert parallelism (`parallel.py`,
under `torchrun`) splits every layer over all ranks instead. `tensor_parallel_plan` counts what
one rank holds from the loader's own shard plan (`parallel.shard_ranges`): its query and kv heads,
1/W of the dense MLP, 1/W of the experts, the FP8 scale rows covering its slices, plus the
replicated embedding, LM head, norms and routers (2.7 GB that every rank keeps):

    minimimo plan --flash --tensor-parallel 8 --gpu-memory 80GiB
    fp8 (as released): 38.8 GiB per rank, 49% of 80 GiB: fits
    bf16:              74.5 GiB per rank, 93%: does not fit 8 x 80 GiB (fits 8 x 141 GB)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import dtypes
from .config import MiMoConfig
from .fp8 import ROW_BLOCK_DTYPE, ROW_BLOCK_SUFFIX, row_grid, scale_shape
from .hub import SCALE_SUFFIX, fp8_head_size, is_fp8_stored, tensor_specs
from .parallel import local_config, shard_ranges

GiB = 2**30
DEFAULT_BLOCK = (128, 128)  # the release's FP8 block when a config has no quantization_config
WEIGHT_DTYPES = ("fp8", "bf16", "fp32")
_MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(ValueError, MemoryError):
    """The model does not fit the devices: raised by `Plan.check()` before anything is allocated."""


# ---------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class StoredTensor:
    """One tensor as it sits in device memory (an FP8 weight's scale is a tensor of its own)."""

    unit: str  # placement unit: "embedding", "layer.7", "head", "mtp.0"
    part: str  # attention / experts / router / dense / norms / embedding / lm_head / eh_proj
    kind: str  # "fp8", "bf16", "fp32", "scale" (the float32 block scales of FP8 weights) or "grid" (below)
    shape: tuple[int, ...]
    nbytes: int


def unit_of(name: str) -> str:
    """Hub tensor name -> the placement unit that holds it."""
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("model.layers."):
        return f"layer.{name.split('.')[2]}"
    if name.startswith("model.mtp.layers."):
        return f"mtp.{name.split('.')[3]}"
    if name.startswith(("model.norm.", "lm_head.")):
        return "head"
    raise ValueError(f"tensor {name!r} belongs to no placement unit")


def part_of(name: str) -> str:
    """Hub tensor name -> which part of its unit it is (for the per-layer breakdown)."""
    base = name.removesuffix(SCALE_SUFFIX)
    if ".self_attn." in base:
        return "attention"
    if ".mlp.experts." in base:
        return "experts"
    if ".mlp.gate." in base:  # router weight and its correction bias (not gate_proj)
        return "router"
    if ".mlp." in base:
        return "dense"
    if base.startswith("model.embed_tokens."):
        return "embedding"
    if base.startswith("lm_head."):
        return "lm_head"
    if base.endswith("eh_proj.weight"):
        return "eh_proj"
    return "norms"  # input/post-attention/pre-mlp/final layernorms, enorm, hnorm, model.norm


def stored_tensors(config: MiMoConfig, weight_dtype: str = "fp8") -> dict[str, StoredTensor]:
    """Every tensor of the model (MTP blocks included) with its bytes for `weight_dtype`.

    "fp8": what the release stores: q/k/v, dense and expert linears as 1-byte FP8 plus a float32
        scale [scale_rows, ceil(in / b)] (`..._scale_inv`); the rest bf16, the router float32. In
        memory each FP8 module also keeps its row grid (`<param>_row_block`, 4 bytes per row, one
        for a whole stack of experts; kind "grid", not in the checkpoint).
    "bf16": every weight 2 bytes (FP8 dequantized), the router float32.
    "fp32": every weight 4 bytes.
    """
    dtype = _weight_dtype(weight_dtype)
    block = config.fp8_block or DEFAULT_BLOCK
    out: dict[str, StoredTensor] = {}
    for name, spec in tensor_specs(config).items():
        unit, part, numel = unit_of(name), part_of(name), math.prod(spec.shape)
        if dtype == "fp8" and is_fp8_stored(name, spec):
            scale = scale_shape(spec.shape, block, fp8_head_size(config, name, spec))
            out[name] = StoredTensor(unit, part, "fp8", spec.shape, numel)
            out[name + SCALE_SUFFIX] = StoredTensor(unit, part, "scale", scale, 4 * math.prod(scale))
            rows = spec.shape[0]
            out.setdefault(spec.param + ROW_BLOCK_SUFFIX,  # experts of a stack share one
                           StoredTensor(unit, part, "grid", (rows,), ROW_BLOCK_DTYPE.itemsize * rows))
        elif spec.float32 or dtype == "fp32":
            out[name] = StoredTensor(unit, part, "fp32", spec.shape, 4 * numel)
        else:
            out[name] = StoredTensor(unit, part, "bf16", spec.shape, 2 * numel)
    return out


def units(config: MiMoConfig, mtp: bool = True) -> list[str]:
    """The placement units in forward order: embedding, layer.0 .. layer.L-1, head, mtp.0 .."""
    blocks = config.num_mtp_layers if mtp else 0
    return (["embedding"] + [f"layer.{i}" for i in range(config.num_hidden_layers)] + ["head"]
            + [f"mtp.{k}" for k in range(blocks)])


def weight_bytes(config: MiMoConfig, weight_dtype: str = "fp8") -> dict[str, int]:
    """Bytes of every placement unit (FP8 scales included), in forward order."""
    totals = dict.fromkeys(units(config), 0)
    for t in stored_tensors(config, weight_dtype).values():
        totals[t.unit] += t.nbytes
    return totals


def weight_parts(config: MiMoConfig, weight_dtype: str = "fp8") -> dict[str, dict[str, int]]:
    """Every unit's bytes split into parts: layer.1 -> {attention, norms, router, experts},
    layer.0 -> {attention, norms, dense}, mtp.k -> {norms, eh_proj, attention, dense}, ..."""
    parts: dict[str, dict[str, int]] = {unit: {} for unit in units(config)}
    for t in stored_tensors(config, weight_dtype).values():
        parts[t.unit][t.part] = parts[t.unit].get(t.part, 0) + t.nbytes
    return parts


def storage_summary(config: MiMoConfig, weight_dtype: str = "fp8") -> dict[str, int]:
    """The release's weight memory in bytes: main-model bytes by kind ("fp8", "bf16", "fp32",
    "scale", "grid"), then "main", "mtp" and "total" (the table in this module's docstring)."""
    summary = {"fp8": 0, "bf16": 0, "fp32": 0, "scale": 0, "grid": 0, "main": 0, "mtp": 0}
    for t in stored_tensors(config, weight_dtype).values():
        if t.unit.startswith("mtp."):
            summary["mtp"] += t.nbytes
        else:
            summary[t.kind] += t.nbytes
            summary["main"] += t.nbytes
    summary["total"] = summary["main"] + summary["mtp"]
    return summary


# ---------------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_layer(config: MiMoConfig, context: int, batch: int = 1, kv_dtype: Any = "bf16",
                       reserve: int = 0) -> dict[str, int]:
    """Keys + values each layer and MTP block keeps for `batch` sequences of `context` tokens.

    Global layers keep every token; sliding layers and MTP blocks min(context, window + reserve)
    (`reserve` = the spare ring slots for rolling back speculative tokens). The main layers sum to
    `config.kv_cache_bytes(context, kv_dtype, "hybrid", batch, reserve)`.
    """
    out = {f"layer.{i}": config.layer_kv_bytes(i, context, kv_dtype, batch, reserve)
           for i in range(config.num_hidden_layers)}
    out.update({f"mtp.{k}": config.layer_kv_bytes(None, context, kv_dtype, batch, reserve)
                for k in range(config.num_mtp_layers)})
    return out


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Which device holds which unit, and how full every device is (nothing allocated)."""

    devices: list[str]
    capacity: list[int]  # bytes per device
    placement: dict[str, int]  # unit -> device index
    weights: dict[int, dict[str, int]]  # device index -> {unit: weight bytes}
    kv: dict[int, int]  # device index -> KV-cache bytes
    headroom: float = 0.1  # fraction of every device kept free for activations, CUDA context, fragmentation
    weight_dtype: str = "fp8"
    kv_dtype: str = "bf16"
    context: int = 4096
    batch: int = 1
    balanced: bool = True  # placement computed here (False: given by the caller)
    unit_weights: dict[str, int] = field(default_factory=dict, repr=False)
    unit_kv: dict[str, int] = field(default_factory=dict, repr=False)

    def usable(self, d: int) -> int:
        return int(self.capacity[d] * (1 - self.headroom))

    def per_device(self) -> list[dict[str, Any]]:
        rows = []
        for d, name in enumerate(self.devices):
            weights, kv = sum(self.weights[d].values()), self.kv[d]
            rows.append({"name": name, "units": describe_units(list(self.weights[d])), "weights": weights,
                         "kv": kv, "total": weights + kv, "capacity": self.capacity[d], "usable": self.usable(d),
                         "free": self.usable(d) - weights - kv, "fits": weights + kv <= self.usable(d)})
        return rows

    @property
    def fits(self) -> bool:
        return all(row["fits"] for row in self.per_device())

    def device_map(self) -> dict[str, str]:
        """Module prefix -> device name, for a loader ("model.layers.7" -> "cuda:1")."""
        prefixes = {"embedding": ["model.embed_tokens"], "head": ["model.norm", "lm_head"]}
        out = {}
        for unit, d in self.placement.items():
            kind, _, index = unit.partition(".")
            names = prefixes.get(unit) or [f"model.layers.{index}" if kind == "layer" else f"model.mtp.layers.{index}"]
            out.update({name: self.devices[d] for name in names})
        return out

    def table(self) -> str:
        """Per-device weights, KV, total and device memory in GiB, the share used, and the units held."""
        rows = self.per_device()
        total = {k: sum(r[k] for r in rows) for k in ("weights", "kv", "total", "capacity")}
        total.update(name="total", units=f"{len(self.placement)} units", fits=self.fits)
        name_w = max(len(r["name"]) for r in rows + [total])
        units_w = max(len(r["units"]) for r in rows + [total])

        def line(r) -> str:
            return (f"{r['name']:<{name_w}}  {r['units']:<{units_w}}  {_gib(r['weights']):>8}  {_gib(r['kv'], 2):>7}  "
                    f"{_gib(r['total']):>8}  {_gib(r['capacity']):>8}  {_pct(r['total'], r['capacity']):>5}  "
                    f"{'yes' if r['fits'] else 'NO'}")

        return "\n".join([
            f"memory plan: {self.weight_dtype} weights, {self.kv_dtype} KV cache for {self.batch} x "
            f"{self.context:,} tokens, {len(self.devices)} devices, {self.headroom:.0%} headroom"
            f"{'' if self.balanced else ', placement given'}",
            f"{'device':<{name_w}}  {'units':<{units_w}}  {'weights':>8}  {'KV':>7}  {'total':>8}  {'memory':>8}  "
            f"{'used':>5}  fits",
            *map(line, rows), line(total),
            f"(GiB; used = total / memory; a device fits when its total is at most {1 - self.headroom:.0%} of it)"])

    def check(self) -> "Plan":
        """Raise PlanError naming every device that overflows, by how much, and what would help."""
        over = [r for r in self.per_device() if not r["fits"]]
        if not over:
            return self
        lines = [f"the model does not fit: {len(over)} of {len(self.devices)} devices overflow"]
        for r in over:
            lines.append(f"  {r['name']} ({r['units']}): needs {_gib(r['total'])} GiB (weights {_gib(r['weights'])} "
                         f"+ KV {_gib(r['kv'], 2)}) but has {_gib(r['usable'])} GiB usable "
                         f"({_gib(r['capacity'])} GiB x {1 - self.headroom:.0%}): over by {_gib(-r['free'], 2)} GiB")
        lines.append("what would help: " + "; ".join(self._hints()))
        raise PlanError("\n".join(lines))

    def _hints(self) -> list[str]:
        loads = [self.unit_weights[u] + self.unit_kv.get(u, 0) for u in self.placement]
        hints = []
        if not self.balanced and partition(loads, [self.usable(d) for d in range(len(self.devices))]) is not None:
            hints.append("the balanced placement (placement=None) fits these devices")
        if len(set(self.capacity)) == 1:
            usable = self.usable(0)
            if max(loads) > usable:
                hints.append(f"one unit alone needs {_gib(max(loads))} GiB: use larger devices")
            elif (needed := _devices_needed(loads, usable)) > len(self.devices):
                hints.append(f"more devices: {needed} x {_gib(self.capacity[0])} GiB would fit")
        if self.weight_dtype != "fp8":
            hints.append(f"fp8 weights (as released) instead of {self.weight_dtype}")
        if any(r["kv"] >= -r["free"] for r in self.per_device() if not r["fits"]):  # dropping KV would help
            fp8_kv = "" if _kv_width(self.kv_dtype) == 1 else " or kv_dtype='fp8'"
            hints.append(f"a shorter context, a smaller batch{fp8_kv} (the KV cache takes "
                         f"{_gib(sum(self.kv.values()), 2)} GiB at {self.batch} x {self.context:,} tokens)")
        return hints


def plan(config_or_path: MiMoConfig | str | Path, *, devices: int | list, device_memory: int | str | list,
         weight_dtype: str = "fp8", kv_dtype: str = "bf16", context: int = 4096, batch: int = 1,
         placement: dict[str, int] | None = None, mtp: bool = True, reserve: int | None = None,
         headroom: float = 0.1) -> Plan:
    """Place the model's units on `devices` and count every device's bytes; allocates nothing.

    devices: N (-> "cuda:0" .. "cuda:N-1") or a list of names ("cpu", "cuda:1", ...).
    device_memory: bytes per device: an int, a string ("80GiB", "141GB", "512MiB") or one per device.
    placement: {unit: device index} to check a given layout; None balances the units contiguously
        (forward order) so that the fullest device is as empty as possible.
    mtp: place the MTP blocks (and their caches) too.
    reserve: spare ring slots per sliding cache for speculative rollback; default one per MTP block.
    headroom: fraction of each device left out of the budget (activations, CUDA context, fragmentation).
    """
    config = config_or_path if isinstance(config_or_path, MiMoConfig) else MiMoConfig.from_pretrained(config_or_path)
    names = _device_names(devices)
    capacity = _capacities(device_memory, len(names))
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    order = units(config, mtp)
    if reserve is None:
        reserve = config.num_mtp_layers if mtp else 0
    unit_weights = {u: b for u, b in weight_bytes(config, weight_dtype).items() if u in order}
    unit_kv = {u: b for u, b in kv_bytes_per_layer(config, context, batch, kv_dtype, reserve).items() if u in order}
    usable = [int(c * (1 - headroom)) for c in capacity]
    if placement is None:
        loads = [unit_weights[u] + unit_kv.get(u, 0) for u in order]
        assignment = partition(loads, usable, must_fit=False)
        placement = dict(zip(order, assignment))
        balanced = True
    else:
        placement = _validate_placement(placement, order, len(names))
        balanced = False
    weights = {d: {} for d in range(len(names))}
    kv = dict.fromkeys(range(len(names)), 0)
    for unit, d in placement.items():
        weights[d][unit] = unit_weights[unit]
        kv[d] += unit_kv.get(unit, 0)
    return Plan(names, capacity, placement, weights, kv, headroom, _weight_dtype(weight_dtype),
                str(kv_dtype).removeprefix("torch."), context, batch, balanced, unit_weights, unit_kv)


# ---------------------------------------------------------------------------------------------- tensor parallel
class TensorParallelPlan(Plan):
    """The per-rank plan of tensor + expert parallelism: every rank holds a slice of every unit
    (its query heads and kv heads, its share of the dense MLP, its 1/W of the experts) plus the
    replicated embedding, LM head, norms and routers. `weights[rank]` maps each unit to that rank's
    bytes of it; there is no placement to choose, only whether the fullest rank fits."""

    def device_map(self) -> dict[str, str]:
        raise ValueError("under tensor parallelism every rank holds a slice of every unit: there is no device map")

    def per_device(self) -> list[dict[str, Any]]:
        rows = super().per_device()
        for row in rows:
            row["units"] = f"a slice of all {len(self.placement)} units"
        return rows

    def table(self) -> str:
        lines = super().table().splitlines()
        lines[0] = lines[0].replace("memory plan:", f"memory plan, tensor parallel over {len(self.devices)} ranks:")
        return "\n".join(lines)

    def _hints(self) -> list[str]:
        hints = []
        if self.weight_dtype != "fp8":
            hints.append(f"fp8 weights (as released) instead of {self.weight_dtype}")
        if len(set(self.capacity)) == 1:
            hints.append(f"more ranks or larger devices: the fullest rank needs "
                         f"{_gib(max(r['total'] for r in self.per_device()))} GiB")
        if any(r["kv"] >= -r["free"] for r in self.per_device() if not r["fits"]):
            hints.append(f"a shorter context or a smaller batch (KV per rank: {_gib(max(self.kv.values()), 2)} GiB)")
        return hints


def rank_weight_bytes(config: MiMoConfig, rank: int, world: int, weight_dtype: str = "fp8") -> dict[str, int]:
    """Bytes of every unit that rank `rank` of `world` holds: the slices `parallel.shard_ranges`
    reads (the loader's own shard plan), an FP8 slice with the scale rows and columns covering it
    (a block cut by a rank boundary is read by both ranks) and its slice of the row grid.
    At world 1 this is `weight_bytes`."""
    dtype = _weight_dtype(weight_dtype)
    block = config.fp8_block or DEFAULT_BLOCK
    ranges = shard_ranges(config, rank, world)
    totals, grids = dict.fromkeys(units(config), 0), set()
    for name, spec in tensor_specs(config).items():
        where = ranges[name]
        if where == "skip":
            continue
        (r0, r1), (c0, c1) = [w or (0, n) for w, n in zip(where, (*spec.shape, 1))]
        numel, unit = (r1 - r0) * (c1 - c0), unit_of(name)
        if dtype == "fp8" and is_fp8_stored(name, spec):
            grid = row_grid(spec.shape[0], block[0], fp8_head_size(config, name, spec))[r0:r1]
            scale_rows = int(grid.max() - grid.min()) + 1
            scale_cols = -(-c1 // block[1]) - c0 // block[1]
            totals[unit] += numel + 4 * scale_rows * scale_cols
            if spec.param not in grids:  # one grid per module (a stack of experts shares it)
                grids.add(spec.param)
                totals[unit] += ROW_BLOCK_DTYPE.itemsize * (r1 - r0)
        else:
            totals[unit] += numel * (4 if spec.float32 or dtype == "fp32" else 2)
    return totals


def tensor_parallel_plan(config_or_path: MiMoConfig | str | Path, *, world: int, device_memory: int | str,
                         weight_dtype: str = "fp8", kv_dtype: str = "bf16", context: int = 4096, batch: int = 1,
                         reserve: int | None = None, headroom: float = 0.1) -> TensorParallelPlan:
    """What each of `world` tensor-parallel ranks holds (weights and its heads' KV cache) and
    whether the fullest fits `device_memory`; allocates nothing. `load(..., tensor_parallel=True)`
    checks it before building the model."""
    config = config_or_path if isinstance(config_or_path, MiMoConfig) else MiMoConfig.from_pretrained(config_or_path)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world (the number of tensor-parallel ranks) must be an int >= 1, got {world!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    local = local_config(config, world)  # raises, naming the sizes, when the world cannot split the model
    reserve = config.num_mtp_layers if reserve is None else reserve
    unit_kv = kv_bytes_per_layer(local, context, batch, kv_dtype, reserve)  # this rank's kv heads
    weights = {r: rank_weight_bytes(config, r, world, weight_dtype) for r in range(world)}
    kv = dict.fromkeys(range(world), sum(unit_kv.values()))
    order = units(config)
    return TensorParallelPlan([f"rank {r}" for r in range(world)], [parse_memory(device_memory)] * world,
                              dict.fromkeys(order, 0), weights, kv, headroom, _weight_dtype(weight_dtype),
                              str(kv_dtype).removeprefix("torch."), context, batch, True,
                              weight_bytes(config, weight_dtype), unit_kv)


def partition(loads: list[int], usable: list[int], must_fit: bool = True) -> list[int] | None:
    """Contiguous split of `loads` (in order) over devices (in order, each >= 0 units) minimising the
    largest load / usable of any device; returns the device index of every load.

    Dynamic programming, exact (fractions): best[d][j] = the smallest worst fill when the first j
    loads sit on the first d devices = min over i of max(best[d-1][i], fill of device d-1 with loads i..j-1).
    With must_fit, None when even the best split overflows a device.
    """
    n, m = len(loads), len(usable)
    prefix = [0]
    for x in loads:
        prefix.append(prefix[-1] + x)
    inf = math.inf

    def fill(d: int, i: int, j: int):
        total = prefix[j] - prefix[i]
        if total == 0:
            return Fraction(0)
        return Fraction(total, usable[d]) if usable[d] > 0 else inf

    best = [[inf] * (n + 1) for _ in range(m + 1)]
    cut = [[0] * (n + 1) for _ in range(m + 1)]
    best[0][0] = Fraction(0)
    for d in range(1, m + 1):
        for j in range(n + 1):
            for i in range(j + 1):
                worst = max(best[d - 1][i], fill(d - 1, i, j))
                if worst < best[d][j]:
                    best[d][j], cut[d][j] = worst, i
    if best[m][n] == inf or (must_fit and best[m][n] > 1):
        return None
    assignment, j = [0] * n, n
    for d in range(m, 0, -1):
        i = cut[d][j]
        assignment[i:j] = [d - 1] * (j - i)
        j = i
    return assignment


# ---------------------------------------------------------------------------------------------- helpers
def parse_memory(value: int | str) -> int:
    """80 * 2**30 from "80GiB", 141 * 10**9 from "141GB"; an int is bytes already."""
    if isinstance(value, bool):
        raise ValueError(f"device memory {value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"device memory must be >= 0 bytes, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(value))
    unit = match and (match.group(2) or "B").lower()
    if not match or unit not in _MEMORY_UNITS:
        raise ValueError(f"device memory {value!r}: expected a number and a unit such as '80GiB' (2**30) or "
                         f"'141GB' (10**9); units {sorted(_MEMORY_UNITS)}")
    return int(Fraction(match.group(1)) * _MEMORY_UNITS[unit])


def describe_units(names: list[str]) -> str:
    """['embedding', 'layer.0', 'layer.1', 'layer.2', 'head'] -> 'embedding, layers 0-2, head'."""
    parts: list[str] = []
    runs: list[list[Any]] = []  # [kind, first, last]
    for name in names:
        kind, _, index = name.partition(".")
        if index and runs and runs[-1][0] == kind and runs[-1][2] == int(index) - 1:
            runs[-1][2] = int(index)
        else:
            runs.append([kind, int(index) if index else None, int(index) if index else None])
    for kind, first, last in runs:
        if first is None:
            parts.append(kind)
        elif first == last:
            parts.append(f"{kind} {first}")
        else:
            parts.append(f"{kind}s {first}-{last}" if kind == "layer" else f"{kind} {first}-{last}")
    return ", ".join(parts) or "-"


def _devices_needed(loads: list[int], usable: int) -> int:
    """Fewest equal devices holding `loads` contiguously: fill each device until the next unit spills
    (greedy is optimal for contiguous packing into equal bins). Every load must be <= usable."""
    n, current = 1, 0
    for x in loads:
        if current + x > usable:
            n, current = n + 1, 0
        current += x
    return n


def _weight_dtype(weight_dtype: Any) -> str:
    """The planner's short name ("fp8", "bf16", "fp16", "fp32") from any spelling `dtypes` knows."""
    return dtypes.short(weight_dtype, "weight_dtype")


def _kv_width(kv_dtype: Any) -> int:
    return dtypes.width(kv_dtype, "kv_dtype")


def _device_names(devices: int | list) -> list[str]:
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        return [f"cuda:{i}" for i in range(devices)]
    names = [str(d) for d in devices]
    if not names:
        raise ValueError("devices is an empty list")
    return names


def _capacities(device_memory: int | str | list, n: int) -> list[int]:
    if isinstance(device_memory, (list, tuple)):
        if len(device_memory) != n:
            raise ValueError(f"device_memory has {len(device_memory)} entries for {n} devices")
        return [parse_memory(m) for m in device_memory]
    return [parse_memory(device_memory)] * n


def _validate_placement(placement: dict[str, int], order: list[str], n: int) -> dict[str, int]:
    for unit in placement:
        if unit not in order:
            raise ValueError(f"placement names unit {unit!r}, which this model does not have "
                             f"(units: {describe_units(order)})")
    for unit in order:
        if unit not in placement:
            raise ValueError(f"placement does not assign unit {unit!r} to a device")
        d = placement[unit]
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < n:
            raise ValueError(f"placement puts unit {unit!r} on device {d!r}; expected an index in 0..{n - 1}")
    return {unit: placement[unit] for unit in order}


def _gib(n: int, digits: int = 1) -> str:
    return f"{n / GiB:,.{digits}f}"


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


__all__ = ["Plan", "PlanError", "StoredTensor", "TensorParallelPlan", "plan", "tensor_parallel_plan",
           "rank_weight_bytes", "partition", "weight_bytes", "weight_parts", "stored_tensors",
           "storage_summary", "kv_bytes_per_layer", "units", "unit_of", "part_of", "parse_memory", "describe_units"]
