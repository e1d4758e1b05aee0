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
import operator
import os
import signal
import struct
import time

import numpy as np

from data_prep.clean import DEFAULT_MIN_CHARS, DEFAULT_MIN_TEXT_RATIO, doc_hash, split_of
from data_prep.filters import (DEFAULT_LANGUAGES, DEFAULT_MAX_LINE_REPEATS,
                               DEFAULT_MIN_LINE_WORDS, DEFAULT_NEAR_DUP_MEMORY_MB,
                               DEFAULT_NEAR_DUP_THRESHOLD, DEFAULT_NUM_PERM, DEFAULT_SHINGLE,
                               FILTER_MODES, LANGID_MAX_CHARS, LINE_REASONS, FilterConfig,
                               known_languages,
                               NearDupIndex, RepeatedLines, langid_version, lsh_params,
                               resolve_mode)
from data_prep.parallel import (chunked, clean_encode_chunk, encode_chunk, filter_clean_chunk,
                                ordered_map, worker_pool)
from data_prep.readers import (DEFAULT_MAX_DOC_BYTES, TEXT_MODES, Stats, discover, file_kind,
                               read_documents)
from data_prep.provenance import SourceSummary
from data_prep.report import (DataPrepError, OutputExistsError, check_kept, fmt_dropped, progress,
                              say, summary, tick)
from data_prep.sample import SAMPLE_DEFAULTS, SampleCorpusMissing, sample_corpus_dir
from data_prep.shard_format import (FORMAT_VERSION, ShardWriter, check_output, fsync_tokens,
                                    is_prepared, make_manifest, split_names, staged_output,
                                    token_dtype, tokenizer_manifest, write_json)
from data_prep.tokenizer import load_tokenizer_proto, train_tokenizer, vocab_and_eos

log = logging.getLogger("data_prep")

MIN_VOCAB = 300
_REC = struct.Struct("<IQI")  # split index, doc hash, byte length


def prepare(inputs, output, num_groups: int, vocab_size: int = 8000, val_fraction: float = 0.01,
            tokenizer=None, workers: int = 1, seed: int = 1234, overwrite: bool = False,
            text_mode: str = "blank_line", jsonl_field: str = "text",
            min_chars: int = DEFAULT_MIN_CHARS, min_text_ratio: float = DEFAULT_MIN_TEXT_RATIO,
            max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, tokenizer_sample_mb: float = 32,
            quiet: bool = False, lang_filter: str = "auto", languages=DEFAULT_LANGUAGES,
            near_dup: str = "auto", near_dup_threshold: float = DEFAULT_NEAR_DUP_THRESHOLD,
            near_dup_memory_mb: float = DEFAULT_NEAR_DUP_MEMORY_MB, line_filters: str = "auto",
            min_line_words: int = DEFAULT_MIN_LINE_WORDS,
            max_line_repeats: int = DEFAULT_MAX_LINE_REPEATS, shard_index: int | None = None,
            num_shards: int | None = None, tokenizer_only: bool = False) -> Path:
    """Prepare ``inputs`` into the dataset directory ``output``; returns its path.

    Raises DataPrepError (a ValueError) with an actionable message on bad arguments or when
    nothing usable remains. Bad input files/records are skipped and counted, never fatal.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    try:
        num_groups = operator.index(num_groups)
    except TypeError:
        raise DataPrepError(f"--num_groups must be an integer >= 1 (got {num_groups!r})") from None
    if num_groups < 1:
        raise DataPrepError(f"--num_groups must be >= 1 (got {num_groups!r})")
    if not (0 < val_fraction <= 0.5):
        raise DataPrepError(f"--val_fraction must be in (0, 0.5] (got {val_fraction!r}); "
                            "a held-out validation split is required")
    if tokenizer is None and vocab_size < MIN_VOCAB:
        raise DataPrepError(f"--vocab_size must be >= {MIN_VOCAB} (got {vocab_size}): the "
                            "tokenizer keeps 256 byte-fallback pieces")
    if text_mode not in TEXT_MODES:
        raise DataPrepError(f"--text_mode must be one of {', '.join(TEXT_MODES)}")
    if workers < 1:
        raise DataPrepError(f"--workers must be >= 1 (got {workers})")
    shard = None
    if (shard_index is None) != (num_shards is None):
        raise DataPrepError("--shard_index and --num_shards go together (e.g. --shard_index "
                            "$SLURM_ARRAY_TASK_ID --num_shards 8)")
    if num_shards is not None:
        if not (isinstance(num_shards, int) and num_shards >= 1):
            raise DataPrepError(f"--num_shards must be an integer >= 1 (got {num_shards!r})")
        if not (isinstance(shard_index, int) and 0 <= shard_index < num_shards):
            raise DataPrepError(f"--shard_index must be in [0, {num_shards - 1}] for "
                                f"--num_shards {num_shards} (got {shard_index!r})")
        if tokenizer is None:
            raise DataPrepError("--num_shards needs a shared --tokenizer (every shard must use "
                                "the same one): train it first with  prepare.py --input "
                                "<some files> --output TOKDIR --tokenizer_only  and pass "
                                "--tokenizer TOKDIR/tokenizer.model")
        if tokenizer_only:
            raise DataPrepError("--tokenizer_only cannot be combined with --num_shards")
    if tokenizer_only and tokenizer is not None:
        raise DataPrepError("--tokenizer_only trains a tokenizer; drop --tokenizer")
    filt = FilterSetup(lang_filter, languages, near_dup, near_dup_threshold, near_dup_memory_mb,
                       line_filters, min_line_words, max_line_repeats, min_chars)
    output = Path(output)
    check_output(output, overwrite)
    tok_proto = load_tokenizer_proto(tokenizer) if tokenizer is not None else None

    stats = Stats(sources=SourceSummary(inputs, keep_files=num_shards is not None))
    files = discover(inputs, stats)
    if not files:
        raise DataPrepError(
            "no input file found in --input " + " ".join(map(str, inputs)) +
            f" ({fmt_dropped(stats.dropped)}); give existing files or directories with "
            ".txt, .jsonl, .warc.wet[.gz], .parquet or .json files (optionally .gz), "
            "or http(s) URLs of such files")
    if num_shards is not None:
        # contiguous slices of the sorted file list: shard i's documents all come before
        # shard i+1's, so --merge can replay the global, order-dependent de-duplication
        lo, hi = len(files) * shard_index // num_shards, len(files) * (shard_index + 1) // num_shards
        shard = {"index": shard_index, "num_shards": num_shards, "first_file": lo,
                 "kinds": {1 if file_kind(f) == "wet" else 0 for f in files}}
        files = files[lo:hi]
        if shard_index:  # path-level drops of discover() are counted by shard 0 only
            stats.dropped.clear()

    with staged_output(output, overwrite) as tmp:
        manifest = _build(tmp, files, stats, inputs=inputs, num_groups=num_groups, vocab_size=vocab_size,
                          val_fraction=val_fraction, tok_proto=tok_proto, workers=workers,
                          seed=seed, text_mode=text_mode, jsonl_field=jsonl_field,
                          min_chars=min_chars, min_text_ratio=min_text_ratio,
                          max_doc_bytes=max_doc_bytes,
                          sample_bytes=int(tokenizer_sample_mb * (1 << 20)), quiet=quiet,
                          filt=filt, shard=shard, tokenizer_only=tokenizer_only)
    if tokenizer_only:
        say(quiet, f"tokenizer written to {output / 'tokenizer.model'} (from "
                   f"{manifest['documents_kept']} documents; dropped: "
                   f"{fmt_dropped(manifest['dropped'])})")
        return output
    if shard is not None:
        say(quiet, f"shard {shard_index}/{num_shards} written to {output}: "
                   f"{sum(s['num_docs'] for s in manifest['splits'].values())} documents of "
                   f"{manifest['documents_in']} read; merge all shards with  prepare.py "
                   "--merge SHARD_DIR ... --output DIR")
        return output
    summary(quiet, output, manifest, num_groups)
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
        k = 1 if file_kind(path) == "wet" else 0
        for doc in read_documents(None, stats, files=[path], **kw):
            yield fid, k, doc


def _build(tmp: Path, files, stats: Stats, *, inputs, num_groups, vocab_size, val_fraction,
           tok_proto, workers, seed, text_mode, jsonl_field, min_chars, min_text_ratio,
           max_doc_bytes, sample_bytes, quiet, filt: "FilterSetup", shard=None,
           tokenizer_only=False) -> dict:
    names = split_names(num_groups)
    cfg = (min_chars, min_text_ratio, seed, num_groups, val_fraction)
    fcs = filt.configs
    kinds = {1 if file_kind(f) == "wet" else 0 for f in files}
    filtering = any(fcs[k].any for k in kinds)
    file_ids = list(range(shard["first_file"], shard["first_file"] + len(files))) if shard \
        else list(range(len(files)))
    seen: set[int] = set()  # the one structure that grows with the corpus (see clean.py)
    timing = {}
    t0 = time.time()
    trained = tok_proto is None
    spooled = trained or filtering or shard is not None
    line_counts: collections.Counter = collections.Counter()
    lang_drops: collections.Counter = collections.Counter()
    repeated = RepeatedLines(filt.max_line_repeats) if any(fcs[k].line_filters for k in kinds) \
        else None
    index = None
    if shard is None and any(fcs[k].near_dup for k in kinds):
        index = NearDupIndex(filt.near_dup_memory_mb, filt.bands)
    if any(fcs[k].language for k in kinds):
        unknown = sorted(set(filt.languages) - set(known_languages()))
        if unknown:
            raise DataPrepError(f"--languages: {', '.join(unknown)} not known to py3langid "
                                f"(ISO 639-1 codes such as: {', '.join(sorted(known_languages()))})")
    order = None
    order_bands = filt.bands if shard is not None and \
        any(fcs[k].near_dup for k in shard["kinds"]) else 0
    with worker_pool(workers) as pool:
        if spooled:
            # pass 1: read, clean, filter, de-duplicate, assign splits -> spool file
            spool_path = tmp / "documents.spool"
            n_docs = [0] * len(names)
            train_bytes = 0
            docs = _tagged_docs(files, stats, file_ids, text_mode=text_mode,
                                jsonl_field=jsonl_field, max_doc_bytes=max_doc_bytes)
            tasks = ((cfg, fcs, c) for c in chunked(docs, size_of=lambda x: len(x[2])))
            if shard is not None:
                order = open(tmp / "order.bin", "wb", buffering=1 << 20)
                no_keys = bytes(8 * order_bands)
            with open(spool_path, "wb", buffering=1 << 20) as spool, \
                    progress(quiet, desc="clean", unit="doc") as bar:
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
                                if len(data2.decode("utf-8")) < min_chars:
                                    stats.dropped["too_short_after_line_filters"] += 1
                                    continue
                                data = data2
                                h = doc_hash(data)
                                s = split_of(h, seed, num_groups, val_fraction)
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
                check_kept(n_docs, names, stats, files, num_groups, val_fraction,
                           tokenizer_only=tokenizer_only)
            timing["clean_s"] = time.time() - t0
            if trained:
                tok_proto = train_tokenizer(_spool_records(spool_path), tmp, train_bytes, sample_bytes,
                                             vocab_size, quiet)
            timing["tokenizer_s"] = time.time() - t0 - timing["clean_s"]
        (tmp / "tokenizer.model").write_bytes(tok_proto)
        if tokenizer_only:
            spool_path.unlink()
            manifest = tokenizer_manifest(tok_proto, stats, sum(n_docs))
            write_json(tmp / "manifest.json", manifest)
            return manifest
        vocab, eos_id = vocab_and_eos(tok_proto, trained, vocab_size, quiet)
        dtype = token_dtype(vocab)
        tok_cfg = (str(tmp / "tokenizer.model"), eos_id, dtype)
        writer = ShardWriter(tmp, names, dtype)
        t1 = time.time()
        n_tok = 0
        try:
            with progress(quiet, desc="tokenize", unit="doc",
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
                    docs = read_documents(None, stats, text_mode=text_mode,
                                          jsonl_field=jsonl_field, max_doc_bytes=max_doc_bytes,
                                          files=files)
                    tasks = ((cfg, tok_cfg, c) for c in chunked(docs))
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
        check_kept(n_docs, names, stats, files, num_groups, val_fraction)
    timing["tokenize_s"] = time.time() - t1
    fsync_tokens(tmp, splits)
    common = dict(tok_proto=tok_proto, trained=trained, vocab=vocab, dtype=dtype, eos_id=eos_id,
                  num_groups=num_groups, seed=seed, val_fraction=val_fraction,
                  cleaning={"text_mode": text_mode, "jsonl_field": jsonl_field,
                            "min_chars": min_chars, "min_text_ratio": min_text_ratio,
                            "max_doc_bytes": max_doc_bytes})
    if shard is not None:
        manifest = {"format_version": FORMAT_VERSION, "shard": True,
                    "shard_index": shard["index"], "num_shards": shard["num_shards"],
                    "inputs": [str(i) for i in inputs], "common": {**common, "tok_proto": None},
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
        _fill_filter_counts(filters, line_counts, lang_drops, index)
        manifest = make_manifest(**common, splits=splits, dropped=stats.dropped,
                                 documents_in=stats.documents_in, filters=filters,
                                 sources=stats.sources.summary())
        write_json(tmp / "manifest.json", manifest)
    if os.environ.get("DATA_PREP_TIMING"):
        print(json.dumps({**timing, "tokens": n_tok, "docs": sum(n_docs)}), file=sys.stderr,
              flush=True)
    return manifest


SHARD_MANIFEST = "shard_manifest.json"


def _fill_filter_counts(filters: dict, line_counts, lang_drops, index) -> None:
    if "line_filters" in filters:
        filters["line_filters"]["lines_dropped"] = {r: int(line_counts.get(r, 0))
                                                    for r in LINE_REASONS}
    if "language" in filters:
        filters["language"]["dropped_by_language"] = dict(sorted(lang_drops.items()))
    if "near_dup" in filters and index is not None:
        filters["near_dup"]["index"] = index.stats()


class FilterSetup:
    """The resolved filter options: one FilterConfig for non-WET input (index 0) and one for
    Common Crawl WET input (index 1); 'auto' means on for WET only."""

    def __init__(self, lang_filter="auto", languages=DEFAULT_LANGUAGES, near_dup="auto",
                 near_dup_threshold=DEFAULT_NEAR_DUP_THRESHOLD,
                 near_dup_memory_mb=DEFAULT_NEAR_DUP_MEMORY_MB, line_filters="auto",
                 min_line_words=DEFAULT_MIN_LINE_WORDS, max_line_repeats=DEFAULT_MAX_LINE_REPEATS,
                 min_chars=DEFAULT_MIN_CHARS):
        for flag, v in (("--lang_filter", lang_filter), ("--near_dup", near_dup),
                        ("--line_filters", line_filters)):
            if v not in FILTER_MODES:
                raise DataPrepError(f"{flag} must be one of {', '.join(FILTER_MODES)} (got {v!r})")
        if isinstance(languages, str):
            languages = languages.split(",")
        languages = tuple(sorted({x.strip() for x in languages if x.strip()}))
        if not languages:
            raise DataPrepError("--languages: give at least one language code, e.g. en or en,de")
        if not (0 < near_dup_threshold < 1):
            raise DataPrepError(f"--near_dup_threshold must be in (0, 1) (got {near_dup_threshold!r})")
        if near_dup_memory_mb <= 0:
            raise DataPrepError(f"--near_dup_memory_mb must be > 0 (got {near_dup_memory_mb!r})")
        if min_line_words < 0 or max_line_repeats < 1:
            raise DataPrepError("--min_line_words must be >= 0 and --max_line_repeats >= 1")
        self.modes = {"language": lang_filter, "near_dup": near_dup, "line_filters": line_filters}
        self.languages = languages
        self.near_dup_threshold = float(near_dup_threshold)
        self.near_dup_memory_mb = float(near_dup_memory_mb)
        self.min_line_words = int(min_line_words)
        self.max_line_repeats = int(max_line_repeats)
        self.configs = tuple(FilterConfig(
            line_filters=resolve_mode(line_filters, wet), language=resolve_mode(lang_filter, wet),
            near_dup=resolve_mode(near_dup, wet), languages=languages,
            min_line_words=self.min_line_words, min_chars=min_chars,
            near_dup_threshold=self.near_dup_threshold) for wet in (False, True))

    @property
    def bands(self) -> int:  # LSH parameters (imports datasketch + scipy: only when used)
        return lsh_params(self.near_dup_threshold, DEFAULT_NUM_PERM)[0]

    @property
    def rows(self) -> int:
        return lsh_params(self.near_dup_threshold, DEFAULT_NUM_PERM)[1]

    def describe(self, kinds_all) -> dict:
        """Manifest entry; ``kinds_all``: which input kinds occur (0 other, 1 WET)."""
        def applies(name):
            on = [("other", "wet")[k] for k in sorted(kinds_all) if getattr(self.configs[k], name)]
            return on
        out = {}
        if applies("line_filters"):
            out["line_filters"] = {"mode": self.modes["line_filters"],
                                   "applies_to": applies("line_filters"),
                                   "min_line_words": self.min_line_words,
                                   "terminal_punctuation": True,
                                   "max_line_repeats": self.max_line_repeats,
                                   "repeat_scope": "per input file"}
        if applies("language"):
            out["language"] = {"mode": self.modes["language"], "applies_to": applies("language"),
                               "languages": list(self.languages), "library": langid_version(),
                               "chars_looked_at": LANGID_MAX_CHARS}
        if applies("near_dup"):
            out["near_dup"] = {"mode": self.modes["near_dup"], "applies_to": applies("near_dup"),
                               "threshold": self.near_dup_threshold, "num_perm": DEFAULT_NUM_PERM,
                               "bands": self.bands, "rows": self.rows,
                               "shingles": f"word {DEFAULT_SHINGLE}-grams, lower-cased",
                               "minhash": "datasketch MinHash, affine32, seed 1, BLAKE2b-32",
                               "memory_mb": self.near_dup_memory_mb}
        return out


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
        _fill_filter_counts(filters, line_counts, lang_drops, index)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Clean text, train/reuse a SentencePiece tokenizer and write disjoint "
                    "token shards (val + G groups).")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="files or directories (recursive): .txt, .jsonl, .warc.wet, .parquet, "
                        ".json, optionally .gz")
    p.add_argument("--sample", action="store_true",
                   help="use the embedded BBC News corpus instead of --input (defaults: "
                        "--output data/sample --num_groups 6 --val_fraction 0.05)")
    p.add_argument("--output", metavar="DIR")
    p.add_argument("--num_groups", type=int)
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--val_fraction", type=float)
    p.add_argument("--tokenizer", metavar="EXISTING.model", help="reuse this SentencePiece model")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--text_mode", choices=TEXT_MODES,
                   help=".txt files: documents separated by blank lines (default), one per "
                        "file, or one per line")
    p.add_argument("--jsonl_field", default="text")
    p.add_argument("--min_chars", type=int, default=DEFAULT_MIN_CHARS)
    p.add_argument("--min_text_ratio", type=float, default=DEFAULT_MIN_TEXT_RATIO)
    p.add_argument("--max_doc_bytes", type=int, default=DEFAULT_MAX_DOC_BYTES)
    p.add_argument("--tokenizer_sample_mb", type=float, default=32,
                   help="train the tokenizer on a hash-selected sample of at most this many "
                        "MiB of training documents (bounds its memory, ~30x the sample)")
    p.add_argument("--quiet", action="store_true")
    f = p.add_argument_group(
        "web-text filters", "each 'auto' (the default) = on for Common Crawl WET input "
        "(.warc.wet[.gz] files or URLs), off for other input; 'on'/'off' for every input")
    f.add_argument("--lang_filter", choices=FILTER_MODES, default="auto",
                   help="language ID (py3langid): keep --languages, count the rest")
    f.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES),
                   help="comma-separated ISO 639-1 codes to keep (default %(default)s)")
    f.add_argument("--near_dup", choices=FILTER_MODES, default="auto",
                   help="near-duplicate removal (MinHash LSH over word 5-grams)")
    f.add_argument("--near_dup_threshold", type=float, default=DEFAULT_NEAR_DUP_THRESHOLD,
                   help="Jaccard similarity above which a later document is dropped")
    f.add_argument("--near_dup_memory_mb", type=float, default=DEFAULT_NEAR_DUP_MEMORY_MB,
                   help="fixed size of the LSH Bloom index: ~75 MiB per million kept "
                        "documents keeps false matches under 1e-4 (see filters.py)")
    f.add_argument("--line_filters", choices=FILTER_MODES, default="auto",
                   help="drop short lines, lines without terminal punctuation and lines "
                        "repeated in many documents of the same file")
    f.add_argument("--min_line_words", type=int, default=DEFAULT_MIN_LINE_WORDS)
    f.add_argument("--max_line_repeats", type=int, default=DEFAULT_MAX_LINE_REPEATS,
                   help="a line seen in this many earlier documents of a file is removed")
    c = p.add_argument_group("cluster", "N independent workers over disjoint slices of the "
                             "input list, then one merge (see slurm/prepare_data_array.sh)")
    c.add_argument("--shard_index", type=int, help="this worker's slice (0-based)")
    c.add_argument("--num_shards", type=int, help="number of slices (needs --tokenizer)")
    c.add_argument("--merge", nargs="+", metavar="SHARD_DIR",
                   help="merge the shard outputs into --output (no re-tokenization)")
    c.add_argument("--tokenizer_only", action="store_true",
                   help="only train the tokenizer: writes DIR/tokenizer.model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. SLURM) -> SystemExit, so the temporary directory is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.merge:
            if args.input or args.sample or not args.output:
                raise DataPrepError("--merge SHARD_DIR ... takes only --output DIR (and "
                                    "--overwrite/--quiet); drop --input/--sample")
            merge(args.merge, args.output, overwrite=args.overwrite, quiet=args.quiet)
            return 0
        if args.sample:
            if args.input:
                raise DataPrepError("--sample and --input are exclusive; drop one of them")
            try:
                inputs = [sample_corpus_dir()]
            except SampleCorpusMissing as e:
                raise DataPrepError(str(e)) from None
            output = args.output or "data/sample"
            num_groups = SAMPLE_DEFAULTS["num_groups"] if args.num_groups is None else args.num_groups
            val_fraction = (SAMPLE_DEFAULTS["val_fraction"] if args.val_fraction is None
                            else args.val_fraction)
            text_mode = args.text_mode or SAMPLE_DEFAULTS["text_mode"]
        else:
            if args.tokenizer_only and args.num_groups is None:
                args.num_groups = 1
            missing = [f for f, v in (("--input", args.input), ("--output", args.output),
                                      ("--num_groups", args.num_groups)) if v is None]
            if missing:
                raise DataPrepError(f"{', '.join(missing)} required (or use --sample for the "
                                    "embedded corpus)")
            inputs, output, num_groups = args.input, args.output, args.num_groups
            val_fraction = 0.01 if args.val_fraction is None else args.val_fraction
            text_mode = args.text_mode or "blank_line"
        prepare(inputs, output, num_groups=num_groups, vocab_size=args.vocab_size,
                val_fraction=val_fraction, tokenizer=args.tokenizer, workers=args.workers,
                seed=args.seed, overwrite=args.overwrite, text_mode=text_mode,
                jsonl_field=args.jsonl_field, min_chars=args.min_chars,
                min_text_ratio=args.min_text_ratio, max_doc_bytes=args.max_doc_bytes,
                tokenizer_sample_mb=args.tokenizer_sample_mb, quiet=args.quiet,
                lang_filter=args.lang_filter, languages=args.languages, near_dup=args.near_dup,
                near_dup_threshold=args.near_dup_threshold,
                near_dup_memory_mb=args.near_dup_memory_mb, line_filters=args.line_filters,
                min_line_words=args.min_line_words, max_line_repeats=args.max_line_repeats,
                shard_index=args.shard_index, num_shards=args.num_shards,
                tokenizer_only=args.tokenizer_only)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
