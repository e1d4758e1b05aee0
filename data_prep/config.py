"""PrepConfig: the options of one data-prep run, defined once.

Each field is one option of ``prepare()`` and one command-line flag of prepare.py (its
argparse keywords sit in the field's metadata; prepare.build_parser turns them into the
parser). Every check of the option values is made here, when a PrepConfig is created, so a
bad option fails before anything is read or written; checks that need the input files
(known languages, enough documents kept) run in the pipeline.
"""
from __future__ import annotations

import operator
import os
from dataclasses import MISSING, dataclass, field, fields

from data_prep.clean import DEFAULT_MIN_CHARS, DEFAULT_MIN_TEXT_RATIO
from data_prep.filters import (
    DEFAULT_LANGUAGES,
    DEFAULT_MAX_LINE_REPEATS,
    DEFAULT_MIN_LINE_WORDS,
    DEFAULT_NEAR_DUP_MEMORY_MB,
    DEFAULT_NEAR_DUP_THRESHOLD,
    FILTER_MODES,
)
from data_prep.readers import DEFAULT_MAX_DOC_BYTES, TEXT_MODES
from data_prep.report import DataPrepError

MIN_VOCAB = 300

OPTION_GROUPS = {  # key -> (title, description) of the command line's option groups
    "filters": ("web-text filters", ("each 'auto' (the default) = on for Common Crawl WET input "
                "(.warc.wet[.gz] files or URLs), off for other input; 'on'/'off' for every input")),
    "cluster": ("cluster", ("N independent workers over disjoint slices of the "
                "input list, then one merge (see slurm/prepare_data_array.sh)")),
}


def _opt(default=MISSING, *, flag=None, group=None, cli_default=MISSING, **argparse):
    """A PrepConfig field and its flag: ``flag`` (default --<name>), option ``group``
    (OPTION_GROUPS), ``argparse`` keywords, and ``cli_default`` where the command line's
    default differs (None: prepare.py resolves it, e.g. from the --sample defaults)."""
    return field(default=default, metadata={"flag": flag, "group": group,
                                            "cli_default": cli_default, "argparse": argparse})


@dataclass
class PrepConfig:  # every default below is a dataclasses.field made by _opt
    inputs: list = _opt(flag="--input", nargs="+", metavar="PATH",  # noqa: RUF009 - a field()
                        help="files or directories (recursive): .txt, .jsonl, .warc.wet, "
                             ".parquet, .json, optionally .gz")
    output: str = _opt(cli_default=None, metavar="DIR")
    num_groups: int = _opt(cli_default=None, type=int)
    vocab_size: int = _opt(8000, type=int)
    val_fraction: float = _opt(0.01, cli_default=None, type=float)
    tokenizer: str | None = _opt(None, metavar="MODEL_OR_DIR",
                                 help="reuse this SentencePiece .model file, or use this Hugging "
                                      "Face tokenizer directory (tokenizer.json and/or "
                                      "tokenizer_config.json; local files only)")
    workers: int = _opt(1, type=int)
    seed: int = _opt(1234, type=int)
    overwrite: bool = _opt(False, action="store_true")
    text_mode: str = _opt("blank_line", cli_default=None, choices=TEXT_MODES,
                          help=".txt files: documents separated by blank lines (default), one "
                               "per file, or one per line")
    jsonl_field: str = _opt("text")
    min_chars: int = _opt(DEFAULT_MIN_CHARS, type=int)
    min_text_ratio: float = _opt(DEFAULT_MIN_TEXT_RATIO, type=float)
    max_doc_bytes: int = _opt(DEFAULT_MAX_DOC_BYTES, type=int)
    tokenizer_sample_mb: float = _opt(32, type=float,
                                      help="train the tokenizer on a hash-selected sample of at "
                                           "most this many MiB of training documents (bounds "
                                           "its memory, ~30x the sample)")
    quiet: bool = _opt(False, action="store_true")
    # web-text filters (filters.py, resolved per input kind by filter_setup.py)
    lang_filter: str = _opt("auto", group="filters", choices=FILTER_MODES,
                            help="language ID (py3langid): keep --languages, count the rest")
    languages: tuple = _opt(DEFAULT_LANGUAGES, group="filters",
                            cli_default=",".join(DEFAULT_LANGUAGES),
                            help="comma-separated ISO 639-1 codes to keep (default %(default)s)")
    near_dup: str = _opt("auto", group="filters", choices=FILTER_MODES,
                         help="near-duplicate removal (MinHash LSH over word 5-grams)")
    near_dup_threshold: float = _opt(DEFAULT_NEAR_DUP_THRESHOLD, group="filters", type=float,
                                     help="Jaccard similarity above which a later document is "
                                          "dropped")
    near_dup_memory_mb: float = _opt(DEFAULT_NEAR_DUP_MEMORY_MB, group="filters", type=float,
                                     help="fixed size of the LSH Bloom index: ~75 MiB per "
                                          "million kept documents keeps false matches under "
                                          "1e-4 (see filters.py)")
    line_filters: str = _opt("auto", group="filters", choices=FILTER_MODES,
                             help="drop short lines, lines without terminal punctuation and "
                                  "lines repeated in many documents of the same file")
    min_line_words: int = _opt(DEFAULT_MIN_LINE_WORDS, group="filters", type=int)
    max_line_repeats: int = _opt(DEFAULT_MAX_LINE_REPEATS, group="filters", type=int,
                                 help="a line seen in this many earlier documents of a file is "
                                      "removed")
    # cluster scale (sharding.py)
    shard_index: int | None = _opt(None, group="cluster", type=int,
                                   help="this worker's slice (0-based)")
    num_shards: int | None = _opt(None, group="cluster", type=int,
                                  help="number of slices (needs --tokenizer)")
    tokenizer_only: bool = _opt(False, group="cluster", action="store_true",
                                help="only train the tokenizer: writes DIR/tokenizer.model")

    def __post_init__(self):
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [self.inputs]
        self._check_core()
        self._check_sharding()
        self._check_filters()

    def _check_core(self) -> None:
        try:
            self.num_groups = operator.index(self.num_groups)
        except TypeError:
            raise DataPrepError(f"--num_groups must be an integer >= 1 (got {self.num_groups!r})") from None
        if self.num_groups < 1:
            raise DataPrepError(f"--num_groups must be >= 1 (got {self.num_groups!r})")
        if not (0 < self.val_fraction <= 0.5):
            raise DataPrepError(f"--val_fraction must be in (0, 0.5] (got {self.val_fraction!r}); "
                                "a held-out validation split is required")
        if self.tokenizer is None and self.vocab_size < MIN_VOCAB:
            raise DataPrepError(f"--vocab_size must be >= {MIN_VOCAB} (got {self.vocab_size}): the "
                                "tokenizer keeps 256 byte-fallback pieces")
        if self.text_mode not in TEXT_MODES:
            raise DataPrepError(f"--text_mode must be one of {', '.join(TEXT_MODES)}")
        if self.workers < 1:
            raise DataPrepError(f"--workers must be >= 1 (got {self.workers})")

    def _check_sharding(self) -> None:
        shard_index, num_shards = self.shard_index, self.num_shards
        if (shard_index is None) != (num_shards is None):
            raise DataPrepError("--shard_index and --num_shards go together (e.g. --shard_index "
                                "$SLURM_ARRAY_TASK_ID --num_shards 8)")
        if num_shards is not None:
            if not (isinstance(num_shards, int) and num_shards >= 1):
                raise DataPrepError(f"--num_shards must be an integer >= 1 (got {num_shards!r})")
            if not (isinstance(shard_index, int) and 0 <= shard_index < num_shards):
                raise DataPrepError(f"--shard_index must be in [0, {num_shards - 1}] for "
                                    f"--num_shards {num_shards} (got {shard_index!r})")
            if self.tokenizer is None:
                raise DataPrepError("--num_shards needs a shared --tokenizer (every shard must "
                                    "use the same one): train it first with  prepare.py --input "
                                    "<some files> --output TOKDIR --tokenizer_only  and pass "
                                    "--tokenizer TOKDIR/tokenizer.model (or a Hugging Face "
                                    "tokenizer directory)")
            if self.tokenizer_only:
                raise DataPrepError("--tokenizer_only cannot be combined with --num_shards")
        if self.tokenizer_only and self.tokenizer is not None:
            raise DataPrepError("--tokenizer_only trains a tokenizer; drop --tokenizer")

    def _check_filters(self) -> None:
        """Checks and normalises the web-text filter options (languages: a sorted tuple)."""
        for flag, v in (("--lang_filter", self.lang_filter), ("--near_dup", self.near_dup),
                        ("--line_filters", self.line_filters)):
            if v not in FILTER_MODES:
                raise DataPrepError(f"{flag} must be one of {', '.join(FILTER_MODES)} (got {v!r})")
        languages = self.languages
        if isinstance(languages, str):
            languages = languages.split(",")
        self.languages = tuple(sorted({x.strip() for x in languages if x.strip()}))
        if not self.languages:
            raise DataPrepError("--languages: give at least one language code, e.g. en or en,de")
        if not (0 < self.near_dup_threshold < 1):
            raise DataPrepError(f"--near_dup_threshold must be in (0, 1) (got {self.near_dup_threshold!r})")
        if self.near_dup_memory_mb <= 0:
            raise DataPrepError(f"--near_dup_memory_mb must be > 0 (got {self.near_dup_memory_mb!r})")
        if self.min_line_words < 0 or self.max_line_repeats < 1:
            raise DataPrepError("--min_line_words must be >= 0 and --max_line_repeats >= 1")
        self.near_dup_threshold = float(self.near_dup_threshold)
        self.near_dup_memory_mb = float(self.near_dup_memory_mb)
        self.min_line_words = int(self.min_line_words)
        self.max_line_repeats = int(self.max_line_repeats)

    @classmethod
    def from_args(cls, args, **defaults) -> PrepConfig:
        """From parsed command-line arguments (cli_options): an option left at None takes
        ``defaults`` (e.g. the --sample ones), else the field's default."""
        kw = {}
        for f in fields(cls):
            v = getattr(args, f.name)
            if v is None:
                v = defaults.get(f.name, None if f.default is MISSING else f.default)
            kw[f.name] = v
        return cls(**kw)

    @property
    def cleaning(self) -> dict:
        """The manifest's record of the reading/cleaning options."""
        return {"text_mode": self.text_mode, "jsonl_field": self.jsonl_field,
                "min_chars": self.min_chars, "min_text_ratio": self.min_text_ratio,
                "max_doc_bytes": self.max_doc_bytes}

    @property
    def read_options(self) -> dict:
        """Keywords of readers.read_documents."""
        return {"text_mode": self.text_mode, "jsonl_field": self.jsonl_field,
                "max_doc_bytes": self.max_doc_bytes}

    @property
    def clean_options(self) -> tuple:
        """The cleaning/split arguments the worker functions of parallel.py take."""
        return (self.min_chars, self.min_text_ratio, self.seed, self.num_groups,
                self.val_fraction)


def cli_options():
    """(field name, option group key or None, flag, argparse keywords) per PrepConfig field."""
    for f in fields(PrepConfig):
        m = f.metadata
        default = m["cli_default"] if m["cli_default"] is not MISSING else \
            (None if f.default is MISSING else f.default)
        yield f.name, m["group"], m["flag"] or f"--{f.name}", \
            {**m["argparse"], "dest": f.name, "default": default}
