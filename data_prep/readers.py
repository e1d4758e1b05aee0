"""Streaming readers for the supported input formats.

Formats are chosen by file name (case-insensitive; a trailing ``.gz`` means gzip):

  ``.txt`` ``.text``           plain text; ``text_mode``: ``blank_line`` (documents separated by
                               blank lines, default), ``line`` (one per line), ``file`` (one per file)
  ``.jsonl`` ``.ndjson``       JSON Lines, one object per line with a string field ``jsonl_field``
  ``.warc.wet`` ``.wet``       Common Crawl WET (warcio); one document per ``conversion`` record
  ``.parquet`` ``.json``       loaded with ``datasets`` (streaming=True), field ``jsonl_field``

Directories are walked recursively in sorted order. Nothing here raises on bad input: every
skipped file or record is counted in ``Stats.dropped`` under a reason (see clean.py), and
the reader keeps going. Memory is bounded by ``max_doc_bytes`` per document.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("data_prep")

DEFAULT_MAX_DOC_BYTES = 8 << 20
TEXT_MODES = ("blank_line", "line", "file")
_BINARY_PROBE = 8192
MAX_FILE_WARNINGS = 20


@dataclass
class Stats:
    dropped: collections.Counter = field(default_factory=collections.Counter)
    documents_in: int = 0
    sources: list = field(default_factory=list)

    def drop_doc(self, reason: str) -> None:
        self.documents_in += 1
        self.dropped[reason] += 1

    files_warned: int = 0

    def drop_file(self, reason: str, path, detail: str = "") -> None:
        self.dropped[reason] += 1
        self.files_warned += 1
        if self.files_warned <= MAX_FILE_WARNINGS:
            log.warning("skipping %s: %s%s", path, reason, f" ({detail})" if detail else "")
        if self.files_warned == MAX_FILE_WARNINGS:
            log.warning("further skipped files are only counted (manifest 'dropped')")


def is_url(path) -> bool:
    return str(path).lower().startswith(("http://", "https://"))


def _is_fetch_bookkeeping(path) -> bool:
    name = os.path.basename(str(path))
    return name in ("fetch_manifest.json", "wet.paths.gz") or name.endswith(".part")


def file_kind(path) -> str | None:
    path = str(path)
    if is_url(path):  # the name is the last component of the URL's path
        path = path.split("?", 1)[0].split("#", 1)[0]
    name = os.path.basename(path).lower()
    if name.endswith(".part") or name == "fetch_manifest.json":  # fetch_common_crawl.py's
        return None
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".wet"):
        return "wet"
    if name.endswith((".txt", ".text")):
        return "txt"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".json"):
        return "json"
    return None


# a device, FIFO or socket (behind a symlink or not) may never end: reading it would hang
NOT_REGULAR = "not a regular file (a device, FIFO or socket, e.g. a link to /dev/zero: it may never end)"


def discover(paths, stats: Stats) -> list[str]:
    """Expand input paths into a sorted list of supported files (directories recursively)."""
    out: list[str] = []
    for p in paths:
        if is_url(p):  # streamed by read_documents, never stored (fetch_common_crawl.open_url)
            if file_kind(p) is None:
                stats.drop_file("unsupported_file", p, "URL must end in .warc.wet[.gz], .txt, "
                                ".jsonl (optionally .gz)")
            else:
                out.append(str(p))
            continue
        p = Path(p)
        if p.is_dir():
            files = []

            def onerror(err, _p=p):
                stats.drop_file("unreadable_path", getattr(err, "filename", _p), str(err))

            seen_dirs = set()
            for root, dirs, names in os.walk(p, onerror=onerror, followlinks=True):
                seen_dirs.add(os.path.realpath(root))  # symlink loops are walked once
                dirs[:] = [d for d in sorted(dirs)
                           if os.path.realpath(os.path.join(root, d)) not in seen_dirs]
                files.extend(os.path.join(root, n) for n in names)
            for f in sorted(files):
                if _is_fetch_bookkeeping(f):  # fetch_common_crawl.py's own files: not input
                    continue
                if file_kind(f) is None:
                    stats.drop_file("unsupported_file", f, "unknown extension")
                elif os.path.exists(f) and not os.path.isfile(f):
                    stats.drop_file("unsupported_file", f, NOT_REGULAR)
                else:
                    out.append(f)
        elif p.exists() or p.is_symlink():
            if file_kind(p) is None:
                stats.drop_file("unsupported_file", p,
                                "use .txt/.jsonl/.warc.wet[.gz]/.parquet/.json names")
            elif p.exists() and not p.is_file():
                stats.drop_file("unsupported_file", p, NOT_REGULAR)
            else:
                out.append(str(p))
        else:
            stats.drop_file("missing_path", p, "no such file or directory")
    return out


class _HashingReader(io.RawIOBase):
    """Raw reader that computes sha256 and size of everything read through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.size += n
        return n

    def drain(self):
        while True:
            chunk = self.f.read(1 << 20)
            if not chunk:
                return
            self.sha.update(chunk)
            self.size += len(chunk)

    def close(self):
        self.f.close()
        super().close()


class _ErrorRecorder(io.RawIOBase):
    """Remembers a read error (warcio swallows EOFError from a truncated gzip member)."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def readable(self):
        return True

    def readinto(self, b):
        try:
            return self.f.readinto(b)
        except Exception as e:
            self.error = e
            raise


def _lines(f, limit: int) -> Iterator[tuple[bytes, bool]]:
    """Yield (line, complete) pieces of at most ``limit`` bytes (bounded memory)."""
    while True:
        line = f.readline(limit)
        if not line:
            return
        yield line, line.endswith(b"\n")


def _decode(stats: Stats, data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.drop_doc("invalid_utf8")
        return None


_DOC_SEP = re.compile(rb"\n[ \t\r\f\v]*\n")  # a blank (or whitespace-only) line
_LINE_SEP = re.compile(rb"\n")
_BLOCK = 1 << 20


def _read_split(f, stats: Stats, sep, max_doc: int) -> Iterator[str]:
    """Split a byte stream into documents at ``sep`` matches, reading 1 MiB blocks (the
    splitting runs in C); documents over ``max_doc`` bytes are skipped as too_long without
    being held in memory."""
    carry = b""
    skipping = False
    first = True
    while True:
        block = f.read(_BLOCK)
        if first:
            first = False
            if block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
        if not block:
            break
        parts = sep.split(carry + block) if carry else sep.split(block)
        carry = parts.pop()
        for part in parts:
            if skipping:
                skipping = False
                stats.drop_doc("too_long")
            elif len(part) > max_doc:
                stats.drop_doc("too_long")
            elif part.strip():
                text = _decode(stats, part)
                if text is not None:
                    yield text
        if len(carry) > max_doc:
            skipping, carry = True, b""
    if skipping:
        stats.drop_doc("too_long")
    elif carry.strip():
        text = _decode(stats, carry)
        if text is not None:
            yield text


def _read_txt(f, stats: Stats, text_mode: str, max_doc: int) -> Iterator[str]:
    if text_mode == "file":
        data = f.read(max_doc + 1)
        if len(data) > max_doc:
            stats.drop_doc("too_long")
            return
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        if data.strip():
            text = _decode(stats, data)
            if text is not None:
                yield text
        return
    yield from _read_split(f, stats, _LINE_SEP if text_mode == "line" else _DOC_SEP, max_doc)


def _read_jsonl(f, stats: Stats, fieldname: str, max_doc: int) -> Iterator[str]:
    skipping = False
    for line, complete in _lines(f, max_doc + 1):
        if skipping:
            skipping = not complete
            continue
        if not complete and len(line) > max_doc:
            stats.drop_doc("too_long")
            skipping = True
            continue
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            stats.drop_doc("invalid_utf8")
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            stats.drop_doc("malformed_json")
            continue
        value = obj.get(fieldname) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            stats.drop_doc("missing_text_field")
            continue
        yield value


def _read_wet(f, stats: Stats, max_doc: int) -> Iterator[str]:
    from warcio.archiveiterator import ArchiveIterator

    for record in ArchiveIterator(f):
        if record.rec_type != "conversion":
            continue
        stream = record.content_stream()
        data = stream.read(max_doc + 1)
        if len(data) > max_doc:
            stats.drop_doc("too_long")
            continue
        if not data.strip():
            stats.drop_doc("wet_no_text")
            continue
        text = _decode(stats, data)
        if text is not None:
            yield text


def _read_datasets(path: str, kind: str, stats: Stats, fieldname: str) -> Iterator[str]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        datasets.disable_progress_bars()
    except AttributeError:  # pragma: no cover
        pass
    ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
    for row in ds:
        value = row.get(fieldname)
        if not isinstance(value, str):
            stats.drop_doc("missing_text_field")
            continue
        yield value


def read_documents(paths, stats: Stats, text_mode: str = "blank_line", jsonl_field: str = "text",
                   max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, files: list[str] | None = None
                   ) -> Iterator[str]:
    """Yield raw (decoded, un-normalised) documents from all inputs, in a stable order.

    Appends one entry per file, once it is read, to ``stats.sources`` ({path, format, bytes,
    sha256, documents, error?}; prepare.py aggregates them per input); counts every skipped file/record in ``stats.dropped``.
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    if files is None:
        files = discover(paths, stats)
    for path in files:
        kind = file_kind(path)
        src = {"path": str(path), "format": kind}
        docs_before = stats.documents_in
        yielded = 0
        error = None
        raw = None
        try:
            if is_url(path):
                if kind in ("parquet", "json"):
                    raise OSError(f"{kind} cannot be streamed from a URL; download it first")
                from data_prep.fetch_common_crawl import open_url

                raw = _HashingReader(open_url(path))
            else:
                raw = _HashingReader(open(path, "rb", buffering=0))
        except OSError as e:
            error = ("unreadable_path", str(e))
        if raw is not None:
            gz = None
            try:
                if kind in ("parquet", "json"):
                    raw.drain()
                    gen = _read_datasets(path, kind, stats, jsonl_field)
                else:
                    f = io.BufferedReader(raw, 1 << 16)
                    if path.lower().endswith(".gz"):
                        # Python's gzip (not warcio's lenient one) so truncation is detected
                        gz = _ErrorRecorder(gzip.GzipFile(fileobj=f, mode="rb"))
                        f = io.BufferedReader(gz, 1 << 16)
                    if kind != "wet" and b"\x00" in f.peek(_BINARY_PROBE)[:_BINARY_PROBE]:
                        raise _Binary()
                    if kind == "txt":
                        gen = _read_txt(f, stats, text_mode, max_doc_bytes)
                    elif kind == "jsonl":
                        gen = _read_jsonl(f, stats, jsonl_field, max_doc_bytes)
                    else:
                        gen = _read_wet(f, stats, max_doc_bytes)
                for doc in gen:
                    yielded += 1
                    stats.documents_in += 1
                    yield doc
                if gz is not None and gz.error is not None:  # e.g. swallowed by warcio
                    raise gz.error
            except _Binary:
                error = ("binary_file", "NUL bytes in the first 8 KiB")
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                error = ("truncated_gzip", f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - any other read failure skips the file
                reason = "truncated_gzip" if path.lower().endswith(".gz") and \
                    "gzip" in f"{type(e).__name__} {e}".lower() else "read_error"
                error = (reason, f"{type(e).__name__}: {e}")
            try:
                raw.drain()
            except OSError:
                pass
            src["bytes"] = raw.size
            src["sha256"] = raw.sha.hexdigest()
            raw.close()
        src["documents"] = yielded
        if error is not None:
            stats.drop_file(error[0], path, error[1])
            src["error"] = error[0]
        elif stats.documents_in == docs_before:
            stats.drop_file("empty_file", path, "no documents")
            src["error"] = "empty_file"
        stats.sources.append(src)


class _Binary(Exception):
    pass
