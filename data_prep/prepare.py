"""Text -> cleaned documents -> SentencePiece or Hugging Face tokenizer -> disjoint token shards.

    python data_prep/prepare.py --input PATH [PATH ...] --output DIR --num_groups G \\
        [--vocab_size 8000] [--val_fraction 0.01] [--tokenizer MODEL_OR_HF_DIR] [--workers N] \\
        [--seed S] [--overwrite] [--text_mode blank_line|file|line] [--jsonl_field text] \\
        [--min_chars 200] [--min_text_ratio 0.8] [--tokenizer_sample_mb 32] [--quiet]
    python data_prep/prepare.py --sample [--output data/sample]     # embedded BBC News corpus

Web-text filters (filters.py; 'auto' = on for Common Crawl WET input, which may be http(s)
URLs streamed without storing): [--lang_filter auto|on|off] [--languages en]
[--near_dup auto|on|off] [--near_dup_threshold 0.8] [--near_dup_memory_mb 256]
[--line_filters auto|on|off] [--min_line_words 3] [--max_line_repeats 3]

Cluster scale (a shared tokenizer, N independent slices of the sorted input list, a merge):
    prepare.py --input ... --output TOK --tokenizer_only
    prepare.py --input ... --output SHARDS/shard_i --tokenizer TOK/tokenizer.model \
        --shard_index i --num_shards N [...same options for every shard...]
    prepare.py --merge SHARDS/shard_* --output DIR
The merged DIR is byte-identical to a one-process run with the same --tokenizer: every
per-document step (cleaning, line filters, language ID, MinHash, tokenization) and the
per-file repeated-line filter run in the shards; exact de-duplication runs in the shards
(within a slice) and again in --merge across slices; near-duplicate removal runs only in
--merge, over the band keys the shards stored, in the global input order.

Pipeline (two streaming passes; memory does not grow with the corpus except for the
de-duplication set, ~70 bytes per kept document, and the fixed-size near-dup index):
  1. read inputs (readers.py) -> clean + filter + hash in workers (clean.py, filters.py) ->
     repeated lines, exact and near duplicates in input order -> append kept documents to a
     spool file in the temporary output dir;
  2. train SentencePiece on a hash-selected sample of at most --tokenizer_sample_mb of
     training documents (or reuse --tokenizer: a SentencePiece .model file, or a Hugging Face
     tokenizer directory, stored as DIR/tokenizer/ and encoded with the tokenizers library);
  3. read the spool -> encode in workers (order preserved) -> per-split .bin/.idx.npy/
     .hashes.npy -> manifest.json -> atomic rename of the temporary dir to DIR.
With --tokenizer and no filter active, 1 and 3 are fused into one pass.

This module is the command line and prepare(); the parts live in: config.py (PrepConfig: the
options, their flags and checks), pipeline.py (the passes), dedup.py (exact/near-duplicate
drops), filter_setup.py (filters per input kind), tokenizer.py, shard_format.py (the output
format and its atomic publish; codistill/data.py reads it), sharding.py (shard runs and --merge),
provenance.py (manifest sources), report.py (errors, messages, summary).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: one BLAS thread per process, set before numpy loads
    from data_prep import ONE_THREAD_ENV

    for _k, _v in ONE_THREAD_ENV.items():
        os.environ.setdefault(_k, _v)  # before numpy: no BLAS thread pool (see parallel.py)

import argparse
import logging
import signal

from data_prep.config import MIN_VOCAB, OPTION_GROUPS, PrepConfig, cli_options
from data_prep.filter_setup import FilterSetup
from data_prep.pipeline import build
from data_prep.provenance import SourceSummary
from data_prep.readers import Stats, discover
from data_prep.report import DataPrepError, OutputExistsError, fmt_dropped, say, summary
from data_prep.sample import SAMPLE_DEFAULTS, SampleCorpusMissing, sample_corpus_dir
from data_prep.shard_format import (
    FORMAT_VERSION,
    ShardWriter,
    check_output,
    is_prepared,
    split_names,
    staged_output,
)
from data_prep.sharding import SHARD_MANIFEST, merge, slice_files
from data_prep.tokenizer import load_tokenizer, load_tokenizer_proto

__all__ = ["FORMAT_VERSION", "MIN_VOCAB", "SHARD_MANIFEST", "DataPrepError", "FilterSetup",
           "OutputExistsError", "PrepConfig", "ShardWriter", "SourceSummary", "build_parser",
           "is_prepared", "load_tokenizer", "load_tokenizer_proto", "main", "merge", "prepare",
           "prepare_sample", "split_names"]


def prepare(inputs, output=None, num_groups=None, **options) -> Path:
    """Prepare ``inputs`` into the dataset directory ``output``; returns its path.

    Takes a PrepConfig, ``prepare(PrepConfig(...))``, or PrepConfig's fields as arguments,
    ``prepare(inputs, output, num_groups, vocab_size=..., ...)``.
    Raises DataPrepError (a ValueError) with an actionable message on bad arguments or when
    nothing usable remains. Bad input files/records are skipped and counted, never fatal.
    """
    if isinstance(inputs, PrepConfig):
        if output is not None or num_groups is not None or options:
            raise TypeError("prepare(PrepConfig) takes no further arguments")
        cfg = inputs
    else:
        cfg = PrepConfig(inputs, output, num_groups, **options)
    output = Path(cfg.output)
    check_output(output, cfg.overwrite)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None

    stats = Stats(sources=SourceSummary(cfg.inputs, keep_files=cfg.num_shards is not None))
    files = discover(cfg.inputs, stats)
    if not files:
        raise DataPrepError(
            "no input file found in --input " + " ".join(map(str, cfg.inputs)) +
            f" ({fmt_dropped(stats.dropped)}); give existing files or directories with "
            ".txt, .jsonl, .warc.wet[.gz], .parquet or .json files (optionally .gz), "
            "or http(s) URLs of such files")
    shard = None
    if cfg.num_shards is not None:
        files, shard = slice_files(files, stats, cfg.shard_index, cfg.num_shards)
    with staged_output(output, cfg.overwrite) as tmp:
        manifest = build(tmp, files, stats, cfg, tok, shard)
    if cfg.tokenizer_only:
        say(cfg.quiet, f"tokenizer written to {output / 'tokenizer.model'} (from "
                       f"{manifest['documents_kept']} documents; dropped: "
                       f"{fmt_dropped(manifest['dropped'])})")
        return output
    if shard is not None:
        say(cfg.quiet, f"shard {cfg.shard_index}/{cfg.num_shards} written to {output}: "
                       f"{sum(s['num_docs'] for s in manifest['splits'].values())} documents of "
                       f"{manifest['documents_in']} read; merge all shards with  prepare.py "
                       "--merge SHARD_DIR ... --output DIR")
        return output
    summary(cfg.quiet, output, manifest, cfg.num_groups)
    return output


def prepare_sample(output_dir, num_groups: int = 6, vocab_size: int = 8000, seed: int = 1234,
                   workers: int = 1, quiet: bool = False) -> Path:
    """Prepare the embedded BBC News corpus into ``output_dir`` unless it is already there.

    Safe to call from several processes at once: each builds in its own temp dir; the first
    rename wins and the others discard their copy and return the finished directory.
    An already prepared directory is returned as it is (whatever its num_groups/vocab):
    callers that need other settings should check its manifest.json.
    """
    out = Path(output_dir)
    if is_prepared(out):
        return out
    try:
        corpus = sample_corpus_dir()
    except SampleCorpusMissing as e:
        raise DataPrepError(str(e)) from None
    try:
        return prepare([corpus], out, num_groups=num_groups, vocab_size=vocab_size,
                       val_fraction=SAMPLE_DEFAULTS["val_fraction"], seed=seed, workers=workers,
                       text_mode=SAMPLE_DEFAULTS["text_mode"], quiet=quiet)
    except OutputExistsError:
        if is_prepared(out):
            return out
        raise


_CLI_ONLY = {  # command-line options that are no PrepConfig field: field they follow -> option
    "inputs": ("--sample", {"action": "store_true",
                            "help": "use the embedded BBC News corpus instead of --input "
                                    "(defaults: --output data/sample --num_groups 6 "
                                    "--val_fraction 0.05)"}),
    "num_shards": ("--merge", {"nargs": "+", "metavar": "SHARD_DIR",
                               "help": "merge the shard outputs into --output (no "
                                       "re-tokenization)"}),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: PrepConfig's options (config.cli_options) plus --sample and --merge."""
    p = argparse.ArgumentParser(
        description="Clean text, train/reuse a SentencePiece tokenizer (or use a Hugging Face "
                    "one) and write disjoint token shards (val + G groups).")
    groups = {None: p, **{k: p.add_argument_group(title, description)
                          for k, (title, description) in OPTION_GROUPS.items()}}
    for name, group, flag, kw in cli_options():
        groups[group].add_argument(flag, **kw)
        if name in _CLI_ONLY:
            extra, extra_kw = _CLI_ONLY[name]
            groups[group].add_argument(extra, **extra_kw)
    return p


def _config(args) -> PrepConfig:
    """The PrepConfig of a command line that is not --merge (--sample: the embedded corpus
    and its defaults)."""
    if args.sample:
        if args.inputs:
            raise DataPrepError("--sample and --input are exclusive; drop one of them")
        try:
            args.inputs = [sample_corpus_dir()]
        except SampleCorpusMissing as e:
            raise DataPrepError(str(e)) from None
        args.output = args.output or "data/sample"
        return PrepConfig.from_args(args, **SAMPLE_DEFAULTS)
    if args.tokenizer_only and args.num_groups is None:
        args.num_groups = 1
    missing = [f for f, v in (("--input", args.inputs), ("--output", args.output),
                              ("--num_groups", args.num_groups)) if v is None]
    if missing:
        raise DataPrepError(f"{', '.join(missing)} required (or use --sample for the "
                            "embedded corpus)")
    return PrepConfig.from_args(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. SLURM) -> SystemExit, so the temporary directory is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.merge:
            if args.inputs or args.sample or not args.output:
                raise DataPrepError("--merge SHARD_DIR ... takes only --output DIR (and "
                                    "--overwrite/--quiet); drop --input/--sample")
            merge(args.merge, args.output, overwrite=args.overwrite, quiet=args.quiet)
            return 0
        prepare(_config(args))
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
