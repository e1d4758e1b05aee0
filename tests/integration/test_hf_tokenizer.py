"""Hugging Face tokenizers in data_prep: ``prepare.py --tokenizer DIR``, the dataset reader's
checks, ``load_text_tokenizer`` and ``export_hf_tokenizer`` for both kinds of dataset.

Real libraries only (tokenizers, transformers, SentencePiece; local files, no hub), real text:
BBC News articles from the embedded corpus, and for other scripts the translations in Django's
message catalogues (the .po files of the pinned django wheel, read from site-packages)."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from codistill.data import DataError, TokenData
from data_prep.clean import clean_document, doc_hash, normalize
from data_prep.prepare import DataPrepError, merge, prepare
from data_prep.sample import sample_corpus_dir
from data_prep.tokenizer import export_hf_tokenizer, files_sha256, load_text_tokenizer
from data_prep.verify import VerifyError, verify

ROOT = Path(__file__).resolve().parents[2]
EOS, BOS = "<|endoftext|>", "<|begin|>"
LANGS = ("ar", "bn", "de", "el", "fr", "he", "hi", "ja", "ko", "pl", "ru", "th", "tr", "uk",
         "vi", "zh_Hans")


# ---------------------------------------------------------------- real text fixtures

@pytest.fixture(scope="module")
def articles():
    """Distinct valid-UTF-8 BBC articles (raw text), every 9th of the sorted corpus."""
    seen, out = set(), []
    for p in sorted(sample_corpus_dir().rglob("*.txt"))[::9]:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if normalize(text) not in seen:
            seen.add(normalize(text))
            out.append((p, text))
    return out


@pytest.fixture(scope="module")
def corpus(articles, tmp_path_factory):
    """120 articles, one file each."""
    d = tmp_path_factory.mktemp("corpus") / "bbc"
    d.mkdir()
    for p, _ in articles[:120]:
        (d / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    return d


@pytest.fixture(scope="module")
def texts(articles):
    """Texts to encode: articles not in the corpus as they are (blank lines, the headline),
    cleaned, and with whitespace runs, tabs and newlines, plus SentencePiece's special strings."""
    raw = [t for _, t in articles[120:150]]
    mangled = [re.sub(" ", "  ", t[:600]).replace("\n", " \n\n\t ") + "   " for t in raw[:10]]
    return raw + [normalize(t) for t in raw[:10]] + mangled + \
        ["", " ", "\n", "a  b", "</s> <s> <unk> <0x41> x</s>", f"end {EOS} of text"]


def _po_messages(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r'msgstr(\[\d+\])? "(.+)"$', line)
        if m:
            out.append(json.loads(f'"{m.group(2)}"'))
    return out


@pytest.fixture(scope="module")
def multilingual():
    """Django's translated messages in 16 languages (11 scripts), 20 messages per text."""
    spec = importlib.util.find_spec("django")
    assert spec is not None, "Django (pinned in requirements.txt) ships the translated text"
    locale = Path(spec.submodule_search_locations[0]) / "conf" / "locale"
    out = []
    for lang in LANGS:
        msgs = _po_messages(locale / lang / "LC_MESSAGES" / "django.po")[:200]
        assert len(msgs) > 100, lang
        out += [" \n".join(msgs[i:i + 20]) for i in range(0, len(msgs), 20)]
    return out


@pytest.fixture(scope="module")
def hf_dir(articles, tmp_path_factory):
    """A byte-level BPE tokenizer trained with the tokenizers library on the articles, saved
    as a Hugging Face tokenizer directory with an eos_token, and a post-processor that adds a
    BOS (which neither the dataset nor the export may have)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([t for _, t in articles], trainers.BpeTrainer(
        vocab_size=1200, special_tokens=[EOS, BOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    d = tmp_path_factory.mktemp("hf") / "bpe"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS).save_pretrained(str(d))
    assert _auto(d)("a b")["input_ids"][0] == tok.token_to_id(BOS)
    return d


def _prepare(corpus, out, **kw):
    return prepare([corpus], out, num_groups=2, val_fraction=0.2, text_mode="file", quiet=True, **kw)


@pytest.fixture(scope="module")
def hf_data(corpus, hf_dir, tmp_path_factory):
    return _prepare(corpus, tmp_path_factory.mktemp("hfdata") / "ds", tokenizer=hf_dir, workers=2)


@pytest.fixture(scope="module")
def sp_data(corpus, tmp_path_factory):
    return _prepare(corpus, tmp_path_factory.mktemp("spdata") / "ds", vocab_size=600)


def _auto(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _docs(d: Path) -> dict:
    """{doc hash: stored token ids (with the EOS)} over every split."""
    m = json.loads((d / "manifest.json").read_text())
    out = {}
    for s in m["splits"].values():
        toks = np.fromfile(d / s["tokens"], dtype=m["dtype"])
        idx, hashes = np.load(d / s["doc_index"]), np.load(d / s["doc_hashes"])
        for k, h in enumerate(hashes.tolist()):
            out[h] = toks[idx[k]:idx[k + 1]].tolist()
    return out


def _cleaned(corpus: Path) -> list[bytes]:
    return [c for c in (clean_document(p.read_text("utf-8")) for p in sorted(corpus.iterdir()))
            if not isinstance(c, str)]


# ---------------------------------------------------------------- prepare --tokenizer DIR

def test_manifest_records_the_hf_tokenizer(hf_data, hf_dir):
    m = json.loads((hf_data / "manifest.json").read_text())
    tok = _auto(hf_dir)
    files = {p.name: p.read_bytes() for p in (hf_data / "tokenizer").iterdir()}
    assert m["tokenizer"] == "tokenizer" and m["tokenizer_kind"] == "hf"
    assert m["tokenizer_files"] == sorted(files) == ["tokenizer.json", "tokenizer_config.json"]
    assert m["tokenizer_sha256"] == files_sha256(files)
    assert m["eos_id"] == tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
    assert m["vocab_size"] == len(tok) == 1200 and m["dtype"] == "uint16"
    assert m["tokenizer_trained"] is False and m["documents_kept"] == 120
    # the user's config is kept as it is; tokenizer.json is the tokenizer transformers built
    assert files["tokenizer_config.json"] == (hf_dir / "tokenizer_config.json").read_bytes()
    assert verify(hf_data)["documents"] == 120


def test_tokens_are_the_tokenizers_own_encoding_plus_eos(hf_data, hf_dir, corpus):
    tok = _auto(hf_dir)
    stored = _docs(hf_data)
    cleaned = _cleaned(corpus)
    assert len(stored) == len(cleaned) == 120
    for data in cleaned:
        ids = tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"]
        assert stored[doc_hash(data)] == ids + [tok.eos_token_id]


def test_hf_output_is_the_same_for_any_workers_and_for_shards_plus_merge(hf_data, corpus, hf_dir,
                                                                        tmp_path):
    one = _prepare(corpus, tmp_path / "w1", tokenizer=hf_dir, workers=1)
    assert _tree(one) == _tree(hf_data)  # fused pass, 1 vs 2 processes
    shards = [_prepare(corpus, tmp_path / f"s{i}", tokenizer=hf_dir, shard_index=i, num_shards=2)
              for i in (0, 1)]
    merged = merge(shards, tmp_path / "merged", quiet=True)
    assert _tree(merged) == _tree(hf_data)  # spooled shards + merge: the same bytes
    verify(merged)


def test_the_dataset_reader_checks_an_hf_tokenizer(hf_data, tmp_path):
    data = TokenData(hf_data)
    assert data.tokenizer_kind == "hf" and data.tokenizer_path == hf_data / "tokenizer"
    assert data.tokenizer_sha256 == json.loads((hf_data / "manifest.json").read_text())["tokenizer_sha256"]
    data.check_tokenizer()
    bad = tmp_path / "bad"
    shutil.copytree(hf_data, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "vocab_size": m["vocab_size"] + 8}))
    with pytest.raises(DataError, match=r"has 1200 tokens but the manifest says vocab_size=1208"):
        TokenData(bad).check_tokenizer()
    (bad / "manifest.json").write_text(json.dumps(m))
    cfg = bad / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"note": "edited",', 1))
    TokenData(bad).check_tokenizer()  # loads; only verify compares the hash
    with pytest.raises(VerifyError, match="tokenizer_sha256"):
        verify(bad)
    (bad / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer files \['tokenizer.json'\] are missing"):
        TokenData(bad).check_tokenizer()


def test_bad_tokenizer_directories_are_clear_errors(corpus, hf_dir, articles, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPrepError, match=r"--tokenizer .*empty: no tokenizer.json or "
                                            r"tokenizer_config.json in it; pass a Hugging Face"):
        _prepare(corpus, out, tokenizer=tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataPrepError, match=r"--tokenizer .*broken: tokenizer.json is not "
                                            r"readable JSON"):
        _prepare(corpus, out, tokenizer=broken)
    no_eos = tmp_path / "no_eos"
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(no_eos))
    with pytest.raises(DataPrepError, match=r"--tokenizer .*no_eos has no eos_token.*set one"):
        _prepare(corpus, out, tokenizer=no_eos)
    with pytest.raises(DataPrepError, match=r"--tokenizer .*nope does not exist"):
        _prepare(corpus, out, tokenizer=tmp_path / "nope")
    assert not out.exists() and list(tmp_path.glob("out.tmp-*")) == []
    r = subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare.py"), "--input", str(corpus),
                        "--output", str(out), "--num_groups", "2", "--tokenizer", str(tmp_path / "empty"),
                        "--quiet"], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "no tokenizer.json or tokenizer_config.json" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


# ---------------------------------------------------------------- load_text_tokenizer + export

def test_export_of_an_hf_dataset_encodes_like_the_dataset(hf_data, hf_dir, texts, multilingual,
                                                          tmp_path):
    ours, orig = load_text_tokenizer(hf_data), _auto(hf_dir)
    assert (ours.kind, ours.eos_id, ours.vocab_size) == ("hf", orig.eos_token_id, len(orig))
    tok = export_hf_tokenizer(hf_data, tmp_path / "exp")
    assert type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast") and tok.is_fast
    assert (tok.eos_token, tok.pad_token, tok.bos_token, len(tok)) == (EOS, EOS, BOS, 1200)
    for text in texts + multilingual:
        ids = orig(text, add_special_tokens=False)["input_ids"]
        assert tok(text)["input_ids"] == ours.encode(text) == ids
        nfc = unicodedata.normalize("NFC", text)
        assert tok.decode(ids) == ours.decode(ids) == nfc or EOS in text  # byte-level: lossless
    stored = next(iter(_docs(hf_data).values()))
    assert tok(ours.decode(stored[:-1]))["input_ids"] == stored[:-1] and stored[-1] == ours.eos_id


def test_export_of_a_sentencepiece_dataset_encodes_like_sentencepiece(sp_data, corpus, texts,
                                                                      multilingual, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_data / "tokenizer.model"))
    ours = load_text_tokenizer(sp_data)
    assert (ours.kind, ours.eos_id, ours.vocab_size) == ("sentencepiece", 2, sp.get_piece_size())
    tok = export_hf_tokenizer(sp_data, tmp_path / "exp")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert len(tok) == sp.get_piece_size()
    nfd = [unicodedata.normalize("NFD", t) for t in multilingual[::4]]
    for text in texts + multilingual + nfd:
        ids = sp.encode(unicodedata.normalize("NFC", text))  # what data_prep stores for it
        assert tok(text)["input_ids"] == ours.encode(text) == ids, text[:60]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == ours.decode(ids)
    for text in texts:  # NFC text: plainly SentencePiece's own encoding
        assert tok.encode(text) == sp.encode(text)
    assert 2 not in tok("</s> x</s>")["input_ids"]  # "</s>" in text is not EOS, as in SentencePiece
    stored = _docs(sp_data)
    for data in _cleaned(corpus):  # the dataset's own ids, document by document
        assert stored[doc_hash(data)] == tok(data.decode("utf-8"))["input_ids"] + [2]


def test_export_into_an_existing_directory_keeps_its_other_files(sp_data, hf_data, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt2"}')
    export_hf_tokenizer(sp_data, out)
    export_hf_tokenizer(hf_data, out)  # replaces the tokenizer files, each whole
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert (out / "config.json").read_text() == '{"model_type": "gpt2"}'
    assert _auto(out).eos_token == EOS and list(tmp_path.glob(".model.tmp-*")) == []
    with pytest.raises(DataPrepError, match="no readable manifest.json"):
        export_hf_tokenizer(tmp_path, tmp_path / "x")
    assert not (tmp_path / "x").exists()
