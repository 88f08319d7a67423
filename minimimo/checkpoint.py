"""Strict loading of a checkpoint in the official hub layout: one loader, in named steps.

    model = minimimo.load("path/to/MiMo-V2-Flash", device="cuda:0")           # config's bf16 on CUDA
    model = minimimo.load(path)                                                # float32 on a CPU
    model = minimimo.load(path, weight_dtype="fp8", devices=["cuda:0", "cuda:1"])
    model = minimimo.load(path, tensor_parallel=True)                          # this rank's shard
    model = minimimo.load("XiaomiMiMo/MiMo-V2-Flash")                          # a hub id (huggingface_hub)

`load` runs these steps, each a function below:

0. **resolve** (`resolve`): a folder is used as it is; a hub id `org/name` is downloaded once by
   `huggingface_hub` into its cache (then read from there; offline, from the cache only).
1. **open** (`open_checkpoint`): `config.json` -> MiMoConfig (a key that shapes the computation
   must be present); `model.safetensors.index.json` -> where every tensor lives (a folder with a
   single `model.safetensors` works too); every shard's safetensors header (`shards.py`). Files
   outside the folder, truncated shards and index/file disagreements are refused here.
   Under tensor parallelism every rank then compares a fingerprint of what it read with the
   others (`parallel.same_on_every_rank`).
2. **check** (`check_against_config`): the config against the headers: no work the index cannot
   back (a million experts, a 10^12-token vocabulary), every tensor present, expected, and of
   the shape the config implies. Nothing has been built or allocated yet.
3. **build** on the *meta* device (no memory): the whole model, or this rank's shard
   (`parallel.sharded_model`); with `weight_dtype="fp8"` the FP8 modules are swapped in.
4. **place**: every parameter's device: one device, a checked memory plan over several
   (`plan.py`, refused before anything is allocated), or the rank's device.
5. **allocate** each parameter empty on its device; then **fill** it tensor by tensor (`_fill`),
   reading the whole tensor or the rank's rows/columns (the shard plan), so the peak memory is
   the model plus one tensor. FP8 tensors are dequantized into the compute dtype block by block,
   or kept in FP8. Every value is checked finite (a NaN, an Inf, the FP8 NaN byte) and every
   parameter filled, or a `CheckpointError` names the tensor and the file.
6. **report**: the model carries `load_report` (files, tensors, FP8 grids, bytes read, rank)
   and `plan` (the memory plan when placed over devices).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm  # a widget in a notebook (ipywidgets), text in a terminal

from . import dtypes, parallel
from .config import MiMoConfig
from .fp8 import FP8, ROW_BLOCK_SUFFIX, apply_scales, choose_grid
from .hub import INDEX, SCALE_SUFFIX, TensorSpec, tensor_specs
from .model import MiMoForCausalLM
from .shards import CheckpointError, ShardReader, checkpoint_file, fingerprint, read_header

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what a non-FP8 tensor may be stored as


@dataclass
class LoadReport:
    directory: Path
    files: int = 0
    tensors: int = 0
    fp8_tensors: int = 0
    grids: dict[str, int] = field(default_factory=dict)  # FP8 row grid kind -> count
    mtp_blocks: int = 0  # MTP blocks loaded (0: drafting unavailable)
    bytes_read: int = 0  # bytes that left the disk
    rank: int = 0  # under tensor parallelism: this rank of `world`
    world: int = 1


@dataclass
class Checkpoint:
    """A checkpoint folder, opened and checked but not loaded: config, index, shard headers."""

    directory: Path
    config: MiMoConfig
    weight_map: dict[str, str]  # hub tensor name -> shard file
    reader: ShardReader  # holds every shard's header


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, weight_dtype: str | None = None,
         device: str | torch.device | None = None, devices: list | None = None,
         placement: dict[str, int] | None = None, device_memory=None, context: int = 4096,
         tensor_parallel: bool = False, progress: bool = True) -> MiMoForCausalLM:
    """Load a hub-layout checkpoint directory into a MiMoForCausalLM in eval mode.

    dtype: the compute dtype: of the activations and of every weight not kept in FP8 (FP8 weights
        are dequantized into it; the router stays float32). Default: on CUDA the config's
        `torch_dtype` (bfloat16 on the hub); on a CPU float32, bfloat16 only on request. A CPU
        has no fast bfloat16 matmul, and bfloat16 rounds differently for different batch
        shapes: MTP's (k+1)-token verify pass then drifts from one-token greedy decoding.
    weight_dtype: "fp8" keeps the checkpoint's FP8 tensors in FP8 on their device (`FP8Linear`,
        `FP8Experts`: dequantized strip by strip inside the matmul), the other tensors in `dtype`
        (default bfloat16 here: what the release stores beside its FP8 tensors). None dequantizes.
    device: the one device (default "cpu"; under tensor parallelism the rank's GPU, else "cpu").
    devices: place the model over several devices (pipeline style, one process): embedding,
        layers, head and MTP blocks go to devices by balanced bytes (`plan.py`), or by an explicit
        `placement` {unit: device index}; activations move between devices in the forward. The
        plan is checked against `device_memory` (default: each device's memory) for a `context`
        of tokens before anything is allocated.
    tensor_parallel: under an initialised process group, load this rank's shard (`parallel.py`);
        with weight_dtype="fp8" the rank keeps its slice of every FP8 tensor in FP8.
    """
    directory = resolve(path)  # 0. a folder, or a hub id fetched into the huggingface_hub cache
    if tensor_parallel and devices is not None:
        raise ValueError("tensor_parallel=True puts each rank on its own device; devices=[...] is for one process")
    if weight_dtype not in (None, "fp8"):
        raise ValueError(f"weight_dtype {weight_dtype!r}: use 'fp8' to keep the FP8 tensors in FP8, or None to "
                         f"dequantize them into dtype (the compute dtype: pass dtype={weight_dtype!r} for that)")
    keep_fp8 = weight_dtype == "fp8"
    # 1-2. open and check (under tensor parallelism: on every rank, then compare what they read)
    if tensor_parallel:
        def open_and_check():
            checkpoint = open_checkpoint(directory)
            return (checkpoint, check_against_config(checkpoint)), fingerprint(
                checkpoint_file(directory, "config.json", directory), checkpoint.weight_map, checkpoint.reader)

        checkpoint, specs = parallel.same_on_every_rank(open_and_check, str(directory))
        shard = parallel.shard_plan(checkpoint.config)
        device = device or parallel.rank_device()
    else:
        checkpoint = open_checkpoint(directory)
        specs, shard = check_against_config(checkpoint), None
    config = checkpoint.config
    targets = [torch.device(d) for d in (devices or [device or "cpu"])]
    dtype = compute_dtype(dtype, config, targets, keep_fp8)
    fp8_names = {n for n in specs if keep_fp8 and n + SCALE_SUFFIX in checkpoint.weight_map}
    # 3. build on meta
    with torch.device("meta"):
        model = parallel.sharded_model(shard) if shard else MiMoForCausalLM(config)
    if fp8_names:
        _use_fp8_storage(model, specs, fp8_names, checkpoint.weight_map, directory, config)
    fp8_slices = {}  # hub name -> parallel.FP8Slice: the FP8 weights a rank holds only part of
    if fp8_names and shard:
        parallel.sum_fp8_over_ranks(model)
        fp8_slices = parallel.slice_fp8_storage(model, checkpoint.reader, specs, fp8_names, shard)
    # 4-5. place, allocate, fill
    device_of, memory_plan = _placement(config, devices, placement, device_memory, keep_fp8, dtype, context,
                                        device or "cpu")
    if devices is None:  # (a placement over devices was checked by its plan)
        _check_fits(model, specs, dtype, torch.device(device or "cpu"))
    _allocate(model, specs, dtype, device_of)
    report = _fill(model, checkpoint, specs, dtype, fp8_names, fp8_slices, device_of, shard, progress)
    # 6. report
    model.load_report = report
    model.plan = memory_plan  # the checked memory plan when placed over devices, else None
    return model.eval().requires_grad_(False)


def resolve(path: str | Path) -> Path:
    """Step 0: the checkpoint folder of `path`: an existing folder, or a hub id "org/name" that
    `huggingface_hub.snapshot_download` fetches once into its cache (the config, index, shards and
    tokenizer files only) and finds there afterwards, also offline (`HF_HUB_OFFLINE=1`, or no network)."""
    folder = Path(path)
    text = str(path)
    if folder.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text:
        return folder  # a local path (a missing one fails in open_checkpoint, by name)
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise FileNotFoundError(f"{text!r} is not a folder; to read it as a hub id install huggingface_hub "
                                "(pip install huggingface_hub)") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
    try:
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=patterns,
                                                      local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as err:  # no network and no cached copy, an unknown repository, no access
        where = "in the local cache (offline)" if constants.HF_HUB_OFFLINE else "on the hub or in the local cache"
        raise FileNotFoundError(f"{text!r} is neither a folder nor a checkpoint found {where}: "
                                f"{type(err).__name__}: {err}") from None


def compute_dtype(dtype, config: MiMoConfig, devices: list[torch.device], keep_fp8: bool = False) -> torch.dtype:
    """`dtype` when given; else bfloat16 beside kept FP8, the config's dtype on CUDA, float32 on a CPU."""
    if dtype is not None:
        return dtypes.compute_dtype(dtype)
    if keep_fp8:
        return torch.bfloat16
    if any(d.type == "cuda" for d in devices) and config.torch_dtype:
        return dtypes.compute_dtype(config.torch_dtype, "config.json torch_dtype")
    return torch.float32


def open_checkpoint(directory: Path) -> Checkpoint:
    """Step 1: config, index and every shard header, each file checked to lie in the folder."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint folder")
    checkpoint_file(directory, "config.json", directory)
    config = MiMoConfig.from_pretrained(directory)
    weight_map = read_index(directory)
    reader = ShardReader(directory, weight_map)
    for file in sorted(set(weight_map.values())):
        reader.handle(file)  # header: sizes checked, tensors checked against the index
    return Checkpoint(directory, config, weight_map, reader)


def read_index(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single-file layout); every file
    named must exist inside the folder."""
    index = directory / INDEX
    if index.is_file():
        checkpoint_file(directory, INDEX, directory)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("file names must be strings")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
    elif (directory / "model.safetensors").is_file():
        path = checkpoint_file(directory, "model.safetensors", directory)
        weight_map = {name: "model.safetensors" for name in read_header(path)}
    else:
        raise CheckpointError(f"{directory}: neither {INDEX} nor model.safetensors found")
    first_tensor = {}  # shard file -> the first tensor the index puts in it (to name in an error)
    for name, file in weight_map.items():
        first_tensor.setdefault(file, name)
    for file, name in first_tensor.items():
        if not checkpoint_file(directory, file, index).is_file():
            raise CheckpointError(f"{index}: tensor {name!r} is in shard {file!r}, which does not exist")
    return weight_map


def check_against_config(checkpoint: Checkpoint) -> dict[str, TensorSpec]:
    """Step 2: hub tensor name -> TensorSpec, once the config and the headers agree; before this
    nothing is built, so a config that asks for too much fails here, fast, by name."""
    config, weight_map, directory = checkpoint.config, checkpoint.weight_map, checkpoint.directory
    # Listing the tensors costs time in proportion to the experts: bound it by the index first.
    expert_matrices = 3 * config.n_routed_experts * sum(config.moe_layer_freq)
    if expert_matrices > len(weight_map):
        raise CheckpointError(f"{directory / 'config.json'}: n_routed_experts = {config.n_routed_experts:,} over "
                              f"{sum(config.moe_layer_freq)} MoE layers means {expert_matrices:,} expert matrices, "
                              f"but the index lists {len(weight_map):,} tensors in all")
    specs = tensor_specs(config)
    _check_names(weight_map, specs, directory)
    for name, spec in specs.items():
        shape = checkpoint.reader.shape(name)
        if shape != spec.shape:
            raise CheckpointError(f"{checkpoint.reader.where(name)}: tensor {name!r} has shape {list(shape)}, "
                                  f"the config implies {list(spec.shape)}")
    return specs


def _fill(model, checkpoint: Checkpoint, specs, dtype, fp8_names, fp8_slices, device_of, shard, progress) -> LoadReport:
    """Step 5: copy every tensor this process holds (all of them, or the shard plan's rows and
    columns) into the allocated model, checking each; returns the load report."""
    config, reader, directory = checkpoint.config, checkpoint.reader, checkpoint.directory
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    report = LoadReport(directory, rank=shard.rank if shard else 0, world=shard.world if shard else 1)
    wanted = {n: (shard.ranges[n] if shard else (None, None)) for n in specs}  # (rows, cols) or "skip"
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in specs:
        if wanted[name] != "skip":
            by_file[checkpoint.weight_map[name]].append(name)
    filled: set[tuple[str, int | None]] = set()
    for file in tqdm(sorted(by_file), desc="loading shards", unit="shard", disable=not progress):
        for name in sorted(by_file[file]):
            spec, (rows, cols) = specs[name], wanted[name]
            row = shard.expert_row(spec) if shard else spec.expert
            reader.device = str(device_of(spec.param))  # straight onto the tensor's device
            with torch.no_grad():
                if name in fp8_slices:
                    fp8, scale, row_block = read_fp8_slice(reader, name, fp8_slices[name], report)
                    _check_finite(reader, name, fp8, scale)
                    targets[spec.param].copy_(fp8)
                    targets[spec.param + SCALE_SUFFIX].copy_(scale)
                    targets[spec.param + ROW_BLOCK_SUFFIX].copy_(row_block)
                elif name in fp8_names:
                    fp8, scale, row_block = read_fp8(reader, name, spec, config, report)
                    _check_finite(reader, name, fp8, scale)
                    _slot(targets[spec.param], row).copy_(fp8)
                    _slot(targets[spec.param + SCALE_SUFFIX], row).copy_(scale)
                    targets[spec.param + ROW_BLOCK_SUFFIX].copy_(row_block)  # experts of a stack share it
                else:
                    tensor = read_weight(reader, name, spec, config, dtype, report, rows=rows, cols=cols)
                    _check_finite(reader, name, tensor)
                    target = _slot(targets[spec.param], row)
                    if tensor.shape != target.shape:
                        raise CheckpointError(f"{reader.where(name)}: slice of {name!r} has shape "
                                              f"{list(tensor.shape)}, rank {report.rank} expects {list(target.shape)}")
                    target.copy_(tensor)
            filled.add((spec.param, spec.expert))
            report.tensors += 1
        reader.release(file)
        report.files += 1
    expected = {(s.param, s.expert) for n, s in specs.items() if wanted[n] != "skip"}
    if filled != expected:  # cannot happen after the checks; kept so no parameter is ever left unset
        raise CheckpointError(f"{directory}: parameters left unfilled: {sorted(expected - filled)[:5]}")
    report.mtp_blocks = config.num_mtp_layers
    report.bytes_read = reader.bytes_read
    return report


def read_fp8_slice(reader: ShardReader, name: str, cut: parallel.FP8Slice, report: LoadReport):
    """A rank's block of an FP8 weight, the scale block covering it and its row grid (`parallel.fp8_slice`)."""
    fp8 = reader.read(name, cut.rows, cut.cols)
    scale = reader.read(name + SCALE_SUFFIX, cut.scale_rows, cut.scale_cols)
    if fp8.dtype != FP8 or scale.dtype != torch.float32:
        raise CheckpointError(f"{reader.where(name)}: tensor {name!r} must be float8_e4m3fn with a float32 scale, "
                              f"got {fp8.dtype} / {scale.dtype}")
    report.fp8_tensors += 1
    report.grids[cut.kind] = report.grids.get(cut.kind, 0) + 1
    return fp8, scale, cut.row_block


def _check_finite(reader: ShardReader, name: str, tensor: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """A NaN or an Inf in a weight makes every logit NaN (the model then emits token 0 forever):
    refuse it here, naming the tensor, the file and the first bad element."""
    if tensor.dtype == FP8:  # e4m3fn has no Inf; its NaN is the byte 0x7F or 0xFF (S.1111.111)
        bad = (tensor.view(torch.uint8) & 0x7F) == 0x7F
    else:
        bad = ~torch.isfinite(tensor)
    if bad.any():
        where = [int(i) for i in bad.nonzero()[0]]
        scale_name = name + SCALE_SUFFIX
        if tensor.dtype == FP8:
            why = "holds the FP8 NaN byte (0x7F/0xFF)"
        elif scale_name in reader.weight_map and bool((~torch.isfinite(reader.read(scale_name))).any()):
            raise CheckpointError(f"{reader.where(scale_name)}: tensor {scale_name!r} holds NaN or Inf")
        elif scale_name in reader.weight_map:
            raw = reader.read(name)
            fp8_nan = bool(((raw.view(torch.uint8) & 0x7F) == 0x7F).any()) if raw.dtype == FP8 else False
            why = "holds the FP8 NaN byte (0x7F/0xFF)" if fp8_nan else f"overflows when dequantized to {tensor.dtype}"
        else:
            why = "holds NaN or Inf"
        raise CheckpointError(f"{reader.where(name)}: tensor {name!r} {why} (first at index {where})")
    if scale is not None and not bool(torch.isfinite(scale).all()):
        raise CheckpointError(f"{reader.where(name + SCALE_SUFFIX)}: tensor {name + SCALE_SUFFIX!r} holds NaN or Inf")


def _slot(tensor: torch.Tensor, expert: int | None) -> torch.Tensor:
    return tensor if expert is None else tensor[expert]


def _placement(config, devices, placement, device_memory, keep_fp8, dtype, context, device):
    """Step 4: param name -> device: one device, or the units of a checked plan over several."""
    if devices is None:
        if placement is not None:
            raise ValueError("placement needs devices=[...]")
        return (lambda name: torch.device(device)), None
    from .plan import plan, unit_of

    if keep_fp8 and dtype != torch.bfloat16:
        raise ValueError("the memory plan of weight_dtype='fp8' keeps the other tensors in bfloat16: "
                         f"leave dtype unset or pass bfloat16 (got {dtype})")
    if device_memory is None:
        device_memory = [torch.cuda.get_device_properties(torch.device(d)).total_memory
                         if torch.device(d).type == "cuda" else 1 << 50 for d in devices]
    weight_dtype = "fp8" if keep_fp8 else dtypes.short(dtype)
    the_plan = plan(config, devices=list(devices), device_memory=device_memory, weight_dtype=weight_dtype,
                    context=context, placement=placement).check()  # refuses before any allocation
    names = [torch.device(d) for d in devices]
    return (lambda name: names[the_plan.placement[unit_of(name)]]), the_plan


def _use_fp8_storage(model, specs, fp8_names, weight_map, directory, config) -> None:
    """Swap the modules whose checkpoint tensors are FP8 for `FP8Linear` / `FP8Experts` (on meta);
    the fill loop then copies each FP8 weight, its scale and its row grid (`read_fp8`) into them."""
    from .fp8 import FP8Experts, FP8Linear

    if config.fp8_block is None:
        raise CheckpointError(f"{directory}: FP8 tensors with a {SCALE_SUFFIX} but config.json has no "
                              "quantization_config.weight_block_size")
    reader = ShardReader(directory, weight_map, "cpu")  # shapes only
    expert_scales: dict[str, dict[str, tuple]] = defaultdict(dict)  # experts module -> projection -> scale shape
    for name in sorted(fp8_names):
        spec = specs[name]
        module_name, _, attr = spec.param.rpartition(".")
        if spec.expert is not None:
            expert_scales[module_name].setdefault(attr, reader.shape(name + SCALE_SUFFIX))
            continue
        module = model.get_submodule(module_name)
        with torch.device("meta"):
            linear = FP8Linear(module.in_features, module.out_features, reader.shape(name + SCALE_SUFFIX),
                               config.fp8_block)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    for module_name, scale_shapes in expert_scales.items():
        experts = model.get_submodule(module_name)
        num_experts, intermediate, hidden = experts.gate_proj.shape
        for e in range(num_experts):  # FP8Experts keeps every matrix of the stack in FP8
            for proj in experts.PROJECTIONS:
                hub_name = f"{module_name}.{e}.{proj}.weight"
                if hub_name not in fp8_names:
                    raise CheckpointError(f"{reader.where(hub_name)}: tensor {hub_name!r} has no {SCALE_SUFFIX}, "
                                          f"but other experts of {module_name} are FP8: weight_dtype='fp8' keeps "
                                          "a stack of experts in FP8 only when all of its matrices are")
        with torch.device("meta"):
            fp8_experts = FP8Experts(num_experts, hidden, intermediate, scale_shapes, config.fp8_block)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, fp8_experts)


def read_weight(reader: ShardReader, name: str, spec: TensorSpec, config: MiMoConfig, dtype: torch.dtype,
                report: LoadReport, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
    """One parameter (or a row/column slice of it) in `dtype`, FP8 dequantized, every check made."""
    where = reader.where(name)
    shape = reader.shape(name)
    if shape != spec.shape:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {list(shape)}, the config implies {list(spec.shape)}")
    scale_name = name + SCALE_SUFFIX
    if scale_name not in reader.weight_map:
        tensor = reader.read(name, rows, cols)
        if tensor.dtype == FP8:
            raise CheckpointError(f"{where}: tensor {name!r} is float8_e4m3fn but has no {scale_name!r}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; "
                                  "expected float32, bfloat16, float16 or FP8 with a scale")
        return tensor.float() if spec.float32 else tensor.to(dtype)
    if config.fp8_block is None:
        raise CheckpointError(f"{where}: tensor {name!r} has a {SCALE_SUFFIX} but config.json has no "
                              "quantization_config.weight_block_size")
    block_c = config.fp8_block[1]
    r0, r1 = rows if rows is not None else (0, shape[0])
    c0, c1 = cols if cols is not None else (0, shape[1])
    whole = []  # the full weight, read only when the amax test must break a tie between grids

    def read_whole():
        whole.append(reader.read(name))
        return whole[0]

    try:
        kind, row_block = choose_grid(shape, reader.shape(scale_name), config.fp8_block, head_size=spec.head_size,
                                      name=name, fp8=read_whole)
    except ValueError as err:
        raise CheckpointError(f"{reader.where(scale_name)}: {err}") from None
    tensor = whole[0][r0:r1, c0:c1] if whole else reader.read(name, rows, cols)
    if tensor.dtype != FP8:
        raise CheckpointError(f"{where}: tensor {name!r} has a {SCALE_SUFFIX} but is stored as "
                              f"{tensor.dtype}, not float8_e4m3fn")
    row_block = row_block[r0:r1]
    s_r0, s_r1 = int(row_block.min()), int(row_block.max()) + 1  # the scale rows covering our rows
    s_c0, s_c1 = c0 // block_c, (c1 - 1) // block_c + 1
    scale = reader.read(scale_name, (s_r0, s_r1), (s_c0, s_c1))
    if scale.dtype != torch.float32:
        raise CheckpointError(f"{reader.where(scale_name)}: tensor {scale_name!r} must be float32, got {scale.dtype}")
    out = apply_scales(tensor, scale, row_block - s_r0, block_c, dtype, first_col=c0)
    report.fp8_tensors += 1
    report.grids[kind] = report.grids.get(kind, 0) + 1
    return out.float() if spec.float32 else out


def read_fp8(reader: ShardReader, name: str, spec: TensorSpec, config: MiMoConfig, report: LoadReport):
    """The raw FP8 weight, its float32 scale and its row grid `row_block` [rows] (row -> scale row,
    decided by `fp8.choose_grid`), checked: shape, dtypes, a grid that explains the scale."""
    where = reader.where(name)
    shape = reader.shape(name)
    if shape != spec.shape:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {list(shape)}, the config implies {list(spec.shape)}")
    fp8, scale = reader.read(name), reader.read(name + SCALE_SUFFIX)
    if fp8.dtype != FP8 or scale.dtype != torch.float32:
        raise CheckpointError(f"{where}: tensor {name!r} must be float8_e4m3fn with a float32 scale, got "
                              f"{fp8.dtype} / {scale.dtype}")
    try:
        kind, row_block = choose_grid(fp8.shape, scale.shape, config.fp8_block, head_size=spec.head_size, name=name,
                                      fp8=fp8)
    except ValueError as err:
        raise CheckpointError(f"{reader.where(name + SCALE_SUFFIX)}: {err}") from None
    report.fp8_tensors += 1
    report.grids[kind] = report.grids.get(kind, 0) + 1
    return fp8, scale, row_block


def _check_names(weight_map: dict[str, str], specs: dict[str, TensorSpec], directory: Path) -> None:
    for name in specs:
        if name not in weight_map:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing from the checkpoint "
                                  f"(not in {INDEX})")
    for name, file in weight_map.items():
        if name in specs:
            continue
        base = name.removesuffix(SCALE_SUFFIX)
        if name.endswith(SCALE_SUFFIX) and base in specs and specs[base].quantizable:
            continue
        raise CheckpointError(f"{directory / file}: unexpected tensor {name!r} (the config has no such parameter)")


def _check_fits(model: MiMoForCausalLM, specs: dict[str, TensorSpec], dtype: torch.dtype, device: torch.device):
    """Before allocating on one CUDA device: the bytes the (meta) model will hold there, FP8
    buffers, scales and the float32 router included, against the device's free memory. Under
    tensor parallelism this is the rank's share. (A CPU is not checked: the OS has swap.)"""
    if device.type != "cuda":
        return
    float32 = {s.param for s in specs.values() if s.float32}
    need = sum(p.numel() * (4 if name in float32 else dtype.itemsize) for name, p in model.named_parameters())
    need += sum(b.numel() * b.element_size() for b in model.buffers())
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise MemoryError(f"{device}: the weights need {need / 2**30:.2f} GiB, but {free / 2**30:.2f} GiB of its "
                          f"{total / 2**30:.2f} GiB are free; nothing was allocated. Keep FP8 (weight_dtype='fp8'), "
                          "use more tensor-parallel ranks, or place the model over several devices (devices=[...])")


def _allocate(model: MiMoForCausalLM, specs: dict[str, TensorSpec], dtype: torch.dtype, device_of) -> None:
    """Replace every meta tensor by an empty one on its device: parameters in `dtype` (float32 for
    the router), FP8 storage buffers keeping their own dtype."""
    float32 = {s.param for s in specs.values() if s.float32}
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            t = torch.empty(p.shape, dtype=torch.float32 if full in float32 else dtype, device=device_of(full))
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            module.register_buffer(name, torch.empty(b.shape, dtype=b.dtype, device=device_of(full)))
