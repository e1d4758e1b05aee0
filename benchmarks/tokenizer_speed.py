"""Speed of prepare.py's Hugging Face encoding path against the tokenizers library's own.

    python benchmarks/tokenizer_speed.py [--copies 2] [--repeats 5] [--vocab_size 8000]

On the same documents - the embedded corpus cleaned and de-duplicated as prepare.py does it,
``--copies`` times (the copies' headlines edited so that they stay distinct), cut into
prepare.py's chunks (256 documents / 1 MiB) - in one process on one thread
(TOKENIZERS_PARALLELISM=false, as in prepare.py's workers), ``--repeats`` rounds; in a round
each chunk is encoded by the three back to back (each first in turn), so that the load of
other jobs on a shared machine falls on all three alike:
  * ``Tokenizer.encode_batch(chunk, add_special_tokens=False)``: the tokenizers library's own
    batch encode of the chunk as str (the reference);
  * ``Tokenizer.encode_batch_fast``: the same without character offsets (what the worker calls);
  * ``data_prep.parallel.encode_chunk``: prepare.py's worker function itself (UTF-8 bytes in;
    decode, encode_batch_fast, the ids of the chunk into one numpy array, EOS after every
    document); its output is checked against the reference's ids first.
Each chunk's result is dropped before the next chunk is encoded, as in prepare.py.
Two tokenizers, trained with the tokenizers library on the corpus, saved as Hugging Face
tokenizer directories and stored as prepare.py stores them (hf_tokenizer.load_hf_dir): a
byte-level BPE (GPT-2 style) and a Metaspace unigram (SentencePiece style). Reported per
worker: tokens/s, and the ratio worker / encode_batch (target >= 0.7) best-vs-best of the
repeats (wall clock), as the median of the per-round ratios, and as the ratio of CPU times
(process_time: less sensitive to other jobs on a shared machine).
"""
from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as in prepare.py (before tokenizers)

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save_results, table

from data_prep.clean import clean_document
from data_prep.hf_tokenizer import hf_backend, load_hf_dir
from data_prep.parallel import chunked, encode_chunk
from data_prep.readers import Stats, read_documents
from data_prep.sample import sample_corpus_dir

METHODS = ("encode_batch", "encode_batch_fast", "prepare.py worker")


def documents(copies: int) -> list[bytes]:
    """The corpus as prepare.py encodes it (cleaned, exact duplicates removed, in order), with
    ``copies - 1`` more copies whose headline (first line) ends in " (copy k)"."""
    seen, docs = set(), []
    for raw in read_documents([sample_corpus_dir()], Stats(), text_mode="file"):
        r = clean_document(raw)
        if not isinstance(r, str) and r not in seen:
            seen.add(r)
            docs.append(r)
    out = list(docs)
    for k in range(1, copies):
        for d in docs:
            head, _, rest = d.partition(b"\n")
            out.append(head + f" (copy {k})".encode() + b"\n" + rest)
    return out


def train(kind: str, texts: list[str], vocab_size: int, dest: Path) -> Path:
    """A tokenizer trained on ``texts``, saved as a Hugging Face directory, then stored as
    prepare.py stores it; returns that tokenizer/ directory."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok, eos = Tokenizer(models.BPE()), "<|endoftext|>"
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok, eos = Tokenizer(models.Unigram()), "</s>"
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", eos],
                                          unk_token="<unk>", show_progress=False)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # training is not what is measured
    try:
        tok.train_from_iterator(texts, trainer)
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    hf = dest / f"{kind}_hf"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(str(hf))
    stored = load_hf_dir(hf)
    stored.write(dest / kind)
    return dest / kind / stored.entry


def measure(tok_dir: Path, docs: list[bytes], repeats: int) -> dict:
    """The three methods on ``docs`` with the tokenizer in ``tok_dir``, interleaved."""
    backend = hf_backend(tok_dir)
    eos = backend.token_to_id("<|endoftext|>")
    eos = backend.token_to_id("</s>") if eos is None else eos
    chunks = list(chunked(docs))  # prepare.py's chunks
    texts = [[d.decode("utf-8") for d in c] for c in chunks]
    cfg = (str(tok_dir), eos, "uint16")
    ids = [e.ids for c in texts for e in backend.encode_batch(c, add_special_tokens=False)]
    want = np.concatenate([np.array([*i, eos], np.uint16) for i in ids])
    got = np.concatenate([encode_chunk((cfg, c))[0] for c in chunks])  # also warms the worker
    assert np.array_equal(got, want), "the worker's ids differ from encode_batch's"
    def run(m: str, i: int) -> None:  # one chunk; its result is dropped, as in prepare.py
        if m == "encode_batch":
            backend.encode_batch(texts[i], add_special_tokens=False)
        elif m == "encode_batch_fast":
            backend.encode_batch_fast(texts[i], add_special_tokens=False)
        else:
            encode_chunk((cfg, chunks[i]))

    wall, cpu = {m: [] for m in METHODS}, {m: [] for m in METHODS}
    for r in range(repeats):  # a round = every chunk once by each method, chunk by chunk
        w, c = dict.fromkeys(METHODS, 0.0), dict.fromkeys(METHODS, 0.0)
        for i in range(len(chunks)):
            k = (r + i) % 3  # the three back to back on the same chunk, each first in turn
            for m in METHODS[k:] + METHODS[:k]:
                t0, c0 = time.perf_counter(), time.process_time()
                run(m, i)
                w[m] += time.perf_counter() - t0
                c[m] += time.process_time() - c0
        for m in METHODS:
            wall[m].append(w[m])
            cpu[m].append(c[m])
    tokens = sum(map(len, ids))
    ref = "encode_batch"
    out = {"docs": len(docs), "mb": sum(map(len, docs)) / 2**20, "tokens": tokens,
           "vocab_size": backend.get_vocab_size(with_added_tokens=True), "methods": {}}
    for m in METHODS:
        out["methods"][m] = {
            "wall_s": min(wall[m]), "all_wall_s": wall[m], "cpu_s": min(cpu[m]), "all_cpu_s": cpu[m],
            "tokens_per_s": tokens / min(wall[m]),
            "ratio_to_encode_batch": min(wall[ref]) / min(wall[m]),
            "ratio_to_encode_batch_round_median": statistics.median(
                a / b for a, b in zip(wall[ref], wall[m])),
            "cpu_ratio_to_encode_batch": min(cpu[ref]) / min(cpu[m])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=2, help="copies of the corpus to encode")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab_size", type=int, default=8000)
    ap.add_argument("--tokenizers", default="bpe,unigram", help="comma-separated: bpe, unigram")
    args = ap.parse_args()
    load_start = os.getloadavg()
    docs = documents(args.copies)
    first = [d.decode("utf-8") for d in docs[:len(docs) // args.copies]]
    res = {"copies": args.copies, "repeats": args.repeats, "tokenizers": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tok-bench-") as td:
        for kind in args.tokenizers.split(","):
            tok_dir = train(kind, first, args.vocab_size, Path(td))
            r = res["tokenizers"][kind] = measure(tok_dir, docs, args.repeats)
            for m, x in r["methods"].items():
                rows.append([kind, m, f"{x['tokens_per_s'] / 1e6:.3f}", f"{x['ratio_to_encode_batch']:.2f}",
                             f"{x['ratio_to_encode_batch_round_median']:.2f}",
                             f"{x['cpu_ratio_to_encode_batch']:.2f}"])
            print(f"{kind}: {r['docs']} documents, {r['mb']:.1f} MiB, {r['tokens']:,} tokens, vocab "
                  f"{r['vocab_size']}", flush=True)
    res["loadavg_start"], res["loadavg_end"] = load_start, os.getloadavg()
    print(table(rows, ["tokenizer", "method (1 thread)", "M tok/s", "ratio (best)", "ratio (median)",
                       "ratio (CPU)"]))
    print(f"wrote {save_results('tokenizer_speed', res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
