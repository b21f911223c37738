"""The prompt cache's disk tier: KV caches of one model in a folder, kept across restarts.

Each file is one cached sequence in mlx-lm's own prompt-cache format (safetensors, written by
`save_prompt_cache`, read as `load_prompt_cache` reads it but on several streams), named by a digest
of the model's identity, the settings that change the KV (kv_bits and its group size) and the token
ids. Its metadata holds those token ids, the identity and a SHA-256 of the tokens and of every
tensor's name, shape, dtype and SHA-256 (a tree of hashes: the tensors are hashed in parallel
threads, straight from the file's bytes while MLX reads them, so a read costs about what the file's
read costs and not one core's SHA-256 of the whole file). At start an index is built from the files'
headers alone; a file is removed when it is torn (shorter than its header says, or an unfinished
write), foreign (another model or other settings) or corrupted (its digest does not match on read):
it never reaches a sequence.

The folder is bounded by bytes: least recently used files go first, and a file whose tokens are
a strict prefix of a newer one's is removed when that one is written (it holds nothing more).
Writes are atomic (a temporary file, fsync, rename, fsync of the folder). Everything here runs
on the model's generation thread; the worker writes when idle, at unload and at shutdown, so
running streams never wait for the disk, and reads the most recent files back at load (before the
model is ready) and the others when a prompt needs one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

log = logging.getLogger("appliance.engine")

FORMAT = "2"  # 1: one SHA-256 of everything (such files are removed as foreign)
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
# A disk entry is loaded only when it covers this many more prompt tokens than memory does:
# reading and checking a file costs more than prefilling a few tokens.
MARGIN_TOKENS = 32
# mlx-lm classes a file may name (load_prompt_cache looks the name up in its module).
CLASSES = ("KVCache", "QuantizedKVCache")
MAX_HEADER = 256 << 20
# safetensors' names of the dtypes mx.save_safetensors writes (all but float64, which it can't).
# A KV cache holds bf16/f16/f32 keys and values, or uint32 packed quantized ones with their scales
# and biases; the rest are here so that no state a cache class adds can make a write fail.
DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "complex64": "C64",
}
# Streams a file's tensors are read on, a share each (MLX reads the tensors of one stream one
# after another): the default stream (MLX loads on the GPU's on CUDA, into device memory) and
# the others on the CPU. None: by the host (read_streams).
READ_STREAMS: Optional[int] = None
_streams = threading.local()  # each thread's own (MLX binds a stream to the thread that made it)
_pool: Optional[ThreadPoolExecutor] = None
# Runs a file's digest beside MLX's read of it; not _pool, whose threads the digest itself uses
_checker = ThreadPoolExecutor(1, thread_name_prefix="kv-check")


@dataclass(frozen=True, eq=False)
class DiskEntry:
    """One file of the index: its key (the file's stem), token ids and size."""

    key: str
    path: Path
    tokens: np.ndarray
    nbytes: int


def folder_for(root: str, model_name: str) -> Path:
    """The folder of one model's files under `models.prompt_cache_dir`."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in model_name) or "_"
    if safe != model_name:  # two names that map to one safe name keep folders apart
        safe += "-" + hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return Path(root).expanduser() / safe


def model_identity(model: Any) -> str:
    """A digest of what makes a model's KV: its class, config, every parameter's name, shape and
    dtype, and a sample of every parameter's values (first and last elements). Computed before
    projections are fused (fusion renames parameters but changes no KV)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    args = getattr(model, "args", None)
    if args is not None:
        fields = vars(args) if hasattr(args, "__dict__") else {}
        h.update(json.dumps(fields, sort_keys=True, default=repr).encode())
    flat_params: Any = tree_flatten(model.parameters())
    params: list[tuple[str, Any]] = sorted(flat_params, key=lambda t: t[0])
    samples = []
    for name, a in params:
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}".encode())
        flat = a.reshape(-1)
        samples.append(mx.concatenate([flat[:8], flat[-8:]]).astype(mx.float32))
    if samples:
        s: Any = mx.concatenate(samples)
        mx.eval(s)
        h.update(memoryview(s))
    return h.hexdigest()[:32]


def _token_bytes(tokens: Iterable[int]) -> bytes:
    return np.asarray(list(tokens), dtype="<i4").tobytes()


def _sha256s(buffers: Sequence[Any]) -> list[bytes]:
    """Each buffer's SHA-256, in parallel threads (hashlib lets go of the GIL on large data)."""
    global _pool
    if len(buffers) < 2:
        return [hashlib.sha256(b).digest() for b in buffers]
    if _pool is None:
        _pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="kv-digest")
    return list(_pool.map(lambda b: hashlib.sha256(b).digest(), buffers))


def _leaf_key(name: str) -> tuple[int, ...]:
    """Order of a tensor named like "3.1" or "3.0.2" (layer, keys/values, part) in the digest:
    the order of mlx-lm's tree_flatten of the caches' states."""
    return tuple(int(p) for p in name.split("."))


def _combine(tokens: bytes, leaves: Iterable[tuple[str, tuple[int, ...], str, bytes]]) -> str:
    h = hashlib.sha256(tokens)
    for name, shape, dtype, digest in leaves:
        h.update(f"{name}:{shape}:{dtype};".encode())
        h.update(digest)
    return h.hexdigest()


def _digest(tokens: bytes, cache: list[Any]) -> str:
    """The digest of a sequence's caches as written: the token ids, then every tensor's name,
    shape, dtype and SHA-256, in file order."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    def as_array(v: Any) -> Any:  # as save_prompt_cache stores a state's scalars
        if isinstance(v, mx.array):
            return v
        if isinstance(v, str):
            return mx.array([ord(c) for c in v])
        return mx.array([]) if v is None else mx.array(v)

    leaves: Any = tree_flatten([c.state for c in cache])
    arrays = [(n, mx.contiguous(as_array(a))) for n, a in leaves]
    mx.eval([a for _, a in arrays])
    hashes = _sha256s([memoryview(a) for _, a in arrays])  # type: ignore[arg-type]
    return _combine(
        tokens,
        (
            (n, tuple(a.shape), DTYPES[str(a.dtype).rsplit(".", 1)[-1]], d)
            for (n, a), d in zip(arrays, hashes, strict=True)
        ),
    )


def _file_digest(
    path: Path, tokens: bytes, parsed: tuple[dict[str, Any], int, int]
) -> tuple[str, Any]:
    """The digest of the tensors in a file as stored (the same as `_digest` of what it holds),
    and the digest its metadata gives; `parsed` is the file's read_header()."""
    header, start, size = parsed
    expected = (header.get("__metadata__") or {}).get("0.lmx_digest")
    tensors = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda t: _leaf_key(t[0])
    )
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise ValueError("torn")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                parts = [
                    view[start + t["data_offsets"][0] : start + t["data_offsets"][1]]
                    for _, t in tensors
                ]
                hashes = _sha256s(parts)
                del parts
            finally:
                view.release()
    leaves = (
        (k, tuple(int(x) for x in t["shape"]), str(t["dtype"]), d)
        for (k, t), d in zip(tensors, hashes, strict=True)
    )
    return _combine(tokens, leaves), expected


def compact(cache: list[Any]) -> Optional[list[Any]]:
    """Copies of a sequence's caches cut to their length (a trimmed cache keeps its buffer), or
    None if one of them is not a KVCache or QuantizedKVCache (mlx-lm's file format can't hold
    the others' settings) or is empty."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    out: list[Any] = []
    c: Any
    for c in cache:
        if c.keys is None or c.offset <= 0:
            return None
        n = c.offset
        keys: Any = c.keys
        values: Any = c.values
        k: Any
        if type(c) is KVCache:
            k = KVCache()
            k.keys = mx.contiguous(keys[..., :n, :])
            k.values = mx.contiguous(values[..., :n, :])
        elif type(c) is QuantizedKVCache:
            k = QuantizedKVCache(group_size=c.group_size, bits=c.bits)
            k.keys = tuple(mx.contiguous(x[..., :n, :]) for x in keys)
            k.values = tuple(mx.contiguous(x[..., :n, :]) for x in values)
        else:
            return None
        k.offset = n
        out.append(k)
    return out


def read_streams() -> int:
    """READ_STREAMS, or by the host: on CUDA one, the GPU's; else one for every four cores, at
    most four. On a 16-core host 4 streams read a 280 MB file in 33-40 ms against 61-82 ms on
    one, and on two cores one is the fastest. On CUDA the tensors read on CPU streams reach the
    GPU only when first used, in the first engine call: on an H100 with the 1B shape (an
    8,477-token turn after a restart, two runs each) one stream gave a TTFT of 92 ms (the read 55
    ms, that call 18 ms) against 97 ms on four (41 ms, 37 ms)."""
    if READ_STREAMS is not None:
        return READ_STREAMS
    from .mlx_ext import cuda

    return 1 if cuda.on_cuda() else max(1, min(4, (os.cpu_count() or 1) // 4))


def read_caches(path: Path) -> list[Any]:
    """The caches in a file, read now: what mlx-lm's load_prompt_cache returns, its tensors
    read on read_streams() streams at once (the default one and CPU streams). The caller has
    checked its classes (CLASSES)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as mlx_cache

    ways = read_streams()
    mine: list[Any] = getattr(_streams, "list", None) or []
    if len(mine) < ways - 1:
        mine += [mx.new_stream(mx.cpu) for _ in range(ways - 1 - len(mine))]
        _streams.list = mine
    loaded: Any = mx.load(str(path), return_metadata=True)
    arrays: dict[str, Any] = loaded[0]
    meta: dict[str, Any] = loaded[1]
    names = sorted(arrays)
    for i, stream in enumerate(mine[: ways - 1], 1):
        other: Any = mx.load(str(path), stream=stream)
        for n in names[i::ways]:
            arrays[n] = other[n]
    mx.eval(list(arrays.values()))
    _, classes, scalars = tree_unflatten(list(meta.items()))
    for pos, kind in scalars[1:]:
        if kind == "scalar":
            arrays[pos] = arrays[pos].item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in arrays[pos].tolist())
        elif kind == "none":
            arrays[pos] = None
        else:
            raise ValueError(f"a state of unknown type {kind!r}")
    states = tree_unflatten(list(arrays.items()))
    return [getattr(mlx_cache, c).from_state(st) for c, st in zip(classes, states, strict=True)]


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """A safetensors file's header (JSON), where its data starts and the size the file must
    have; ValueError if the header can't be parsed."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ValueError(f"a header of {n} bytes")
        text = f.read(n)
    if len(text) < n:
        raise ValueError("the header is cut short")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end = 0
    for name, t in header.items():
        if name != "__metadata__":
            end = max(end, int(t["data_offsets"][1]))
    return header, 8 + n, 8 + n + end


class DiskCache:
    """One model's prompt-cache files in `folder`, at most `budget` bytes. `model_id` and
    `settings` say whose files are this model's (others are removed)."""

    def __init__(self, folder: Path, budget: int, model_id: str, settings: str) -> None:
        self.folder = folder
        self.budget = budget
        self.namespace = f"{FORMAT};{model_id};{settings}"
        self.model_id = model_id
        self.settings = settings
        self._index: OrderedDict[str, DiskEntry] = OrderedDict()  # oldest use first
        self.nbytes = 0
        self.removed = 0  # files removed as torn, foreign or corrupted
        self.written = 0
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the files hold users' prompts
        self._scan()

    def __len__(self) -> int:
        return len(self._index)

    # -- the index
    def key(self, tokens: bytes) -> str:
        return hashlib.sha256(self.namespace.encode() + b"\0" + tokens).hexdigest()[:40]

    def _scan(self) -> None:
        found: list[tuple[float, DiskEntry]] = []
        for path in self.folder.iterdir():
            if path.name.startswith(TMP_PREFIX):  # a write that never finished
                self._remove(path, "an unfinished write")
                continue
            if not path.name.endswith(SUFFIX) or not path.is_file():
                continue
            try:
                entry, why = self._entry_of(path)
                mtime = path.stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError) as exc:
                entry, why, mtime = None, f"unreadable header ({exc})", 0.0
            if entry is None:
                self._remove(path, why)
            else:
                found.append((mtime, entry))
        for _, entry in sorted(found, key=lambda t: t[0]):
            self._index[entry.key] = entry
            self.nbytes += entry.nbytes
        self._fit(0)

    def _entry_of(
        self, path: Path, parsed: Optional[tuple[dict[str, Any], int, int]] = None
    ) -> tuple[Optional[DiskEntry], str]:
        """The index entry of a file, or None and why it is not this model's or is broken;
        `parsed`: its read_header(), when the caller has it."""
        header, _, size = parsed or read_header(path)
        actual = path.stat().st_size
        if actual != size:
            return None, f"torn ({actual} bytes, its header says {size})"
        meta = header.get("__metadata__") or {}
        if meta.get("0.lmx_format") != FORMAT:
            return None, "not a prompt cache file of this format"
        if meta.get("0.lmx_model") != self.model_id:
            return None, "another model's"
        if meta.get("0.lmx_settings") != self.settings:
            return None, f"other settings ({meta.get('0.lmx_settings')})"
        classes = [v for k, v in meta.items() if k.startswith("1.")]
        if not classes or any(c not in CLASSES for c in classes):
            return None, f"unexpected cache classes {sorted(set(classes))}"
        raw = base64.b64decode(meta["0.lmx_tokens"], validate=True)
        if self.key(raw) != path.name[: -len(SUFFIX)]:
            return None, "its name does not match its tokens"
        tokens = np.frombuffer(raw, dtype="<i4")
        return DiskEntry(path.name[: -len(SUFFIX)], path, tokens, actual), ""

    def _remove(self, path: Path, why: str) -> None:
        log.warning("prompt cache file %s removed: %s", path, why)
        self.removed += 1
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def _drop(self, entry: DiskEntry) -> None:
        if self._index.pop(entry.key, None) is not None:
            self.nbytes -= entry.nbytes
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass

    def _fit(self, incoming: int) -> None:
        """Remove least recently used files until `incoming` more bytes fit the budget."""
        while self._index and self.nbytes + incoming > self.budget:
            _, entry = next(iter(self._index.items()))
            self._drop(entry)

    def has(self, tokens: list[int]) -> bool:
        return self.key(_token_bytes(tokens)) in self._index

    def recent(self) -> list[DiskEntry]:
        """The files, most recently used first."""
        return list(reversed(self._index.values()))

    # -- reading
    def best(self, prompt: list[int]) -> tuple[Optional[DiskEntry], int]:
        """The file sharing the longest prefix with `prompt`, and that prefix's length."""
        if not self._index or not prompt:
            return None, 0
        p = np.asarray(prompt, dtype=np.int64)
        best: Optional[DiskEntry] = None
        n_best = 0
        for e in self._index.values():
            n = min(len(e.tokens), len(p))
            if n <= n_best or e.tokens[0] != p[0]:
                continue
            eq = e.tokens[:n] == p[:n]
            k = n if bool(eq.all()) else int(eq.argmin())
            if k > n_best:
                best, n_best = e, k
        return best, n_best

    def load(self, entry: DiskEntry, touch: bool = True) -> Optional[list[Any]]:
        """The caches in `entry`'s file, checked against their digest; None (and the file
        removed) if it is torn, foreign or corrupted. `touch`: count it as used (a prompt needs
        it; not when read back at load)."""
        try:
            parsed = read_header(entry.path)  # the file may have changed since the scan
            again, why = self._entry_of(entry.path, parsed)
            if again is None:
                raise ValueError(why)
            # The digest is computed from the file in other threads while MLX reads it into
            # arrays here (30 and 80 ms for 280 MB on an H100's host, read on one stream); the
            # caches are handed out only once it matches.
            check = _checker.submit(_file_digest, entry.path, entry.tokens.tobytes(), parsed)
            cache = read_caches(entry.path)
            digest, expected = check.result()
            if digest != expected:
                raise ValueError("its contents do not match their digest")
            if any(c.offset > len(entry.tokens) for c in cache):
                raise ValueError("more cached positions than tokens")
        except FileNotFoundError:
            self._index.pop(entry.key, None)
            self.nbytes -= entry.nbytes
            return None
        except Exception as exc:  # a bad file is dropped, never loaded into a sequence
            self._index.pop(entry.key, None)
            self.nbytes -= entry.nbytes
            self._remove(entry.path, str(exc))
            return None
        if touch:
            self._index.move_to_end(entry.key)
            try:
                os.utime(entry.path)  # recency survives a restart
            except OSError:
                pass
        return list(cache)

    # -- writing
    def write(self, tokens: list[int], cache: list[Any]) -> bool:
        """Write one sequence's caches (unless already there, too big or of a kind the format
        can't hold); True if a file was written."""
        from mlx_lm.models.cache import save_prompt_cache

        raw = _token_bytes(tokens)
        key = self.key(raw)
        if key in self._index:
            return False
        small = compact(cache)
        if small is None:
            return False
        nbytes = sum(c.nbytes for c in small) + len(raw) * 2 + 4096
        if nbytes > self.budget:
            return False
        meta = {
            "lmx_format": FORMAT,
            "lmx_model": self.model_id,
            "lmx_settings": self.settings,
            "lmx_tokens": base64.b64encode(raw).decode(),
            "lmx_digest": _digest(raw, small),
        }
        arr = np.frombuffer(raw, dtype="<i4")
        # Files this one makes useless: strict prefixes of its tokens.
        for e in list(self._index.values()):
            if len(e.tokens) < len(arr) and np.array_equal(e.tokens, arr[: len(e.tokens)]):
                self._drop(e)
        self._fit(nbytes)
        final = self.folder / (key + SUFFIX)
        tmp = self.folder / f"{TMP_PREFIX}{key}-{os.getpid()}{SUFFIX}"
        try:
            save_prompt_cache(str(tmp), small, meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.folder)
        except OSError as exc:
            log.warning("prompt cache file %s not written: %s", final, exc)
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            return False
        size = final.stat().st_size
        self._index[key] = DiskEntry(key, final, arr, size)
        self.nbytes += size
        self.written += 1
        if self.nbytes > self.budget:  # the estimate was short: keep the budget all the same
            self._fit(0)
        return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every system opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskTier:
    """What the worker calls: a disk cache, the memory entries waiting to be written to it
    (spilled from memory, at most `pending_bytes` of them) and when to write them."""

    def __init__(self, disk: DiskCache, pending_bytes: int) -> None:
        self.disk = disk
        self.pending_bytes = pending_bytes
        self._pending: OrderedDict[tuple[int, ...], tuple[list[int], list[Any], int]] = (
            OrderedDict()
        )
        self._pending_nbytes = 0
        self._flushed_version: Optional[int] = None

    def spill(self, tokens: list[int], cache: list[Any], nbytes: int) -> None:
        """A memory entry was evicted: write it at the next idle time (the oldest spilled
        entries are dropped beyond `pending_bytes`, so spills can't hold memory unbounded)."""
        key = tuple(tokens)
        if key in self._pending or self.disk.has(tokens):
            return
        self._pending[key] = (list(tokens), cache, nbytes)
        self._pending_nbytes += nbytes
        while self._pending_nbytes > self.pending_bytes and self._pending:
            _, (_, _, n) = self._pending.popitem(last=False)
            self._pending_nbytes -= n

    def lookup(self, prompt: list[int], have: int) -> Optional[tuple[list[int], list[Any]]]:
        """A file's tokens and caches when it shares MARGIN_TOKENS or more prompt tokens than
        the `have` memory covers; None otherwise (or when the file was bad: it is gone)."""
        entry, common = self.disk.best(prompt)
        if entry is None or min(common, len(prompt) - 1) < have + MARGIN_TOKENS:
            return None
        cache = self.disk.load(entry)
        if cache is None:
            return None
        return [int(t) for t in entry.tokens], cache

    def preload(self, room: int, deadline: float) -> list[tuple[list[int], list[Any]]]:
        """The most recently used files' tokens and caches, newest first, as many as fit `room`
        bytes, reading none after `deadline` (perf_counter); a bad file is removed on the way,
        and the files' recency is left as it was (nothing asked for them yet)."""
        out: list[tuple[list[int], list[Any]]] = []
        for entry in self.disk.recent():
            if room <= 0 or time.perf_counter() >= deadline:
                break
            if entry.nbytes > room + entry.nbytes // 16:  # a file is its cache and a header
                continue
            cache = self.disk.load(entry, touch=False)
            if cache is None:
                continue
            n = sum(int(c.nbytes) for c in cache)
            if n > room:
                continue
            out.append(([int(t) for t in entry.tokens], cache))
            room -= n
        return out

    def write_some(
        self,
        memory: Callable[[], list[tuple[list[int], list[Any]]]],
        version: Optional[int],
        deadline: float,
        busy: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Write spilled entries, then the memory's (the most recent that fit), until done,
        `deadline` (perf_counter) or `busy()`; True when everything is on disk. `version`
        (the memory cache's insert count, None if unknown) skips a memory that has not
        changed."""
        while self._pending:
            if time.perf_counter() >= deadline or busy():
                return False
            _, (tokens, cache, n) = self._pending.popitem(last=False)
            self._pending_nbytes -= n
            self._write(tokens, cache)
        if version is not None and version == self._flushed_version:
            return True
        # The most recent entries that fit the budget, written oldest first: each write is the
        # disk's most recent, so an older one written later must not push a newer one out.
        chosen: list[tuple[list[int], list[Any]]] = []
        room = self.disk.budget
        for tokens, cache in memory():
            if self.disk.has(tokens):
                continue
            n = sum(int(c.nbytes) for c in cache)
            if n <= room:
                chosen.append((tokens, cache))
                room -= n
        for tokens, cache in reversed(chosen):
            if time.perf_counter() >= deadline or busy():
                return False
            self._write(tokens, cache)
        self._flushed_version = version
        return True

    def _write(self, tokens: list[int], cache: list[Any]) -> None:
        try:
            self.disk.write(tokens, cache)
        except Exception:  # a cache that can't be written is only not kept
            log.exception("prompt cache of %d tokens not written to disk", len(tokens))

    @property
    def idle_work(self) -> bool:
        return bool(self._pending)
