"""What data prep tells the user: its error types, messages and progress bars on stderr, the
checks that enough documents were kept, and the end-of-run summary line."""
from __future__ import annotations

import sys


class DataPrepError(ValueError):
    """A user-facing error: the message names the path/flag and the fix."""


class OutputExistsError(DataPrepError):
    pass


def say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def progress(quiet: bool, **kw):
    from tqdm import tqdm

    return tqdm(disable=quiet, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


def tick(bar, docs: int, n_tok: int) -> None:
    """Advance a tokenize progress bar by ``docs`` and show the token rate so far."""
    bar.update(docs)
    bar.set_postfix_str(f"{n_tok / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s",
                        refresh=False)


def fmt_dropped(dropped) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "nothing"


def check_kept(n_docs, names, stats, files, num_groups, val_fraction,
               tokenizer_only=False) -> None:
    """DataPrepError if nothing (or, unless ``tokenizer_only``, some split) would be empty."""
    kept = sum(n_docs[1:]) if tokenizer_only else sum(n_docs)
    if kept == 0:
        raise DataPrepError(
            f"nothing usable remains: {stats.documents_in} documents read from {len(files)} "
            f"files, dropped: {fmt_dropped(stats.dropped)}. Check --input/--text_mode/"
            "--jsonl_field, or relax --min_chars/--min_text_ratio (and the web-text filters: "
            "--languages, --lang_filter/--near_dup/--line_filters off)")
    if tokenizer_only:
        return
    empty = [names[i] for i in range(len(names)) if n_docs[i] == 0]
    if empty:
        raise DataPrepError(
            f"split(s) {', '.join(empty)} would be empty ({kept} documents kept for "
            f"{num_groups} groups at --val_fraction {val_fraction}); add more data, use fewer "
            "--num_groups or a larger --val_fraction")


def summary(quiet, output, manifest, num_groups) -> None:
    """The near-duplicate index warning (always) and the 'prepared ...' line (unless quiet)."""
    nd = manifest.get("filters", {}).get("near_dup", {}).get("index")
    if nd and nd["est_false_positive_per_doc"] > 1e-3:
        print(f"warning: the near-duplicate index is {nd['bloom_fill']:.0%} full: about "
              f"{nd['est_false_positive_per_doc']:.1e} of new documents are dropped as false "
              "near-duplicates; raise --near_dup_memory_mb (~75 MiB per million documents)",
              file=sys.stderr)
    sp = manifest["splits"]
    say(quiet, f"prepared {output}: kept {manifest['documents_kept']} of "
               f"{manifest['documents_in']} documents, "
               f"{sum(s['num_tokens'] for s in sp.values())} tokens "
               f"(val {sp['val']['num_docs']} docs; {num_groups} groups "
               f"{min(sp[f'group_{g}']['num_docs'] for g in range(num_groups))}-"
               f"{max(sp[f'group_{g}']['num_docs'] for g in range(num_groups))} docs each), "
               f"vocab {manifest['vocab_size']}; dropped: {fmt_dropped(manifest['dropped'])}")
