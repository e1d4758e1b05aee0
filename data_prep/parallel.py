"""Worker-side functions and an order-preserving, memory-bounded parallel map.

``multiprocessing.Pool.imap`` pulls its whole input iterator as fast as it can (its task
feeder thread does not wait for results), so on a large corpus it would hold the corpus in
memory. ``ordered_map`` keeps a bounded number of chunks in flight and yields results in
submission order, so the output is identical for any worker count. The main process runs
chunks itself whenever the helpers are busy, so ``--workers N`` means N busy processes.

One pool serves every pass: each task carries its small config, and the tokenizer is loaded
once per worker from the path in the config (cached by path: a SentencePiece .model file, or
a dataset's tokenizer/ directory for a Hugging Face tokenizer).
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from data_prep import ONE_THREAD_ENV
from data_prep.clean import clean_document, doc_hash, split_of, splits_of

_TOK: dict = {}


def _tokenizer(path: str):
    """(kind, tokenizer) of a task, loaded once per process: ``path`` is a SentencePiece .model
    file, or a dataset's tokenizer/ directory (a Hugging Face tokenizer: "hf", loaded as a
    ``tokenizers.Tokenizer``, see hf_tokenizer.hf_backend)."""
    got = _TOK.get(path)
    if got is None:
        _TOK.clear()
        if os.path.isdir(path):
            from data_prep.hf_tokenizer import hf_backend

            got = ("hf", hf_backend(path))
        else:
            import sentencepiece as spm

            got = ("sentencepiece", spm.SentencePieceProcessor(model_file=path))
        _TOK[path] = got
    return got


def _encode(kind: str, tok, texts: list[bytes], eos: int, dtype: str):
    """Token ids of ``texts`` (UTF-8) with EOS after each, flat, and the per-document lengths.

    SentencePiece hands back one int32 buffer per document (no Python int per token); a
    Hugging Face tokenizer encodes the chunk with one ``encode_batch_fast`` call (encode_batch
    without character offsets; the same ids), on this process's thread (worker_pool sets
    TOKENIZERS_PARALLELISM=false: data_prep parallelises over processes)."""
    if not texts:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    if kind == "hf":
        encs = tok.encode_batch_fast([t.decode("utf-8") for t in texts], add_special_tokens=False)
        ids = [e.ids for e in encs]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    else:
        ids = tok.encode(texts, num_threads=1, out_type="numpy")
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.concatenate(ids).astype(dtype)
    flat = np.insert(flat, np.cumsum(lengths), np.asarray(eos, dtype=dtype))
    return flat, lengths + 1


def filter_clean_chunk(task):
    """(cfg, filter configs, [(file id, filter config index, raw doc)]) -> (results, line counts).

    Per doc a drop reason (str; "language:<code>" for a language drop) or
    (file id, filter config index, utf8 bytes, doc hash, split, band keys or None). With the line filters on, the
    caller may still remove repeated lines and must then re-hash (see prepare.py)."""
    from data_prep.filters import apply_doc_filters

    (min_chars, min_ratio, seed, g, vf), fcs, items = task
    out, line_counts = [], {}
    for fid, k, raw in items:
        r = clean_document(raw, min_chars, min_ratio)
        if not isinstance(r, str) and fcs[k].any:
            f = apply_doc_filters(r.decode("utf-8"), fcs[k], line_counts)
            if isinstance(f, str):
                r = f
            else:
                text, _lang, keys = f
                data = text.encode("utf-8")
                out.append((fid, k, data, h := doc_hash(data), split_of(h, seed, g, vf), keys))
                continue
        out.append(r if isinstance(r, str) else (fid, k, r, h := doc_hash(r), split_of(h, seed, g, vf), None))
    return out, line_counts


def clean_encode_chunk(task):
    """Fused pass (tokenizer known up front): clean + hash + split + encode.

    task = (clean cfg, (tokenizer path, eos, dtype), raw docs); clean cfg = (min_chars,
    min_text_ratio, seed, num_groups, val_fraction). Returns (drop reasons of the dropped
    docs, then for the kept ones in order: hashes (uint64), splits, flat tokens, lengths).
    Duplicates are decided by the caller, in input order."""
    (min_chars, min_ratio, seed, g, vf), (model, eos, dtype), docs = task
    drops, texts, hashes = [], [], []
    for raw in docs:
        r = clean_document(raw, min_chars, min_ratio)
        if isinstance(r, str):
            drops.append(r)
        else:
            texts.append(r)
            hashes.append(doc_hash(r))
    h = np.array(hashes, dtype=np.uint64)
    flat, lengths = _encode(*_tokenizer(model), texts, eos, dtype)
    return drops, h, splits_of(h, seed, g, vf), flat, lengths


def encode_chunk(task):
    """((tokenizer path, eos, dtype), [utf8 bytes]) -> (tokens with EOS after each doc,
    lengths): the encoding step of every pass (the fused pass's clean_encode_chunk too); the
    path is a SentencePiece .model file or a Hugging Face tokenizer/ directory."""
    (model, eos, dtype), texts = task
    return _encode(*_tokenizer(model), texts, eos, dtype)


def start_method() -> str:
    """``fork`` where it is safe - this process has exactly one thread, native ones included
    (no BLAS/OpenMP pool, no Python thread) and no torch - so that helpers start at once with
    every module imported (a spawned helper spends ~0.2 CPU-s importing numpy and
    SentencePiece); ``spawn`` otherwise, e.g. when the trainer or a test calls prepare().

    The command line sets OPENBLAS_NUM_THREADS=1 before numpy is imported, so it is one
    thread here. (A fork from a process whose OpenBLAS pool was running once hung a helper in
    the web-text filter path: that is the case this check excludes.)"""
    if "fork" not in mp.get_all_start_methods() or "torch" in sys.modules:
        return "spawn"
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: no cheap way to count native threads
        return "spawn"
    return "fork" if threads == 1 else "spawn"


def _helper_init() -> None:
    # a forked helper inherits the command line's SIGTERM handler; the pool's terminate()
    # should simply end it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def worker_pool(workers: int):
    """Helpers for ``workers`` processes in all: the main process (which also reads,
    de-duplicates and writes) plus ``workers - 1`` helpers (see start_method), or None for
    in-process. Inside the block the Hugging Face tokenizers library runs on the calling
    thread (TOKENIZERS_PARALLELISM=false unless set), in this process and the helpers."""
    tok_env = "TOKENIZERS_PARALLELISM"
    tok_saved = os.environ.get(tok_env)
    os.environ.setdefault(tok_env, ONE_THREAD_ENV[tok_env])
    try:
        if workers <= 1:
            yield None
            return
        pool = _start_pool(workers - 1)
        with pool:
            yield pool
    finally:
        if tok_saved is None:
            os.environ.pop(tok_env, None)


def _start_pool(helpers: int):
    # one thread per process: BLAS thread pools (numpy's OpenBLAS starts one per core at
    # import, ~0.1 CPU-s of spinning) only compete with the other processes here
    saved = {k: os.environ.get(k) for k in ONE_THREAD_ENV}
    for k, v in ONE_THREAD_ENV.items():
        os.environ.setdefault(k, v)
    try:  # the helpers start with this environment
        pool = mp.get_context(start_method()).Pool(helpers, initializer=_helper_init)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    _widen_pipes(pool)
    return pool


def _widen_pipes(pool) -> None:
    """Let one task (a chunk of ~0.5-1 MiB) go through the pool's pipes in one write: with
    the default 64 KiB pipe a chunk needs ~16 hand-offs between the pool's feeder thread and
    the helper, each a wake-up on cores that are both busy encoding (the helpers then wait
    ~3 ms per chunk). Linux only; best effort (pool internals, a per-user pipe size limit)."""
    try:
        import fcntl

        with open("/proc/sys/fs/pipe-max-size") as f:
            size = min(1 << 20, int(f.read()))
        for q in (pool._inqueue, pool._outqueue):
            for c in (q._reader, q._writer):
                fcntl.fcntl(c.fileno(), fcntl.F_SETPIPE_SZ, size)
    except (AttributeError, OSError, ValueError):
        pass


def ordered_map(fn: Callable, tasks: Iterable, pool, inflight: int = 4) -> Iterator:
    """Like ``map(fn, tasks)``, in order, with bounded look-ahead; over ``pool`` if given.

    The main process works too: while every helper has ``inflight`` tasks queued and the
    oldest result is not back yet, it runs the next task itself instead of waiting, so N
    processes share the work (and it adapts: a main process busy with its own part of the job
    - reading, writing, de-duplication - hands more to the helpers). At most
    ``helpers * inflight`` tasks are queued in the pool and twice that many tasks are
    pending or held as results."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    pending: collections.deque = collections.deque()  # AsyncResult or (value,)
    queued = 0
    limit = pool._processes * inflight

    def head_ready() -> bool:
        h = pending[0]
        return isinstance(h, tuple) or h.ready()

    def pop():
        nonlocal queued
        h = pending.popleft()
        if isinstance(h, tuple):
            return h[0]
        queued -= 1
        return h.get()

    for t in tasks:
        while pending and head_ready():
            yield pop()
        if len(pending) >= 2 * limit:  # results held are at their bound: wait for the oldest
            yield pop()
        if queued < limit:
            pending.append(pool.apply_async(fn, (t,)))
            queued += 1
        else:
            pending.append((fn(t),))
    while pending:
        yield pop()


def chunked(it: Iterable, max_items: int = 256, max_bytes: int = 1 << 20,
            size_of: Callable = len) -> Iterator[list]:
    """Group items into lists of at most ``max_items`` items / about ``max_bytes``."""
    buf, size = [], 0
    for x in it:
        buf.append(x)
        size += size_of(x)
        if len(buf) >= max_items or size >= max_bytes:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf
