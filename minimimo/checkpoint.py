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
from .fp8 import FP8, apply_scales, choose_grid
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


def read_index(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index (or the single-file layout)."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
    elif (directory / "model.safetensors").is_file():
        with _open(directory / "model.safetensors") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise CheckpointError(f"{directory}: neither {INDEX} nor model.safetensors found")
    for name, file in weight_map.items():
        if not (directory / file).is_file():
            raise CheckpointError(f"{index}: tensor {name!r} is in shard {file!r}, which does not exist")
    return weight_map


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         progress: bool = True) -> MiMoForCausalLM:
    """Load a hub-layout checkpoint directory into a MiMoForCausalLM in eval mode.

    dtype: compute dtype of the weights; None takes the config's `torch_dtype` (bfloat16 on the
    hub). FP8 weights are dequantized into it; the router stays float32.
    """
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

    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in weight_map.items():
        by_file[file].append(name)
    for file in tqdm(sorted(by_file), desc="loading shards", unit="shard", disable=not progress):
        with _open(directory / file, device) as f:
            present = set(f.keys())
            for name in sorted(by_file[file]):
                if name not in present:
                    raise CheckpointError(f"{directory / file}: tensor {name!r} is listed in the index but not in this file")
            for name in sorted(present - set(by_file[file])):
                raise CheckpointError(f"{directory / file}: tensor {name!r} is in the file but not in the index")
            for name in sorted(by_file[file]):
                if name.endswith(SCALE_SUFFIX):
                    continue  # read together with its weight
                spec = specs[name]
                tensor = _read(f, name, spec, config, directory, file, weight_map, dtype, device, report)
                target = params[spec.param]
                with torch.no_grad():
                    (target[spec.expert] if spec.expert is not None else target).copy_(tensor)
                filled.add((spec.param, spec.expert))
                report.tensors += 1
        report.files += 1

    missing = [s.param for s in specs.values() if (s.param, s.expert) not in filled]
    if missing:  # cannot happen after _check_names; kept so no parameter is ever left unset
        raise CheckpointError(f"{directory}: parameters left unfilled: {missing[:5]}")
    report.mtp_blocks = config.num_mtp_layers
    model.load_report = report
    return model.eval().requires_grad_(False)


def _read(f, name: str, spec: TensorSpec, config: MiMoConfig, directory: Path, file: str,
          weight_map: dict[str, str], dtype: torch.dtype, device, report: LoadReport) -> torch.Tensor:
    where = directory / file
    tensor = _get(f, name, where)
    if tuple(tensor.shape) != spec.shape:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {list(tensor.shape)}, "
                              f"the config implies {list(spec.shape)}")
    scale_name = name + SCALE_SUFFIX
    if scale_name in weight_map:
        if config.fp8_block is None:
            raise CheckpointError(f"{where}: tensor {name!r} has a {SCALE_SUFFIX} but config.json has no "
                                  "quantization_config.weight_block_size")
        if tensor.dtype != FP8:
            raise CheckpointError(f"{where}: tensor {name!r} has a {SCALE_SUFFIX} but is stored as "
                                  f"{tensor.dtype}, not float8_e4m3fn")
        scale_file = directory / weight_map[scale_name]
        if scale_file.name == file:
            scale = _get(f, scale_name, where)
        else:
            with _open(scale_file, device) as g:
                scale = _get(g, scale_name, scale_file)
        if scale.dtype != torch.float32:
            raise CheckpointError(f"{scale_file}: tensor {scale_name!r} must be float32, got {scale.dtype}")
        try:
            kind, row_block = choose_grid(tensor, scale, config.fp8_block, head_size=spec.head_size, name=name)
        except ValueError as err:
            raise CheckpointError(f"{scale_file}: {err}") from None
        out = apply_scales(tensor, scale, row_block, config.fp8_block[1], dtype)
        report.fp8_tensors += 1
        report.grids[kind] = report.grids.get(kind, 0) + 1
        return out.float() if spec.float32 else out
    if tensor.dtype == FP8:
        raise CheckpointError(f"{where}: tensor {name!r} is float8_e4m3fn but has no {scale_name!r}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; "
                              "expected float32, bfloat16, float16 or FP8 with a scale")
    return tensor.float() if spec.float32 else tensor.to(dtype)


def _get(f, name: str, where: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{where}: cannot read tensor {name!r} (truncated or corrupt shard?): {err}") from None


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


class _open:
    """safe_open that names the file when it cannot be read (truncated, corrupt, not safetensors)."""

    def __init__(self, file: Path, device="cpu"):
        self.file, self.device = file, str(device)

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.file), framework="pt", device=self.device)
            return self.handle.__enter__()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.file}: cannot read this safetensors shard (truncated or corrupt?): {err}") from None

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)
