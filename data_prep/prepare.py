"""Text -> cleaned documents -> SentencePiece -> disjoint token shards.

    python data_prep/prepare.py --input PATH [PATH ...] --output DIR --num_groups G \\
        [--vocab_size 8000] [--val_fraction 0.01] [--tokenizer EXISTING.model] [--workers N] \\
        [--seed S] [--overwrite] [--text_mode blank_line|file|line] [--jsonl_field text] \\
        [--min_chars 200] [--min_text_ratio 0.8] [--tokenizer_sample_mb 32] [--quiet]
    python data_prep/prepare.py --sample [--output data/sample]     # embedded BBC News corpus

Web-text filters (filters.py; 'auto' = on for Common Crawl WET input, which may be http(s)
URLs streamed without storing): [--lang_filter auto|on|off] [--languages en]
[--near_dup auto|on|off] [--near_dup_threshold 0.8] [--near_dup_memory_mb 256]
[--line_filters auto|on|off] [--min_line_words 3] [--max_line_repeats 3]

Cluster scale (a shared tokenizer, N independent slices of the sorted input list, a merge):
    prepare.py --input ... --output TOK --tokenizer_only
    prepare.py --input ... --output SHARDS/shard_i --tokenizer TOK/tokenizer.model \
        --shard_index i --num_shards N [...same options for every shard...]
    prepare.py --merge SHARDS/shard_* --output DIR
The merged DIR is byte-identical to a one-process run with the same --tokenizer: every
per-document step (cleaning, line filters, language ID, MinHash, tokenization) and the
per-file repeated-line filter run in the shards; exact de-duplication runs in the shards
(within a slice) and again in --merge across slices; near-duplicate removal runs only in
--merge, over the band keys the shards stored, in the global input order.

Pipeline (two streaming passes; memory does not grow with the corpus except for the
de-duplication set, ~70 bytes per kept document, and the fixed-size near-dup index):
  1. read inputs (readers.py) -> clean + filter + hash in workers (clean.py, filters.py) ->
     repeated lines, exact and near duplicates in input order -> append kept documents to a
     spool file in the temporary output dir;
  2. train SentencePiece on a hash-selected sample of at most --tokenizer_sample_mb of
     training documents (or reuse --tokenizer);
  3. read the spool -> encode in workers (order preserved) -> per-split .bin/.idx.npy/
     .hashes.npy -> manifest.json -> atomic rename of the temporary dir to DIR.
With --tokenizer and no filter active, 1 and 3 are fused into one pass.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from data_prep import ONE_THREAD_ENV

    for _k in ONE_THREAD_ENV:
        os.environ.setdefault(_k, "1")  # before numpy: no BLAS thread pool (see parallel.py)

import argparse
import collections
import hashlib
import json
import logging
import os
import signal
import struct
import time

import numpy as np

from data_prep.clean import doc_hash, split_of
from data_prep.config import MIN_VOCAB, OPTION_GROUPS, PrepConfig, cli_options
from data_prep.filter_setup import FilterSetup, fill_counts, input_kind
from data_prep.filters import NearDupIndex
from data_prep.parallel import (chunked, clean_encode_chunk, encode_chunk, filter_clean_chunk,
                                ordered_map, worker_pool)
from data_prep.readers import Stats, discover, read_documents
from data_prep.provenance import SourceSummary
from data_prep.report import (DataPrepError, OutputExistsError, check_kept, fmt_dropped, progress,
                              say, summary, tick)
from data_prep.sample import SAMPLE_DEFAULTS, SampleCorpusMissing, sample_corpus_dir
from data_prep.shard_format import (FORMAT_VERSION, ShardWriter, check_output, fsync_tokens,
                                    is_prepared, make_manifest, split_names, staged_output,
                                    token_dtype, tokenizer_manifest, write_json)
from data_prep.tokenizer import load_tokenizer_proto, train_tokenizer, vocab_and_eos

_REC = struct.Struct("<IQI")  # split index, doc hash, byte length


def prepare(inputs, output=None, num_groups=None, **options) -> Path:
    """Prepare ``inputs`` into the dataset directory ``output``; returns its path.

    Takes a PrepConfig, ``prepare(PrepConfig(...))``, or PrepConfig's fields as arguments,
    ``prepare(inputs, output, num_groups, vocab_size=..., ...)``.
    Raises DataPrepError (a ValueError) with an actionable message on bad arguments or when
    nothing usable remains. Bad input files/records are skipped and counted, never fatal.
    """
    if isinstance(inputs, PrepConfig):
        if output is not None or num_groups is not None or options:
            raise TypeError("prepare(PrepConfig) takes no further arguments")
        cfg = inputs
    else:
        cfg = PrepConfig(inputs, output, num_groups, **options)
    output = Path(cfg.output)
    check_output(output, cfg.overwrite)
    tok_proto = load_tokenizer_proto(cfg.tokenizer) if cfg.tokenizer is not None else None

    stats = Stats(sources=SourceSummary(cfg.inputs, keep_files=cfg.num_shards is not None))
    files = discover(cfg.inputs, stats)
    if not files:
        raise DataPrepError(
            "no input file found in --input " + " ".join(map(str, cfg.inputs)) +
            f" ({fmt_dropped(stats.dropped)}); give existing files or directories with "
            ".txt, .jsonl, .warc.wet[.gz], .parquet or .json files (optionally .gz), "
            "or http(s) URLs of such files")
    shard = None
    if cfg.num_shards is not None:
        # contiguous slices of the sorted file list: shard i's documents all come before
        # shard i+1's, so --merge can replay the global, order-dependent de-duplication
        shard_index, num_shards = cfg.shard_index, cfg.num_shards
        lo, hi = len(files) * shard_index // num_shards, len(files) * (shard_index + 1) // num_shards
        shard = {"index": shard_index, "num_shards": num_shards, "first_file": lo,
                 "kinds": {input_kind(f) for f in files}}
        files = files[lo:hi]
        if shard_index:  # path-level drops of discover() are counted by shard 0 only
            stats.dropped.clear()
    with staged_output(output, cfg.overwrite) as tmp:
        manifest = _build(tmp, files, stats, cfg, tok_proto, shard)
    if cfg.tokenizer_only:
        say(cfg.quiet, f"tokenizer written to {output / 'tokenizer.model'} (from "
                       f"{manifest['documents_kept']} documents; dropped: "
                       f"{fmt_dropped(manifest['dropped'])})")
        return output
    if shard is not None:
        say(cfg.quiet, f"shard {cfg.shard_index}/{cfg.num_shards} written to {output}: "
                       f"{sum(s['num_docs'] for s in manifest['splits'].values())} documents of "
                       f"{manifest['documents_in']} read; merge all shards with  prepare.py "
                       "--merge SHARD_DIR ... --output DIR")
        return output
    summary(cfg.quiet, output, manifest, cfg.num_groups)
    return output


def _spool_records(path: Path):
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            head = f.read(_REC.size)
            if not head:
                return
            s, h, n = _REC.unpack(head)
            yield s, h, f.read(n)


_ORDER_HEAD = struct.Struct("<HB")  # per kept document, in order: split, has band keys


def _tagged_docs(files, stats, file_ids, **kw):
    """(file id, filter config index (1 for WET, 0 otherwise), raw document) in input order."""
    for fid, path in zip(file_ids, files):
        k = input_kind(path)
        for doc in read_documents(None, stats, files=[path], **kw):
            yield fid, k, doc


def _build(tmp: Path, files, stats: Stats, cfg: PrepConfig, tok_proto, shard=None) -> dict:
    names = split_names(cfg.num_groups)
    filt = FilterSetup(cfg)
    fcs = filt.configs
    kinds = {input_kind(f) for f in files}
    filtering = filt.on("any", kinds)
    file_ids = list(range(shard["first_file"], shard["first_file"] + len(files))) if shard \
        else list(range(len(files)))
    seen: set[int] = set()  # the one structure that grows with the corpus (see clean.py)
    timing = {}
    t0 = time.time()
    trained = tok_proto is None
    spooled = trained or filtering or shard is not None
    line_counts: collections.Counter = collections.Counter()
    lang_drops: collections.Counter = collections.Counter()
    repeated = filt.repeated_lines(kinds)
    index = filt.near_dup_index(kinds) if shard is None else None
    filt.check_languages(kinds)
    order = None
    order_bands = filt.bands if shard is not None and filt.on("near_dup", shard["kinds"]) else 0
    with worker_pool(cfg.workers) as pool:
        if spooled:
            # pass 1: read, clean, filter, de-duplicate, assign splits -> spool file
            spool_path = tmp / "documents.spool"
            n_docs = [0] * len(names)
            train_bytes = 0
            docs = _tagged_docs(files, stats, file_ids, **cfg.read_options)
            tasks = ((cfg.clean_options, fcs, c) for c in chunked(docs, size_of=lambda x: len(x[2])))
            if shard is not None:
                order = open(tmp / "order.bin", "wb", buffering=1 << 20)
                no_keys = bytes(8 * order_bands)
            with open(spool_path, "wb", buffering=1 << 20) as spool, \
                    progress(cfg.quiet, desc="clean", unit="doc") as bar:
                for results, lc in ordered_map(filter_clean_chunk, tasks, pool):
                    line_counts.update(lc)
                    for r in results:
                        if isinstance(r, str):
                            if r.startswith("language:"):
                                lang_drops[r[9:]] += 1
                                r = "language"
                            stats.dropped[r] += 1
                            continue
                        fid, k, data, h, s, keys = r
                        if repeated is not None and fcs[k].line_filters:
                            data2, removed = repeated(fid, data)
                            if removed:
                                line_counts["repeated_line"] += removed
                                if len(data2.decode("utf-8")) < cfg.min_chars:
                                    stats.dropped["too_short_after_line_filters"] += 1
                                    continue
                                data = data2
                                h = doc_hash(data)
                                s = split_of(h, cfg.seed, cfg.num_groups, cfg.val_fraction)
                        if h in seen:
                            stats.dropped["duplicate"] += 1
                            continue
                        seen.add(h)
                        if keys is not None and index is not None and index.check_and_add(keys):
                            stats.dropped["near_duplicate"] += 1
                            continue
                        if order is not None:
                            order.write(_ORDER_HEAD.pack(s, keys is not None))
                            order.write(no_keys if keys is None else keys.astype("<u8").tobytes())
                        spool.write(_REC.pack(s, h, len(data)))
                        spool.write(data)
                        n_docs[s] += 1
                        if s:
                            train_bytes += len(data)
                    bar.update(len(results))
            if order is not None:
                order.close()
            seen.clear()
            if shard is None:
                check_kept(n_docs, names, stats, files, cfg.num_groups, cfg.val_fraction,
                           tokenizer_only=cfg.tokenizer_only)
            timing["clean_s"] = time.time() - t0
            if trained:
                tok_proto = train_tokenizer(_spool_records(spool_path), tmp, train_bytes,
                                            int(cfg.tokenizer_sample_mb * (1 << 20)),
                                            cfg.vocab_size, cfg.quiet)
            timing["tokenizer_s"] = time.time() - t0 - timing["clean_s"]
        (tmp / "tokenizer.model").write_bytes(tok_proto)
        if cfg.tokenizer_only:
            spool_path.unlink()
            manifest = tokenizer_manifest(tok_proto, stats, sum(n_docs))
            write_json(tmp / "manifest.json", manifest)
            return manifest
        vocab, eos_id = vocab_and_eos(tok_proto, trained, cfg.vocab_size, cfg.quiet)
        dtype = token_dtype(vocab)
        tok_cfg = (str(tmp / "tokenizer.model"), eos_id, dtype)
        writer = ShardWriter(tmp, names, dtype)
        t1 = time.time()
        n_tok = 0
        try:
            with progress(cfg.quiet, desc="tokenize", unit="doc",
                          total=sum(n_docs) if spooled else None) as bar:
                if spooled:  # pass 2: spool -> encode -> shards
                    metas: collections.deque = collections.deque()

                    def tasks():
                        for chunk in chunked(_spool_records(spool_path),
                                             size_of=lambda r: len(r[2])):
                            metas.append(([s for s, _, _ in chunk], [h for _, h, _ in chunk]))
                            yield tok_cfg, [d for _, _, d in chunk]

                    for flat, lengths in ordered_map(encode_chunk, tasks(), pool):
                        splits, hashes = metas.popleft()
                        n_tok += writer.add_chunk(splits, hashes, flat, lengths)
                        tick(bar, len(splits), n_tok)
                    spool_path.unlink()
                else:  # fused single pass: read -> clean + encode in workers -> dedup -> shards
                    docs = read_documents(None, stats, files=files, **cfg.read_options)
                    tasks = ((cfg.clean_options, tok_cfg, c) for c in chunked(docs))
                    for drops, hashes, splits, flat, lengths in ordered_map(clean_encode_chunk,
                                                                             tasks, pool):
                        stats.dropped.update(drops)
                        for i, h in enumerate(hashes.tolist()):
                            if h in seen:
                                stats.dropped["duplicate"] += 1
                                splits[i] = -1
                            else:
                                seen.add(h)
                        n_tok += writer.add_chunk(splits, hashes, flat, lengths)
                        tick(bar, len(drops) + len(splits), n_tok)
        except BaseException:
            writer.abort()
            raise
    splits = writer.close()
    n_docs = [splits[n]["num_docs"] for n in names]
    if shard is None:
        check_kept(n_docs, names, stats, files, cfg.num_groups, cfg.val_fraction)
    timing["tokenize_s"] = time.time() - t1
    fsync_tokens(tmp, splits)
    common = dict(tok_proto=tok_proto, trained=trained, vocab=vocab, dtype=dtype, eos_id=eos_id,
                  num_groups=cfg.num_groups, seed=cfg.seed, val_fraction=cfg.val_fraction,
                  cleaning=cfg.cleaning)
    if shard is not None:
        manifest = {"format_version": FORMAT_VERSION, "shard": True,
                    "shard_index": shard["index"], "num_shards": shard["num_shards"],
                    "inputs": [str(i) for i in cfg.inputs], "common": {**common, "tok_proto": None},
                    "tokenizer_sha256": hashlib.sha256(tok_proto).hexdigest(),
                    "filters": filt.describe(kinds_all=shard["kinds"]),
                    "splits": splits, "dropped": dict(sorted(stats.dropped.items())),
                    "documents_in": stats.documents_in,
                    "order_record": {"format": _ORDER_HEAD.format + f"{order_bands}Q",
                                     "fields": "split, has band keys, band keys"},
                    "line_counts": dict(line_counts), "lang_drops": dict(lang_drops),
                    "source_files": stats.sources.files}
        write_json(tmp / SHARD_MANIFEST, manifest)
    else:
        filters = filt.describe(kinds_all=kinds)
        fill_counts(filters, line_counts, lang_drops, index)
        manifest = make_manifest(**common, splits=splits, dropped=stats.dropped,
                                 documents_in=stats.documents_in, filters=filters,
                                 sources=stats.sources.summary())
        write_json(tmp / "manifest.json", manifest)
    if os.environ.get("DATA_PREP_TIMING"):
        print(json.dumps({**timing, "tokens": n_tok, "docs": sum(n_docs)}), file=sys.stderr,
              flush=True)
    return manifest


SHARD_MANIFEST = "shard_manifest.json"


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


def merge(shard_dirs, output, overwrite: bool = False, quiet: bool = False) -> Path:
    """Merge the outputs of ``prepare.py --shard_index i --num_shards N`` into one dataset.

    No re-tokenization: token ranges are copied. Exact and near-duplicate removal across
    shards is replayed here in the global input order (shards are contiguous slices of the
    sorted input list), so the result is byte-identical to a single-process run."""
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
    output = Path(output)
    check_output(output, overwrite)
    common = dict(ms[0]["common"])
    tok_proto = (dirs[0] / "tokenizer.model").read_bytes()
    if hashlib.sha256(tok_proto).hexdigest() != ms[0]["tokenizer_sha256"]:
        raise DataPrepError(f"--merge: {dirs[0] / 'tokenizer.model'} does not match its manifest")
    common["tok_proto"] = tok_proto
    names = split_names(common["num_groups"])
    filters = json.loads(json.dumps(ms[0]["filters"]))
    nd = filters.get("near_dup")
    bands = nd["bands"] if nd else 0
    index = NearDupIndex(nd["memory_mb"], bands) if nd else None
    rec = struct.Struct(ms[0]["order_record"]["format"])
    if rec.size != _ORDER_HEAD.size + 8 * bands:
        raise DataPrepError(f"--merge: {dirs[0]} has order records of {rec.size} bytes, "
                            f"expected {_ORDER_HEAD.size + 8 * bands}; re-run the shards")

    # pass A: replay exact + near-duplicate removal over all shards in global order
    seen: set[int] = set()
    dropped: collections.Counter = collections.Counter()
    keep = []
    for d, m in zip(dirs, ms):
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
                h = int(hashes[s][i])
                if h in seen:
                    dropped["duplicate"] += 1
                    continue
                seen.add(h)
                if has and index is not None and \
                        index.check_and_add(np.array(vals[2:], np.uint64)):
                    dropped["near_duplicate"] += 1
                    continue
                flags[s][i] = True
        if pos != [len(h) for h in hashes]:
            raise DataPrepError(f"--merge: {d} is inconsistent (order.bin vs split files); "
                                f"re-run shard {m['shard_index']}")
        keep.append(flags)
    seen.clear()

    with staged_output(output, overwrite) as tmp:
        (tmp / "tokenizer.model").write_bytes(tok_proto)
        dtype = np.dtype(common["dtype"])
        writer = ShardWriter(tmp, names, common["dtype"])
        try:
            # pass B: copy the kept documents' tokens, split by split, shard by shard
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
                        writer.add_chunk(np.full(len(ks), si), hs[ks], flat,
                                         offs[ks + 1] - offs[ks])
                    del toks
        except BaseException:
            writer.abort()
            raise
        splits = writer.close()
        for d, m in zip(dirs, ms):
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
    say(quiet, f"merged {n_shards} shards")
    summary(quiet, output, manifest, common["num_groups"])
    return output


def prepare_sample(output_dir, num_groups: int = 6, vocab_size: int = 8000, seed: int = 1234,
                   workers: int = 1, quiet: bool = False) -> Path:
    """Prepare the embedded BBC News corpus into ``output_dir`` unless it is already there.

    Safe to call from several processes at once: each builds in its own temp dir; the first
    rename wins and the others discard their copy and return the finished directory.
    An already prepared directory is returned as it is (whatever its num_groups/vocab):
    callers that need other settings should check its manifest.json.
    """
    out = Path(output_dir)
    if is_prepared(out):
        return out
    try:
        corpus = sample_corpus_dir()
    except SampleCorpusMissing as e:
        raise DataPrepError(str(e)) from None
    try:
        return prepare([corpus], out, num_groups=num_groups, vocab_size=vocab_size,
                       val_fraction=SAMPLE_DEFAULTS["val_fraction"], seed=seed, workers=workers,
                       text_mode=SAMPLE_DEFAULTS["text_mode"], quiet=quiet)
    except OutputExistsError:
        if is_prepared(out):
            return out
        raise


_CLI_ONLY = {  # command-line options that are no PrepConfig field: field they follow -> option
    "inputs": ("--sample", dict(action="store_true",
                                help="use the embedded BBC News corpus instead of --input "
                                     "(defaults: --output data/sample --num_groups 6 "
                                     "--val_fraction 0.05)")),
    "num_shards": ("--merge", dict(nargs="+", metavar="SHARD_DIR",
                                   help="merge the shard outputs into --output (no "
                                        "re-tokenization)")),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: PrepConfig's options (config.cli_options) plus --sample and --merge."""
    p = argparse.ArgumentParser(
        description="Clean text, train/reuse a SentencePiece tokenizer and write disjoint "
                    "token shards (val + G groups).")
    groups = {None: p, **{k: p.add_argument_group(title, description)
                          for k, (title, description) in OPTION_GROUPS.items()}}
    for name, group, flag, kw in cli_options():
        groups[group].add_argument(flag, **kw)
        if name in _CLI_ONLY:
            extra, extra_kw = _CLI_ONLY[name]
            groups[group].add_argument(extra, **extra_kw)
    return p


def _config(args) -> PrepConfig:
    """The PrepConfig of a command line that is not --merge (--sample: the embedded corpus
    and its defaults)."""
    if args.sample:
        if args.inputs:
            raise DataPrepError("--sample and --input are exclusive; drop one of them")
        try:
            args.inputs = [sample_corpus_dir()]
        except SampleCorpusMissing as e:
            raise DataPrepError(str(e)) from None
        args.output = args.output or "data/sample"
        return PrepConfig.from_args(args, **SAMPLE_DEFAULTS)
    if args.tokenizer_only and args.num_groups is None:
        args.num_groups = 1
    missing = [f for f, v in (("--input", args.inputs), ("--output", args.output),
                              ("--num_groups", args.num_groups)) if v is None]
    if missing:
        raise DataPrepError(f"{', '.join(missing)} required (or use --sample for the "
                            "embedded corpus)")
    return PrepConfig.from_args(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. SLURM) -> SystemExit, so the temporary directory is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.merge:
            if args.inputs or args.sample or not args.output:
                raise DataPrepError("--merge SHARD_DIR ... takes only --output DIR (and "
                                    "--overwrite/--quiet); drop --input/--sample")
            merge(args.merge, args.output, overwrite=args.overwrite, quiet=args.quiet)
            return 0
        prepare(_config(args))
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
