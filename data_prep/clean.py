"""Document cleaning: Unicode/whitespace normalisation, quality filters, exact de-duplication.

Normalisation (applied to every document before anything else):
  * Unicode NFC;
  * ``\\r\\n`` and ``\\r`` become ``\\n``; other control characters (Unicode category Cc,
    except newline and tab) are removed;
  * runs of horizontal whitespace (spaces, tabs, NBSP, other Unicode spaces) become one space;
  * every line is stripped and empty lines are removed, so paragraphs are separated by
    exactly one ``\\n`` (the EOS token separates documents, so no blank lines are needed).

Filters (a document failing one is counted under that reason in manifest["dropped"]):
  * ``too_short``: fewer than ``min_chars`` characters after normalisation;
  * ``non_text``: the fraction of characters that are letters, whitespace or common
    punctuation is below ``min_text_ratio`` (digits, symbols, markup and mojibake count
    against it);
  * ``duplicate``: the 64-bit BLAKE2b hash of the normalised text was already seen.

The de-duplication set is the one structure that grows with the corpus: a Python set of
64-bit ints, about 70 bytes per kept document (1 M documents ~ 70 MB). With 64-bit hashes
the chance of any false "duplicate" among 100 M documents is ~3e-4.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

DEFAULT_MIN_CHARS = 200
DEFAULT_MIN_TEXT_RATIO = 0.8

# Reasons that count documents (the others count files / paths).
DOC_REASONS = (
    "invalid_utf8",
    "malformed_json",
    "missing_text_field",
    "wet_no_text",
    "too_long",
    "too_short",
    "non_text",
    "duplicate",
    # web-text filters (filters.py)
    "too_short_after_line_filters",
    "language",
    "near_duplicate",
)
FILE_REASONS = (
    "missing_path",
    "unreadable_path",
    "unsupported_file",
    "empty_file",
    "binary_file",
    "truncated_gzip",
    "read_error",
)

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# "Good" characters: letters (incl. combining marks via \w minus digits/underscore),
# whitespace and common prose punctuation.
_GOOD_RE = re.compile(r"(?:[^\W\d_]|\s|[.,;:!?'\"()\[\]\-\u2010-\u2015\u2018-\u201f\u2026%$\u00a3\u20ac&/])+")


_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])  # the ASCII part of _CONTROL_RE
# whitespace other than space and newline (what str.split() splits on; controls are gone by then)
_ODD_SPACES = tuple(c for c in map(chr, range(0x3001)) if c.isspace() and c not in " \n")
_NL_TO_SPACE = bytes.maketrans(b"\n", b" ")


def normalize(text: str) -> str:
    """NFC + whitespace normalisation (see module docstring).

    Most documents are already tidy apart from NFC (single spaces, stripped non-empty
    lines): substring searches, which run in C at memory speed, find those and skip the
    per-line, per-word rebuilding, which costs more than tokenizing them; the result is
    the same either way."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():  # byte operations are much faster than a regex or replace on the str
        data = text.encode("ascii")
        probe = data.translate(_NL_TO_SPACE, _CONTROL_BYTES)  # controls gone, newlines as spaces
        if len(probe) != len(data):
            text = data.translate(None, _CONTROL_BYTES).decode("ascii")
        elif b"\t" not in probe and b"  " not in probe and probe[:1] != b" " and probe[-1:] != b" ":
            return text  # tidy: no double space, " \n", "\n ", "\n\n" or edge whitespace
    else:
        text = _CONTROL_RE.sub("", text)
    if not any(c in text for c in _ODD_SPACES) and text and text[0] not in " \n" and text[-1] not in " \n" \
            and "  " not in text.replace("\n", " "):
        return text
    # str.split() collapses every run of (Unicode) whitespace and strips the line.
    return "\n".join(line for line in (" ".join(x.split()) for x in text.split("\n")) if line)


_ASCII_GOOD = "".join(chr(c) for c in range(128) if chr(c).isalpha()) + " \n\t.,;:!?'\"()[]-%$&/"
_DELETE_ASCII_GOOD = str.maketrans("", "", _ASCII_GOOD)


_ASCII_GOOD_BYTES = _ASCII_GOOD.encode("ascii")


def text_ratio(text: str, data: bytes | None = None) -> float:
    """Fraction of characters that are letters, whitespace or common punctuation.

    ``data`` (optional) is ``text`` as UTF-8: deleting the good ASCII bytes from it is much
    faster than working on the str, and leaves the non-ASCII characters intact (ASCII bytes
    never occur inside a multi-byte UTF-8 sequence), which the regex then classifies."""
    if not text:
        return 0.0
    if data is None:
        rest = text.translate(_DELETE_ASCII_GOOD)
    else:
        rest = data.translate(None, _ASCII_GOOD_BYTES).decode("utf-8")
    if rest and not rest.isascii():
        rest = _GOOD_RE.sub("", rest)
    return 1.0 - len(rest) / len(text)


def doc_hash(data: bytes) -> int:
    """Stable 64-bit identity of a normalised document (UTF-8 bytes). Seed-independent."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def split_of(h: int, seed: int, num_groups: int, val_fraction: float) -> int:
    """Split index of the document whose ``doc_hash`` is ``h``: 0 = val, 1 + g = group_g.

    The document's hash (BLAKE2b of its normalised text, computed once) mixed with the
    seed; the val decision and the group use independently mixed bits, so adding documents
    never moves existing ones, and the groups are uniform among training documents.
    """
    u = _mix64(h ^ _mix64(int(seed) & _M64))
    if u / 2.0**64 < val_fraction:
        return 0
    return 1 + _mix64(u) % num_groups


def splits_of(hashes, seed: int, num_groups: int, val_fraction: float):
    """``split_of`` for an array of hashes at once (numpy uint64 arithmetic wraps mod 2**64
    like the masked Python ints; the uint64 -> float64 conversion rounds like int -> float):
    the same split for every hash."""
    h = np.asarray(hashes, dtype=np.uint64)
    u = _mix64_np(h ^ np.uint64(_mix64(int(seed) & _M64)))
    out = 1 + (_mix64_np(u) % np.uint64(num_groups)).astype(np.int64)
    out[u.astype(np.float64) / 2.0**64 < val_fraction] = 0
    return out


def _mix64_np(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that spreads every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def clean_document(raw: str, min_chars: int = DEFAULT_MIN_CHARS,
                   min_text_ratio: float = DEFAULT_MIN_TEXT_RATIO):
    """Return the normalised document as UTF-8 bytes, or the drop reason (a str).

    Exact duplicates are decided by the caller, in input order (see prepare.py)."""
    text = normalize(raw)
    if len(text) < min_chars:
        return "too_short"
    data = text.encode("utf-8")
    if text_ratio(text, data) < min_text_ratio:
        return "non_text"
    return data
