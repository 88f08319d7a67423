"""Reading safetensors shards without trusting them: paths, headers, sizes, then bytes.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data:

    {"model.norm.weight": {"dtype": "BF16", "shape": [4096], "data_offsets": [0, 8192]}, ...}

(offsets count from the first byte after the header; https://github.com/huggingface/safetensors,
"Format"). Everything the loader needs to *check* a checkpoint is in these headers, so
`read_header` parses them first, before a single weight is read or a model allocated:

* a file named by the index must lie inside the checkpoint folder: no absolute path, no `..`,
  no symbolic link out of it. The one layout with links is a `huggingface_hub` cache snapshot,
  `models--org--name/snapshots/<revision>/<file> -> ../../blobs/<sha256>`: a link into the same
  repository's `blobs/` folder is accepted;
* every tensor's bytes must fit the file: a shard shorter than its header says is refused by name;
* the bytes are read with ordinary `readinto` calls, not through a memory map. A file that
  shrinks while it is read (a copy still in progress, a network file system) then gives a short
  read, which `ShardReader` turns into a `CheckpointError` naming the file; through a memory map
  the same fault is a SIGBUS that kills the process.

`ShardReader.read(name, rows, cols)` reads a whole tensor or a block of rows and columns of it:
rows are one contiguous byte range, a column slice is one range per row, so only the requested
bytes leave the disk (tensor-parallel ranks read their share only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names the tensor and the file at fault."""


# safetensors dtype codes (the format's README) -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 << 20  # the format's own limit on the JSON header (100 MB)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: `start` and `end` count from the start of the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def checkpoint_file(directory: Path, entry: str, source: Path | str) -> Path:
    """The path of `entry` (a file name from the index), refused unless it lies in `directory`.

    `source` (the index, or the folder) is named in the error together with the entry."""
    parts = PurePosixPath(entry.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or Path(entry).is_absolute() or not parts.parts:
        raise CheckpointError(f"{source}: file entry {entry!r} points outside the checkpoint folder "
                              "(absolute path or '..'); shards must lie inside it")
    path = directory / entry
    real, root = path.resolve(), directory.resolve()
    if real.is_relative_to(root) or _hub_blob(root, real):
        return path
    raise CheckpointError(f"{source}: file entry {entry!r} is a symbolic link to {real}, outside the "
                          "checkpoint folder (only a huggingface_hub snapshot may link into its blobs/ folder)")


def _hub_blob(root: Path, real: Path) -> bool:
    """True when `root` is `models--org--name/snapshots/<revision>` and `real` lies in that repository's `blobs/`."""
    repo = root.parent.parent
    return (root.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--"))
            and real.parent == repo / "blobs")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """tensor name -> TensorEntry, checked: known dtypes, byte counts that match the shapes, and
    data that fits inside the file (a truncated shard is named here, before anything is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: cannot read this safetensors shard: header length {n} does not fit "
                                      f"a file of {size} bytes (truncated or not a safetensors file?)")
            raw = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read this safetensors shard: {err}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: cannot read this safetensors shard: the header is not a JSON object")
    raw.pop("__metadata__", None)
    entries = {}
    for name, e in raw.items():
        try:
            dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: cannot read this safetensors shard: tensor {name!r} has a malformed "
                                  f"header entry {e!r}") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: cannot read this safetensors shard: tensor {name!r} has shape "
                                  f"{list(shape)} of {e['dtype']} but data_offsets [{begin}, {end}]")
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: cannot read this safetensors shard: it is truncated ({size:,} bytes, "
                                  f"but tensor {name!r} ends at byte {8 + n + end:,})")
        entries[name] = TensorEntry(dtype, shape, 8 + n + begin, 8 + n + end)
    return entries


class ShardReader:
    """Reads whole tensors or row/column blocks of them from the shards of one checkpoint, with
    plain file reads (no memory map), counting the bytes read. Each file's header is read (and
    checked against the index) once, on first use, unless `headers` already holds it."""

    def __init__(self, directory: Path, weight_map: dict[str, str], device="cpu",
                 headers: dict[str, dict[str, TensorEntry]] | None = None):
        self.directory, self.weight_map, self.device = Path(directory), weight_map, str(device)
        self.headers: dict[str, dict[str, TensorEntry]] = dict(headers or {})
        self.files: dict[str, object] = {}  # open file objects, by shard name
        self.bytes_read = 0

    def handle(self, file: str) -> dict[str, TensorEntry]:
        """The header of `file`, read and checked against the index on first use."""
        if file not in self.headers:
            path = checkpoint_file(self.directory, file, self.directory)
            header = read_header(path)
            present = set(header)
            listed = {n for n, f in self.weight_map.items() if f == file}
            for name in sorted(listed - present):
                raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but not in this file")
            for name in sorted(present - listed):
                raise CheckpointError(f"{path}: tensor {name!r} is in the file but not in the index")
            self.headers[file] = header
        return self.headers[file]

    def release(self, file: str) -> None:
        """Close `file` (its header stays known)."""
        f = self.files.pop(file, None)
        if f is not None:
            f.close()

    def where(self, name: str) -> Path:
        return self.directory / self.weight_map[name]

    def entry(self, name: str) -> TensorEntry:
        return self.handle(self.weight_map[name])[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """The tensor, or rows [r0, r1) / columns [c0, c1) of it, on `self.device`."""
        e = self.entry(name)
        shape = e.shape
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        row_elems = math.prod(shape[1:])  # elements per row (1 for a vector)
        item = e.dtype.itemsize
        if cols is None:  # rows r0..r1: one contiguous range
            ranges = [(e.start + r0 * row_elems * item, (r1 - r0) * row_elems * item)]
            out_shape = (r1 - r0, *shape[1:]) if shape else ()
        else:  # one range per row: columns c0..c1 of a matrix
            c0, c1 = cols
            ranges = [(e.start + (r * shape[1] + c0) * item, (c1 - c0) * item) for r in range(r0, r1)]
            out_shape = (r1 - r0, c1 - c0)
        buffer = bytearray(sum(length for _, length in ranges))
        self._read_ranges(name, ranges, memoryview(buffer))
        tensor = (torch.frombuffer(buffer, dtype=e.dtype) if buffer else torch.empty(0, dtype=e.dtype)).view(out_shape)
        self.bytes_read += len(buffer)
        return tensor if self.device == "cpu" else tensor.to(self.device)

    def _read_ranges(self, name: str, ranges: list[tuple[int, int]], out: memoryview) -> None:
        file = self.weight_map[name]
        path = self.where(name)
        try:
            if file not in self.files:
                self.files[file] = open(checkpoint_file(self.directory, file, self.directory), "rb", buffering=0)
            f, at = self.files[file], 0
            for offset, length in ranges:
                f.seek(offset)
                got = 0
                while got < length:  # readinto may return fewer bytes than asked; 0 means end of file
                    n = f.readinto(out[at + got:at + length])
                    if not n:
                        raise CheckpointError(f"{path}: cannot read tensor {name!r}: the file ended at byte "
                                              f"{offset + got:,} (truncated while it was read?)")
                    got += n
                at += length
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} (truncated or corrupt shard?): {err}") from None


def fingerprint(config_file: Path, weight_map: dict[str, str], reader: ShardReader, sample: int = 4096) -> dict[str, str]:
    """A cheap digest of what a checkpoint is, by part: the config's text, the index, every shard's
    header, and the first and last `sample` bytes of every shard's data (so two checkpoints of the
    same shapes but other weights differ too). Reads a few KB per shard."""
    digests = {"config.json": hashlib.sha256(config_file.read_bytes()).hexdigest()[:16],
               "index": hashlib.sha256(json.dumps(weight_map, sort_keys=True).encode()).hexdigest()[:16]}
    headers, data = hashlib.sha256(), hashlib.sha256()
    for file in sorted(set(weight_map.values())):
        header = reader.handle(file)
        headers.update(json.dumps({n: [str(e.dtype), e.shape, e.end - e.start] for n, e in sorted(header.items())})
                       .encode())
        first, last = min(e.start for e in header.values()), max(e.end for e in header.values())
        name = next(iter(header))
        for offset in sorted({first, max(first, last - sample)}):
            length = min(sample, last - offset)
            buffer = bytearray(length)
            reader._read_ranges(name, [(offset, length)], memoryview(buffer))
            data.update(buffer)
        reader.release(file)
    digests["shard headers"] = headers.hexdigest()[:16]
    digests["shard data (first and last bytes)"] = data.hexdigest()[:16]
    return digests
