"""Worker-side functions and an order-preserving, memory-bounded parallel map.

``multiprocessing.Pool.imap`` pulls its whole input iterator as fast as it can (its task
feeder thread does not wait for results), so on a large corpus it would hold the corpus in
memory. ``ordered_map`` keeps at most ``workers * inflight_per_worker`` chunks in flight
and yields results in submission order, so output is identical for any worker count.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
from itertools import chain
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep.clean import clean_document, doc_hash, split_of

_STATE: dict = {}


# --- cleaning (pass 1) -------------------------------------------------------------------

def init_clean(min_chars: int, min_text_ratio: float, seed: int, num_groups: int,
               val_fraction: float) -> None:
    _STATE["clean"] = (min_chars, min_text_ratio, seed, num_groups, val_fraction)


def clean_chunk(docs: list[str]) -> list:
    """Normalise + filter + hash a chunk. Returns per doc either a drop reason (str) or
    (utf8_bytes, doc_hash, split_index). Duplicates are decided by the caller (ordered)."""
    min_chars, min_ratio, seed, g, vf = _STATE["clean"]
    out = []
    for raw in docs:
        r = clean_document(raw, min_chars, min_ratio)
        out.append(r if isinstance(r, str) else (r, doc_hash(r), split_of(r, seed, g, vf)))
    return out


# --- tokenization (pass 2) ---------------------------------------------------------------

def init_encode(model_proto: bytes, eos_id: int, dtype: str) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    _STATE["encode"] = (sp, eos_id, np.dtype(dtype))


def encode_chunk(texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents; return (tokens with EOS after each doc, per-doc lengths incl. EOS)."""
    sp, eos, dtype = _STATE["encode"]
    ids = sp.encode([t.decode("utf-8") for t in texts], num_threads=1)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    eos_list = [eos]
    flat = np.fromiter(chain.from_iterable(chain(x, eos_list) for x in ids), dtype=dtype,
                       count=total)
    return flat, lengths


# --- ordered bounded map -----------------------------------------------------------------

def ordered_map(fn: Callable, chunks: Iterable, workers: int, initializer: Callable,
                initargs: tuple, inflight_per_worker: int = 4) -> Iterator:
    """Like ``map(fn, chunks)`` but over ``workers`` processes (spawn), in order, bounded."""
    if workers <= 1:
        initializer(*initargs)
        for c in chunks:
            yield fn(c)
        return
    ctx = mp.get_context("spawn")  # fork is unsafe once torch/threads are loaded
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        limit = workers * inflight_per_worker
        for c in chunks:
            pending.append(pool.apply_async(fn, (c,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


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


__all__ = ["ordered_map", "chunked", "init_clean", "clean_chunk", "init_encode",
           "encode_chunk"]
