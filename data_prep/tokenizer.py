"""The SentencePiece tokenizer: reuse (validate --tokenizer) or train one on a hash-selected
sample of the training documents, deterministically (one thread, no stored paths)."""
from __future__ import annotations

import io
from pathlib import Path

from data_prep.report import DataPrepError, say


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


def vocab_and_eos(tok_proto: bytes, trained: bool, vocab_size: int, quiet: bool):
    """(vocabulary size, EOS id) of the model; notes when a trained one came out smaller."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tok_proto)
    vocab, eos_id = sp.get_piece_size(), sp.eos_id()
    if trained and vocab < vocab_size:
        say(quiet, f"note: the training sample supports only {vocab} pieces; using vocab "
                   f"{vocab} instead of --vocab_size {vocab_size} (add data for a larger one)")
    return vocab, eos_id
