"""Strict loading of a checkpoint in the official hub layout.

    model = minimimo.load("path/to/MiMo-V2-Flash", dtype=torch.bfloat16, device="cuda:0")

1. `config.json` -> MiMoConfig; `model.safetensors.index.json` -> where every tensor lives
   (a folder with a single `model.safetensors` and no index works too).
2. The model is built on the *meta* device (no memory), then each parameter is allocated empty
   on the target device and filled tensor by tensor from `safe_open` (lazy, no pickle), so the
   peak memory is the model plus one tensor.
3. FP8 tensors (a weight with a `_scale_inv` companion) are dequantized block by block into the
   requested dtype (`fp8.py`). bf16, fp32 and FP8 mix within a layer as on the hub; the router
   stays float32.
4. The MTP blocks (`model.mtp.layers.k.*`) load like the rest; a checkpoint without them loads
   with `config.num_mtp_layers == 0` (no drafting).
5. Every tensor is accounted for. A missing tensor, an unexpected one, a wrong shape or dtype, an
   index naming a missing shard, a shard that cannot be read: each raises `CheckpointError`
   naming the tensor and the file. No parameter is ever left uninitialised.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import MiMoConfig
from .fp8 import FP8, apply_scales, candidate_grids, choose_grid
from .hub import INDEX, SCALE_SUFFIX, TensorSpec, tensor_specs
from .model import MiMoForCausalLM

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32,
          "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names the tensor and the file at fault."""


@dataclass
class LoadReport:
    directory: Path
    files: int = 0
    tensors: int = 0
    fp8_tensors: int = 0
    grids: dict[str, int] = field(default_factory=dict)  # FP8 row grid kind -> count
    mtp_blocks: int = 0  # MTP blocks loaded (0: drafting unavailable)
    bytes_read: int = 0  # bytes that left the disk


def read_index(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single-file layout)."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
    elif (directory / "model.safetensors").is_file():
        try:
            with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{directory / 'model.safetensors'}: cannot read it: {err}") from None
    else:
        raise CheckpointError(f"{directory}: neither {INDEX} nor model.safetensors found")
    for name, file in weight_map.items():
        if not (directory / file).is_file():
            raise CheckpointError(f"{index}: tensor {name!r} is in shard {file!r}, which does not exist")
    return weight_map


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         progress: bool = True, tensor_parallel: bool = False, devices: list | None = None,
         placement: dict[str, int] | None = None, weight_dtype: str | None = None,
         device_memory=None, context: int = 4096) -> MiMoForCausalLM:
    """Load a hub-layout checkpoint directory into a MiMoForCausalLM in eval mode.

    dtype: compute dtype of the weights; None takes the config's `torch_dtype` (bfloat16 on the
    hub). FP8 weights are dequantized into it; the router stays float32.
    devices: place the model over several devices (pipeline style, one process): embedding,
        layers, head and MTP blocks go to devices by balanced bytes (`plan.py`), or by an explicit
        `placement` {unit: device index}; activations move between devices in the forward. The
        plan is checked against `device_memory` (default: each device's memory) before anything
        is allocated.
    weight_dtype="fp8": keep the FP8 tensors of the checkpoint in FP8 on their device (`FP8Linear`,
        dequantized strip by strip inside the matmul); everything else in bfloat16.
    tensor_parallel: under an initialised process group, return this rank's shard (`parallel.py`).
    """
    if tensor_parallel:
        from .parallel import load_tensor_parallel

        return load_tensor_parallel(path, dtype=dtype, device=None if device == "cpu" else device,
                                    progress=progress)
    directory = Path(path)
    config = MiMoConfig.from_pretrained(directory)
    if weight_dtype not in (None, "fp8", "bf16", "bfloat16", "fp32", "float32"):
        raise ValueError(f"weight_dtype {weight_dtype!r} not one of fp8, bf16, fp32")
    keep_fp8 = weight_dtype == "fp8"
    if keep_fp8 and dtype not in (None, torch.bfloat16, "bfloat16"):
        raise ValueError("weight_dtype='fp8' keeps the other tensors in bfloat16; leave dtype unset")
    dtype = torch.bfloat16 if keep_fp8 else _resolve_dtype(weight_dtype or dtype, config)
    weight_map = read_index(directory)
    specs = tensor_specs(config)
    _check_names(weight_map, specs, directory)
    device_of, the_plan = _placement(directory, config, devices, placement, device_memory, keep_fp8, dtype, context,
                                     device)

    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    fp8_names = {n for n in specs if keep_fp8 and n + SCALE_SUFFIX in weight_map}
    if fp8_names:
        _use_fp8_storage(model, specs, fp8_names, weight_map, directory, config)
    _allocate(model, specs, dtype, device_of)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    filled: set[tuple[str, int | None]] = set()
    report = LoadReport(directory)

    reader = ShardReader(directory, weight_map, "cpu")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in weight_map.items():
        by_file[file].append(name)
    for file in tqdm(sorted(by_file), desc="loading shards", unit="shard", disable=not progress):
        reader.handle(file)  # opens it and checks its tensors against the index
        for name in sorted(by_file[file]):
            if name.endswith(SCALE_SUFFIX):
                continue  # read together with its weight
            spec = specs[name]
            reader.device = str(device_of(spec.param))  # straight onto the tensor's device
            with torch.no_grad():
                if name in fp8_names:
                    fp8, scale = read_fp8(reader, name, spec, config, report)
                    _slot(targets[spec.param], spec.expert).copy_(fp8)
                    _slot(targets[spec.param + SCALE_SUFFIX], spec.expert).copy_(scale)
                else:
                    _slot(targets[spec.param], spec.expert).copy_(read_weight(reader, name, spec, config, dtype, report))
            filled.add((spec.param, spec.expert))
            report.tensors += 1
        reader.release(file)
        report.files += 1

    missing = [s.param for s in specs.values() if (s.param, s.expert) not in filled]
    if missing:  # cannot happen after _check_names; kept so no parameter is ever left unset
        raise CheckpointError(f"{directory}: parameters left unfilled: {missing[:5]}")
    report.mtp_blocks = config.num_mtp_layers
    report.bytes_read = reader.bytes_read
    model.load_report = report
    model.plan = the_plan  # the checked memory plan when placed over devices, else None
    return model.eval().requires_grad_(False)


def _slot(tensor: torch.Tensor, expert: int | None) -> torch.Tensor:
    return tensor if expert is None else tensor[expert]


def _placement(directory, config, devices, placement, device_memory, keep_fp8, dtype, context, device):
    """param name -> device: one device, or the units of a checked plan over several."""
    if devices is None:
        if placement is not None:
            raise ValueError("placement needs devices=[...]")
        return (lambda name: torch.device(device)), None
    from .plan import plan, unit_of

    if device_memory is None:
        device_memory = [torch.cuda.get_device_properties(torch.device(d)).total_memory
                         if torch.device(d).type == "cuda" else 1 << 50 for d in devices]
    weight_dtype = "fp8" if keep_fp8 else {torch.bfloat16: "bf16", torch.float16: "bf16"}.get(dtype, "fp32")
    the_plan = plan(config, devices=list(devices), device_memory=device_memory, weight_dtype=weight_dtype,
                    context=context, placement=placement).check()  # refuses before any allocation
    names = [torch.device(d) for d in devices]
    return (lambda name: names[the_plan.placement[unit_of(name)]]), the_plan


def _use_fp8_storage(model, specs, fp8_names, weight_map, directory, config) -> None:
    """Swap the modules whose checkpoint tensors are FP8 to FP8 storage (still on meta)."""
    from .fp8 import FP8Linear

    block = config.fp8_block
    reader = ShardReader(directory, weight_map, "cpu")  # shapes only
    experts_done = set()
    for name in sorted(fp8_names):
        spec = specs[name]
        scale_shape = reader.shape(name + SCALE_SUFFIX)
        module_name, _, attr = spec.param.rpartition(".")
        module = model.get_submodule(module_name)
        if spec.expert is None:
            parent_name, _, child = module_name.rpartition(".")
            linear = FP8Linear(module.in_features, module.out_features, scale_shape, block, head_size=spec.head_size)
            setattr(model.get_submodule(parent_name), child, linear)
        elif spec.param not in experts_done:
            module.store_fp8(attr, scale_shape, block)
            experts_done.add(spec.param)


class ShardReader:
    """Opens shards lazily and reads whole tensors or row/column slices (`get_slice`: only the
    requested bytes leave the disk), counting the bytes read. The first open of a file checks its
    tensors against the index."""

    def __init__(self, directory: Path, weight_map: dict[str, str], device="cpu"):
        self.directory, self.weight_map, self.device = directory, weight_map, str(device)
        self.handles: dict[tuple[str, str], object] = {}
        self.bytes_read = 0

    def handle(self, file: str):
        key = (file, self.device)
        if key not in self.handles:
            path = self.directory / file
            try:
                handle = safe_open(str(path), framework="pt", device=self.device)
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: cannot read this safetensors shard (truncated or corrupt?): {err}") from None
            present = set(handle.keys())
            listed = {n for n, f in self.weight_map.items() if f == file}
            for name in sorted(listed - present):
                raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but not in this file")
            for name in sorted(present - listed):
                raise CheckpointError(f"{path}: tensor {name!r} is in the file but not in the index")
            self.handles[key] = handle
        return self.handles[key]

    def release(self, file: str) -> None:
        for key in [k for k in self.handles if k[0] == file]:
            self.handles.pop(key)

    def where(self, name: str) -> Path:
        return self.directory / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle(self.weight_map[name]).get_slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """The tensor, or rows [r0, r1) / columns [c0, c1) of it."""
        try:
            tensor_slice = self.handle(self.weight_map[name]).get_slice(name)
            if rows is None and cols is None:
                tensor = tensor_slice[:]
            elif cols is None:
                tensor = tensor_slice[rows[0]:rows[1]]
            else:
                r0, r1 = rows if rows is not None else (0, tensor_slice.get_shape()[0])
                tensor = tensor_slice[r0:r1, cols[0]:cols[1]]
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{self.where(name)}: cannot read tensor {name!r} (truncated or corrupt "
                                  f"shard?): {err}") from None
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


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
    block_r, block_c = config.fp8_block
    r0, r1 = rows if rows is not None else (0, shape[0])
    c0, c1 = cols if cols is not None else (0, shape[1])
    scale_shape = reader.shape(scale_name)
    grids = candidate_grids(shape[0], scale_shape[0], block_r, spec.head_size) if len(scale_shape) == 2 else {}
    if len(grids) == 1 and scale_shape[1] == -(-shape[1] // block_c):
        kind, row_block = next(iter(grids.items()))  # the shape decides: read only the slice
        tensor = reader.read(name, rows, cols)
    else:  # ambiguous or wrong: the full tensor and scale go to choose_grid (amax test or error)
        tensor, scale = reader.read(name), reader.read(scale_name)
        try:
            kind, row_block = choose_grid(tensor, scale, (block_r, block_c), head_size=spec.head_size, name=name)
        except ValueError as err:
            raise CheckpointError(f"{reader.where(scale_name)}: {err}") from None
        tensor = tensor[r0:r1, c0:c1]
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
    """The raw FP8 weight and its float32 scale, checked (shape, dtypes, a grid that explains the scale)."""
    where = reader.where(name)
    shape = reader.shape(name)
    if shape != spec.shape:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {list(shape)}, the config implies {list(spec.shape)}")
    fp8, scale = reader.read(name), reader.read(name + SCALE_SUFFIX)
    if fp8.dtype != FP8 or scale.dtype != torch.float32:
        raise CheckpointError(f"{where}: tensor {name!r} must be float8_e4m3fn with a float32 scale, got "
                              f"{fp8.dtype} / {scale.dtype}")
    try:
        kind, _ = choose_grid(fp8, scale, config.fp8_block, head_size=spec.head_size, name=name)
    except ValueError as err:
        raise CheckpointError(f"{reader.where(name + SCALE_SUFFIX)}: {err}") from None
    report.fp8_tensors += 1
    report.grids[kind] = report.grids.get(kind, 0) + 1
    return fp8, scale


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


def _resolve_dtype(dtype, config: MiMoConfig) -> torch.dtype:
    if dtype is None:
        dtype = config.torch_dtype or "float32"
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype.removeprefix("torch.")]
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} not supported; use float32, bfloat16 or float16")
    return dtype
