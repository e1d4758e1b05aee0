"""Worker-side functions and an order-preserving, memory-bounded parallel map.

``multiprocessing.Pool.imap`` pulls its whole input iterator as fast as it can (its task
feeder thread does not wait for results), so on a large corpus it would hold the corpus in
memory. ``ordered_map`` keeps at most ``workers * inflight_per_worker`` chunks in flight
and yields results in submission order, so the output is identical for any worker count.

One pool serves every pass: each task carries its small config, and the tokenizer is loaded
once per worker from the file path in the config (cached by path).
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep.clean import clean_document, doc_hash, split_of

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


def clean_chunk(task) -> list:
    """(cfg, raw docs) -> per doc a drop reason (str) or (utf8 bytes, doc hash, split).

    cfg = (min_chars, min_text_ratio, seed, num_groups, val_fraction). Duplicates are
    decided by the caller, in input order."""
    (min_chars, min_ratio, seed, g, vf), docs = task
    out = []
    for raw in docs:
        r = clean_document(raw, min_chars, min_ratio)
        out.append(r if isinstance(r, str) else (r, h := doc_hash(r), split_of(h, seed, g, vf)))
    return out


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
    """Fused pass (tokenizer known up front): clean + hash + encode.

    task = (clean cfg, (model_path, eos, dtype), raw docs). Returns (meta, flat, lengths)
    with meta per doc a reason (str) or (doc hash, split); flat/lengths cover kept docs."""
    cfg, (model, eos, dtype), docs = task
    meta = clean_chunk((cfg, docs))
    texts = [m[0] for m in meta if not isinstance(m, str)]
    flat, lengths = _encode(_tokenizer(model), texts, eos, dtype)
    return [m if isinstance(m, str) else m[1:] for m in meta], flat, lengths


def encode_chunk(task):
    """((model_path, eos, dtype), [utf8 bytes]) -> (tokens with EOS after each doc, lengths)."""
    (model, eos, dtype), texts = task
    return _encode(_tokenizer(model), texts, eos, dtype)


@contextlib.contextmanager
def worker_pool(workers: int):
    """A spawn pool (fork is unsafe once torch/threads - including BLAS's native ones - are
    loaded; a forked worker hung in the web-text filter path), or None for in-process."""
    if workers <= 1:
        yield None
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield pool


def ordered_map(fn: Callable, tasks: Iterable, pool, inflight: int = 4) -> Iterator:
    """Like ``map(fn, tasks)``; over ``pool`` if given, in order, with bounded look-ahead."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    pending: collections.deque = collections.deque()
    limit = pool._processes * inflight
    for t in tasks:
        pending.append(pool.apply_async(fn, (t,)))
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
