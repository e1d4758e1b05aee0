"""Teacher exports: how a group publishes its weights and how a peer reads them safely - the
export directory (step files, metadata, LATEST) and, below, the one safetensors weights file.

Layout under ``run_dir/group_{i}/exports/``:
    step_000500.safetensors   weights only (safetensors: never pickle)
    step_000500.json          metadata: group, step, tokens seen, model config + hash,
                              tokenizer hash, time, size and xxh3-64 digest of the weights file
    LATEST                    the name ("step_000500") of the newest complete export

Writers: temp file in the same directory -> fsync -> os.replace, weights first, then the
metadata, then LATEST, then fsync of the directory. A reader that follows LATEST therefore
only ever sees complete files; the size and digest in the metadata catch a file replaced or
truncated behind the reader's back. How one weights file is written and read back in one
verified pass (digest, header, NaN/Inf): the section below.
A writer that fails (disk full) removes its half-written export and raises OSError; LATEST
still names the previous export. Temp files of a writer killed mid-write are ignored by
readers and removed by clean_temp_files when the writer starts again.
Readers: refuse anything that is not a well-formed safetensors file (a pickle renamed
.safetensors is rejected by its header before any byte of it is interpreted), a LATEST that
names anything but a plain export name in the same directory, metadata that does not match
the student's model config or tokenizer, and non-finite weights.

A peer may be hostile or broken, so every file of it is opened with fileio.py
``open_regular`` / ``read_bounded`` (regular files only, never through a symlink, a FIFO or a
device; every read bounded: LATEST ``MAX_LATEST`` bytes, metadata ``MAX_META``, weights the
size the metadata records, which must be the size the header's tensors tile exactly) and every
problem, whatever its kind (deeply nested JSON, a field of the wrong type, a directory where a
file should be), is an ExportError naming the file.

The step an export claims is bounded (``check_meta``): the file's name and the metadata agree
(in sync mode that is the step the reader's own schedule asks for, so a peer cannot claim any
other), 0 <= step <= ``MAX_STEP`` (10^9: ~30 years at one step a second; a step of 10^12 would
never become stale), and a caller that knows a bound passes ``max_step`` (e.g. its own step plus
the lead a peer may have; the teacher loader passes the run's --max_steps, which no group of the
run can pass), and a step is not plausible after fewer tokens than steps (``tokens_seen`` >=
step). ``tokens_seen`` and ``weights_bytes`` are non-negative integers, the
latter at most MAX_WEIGHTS.

The weights file (one safetensors file: an export's, a group's final/)
-----------------------------------------------------------------------
One safetensors weights file (an export, a group's final/): written atomically with its
digest, read back in one verified pass.

Writing: each tensor's memory straight into a temp file in safetensors' format, chunk by
chunk through an xxh3-64 digest (a tensor on a GPU is copied to host memory one tensor at a
time, so a GPU export needs one tensor's bytes of host memory beside the file's pages; a tensor
on the meta device has no data and is refused, naming it) (xxhash: ~10 GB/s on the development VM, GIL released; zlib's
CRC-32 ran at ~2.7 GB/s, sha256 at 181 MB/s), fsync, rename. Non-finite weights are refused before anything is written.
The digest catches a file truncated or replaced behind a reader's back; it does not defend
against a malicious peer (the metadata is not signed). Files recorded with the CRC-32 or the
sha256 of earlier versions are still read (``DIGESTS``).

Reading (``read_safetensors``): the file is opened with fileio.py ``open_bounded``
(regular files only: a symlink, FIFO, device or directory is refused). The header is read and
checked first, into a buffer of its own size (at most ``MAX_HEADER``) - a pickle renamed
.safetensors is refused by its first bytes, before any other byte of it is read - and every
tensor's offsets, size and dtype are checked: the tensors must tile the data exactly, as
safetensors' own validation requires (no overlap, no gap, nothing after the last tensor: an
export padded with gigabytes of sparse zeros is refused before any buffer is allocated), no
F64 (1e300 is finite in F64 and +inf in the fp32 teacher), and with ``expect`` the names,
shapes and dtypes the model has, so the file's size is the one the model's shapes give. Only
then one buffer of exactly the file's size is taken (``ReadBuffers``: reused from a consumed
export; pinned for a CUDA student by registering exactly its bytes, not through torch's caching
host allocator, which rounds every pinned block up to a power of two and keeps it cached for
the life of the process), and the data is read, chunk by chunk: while a chunk is still in the CPU's cache it goes through the
digest and its floating-point elements through a NaN/Inf check. The tensors are views into the
buffer (no copy). Nothing here holds the GIL for long: safetensors' own ``load`` of a bytes
object holds it for the whole parse (~1.4 s per GiB measured), stalling the training thread
beside the loader.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import struct
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from codistill import faults
from fileio import ExportError, MissingFile, atomic_write, atomic_write_bytes, fsync_dir, open_bounded, read_bounded

# --- the weights file --------------------------------------------------------------------------------

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_WEIGHTS = 1 << 42           # 4 TiB: no file of weights is larger (a bound on what a metadata may claim)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# the floating-point dtypes weights are read in: a model's fp32 tensors, or bf16/fp16 under mixed
# precision. Never F64: its range exceeds the teacher's, so 1e300 passes a finiteness check and is +inf
# once the teacher holds it in fp32.
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
RANGE = torch.finfo(torch.bfloat16).max  # |value| a teacher in bf16 (or fp32) holds finite


# ---- writing ------------------------------------------------------------------------------
def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: its minimum and maximum are finite (NaN propagates through both);
    one fused reduction, ~8x faster on CPU than ``torch.isfinite(t).all()``."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def write_weights(path: Path, tensors: dict[str, torch.Tensor], step: int, chunk: int = 8 << 20) -> dict:
    """Write ``tensors`` (host tensors nobody else touches) as a safetensors file at ``path``
    (temp file, fsync, rename); returns what the metadata records of it (size, digest).
    Refuses non-finite weights (ExportError) before writing anything.

    The file is written here, not by safetensors' ``save_file``: that one first copies every
    tensor to bytes (holding the GIL, twice the memory), then the file is read back for its
    digest; here each tensor's own memory goes to the file in chunks, each chunk through the
    digest on its way (0.59x a plain write at 1 B parameters with save_file, measured in
    benchmarks/exchange_scale.py). The format is safetensors' (the tests read it back with
    safetensors): an 8-byte header length, the JSON header padded to 8 bytes, the data; tensors
    ordered by element size, largest first, so every offset is aligned to its dtype. Tied
    weights are written once per name."""
    for k, v in tensors.items():
        if v.device.type == "meta":
            raise ExportError(f"refusing to export step {step}: tensor {k} is on the meta device, so it has no "
                              "data (a module built under torch.device('meta') or not materialised yet)")
        if v.is_floating_point() and v.dtype not in FLOATS:
            raise ExportError(f"refusing to export step {step}: tensor {k} is {v.dtype}; weights are exported "
                              f"as one of {', '.join(map(str, FLOATS))} (readers refuse others)")
        if not all_finite(v):
            raise ExportError(f"refusing to export step {step}: tensor {k} has NaN/Inf values")
    names = {dtype: name for name, dtype in DTYPES.items()}
    items = sorted(((k, v.detach().contiguous()) for k, v in tensors.items()), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header, off = {"__metadata__": {"format": "pt", "step": str(step)}}, 0
    for k, v in items:
        n = v.numel() * v.element_size()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    h = xxhash.xxh3_64()

    def fill(tmp: Path) -> None:
        with open(tmp, "wb", buffering=0) as f:
            for piece in itertools.chain((struct.pack("<Q", len(raw)), raw), (_bytes(v) for _, v in items)):
                for i in range(0, len(piece), chunk):
                    part = piece[i:i + chunk]
                    h.update(part)
                    while part:
                        part = part[f.write(part):]

    atomic_write(path, fill)
    return {"weights_bytes": 8 + len(raw) + off, "weights_xxh3_64": h.hexdigest()}


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor: a CPU tensor's own memory (no copy); a tensor on another
    device (a CUDA student's weights, tests/scripts/teacher_parity.py) is copied to host memory
    first, one tensor at a time (``.numpy()`` exists for CPU tensors only)."""
    if t.device.type != "cpu":
        t = t.to("cpu")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Crc32:
    """zlib's CRC-32 with hashlib's update(): the digest of exports written before xxh3."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)


# metadata field -> (a new digest, its value as the metadata records it); writers record the first
DIGESTS = {"weights_xxh3_64": (xxhash.xxh3_64, lambda h: h.hexdigest()),
           "weights_crc32": (_Crc32, lambda h: h.value),
           "weights_sha256": (hashlib.sha256, lambda h: h.hexdigest())}


def file_digest(path: Path, chunk: int = 8 << 20) -> dict:
    """What metadata records of a weights file: ``weights_bytes`` and ``weights_xxh3_64``."""
    h, n = xxhash.xxh3_64(), 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while r := f.readinto(buf):
            h.update(view[:r])
            n += r
    return {"weights_bytes": n, "weights_xxh3_64": h.hexdigest()}


def digest_matches(meta: dict, nbytes: int, digests: dict) -> bool:
    """The size and the digest ``meta`` records match what was read (``digests``: field -> value,
    from read_safetensors(digest_keys=digest_fields(meta)))."""
    keys = digest_fields(meta)
    if not keys:
        return False
    size_ok = meta.get("weights_bytes", nbytes) == nbytes  # sha256-era metadata records no size
    return size_ok and all(digests.get(k) == meta[k] for k in keys)


def digest_fields(meta: dict) -> tuple[str, ...]:
    """The digest field the metadata records (the newest kind it has)."""
    return next(((k,) for k in DIGESTS if k in meta), ())


# ---- the header ---------------------------------------------------------------------------
def _header_len(prefix, size: int, where: str) -> int:
    """The header length a file of ``size`` bytes starting with ``prefix`` declares, checked.
    A safetensors file starts with an 8-byte little-endian header length followed by a JSON
    object; a pickle starts with 0x80 and a zip (torch.save) with 'PK'."""
    prefix = bytes(prefix)
    if size < 10 or len(prefix) < 10:
        raise ExportError(f"{where}: file too short to be safetensors ({size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n <= MAX_HEADER and 8 + n <= size and prefix[8:9] == b"{":
        return n  # a header length of 0x380 starts with 0x80 too: the safetensors reading goes first
    if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
        raise ExportError(f"{where}: this is a pickle / torch.save file, not safetensors; "
                          "peer exports are never unpickled - refusing it")
    raise ExportError(f"{where}: not a valid safetensors file (bad header)")


def _parse_header(raw: bytes, data_start: int, size: int, where: str, expect: dict | None = None) -> list[tuple]:
    """(name, dtype, shape, start, end) of every tensor, offsets from the file's start, each
    checked to be the size its dtype and shape make; together they must tile the data section
    exactly (``check_layout``), and match ``expect`` when given (``check_specs``)."""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ExportError(f"{where}: not a valid safetensors file (header: {type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{where}: not a valid safetensors file (header is not an object)")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
            start, end = int(start), int(end)
            if not (0 <= start <= end <= size - data_start) or end - start != math.prod(shape) * dtype.itemsize \
                    or min(shape, default=0) < 0:
                raise ValueError("offsets outside the file or not the tensor's size")
            if (data_start + start) % dtype.itemsize:
                raise ValueError(f"offset {start} is not aligned to its dtype")
            if dtype.is_floating_point and dtype not in FLOATS:
                raise ValueError(f"dtype {info['dtype']} (weights are F32, BF16 or F16: a wider float can hold "
                                 "values that overflow the teacher's)")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ExportError(f"{where}: not a valid safetensors file (tensor {name!r}: {e})") from None
        entries.append((name, dtype, shape, data_start + start, data_start + end))
    check_layout(entries, data_start, size, where)
    if expect is not None:
        check_specs({n: (tuple(shape), dtype) for n, dtype, shape, _, _ in entries}, expect, where)
    return entries


def check_layout(entries: list[tuple], data_start: int, size: int, where: str) -> None:
    """The tensors tile the data section: sorted by offset each starts where the previous one
    ended, the first at the data's start, the last at the file's end - safetensors' own rule
    (its Rust ``validate``: InvalidOffset / MetadataIncompleteBuffer). So no two names share
    bytes (an overlap would let one write show up in two tensors) and no byte of the file is
    outside a tensor (the file's size is what its header's shapes give)."""
    at = data_start
    for name, _, _, s, e in sorted(entries, key=lambda x: (x[3], x[4])):
        if s != at:
            raise ExportError(f"{where}: not a valid safetensors file (tensor {name!r} starts at byte {s - data_start} "
                              f"of the data, not {at - data_start}: " + ("it overlaps another tensor)" if s < at
                                                                        else "a gap before it)"))
        at = e
    if at != size:
        raise ExportError(f"{where}: not a valid safetensors file ({size - at} bytes after the last tensor: the "
                          "file is larger than its tensors; padded?)")


def check_specs(found: dict[str, tuple], expect: dict[str, tuple], where: str) -> None:
    """The tensors ``found`` (name -> (shape, dtype)) are those of the model, ``expect``: name ->
    shape, or name -> (shape, dtype) with the model's dtype - a floating one stands for any of
    FLOATS (fp32 on a CPU, bf16/fp16 under mixed precision), any other must be exactly it."""
    if set(found) != set(expect):
        missing, extra = sorted(set(expect) - set(found)), sorted(set(found) - set(expect))
        raise ExportError(f"{where}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, (shape, dtype) in found.items():
        want = expect[name]
        want_shape, want_dtype = (want[0], want[1]) if len(want) == 2 and isinstance(want[1], torch.dtype) \
            else (want, None)
        if tuple(shape) != tuple(want_shape):
            raise ExportError(f"{where}: tensor {name} has shape {tuple(shape)}, the model {tuple(want_shape)}")
        if want_dtype is not None and dtype != want_dtype and not (
                want_dtype.is_floating_point and dtype in FLOATS):
            raise ExportError(f"{where}: tensor {name} is {dtype}, the model's is {want_dtype}")


def _views(buf: torch.Tensor, entries: list[tuple]) -> dict[str, torch.Tensor]:
    return {name: buf[s:e].view(dtype).view(shape) for name, dtype, shape, s, e in entries}


def parse_safetensors(buf: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``buf`` (uint8), as views into it (no copy).
    Every offset, size and dtype is checked against the buffer; nothing is unpickled."""
    n = _header_len(bytes(buf[:16].numpy()), buf.numel(), where)
    return _views(buf, _parse_header(bytes(buf[8:8 + n].numpy()), 8 + n, buf.numel(), where))


# ---- reading ------------------------------------------------------------------------------
class CudaPinning:
    """Pin exactly a host buffer's bytes (``cudaHostRegister``, the way torch's own distributed
    checkpoint stager pins its buffers: torch/cuda/_pin_memory_utils.py ``pin_memory`` /
    ``unpin_memory``, used by torch/distributed/_state_dict_utils.py ``_create_cpu_state_dict``
    with a weakref.finalize to unpin). ``torch.empty(n, pin_memory=True)`` instead goes through
    the CachingHostAllocator, which rounds each block up to the next power of two and keeps freed
    blocks cached (2.5 GB -> 4 GiB pinned, never given back). ``fence`` marks the copies queued
    from a buffer so far (a CUDA event on the current stream); a buffer is read into again or
    unpinned only after its fence completed.

    ``device``: the rank's CUDA ordinal, made current around every registration. Pins happen on
    the loader's reader threads and unpins wherever a buffer's last reference drops; CUDA's
    current device is per host thread and starts at 0 in a new one, so without it every rank's
    first pin would create a context on GPU 0 (hundreds of MiB there per rank, where the ranks
    see every GPU of the node) - the reason torch's DataLoader pin thread calls set_device first
    (torch/utils/data/_utils/pin_memory.py _pin_memory_loop)."""

    def __init__(self, device: int | None = None):
        self.device = device

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext()

    def pin(self, buf: torch.Tensor) -> None:
        from torch.cuda import _pin_memory_utils
        with self._on_device():
            _pin_memory_utils.pin_memory(buf.data_ptr(), buf.numel())

    def unpin(self, ptr: int) -> None:
        from torch.cuda import _pin_memory_utils
        with self._on_device():
            _pin_memory_utils.unpin_memory(ptr)

    def fence(self):
        ev = torch.cuda.Event()
        ev.record()
        return ev


def pinned_copies(tensors: list[tuple[torch.Tensor, torch.dtype]], pinning: CudaPinning,
                  align: int = 512) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Host copies of ``tensors`` (each cast to its dtype) as views into one host block of exactly
    their bytes (each start ``align``-ed), pinned once by ``pinning`` and unpinned when the block's
    last reference is gone: keep the returned block referenced for as long as the views are used
    (``param.data = view`` does not hold it). Per-tensor ``pin_memory()`` instead rounds each tensor
    up to a power of two in torch's CachingHostAllocator (a 2^k + 1-byte tensor pins 2^(k+1)) and
    caches the blocks after they are freed (an offloaded teacher's host weights)."""
    spans, total = [], 0
    for t, dtype in tensors:
        total = -(-total // align) * align
        spans.append((total, t.numel() * dtype.itemsize))
        total += spans[-1][1]
    block = torch.empty(max(total, 1), dtype=torch.uint8)
    pinning.pin(block)
    weakref.finalize(block, pinning.unpin, block.data_ptr())
    views = []
    for (t, dtype), (start, n) in zip(tensors, spans):
        v = block[start:start + n].view(dtype).view(t.shape)
        v.copy_(t)
        views.append(v)
    return views, block


class ReadBuffers:
    """Host buffers for reading exports, sized exactly, reused, released.

    A buffer is exactly the file's size (reused for a file up to ``SLACK`` bytes smaller: one
    peer's exports differ only by their header's few bytes). A fresh buffer costs a page fault
    per 4 KiB on first touch (a read into one ran at ~0.7x the speed of a read into a buffer
    touched before, measured here), so the trainer hands an export back (``give``) once it has
    copied it into a teacher, and the next read takes it; at most ``keep`` idle buffers are kept
    (one per peer: the loader holds one ready export per peer anyway, so the peak is unchanged),
    the others are freed. Pinned buffers (a CUDA student, ``pin_memory``) are pinned by
    ``pinning`` (CudaPinning: exactly their bytes) and unpinned when freed, after the copies
    queued from them completed; ``pinned_bytes`` is what is pinned now."""

    SLACK = 4096

    def __init__(self, keep: int, pinning=None):
        # re-entrant: a buffer dropped under the lock runs _unpin (its finalizer) right there
        self.keep, self._free, self._lock = keep, [], threading.RLock()
        self.pinning = pinning or CudaPinning()
        self._pinned: dict[int, tuple[int, list]] = {}  # data_ptr -> (bytes, [fence of its last use])
        self.pinned_bytes = 0

    def take(self, nbytes: int, pin_memory: bool) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self._free if (b.data_ptr() in self._pinned) == pin_memory
                    and nbytes <= b.numel() <= nbytes + self.SLACK]
            if fits:
                best = min(fits, key=torch.Tensor.numel)
                self._free = [b for b in self._free if b is not best]
                fence = self._pinned.get(best.data_ptr(), (0, [None]))[1]
        if fits:
            if fence[0] is not None:  # the copies out of its last export are done before it is overwritten
                fence[0].synchronize()
                fence[0] = None
            return best
        try:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        except (RuntimeError, MemoryError) as e:
            raise ExportError(f"cannot allocate {nbytes} bytes of host memory to read it ({e})") from None
        if pin_memory:
            self.pinning.pin(buf)
            ptr = buf.data_ptr()
            with self._lock:
                self._pinned[ptr] = (nbytes, [None])
                self.pinned_bytes += nbytes
            weakref.finalize(buf, self._unpin, ptr)  # when the buffer and every view into it are gone
        return buf

    def _unpin(self, ptr: int) -> None:
        with self._lock:
            nbytes, fence = self._pinned.pop(ptr)
            self.pinned_bytes -= nbytes
        if fence[0] is not None:
            fence[0].synchronize()
        self.pinning.unpin(ptr)

    def give(self, export) -> None:
        """Take back the buffer of ``export`` (an Export), which must not be used after this:
        its tensors are views into the buffer. Called after the copies out of it were queued."""
        buf, export.buffer, export.state_dict = export.buffer, None, {}
        if buf is None:
            return
        with self._lock:
            pinned = self._pinned.get(buf.data_ptr())
        if pinned is not None:
            pinned[1][0] = self.pinning.fence()
        if self.keep > 0:
            with self._lock:
                self._free = (self._free + [buf])[-self.keep:]


@dataclass
class WeightsRead:
    tensors: dict[str, torch.Tensor]  # views into ``buffer``
    buffer: torch.Tensor              # the whole buffer (ReadBuffers.give takes it back)
    nbytes: int                       # bytes read (fewer than the file's if it shrank meanwhile)
    digests: dict                     # metadata field -> value, for the fields asked for
    nonfinite: list[str]              # floating-point tensors holding NaN/Inf (or beyond bf16's range)


def read_safetensors(path: Path, digest_keys=(), pin_memory: bool = False, buffers: ReadBuffers | None = None,
                     expect_size: int | None = None, expect: dict | None = None,
                     chunk: int = 16 << 20) -> WeightsRead:
    """Read and check a safetensors file in one pass (see the module docstring). Raises
    ExportError for anything that is not a regular, well-formed safetensors file, (``expect_size``)
    not the size its metadata records, or (``expect``: name -> shape or (shape, dtype)) not the
    model's tensors; a file that changed while being read shows in ``nbytes`` and ``digests``,
    NaN/Inf in ``nonfinite``."""
    where = str(path)
    with open_bounded(path, MAX_WEIGHTS, "weights file") as (f, size):
        if expect_size is not None and size != expect_size:
            _header_len(f.read(16), size, where)  # a pickle is named as such
            raise ExportError(f"{where}: size or checksum does not match its metadata "
                              f"({size} bytes, not {expect_size}: truncated, or replaced while being read)")
        prefix = f.read(16)
        start = 8 + _header_len(prefix, size, where)
        head = bytearray(prefix[:start])
        while len(head) < start and (b := f.read(start - len(head))):
            head += b
        if len(head) < start:
            raise ExportError(f"{where}: not a valid safetensors file (shrank while its header was read)")
        entries = _parse_header(bytes(head[8:]), start, size, where, expect)
        base = (buffers or ReadBuffers(keep=0)).take(size, pin_memory)
        view = memoryview(base.numpy())
        view[:start] = head
        k = start
        scan = _FiniteScan(base, entries)
        hashes = {key: DIGESTS[key][0]() for key in digest_keys}
        for h in hashes.values():
            h.update(view[:k])
        ahead = 0
        while k < size:
            if k >= ahead - 2 * chunk:  # ask the kernel for the next stretch while this one is checked
                os.posix_fadvise(f.fileno(), ahead, 8 * chunk, os.POSIX_FADV_WILLNEED)
                ahead = max(ahead, k) + 8 * chunk
            r = f.readinto(view[k:min(k + chunk, size)])
            if not r:
                break
            for h in hashes.values():
                h.update(view[k:k + r])
            k += r
            scan.advance(k)
    if k < size:  # the file shrank while being read: the tensors past k do not exist
        entries = [e for e in entries if e[4] <= k]
    return WeightsRead(_views(base, entries), base, k, {key: DIGESTS[key][1](h) for key, h in hashes.items()},
                       scan.bad)


class _FiniteScan:
    """The NaN/Inf check of a file's floating-point tensors, fed how many bytes have been read:
    every element is checked once, while its bytes are still in the CPU's cache (one fused
    min/max per piece: NaN and Inf propagate through both). Values beyond bf16's range
    (``RANGE``) count as non-finite too: an fp32 export holding 3.4e38 is +inf in a bf16 teacher."""

    def __init__(self, buf: torch.Tensor, entries: list):
        self.buf, self.bad, self.i, self.done = buf, [], 0, 0
        self.todo = sorted((s, e, dtype, name) for name, dtype, _, s, e in entries if dtype.is_floating_point and e > s)

    def advance(self, hi: int) -> None:
        while self.i < len(self.todo) and self.todo[self.i][0] < hi:
            s, e, dtype, name = self.todo[self.i]
            end = e if e <= hi else s + (hi - s) // dtype.itemsize * dtype.itemsize
            start = max(s, self.done)
            if end > start:
                lo, top = torch.aminmax(self.buf[start:end].view(dtype))
                ok = torch.isfinite(lo) & torch.isfinite(top) & (lo >= -RANGE) & (top <= RANGE)
                if not bool(ok) and name not in self.bad:
                    self.bad.append(name)
                self.done = end
            if end < e:
                return
            self.i += 1


# --- the export directory ----------------------------------------------------------------------------

EXPORT_NAME = re.compile(r"^step_(\d{6,})$")
MAX_LATEST = 64          # bytes of a LATEST file ("step_000500")
MAX_META = 4 << 20       # bytes of an export's metadata (a transformers config is a few KiB)
MAX_STEP = 10 ** 9       # no run takes more optimizer steps


def export_name(step: int) -> str:
    return f"step_{step:06d}"


def write_export(exports_dir: Path, step: int, state_dict: dict[str, torch.Tensor], meta: dict,
                 keep: int = 3) -> Path:
    """Publish weights for ``step``; returns the path of the weights file. ``state_dict``: host
    tensors the caller no longer modifies (this may run on a background thread)."""
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    name = export_name(step)
    tensors = {k: v.detach() for k, v in state_dict.items()}
    try:
        info = write_weights(exports_dir / f"{name}.safetensors", tensors, step)
        meta = dict(meta, step=step, weights=f"{name}.safetensors", time=time.time(), **info)
        faults.oserror("export_oserror", step)  # test-only hook: a disk full at the worst moment
        atomic_write_bytes(exports_dir / f"{name}.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        atomic_write_bytes(exports_dir / "LATEST", name.encode())
        fsync_dir(exports_dir)
    except OSError:
        # LATEST still names the previous export (it is written last); drop the half-written one
        if read_latest(exports_dir, missing_ok=True) != step:
            for suffix in (".json", ".safetensors"):
                try:
                    (exports_dir / f"{name}{suffix}").unlink()
                except OSError:
                    pass
        raise
    prune_exports(exports_dir, keep)
    return exports_dir / f"{name}.safetensors"


def clean_temp_files(exports_dir: Path) -> list[str]:
    """Remove what a writer killed mid-write left: temp files (``.NAME.tmp-PID-THREAD``) and the half
    of an export whose other half is missing (weights without metadata or the reverse).

    Readers never use them (they follow LATEST, list ``step_*.json`` and need both files); the
    writer calls this when it starts, since only one process writes a group's exports.
    """
    exports_dir = Path(exports_dir)
    try:
        latest = read_latest(exports_dir, missing_ok=True)
    except ExportError:  # a LATEST that is not a plain file naming an export: the next export replaces it
        latest = None
    doomed = [p for p in exports_dir.glob(".*.tmp-*")  # .NAME.tmp-PID[-THREAD]: not this process's own
              if p.name.split(".tmp-", 1)[1].split("-")[0] != str(os.getpid())]
    for p in [*exports_dir.glob("step_*.safetensors"), *exports_dir.glob("step_*.json")]:
        m = EXPORT_NAME.match(p.stem)
        other = p.with_suffix(".json" if p.suffix == ".safetensors" else ".safetensors")
        if m and int(m.group(1)) != latest and not other.exists():
            doomed.append(p)
    removed = []
    for p in doomed:
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


def list_exports(exports_dir: Path) -> list[int]:
    steps = []
    for p in Path(exports_dir).glob("step_*.json"):
        m = EXPORT_NAME.match(p.stem)
        if m and (p.with_suffix(".safetensors")).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def prune_exports(exports_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` exports; never the one LATEST names."""
    latest = read_latest(exports_dir, missing_ok=True)
    for step in list_exports(exports_dir)[:-keep] if keep > 0 else []:
        if step == latest:
            continue
        for suffix in (".json", ".safetensors"):  # metadata first: readers list by .json
            try:
                (Path(exports_dir) / f"{export_name(step)}{suffix}").unlink()
            except FileNotFoundError:
                pass


def read_latest(exports_dir: Path, missing_ok: bool = False) -> int | None:
    """The step LATEST names, validated to be a plain export name (no paths)."""
    path = Path(exports_dir) / "LATEST"
    try:
        raw = read_bounded(path, MAX_LATEST, "LATEST").decode("ascii", errors="replace").strip()
    except MissingFile:
        if missing_ok:
            return None
        raise ExportError(f"{path} does not exist (the peer has not exported yet)") from None
    m = EXPORT_NAME.match(raw)
    if not m:
        shown = repr(raw[:24]) + ("..." if len(raw) > 24 else "")  # never echo a file's contents at length
        raise ExportError(f"{path} names {shown}, which is not an export name like 'step_000500' "
                          "(paths and other files are refused)")
    return int(m.group(1))


@dataclass
class Export:
    step: int
    meta: dict
    state_dict: dict[str, torch.Tensor]
    buffer: torch.Tensor | None = None  # what the tensors are views into (ReadBuffers.give takes it back)


def read_export(exports_dir: Path, step: int, expect_config_hash: str | None = None,
                expect_tokenizer: str | None = None, pin_memory: bool = False,
                buffers: ReadBuffers | None = None, expect: dict | None = None,
                max_step: int | None = None) -> Export:
    """Read and validate one export into CPU memory. Raises ExportError on any problem."""
    exports_dir = Path(exports_dir)
    name = export_name(step)
    return read_weights(exports_dir / f"{name}.json", exports_dir / f"{name}.safetensors", step,
                        expect_config_hash, expect_tokenizer, missing=f"export {name} in {exports_dir} is missing",
                        pin_memory=pin_memory, buffers=buffers, expect=expect, max_step=max_step)


def read_meta(meta_path: Path, step: int | None = None, max_step: int | None = None) -> dict:
    """The metadata JSON of an export or final/, bounded (``MAX_META``) and checked (``check_meta``)."""
    try:
        meta = json.loads(read_bounded(meta_path, MAX_META, "metadata file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_path}: metadata is not valid JSON ({e})") from None
    except RecursionError:
        raise ExportError(f"{meta_path}: metadata is not valid JSON (nested too deeply)") from None
    check_meta(meta, meta_path, step, max_step)
    return meta


def check_meta(meta, where, step: int | None = None, max_step: int | None = None) -> None:
    """The fields a reader relies on have plausible values (see the module docstring)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(meta, dict) or not count(meta.get("step")) or (step is not None and meta["step"] != step):
        raise ExportError(f"{where}: metadata does not describe step {step if step is not None else '<int>'}")
    bound = MAX_STEP if max_step is None else min(MAX_STEP, max_step)
    if meta["step"] > bound:
        raise ExportError(f"{where}: claims step {meta['step']}, more than any this run can have reached "
                          f"({bound}); refusing it (a step that high would never become stale)")
    for key, top in (("weights_bytes", MAX_WEIGHTS), ("tokens_seen", None)):
        v = meta.get(key)
        if v is not None and (not count(v) or (top is not None and v > top)):
            raise ExportError(f"{where}: metadata field {key} is {str(v)[:40]!r}, not a byte/token count"
                              + (f" up to {top}" if top else ""))
    if meta.get("tokens_seen") is not None and meta["tokens_seen"] < meta["step"]:
        raise ExportError(f"{where}: claims step {meta['step']} after only {meta['tokens_seen']} tokens (every step "
                          f"trains on at least one): its metadata contradicts itself; refusing it")


def read_weights(meta_path: Path, weights_path: Path, step: int | None, expect_config_hash: str | None = None,
                 expect_tokenizer: str | None = None, missing: str = "missing", pin_memory: bool = False,
                 buffers: ReadBuffers | None = None, expect: dict | None = None,
                 max_step: int | None = None) -> Export:
    """Validate a (metadata JSON, safetensors) pair - an export, or a group's final/ - and load it.

    ``step`` None accepts whatever step the metadata names; ``expect`` (name -> shape or (shape,
    dtype)) the model's tensors, checked on the header before the data is read - or a function of
    the metadata giving them (a teacher of the model the export declares: --peer_models any; it
    raises ExportError for a declared model it refuses). The metadata is checked first (its model
    config and tokenizer), so a mismatched export is refused unread.
    """
    try:
        meta = read_meta(meta_path, step, max_step)
    except MissingFile:
        raise ExportError(f"{missing} ({meta_path})") from None
    step = meta["step"]
    check_compatible(meta, weights_path, expect_config_hash, expect_tokenizer)
    if callable(expect):
        expect = expect(meta, str(weights_path))
    try:
        got = read_safetensors(weights_path, digest_fields(meta), pin_memory, buffers, meta.get("weights_bytes"),
                               expect)
    except MissingFile:
        raise ExportError(f"{missing} ({weights_path})") from None
    if not digest_matches(meta, got.nbytes, got.digests):
        raise ExportError(f"{weights_path}: size or checksum does not match its metadata "
                          "(truncated, or replaced while being read)")
    if got.nonfinite:
        raise ExportError(f"step {step}: tensor {got.nonfinite[0]} has NaN/Inf values (a diverged peer?)")
    return Export(step=step, meta=meta, state_dict=got.tensors, buffer=got.buffer)


def check_compatible(meta: dict, weights_path: Path, expect_config_hash: str | None,
                     expect_tokenizer: str | None) -> None:
    """The teacher's model config and tokenizer are the student's (when given)."""
    if expect_config_hash is not None and meta.get("model_config_hash") != expect_config_hash:
        raise ExportError(
            f"{weights_path}: the teacher's model config differs from this student's "
            f"(teacher {meta.get('model_config_hash')} = {meta.get('model_config')}, "
            f"student {expect_config_hash}); teacher and student must have the same model, or pass "
            "--peer_models any to distill from another model on the same tokenizer")
    if expect_tokenizer is not None and meta.get("tokenizer_sha256") != expect_tokenizer:
        raise ExportError(f"{weights_path}: the teacher used another tokenizer "
                          f"(teacher {meta.get('tokenizer_sha256')}, student {expect_tokenizer})")


def read_final(final_dir: Path, expect_config_hash: str | None = None, expect_tokenizer: str | None = None,
               where: str | None = None) -> Export:
    """A group's final/ (model.safetensors + meta.json), validated like an export; the one reader
    of final/ weights (--teacher, recipes/evaluate.py)."""
    final_dir = Path(final_dir)
    where = where or str(final_dir)
    weights, meta = final_dir / "model.safetensors", final_dir / "meta.json"
    if not weights.is_file():
        raise ExportError(f"{where}: has no model.safetensors (the run has not finished?)")
    if not meta.is_file():
        read_safetensors(weights)  # a pickle is named as such
        raise ExportError(f"{where}: has no meta.json (written by this repository's trainer since offline "
                          "distillation was added); use one of the run's exports instead")
    return read_weights(meta, weights, None, expect_config_hash, expect_tokenizer,
                        missing=f"{where}: incomplete final/ directory")
