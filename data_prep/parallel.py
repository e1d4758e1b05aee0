"""Worker-side functions and an order-preserving, memory-bounded parallel map.

``multiprocessing.Pool.imap`` pulls its whole input iterator as fast as it can (its task
feeder thread does not wait for results), so on a large corpus it would hold the corpus in
memory. ``ordered_map`` keeps a bounded number of chunks in flight and yields results in
submission order, so the output is identical for any worker count. The main process runs
chunks itself whenever the helpers are busy, so ``--workers N`` means N busy processes.

One pool serves every pass: each task carries its small config, and the tokenizer is loaded
once per worker from the file path in the config (cached by path).
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import signal
import sys
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep import ONE_THREAD_ENV
from data_prep.clean import clean_document, doc_hash, split_of, splits_of

_SP: dict = {}


def _tokenizer(path: str):
    sp = _SP.get(path)
    if sp is None:
        import sentencepiece as spm

        _SP.clear()
        sp = _SP[path] = spm.SentencePieceProcessor(model_file=path)
    return sp


def _encode(sp, texts: list[bytes], eos: int, dtype: str):
    """Token ids of ``texts`` (UTF-8) with EOS after each, flat, and the per-document lengths.

    SentencePiece hands back one int32 buffer per document (no Python int per token)."""
    if not texts:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    ids = sp.encode(texts, num_threads=1, out_type="numpy")
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.insert(np.concatenate(ids).astype(dtype), np.cumsum(lengths), np.asarray(eos, dtype=dtype))
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

    task = (clean cfg, (model_path, eos, dtype), raw docs); clean cfg = (min_chars,
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
    flat, lengths = _encode(_tokenizer(model), texts, eos, dtype)
    return drops, h, splits_of(h, seed, g, vf), flat, lengths


def encode_chunk(task):
    """((model_path, eos, dtype), [utf8 bytes]) -> (tokens with EOS after each doc, lengths)."""
    (model, eos, dtype), texts = task
    return _encode(_tokenizer(model), texts, eos, dtype)


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
    in-process."""
    if workers <= 1:
        yield None
        return
    # one thread per process: BLAS thread pools (numpy's OpenBLAS starts one per core at
    # import, ~0.1 CPU-s of spinning) only compete with the other processes here
    saved = {k: os.environ.get(k) for k in ONE_THREAD_ENV}
    for k in ONE_THREAD_ENV:
        os.environ.setdefault(k, "1")
    try:  # the helpers start with this environment
        pool = mp.get_context(start_method()).Pool(workers - 1, initializer=_helper_init)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    _widen_pipes(pool)
    with pool:
        yield pool


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
