"""A SentencePiece unigram model as a ``tokenizers.Tokenizer`` with the same ids (for
export_hf_tokenizer): Unigram model with the model's pieces and scores and byte fallback,
SentencePiece's normalisation and whitespace handling as normalizers, its decoding as decoders.

Where a plain conversion (transformers' SpmConverter) differs from SentencePiece, and what is
done about it:
* SentencePiece never matches its control, unknown, byte or unused pieces ("<s>", "</s>",
  "<unk>", "<0x41>") in text; a Unigram model matches every piece. Here those pieces score
  below any path of ordinary pieces over the same characters (``floor``), and the characters of
  them that are not pieces themselves ("<", "/", ">" in a model trained on news text) are split
  off before the model (pre-tokenizer), so no piece can span them: a piece containing an unknown
  character cannot exist, so the split changes nothing else. Together with
  ``split_special_tokens`` (set by the export), "</s>" in text encodes as SentencePiece does.
* tokenizers' Precompiled normalizer (SentencePiece's character map) replaces a whole grapheme
  by the mapping of its shortest mapped prefix, dropping combining marks after a compatibility
  character or a composable pair (SentencePiece takes the longest match and goes on). NFKC first
  removes nearly all such sequences, and matches what SentencePiece does with NFC input
  (data_prep NFC-normalises every document): the encodings are identical on the BBC corpus and
  on Django's translations into ~100 languages in NFC, NFD and NFKD (tests/integration/test_hf_tokenizer.py).
  Left: a compatibility ligature or letter directly followed by a combining mark (e.g. "™" +
  U+0301: SentencePiece does not compose, NFKC does), and characters newer than SentencePiece's
  character map.
"""
from __future__ import annotations

from data_prep.report import DataPrepError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
UNIGRAM = 1  # TrainerSpec.model_type
SPACE = "\u2581"  # SentencePiece's whitespace symbol


def _refuse(why: str) -> DataPrepError:
    return DataPrepError(f"export_hf_tokenizer: {why}; only SentencePiece unigram models without "
                         "user-defined symbols (what data_prep trains) can be exported")


def _normalizers(ns) -> list:
    """SentencePiece's normaliser (NormalizerSpec ``ns``) as tokenizers normalizers."""
    from tokenizers import Regex, normalizers

    out = []
    if ns.precompiled_charsmap:
        if ns.name.startswith(("nmt_nfkc", "nfkc")):
            out.append(normalizers.NFKC())
        out.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:  # strip, then runs of spaces -> one (after the map: \n, \t -> " ")
        out += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        out.append(normalizers.Prepend(" "))
    if ns.escape_whitespaces:
        out.append(normalizers.Replace(" ", SPACE))
    return out


def sentencepiece_backend(proto: bytes):
    """A ``tokenizers.Tokenizer`` that encodes (``add_special_tokens=False``) and decodes like
    the SentencePiece unigram model ``proto``; DataPrepError for models it cannot reproduce."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    m = pb.ModelProto()
    m.ParseFromString(proto)
    ts, ns = m.trainer_spec, m.normalizer_spec
    if ts.model_type != UNIGRAM:
        raise _refuse(f"the model is not a unigram model (model_type {ts.model_type})")
    if ts.treat_whitespace_as_suffix or any(p.type == USER_DEFINED for p in m.pieces):
        raise _refuse("the model has user-defined symbols or treats whitespace as a suffix")
    normal = [p for p in m.pieces if p.type == NORMAL]
    known = {p.piece for p in normal if len(p.piece) == 1}
    special = [p.piece for p in m.pieces if p.type != NORMAL]
    if not normal or any(len(s) < 2 for s in special):
        raise _refuse("the model has no ordinary pieces, or a one-character special piece")
    # below any path of ordinary pieces over a special piece's characters (each >= min score)
    floor = min(p.score for p in normal) * (max(map(len, special), default=1) + 1) - 10.0
    tok = Tokenizer(Unigram([(p.piece, p.score if p.type == NORMAL else floor) for p in m.pieces],
                            unk_id=ts.unk_id, byte_fallback=ts.byte_fallback))
    tok.normalizer = normalizers.Sequence(_normalizers(ns))
    isolate = sorted({c for s in special for c in s if c not in known})
    if isolate:
        cls = "".join(f"\\x{{{ord(c):X}}}" for c in isolate)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"[{cls}]"), behavior="isolated")
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok
