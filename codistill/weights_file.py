"""One safetensors weights file (an export, a group's final/): written atomically with its
digest, read back in one verified pass.

Writing: each tensor's memory straight into a temp file in safetensors' format, chunk by
chunk through an xxh3-64 digest (xxhash: ~10 GB/s on the development VM, GIL released; zlib's
CRC-32 ran at ~2.7 GB/s, sha256 at 181 MB/s), fsync, rename. Non-finite weights are refused before anything is written.
The digest catches a file truncated or replaced behind a reader's back; it does not defend
against a malicious peer (the metadata is not signed). Files recorded with the CRC-32 or the
sha256 of earlier versions are still read (``DIGESTS``).

Reading (``read_safetensors``): one buffer the size of the file (pinned host memory for a CUDA
student; a buffer of a consumed export reused on CPU, ``ReadBuffers``). The header is read and
checked first - a pickle renamed .safetensors is refused by its first bytes, before any other
byte of it is read, and every tensor's offsets, size and dtype are checked against the file -
then the data, chunk by chunk: while a chunk is still in the CPU's cache it goes through the
digest and its floating-point elements through a NaN/Inf check. The tensors are views into the
buffer (no copy). Nothing here holds the GIL for long: safetensors' own ``load`` of a bytes
object holds it for the whole parse (~1.4 s per GiB measured), stalling the training thread
beside the loader.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from codistill.files import atomic_write

MAX_HEADER = 100 * 1024 * 1024
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class ExportError(Exception):
    """An export that must not be used (missing, partial, corrupt, hostile or mismatched)."""


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
            for piece in (struct.pack("<Q", len(raw)), raw, *(_bytes(v) for _, v in items)):
                for i in range(0, len(piece), chunk):
                    part = piece[i:i + chunk]
                    h.update(part)
                    while part:
                        part = part[f.write(part):]

    atomic_write(path, fill)
    return {"weights_bytes": 8 + len(raw) + off, "weights_xxh3_64": h.hexdigest()}


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
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


def _parse_header(raw: bytes, data_start: int, size: int, where: str) -> list[tuple]:
    """(name, dtype, shape, start, end) of every tensor, offsets from the file's start, each
    checked to lie inside the file and to be the size its dtype and shape make."""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{where}: not a valid safetensors file (header: {e})") from None
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
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{where}: not a valid safetensors file (tensor {name!r}: {e})") from None
        entries.append((name, dtype, shape, data_start + start, data_start + end))
    return entries


def _views(buf: torch.Tensor, entries: list[tuple]) -> dict[str, torch.Tensor]:
    return {name: buf[s:e].view(dtype).view(shape) for name, dtype, shape, s, e in entries}


def parse_safetensors(buf: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``buf`` (uint8), as views into it (no copy).
    Every offset, size and dtype is checked against the buffer; nothing is unpickled."""
    n = _header_len(bytes(buf[:16].numpy()), buf.numel(), where)
    return _views(buf, _parse_header(bytes(buf[8:8 + n].numpy()), 8 + n, buf.numel(), where))


# ---- reading ------------------------------------------------------------------------------
class ReadBuffers:
    """Host buffers of consumed exports, reused by the next read: a fresh buffer costs a page
    fault per 4 KiB on first touch (a read into one ran at ~0.7x the speed of a read into a
    buffer touched before, measured here). The trainer hands an export back (``give``) once it
    has copied it into a teacher; at most ``keep`` idle buffers are kept (one per peer: the
    loader holds one ready export per peer anyway, so the peak is unchanged).
    Pinned buffers (a CUDA student) are not kept here: torch's caching host allocator already
    reuses them, and only it knows when the non-blocking copies out of one have finished."""

    def __init__(self, keep: int):
        self.keep, self._free, self._lock = keep, [], threading.Lock()

    def take(self, nbytes: int, pin_memory: bool) -> torch.Tensor:
        if not pin_memory:
            with self._lock:
                fits = [b for b in self._free if b.numel() >= nbytes]
                if fits:
                    best = min(fits, key=torch.Tensor.numel)
                    self._free.remove(best)
                    return best
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)

    def give(self, export) -> None:
        """Take back the buffer of ``export`` (an Export), which must not be used after this:
        its tensors are views into the buffer."""
        buf, export.buffer, export.state_dict = export.buffer, None, {}
        if buf is not None and not buf.is_pinned() and self.keep > 0:
            with self._lock:
                self._free = (self._free + [buf])[-self.keep:]


@dataclass
class WeightsRead:
    tensors: dict[str, torch.Tensor]  # views into ``buffer``
    buffer: torch.Tensor              # the whole buffer (ReadBuffers.give takes it back)
    nbytes: int                       # bytes read (fewer than the file's if it shrank meanwhile)
    digests: dict                     # metadata field -> value, for the fields asked for
    nonfinite: list[str]              # floating-point tensors holding NaN/Inf


def read_safetensors(path: Path, digest_keys=(), pin_memory: bool = False, buffers: ReadBuffers | None = None,
                     expect_size: int | None = None, chunk: int = 16 << 20) -> WeightsRead:
    """Read and check a safetensors file in one pass (see the module docstring). Raises
    ExportError for anything that is not a well-formed safetensors file or (``expect_size``)
    not the size its metadata records; a file that changed while being read shows in
    ``nbytes`` and ``digests``, NaN/Inf in ``nonfinite``."""
    where = str(path)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if expect_size is not None and size != expect_size:
            _header_len(f.read(16), size, where)  # a pickle is named as such
            raise ExportError(f"{where}: size or checksum does not match its metadata "
                              f"({size} bytes, not {expect_size}: truncated, or replaced while being read)")
        base = buffers.take(size, pin_memory) if buffers else torch.empty(size, dtype=torch.uint8,
                                                                            pin_memory=pin_memory)
        view = memoryview(base.numpy())
        k = _read_into(f, view, 0, min(size, 16))
        start = 8 + _header_len(view[:k], size, where)
        k = _read_into(f, view, k, start)
        entries = _parse_header(bytes(view[8:start]), start, size, where)
        scan = _FiniteScan(base, entries)
        hashes = {key: DIGESTS[key][0]() for key in digest_keys}
        for h in hashes.values():
            h.update(view[:k])
        ahead = 0
        while k < size:
            if k >= ahead - 2 * chunk:  # ask the kernel for the next stretch while this one is checked
                os.posix_fadvise(f.fileno(), ahead, 8 * chunk, os.POSIX_FADV_WILLNEED)
                ahead = max(ahead, k) + 8 * chunk
            r = f.readinto(view[k:k + chunk])
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


def _read_into(f, view: memoryview, k: int, end: int) -> int:
    while k < end and (r := f.readinto(view[k:end])):
        k += r
    return k


class _FiniteScan:
    """The NaN/Inf check of a file's floating-point tensors, fed how many bytes have been read:
    every element is checked once, while its bytes are still in the CPU's cache (one fused
    min/max per piece: NaN and Inf propagate through both)."""

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
                if not bool(torch.isfinite(lo) & torch.isfinite(top)) and name not in self.bad:
                    self.bad.append(name)
                self.done = end
            if end < e:
                return
            self.i += 1
