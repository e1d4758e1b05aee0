"""The two streaming passes of a run (see prepare.py's docstring), in a temporary directory.

Pass 1 (``_clean_pass``): read -> clean + filter + hash in workers -> repeated lines, exact
and near duplicates in input order -> a spool file of the kept documents (records of split,
doc hash, byte length, UTF-8 bytes). Then the tokenizer is trained on the spool (or reused).
Pass 2 (``_spool_pass``): spool -> encode in workers (order preserved) -> the split files.
With a reused tokenizer and no filter active, ``_fused_pass`` does both in one pass.
"""
from __future__ import annotations

import collections
import json
import os
import struct
import sys
import time
from pathlib import Path

from data_prep.clean import doc_hash, split_of
from data_prep.dedup import Dedup
from data_prep.filter_setup import FilterSetup, fill_counts, input_kind
from data_prep.parallel import (
    chunked,
    clean_encode_chunk,
    encode_chunk,
    filter_clean_chunk,
    ordered_map,
    worker_pool,
)
from data_prep.readers import Stats, read_documents
from data_prep.report import check_kept, progress, tick
from data_prep.shard_format import (
    ShardWriter,
    fsync_tokens,
    make_manifest,
    split_names,
    token_dtype,
    tokenizer_manifest,
    write_json,
)
from data_prep.sharding import SHARD_MANIFEST, OrderWriter, order_bands, shard_manifest
from data_prep.tokenizer import TokenizerFiles, note_vocab, train_tokenizer

_REC = struct.Struct("<IQI")  # spool record head: split index, doc hash, byte length


def _spool_records(path: Path):
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            head = f.read(_REC.size)
            if not head:
                return
            s, h, n = _REC.unpack(head)
            yield s, h, f.read(n)


def _tagged_docs(files, stats, file_ids, **kw):
    """(file id, filter config index (1 for WET, 0 otherwise), raw document) in input order."""
    for fid, path in zip(file_ids, files):
        k = input_kind(path)
        for doc in read_documents(None, stats, files=[path], **kw):
            yield fid, k, doc


class _Run:
    """What the passes of one build share: options, inputs, filters, counts, timings."""

    def __init__(self, tmp: Path, files, stats: Stats, cfg, shard):
        self.tmp, self.files, self.stats, self.cfg, self.shard = tmp, files, stats, cfg, shard
        self.names = split_names(cfg.num_groups)
        self.filt = filt = FilterSetup(cfg)
        self.kinds = {input_kind(f) for f in files}
        first = shard["first_file"] if shard else 0
        self.file_ids = list(range(first, first + len(files)))
        self.spool = tmp / "documents.spool"
        self.timing: dict = {}
        self.line_counts: collections.Counter = collections.Counter()
        self.lang_drops: collections.Counter = collections.Counter()
        self.repeated = filt.repeated_lines(self.kinds)
        self.index = filt.near_dup_index(self.kinds) if shard is None else None
        filt.check_languages(self.kinds)
        self.dedup = Dedup(stats.dropped, self.index)
        self.order_bands = order_bands(filt, shard)


def build(tmp: Path, files, stats: Stats, cfg, tok: TokenizerFiles | None, shard=None) -> dict:
    """Prepare ``files`` (read into ``stats``) into ``tmp`` with the options of ``cfg`` (a
    PrepConfig) and the tokenizer ``tok`` (tokenizer.load_tokenizer; None: train one);
    ``shard``: this shard's slice (sharding.slice_files) or None. Returns the manifest written
    to ``tmp``."""
    run = _Run(tmp, files, stats, cfg, shard)
    t0 = time.time()
    trained = tok is None
    spooled = trained or run.filt.on("any", run.kinds) or shard is not None
    n_docs = None
    with worker_pool(cfg.workers) as pool:
        if spooled:
            n_docs, train_bytes = _clean_pass(run, pool)
            run.timing["clean_s"] = time.time() - t0
            if trained:
                tok = TokenizerFiles.sentencepiece(train_tokenizer(
                    _spool_records(run.spool), tmp, train_bytes,
                    int(cfg.tokenizer_sample_mb * (1 << 20)), cfg.vocab_size, cfg.quiet))
            run.timing["tokenizer_s"] = time.time() - t0 - run.timing["clean_s"]
        tok.write(tmp)
        if cfg.tokenizer_only:
            run.spool.unlink()
            manifest = tokenizer_manifest(tok, stats, sum(n_docs))
            write_json(tmp / "manifest.json", manifest)
            return manifest
        note_vocab(tok, trained, cfg.vocab_size, cfg.quiet)
        dtype = token_dtype(tok.vocab)
        tok_cfg = (str(tmp / tok.entry), tok.eos_id, dtype)  # a file (SentencePiece) or a dir (HF)
        writer = ShardWriter(tmp, run.names, dtype)
        t1 = time.time()
        try:
            with progress(cfg.quiet, desc="tokenize", unit="doc",
                          total=sum(n_docs) if spooled else None) as bar:
                n_tok = (_spool_pass if spooled else _fused_pass)(run, pool, writer, tok_cfg, bar)
        except BaseException:
            writer.abort()
            raise
    splits = writer.close()
    n_docs = [splits[n]["num_docs"] for n in run.names]
    if shard is None:
        check_kept(n_docs, run.names, stats, files, cfg.num_groups, cfg.val_fraction)
    run.timing["tokenize_s"] = time.time() - t1
    fsync_tokens(tmp, splits)
    common = {"tok": tok, "trained": trained, "vocab": tok.vocab, "dtype": dtype,
              "eos_id": tok.eos_id, "num_groups": cfg.num_groups, "seed": cfg.seed,
              "val_fraction": cfg.val_fraction, "cleaning": cfg.cleaning}
    manifest = _write_manifest(run, common, splits)
    if os.environ.get("DATA_PREP_TIMING"):
        print(json.dumps({**run.timing, "tokens": n_tok, "docs": sum(n_docs)}), file=sys.stderr,
              flush=True)
    return manifest


def _clean_pass(run: _Run, pool):
    """Pass 1: read, clean, filter, de-duplicate, assign splits -> spool file (and a shard's
    order.bin); returns the documents kept per split and the training split bytes."""
    cfg = run.cfg
    n_docs = [0] * len(run.names)
    train_bytes = 0
    docs = _tagged_docs(run.files, run.stats, run.file_ids, **cfg.read_options)
    tasks = ((cfg.clean_options, run.filt.configs, c)
             for c in chunked(docs, size_of=lambda x: len(x[2])))
    order = OrderWriter(run.tmp / "order.bin", run.order_bands) if run.shard is not None else None
    with open(run.spool, "wb", buffering=1 << 20) as spool, \
            progress(cfg.quiet, desc="clean", unit="doc") as bar:
        for results, lc in ordered_map(filter_clean_chunk, tasks, pool):
            run.line_counts.update(lc)
            for r in results:
                kept = _admit(run, r)
                if kept is None:
                    continue
                s, h, data, keys = kept
                if order is not None:
                    order.write(s, keys)
                spool.write(_REC.pack(s, h, len(data)))
                spool.write(data)
                n_docs[s] += 1
                if s:
                    train_bytes += len(data)
            bar.update(len(results))
    if order is not None:
        order.close()
    run.dedup.clear()
    if run.shard is None:
        check_kept(n_docs, run.names, run.stats, run.files, cfg.num_groups, cfg.val_fraction,
                   tokenizer_only=cfg.tokenizer_only)
    return n_docs, train_bytes


def _admit(run: _Run, r):
    """One pass-1 worker result -> (split, doc hash, UTF-8 bytes, band keys or None) to keep,
    or None (the reason is counted): the order-dependent steps, in input order."""
    cfg, dropped = run.cfg, run.stats.dropped
    if isinstance(r, str):  # dropped in the worker
        if r.startswith("language:"):
            run.lang_drops[r[9:]] += 1
            r = "language"
        dropped[r] += 1
        return None
    fid, k, data, h, s, keys = r
    if run.repeated is not None and run.filt.configs[k].line_filters:
        data2, removed = run.repeated(fid, data)
        if removed:
            run.line_counts["repeated_line"] += removed
            if len(data2.decode("utf-8")) < cfg.min_chars:
                dropped["too_short_after_line_filters"] += 1
                return None
            data = data2
            h = doc_hash(data)
            s = split_of(h, cfg.seed, cfg.num_groups, cfg.val_fraction)
    if not run.dedup.keep(h, keys):
        return None
    return s, h, data, keys


def _spool_pass(run: _Run, pool, writer: ShardWriter, tok_cfg, bar) -> int:
    """Pass 2: spool -> encode in workers -> ``writer``; returns the tokens written."""
    metas: collections.deque = collections.deque()

    def tasks():
        for chunk in chunked(_spool_records(run.spool), size_of=lambda r: len(r[2])):
            metas.append(([s for s, _, _ in chunk], [h for _, h, _ in chunk]))
            yield tok_cfg, [d for _, _, d in chunk]

    n_tok = 0
    for flat, lengths in ordered_map(encode_chunk, tasks(), pool):
        splits, hashes = metas.popleft()
        n_tok += writer.add_chunk(splits, hashes, flat, lengths)
        tick(bar, len(splits), n_tok)
    run.spool.unlink()
    return n_tok


def _fused_pass(run: _Run, pool, writer: ShardWriter, tok_cfg, bar) -> int:
    """The single pass: read -> clean + encode in workers -> de-duplicate -> ``writer``."""
    docs = read_documents(None, run.stats, files=run.files, **run.cfg.read_options)
    tasks = ((run.cfg.clean_options, tok_cfg, c) for c in chunked(docs))
    n_tok = 0
    for drops, hashes, splits, flat, lengths in ordered_map(clean_encode_chunk, tasks, pool):
        run.stats.dropped.update(drops)
        for i, h in enumerate(hashes.tolist()):
            if not run.dedup.keep(h):
                splits[i] = -1
        n_tok += writer.add_chunk(splits, hashes, flat, lengths)
        tick(bar, len(drops) + len(splits), n_tok)
    return n_tok


def _write_manifest(run: _Run, common: dict, splits: dict) -> dict:
    """manifest.json (or a shard's shard_manifest.json) of the finished build."""
    stats = run.stats
    if run.shard is not None:
        manifest = shard_manifest(
            run.shard, inputs=run.cfg.inputs, common=common,
            filters=run.filt.describe(kinds_all=run.shard["kinds"]), splits=splits,
            stats=stats, bands=run.order_bands, line_counts=run.line_counts,
            lang_drops=run.lang_drops)
        write_json(run.tmp / SHARD_MANIFEST, manifest)
        return manifest
    filters = run.filt.describe(kinds_all=run.kinds)
    fill_counts(filters, run.line_counts, run.lang_drops, run.index)
    manifest = make_manifest(**common, splits=splits, dropped=stats.dropped,
                             documents_in=stats.documents_in, filters=filters,
                             sources=stats.sources.summary())
    write_json(run.tmp / "manifest.json", manifest)
    return manifest
