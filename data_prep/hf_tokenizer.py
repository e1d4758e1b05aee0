"""Hugging Face tokenizers in data_prep, and the text-tokenizer API of a prepared dataset.

* ``load_hf_dir(DIR)`` (``prepare.py --tokenizer DIR``): loads DIR with
  ``transformers.AutoTokenizer.from_pretrained(DIR, local_files_only=True)`` (a fast tokenizer;
  no remote code) and returns the files the dataset keeps under ``tokenizer/``: the backend
  ``tokenizers.Tokenizer`` exactly as transformers built it, as tokenizer.json (truncation and
  padding removed), plus DIR's tokenizer_config.json, special_tokens_map.json and chat template
  as they are. The EOS id is the tokenizer's eos_token; the vocabulary size is len(tokenizer).
* ``hf_backend(tokenizer/)``: that tokenizer.json as a ``tokenizers.Tokenizer``: what the workers
  encode with (``encode_batch_fast(texts, add_special_tokens=False)``; ids as encode_batch),
  what ``load_text_tokenizer`` and the checks use. transformers is imported only by load_hf_dir
  and export_hf_tokenizer.
* ``load_text_tokenizer(dataset_dir)``: encode(text) (no EOS) / decode(ids) / eos_id /
  vocab_size / sha256, for either kind. SentencePiece: ``sp.encode(NFC(text))`` (data_prep
  NFC-normalises every document before encoding it, and it makes the SentencePiece and exported
  encodings agree on decomposed input too); HF: the tokenizer's own encoding.
* ``export_hf_tokenizer(dataset_dir, out_dir)``: a directory that AutoTokenizer loads as a fast
  tokenizer whose ids equal load_text_tokenizer's (SentencePiece datasets: converted by
  ``sentencepiece_backend``), no BOS/EOS added by ``tokenizer(text)``, pad_token = eos_token if
  the tokenizer has none. Built in a temporary directory, checked, then renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.report import DataPrepError
from data_prep.tokenizer import (
    HF,
    HF_DIR,
    SENTENCEPIECE,
    SP_FILE,
    TokenizerFiles,
    files_sha256,
)

KEPT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json")  # copied from --tokenizer DIR as they are, when present
# checks that a tokenizer encodes alike through two routes (transformers vs its backend; the
# export vs the dataset): several scripts, punctuation, digits, whitespace runs, newlines
PROBE = ("The Bank of England held rates at 4.25% on Tuesday -- \"a pause\", not a pivot.\n"
         "Zürich, São Paulo, Kraków  and  Þórshöfn; naïve café. Москва, Αθήνα, 東京都, 서울, "
         "القاهرة, मुंबई.\n\tTabs\tand   spaces, ½ ﬁ ｆｕｌｌ — “quotes” 😀 €100")


def _bad_dir(path: Path, what: str) -> DataPrepError:
    return DataPrepError(f"--tokenizer {path}: {what}; pass a Hugging Face tokenizer directory "
                         "(as written by tokenizer.save_pretrained(DIR): tokenizer.json and "
                         "tokenizer_config.json) or a SentencePiece .model file, or omit "
                         "--tokenizer to train one")


def _read_json(path: Path, flag_path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _bad_dir(flag_path, f"{path.name} is not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _bad_dir(flag_path, f"{path.name} is not a JSON object")
    return obj


def load_hf_dir(path) -> TokenizerFiles:
    """--tokenizer DIR (a Hugging Face tokenizer) -> the dataset's tokenizer/ files; a clear
    DataPrepError for a directory without tokenizer files, unreadable JSON, a tokenizer
    transformers cannot load or that has no eos_token."""
    path = Path(path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        hint = f" (a prepared dataset? pass its {SP_FILE} or {HF_DIR}/)" \
            if (path / "manifest.json").is_file() else ""
        raise _bad_dir(path, f"no tokenizer.json or tokenizer_config.json in it{hint}")
    for name in ("tokenizer.json", *KEPT_FILES):
        if name.endswith(".json") and (path / name).is_file():
            _read_json(path / name, path)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
        raise _bad_dir(path, f"transformers cannot load it ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise _bad_dir(path, f"{type(tok).__name__} is not a fast tokenizer (no tokenizer.json); "
                             "convert it with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    if tok.eos_token_id is None:
        raise DataPrepError(
            f"--tokenizer {path} has no eos_token: documents are separated by EOS, so set one "
            "(tok.eos_token = '<|endoftext|>' or another token of its vocabulary, then "
            "tok.save_pretrained(DIR); or \"eos_token\" in its tokenizer_config.json), or omit "
            "--tokenizer to train a SentencePiece model")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    files = {f"{HF_DIR}/tokenizer.json": backend.to_str(pretty=True).encode()}
    for name in KEPT_FILES:
        if (path / name).is_file():
            files[f"{HF_DIR}/{name}"] = (path / name).read_bytes()
    kept = _backend_from_files(files)
    if kept.encode(PROBE, add_special_tokens=False).ids != tok(PROBE, add_special_tokens=False)["input_ids"]:
        raise _bad_dir(path, f"{type(tok).__name__} does not encode through its tokenizers backend "
                             "(a Python-side tokenizer); data_prep needs one that does")
    # = len(tok): transformers counts the backend's tokens with the added ones, too
    return TokenizerFiles(HF, files, hf_vocab_size(kept), int(tok.eos_token_id))


def _backend_from_files(files: dict):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files[f"{HF_DIR}/tokenizer.json"].decode())
    cfg = files.get(f"{HF_DIR}/tokenizer_config.json")
    return _configure(tok, json.loads(cfg) if cfg else {})


def _configure(tok, cfg: dict):
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
    return tok


def hf_backend(tokenizer_dir):
    """The dataset's HF tokenizer (its tokenizer/ directory) as a ``tokenizers.Tokenizer``:
    no truncation or padding, special tokens split as its tokenizer_config.json says."""
    from tokenizers import Tokenizer

    d = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    cfg = d / "tokenizer_config.json"
    return _configure(tok, json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {})


def hf_vocab_size(tok) -> int:
    """Ids a ``tokenizers.Tokenizer`` can produce: its size with added tokens (or the largest
    id + 1, should the ids have gaps)."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def check_hf(root: Path, m: dict, check_hash: bool = True) -> str | None:
    """What is wrong with the HF tokenizer of dataset ``root`` (manifest ``m``), or None."""
    d = root / m["tokenizer"]
    names = m.get("tokenizer_files") or []
    missing = [n for n in names if not (d / n).is_file()]
    if not names or missing or "tokenizer.json" not in names:
        return f"{d}: tokenizer files {missing or ['tokenizer.json']} are missing"
    if check_hash and "tokenizer_sha256" in m and \
            files_sha256({n: (d / n).read_bytes() for n in names}) != m["tokenizer_sha256"]:
        return f"{d}: its files do not match the manifest's tokenizer_sha256"
    try:
        tok = hf_backend(d)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
        return f"{d}/tokenizer.json is not a Hugging Face tokenizer ({e})"
    vocab, eos = hf_vocab_size(tok), int(m["eos_id"])
    if vocab != int(m["vocab_size"]):
        return f"{d} has {vocab} tokens but the manifest says vocab_size={m['vocab_size']}"
    if tok.id_to_token(eos) is None:
        return f"{d} has no token with the manifest's eos_id {eos}"
    return None


# ----------------------------------------------------------------------------- the text API
@dataclass(frozen=True)
class TextTokenizer:
    """A prepared dataset's tokenizer for the trainer and generator: ``encode(text)`` gives the
    ids data_prep would store for ``text`` (without the EOS it appends to every document),
    ``decode(ids)`` the text (special tokens such as EOS left out)."""

    kind: str
    path: Path
    eos_id: int
    vocab_size: int
    sha256: str
    _encode: Callable = field(repr=False)
    _decode: Callable = field(repr=False)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


def _manifest(root: Path) -> dict:
    try:
        m = json.loads((root / "manifest.json").read_text())
        int(m["eos_id"]), int(m["vocab_size"])
        return m
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataPrepError(f"{root}: no readable manifest.json with eos_id and vocab_size ({e}); "
                            "pass a directory prepared by data_prep/prepare.py") from None


def load_text_tokenizer(dataset_dir) -> TextTokenizer:
    """The tokenizer of the prepared dataset ``dataset_dir`` (SentencePiece or HF)."""
    root = Path(dataset_dir)
    m = _manifest(root)
    kind = m.get("tokenizer_kind", SENTENCEPIECE)
    path = root / m.get("tokenizer", SP_FILE)
    eos, vocab = int(m["eos_id"]), int(m["vocab_size"])
    if kind == SENTENCEPIECE:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001
            raise DataPrepError(f"{path} is not a SentencePiece model ({e}); re-run data prep") from None
        size = sp.get_piece_size()
        enc, dec = (lambda t: sp.encode(unicodedata.normalize("NFC", t))), sp.decode
    elif kind == HF:
        problem = check_hf(root, m, check_hash=False)
        if problem:
            raise DataPrepError(f"{problem}; re-run data prep")
        tok = hf_backend(path)
        size = hf_vocab_size(tok)
        def enc(t):
            return tok.encode(t, add_special_tokens=False).ids

        def dec(ids):
            return tok.decode(ids, skip_special_tokens=True)
    else:
        raise DataPrepError(f"{root}/manifest.json: unknown tokenizer_kind {kind!r}")
    if size != vocab:
        raise DataPrepError(f"{path} has {size} tokens but {root}/manifest.json says "
                            f"vocab_size={vocab}; re-run data prep")
    sha = m.get("tokenizer_sha256") or TokenizerFiles.read(root, m).sha256
    return TextTokenizer(kind, path, eos, vocab, sha, enc, dec)


# ----------------------------------------------------------------------------- export
def export_hf_tokenizer(dataset_dir, out_dir):
    """Write into ``out_dir`` a tokenizer that ``transformers.AutoTokenizer.from_pretrained``
    loads (tokenizer.json + tokenizer_config.json, class PreTrainedTokenizerFast) and that
    encodes text to the dataset's ids: ``tok(text).input_ids == load_text_tokenizer(
    dataset_dir).encode(text)`` (no BOS/EOS added). eos_token is the dataset's EOS; pad_token is
    the tokenizer's own, else eos_token (no new id: the embedding keeps vocab_size rows).

    Built and checked in a temporary directory beside ``out_dir``, then renamed to it (or, if
    ``out_dir`` exists, e.g. a model's directory, its files moved in one by one, each whole;
    other files there are left alone). Returns the tokenizer loaded from ``out_dir``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    root, out = Path(dataset_dir), Path(out_dir)
    text = load_text_tokenizer(root)
    if text.kind == SENTENCEPIECE:
        backend, kw = _sentencepiece_export(text.path.read_bytes())
    else:
        backend, kw = _hf_export(text.path, text.eos_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=False,
                                       add_eos_token=False, **kw)
        fast.save_pretrained(str(tmp))
        cfg = tmp / "tokenizer_config.json"
        # the generic class of transformers 4 and 5 (5 writes TokenizersBackend): a model-specific
        # class could rebuild the pipeline from the vocabulary and encode differently
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "tokenizer_class":
                                   "PreTrainedTokenizerFast"}, indent=2, sort_keys=True) + "\n")
        _check_export(AutoTokenizer.from_pretrained(str(tmp), local_files_only=True), text)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def _sentencepiece_export(proto: bytes):
    """(backend, PreTrainedTokenizerFast keywords) of a SentencePiece model."""
    import sentencepiece as spm

    from data_prep.sp_convert import sentencepiece_backend

    sp = spm.SentencePieceProcessor(model_proto=proto)
    def piece(i):
        return sp.id_to_piece(i) if i >= 0 else None
    kw = {"unk_token": piece(sp.unk_id()), "bos_token": piece(sp.bos_id()),
          "eos_token": piece(sp.eos_id()), "pad_token": piece(sp.pad_id()) or piece(sp.eos_id()),
          # "</s>" in text is not EOS for SentencePiece: neither is it here
          "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    return sentencepiece_backend(proto), {k: v for k, v in kw.items() if v is not None}


def _token(v):
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _hf_export(tok_dir: Path, eos_id: int):
    """(backend, PreTrainedTokenizerFast keywords) of the dataset's HF tokenizer."""
    backend = hf_backend(tok_dir)
    cfg, stm = ({} if not (tok_dir / n).is_file() else json.loads((tok_dir / n).read_text("utf-8"))
                for n in ("tokenizer_config.json", "special_tokens_map.json"))
    kw = {"eos_token": backend.id_to_token(eos_id),
          "split_special_tokens": bool(cfg.get("split_special_tokens", False)),
          "clean_up_tokenization_spaces": bool(cfg.get("clean_up_tokenization_spaces", False))}
    for k in ("bos_token", "unk_token", "pad_token"):
        t = _token(cfg.get(k)) or _token(stm.get(k))
        if t is not None and backend.token_to_id(t) is not None:
            kw[k] = t
    kw.setdefault("pad_token", kw["eos_token"])
    if isinstance(cfg.get("model_max_length"), int):
        kw["model_max_length"] = cfg["model_max_length"]
    template = cfg.get("chat_template")
    if template is None and (tok_dir / "chat_template.jinja").is_file():
        template = (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        kw["chat_template"] = template
    return backend, kw


def _check_export(loaded, text: TextTokenizer) -> None:
    """The exported tokenizer must give the dataset's ids, EOS and size (or it is not written)."""
    for probe in (PROBE, PROBE.replace("\n", " "), "  " + PROBE.upper() + "  "):
        if loaded(probe)["input_ids"] != text.encode(probe):
            raise DataPrepError(f"export_hf_tokenizer({text.path.parent}): the exported "
                                "tokenizer encodes differently from the dataset's; please report")
    if loaded.eos_token_id != text.eos_id or len(loaded) > text.vocab_size:
        raise DataPrepError(f"export_hf_tokenizer({text.path.parent}): the exported tokenizer has "
                            f"eos id {loaded.eos_token_id} and {len(loaded)} tokens, the dataset "
                            f"{text.eos_id} and {text.vocab_size}; please report")


def _publish(tmp: Path, out: Path) -> None:
    from fileio import fsync_dir, fsync_tree

    fsync_tree(tmp)
    if not out.exists():
        try:
            os.rename(tmp, out)
            fsync_dir(out.parent)
            return
        except OSError:  # appeared meanwhile: move the files in
            pass
    if not out.is_dir():
        raise DataPrepError(f"export_hf_tokenizer: {out} exists and is not a directory")
    # tokenizer_config.json last: it names the class AutoTokenizer builds from tokenizer.json
    for f in sorted(tmp.iterdir(), key=lambda p: (p.name == "tokenizer_config.json", p.name)):
        os.replace(f, out / f.name)
    fsync_dir(out)
