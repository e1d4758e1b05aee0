"""A dataset's tokenizer: SentencePiece (trained here on a hash-selected sample of the training
documents, deterministically: one thread, no stored paths; or reused from a .model file) or a
Hugging Face tokenizer directory (hf_tokenizer.py), as the files written into the dataset.

The text-tokenizer API of a prepared dataset lives in hf_tokenizer.py and is importable from
here: ``load_text_tokenizer(dataset_dir)`` (encode/decode/eos_id/vocab_size/sha256 for either
kind) and ``export_hf_tokenizer(dataset_dir, out_dir)`` (a directory that
``transformers.AutoTokenizer.from_pretrained`` loads, encoding to the dataset's ids).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from data_prep.report import DataPrepError, say

SENTENCEPIECE, HF = "sentencepiece", "hf"  # manifest "tokenizer_kind"
SP_FILE, HF_DIR = "tokenizer.model", "tokenizer"  # manifest "tokenizer": where it lies in DIR
_PUBLIC = ("TextTokenizer", "export_hf_tokenizer", "load_text_tokenizer")


def __getattr__(name):  # the text-tokenizer API, loaded on first use (it imports tokenizers)
    if name in _PUBLIC:
        from data_prep import hf_tokenizer

        return getattr(hf_tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def files_sha256(files: dict) -> str:
    """tokenizer_sha256 of a Hugging Face tokenizer: sha256 of the lines "<file name>\\0<sha256
    hex of the file>\\n" of its files, sorted by name (the convention of the manifest's sources)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class TokenizerFiles:
    """A tokenizer as a dataset stores it: ``kind`` (SENTENCEPIECE or HF), ``files`` (path
    relative to the dataset directory -> bytes: tokenizer.model, or tokenizer/<name>), ``vocab``
    (the size the model's embedding must have) and ``eos_id``."""

    kind: str
    files: dict
    vocab: int
    eos_id: int

    @classmethod
    def sentencepiece(cls, proto: bytes) -> TokenizerFiles:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=proto)
        return cls(SENTENCEPIECE, {SP_FILE: proto}, sp.get_piece_size(), sp.eos_id())

    @classmethod
    def read(cls, root: Path, m: dict) -> TokenizerFiles:
        """The tokenizer of the dataset or shard directory ``root`` with manifest ``m`` (vocab
        and EOS id from ``m`` or, for a shard, from its "common" entry)."""
        common = m.get("common") or m
        vocab = common["vocab"] if "vocab" in common else common["vocab_size"]
        kind, entry = m.get("tokenizer_kind", SENTENCEPIECE), m.get("tokenizer", SP_FILE)
        if kind == SENTENCEPIECE:
            names = [entry]
        else:
            listed = m.get("tokenizer_files") or sorted(p.name for p in (root / entry).iterdir()
                                                        if p.is_file())
            names = [f"{entry}/{n}" for n in listed]
        return cls(kind, {n: (root / n).read_bytes() for n in names}, int(vocab),
                   int(common["eos_id"]))

    @property
    def entry(self) -> str:
        """manifest "tokenizer": the file (SentencePiece) or directory (HF) in the dataset."""
        return SP_FILE if self.kind == SENTENCEPIECE else HF_DIR

    @property
    def names(self) -> list[str]:
        """The HF directory's file names, sorted (the order of tokenizer_sha256)."""
        return sorted(n.split("/", 1)[1] for n in self.files)

    @property
    def sha256(self) -> str:
        if self.kind == SENTENCEPIECE:
            return hashlib.sha256(self.files[SP_FILE]).hexdigest()
        return files_sha256({n.split("/", 1)[1]: b for n, b in self.files.items()})

    def manifest_fields(self) -> dict:
        """The manifest's tokenizer fields (tokenizer, tokenizer_kind, tokenizer_sha256 and, for
        HF, tokenizer_files)."""
        out = {"tokenizer": self.entry, "tokenizer_kind": self.kind}
        if self.kind == HF:
            out["tokenizer_files"] = self.names
        out["tokenizer_sha256"] = self.sha256
        return out

    def write(self, root: Path) -> None:
        for name, data in self.files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)


def load_tokenizer(path) -> TokenizerFiles:
    """--tokenizer: a SentencePiece .model file, or a Hugging Face tokenizer directory (or its
    tokenizer.json / tokenizer_config.json); DataPrepError naming the flag and the fix."""
    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        from data_prep.hf_tokenizer import load_hf_dir

        return load_hf_dir(path.parent if path.is_file() else path)
    if not path.exists():
        raise DataPrepError(f"--tokenizer {path} does not exist; pass a SentencePiece .model "
                            "file or a Hugging Face tokenizer directory (tokenizer.json and/or "
                            "tokenizer_config.json), or omit --tokenizer to train one")
    return TokenizerFiles.sentencepiece(load_tokenizer_proto(path))


def load_tokenizer_proto(path) -> bytes:
    """Read and validate an existing SentencePiece model; DataPrepError if it is not one."""
    import sentencepiece as spm

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataPrepError(f"--tokenizer {path}: cannot read it ({e.strerror}); pass an "
                            "existing SentencePiece .model file or a Hugging Face tokenizer "
                            "directory, or omit --tokenizer") from None
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
        if sp.get_piece_size() <= 0:
            raise RuntimeError("empty vocabulary")
    except Exception as e:  # noqa: BLE001
        raise DataPrepError(f"--tokenizer {path} is not a SentencePiece model ({e}); pass a "
                            ".model file written by SentencePiece or a Hugging Face tokenizer "
                            "directory, or omit --tokenizer to train one") from None
    if sp.eos_id() < 0:
        raise DataPrepError(f"--tokenizer {path} has no EOS id (eos_id=-1); documents are "
                            "separated by EOS, so train it with eos_id set, or omit --tokenizer")
    return data


def train_tokenizer(records, tmp: Path, train_bytes: int, sample_bytes: int,
                    vocab_size: int, quiet: bool) -> bytes:
    """Train on at most ~``sample_bytes`` of the training documents among ``records``
    ((split, doc hash, UTF-8 bytes); split 0 = val is never used), chosen by hash out of
    ``train_bytes`` in all; returns the model proto. The sample is staged in ``tmp``."""
    import sentencepiece as spm

    frac = min(1.0, sample_bytes / max(train_bytes, 1))
    threshold = int(frac * 2**32)
    sample = tmp / "tokenizer_sample.txt"
    n = nbytes = 0
    with open(sample, "wb") as f:
        for s, h, data in records:
            if s > 0 and (frac >= 1.0 or (h >> 32) < threshold):
                f.write(data)
                f.write(b"\n")
                n += 1
                nbytes += len(data)
    say(quiet, f"training SentencePiece (unigram, vocab {vocab_size}) on {n} documents, "
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


def note_vocab(tok: TokenizerFiles, trained: bool, vocab_size: int, quiet: bool) -> None:
    """Notes when a trained tokenizer came out smaller than --vocab_size."""
    if trained and tok.vocab < vocab_size:
        say(quiet, f"note: the training sample supports only {tok.vocab} pieces; using vocab "
                   f"{tok.vocab} instead of --vocab_size {vocab_size} (add data for a larger one)")
