"""data_prep: formats, cleaning counts, disjoint/deterministic/stable splits, atomic output,
bad inputs and clear errors. All text is real: BBC News articles from the embedded corpus."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.clean import doc_hash, normalize, split_of, splits_of, text_ratio
from data_prep.prepare import DataPrepError, is_prepared, prepare, prepare_sample
from data_prep.sample import sample_corpus_dir
from data_prep.verify import VerifyError, verify

ROOT = Path(__file__).resolve().parents[2]
PREPARE = ROOT / "data_prep" / "prepare.py"
VERIFY = ROOT / "data_prep" / "verify.py"
SMALL_VOCAB = 600


# ---------------------------------------------------------------- real text fixtures

@pytest.fixture(scope="session")
def bbc():
    """(path, text) of every valid-UTF-8 article, sorted; plus the invalid ones."""
    good, bad = [], []
    for p in sorted(sample_corpus_dir().rglob("*.txt")):
        b = p.read_bytes()
        try:
            good.append((p, b.decode("utf-8")))
        except UnicodeDecodeError:
            bad.append(p)
    # keep only articles that are distinct after normalisation (the corpus has duplicates)
    seen, uniq = set(), []
    for p, t in good:
        n = normalize(t)
        if n not in seen:
            seen.add(n)
            uniq.append((p, t))
    return {"unique": uniq, "invalid": bad}


def _copy_articles(articles, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p, _ in articles:
        (dest / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    return dest


def _flat(text: str) -> str:
    """An article without blank lines (blank lines separate documents in .txt files)."""
    return "\n".join(line for line in text.splitlines() if line.strip())


def _run(inputs, out, **kw):
    kw.setdefault("quiet", True)
    kw.setdefault("num_groups", 2)
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("vocab_size", SMALL_VOCAB)
    return prepare(inputs, out, **kw)


def _manifest(d) -> dict:
    return json.loads((Path(d) / "manifest.json").read_text())


def _files(d) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


@pytest.fixture(scope="session")
def corpus(bbc, tmp_path_factory):
    """300 real articles, one file each (every 7th distinct article of the corpus)."""
    return _copy_articles(bbc["unique"][::7][:300], tmp_path_factory.mktemp("corpus") / "bbc")


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "ds"
    _run([corpus], out, text_mode="file", workers=1, seed=7)
    return out


@pytest.fixture(scope="session")
def tok(prepared):
    return prepared / "tokenizer.model"


@pytest.fixture(scope="session")
def texts(bbc):
    """Real article texts not used by ``corpus`` (for format tests)."""
    return [t for _, t in bbc["unique"][1::7][:60]]


# ---------------------------------------------------------------- format + verify

def test_output_format(prepared, corpus):
    m = _manifest(prepared)
    assert m["format_version"] == 1 and m["tokenizer"] == "tokenizer.model"
    assert set(m["splits"]) == {"val", "group_0", "group_1"}
    assert m["dtype"] == "uint16" and m["vocab_size"] <= SMALL_VOCAB
    assert m["documents_in"] == 300 and m["documents_kept"] == 300 and m["dropped"] == {}
    assert m["sources"][0]["files"] == 300
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    assert sp.eos_id() == m["eos_id"]
    by_norm = {normalize(p.read_text()): p for p in corpus.iterdir()}
    total = 0
    for _name, s in m["splits"].items():
        tokens = np.fromfile(prepared / s["tokens"], dtype=np.uint16)
        idx = np.load(prepared / s["doc_index"])
        assert idx.dtype == np.int64 and idx[0] == 0 and idx[-1] == len(tokens) == s["num_tokens"]
        assert len(idx) == s["num_docs"] + 1 and np.all(tokens[idx[1:] - 1] == m["eos_id"])
        # decoding a document gives back a real article (SentencePiece maps newlines to spaces)
        doc = sp.decode(tokens[idx[0]:idx[1] - 1].tolist())
        assert any(doc == n.replace("\n", " ") for n in by_norm), doc[:80]
        total += s["num_docs"]
    assert total == 300


def test_verify_cli_ok(prepared):
    r = subprocess.run([sys.executable, str(VERIFY), str(prepared)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK") and "300 documents" in r.stdout


@pytest.mark.parametrize("corruption", ["shared_hash", "dup_in_split", "count", "truncated_bin",
                                        "offsets", "tokenizer_sha", "token_range"])
def test_verify_catches_corruption(prepared, tmp_path, corruption):
    d = tmp_path / "ds"
    shutil.copytree(prepared, d)
    m = _manifest(d)
    if corruption == "shared_hash":
        h0, hv = np.load(d / "group_0.hashes.npy"), np.load(d / "val.hashes.npy")
        hv[0] = h0[3]
        np.save(d / "val.hashes.npy", hv)
        msg = "not disjoint"
    elif corruption == "dup_in_split":
        h = np.load(d / "group_1.hashes.npy")
        h[1] = h[0]
        np.save(d / "group_1.hashes.npy", h)
        msg = "duplicate document hash"
    elif corruption == "count":
        m["splits"]["group_0"]["num_docs"] += 1
        msg = "doc_index"
    elif corruption == "truncated_bin":
        b = (d / "val.bin").read_bytes()
        (d / "val.bin").write_bytes(b[:-2])
        msg = "bytes but manifest"
    elif corruption == "offsets":
        idx = np.load(d / "group_0.idx.npy")
        idx[2] = idx[1]
        np.save(d / "group_0.idx.npy", idx)
        msg = "strictly increasing"
    elif corruption == "tokenizer_sha":
        m["tokenizer_sha256"] = "0" * 64
        msg = "sha256"
    elif corruption == "token_range":
        m["vocab_size"] = 10
        msg = "vocab"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VerifyError, match=msg):
        verify(d)
    if corruption == "shared_hash":
        r = subprocess.run([sys.executable, str(VERIFY), str(d)], capture_output=True, text=True)
        assert r.returncode == 1 and "not disjoint" in r.stderr


# ---------------------------------------------------------------- determinism and stability

def test_deterministic_across_runs_and_workers(prepared, corpus, tmp_path):
    out = tmp_path / "again"
    _run([corpus], out, text_mode="file", workers=2, seed=7)
    assert _files(out) == _files(prepared)  # byte-identical tokenizer, shards and manifest
    # the single-pass path (reused tokenizer) too, 1 vs 2 workers
    fused = [tmp_path / "f1", tmp_path / "f2"]
    for w, d in zip((1, 2), fused):
        _run([corpus], d, text_mode="file", workers=w, seed=7, tokenizer=prepared / "tokenizer.model")
    assert _files(fused[0]) == _files(fused[1])
    for name in ("val.bin", "group_0.bin", "group_1.idx.npy", "val.hashes.npy"):
        assert _files(fused[0])[name] == _files(prepared)[name]  # same shards either way
    # the command line (its own process, spawned workers): same bytes again
    r = _cli("--input", corpus, "--output", tmp_path / "cli", "--num_groups", 2, "--val_fraction", 0.2,
             "--text_mode", "file", "--seed", 7, "--tokenizer", prepared / "tokenizer.model", "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert _files(tmp_path / "cli") == _files(fused[0])


def test_ordered_map_shares_work_with_the_main_process_in_order(prepared, bbc):
    """--workers 2 = the main process + 1 spawned helper: both encode chunks, results come
    back in task order and equal to the in-process ones, and look-ahead stays bounded."""
    from data_prep.parallel import chunked, encode_chunk, ordered_map, worker_pool

    texts = [t.encode() for _, t in bbc["unique"][:800]]
    cfg = (str(prepared / "tokenizer.model"), _manifest(prepared)["eos_id"], "uint16")
    tasks = [(cfg, c) for c in chunked(texts, max_items=8)]
    want = [encode_chunk(t) for t in tasks]
    sent = pulled = 0
    got = []
    with worker_pool(2) as pool:
        assert pool._processes == 1
        if sys.platform == "linux":  # one chunk fits the pool's pipes (one write, not ~16)
            import fcntl

            want_sz = min(1 << 20, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
            assert fcntl.fcntl(pool._inqueue._writer.fileno(), fcntl.F_GETPIPE_SZ) >= want_sz

        class CountingPool:  # the real pool; counts what is handed to the helper
            _processes = pool._processes

            def apply_async(self, fn, args):
                nonlocal sent
                sent += 1
                return pool.apply_async(fn, args)

        def gen():
            nonlocal pulled
            for t in tasks:
                pulled += 1
                yield t

        for r in ordered_map(encode_chunk, gen(), CountingPool(), inflight=4):
            got.append(r)
            assert pulled - len(got) <= 2 * 4 + 1  # bounded: never the whole input ahead
    assert len(got) == len(tasks)
    for (f, n), (wf, wn) in zip(got, want):
        assert np.array_equal(f, wf) and np.array_equal(n, wn)
    assert 4 <= sent < len(tasks)  # the helper got work, and so did the main process


def test_helpers_fork_only_from_a_single_threaded_process():
    import threading

    from data_prep.parallel import start_method

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert start_method() == "spawn"  # another thread: never fork
    finally:
        stop.set()
        t.join()
    # the command line: OPENBLAS_NUM_THREADS=1 before numpy -> one thread -> fork
    code = ("import os, sys, threading; "
            "os.environ['OPENBLAS_NUM_THREADS'] = '1'; "
            "import numpy, sentencepiece, data_prep.prepare, data_prep.filters; "
            "from data_prep.parallel import start_method; a = start_method(); "
            "{more}print(a, start_method())")
    out = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), more="")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fork", "fork"]
    more = "e = threading.Event(); threading.Thread(target=e.wait, daemon=True).start(); "
    out = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), more=more)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fork", "spawn"]
    more = "import torch; "
    out = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), more=more)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["fork", "spawn"]


def test_splits_stable_when_adding_documents(prepared, corpus, bbc, tok, tmp_path):
    more = _copy_articles(bbc["unique"][3::7][:80], tmp_path / "more")
    out = tmp_path / "bigger"
    _run([corpus, more], out, text_mode="file", tokenizer=tok, seed=7)
    m0, m1 = _manifest(prepared), _manifest(out)
    assert m1["documents_kept"] == 380
    for name in m0["splits"]:
        old = set(np.load(prepared / f"{name}.hashes.npy").tolist())
        new = set(np.load(out / f"{name}.hashes.npy").tolist())
        assert old <= new, name  # no existing document moved to another split
    # a different seed gives a different split
    out2 = tmp_path / "seed8"
    _run([corpus], out2, text_mode="file", tokenizer=tok, seed=8)
    assert not np.array_equal(np.load(out2 / "val.hashes.npy"), np.load(prepared / "val.hashes.npy"))


# ---------------------------------------------------------------- input formats

def _write_wet(path: Path, docs, empty=0):
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=path.name.endswith(".gz"))
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test", "format": "WET"}))
        for i, text in enumerate(list(docs) + [""] * empty):
            data = text.encode("utf-8")
            rec = w.create_warc_record(
                f"http://news.bbc.co.uk/2/hi/{i}.stm", "conversion", payload=io.BytesIO(data),
                length=len(data), warc_content_type="text/plain",
                warc_headers_dict={"WARC-Refers-To": f"<urn:uuid:0000{i}>"})
            w.write_record(rec)


def _jsonl(docs, field="text"):
    return "".join(json.dumps({field: t, "url": f"http://news.bbc.co.uk/{i}"}) + "\n"
                   for i, t in enumerate(docs))


@pytest.mark.parametrize("fmt", ["txt", "txt.gz", "txt_line", "jsonl", "jsonl_field", "wet",
                                 "wet.gz", "parquet", "json"])
def test_input_formats(fmt, texts, tok, tmp_path):
    docs = texts[:30]
    d = tmp_path / "in"
    d.mkdir()
    kw = {}
    flat = [_flat(t) for t in docs]  # blank lines separate documents
    if fmt == "txt":
        (d / "a.txt").write_text("\n\n".join(flat) + "\n")
    elif fmt == "txt.gz":
        with gzip.open(d / "a.txt.gz", "wt") as f:
            f.write("\n \n\n".join(flat))
    elif fmt == "txt_line":
        (d / "a.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in docs))
        kw["text_mode"] = "line"
    elif fmt == "jsonl":
        (d / "a.jsonl").write_text(_jsonl(docs))
    elif fmt == "jsonl_field":
        (d / "a.jsonl").write_text(_jsonl(docs, "body"))
        kw["jsonl_field"] = "body"
    elif fmt in ("wet", "wet.gz"):
        _write_wet(d / f"CC-MAIN-test.warc.{fmt}", docs)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), d / "a.parquet")
    elif fmt == "json":
        (d / "a.json").write_text(json.dumps([{"text": t} for t in docs]))
    out = tmp_path / "out"
    _run([d], out, tokenizer=tok, **kw)
    m = _manifest(out)
    assert m["documents_in"] == 30 and m["documents_kept"] == 30, m["dropped"]
    assert m["dropped"] == {}
    verify(out)


def test_mixed_directory_recursive(texts, tok, tmp_path):
    d = tmp_path / "in"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "a.txt").write_text("\n\n".join(_flat(t) for t in texts[:10]))
    (d / "sub" / "b.jsonl").write_text(_jsonl(texts[10:20]))
    _write_wet(d / "sub" / "deeper" / "c.warc.wet.gz", texts[20:30])
    out = tmp_path / "out"
    _run([d], out, tokenizer=tok)
    m = _manifest(out)
    assert m["documents_kept"] == 30 and m["sources"][0]["files"] == 3


# ---------------------------------------------------------------- cleaning counts

def test_cleaning_counts(texts, tok, tmp_path):
    docs = [_flat(t) for t in texts[:20]]
    dups = [docs[0], docs[1].replace(" ", "  \t"), docs[2]]  # whitespace-only changes: still dups
    shorts = [t.split("\n")[0] for t in texts[20:24]]  # real headlines, < 200 chars
    numbers = " ".join(w for t in texts[:40] for w in t.split() if any(c.isdigit() for c in w))
    non_text = " ".join(numbers.split()[:120])  # "$1.13bn (£600m) 76% ..." mostly digits
    all_docs = docs + dups + shorts + [non_text]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(all_docs))
    out = tmp_path / "out"
    _run([tmp_path / "in"], out, tokenizer=tok)
    m = _manifest(out)
    assert m["dropped"] == {"duplicate": 3, "too_short": 4, "non_text": 1}
    assert m["documents_in"] == len(all_docs) and m["documents_kept"] == 20


def test_normalize():
    assert normalize(" A\u00a0\u00a0b \t c\r\n\r\n\n  d  e \x07f\n") == "A b c\nd e f"
    assert normalize("Cafe\u0301") == "Caf\u00e9"
    for t in ("Profits rose 76% to $1.13bn (\u00a3600m).", "\u00e9t\u00e9 \u2014 caf\u00e9 \u00a7\u00a7 123 ###"):
        assert text_ratio(t) == text_ratio(t, t.encode("utf-8"))
    assert abs(text_ratio("#### 1234 ||||") - 2 / 14) < 1e-9 and text_ratio("plain words, only.") == 1.0


def _normalize_spec(text: str) -> str:
    """The module docstring's definition, step by step (no fast paths)."""
    import re
    import unicodedata
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def test_normalize_fast_paths_match_the_definition(bbc):
    import random
    rng = random.Random(0)
    alphabet = ["a", "b", "Z", " ", " ", "  ", "\n", "\n\n", "\t", "\r", "\r\n", "\x07", "\x0b", "\x1c", "\x7f",
                "\x85", "\x9f", "\u00a0", "\u2003", "\u2028", "\u3000", "\u00e9", "e\u0301", "\u2014", "\u00a3"]
    samples = ["", " ", "\n", "plain text", "tidy\nlines here", " lead", "trail ", "a\n\nb", "a \nb", "a\n b"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    samples += [text for _, text in bbc["unique"][:300]]
    for t in samples:
        assert normalize(t) == _normalize_spec(t), repr(t)


def test_split_of_is_stable_uniform_and_seeded():
    hashes = [doc_hash(f"document {i}".encode()) for i in range(20000)]
    splits = [split_of(h, 1234, 3, 0.1) for h in hashes]
    assert splits == [split_of(h, 1234, 3, 0.1) for h in hashes]  # a function of (hash, seed) only
    counts = np.bincount(splits, minlength=4)
    assert abs(counts[0] / 20000 - 0.1) < 0.01  # val fraction
    assert all(abs(c / counts[1:].sum() - 1 / 3) < 0.02 for c in counts[1:])  # groups uniform
    other = [split_of(h, 99, 3, 0.1) for h in hashes]
    assert 0.5 < np.mean(np.array(splits) != np.array(other)) < 0.8  # another seed, another split
    # the val decision does not depend on the number of groups
    assert [s == 0 for s in splits] == [split_of(h, 1234, 5, 0.1) == 0 for h in hashes]
    # the array version (used per chunk) gives the same split for every hash, incl. extremes
    rng = np.random.default_rng(0)
    many = hashes + rng.integers(0, 2**64, 50000, dtype=np.uint64, endpoint=False).tolist() + \
        [0, 1, 2**63, 2**64 - 1]
    for seed, g, vf in ((1234, 3, 0.1), (7, 1, 0.5), (2**40 + 3, 64, 0.0001)):
        assert splits_of(np.array(many, dtype=np.uint64), seed, g, vf).tolist() == \
            [split_of(h, seed, g, vf) for h in many]


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_skipped_and_counted(bbc, texts, tok, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    good = [_flat(t) for t in texts[:20]]
    (d / "good.txt").write_text("\n\n".join(good))
    # the corpus's own non-UTF-8 article (a raw 0xA3 pound sign)
    assert len(bbc["invalid"]) == 1
    raw = bbc["invalid"][0].read_bytes()
    (d / "latin1.txt").write_bytes(b"\n".join(x for x in raw.splitlines() if x.strip()))
    (d / "binary.txt").write_bytes(gzip.compress(texts[30].encode()) + b"\x00" * 16)
    (d / "empty.txt").write_bytes(b"")
    (d / "empty2.jsonl").write_text("\n\n")
    blob = gzip.compress("\n\n".join(good[:5]).encode())
    (d / "truncated.txt.gz").write_bytes(blob[: len(blob) // 2])
    lines = _jsonl(texts[40:45]).splitlines()
    lines[1] = lines[1][:-5]  # malformed JSON
    lines[2] = json.dumps({"body": texts[42]})  # missing text field
    lines[3] = json.dumps({"text": 42})  # text is not a string
    (d / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    _write_wet(d / "crawl.warc.wet.gz", texts[50:53], empty=2)
    blob = (d / "crawl.warc.wet.gz").read_bytes()
    (d / "truncated.warc.wet.gz").write_bytes(blob[: len(blob) - 300])
    (d / "notes.csv").write_text("a,b\n")
    os.symlink(d / "does-not-exist.txt", d / "dangling.txt")
    out = tmp_path / "out"
    _run([d, tmp_path / "missing-dir"], out, tokenizer=tok, quiet=False)
    m = _manifest(out)
    assert m["dropped"] == {
        "invalid_utf8": 1, "binary_file": 1, "empty_file": 2, "truncated_gzip": 2,
        "malformed_json": 1, "missing_text_field": 2, "wet_no_text": 2, "unsupported_file": 1,
        "unreadable_path": 1, "missing_path": 1}
    # good.txt 20 + jsonl 2 + wet 3 (+ whatever complete records preceded the truncation)
    assert m["documents_kept"] >= 25
    verify(out)
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.startswith("prepared")][-1]
    assert "truncated_gzip=2" in last and "invalid_utf8=1" in last


def test_too_long_document(texts, tok, tmp_path):
    (tmp_path / "in").mkdir()
    docs = [_flat(t) for t in texts[:20]]
    docs[0] = "\n".join(docs)  # one document much longer than all others
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(docs))
    out = tmp_path / "out"
    _run([tmp_path / "in"], out, tokenizer=tok, max_doc_bytes=len(docs[0].encode()) - 1)
    assert _manifest(out)["dropped"] == {"too_long": 1}


# ---------------------------------------------------------------- clear errors

def _cli(*args):
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args), "--quiet"],
                          capture_output=True, text=True)


def test_clear_errors(corpus, tok, texts, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match="no input file found.*nope"):
        _run([tmp_path / "nope"], out)
    with pytest.raises(DataPrepError, match="--num_groups must be >= 1"):
        _run([corpus], out, num_groups=0)
    for vf in (0, 0.6):
        with pytest.raises(DataPrepError, match=r"--val_fraction must be in \(0, 0.5\]"):
            _run([corpus], out, val_fraction=vf)
    not_sp = tmp_path / "tok.model"
    not_sp.write_text(texts[0])
    with pytest.raises(DataPrepError, match="not a SentencePiece model"):
        _run([corpus], out, tokenizer=not_sp)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("\n\n".join(t.split("\n")[0] for t in texts[:5]))
    with pytest.raises(DataPrepError, match="nothing usable remains.*too_short=5"):
        _run([tmp_path / "short"], out, tokenizer=tok)
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.txt").write_text("\n\n".join(_flat(t) for t in texts[:6]))
    with pytest.raises(DataPrepError, match="would be empty.*fewer --num_groups"):
        _run([tmp_path / "few"], out, tokenizer=tok, num_groups=8)
    assert not out.exists()
    assert list(tmp_path.glob("out.tmp-*")) == []
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataPrepError, match="not empty; pass --overwrite"):
        _run([corpus], out, tokenizer=tok)
    # the CLI turns these into exit status 2 with the message
    r = _cli("--input", tmp_path / "nope", "--output", tmp_path / "o2", "--num_groups", 2)
    assert r.returncode == 2 and "no input file found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--input", corpus, "--output", tmp_path / "o2", "--num_groups", 2,
             "--tokenizer", not_sp)
    assert r.returncode == 2 and "not a SentencePiece model" in r.stderr
    r = _cli("--sample", "--input", corpus, "--output", tmp_path / "o3")
    assert r.returncode == 2 and "exclusive" in r.stderr


# ---------------------------------------------------------------- atomic output

def test_crash_leaves_no_output_and_keeps_previous(corpus, tok, prepared, tmp_path, monkeypatch):
    import data_prep.prepare as P

    calls = {"n": 0}
    real = P.ShardWriter.add_chunk

    def crashing(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(self, *args)

    monkeypatch.setattr(P.ShardWriter, "add_chunk", crashing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        _run([corpus], out, text_mode="file", tokenizer=tok)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # with --overwrite the previous complete dataset survives a crash untouched
    shutil.copytree(prepared, out)
    before = _files(out)
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        _run([corpus], out, text_mode="file", tokenizer=tok, overwrite=True)
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    # and a successful --overwrite replaces it
    _run([corpus], out, text_mode="file", tokenizer=tok, overwrite=True, num_groups=3)
    assert _manifest(out)["num_groups"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_process_leaves_no_output(corpus, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(PREPARE), "--input", str(corpus), "--output",
                             str(out), "--num_groups", "2", "--text_mode", "file",
                             "--vocab_size", "2000", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob("out.tmp-*/documents.spool")):
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be killed"
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    assert not is_prepared(out)
    if sig == signal.SIGTERM:  # cleaned up on the way out
        assert rc == 143 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- embedded sample

def test_prepare_sample_concurrent(tmp_path):
    """Two processes auto-preparing the sample at once: one wins, both get a valid dir."""
    out = tmp_path / "sample"
    code = ("import sys; from data_prep.prepare import prepare_sample; "
            f"print(prepare_sample({str(out)!r}, vocab_size=2000, quiet=True))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se
        assert so.strip() == str(out)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sample"]
    m = _manifest(out)
    assert m["num_groups"] == 6 and m["val_fraction"] == 0.05
    assert m["documents_in"] == 2225
    assert m["dropped"] == {"duplicate": 98, "invalid_utf8": 1}
    assert m["documents_kept"] == 2126
    assert all(s["num_docs"] > 50 for s in m["splits"].values())
    verify(out)
    assert prepare_sample(out) == out  # already there: returns at once


def test_a_device_or_fifo_input_is_skipped_not_read_forever(texts, tok, tmp_path):
    """A .txt name that is a link to /dev/zero (or a FIFO, in a directory) would be read
    forever: it is skipped and counted like any unusable input file, with the reason."""
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    t0 = time.monotonic()
    with pytest.raises(DataPrepError, match=r"no input file found.*zero\.txt.*unsupported_file=1"):
        _run([tmp_path / "zero.txt"], tmp_path / "out")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(texts[:20]))
    os.mkfifo(d / "pipe.txt")  # nobody ever writes to it: opening it would block
    out = _run([d], tmp_path / "out2", tokenizer=tok)
    assert json.loads((out / "manifest.json").read_text())["dropped"]["unsupported_file"] == 1
    assert time.monotonic() - t0 < 120
