"""Teacher exports: how a group publishes its weights and how a peer reads them safely.

Layout under ``run_dir/group_{i}/exports/``:
    step_000500.safetensors   weights only (safetensors: never pickle)
    step_000500.json          metadata: group, step, tokens seen, model config + hash,
                              tokenizer hash, time, sha256 of the weights file
    LATEST                    the name ("step_000500") of the newest complete export

Writers: temp file in the same directory -> fsync -> os.replace, weights first, then the
metadata, then LATEST, then fsync of the directory. A reader that follows LATEST therefore
only ever sees complete files; the sha256 in the metadata catches a file replaced or
truncated behind the reader's back.
A writer that fails (disk full) removes its half-written export and raises OSError; LATEST
still names the previous export. Temp files of a writer killed mid-write are ignored by
readers and removed by clean_temp_files when the writer starts again.
Readers: refuse anything that is not a well-formed safetensors file (a pickle renamed
.safetensors is rejected by its header before any byte of it is interpreted), a LATEST that
names anything but a plain export name in the same directory, and metadata that does not
match the student's model config or tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from codistill import faults

EXPORT_NAME = re.compile(r"^step_(\d{6,})$")
MAX_HEADER = 100 * 1024 * 1024


class ExportError(Exception):
    """An export that must not be used (missing, partial, corrupt, hostile or mismatched)."""


def export_name(step: int) -> str:
    return f"step_{step:06d}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_export(exports_dir: Path, step: int, state_dict: dict[str, torch.Tensor], meta: dict,
                 keep: int = 3) -> Path:
    """Publish weights for ``step``; returns the path of the weights file."""
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    name = export_name(step)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ExportError(f"refusing to export step {step}: tensor {k} has NaN/Inf values")
    blob = save(tensors, metadata={"format": "pt", "step": str(step)})
    meta = dict(meta, step=step, weights=f"{name}.safetensors", weights_bytes=len(blob),
                weights_sha256=hashlib.sha256(blob).hexdigest(), time=time.time())
    try:
        atomic_write_bytes(exports_dir / f"{name}.safetensors", blob)
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
    """Remove what a writer killed mid-write left: temp files (``.NAME.tmp-PID``) and the half
    of an export whose other half is missing (weights without metadata or the reverse).

    Readers never use them (they follow LATEST, list ``step_*.json`` and need both files); the
    writer calls this when it starts, since only one process writes a group's exports.
    """
    exports_dir = Path(exports_dir)
    latest = read_latest(exports_dir, missing_ok=True) if (exports_dir / "LATEST").is_file() else None
    doomed = [p for p in exports_dir.glob(".*.tmp-*") if p.name.rsplit("-", 1)[-1] != str(os.getpid())]
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
        raw = path.read_bytes()[:256].decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ExportError(f"{path} does not exist (the peer has not exported yet)")
    m = EXPORT_NAME.match(raw)
    if not m:
        raise ExportError(f"{path} names {raw!r}, which is not an export name like 'step_000500' "
                          "(paths and other files are refused)")
    return int(m.group(1))


def check_safetensors_header(blob: bytes, where: str) -> None:
    """Reject anything that is not a safetensors file before it is parsed further.

    A safetensors file starts with an 8-byte little-endian header length followed by a JSON
    object; a pickle starts with 0x80 and a zip (torch.save) with 'PK'.
    """
    if len(blob) < 10:
        raise ExportError(f"{where}: file too short to be safetensors ({len(blob)} bytes)")
    if blob[:2] == b"PK" or blob[:1] == b"\x80":
        raise ExportError(f"{where}: this is a pickle / torch.save file, not safetensors; "
                          "peer exports are never unpickled - refusing it")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or 8 + n > len(blob) or blob[8:9] != b"{":
        raise ExportError(f"{where}: not a valid safetensors file (bad header)")


@dataclass
class Export:
    step: int
    meta: dict
    state_dict: dict[str, torch.Tensor]


def read_export(exports_dir: Path, step: int, expect_config_hash: str | None = None,
                expect_tokenizer: str | None = None) -> Export:
    """Read and validate one export into CPU memory. Raises ExportError on any problem."""
    exports_dir = Path(exports_dir)
    name = export_name(step)
    return read_weights(exports_dir / f"{name}.json", exports_dir / f"{name}.safetensors", step,
                        expect_config_hash, expect_tokenizer, missing=f"export {name} in {exports_dir} is missing")


def read_weights(meta_path: Path, weights_path: Path, step: int | None, expect_config_hash: str | None = None,
                 expect_tokenizer: str | None = None, missing: str = "missing") -> Export:
    """Validate a (metadata JSON, safetensors) pair - an export, or a group's final/ - and load it.

    ``step`` None accepts whatever step the metadata names.
    """
    try:
        meta = json.loads(Path(meta_path).read_text())
        blob = Path(weights_path).read_bytes()
    except FileNotFoundError as e:
        raise ExportError(f"{missing} ({e.filename})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_path}: metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or \
            (step is not None and meta.get("step") != step):
        raise ExportError(f"{meta_path}: metadata does not describe step {step if step is not None else '<int>'}")
    step = meta["step"]
    check_safetensors_header(blob, str(weights_path))
    if meta.get("weights_sha256") != hashlib.sha256(blob).hexdigest():
        raise ExportError(f"{weights_path}: sha256 does not match its metadata "
                          "(truncated, or replaced while being read)")
    if expect_config_hash is not None and meta.get("model_config_hash") != expect_config_hash:
        raise ExportError(
            f"{weights_path}: the teacher's model config differs from this student's "
            f"(teacher {meta.get('model_config_hash')} = {meta.get('model_config')}, "
            f"student {expect_config_hash}); teacher and student must have the same architecture")
    if expect_tokenizer is not None and meta.get("tokenizer_sha256") != expect_tokenizer:
        raise ExportError(f"{weights_path}: the teacher used another tokenizer "
                          f"(teacher {meta.get('tokenizer_sha256')}, student {expect_tokenizer})")
    try:
        state_dict = load(blob)
    except Exception as e:  # safetensors raises its own error type
        raise ExportError(f"{weights_path}: cannot parse safetensors ({e})") from None
    return Export(step=step, meta=meta, state_dict=state_dict)
