"""Streaming safetensors: read one tensor at a time, write shards tensor by tensor.

The reader parses the safetensors header itself and reads each tensor with one positioned read into
a fresh buffer, so reading a model never maps the whole file into the process (a memory map would
count every page touched towards the process's resident memory). The writer knows every tensor's
name, dtype and shape up front, so it writes each shard's header first and then streams the tensor
bytes as they are computed; nothing is buffered beyond the tensor being written.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import TunesmithError
from ..sizes import parse_size

SAFE_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFE_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_SAFE = {v: k for k, v in SAFE_TO_TORCH.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | Path) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the absolute offset where its data starts."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise TunesmithError(f"'{path}' is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise TunesmithError(f"'{path}' is not a safetensors file (header length {n} is implausible)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TunesmithError(f"cannot read safetensors file '{path}': {exc}") from exc
    if not isinstance(header, dict):
        raise TunesmithError(f"'{path}' is not a safetensors file (the header is not a JSON object)")
    return header, 8 + n


class SafetensorsFile:
    """Tensor infos of one safetensors file; `read(name)` loads one tensor, nothing else."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, start = read_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            dt = SAFE_TO_TORCH.get(entry.get("dtype"))
            if dt is None:
                raise TunesmithError(f"'{self.path}': tensor '{name}' has dtype {entry.get('dtype')!r}, which tunesmith cannot read")
            b, e = entry["data_offsets"]
            self.infos[name] = TensorInfo(name, dt, tuple(entry["shape"]), self.path, start + b, e - b)

    def names(self) -> list[str]:
        """Tensor names in the order their bytes lie in the file (sequential reads)."""
        return sorted(self.infos, key=lambda k: self.infos[k].begin)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.infos[name])


def read_tensor(info: TensorInfo) -> torch.Tensor:
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.begin)
        done = 0
        while done < info.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise TunesmithError(f"'{info.file}' is truncated: tensor '{info.name}' ends past the end of the file")
            done += got
    return buf.view(info.dtype).reshape(info.shape)


class ModelWeights:
    """The weights of a Hugging Face model folder: one model.safetensors, or shards with an index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.infos: dict[str, TensorInfo] = {}
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise TunesmithError(f"'{index}' is not a valid safetensors index (needs a weight_map): {exc}") from exc
            files: dict[str, SafetensorsFile] = {}
            for shard in dict.fromkeys(weight_map.values()):
                path = self.folder / shard
                if not path.is_file():
                    raise TunesmithError(f"'{index}' lists the shard '{shard}', which is missing from '{self.folder}'")
                files[shard] = SafetensorsFile(path)
            for shard, f in files.items():
                for name in f.names():
                    if weight_map.get(name) == shard:
                        self.infos[name] = f.infos[name]
            missing = [n for n, s in weight_map.items() if n not in self.infos]
            if missing:
                raise TunesmithError(f"'{index}' maps '{missing[0]}' to '{weight_map[missing[0]]}', which does not contain it")
        elif (self.folder / SINGLE_FILE).is_file():
            f = SafetensorsFile(self.folder / SINGLE_FILE)
            self.infos = {n: f.infos[n] for n in f.names()}
        else:
            pickled = [p.name for p in self.folder.glob("*.bin")] + [p.name for p in self.folder.glob("*.pt")]
            hint = (
                f" It has {pickled[0]}: tunesmith never unpickles weights; re-save the model with "
                "`model.save_pretrained(folder)` (safetensors is the default) and merge that folder."
                if pickled else ""
            )
            raise TunesmithError(f"'{self.folder}' has no {SINGLE_FILE} or {INDEX_FILE}.{hint}")

    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.infos[name])

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


# ---- writing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Split the tensors, in order, into shards of at most max_shard_size bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": TORCH_TO_SAFE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Write planned tensors, in plan order, into one file or numbered shards plus an index.

    `write(name, tensor)` streams the tensor's bytes into the open shard; a shard's header is written
    when the shard is opened (the plan fixes every offset), so no shard is ever held in memory.
    """

    def __init__(self, folder: str | Path, tensors: list[PlannedTensor], max_shard_size: int | str = "5GB",
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.shards = plan_shards(list(tensors), parse_size(max_shard_size))
        self.files = shard_names(len(self.shards))
        self.metadata = metadata
        self._queue: Iterator[tuple[int, PlannedTensor]] = ((i, t) for i, s in enumerate(self.shards) for t in s)
        self._open_index = -1
        self._fh = None
        self.weight_map: dict[str, str] = {}

    def _open(self, shard: int) -> None:
        self._close()
        self._fh = open(self.folder / self.files[shard], "wb")
        self._fh.write(encode_header(self.shards[shard], self.metadata))
        self._open_index = shard

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            shard, planned = next(self._queue)
        except StopIteration:
            raise RuntimeError(f"tensor '{name}' was not planned") from None
        if planned.name != name:
            raise RuntimeError(f"expected tensor '{planned.name}' next, got '{name}'")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(
                f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, planned {planned.dtype} {planned.shape}"
            )
        if shard != self._open_index:
            self._open(shard)
        if planned.nbytes:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(data.numpy()))
        self.weight_map[name] = self.files[shard]

    def close(self) -> list[str]:
        """Finish: check every planned tensor was written, write the index when sharded; the file names."""
        leftover = next(self._queue, None)
        if leftover is not None:
            raise RuntimeError(f"tensor '{leftover[1].name}' was planned but never written")
        # Shards with no tensors written (impossible with a non-empty plan) still get a valid header.
        for i in range(self._open_index + 1, len(self.shards)):
            self._open(i)
        self._close()
        if len(self.files) > 1:
            total = sum(t.nbytes for s in self.shards for t in s)
            index = {"metadata": {"total_size": total}, "weight_map": self.weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return list(self.files)

    def abort(self) -> None:
        self._close()


def save_streaming(folder: str | Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "5GB") -> list[str]:
    """Write a dict of tensors (in its order) with the streaming writer; used by tests and benches."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedWriter(folder, plan, max_shard_size)
    for k, v in tensors.items():
        writer.write(k, v)
    return writer.close()
