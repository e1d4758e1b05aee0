"""Check a prepared dataset directory against its manifest and the format invariants.

    python data_prep/verify.py DIR

Checks: manifest fields; the tokenizer's sha256 (tokenizer.model, or the files of a Hugging
Face tokenizer/ directory) and that it loads with the manifest's vocab size and EOS id; dtype
fits the vocab (uint16 iff vocab < 65536); for every split: the .bin length matches num_tokens, the offsets are int64, num_docs+1 long, start at 0, end at the
file length and strictly increase; every document ends with EOS and contains no other EOS;
every token id < vocab_size; the stored document hashes have the right length, no
duplicates inside a split and no hash shared by two splits (disjointness); the split names
are exactly val, group_0..group_{G-1}; documents_kept equals the sum of the splits.
Exit status 0 with a one-line OK summary, 1 with the first violation found.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from data_prep.clean import DOC_REASONS

_CHUNK = 1 << 22  # tokens per chunk when scanning shards


class VerifyError(ValueError):
    pass


def _fail(msg: str):
    raise VerifyError(msg)


def verify(path) -> dict:
    """Verify ``path``; return a summary dict, or raise VerifyError naming the violation."""
    root = Path(path)
    m = _manifest(root / "manifest.json")
    vocab, eos, g = int(m["vocab_size"]), int(m["eos_id"]), int(m["num_groups"])
    dtype = np.dtype(m["dtype"])
    if m.get("tokenizer_kind", "sentencepiece") == "hf":
        from data_prep.hf_tokenizer import check_hf

        problem = check_hf(root, m)
        if problem:
            _fail(problem)
    else:
        _check_tokenizer(root / m["tokenizer"], m, vocab, eos)
    names = ["val"] + [f"group_{i}" for i in range(g)]
    if sorted(m["splits"]) != sorted(names):
        _fail(f"splits {sorted(m['splits'])} but num_groups={g} requires {names}")
    all_hashes = []
    total_docs = total_tokens = 0
    for name in names:
        n_docs, n_tok, hashes = _check_split(root, name, m["splits"][name], vocab, eos, dtype)
        all_hashes.append((name, hashes))
        total_docs += n_docs
        total_tokens += n_tok
    _check_disjoint(all_hashes)
    if "documents_kept" in m and int(m["documents_kept"]) != total_docs:
        _fail(f"manifest documents_kept={m['documents_kept']} but the splits hold {total_docs}")
    doc_dropped = sum(v for k, v in m["dropped"].items() if k in DOC_REASONS)
    if int(m["documents_in"]) != total_docs + doc_dropped:
        _fail(f"manifest documents_in={m['documents_in']} != kept {total_docs} + dropped "
              f"documents {doc_dropped}")
    return {"path": str(root), "splits": len(names), "documents": total_docs,
            "tokens": total_tokens, "vocab_size": vocab, "dtype": m["dtype"]}


def _manifest(mpath: Path) -> dict:
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        _fail(f"{mpath}: cannot read a JSON manifest ({e}); is {mpath.parent} a prepared dataset?")
    for key in ("format_version", "tokenizer", "vocab_size", "dtype", "eos_id", "num_groups",
                "splits", "dropped", "documents_in"):
        if key not in m:
            _fail(f"{mpath}: missing field {key!r}")
    if m["format_version"] != 1:
        _fail(f"{mpath}: unsupported format_version {m['format_version']}")
    vocab, eos = int(m["vocab_size"]), int(m["eos_id"])
    want_dtype = "uint16" if vocab < 65536 else "uint32"
    if m["dtype"] != want_dtype:
        _fail(f"dtype {m['dtype']} does not fit vocab_size {vocab} (expected {want_dtype})")
    if not 0 <= eos < vocab:
        _fail(f"eos_id {eos} outside the vocabulary [0, {vocab})")
    return m


def _check_tokenizer(tok: Path, m: dict, vocab: int, eos: int) -> None:
    try:
        tok_bytes = tok.read_bytes()
    except OSError as e:
        _fail(f"{tok}: cannot read the tokenizer ({e.strerror})")
    if "tokenizer_sha256" in m and hashlib.sha256(tok_bytes).hexdigest() != m["tokenizer_sha256"]:
        _fail(f"{tok}: sha256 does not match manifest tokenizer_sha256")
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=tok_bytes)
    except Exception as e:  # noqa: BLE001
        _fail(f"{tok}: not a SentencePiece model ({e})")
    if sp.get_piece_size() != vocab:
        _fail(f"{tok}: has {sp.get_piece_size()} pieces but manifest vocab_size is {vocab}")
    if sp.eos_id() != eos:
        _fail(f"{tok}: eos_id {sp.eos_id()} but manifest eos_id is {eos}")


def _check_split(root: Path, name: str, s: dict, vocab: int, eos: int, dtype) -> tuple[int, int, np.ndarray]:
    """One split's files against the manifest: (documents, tokens, its unique document hashes)."""
    n_docs, n_tok = int(s["num_docs"]), int(s["num_tokens"])
    if n_docs < 1:
        _fail(f"split {name} is empty")
    bin_path = root / s["tokens"]
    try:
        size = bin_path.stat().st_size
    except OSError as e:
        _fail(f"{bin_path}: missing ({e.strerror})")
    if size != n_tok * dtype.itemsize:
        _fail(f"{bin_path}: {size} bytes but manifest num_tokens={n_tok} x {dtype.itemsize}")
    idx = _check_doc_index(root / s["doc_index"], name, n_docs, n_tok)
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if n_tok else np.zeros(0, dtype)
    n_eos = 0
    for a in range(0, n_tok, _CHUNK):
        c = np.asarray(tokens[a:a + _CHUNK])
        mx = int(c.max())
        if mx >= vocab:
            _fail(f"{name}: token id {mx} >= vocab_size {vocab}")
        n_eos += int(np.count_nonzero(c == eos))
    if n_docs and not np.all(tokens[idx[1:] - 1] == eos):
        bad = int(np.argmax(tokens[idx[1:] - 1] != eos))
        _fail(f"{name}: document {bad} does not end with EOS ({eos})")
    if n_eos != n_docs:
        _fail(f"{name}: {n_eos} EOS tokens for {n_docs} documents (EOS inside a document)")
    del tokens
    if "doc_hashes" not in s:
        _fail(f"{name}: no doc_hashes; cannot prove disjointness")
    try:
        h = np.load(root / s["doc_hashes"], allow_pickle=False)
    except (OSError, ValueError) as e:
        _fail(f"{root / s['doc_hashes']}: cannot load ({e})")
    if len(h) != n_docs:
        _fail(f"{name}: {len(h)} document hashes for {n_docs} documents")
    u = np.unique(h)
    if len(u) != len(h):
        _fail(f"{name}: {len(h) - len(u)} duplicate document hash(es) inside the split")
    return n_docs, n_tok, u


def _check_doc_index(path: Path, name: str, n_docs: int, n_tok: int) -> np.ndarray:
    try:
        idx = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        _fail(f"{path}: cannot load ({e})")
    if idx.dtype != np.int64 or idx.ndim != 1 or len(idx) != n_docs + 1:
        _fail(f"{name}: doc_index has dtype {idx.dtype} shape {idx.shape}, expected int64 "
              f"({n_docs + 1},)")
    idx = np.asarray(idx)
    if idx[0] != 0 or idx[-1] != n_tok:
        _fail(f"{name}: doc_index runs from {idx[0]} to {idx[-1]}, expected 0 to {n_tok}")
    if n_docs and not np.all(np.diff(idx) >= 1):
        bad = int(np.argmax(np.diff(idx) < 1))
        _fail(f"{name}: doc_index not strictly increasing at document {bad}")
    return idx


def _check_disjoint(all_hashes: list[tuple[str, np.ndarray]]) -> None:
    cat = np.concatenate([u for _, u in all_hashes])
    owner = np.concatenate([np.full(len(u), i) for i, (_, u) in enumerate(all_hashes)])
    order = np.argsort(cat, kind="stable")
    dup = np.nonzero(cat[order][1:] == cat[order][:-1])[0]
    if len(dup):
        a, b = owner[order][dup[0]], owner[order][dup[0] + 1]
        _fail(f"splits {all_hashes[a][0]} and {all_hashes[b][0]} share {len(dup)} document(s) "
              "(same document hash): splits are not disjoint")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Verify a prepared dataset directory.")
    p.add_argument("dir")
    args = p.parse_args(argv)
    try:
        s = verify(args.dir)
    except VerifyError as e:
        print(f"FAIL {args.dir}: {e}", file=sys.stderr)
        return 1
    print(f"OK {s['path']}: {s['splits']} disjoint splits (val + {s['splits'] - 1} groups), "
          f"{s['documents']} documents, {s['tokens']} tokens, vocab {s['vocab_size']} "
          f"({s['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
