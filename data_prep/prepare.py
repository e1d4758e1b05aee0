"""Text -> cleaned documents -> SentencePiece -> disjoint token shards.

    python data_prep/prepare.py --input PATH [PATH ...] --output DIR --num_groups G \\
        [--vocab_size 8000] [--val_fraction 0.01] [--tokenizer EXISTING.model] [--workers N] \\
        [--seed S] [--overwrite] [--text_mode blank_line|file|line] [--jsonl_field text] \\
        [--min_chars 200] [--min_text_ratio 0.8] [--tokenizer_sample_mb 32] [--quiet]
    python data_prep/prepare.py --sample [--output data/sample]     # embedded BBC News corpus

Pipeline (two streaming passes; memory does not grow with the corpus except for the
de-duplication set, ~70 bytes per kept document):
  1. read inputs (readers.py) -> clean + hash in workers (clean.py) -> drop duplicates in
     input order -> append kept documents to a spool file in the temporary output dir;
  2. train SentencePiece on a hash-selected sample of at most --tokenizer_sample_mb of
     training documents (or reuse --tokenizer);
  3. read the spool -> encode in workers (order preserved) -> per-split .bin/.idx.npy/
     .hashes.npy -> manifest.json -> atomic rename of the temporary dir to DIR.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import collections
import hashlib
import io
import json
import logging
import operator
import os
import shutil
import signal
import struct
import time
import uuid

import numpy as np

from data_prep.clean import DEFAULT_MIN_CHARS, DEFAULT_MIN_TEXT_RATIO
from data_prep.parallel import (chunked, clean_chunk, clean_encode_chunk, encode_chunk,
                                ordered_map, worker_pool)
from data_prep.readers import DEFAULT_MAX_DOC_BYTES, TEXT_MODES, Stats, discover, read_documents
from data_prep.sample import SAMPLE_DEFAULTS, SampleCorpusMissing, sample_corpus_dir

log = logging.getLogger("data_prep")

FORMAT_VERSION = 1
MIN_VOCAB = 300
_REC = struct.Struct("<IQI")  # split index, doc hash, byte length


class DataPrepError(ValueError):
    """A user-facing error: the message names the path/flag and the fix."""


class OutputExistsError(DataPrepError):
    pass


def split_names(num_groups: int) -> list[str]:
    return ["val"] + [f"group_{g}" for g in range(num_groups)]


def is_prepared(path) -> bool:
    """True if ``path`` holds a complete prepared dataset (manifest + all split files)."""
    path = Path(path)
    try:
        m = json.loads((path / "manifest.json").read_text())
        if m.get("format_version") != FORMAT_VERSION or not (path / m["tokenizer"]).is_file():
            return False
        return all((path / s["tokens"]).is_file() and (path / s["doc_index"]).is_file()
                   for s in m["splits"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def load_tokenizer_proto(path) -> bytes:
    """Read and validate an existing SentencePiece model; DataPrepError if it is not one."""
    import sentencepiece as spm

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataPrepError(f"--tokenizer {path}: cannot read it ({e.strerror}); pass an "
                            "existing SentencePiece .model file or omit --tokenizer") from None
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
        if sp.get_piece_size() <= 0:
            raise RuntimeError("empty vocabulary")
    except Exception as e:  # noqa: BLE001
        raise DataPrepError(f"--tokenizer {path} is not a SentencePiece model ({e}); pass a "
                            ".model file written by SentencePiece, or omit --tokenizer to "
                            "train one") from None
    if sp.eos_id() < 0:
        raise DataPrepError(f"--tokenizer {path} has no EOS id (eos_id=-1); documents are "
                            "separated by EOS, so train it with eos_id set, or omit --tokenizer")
    return data


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        if not output.is_dir() or any(output.iterdir()):
            raise OutputExistsError(
                f"--output {output} already exists and is not empty; pass --overwrite to "
                "replace it, or choose another --output")


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _progress(quiet: bool, **kw):
    from tqdm import tqdm

    return tqdm(disable=quiet, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


def _fmt_dropped(dropped) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "nothing"


def prepare(inputs, output, num_groups: int, vocab_size: int = 8000, val_fraction: float = 0.01,
            tokenizer=None, workers: int = 1, seed: int = 1234, overwrite: bool = False,
            text_mode: str = "blank_line", jsonl_field: str = "text",
            min_chars: int = DEFAULT_MIN_CHARS, min_text_ratio: float = DEFAULT_MIN_TEXT_RATIO,
            max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, tokenizer_sample_mb: float = 32,
            quiet: bool = False) -> Path:
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
    output = Path(output)
    _check_output(output, overwrite)
    tok_proto = load_tokenizer_proto(tokenizer) if tokenizer is not None else None

    stats = Stats(sources=SourceSummary(inputs))
    files = discover(inputs, stats)
    if not files:
        raise DataPrepError(
            "no input file found in --input " + " ".join(map(str, inputs)) +
            f" ({_fmt_dropped(stats.dropped)}); give existing files or directories with "
            ".txt, .jsonl, .warc.wet[.gz], .parquet or .json files (optionally .gz)")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _build(tmp, files, stats, inputs=inputs, num_groups=num_groups, vocab_size=vocab_size,
                          val_fraction=val_fraction, tok_proto=tok_proto, workers=workers,
                          seed=seed, text_mode=text_mode, jsonl_field=jsonl_field,
                          min_chars=min_chars, min_text_ratio=min_text_ratio,
                          max_doc_bytes=max_doc_bytes,
                          sample_bytes=int(tokenizer_sample_mb * (1 << 20)), quiet=quiet)
        _publish(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sp = manifest["splits"]
    _say(quiet, f"prepared {output}: kept {manifest['documents_kept']} of "
                f"{manifest['documents_in']} documents, "
                f"{sum(s['num_tokens'] for s in sp.values())} tokens "
                f"(val {sp['val']['num_docs']} docs; {num_groups} groups "
                f"{min(sp[f'group_{g}']['num_docs'] for g in range(num_groups))}-"
                f"{max(sp[f'group_{g}']['num_docs'] for g in range(num_groups))} docs each), "
                f"vocab {manifest['vocab_size']}; dropped: {_fmt_dropped(manifest['dropped'])}")
    return output


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished temp dir to ``output`` (atomic on one filesystem)."""
    if output.exists() or output.is_symlink():
        if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
            try:
                output.rmdir()
            except OSError:
                pass
        elif overwrite:
            old = output.parent / f"{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(output, old)
            os.rename(tmp, output)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
            return
        else:
            raise OutputExistsError(f"--output {output} appeared while preparing and is not "
                                    "empty; pass --overwrite to replace it")
    try:
        os.rename(tmp, output)
    except OSError as e:
        raise OutputExistsError(f"--output {output}: cannot move the finished dataset into "
                                f"place ({e.strerror}); pass --overwrite or remove it") from None


def _spool_records(path: Path):
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            head = f.read(_REC.size)
            if not head:
                return
            s, h, n = _REC.unpack(head)
            yield s, h, f.read(n)


def _train_tokenizer(spool: Path, tmp: Path, train_bytes: int, sample_bytes: int,
                     vocab_size: int, quiet: bool) -> bytes:
    import sentencepiece as spm

    frac = min(1.0, sample_bytes / max(train_bytes, 1))
    threshold = int(frac * 2**32)
    sample = tmp / "tokenizer_sample.txt"
    n = nbytes = 0
    with open(sample, "wb") as f:
        for s, h, data in _spool_records(spool):
            if s > 0 and (frac >= 1.0 or (h >> 32) < threshold):
                f.write(data)
                f.write(b"\n")
                n += 1
                nbytes += len(data)
    _say(quiet, f"training SentencePiece (unigram, vocab {vocab_size}) on {n} documents, "
                f"{nbytes / 2**20:.2f} MiB ...")
    model = io.BytesIO()

    def sentences():  # an iterator, not input=PATH: the path would be stored in the model
        with open(sample, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type="unigram", vocab_size=vocab_size,
            character_coverage=0.9995, byte_fallback=True, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=0, shuffle_input_sentence=False,  # the sample is bounded here
            max_sentence_length=1 << 16, num_threads=1,  # one thread: byte-identical output
            minloglevel=2)
    except Exception as e:  # noqa: BLE001
        raise DataPrepError(f"SentencePiece training failed ({e}); try a smaller --vocab_size "
                            "or more input text") from None
    finally:
        sample.unlink(missing_ok=True)
    return model.getvalue()


class ShardWriter:
    """Appends documents to <split>.bin and records offsets/hashes; writes the .npy files
    at the end (offsets and hashes go to raw temp files first, so nothing is held in RAM)."""

    def __init__(self, root: Path, names: list[str], dtype: str):
        self.root, self.names, self.dtype = root, names, np.dtype(dtype)
        self.bins = [open(root / f"{n}.bin", "wb", buffering=1 << 20) for n in names]
        self.offs = [open(root / f"{n}.idx.raw", "wb", buffering=1 << 16) for n in names]
        self.hashes = [open(root / f"{n}.hashes.raw", "wb", buffering=1 << 16) for n in names]
        self.ntok = [0] * len(names)
        self.ndoc = [0] * len(names)

    def add_chunk(self, meta, flat: np.ndarray, lengths: np.ndarray) -> int:
        """meta: per document (split, hash) or None (skip); flat/lengths: its tokens."""
        ends = np.cumsum(lengths).tolist()
        start = written = 0
        for m, end in zip(meta, ends):
            if m is not None:
                s, h = m
                self.bins[s].write(flat[start:end].tobytes())
                self.ntok[s] += end - start
                written += end - start
                self.ndoc[s] += 1
                self.offs[s].write(_Q.pack(self.ntok[s]))
                self.hashes[s].write(_Q.pack(h))
            start = end
        return written

    def close(self) -> dict:
        for f in self.bins + self.offs + self.hashes:
            f.close()
        splits = {}
        for i, n in enumerate(self.names):
            _raw_to_npy(self.root / f"{n}.idx.raw", self.root / f"{n}.idx.npy", np.int64,
                        self.ndoc[i], prefix=np.zeros(1, np.int64))
            _raw_to_npy(self.root / f"{n}.hashes.raw", self.root / f"{n}.hashes.npy",
                        np.uint64, self.ndoc[i])
            splits[n] = {"tokens": f"{n}.bin", "doc_index": f"{n}.idx.npy",
                         "num_docs": self.ndoc[i], "num_tokens": self.ntok[i],
                         "doc_hashes": f"{n}.hashes.npy"}
        return splits

    def abort(self) -> None:
        for f in self.bins + self.offs + self.hashes:
            f.close()


_Q = struct.Struct("<Q")


def _raw_to_npy(raw: Path, dest: Path, dtype, n: int, prefix=None) -> None:
    dtype = np.dtype(dtype).newbyteorder("<")
    shape = n + (0 if prefix is None else len(prefix))
    with open(dest, "wb") as f, open(raw, "rb") as r:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": (shape,)})
        if prefix is not None:
            f.write(np.asarray(prefix, dtype).tobytes())
        shutil.copyfileobj(r, f, 1 << 20)
    raw.unlink()


class SourceSummary:
    """Aggregates per-file source entries into one manifest entry per --input argument
    (files, bytes, documents, skipped files, and a sha256 over the (relative path, file
    sha256) pairs in read order), so memory and manifest size do not grow with file count."""

    def __init__(self, inputs):
        self.entries = []
        for inp in (str(Path(i)) for i in inputs):  # normalised like discover()'s paths
            self.entries.append((inp, inp.rstrip(os.sep) + os.sep, hashlib.sha256(),
                                 {"path": inp, "files": 0, "bytes": 0, "documents": 0,
                                  "files_skipped": 0}))

    def append(self, src: dict) -> None:
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


def _check_kept(n_docs, names, stats, files, num_groups, val_fraction) -> None:
    kept = sum(n_docs)
    if kept == 0:
        raise DataPrepError(
            f"nothing usable remains: {stats.documents_in} documents read from {len(files)} "
            f"files, dropped: {_fmt_dropped(stats.dropped)}. Check --input/--text_mode/"
            "--jsonl_field, or relax --min_chars/--min_text_ratio")
    empty = [names[i] for i in range(len(names)) if n_docs[i] == 0]
    if empty:
        raise DataPrepError(
            f"split(s) {', '.join(empty)} would be empty ({kept} documents kept for "
            f"{num_groups} groups at --val_fraction {val_fraction}); add more data, use fewer "
            "--num_groups or a larger --val_fraction")


def _build(tmp: Path, files, stats: Stats, *, inputs, num_groups, vocab_size, val_fraction,
           tok_proto, workers, seed, text_mode, jsonl_field, min_chars, min_text_ratio,
           max_doc_bytes, sample_bytes, quiet) -> dict:
    names = split_names(num_groups)
    cfg = (min_chars, min_text_ratio, seed, num_groups, val_fraction)
    docs = read_documents(None, stats, text_mode=text_mode, jsonl_field=jsonl_field,
                          max_doc_bytes=max_doc_bytes, files=files)
    seen: set[int] = set()  # the one structure that grows with the corpus (see clean.py)
    timing = {}
    t0 = time.time()
    trained = tok_proto is None
    with worker_pool(workers) as pool:
        if trained:
            # pass 1: read, clean, de-duplicate, assign splits -> spool file
            spool_path = tmp / "documents.spool"
            n_docs = [0] * len(names)
            train_bytes = 0
            tasks = ((cfg, c) for c in chunked(docs))
            with open(spool_path, "wb", buffering=1 << 20) as spool, \
                    _progress(quiet, desc="clean", unit="doc") as bar:
                for results in ordered_map(clean_chunk, tasks, pool):
                    for r in results:
                        if isinstance(r, str):
                            stats.dropped[r] += 1
                            continue
                        data, h, s = r
                        if h in seen:
                            stats.dropped["duplicate"] += 1
                            continue
                        seen.add(h)
                        spool.write(_REC.pack(s, h, len(data)))
                        spool.write(data)
                        n_docs[s] += 1
                        if s:
                            train_bytes += len(data)
                    bar.update(len(results))
            seen.clear()
            _check_kept(n_docs, names, stats, files, num_groups, val_fraction)
            timing["clean_s"] = time.time() - t0
            tok_proto = _train_tokenizer(spool_path, tmp, train_bytes, sample_bytes, vocab_size,
                                         quiet)
            timing["tokenizer_s"] = time.time() - t0 - timing["clean_s"]
        (tmp / "tokenizer.model").write_bytes(tok_proto)
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=tok_proto)
        vocab, eos_id = sp.get_piece_size(), sp.eos_id()
        if trained and vocab < vocab_size:
            _say(quiet, f"note: the training sample supports only {vocab} pieces; using vocab "
                        f"{vocab} instead of --vocab_size {vocab_size} (add data for a larger one)")
        dtype = "uint16" if vocab < 65536 else "uint32"
        tok_cfg = (str(tmp / "tokenizer.model"), eos_id, dtype)
        writer = ShardWriter(tmp, names, dtype)
        t1 = time.time()
        n_tok = 0
        try:
            with _progress(quiet, desc="tokenize", unit="doc",
                           total=sum(n_docs) if trained else None) as bar:
                if trained:  # pass 2: spool -> encode -> shards
                    metas: collections.deque = collections.deque()

                    def tasks():
                        for chunk in chunked(_spool_records(spool_path),
                                             size_of=lambda r: len(r[2])):
                            metas.append([(s, h) for s, h, _ in chunk])
                            yield tok_cfg, [d for _, _, d in chunk]

                    for flat, lengths in ordered_map(encode_chunk, tasks(), pool):
                        meta = metas.popleft()
                        n_tok += writer.add_chunk(meta, flat, lengths)
                        bar.update(len(meta))
                        bar.set_postfix_str(f"{n_tok / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s",
                                            refresh=False)
                    spool_path.unlink()
                else:  # fused single pass: read -> clean + encode in workers -> dedup -> shards
                    tasks = ((cfg, tok_cfg, c) for c in chunked(docs))
                    for meta, flat, lengths in ordered_map(clean_encode_chunk, tasks, pool):
                        keep = []
                        for m in meta:
                            if isinstance(m, str):
                                stats.dropped[m] += 1
                                continue
                            h, s = m
                            if h in seen:
                                stats.dropped["duplicate"] += 1
                                keep.append(None)
                                continue
                            seen.add(h)
                            keep.append((s, h))
                        n_tok += writer.add_chunk(keep, flat, lengths)
                        bar.update(len(meta))
                        bar.set_postfix_str(f"{n_tok / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s",
                                            refresh=False)
        except BaseException:
            writer.abort()
            raise
    splits = writer.close()
    n_docs = [splits[n]["num_docs"] for n in names]
    _check_kept(n_docs, names, stats, files, num_groups, val_fraction)
    timing["tokenize_s"] = time.time() - t1
    for n in names:
        with open(tmp / splits[n]["tokens"], "rb+") as f:
            os.fsync(f.fileno())

    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": "tokenizer.model",
        "tokenizer_sha256": hashlib.sha256(tok_proto).hexdigest(),
        "tokenizer_trained": trained,
        "vocab_size": vocab,
        "dtype": dtype,
        "eos_id": eos_id,
        "num_groups": num_groups,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": splits,
        "dropped": dict(sorted(stats.dropped.items())),
        "documents_in": stats.documents_in,
        "documents_kept": sum(n_docs),
        "doc_hash": "blake2b-64 of the normalised UTF-8 text (uint64, little-endian)",
        "split_hash": "blake2b-128 keyed by seed: val if first 64 bits / 2^64 < val_fraction, "
                      "else group = last 64 bits mod num_groups",
        "cleaning": {"text_mode": text_mode, "jsonl_field": jsonl_field, "min_chars": min_chars,
                     "min_text_ratio": min_text_ratio, "max_doc_bytes": max_doc_bytes,
                     "unicode": "NFC", "whitespace": "runs collapsed to one space, lines "
                     "stripped, empty lines removed (paragraphs separated by one newline)"},
        "sources": stats.sources.summary(),
    }
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    if os.environ.get("DATA_PREP_TIMING"):
        print(json.dumps({**timing, "tokens": n_tok, "docs": sum(n_docs)}), file=sys.stderr,
              flush=True)
    return manifest


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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. SLURM) -> SystemExit, so the temporary directory is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
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
                tokenizer_sample_mb=args.tokenizer_sample_mb, quiet=args.quiet)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
