"""Provenance: the manifest's "sources" entries (what was read, per --input argument)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from data_prep.readers import is_url


def _norm_input(i) -> str:
    return str(i) if is_url(str(i)) else str(Path(i))


class SourceSummary:
    """Aggregates per-file source entries into one manifest entry per --input argument
    (files, bytes, documents, skipped files, and a sha256 over the (relative path, file
    sha256) pairs in read order), so memory and manifest size do not grow with file count."""

    def __init__(self, inputs, keep_files: bool = False):
        self.entries = []
        self.files = [] if keep_files else None  # per-file entries (sharded runs, for --merge)
        for inp in (_norm_input(i) for i in inputs):  # normalised like discover()'s paths
            self.entries.append((inp, inp.rstrip(os.sep) + os.sep, hashlib.sha256(),
                                 {"path": inp, "files": 0, "bytes": 0, "documents": 0,
                                  "files_skipped": 0}))

    def append(self, src: dict) -> None:
        if self.files is not None:
            self.files.append(src)
        path = src["path"]
        for inp, prefix, h, agg in self.entries:
            if path == inp or path.startswith(prefix):
                rel = path[len(prefix):] if path != inp else os.path.basename(inp)
                h.update(f"{rel}\0{src.get('sha256', '-')}\n".encode())
                agg["files"] += 1
                agg["bytes"] += src.get("bytes", 0)
                agg["documents"] += src["documents"]
                agg["files_skipped"] += "error" in src
                return

    def summary(self) -> list[dict]:
        return [{**agg, "sha256": h.hexdigest()} for _, _, h, agg in self.entries]
