"""The on-disk dataset format, writing side (codistill/data.py is the reading side).

A prepared directory holds its tokenizer (tokenizer.model, or a Hugging Face tokenizer in
tokenizer/: tokenizer.json + tokenizer_config.json ...; see tokenizer.py), per split (val,
group_0 .. group_{G-1}) the flat token memmap <split>.bin (uint16 when vocab < 65536, else
uint32; documents back to back, each ending in EOS), <split>.idx.npy (int64 document end
offsets, starting with 0) and <split>.hashes.npy (uint64 doc hashes), and manifest.json. It is built in a temporary
sibling directory and renamed into place, so DIR is either complete or absent.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import fileio as files
from data_prep.report import OutputExistsError

FORMAT_VERSION = 1


def split_names(num_groups: int) -> list[str]:
    return ["val"] + [f"group_{g}" for g in range(num_groups)]


def token_dtype(vocab: int) -> str:
    return "uint16" if vocab < 65536 else "uint32"


def is_prepared(path) -> bool:
    """True if ``path`` holds a complete prepared dataset (manifest + all split files)."""
    path = Path(path)
    try:
        m = json.loads((path / "manifest.json").read_text())
        if m.get("format_version") != FORMAT_VERSION or not (path / m["tokenizer"]).exists():
            return False
        return all((path / s["tokens"]).is_file() and (path / s["doc_index"]).is_file()
                   for s in m["splits"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class ShardWriter:
    """Appends documents to <split>.bin and records offsets/hashes; writes the .npy files
    at the end (offsets and hashes go to raw temp files first, so nothing is held in RAM)."""

    def __init__(self, root: Path, names: list[str], dtype: str):
        self.root, self.names, self.dtype = root, names, np.dtype(dtype)
        # open until close()/abort() (the writer outlives any one block)
        self.bins = [open(root / f"{n}.bin", "wb", buffering=1 << 20) for n in names]  # noqa: SIM115
        self.offs = [open(root / f"{n}.idx.raw", "wb", buffering=1 << 16) for n in names]  # noqa: SIM115
        self.hashes = [open(root / f"{n}.hashes.raw", "wb", buffering=1 << 16) for n in names]  # noqa: SIM115
        self.ntok = [0] * len(names)
        self.ndoc = [0] * len(names)

    def add_chunk(self, splits, hashes, flat: np.ndarray, lengths) -> int:
        """Append a chunk of documents: per document its split index (-1: skip it) and
        hash, and their tokens ``flat`` (documents back to back, ``lengths`` each)."""
        splits = np.asarray(splits, dtype=np.int64)
        hashes = np.asarray(hashes, dtype=np.uint64)
        lengths = np.asarray(lengths, dtype=np.int64)
        tok_split = np.repeat(splits, lengths)
        written = 0
        for s in np.unique(splits[splits >= 0]).tolist():
            docs = splits == s
            toks = flat[tok_split == s]
            ends = self.ntok[s] + np.cumsum(lengths[docs])
            self.bins[s].write(toks.tobytes())
            self.offs[s].write(ends.astype("<u8").tobytes())
            self.hashes[s].write(hashes[docs].astype("<u8").tobytes())
            self.ntok[s] = int(ends[-1])
            self.ndoc[s] += len(ends)
            written += len(toks)
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


def fsync_tokens(root: Path, splits: dict) -> None:
    for s in splits.values():
        with open(root / s["tokens"], "rb+") as f:
            os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    """The manifests' JSON (indent 1, keys in insertion order), through the one atomic writer."""
    files.write_json(path, obj, indent=1, sort_keys=False)


def make_manifest(*, tok, trained, vocab, dtype, eos_id, num_groups, seed, val_fraction,
                  cleaning, splits, dropped, documents_in, filters, sources) -> dict:
    """manifest.json; ``tok``: the tokenizer.TokenizerFiles written beside it."""
    return {
        "format_version": FORMAT_VERSION,
        **tok.manifest_fields(),
        "tokenizer_trained": trained,
        "vocab_size": vocab,
        "dtype": dtype,
        "eos_id": eos_id,
        "num_groups": num_groups,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": splits,
        "dropped": dict(sorted(dropped.items())),
        "documents_in": documents_in,
        "documents_kept": sum(s["num_docs"] for s in splits.values()),
        "doc_hash": "blake2b-64 of the normalised UTF-8 text (uint64, little-endian)",
        "split_hash": "blake2b-128 keyed by seed: val if first 64 bits / 2^64 < val_fraction, "
                      "else group = last 64 bits mod num_groups",
        "cleaning": {**cleaning, "unicode": "NFC", "whitespace": "runs collapsed to one space, "
                     "lines stripped, empty lines removed (paragraphs separated by one newline)"},
        "filters": filters,
        "sources": sources,
    }


def tokenizer_manifest(tok, stats, documents_kept: int) -> dict:
    """manifest.json of a --tokenizer_only run (a tokenizer.model and no splits)."""
    return {"format_version": FORMAT_VERSION, "tokenizer_only": True,
            **tok.manifest_fields(),
            "documents_in": stats.documents_in, "documents_kept": documents_kept,
            "dropped": dict(sorted(stats.dropped.items())),
            "sources": stats.sources.summary()}


# ----------------------------------------------------------------------------- atomic output
def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise OutputExistsError(
            f"--output {output} already exists and is not empty; pass --overwrite to "
            "replace it, or choose another --output")


@contextmanager
def staged_output(output: Path, overwrite: bool):
    """Yields a new temporary sibling directory of ``output`` to build in; published as
    ``output`` when the block finishes, removed if it raises (or is interrupted)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, output: Path, overwrite: bool) -> None:
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
