"""Sharded runs and --merge (the "Cluster scale" protocol in prepare.py's docstring).

A shard run (``--shard_index i --num_shards N``) prepares a contiguous slice of the sorted
input file list with a shared tokenizer and writes, besides the split files, an order.bin
(per kept document in input order: its split, whether it has band keys, and the keys) and a
shard_manifest.json with its counts and per-file sources. ``merge`` replays exact and
near-duplicate removal over all shards in that global order and copies the kept documents'
tokens, so its output is byte-identical to one process over the whole input.
"""
from __future__ import annotations

import collections
import json
import struct
from pathlib import Path

import numpy as np

from data_prep.dedup import Dedup
from data_prep.filter_setup import fill_counts, input_kind
from data_prep.filters import NearDupIndex
from data_prep.provenance import SourceSummary
from data_prep.readers import Stats
from data_prep.report import DataPrepError, check_kept, say, summary
from data_prep.shard_format import (
    FORMAT_VERSION,
    ShardWriter,
    check_output,
    fsync_tokens,
    make_manifest,
    split_names,
    staged_output,
    write_json,
)
from data_prep.tokenizer import TokenizerFiles

SHARD_MANIFEST = "shard_manifest.json"
ORDER_HEAD = struct.Struct("<HB")  # per kept document, in order: split, has band keys


def slice_files(files, stats: Stats, shard_index: int, num_shards: int):
    """(this shard's files, the shard description) of the sorted input ``files``."""
    # contiguous slices of the sorted file list: shard i's documents all come before
    # shard i+1's, so --merge can replay the global, order-dependent de-duplication
    lo, hi = len(files) * shard_index // num_shards, len(files) * (shard_index + 1) // num_shards
    shard = {"index": shard_index, "num_shards": num_shards, "first_file": lo,
             "kinds": {input_kind(f) for f in files}}
    if shard_index:  # path-level drops of discover() are counted by shard 0 only
        stats.dropped.clear()
    return files[lo:hi], shard


def order_bands(filt, shard) -> int:
    """Band keys per order.bin record: the LSH bands if near-dup removal applies to the run."""
    return filt.bands if shard is not None and filt.on("near_dup", shard["kinds"]) else 0


class OrderWriter:
    """Writes a shard's order.bin: one ORDER_HEAD + ``bands`` uint64 record per kept document."""

    def __init__(self, path: Path, bands: int):
        self.f = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - open until close()
        self.no_keys = bytes(8 * bands)

    def write(self, split: int, keys) -> None:
        self.f.write(ORDER_HEAD.pack(split, keys is not None))
        self.f.write(self.no_keys if keys is None else keys.astype("<u8").tobytes())

    def close(self) -> None:
        self.f.close()


def shard_manifest(shard, *, inputs, common, filters, splits, stats, bands,
                   line_counts, lang_drops) -> dict:
    """shard_manifest.json: what --merge needs to check the shards and replay the run."""
    return {"format_version": FORMAT_VERSION, "shard": True,
            "shard_index": shard["index"], "num_shards": shard["num_shards"],
            "inputs": [str(i) for i in inputs], "common": {**common, "tok": None},
            **common["tok"].manifest_fields(),
            "filters": filters, "splits": splits,
            "dropped": dict(sorted(stats.dropped.items())), "documents_in": stats.documents_in,
            "order_record": {"format": ORDER_HEAD.format + f"{bands}Q",
                             "fields": "split, has band keys, band keys"},
            "line_counts": dict(line_counts), "lang_drops": dict(lang_drops),
            "source_files": stats.sources.files}


def _read_shard_manifest(d: Path) -> dict:
    try:
        m = json.loads((d / SHARD_MANIFEST).read_text())
        if not m.get("shard"):
            raise ValueError("not a shard manifest")
        return m
    except (OSError, ValueError) as e:
        raise DataPrepError(f"--merge {d}: no readable {SHARD_MANIFEST} ({e}); pass the "
                            "--output directories of  prepare.py --shard_index i --num_shards N  "
                            "runs that finished") from None


def _read_shards(shard_dirs):
    """(dirs, manifests) of one complete sharded run, in shard order; DataPrepError if not."""
    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise DataPrepError("--merge needs the shard directories, e.g. --merge out/shard_*")
    ms = [_read_shard_manifest(d) for d in dirs]
    n_shards = ms[0]["num_shards"]
    got = sorted(m["shard_index"] for m in ms)
    if got != list(range(n_shards)) or any(m["num_shards"] != n_shards for m in ms):
        missing = sorted(set(range(n_shards)) - set(got))
        raise DataPrepError(
            f"--merge: expected shards 0..{n_shards - 1} of one run exactly once each, got "
            f"indices {got}" + (f" (missing {missing})" if missing else "") +
            "; pass every shard directory of the run (re-run the failed array tasks first)")
    order = sorted(range(len(ms)), key=lambda i: ms[i]["shard_index"])
    dirs, ms = [dirs[i] for i in order], [ms[i] for i in order]
    for key in ("inputs", "common", "tokenizer_sha256", "filters"):
        for d, m in zip(dirs[1:], ms[1:]):
            if m[key] != ms[0][key]:
                raise DataPrepError(f"--merge: {d} was prepared with a different {key} than "
                                    f"{dirs[0]}; all shards must come from one run (same "
                                    "--input list, options and --tokenizer)")
    return dirs, ms


def merge(shard_dirs, output, overwrite: bool = False, quiet: bool = False) -> Path:
    """Merge the outputs of ``prepare.py --shard_index i --num_shards N`` into one dataset.

    No re-tokenization: token ranges are copied. Exact and near-duplicate removal across
    shards is replayed here in the global input order (shards are contiguous slices of the
    sorted input list), so the result is byte-identical to a single-process run."""
    dirs, ms = _read_shards(shard_dirs)
    output = Path(output)
    check_output(output, overwrite)
    common = dict(ms[0]["common"])
    try:
        tok = TokenizerFiles.read(dirs[0], ms[0])
    except OSError as e:
        raise DataPrepError(f"--merge: cannot read the tokenizer of {dirs[0]} ({e}); re-run "
                            "shard 0") from None
    if tok.sha256 != ms[0]["tokenizer_sha256"]:
        raise DataPrepError(f"--merge: {dirs[0] / tok.entry} does not match its manifest")
    common["tok"] = tok
    names = split_names(common["num_groups"])
    filters = json.loads(json.dumps(ms[0]["filters"]))
    nd = filters.get("near_dup")
    bands = nd["bands"] if nd else 0
    index = NearDupIndex(nd["memory_mb"], bands) if nd else None
    rec = struct.Struct(ms[0]["order_record"]["format"])
    if rec.size != ORDER_HEAD.size + 8 * bands:
        raise DataPrepError(f"--merge: {dirs[0]} has order records of {rec.size} bytes, "
                            f"expected {ORDER_HEAD.size + 8 * bands}; re-run the shards")
    dropped: collections.Counter = collections.Counter()
    dedup = Dedup(dropped, index)
    keep = [_replay(d, m, names, rec, dedup) for d, m in zip(dirs, ms)]
    dedup.clear()
    with staged_output(output, overwrite) as tmp:
        tok.write(tmp)
        splits = _copy_kept(tmp, dirs, ms, keep, names, common["dtype"])
        manifest = _merged_manifest(tmp, ms, splits, common, dropped, filters, index)
    say(quiet, f"merged {ms[0]['num_shards']} shards")
    summary(quiet, output, manifest, common["num_groups"])
    return output


def _replay(d: Path, m: dict, names, rec: struct.Struct, dedup: Dedup) -> list:
    """Pass A over one shard (in global order): per split, which of its documents to keep."""
    hashes = [np.load(d / m["splits"][n]["doc_hashes"]) for n in names]
    flags = [np.zeros(len(h), bool) for h in hashes]
    pos = [0] * len(names)
    with open(d / "order.bin", "rb", buffering=1 << 20) as f:
        while True:
            head = f.read(rec.size)
            if len(head) < rec.size:
                if head:
                    raise DataPrepError(f"--merge: {d / 'order.bin'} is truncated; re-run "
                                        f"shard {m['shard_index']}")
                break
            vals = rec.unpack(head)
            s, has = vals[0], vals[1]
            i = pos[s]
            pos[s] += 1
            if dedup.keep(int(hashes[s][i]), np.array(vals[2:], np.uint64) if has else None):
                flags[s][i] = True
    if pos != [len(h) for h in hashes]:
        raise DataPrepError(f"--merge: {d} is inconsistent (order.bin vs split files); "
                            f"re-run shard {m['shard_index']}")
    return flags


def _copy_kept(tmp: Path, dirs, ms, keep, names, dtype_name: str) -> dict:
    """Pass B: copy the kept documents' tokens, split by split, shard by shard."""
    dtype = np.dtype(dtype_name)
    writer = ShardWriter(tmp, names, dtype_name)
    try:
        for si, n in enumerate(names):
            for d, m, flags in zip(dirs, ms, keep):
                sp = m["splits"][n]
                kept = np.flatnonzero(flags[si])
                if not len(kept):
                    continue
                toks = np.memmap(d / sp["tokens"], dtype=dtype, mode="r")
                offs = np.load(d / sp["doc_index"])
                hs = np.load(d / sp["doc_hashes"])
                for c in range(0, len(kept), 4096):
                    ks = kept[c:c + 4096]
                    flat = np.concatenate([toks[offs[k]:offs[k + 1]] for k in ks])
                    writer.add_chunk(np.full(len(ks), si), hs[ks], flat, offs[ks + 1] - offs[ks])
                del toks
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _merged_manifest(tmp: Path, ms, splits, common, dropped, filters, index) -> dict:
    """Checks the merged splits, fsyncs them and writes manifest.json; returns it."""
    names = list(splits)
    for m in ms:
        dropped.update(m["dropped"])
    documents_in = sum(m["documents_in"] for m in ms)
    st = Stats(dropped=dropped, documents_in=documents_in)
    check_kept([splits[n]["num_docs"] for n in names], names, st,
               [f["path"] for m in ms for f in m["source_files"]], common["num_groups"],
               common["val_fraction"])
    fsync_tokens(tmp, splits)
    line_counts, lang_drops = collections.Counter(), collections.Counter()
    sources = SourceSummary(ms[0]["inputs"])
    for m in ms:
        line_counts.update(m["line_counts"])
        lang_drops.update(m["lang_drops"])
        for src in m["source_files"]:
            sources.append(src)
    fill_counts(filters, line_counts, lang_drops, index)
    manifest = make_manifest(**common, splits=splits, dropped=dropped,
                             documents_in=documents_in, filters=filters,
                             sources=sources.summary())
    write_json(tmp / "manifest.json", manifest)
    return manifest
