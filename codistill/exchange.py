"""Teacher exports: how a group publishes its weights and how a peer reads them safely.

Layout under ``run_dir/group_{i}/exports/``:
    step_000500.safetensors   weights only (safetensors: never pickle)
    step_000500.json          metadata: group, step, tokens seen, model config + hash,
                              tokenizer hash, time, size and xxh3-64 digest of the weights file
    LATEST                    the name ("step_000500") of the newest complete export

Writers: temp file in the same directory -> fsync -> os.replace, weights first, then the
metadata, then LATEST, then fsync of the directory. A reader that follows LATEST therefore
only ever sees complete files; the size and digest in the metadata catch a file replaced or
truncated behind the reader's back. How one weights file is written and read back in one
verified pass (digest, header, NaN/Inf): codistill/weights_file.py.
A writer that fails (disk full) removes its half-written export and raises OSError; LATEST
still names the previous export. Temp files of a writer killed mid-write are ignored by
readers and removed by clean_temp_files when the writer starts again.
Readers: refuse anything that is not a well-formed safetensors file (a pickle renamed
.safetensors is rejected by its header before any byte of it is interpreted), a LATEST that
names anything but a plain export name in the same directory, metadata that does not match
the student's model config or tokenizer, and non-finite weights.

A peer may be hostile or broken, so every file of it is opened with codistill/files.py
``open_regular`` / ``read_bounded`` (regular files only, never through a symlink, a FIFO or a
device; every read bounded: LATEST ``MAX_LATEST`` bytes, metadata ``MAX_META``, weights the
size the metadata records, which must be the size the header's tensors tile exactly) and every
problem, whatever its kind (deeply nested JSON, a field of the wrong type, a directory where a
file should be), is an ExportError naming the file.

The step an export claims is bounded (``check_meta``): the file's name and the metadata agree
(in sync mode that is the step the reader's own schedule asks for, so a peer cannot claim any
other), 0 <= step <= ``MAX_STEP`` (10^9: ~30 years at one step a second; a step of 10^12 would
never become stale), and a caller that knows a bound passes ``max_step`` (e.g. its own step plus
the lead a peer may have). ``tokens_seen`` and ``weights_bytes`` are non-negative integers, the
latter at most weights_file.MAX_WEIGHTS.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codistill import faults
from codistill.files import MissingFile, atomic_write_bytes, fsync_dir, read_bounded
from codistill.weights_file import (  # noqa: F401
    MAX_WEIGHTS,
    ExportError,
    ReadBuffers,
    digest_fields,
    digest_matches,
    file_digest,
    parse_safetensors,
    read_safetensors,
    write_weights,
)

EXPORT_NAME = re.compile(r"^step_(\d{6,})$")
MAX_LATEST = 64          # bytes of a LATEST file ("step_000500")
MAX_META = 4 << 20       # bytes of an export's metadata (a transformers config is a few KiB)
MAX_STEP = 10 ** 9       # no run takes more optimizer steps


def export_name(step: int) -> str:
    return f"step_{step:06d}"


def write_export(exports_dir: Path, step: int, state_dict: dict[str, torch.Tensor], meta: dict,
                 keep: int = 3) -> Path:
    """Publish weights for ``step``; returns the path of the weights file. ``state_dict``: host
    tensors the caller no longer modifies (this may run on a background thread)."""
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    name = export_name(step)
    tensors = {k: v.detach() for k, v in state_dict.items()}
    try:
        info = write_weights(exports_dir / f"{name}.safetensors", tensors, step)
        meta = dict(meta, step=step, weights=f"{name}.safetensors", time=time.time(), **info)
        faults.oserror("export_oserror", step)  # test-only hook: a disk full at the worst moment
        atomic_write_bytes(exports_dir / f"{name}.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        atomic_write_bytes(exports_dir / "LATEST", name.encode())
        fsync_dir(exports_dir)
    except OSError:
        # LATEST still names the previous export (it is written last); drop the half-written one
        if read_latest(exports_dir, missing_ok=True) != step:
            for suffix in (".json", ".safetensors"):
                try:
                    (exports_dir / f"{name}{suffix}").unlink()
                except OSError:
                    pass
        raise
    prune_exports(exports_dir, keep)
    return exports_dir / f"{name}.safetensors"


def clean_temp_files(exports_dir: Path) -> list[str]:
    """Remove what a writer killed mid-write left: temp files (``.NAME.tmp-PID-THREAD``) and the half
    of an export whose other half is missing (weights without metadata or the reverse).

    Readers never use them (they follow LATEST, list ``step_*.json`` and need both files); the
    writer calls this when it starts, since only one process writes a group's exports.
    """
    exports_dir = Path(exports_dir)
    try:
        latest = read_latest(exports_dir, missing_ok=True)
    except ExportError:  # a LATEST that is not a plain file naming an export: the next export replaces it
        latest = None
    doomed = [p for p in exports_dir.glob(".*.tmp-*")  # .NAME.tmp-PID[-THREAD]: not this process's own
              if p.name.split(".tmp-", 1)[1].split("-")[0] != str(os.getpid())]
    for p in [*exports_dir.glob("step_*.safetensors"), *exports_dir.glob("step_*.json")]:
        m = EXPORT_NAME.match(p.stem)
        other = p.with_suffix(".json" if p.suffix == ".safetensors" else ".safetensors")
        if m and int(m.group(1)) != latest and not other.exists():
            doomed.append(p)
    removed = []
    for p in doomed:
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


def list_exports(exports_dir: Path) -> list[int]:
    steps = []
    for p in Path(exports_dir).glob("step_*.json"):
        m = EXPORT_NAME.match(p.stem)
        if m and (p.with_suffix(".safetensors")).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def prune_exports(exports_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` exports; never the one LATEST names."""
    latest = read_latest(exports_dir, missing_ok=True)
    for step in list_exports(exports_dir)[:-keep] if keep > 0 else []:
        if step == latest:
            continue
        for suffix in (".json", ".safetensors"):  # metadata first: readers list by .json
            try:
                (Path(exports_dir) / f"{export_name(step)}{suffix}").unlink()
            except FileNotFoundError:
                pass


def read_latest(exports_dir: Path, missing_ok: bool = False) -> int | None:
    """The step LATEST names, validated to be a plain export name (no paths)."""
    path = Path(exports_dir) / "LATEST"
    try:
        raw = read_bounded(path, MAX_LATEST, "LATEST").decode("ascii", errors="replace").strip()
    except MissingFile:
        if missing_ok:
            return None
        raise ExportError(f"{path} does not exist (the peer has not exported yet)") from None
    m = EXPORT_NAME.match(raw)
    if not m:
        shown = repr(raw[:24]) + ("..." if len(raw) > 24 else "")  # never echo a file's contents at length
        raise ExportError(f"{path} names {shown}, which is not an export name like 'step_000500' "
                          "(paths and other files are refused)")
    return int(m.group(1))


@dataclass
class Export:
    step: int
    meta: dict
    state_dict: dict[str, torch.Tensor]
    buffer: torch.Tensor | None = None  # what the tensors are views into (ReadBuffers.give takes it back)


def read_export(exports_dir: Path, step: int, expect_config_hash: str | None = None,
                expect_tokenizer: str | None = None, pin_memory: bool = False,
                buffers: ReadBuffers | None = None, expect: dict | None = None,
                max_step: int | None = None) -> Export:
    """Read and validate one export into CPU memory. Raises ExportError on any problem."""
    exports_dir = Path(exports_dir)
    name = export_name(step)
    return read_weights(exports_dir / f"{name}.json", exports_dir / f"{name}.safetensors", step,
                        expect_config_hash, expect_tokenizer, missing=f"export {name} in {exports_dir} is missing",
                        pin_memory=pin_memory, buffers=buffers, expect=expect, max_step=max_step)


def read_meta(meta_path: Path, step: int | None = None, max_step: int | None = None) -> dict:
    """The metadata JSON of an export or final/, bounded (``MAX_META``) and checked (``check_meta``)."""
    try:
        meta = json.loads(read_bounded(meta_path, MAX_META, "metadata file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_path}: metadata is not valid JSON ({e})") from None
    except RecursionError:
        raise ExportError(f"{meta_path}: metadata is not valid JSON (nested too deeply)") from None
    check_meta(meta, meta_path, step, max_step)
    return meta


def check_meta(meta, where, step: int | None = None, max_step: int | None = None) -> None:
    """The fields a reader relies on have plausible values (see the module docstring)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(meta, dict) or not count(meta.get("step")) or (step is not None and meta["step"] != step):
        raise ExportError(f"{where}: metadata does not describe step {step if step is not None else '<int>'}")
    bound = MAX_STEP if max_step is None else min(MAX_STEP, max_step)
    if meta["step"] > bound:
        raise ExportError(f"{where}: claims step {meta['step']}, more than any this run can have reached "
                          f"({bound}); refusing it (a step that high would never become stale)")
    for key, top in (("weights_bytes", MAX_WEIGHTS), ("tokens_seen", None)):
        v = meta.get(key)
        if v is not None and (not count(v) or (top is not None and v > top)):
            raise ExportError(f"{where}: metadata field {key} is {str(v)[:40]!r}, not a byte/token count"
                              + (f" up to {top}" if top else ""))


def read_weights(meta_path: Path, weights_path: Path, step: int | None, expect_config_hash: str | None = None,
                 expect_tokenizer: str | None = None, missing: str = "missing", pin_memory: bool = False,
                 buffers: ReadBuffers | None = None, expect: dict | None = None,
                 max_step: int | None = None) -> Export:
    """Validate a (metadata JSON, safetensors) pair - an export, or a group's final/ - and load it.

    ``step`` None accepts whatever step the metadata names; ``expect`` (name -> shape or (shape,
    dtype)) the model's tensors, checked on the header before the data is read. The metadata is
    checked first (its model config and tokenizer), so a mismatched export is refused unread.
    """
    try:
        meta = read_meta(meta_path, step, max_step)
    except MissingFile:
        raise ExportError(f"{missing} ({meta_path})") from None
    step = meta["step"]
    check_compatible(meta, weights_path, expect_config_hash, expect_tokenizer)
    try:
        got = read_safetensors(weights_path, digest_fields(meta), pin_memory, buffers, meta.get("weights_bytes"),
                               expect)
    except MissingFile:
        raise ExportError(f"{missing} ({weights_path})") from None
    if not digest_matches(meta, got.nbytes, got.digests):
        raise ExportError(f"{weights_path}: size or checksum does not match its metadata "
                          "(truncated, or replaced while being read)")
    if got.nonfinite:
        raise ExportError(f"step {step}: tensor {got.nonfinite[0]} has NaN/Inf values (a diverged peer?)")
    return Export(step=step, meta=meta, state_dict=got.tensors, buffer=got.buffer)


def check_compatible(meta: dict, weights_path: Path, expect_config_hash: str | None,
                     expect_tokenizer: str | None) -> None:
    """The teacher's model config and tokenizer are the student's (when given)."""
    if expect_config_hash is not None and meta.get("model_config_hash") != expect_config_hash:
        raise ExportError(
            f"{weights_path}: the teacher's model config differs from this student's "
            f"(teacher {meta.get('model_config_hash')} = {meta.get('model_config')}, "
            f"student {expect_config_hash}); teacher and student must have the same architecture")
    if expect_tokenizer is not None and meta.get("tokenizer_sha256") != expect_tokenizer:
        raise ExportError(f"{weights_path}: the teacher used another tokenizer "
                          f"(teacher {meta.get('tokenizer_sha256')}, student {expect_tokenizer})")


def read_final(final_dir: Path, expect_config_hash: str | None = None, expect_tokenizer: str | None = None,
               where: str | None = None) -> Export:
    """A group's final/ (model.safetensors + meta.json), validated like an export; the one reader
    of final/ weights (--teacher, recipes/evaluate.py)."""
    final_dir = Path(final_dir)
    where = where or str(final_dir)
    weights, meta = final_dir / "model.safetensors", final_dir / "meta.json"
    if not weights.is_file():
        raise ExportError(f"{where}: has no model.safetensors (the run has not finished?)")
    if not meta.is_file():
        read_safetensors(weights)  # a pickle is named as such
        raise ExportError(f"{where}: has no meta.json (written by this repository's trainer since offline "
                          "distillation was added); use one of the run's exports instead")
    return read_weights(meta, weights, None, expect_config_hash, expect_tokenizer,
                        missing=f"{where}: incomplete final/ directory")
