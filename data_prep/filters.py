"""Web-text quality filters: language ID, line-level boilerplate, near-duplicate MinHash LSH.

All filters are deterministic (no randomness, no dependence on the worker count) and every
document or line they drop is counted by reason (prepare.py puts the counts in the manifest).

Per document, in the worker processes (``apply_doc_filters``), after clean.py's normalisation:
  * line filters (C4-style): drop lines with fewer than ``min_line_words`` words
    (``short_line``) and lines that do not end in terminal punctuation
    (``no_terminal_punct``); a document left shorter than ``min_chars`` is dropped as
    ``too_short_after_line_filters``;
  * language ID with py3langid (langid.py's model ships inside the PyPI wheel, nothing is
    downloaded): the document is kept if its language is in ``languages``, else dropped as
    ``language`` and counted per language;
  * the MinHash signature for near-duplicate detection (``band_keys``).

In the main process, in input order (``RepeatedLines``, ``NearDupIndex``):
  * repeated lines: a line (its 64-bit hash) that already occurred in ``max_line_repeats``
    earlier documents of the same input file is removed (``repeated_line``). Counts are kept
    per input file (a Common Crawl WET file is a random sample of ~40k pages, where
    navigation/cookie/footer lines repeat), so memory is bounded by one file's distinct lines
    (capped at ``REPEAT_TABLE_MAX`` entries, then reset) and the result does not depend on
    how files are split over cluster workers;
  * near-duplicates: a document whose MinHash LSH band matches a band of an earlier kept
    document is dropped (``near_duplicate``). The index is a fixed-size Bloom filter over the
    (band, band hash) keys (the "LSHBloom" layout), so its memory is fixed by
    ``--near_dup_memory_mb`` whatever the corpus size; the price is a false-positive rate
    that grows with the number of kept documents, estimated from the filter's fill and
    written to the manifest. With 9 bands x 4 bits per document, ~75 bytes per kept
    document keep it under 1e-4: the default 256 MiB serves ~3.4 M documents (about 5e-5
    there; 1e-6 at 1 M, 5e-3 at 10 M: give ~75 MiB per million documents). prepare.py warns
    when the estimate passes 1e-3. Once most pages of the bit array are touched, the peak
    RSS includes the whole array.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------- configuration
DEFAULT_LANGUAGES = ("en",)
DEFAULT_NEAR_DUP_THRESHOLD = 0.8
DEFAULT_NUM_PERM = 128
DEFAULT_SHINGLE = 5
DEFAULT_MIN_LINE_WORDS = 3
DEFAULT_MAX_LINE_REPEATS = 3
DEFAULT_NEAR_DUP_MEMORY_MB = 256
LANGID_MAX_CHARS = 3000  # language ID looks at the first 3000 characters
BLOOM_K = 4  # bit positions per (band, key)
REPEAT_TABLE_MAX = 1 << 21  # distinct line hashes kept per file before the table is reset
FILTER_MODES = ("auto", "on", "off")

# Documents dropped here (reasons counted in manifest["dropped"]).
FILTER_DOC_REASONS = ("too_short_after_line_filters", "language", "near_duplicate")
# Lines removed from kept documents (manifest["filters"]["line_filters"]["lines_dropped"]).
LINE_REASONS = ("short_line", "no_terminal_punct", "repeated_line")

# Terminal punctuation: . ! ? and their full-width/CJK forms, ellipsis, and a closing quote
# or bracket after one of them.
_TERMINAL_RE = re.compile(r"[.!?\u2026\u3002\uff01\uff1f\u061f\u0964][\"'\u2019\u201d\u00bb)\]]*$")
_WORD_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class FilterConfig:
    """What the worker-side filters do for documents of one kind of input."""
    line_filters: bool = False
    language: bool = False
    near_dup: bool = False
    languages: tuple = DEFAULT_LANGUAGES
    min_line_words: int = DEFAULT_MIN_LINE_WORDS
    min_chars: int = 200
    near_dup_threshold: float = DEFAULT_NEAR_DUP_THRESHOLD
    num_perm: int = DEFAULT_NUM_PERM
    shingle: int = DEFAULT_SHINGLE

    @property
    def any(self) -> bool:
        return self.line_filters or self.language or self.near_dup


def resolve_mode(mode: str, is_wet: bool) -> bool:
    """'auto' -> on for Common Crawl WET input only; 'on'/'off' as given."""
    if mode not in FILTER_MODES:
        raise ValueError(f"filter mode must be one of {FILTER_MODES}, got {mode!r}")
    return is_wet if mode == "auto" else mode == "on"


# ----------------------------------------------------------------------------- line filters
def line_filter(text: str, min_words: int, counts: dict) -> str:
    """Remove short lines and lines without terminal punctuation; count them in ``counts``."""
    kept = []
    for line in text.split("\n"):
        if len(_WORD_RE.findall(line)) < min_words:
            counts["short_line"] = counts.get("short_line", 0) + 1
        elif not _TERMINAL_RE.search(line):
            counts["no_terminal_punct"] = counts.get("no_terminal_punct", 0) + 1
        else:
            kept.append(line)
    return "\n".join(kept)


def line_hash(line: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little")


class RepeatedLines:
    """Removes lines already seen in ``max_repeats`` earlier documents of the same file."""

    def __init__(self, max_repeats: int = DEFAULT_MAX_LINE_REPEATS):
        self.max_repeats = max_repeats
        self.counts: dict[int, int] = {}
        self.file = None

    def __call__(self, file_id, data: bytes) -> tuple[bytes, int]:
        """(document UTF-8, removed line count) after removing repeated lines."""
        if file_id != self.file or len(self.counts) > REPEAT_TABLE_MAX:
            self.counts.clear()
            self.file = file_id
        lines = data.split(b"\n")
        hashes = [line_hash(x) for x in lines]
        counts = self.counts
        keep = [counts.get(h, 0) < self.max_repeats for h in hashes]
        for h in set(hashes):
            counts[h] = counts.get(h, 0) + 1
        removed = len(keep) - sum(keep)
        if removed:
            data = b"\n".join(x for x, k in zip(lines, keep) if k)
        return data, removed


# ----------------------------------------------------------------------------- language ID
_LANGID = None


def _identifier():
    global _LANGID
    if _LANGID is None:
        import py3langid

        _LANGID = py3langid  # module-level classify() loads the packaged model once
    return _LANGID


def language_of(text: str) -> str:
    """ISO 639-1 code of the language of ``text`` (py3langid, 97 languages)."""
    return _identifier().classify(text[:LANGID_MAX_CHARS])[0]


def known_languages() -> list[str]:
    """Codes py3langid can output."""
    from py3langid.langid import _get_identifier

    return list(_get_identifier().labels)


def langid_version() -> str:
    from importlib.metadata import version

    try:
        return f"py3langid {version('py3langid')}"
    except Exception:  # noqa: BLE001
        return "py3langid"


# ----------------------------------------------------------------------------- MinHash LSH
_LSH_CACHE: dict = {}


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising datasketch's weighted false positive + negative areas."""
    key = (threshold, num_perm)
    if key not in _LSH_CACHE:
        from datasketch.lsh import _optimal_param

        _LSH_CACHE[key] = tuple(int(x) for x in _optimal_param(threshold, num_perm, 0.5, 0.5))
    return _LSH_CACHE[key]


_PERMS: dict = {}


def _hash32(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=4).digest(), "little")


def shingles(text: str, n: int = DEFAULT_SHINGLE) -> set[bytes]:
    """Word n-grams of the lower-cased text (punctuation ignored)."""
    words = _WORD_RE.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def minhash(text: str, num_perm: int = DEFAULT_NUM_PERM, n: int = DEFAULT_SHINGLE) -> np.ndarray:
    """datasketch MinHash (affine32 scheme, seed 1, BLAKE2b-32 of each shingle): uint64[num_perm]."""
    from datasketch import MinHash

    perms = _PERMS.get(num_perm)
    m = MinHash(num_perm=num_perm, seed=1, hashfunc=_hash32, scheme="affine32",
                permutations=perms)
    if perms is None:
        _PERMS[num_perm] = m.permutations
    m.update_batch(shingles(text, n))
    return m.hashvalues


def band_keys(text: str, threshold: float, num_perm: int = DEFAULT_NUM_PERM,
              n: int = DEFAULT_SHINGLE) -> np.ndarray:
    """One 64-bit key per LSH band: BLAKE2b-64 of (band index, the band's MinHash values)."""
    b, r = lsh_params(threshold, num_perm)
    hv = minhash(text, num_perm, n).astype("<u4")  # affine32 values fit in 32 bits
    out = np.empty(b, np.uint64)
    for i in range(b):
        d = hashlib.blake2b(hv[i * r:(i + 1) * r].tobytes(), digest_size=8,
                            person=b"lsh-band%d" % i).digest()
        out[i] = int.from_bytes(d, "little")
    return out


class NearDupIndex:
    """Fixed-memory LSH index of kept documents: a Bloom filter over band keys."""

    def __init__(self, memory_mb: float = DEFAULT_NEAR_DUP_MEMORY_MB, bands: int = 9):
        nbits = max(1 << 16, int(memory_mb * (1 << 23)))
        self.nbits = 1 << (nbits.bit_length() - 1)  # a power of two: positions by masking
        self.bits = np.zeros(self.nbits // 8, np.uint8)  # calloc: untouched pages cost nothing
        self.mask = np.uint64(self.nbits - 1)
        self.bands = bands
        self.inserted = 0
        self.set_bits = 0
        self._k = np.arange(BLOOM_K, dtype=np.uint64)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        h1 = keys & np.uint64(0xFFFFFFFF)
        h2 = (keys >> np.uint64(32)) | np.uint64(1)
        return ((h1[:, None] + self._k[None, :] * h2[:, None]) & self.mask)  # (bands, K)

    def check_and_add(self, keys: np.ndarray) -> bool:
        """True if a band of ``keys`` matches an indexed document (then nothing is added);
        else index ``keys`` and return False."""
        pos = self._positions(np.asarray(keys, np.uint64))
        byte, bit = (pos >> np.uint64(3)).astype(np.int64), (pos & np.uint64(7)).astype(np.uint8)
        present = (self.bits[byte] >> bit) & 1
        if present.all(axis=1).any():
            return True
        self.set_bits += len(np.unique(pos[present == 0]))  # bits that turn on now
        np.bitwise_or.at(self.bits, byte.ravel(), (np.uint8(1) << bit).ravel())
        self.inserted += 1
        return False

    def stats(self) -> dict:
        """Fill and the estimated chance that a new, unrelated document is a false match."""
        fill = self.set_bits / self.nbits
        fp_band = fill ** BLOOM_K
        return {"bloom_bits": self.nbits, "bloom_hashes": BLOOM_K, "indexed_docs": self.inserted,
                "bloom_fill": round(fill, 6),
                "est_false_positive_per_doc": float(1 - (1 - fp_band) ** self.bands)}


# ----------------------------------------------------------------------------- worker side
def apply_doc_filters(text: str, fc: FilterConfig, line_counts: dict):
    """Per-document filters of one normalised document.

    Returns (text, language or None, band keys or None) or a drop reason: "language:<code>"
    for a language drop, else a reason of FILTER_DOC_REASONS."""
    if fc.line_filters:
        text = line_filter(text, fc.min_line_words, line_counts)
        if len(text) < fc.min_chars:
            return "too_short_after_line_filters"
    lang = None
    if fc.language:
        lang = language_of(text)
        if lang not in fc.languages:
            return "language:" + lang
    keys = band_keys(text, fc.near_dup_threshold, fc.num_perm, fc.shingle) if fc.near_dup else None
    return text, lang, keys
