"""How the web-text filters of filters.py are set up for one run: 'auto' resolved per input
kind (Common Crawl WET or other), the main-process filter objects, and the manifest's
"filters" entry with its counts."""
from __future__ import annotations

from data_prep.filters import (
    DEFAULT_NUM_PERM,
    DEFAULT_SHINGLE,
    LANGID_MAX_CHARS,
    LINE_REASONS,
    FilterConfig,
    NearDupIndex,
    RepeatedLines,
    known_languages,
    langid_version,
    lsh_params,
    resolve_mode,
)
from data_prep.readers import file_kind
from data_prep.report import DataPrepError


def input_kind(path) -> int:
    """1 for Common Crawl WET input, 0 otherwise (the index into FilterSetup.configs)."""
    return 1 if file_kind(path) == "wet" else 0


class FilterSetup:
    """The resolved filter options: one FilterConfig for non-WET input (index 0) and one for
    Common Crawl WET input (index 1); 'auto' means on for WET only."""

    def __init__(self, cfg):
        """``cfg``: a PrepConfig (its filter options are checked and normalised there)."""
        self.modes = {"language": cfg.lang_filter, "near_dup": cfg.near_dup,
                      "line_filters": cfg.line_filters}
        self.languages = cfg.languages
        self.near_dup_threshold = cfg.near_dup_threshold
        self.near_dup_memory_mb = cfg.near_dup_memory_mb
        self.min_line_words = cfg.min_line_words
        self.max_line_repeats = cfg.max_line_repeats
        self.configs = tuple(FilterConfig(
            line_filters=resolve_mode(cfg.line_filters, wet),
            language=resolve_mode(cfg.lang_filter, wet), near_dup=resolve_mode(cfg.near_dup, wet),
            languages=self.languages, min_line_words=self.min_line_words,
            min_chars=cfg.min_chars, near_dup_threshold=self.near_dup_threshold)
            for wet in (False, True))

    @property
    def bands(self) -> int:  # LSH parameters (imports datasketch + scipy: only when used)
        return lsh_params(self.near_dup_threshold, DEFAULT_NUM_PERM)[0]

    @property
    def rows(self) -> int:
        return lsh_params(self.near_dup_threshold, DEFAULT_NUM_PERM)[1]

    def on(self, name: str, kinds) -> bool:
        """Whether filter ``name`` (a FilterConfig flag) applies to any of the input ``kinds``."""
        return any(getattr(self.configs[k], name) for k in kinds)

    def repeated_lines(self, kinds):
        """The per-file repeated-line filter, or None where no line filters apply."""
        return RepeatedLines(self.max_line_repeats) if self.on("line_filters", kinds) else None

    def near_dup_index(self, kinds):
        return NearDupIndex(self.near_dup_memory_mb, self.bands) \
            if self.on("near_dup", kinds) else None

    def check_languages(self, kinds) -> None:
        """DataPrepError if language ID applies and a --languages code is unknown to it."""
        if self.on("language", kinds):
            unknown = sorted(set(self.languages) - set(known_languages()))
            if unknown:
                raise DataPrepError(f"--languages: {', '.join(unknown)} not known to py3langid "
                                    f"(ISO 639-1 codes such as: {', '.join(sorted(known_languages()))})")

    def describe(self, kinds_all) -> dict:
        """Manifest entry; ``kinds_all``: which input kinds occur (0 other, 1 WET)."""
        def applies(name):
            on = [("other", "wet")[k] for k in sorted(kinds_all) if getattr(self.configs[k], name)]
            return on
        out = {}
        if applies("line_filters"):
            out["line_filters"] = {"mode": self.modes["line_filters"],
                                   "applies_to": applies("line_filters"),
                                   "min_line_words": self.min_line_words,
                                   "terminal_punctuation": True,
                                   "max_line_repeats": self.max_line_repeats,
                                   "repeat_scope": "per input file"}
        if applies("language"):
            out["language"] = {"mode": self.modes["language"], "applies_to": applies("language"),
                               "languages": list(self.languages), "library": langid_version(),
                               "chars_looked_at": LANGID_MAX_CHARS}
        if applies("near_dup"):
            out["near_dup"] = {"mode": self.modes["near_dup"], "applies_to": applies("near_dup"),
                               "threshold": self.near_dup_threshold, "num_perm": DEFAULT_NUM_PERM,
                               "bands": self.bands, "rows": self.rows,
                               "shingles": f"word {DEFAULT_SHINGLE}-grams, lower-cased",
                               "minhash": "datasketch MinHash, affine32, seed 1, BLAKE2b-32",
                               "memory_mb": self.near_dup_memory_mb}
        return out


def fill_counts(filters: dict, line_counts, lang_drops, index) -> None:
    """Add the run's counts to a ``describe()`` entry: lines dropped per reason, documents
    dropped per language, and the near-duplicate index's fill."""
    if "line_filters" in filters:
        filters["line_filters"]["lines_dropped"] = {r: int(line_counts.get(r, 0))
                                                    for r in LINE_REASONS}
    if "language" in filters:
        filters["language"]["dropped_by_language"] = dict(sorted(lang_drops.items()))
    if "near_dup" in filters and index is not None:
        filters["near_dup"]["index"] = index.stats()
