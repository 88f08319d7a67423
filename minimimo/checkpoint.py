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
from .fp8 import FP8, candidate_grids, choose_grid
from .hub import INDEX, SCALE_SUFFIX, TensorSpec, tensor_specs
from .model import MiMoForCausalLM

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
         progress: bool = True, tensor_parallel: bool = False) -> MiMoForCausalLM:
    """Load a hub-layout checkpoint directory into a MiMoForCausalLM in eval mode.

    dtype: compute dtype of the weights; None takes the config's `torch_dtype` (bfloat16 on the
    hub). FP8 weights are dequantized into it; the router stays float32.
    tensor_parallel: under an initialised process group, return this rank's shard (`parallel.py`).
    """
    if tensor_parallel:
        from .parallel import load_tensor_parallel

        return load_tensor_parallel(path, dtype=dtype, device=None if device == "cpu" else device,
                                    progress=progress)
    directory = Path(path)
    config = MiMoConfig.from_pretrained(directory)
    dtype = _resolve_dtype(dtype, config)
    weight_map = read_index(directory)
    specs = tensor_specs(config)
    _check_names(weight_map, specs, directory)

    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    _allocate(model, specs, dtype, torch.device(device))
    params = dict(model.named_parameters())
    filled: set[tuple[str, int | None]] = set()
    report = LoadReport(directory)

    reader = ShardReader(directory, weight_map, device)
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in weight_map.items():
        by_file[file].append(name)
    for file in tqdm(sorted(by_file), desc="loading shards", unit="shard", disable=not progress):
        reader.handle(file)  # opens it and checks its tensors against the index
        for name in sorted(by_file[file]):
            if name.endswith(SCALE_SUFFIX):
                continue  # read together with its weight
            spec = specs[name]
            tensor = read_weight(reader, name, spec, config, dtype, report)
            target = params[spec.param]
            with torch.no_grad():
                (target[spec.expert] if spec.expert is not None else target).copy_(tensor)
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
    return model.eval().requires_grad_(False)


class ShardReader:
    """Opens shards lazily and reads whole tensors or row/column slices (`get_slice`: only the
    requested bytes leave the disk), counting the bytes read. The first open of a file checks its
    tensors against the index."""

    def __init__(self, directory: Path, weight_map: dict[str, str], device="cpu"):
        self.directory, self.weight_map, self.device = directory, weight_map, str(device)
        self.handles: dict[str, object] = {}
        self.bytes_read = 0

    def handle(self, file: str):
        if file not in self.handles:
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
            self.handles[file] = handle
        return self.handles[file]

    def release(self, file: str) -> None:
        self.handles.pop(file, None)

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
    col_block = torch.arange(c0, c1) // block_c - s_c0
    out = (tensor.float() * scale[(row_block - s_r0).to(scale.device)][:, col_block.to(scale.device)]).to(dtype)
    report.fp8_tensors += 1
    report.grids[kind] = report.grids.get(kind, 0) + 1
    return out.float() if spec.float32 else out


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


def _allocate(model: MiMoForCausalLM, specs: dict[str, TensorSpec], dtype: torch.dtype, device: torch.device):
    """Replace every meta parameter by an empty one on `device` (float32 for the router)."""
    float32 = {s.param for s in specs.values() if s.float32}
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            t = torch.empty(p.shape, dtype=torch.float32 if full in float32 else dtype, device=device)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))


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
