"""A GGUF header reader: metadata and the tensor table, without touching the tensor data.

The `gguf` package's GGUFReader parses every element of the vocabulary arrays into its own
numpy view (seconds for a 50k-token vocabulary); this reader walks the same bytes with
`struct` and takes numeric arrays with one `np.frombuffer`, so an inspection costs
milliseconds. Every offset and size is checked against the file, so a truncated or corrupt
file is a clear error rather than garbage.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelLoadError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types (gguf.GGUFValueType) -> struct format of a scalar.
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: GGUF name, GGML type id, shape (outermost first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


@dataclass(frozen=True)
class GGUFHeader:
    """Metadata and tensor table of one GGUF file."""

    path: Path
    version: int
    tensor_count: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    file_bytes: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def ggml_type_name(type_id: int) -> str:
    """The GGML type's name (Q4_K, F16, ...), or 'type N' for an id the gguf package lacks."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _type_size(type_id: int, elements: int, path: Path) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ModelLoadError(f"{path}: unknown GGML tensor type id {type_id}") from None
    if elements % block:
        raise ModelLoadError(
            f"{path}: {elements} elements are not a whole number of {ggml_type_name(type_id)} "
            f"blocks of {block}"
        )
    return elements // block * size


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(
                f"{self.path}: GGUF header is truncated or corrupt at byte {self.pos}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, type_id: int) -> Any:
        fmt = _SCALAR[type_id]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar(4), self.scalar(10)
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type in _NUMPY:
                dtype = np.dtype(_NUMPY[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy()
            return [self.value(item_type) for _ in range(count)]
        if type_id not in _SCALAR:
            raise ModelLoadError(
                f"{self.path}: unknown GGUF value type {type_id} at byte {self.pos}"
            )
        return self.scalar(type_id)


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header of the GGUF file at `path`; raise ModelLoadError when it is not one."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise ModelLoadError(f"{path}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e.strerror or e}") from e


def _parse(buf: Any, path: Path, size: int) -> GGUFHeader:
    cur = _Cursor(buf, path)
    if cur.take(4) != MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
    version = cur.scalar(4)
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    tensor_count, kv_count = cur.scalar(10), cur.scalar(10)
    if tensor_count > size // 24 or kv_count > size // 12:
        raise ModelLoadError(
            f"{path}: GGUF header is corrupt ({tensor_count} tensors, {kv_count} keys)"
        )
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar(4))
    raw: list[tuple[str, int, tuple[int, ...], int]] = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.scalar(4)
        if not 0 < n_dims <= 4:
            raise ModelLoadError(f"{path}: tensor table is corrupt ({name!r} has {n_dims} dims)")
        dims = [cur.scalar(10) for _ in range(n_dims)]
        type_id, offset = cur.scalar(4), cur.scalar(10)
        raw.append((name, type_id, tuple(reversed(dims)), offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    # The padding before the data is zeros; anything else means the table ended early
    # (the header counts fewer tensors than the file lists).
    if any(buf[cur.pos : min(data_start, size)]):
        raise ModelLoadError(
            f"{path}: the tensor table does not end where the data begins: the header's "
            f"tensor count ({tensor_count}) does not match the tensors in the file"
        )
    tensors = []
    names: set[str] = set()
    for name, type_id, shape, offset in raw:
        n_bytes = _type_size(type_id, int(np.prod(shape)), path)
        start = data_start + offset
        if start + n_bytes > size:
            raise ModelLoadError(
                f"{path}: tensor {name} ends at byte {start + n_bytes} past the end of the file "
                f"({size} bytes): the file is truncated or its tensor table is corrupt"
            )
        if name in names:
            raise ModelLoadError(f"{path}: tensor {name} is listed twice")
        names.add(name)
        tensors.append(TensorInfo(name, type_id, shape, start, n_bytes))
    data_end = max((t.offset + t.n_bytes for t in tensors), default=data_start)
    if size - data_end >= alignment:
        raise ModelLoadError(
            f"{path}: {size - data_end} bytes follow the last tensor the header lists: the "
            f"header's tensor count ({tensor_count}) does not match the tensors in the file"
        )
    return GGUFHeader(path, version, tensor_count, metadata, tuple(tensors), size)


def tensor_bytes(path: Path, info: TensorInfo) -> np.ndarray:
    """The raw bytes of one tensor as a read-only uint8 memmap of shape (rows, bytes per row)."""
    rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.n_bytes,))
    return data.reshape(rows, info.n_bytes // rows)
