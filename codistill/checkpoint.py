"""Resume checkpoints that survive kill -9 and full disks.

DeepSpeed's ``save_checkpoint`` writes a tag directory (``global_stepN/``) file by file with
plain ``torch.save`` and then the ``latest`` file with a plain ``open(.., 'w')`` - not atomic,
not fsynced, and only on global rank 0 (so a group led by another rank gets no ``latest``).
A process killed inside it leaves a partial tag directory; a crash while ``latest`` is being
written leaves it empty. So here:

- DeepSpeed saves with ``save_latest=False``; after it returns (all ranks' files written, its
  closing barrier passed) the group leader fsyncs the tag's files, writes
  ``global_stepN/codistill_complete.json`` (the completion marker) and only then moves
  ``latest`` to the tag (temp file + fsync + os.replace).
- The marker lists every file of the tag with its size and xxh3-64 digest (read back from disk
  after the fsync). Resume picks the newest marked tag (normally the one ``latest`` names) whose
  directory holds exactly the files its marker lists - no file missing, none extra - each with
  its recorded size and digest; only then does DeepSpeed open it. When ``latest`` names anything
  else (a partial tag, a missing one, garbage, a truncated or tampered one) it warns and falls
  back. A tag without a marker, or with a marker from before digests, is never loaded.
- DeepSpeed 0.19.8 loads every checkpoint file through ``engine.checkpoint_engine.load``
  (deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py, TorchCheckpointEngine.load:
  a torch.load with weights_only=False, called from engine._load_checkpoint, state_dict_factory's
  SDLoader and engine._load_zero_checkpoint). For the duration of ``load`` that method is
  replaced by a torch.load with weights_only=True that allows only the few DeepSpeed classes its
  checkpoints hold (``SAFE_GLOBALS``): a pickle payload in a tag is refused, never run, even
  when a forged marker matches it.
- Pruning removes a tag's marker before its files, so a kill during pruning never leaves a
  marked, half-deleted tag. Unmarked tags (interrupted saves) are removed at the next save.
- A write error (disk full, a read-only or vanished directory) during a save leaves ``latest``
  on the previous complete tag; the partial tag is removed and ``CheckpointWriteError`` (an
  OSError) is raised to the caller, which warns or stops (``--on_write_error``). torch.save
  reports ENOSPC as a RuntimeError (PytorchStreamWriter "file write failed") and a tag directory
  DeepSpeed could not create as a RuntimeError ("Parent directory ... does not exist"; engine.
  _create_checkpoint_file only logs its OSError): ``_WriteGuard`` catches whatever the checkpoint
  engine's ``save``/``makedirs`` raise on each rank, lets DeepSpeed's barriers pass, and the ranks
  of the group agree (``any_rank``) so that all of them see the same outcome.

Resume reads the run's own checkpoint directory only; nothing a peer group wrote is ever
unpickled (peers' exports are safetensors, read by codistill/exports.py).
"""
from __future__ import annotations

import gc
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from codistill import faults
from codistill.comm import flags_any
from codistill.exports import file_digest
from codistill.flags import CheckpointFlags
from fileio import atomic_write_bytes, fsync_dir, fsync_tree

COMPLETE = "codistill_complete.json"
TAG = re.compile(r"^global_step(\d+)$")
# what torch.save / DeepSpeed say when a file cannot be written (torch/csrc/jit/serialization/
# inline_container.cc PyTorchStreamWriter: "file write failed", "open file failed", "Parent directory
# ... does not exist"; the errno text when it has one)
WRITE_FAILURE = re.compile(r"file write failed|open file failed|Parent directory .* does not exist|unexpected pos|"
                           r"No space left|Read-only file system|Permission denied|Disk quota exceeded|"
                           r"Input/output error", re.S)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written on some rank of the group (disk full, read-only directory)."""


def tag_name(step: int) -> str:
    return f"global_step{step}"


def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every global_stepN directory, oldest first (complete or not)."""
    out = []
    for p in Path(ckpt_dir).glob("global_step*"):
        m = TAG.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def tag_files(tag_dir: Path) -> list[str]:
    """Every file under ``tag_dir`` but the marker, relative, sorted (symlinks count as files)."""
    tag_dir = Path(tag_dir)
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != COMPLETE)


def manifest(tag_dir: Path) -> dict:
    """name -> {"bytes", "xxh3_64"} of every file of a tag: what its marker records."""
    out = {}
    for name in tag_files(tag_dir):
        d = file_digest(Path(tag_dir) / name)
        out[name] = {"bytes": d["weights_bytes"], "xxh3_64": d["weights_xxh3_64"]}
    return out


def damage(tag_dir: Path, digests: bool = True) -> str | None:
    """Why a marked tag must not be loaded, or None: its marker is unreadable or from before
    digests, a file it lists is missing or has another size or digest (truncated, replaced), or
    the tag holds a file it does not list (planted). ``digests=False``: names and sizes only."""
    tag_dir = Path(tag_dir)
    try:
        files = json.loads((tag_dir / COMPLETE).read_text())["files"]
        if not all(isinstance(v, dict) and {"bytes", "xxh3_64"} <= v.keys() for v in files.values()):
            return f"its {COMPLETE} lists no digests (written by an older version: resume with --resume never)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {COMPLETE} ({e})"
    extra = sorted(set(tag_files(tag_dir)) - set(files))
    if extra:
        return f"{extra[0]} was not written by this run's save (not in {COMPLETE})"
    for name, rec in files.items():
        f = tag_dir / name
        if not f.is_file() or f.is_symlink():
            return f"{name} is missing"
        if f.stat().st_size != rec["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {rec['bytes']} when saved"
        if digests and file_digest(f)["weights_xxh3_64"] != rec["xxh3_64"]:
            return f"{name} does not match the digest recorded when it was saved (modified since)"
    return None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's 'latest' file names (e.g. "global_step500"), or None; not the step of an
    export's LATEST (codistill/exports.py read_latest)."""
    try:
        raw = (Path(ckpt_dir) / "latest").read_text(errors="replace").strip()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return raw


def is_write_failure(e: BaseException) -> bool:
    """An OSError, or the RuntimeError torch.save / DeepSpeed raise for a file they cannot write."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and WRITE_FAILURE.search(str(e)) is not None)


class _WriteGuard:
    """Context manager over ``engine.checkpoint_engine``'s ``save`` and ``makedirs``: the first write
    failure is kept in ``error`` and every later write of this save is skipped, so that the rank
    goes on through DeepSpeed's barriers instead of leaving its peers waiting in them. Anything
    that is not a write failure propagates."""

    def __init__(self, engine, step: int):
        self.ce, self.step, self.error, self.saved = engine.checkpoint_engine, step, None, {}

    def _wrap(self, name):
        inner = getattr(self.ce, name)

        def guarded(*a, **kw):
            if self.error is not None:
                return None
            try:
                if name == "save":
                    faults.oserror("ckpt_oserror", self.step)  # test-only hook: a disk full on the first file
                return inner(*a, **kw)
            except Exception as e:
                if not is_write_failure(e):
                    raise
                # only the text is kept: the exception's frames hold torch.save's file writer,
                # whose open file keeps the tag's space (and blocks a read-only remount)
                self.error = f"{type(e).__name__}: {e}"
        return guarded

    def __enter__(self):
        for name in ("save", "makedirs"):
            if hasattr(self.ce, name):
                self.saved[name] = self.ce.__dict__.get(name)
                setattr(self.ce, name, self._wrap(name))
        return self

    def __exit__(self, *exc):
        for name, was in self.saved.items():
            if was is None:
                delattr(self.ce, name)
            else:
                setattr(self.ce, name, was)
        return False


def save(engine, ckpt_dir: Path, step: int, client_state: dict, leader: bool, keep: int,
         any_rank: Callable[[bool], bool] = bool) -> None:
    """Save ``engine`` as tag global_step{step}; ``latest`` moves only once it is complete.

    ``any_rank(failed)``: True on every rank of the group when ``failed`` is True on any of them
    (a collective: every rank of the group calls save). Raises CheckpointWriteError on every rank
    (after the leader removed the partial tag) when the checkpoint could not be written.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_name(step)
    tag_dir = ckpt_dir / tag
    error: str | None = None
    try:
        if leader and tag_dir.exists():  # leftovers of an interrupted save of this step, or planted files:
            _remove_tag(tag_dir)         # never overwrite in place, the marker lists only what this save wrote
        with _WriteGuard(engine, step) as guard:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        error = guard.error
    except Exception as e:  # DeepSpeed's own writes (its makedirs of save_dir: rank 0 only)
        if not is_write_failure(e):
            raise
        error = f"{type(e).__name__}: {e}"
    faults.sigkill("sigkill_in_save", step)
    if not any_rank(error is not None):
        if leader:
            try:
                fsync_tree(tag_dir)
                files = manifest(tag_dir)
                atomic_write_bytes(tag_dir / COMPLETE, json.dumps(
                    {"tag": tag, "step": step, "time": time.time(), "files": files}, indent=1).encode())
                atomic_write_bytes(ckpt_dir / "latest", tag.encode())
                fsync_dir(ckpt_dir)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        if not any_rank(error is not None):
            if leader:
                prune(ckpt_dir, keep)
            return
    # torch.save's failed zip writer sits in a reference cycle with its open file: collect it now,
    # or the removed partial tag keeps its disk space (and blocks a read-only remount) until later
    gc.collect()
    if leader and latest_tag(ckpt_dir) != tag:
        _remove_tag(tag_dir)
    why = error or "another rank of the group could not write its part"
    raise CheckpointWriteError(f"checkpoint {tag_dir} could not be written ({why})")


def _remove_tag(tag_dir: Path) -> None:
    try:
        (Path(tag_dir) / COMPLETE).unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    shutil.rmtree(tag_dir, ignore_errors=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete tags; never the one ``latest`` names; drop partial tags."""
    latest = latest_tag(ckpt_dir)
    tags = list_tags(ckpt_dir)
    complete = [p for _, p in tags if is_complete(p)]
    if not complete:  # checkpoints from before the marker: prune by count only
        complete = [p for _, p in tags]
    else:
        for _, p in tags:
            if not is_complete(p) and p.name != latest:
                _remove_tag(p)
    for p in complete[:-keep] if keep > 0 else []:
        if p.name != latest:
            _remove_tag(p)


def candidates(ckpt_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    """Tags to try for resume, best first (marked, the exact files the marker lists, their sizes;
    digests are checked by ``load``); warns about every other tag and when ``latest`` is not the
    newest complete tag."""
    ckpt_dir = Path(ckpt_dir)
    tags = list_tags(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    complete = []
    for _, p in reversed(tags):
        if is_complete(p):
            why = damage(p, digests=False)
            if why is None:
                complete.append(p.name)
            else:
                log(f"WARNING: checkpoint {p} is refused ({why}); skipping it")
        elif p.name == latest or not any(is_complete(q) for _, q in tags):
            log(f"WARNING: checkpoint {p} has no {COMPLETE} (an interrupted save, or not written by this "
                f"run's trainer); it is never loaded")
    if not complete:
        return []
    if latest != complete[0]:
        if latest is None:
            why = "is missing"
        elif not TAG.match(latest):
            why = f"names {latest[:60]!r}, not a checkpoint tag"
        elif not (ckpt_dir / latest).is_dir():
            why = f"names {latest}, which does not exist"
        elif not is_complete(ckpt_dir / latest):
            why = f"names {latest}, which is incomplete (its save was interrupted: no {COMPLETE})"
        elif latest not in complete:
            why = f"names {latest}, which is refused"
        else:
            why = f"names {latest}, older than the complete {complete[0]} (interrupted before 'latest' moved)"
        log(f"WARNING: {ckpt_dir / 'latest'} {why}; resuming from {complete[0]}, the newest complete checkpoint")
    return complete


# the classes besides tensors and containers that DeepSpeed 0.19.8's checkpoints hold: ZeRO 1/2/3
# optimizer states (runtime/zero/stage_1_and_2.py state_dict, zero/stage3.py _rigid_state_dict:
# loss_scaler, zero_stage) and ZeRO 1/2's and bf16_optimizer.py's param_slice_mappings
def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class weights_only_loads:
    """Context manager: ``engine.checkpoint_engine.load`` becomes torch.load(weights_only=True)
    with only ``_safe_globals()`` allowed; a pickle that would call anything else raises
    (torch's UnpicklingError) before it runs."""

    def __init__(self, engine):
        self.ce = engine.checkpoint_engine
        self.had = "load" in self.ce.__dict__

    def __enter__(self):
        import torch
        allowed = _safe_globals()
        self.saved = self.ce.__dict__.get("load")

        def load(path, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        self.ce.load = load
        return self

    def __exit__(self, *exc):
        if self.had:
            self.ce.load = self.saved
        else:
            del self.ce.load
        return False


def load(engine, ckpt_dir: Path, log: Callable[[str], None] = print) -> tuple[str | None, dict]:
    """Load the newest verified, loadable complete checkpoint into ``engine``: (tag or None,
    client_state). Each tag's files are checked against its marker's digests before DeepSpeed
    opens any of them; DeepSpeed's loads are weights-only."""
    for tag in candidates(ckpt_dir, log):
        why = damage(Path(ckpt_dir) / tag)
        if why is not None:
            log(f"WARNING: checkpoint {Path(ckpt_dir) / tag} is refused ({why}); trying an older one")
            continue
        try:
            with weights_only_loads(engine):
                path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as e:  # a corrupt file: DeepSpeed raises whatever torch.load raised
            path, state, err = None, None, f"{type(e).__name__}: {e}"
        else:
            err = "DeepSpeed could not load it"
        if path is not None:
            return tag, state or {}
        log(f"WARNING: checkpoint {Path(ckpt_dir) / tag} cannot be loaded ({str(err)[:300]}); trying an older one")
    return None, {}


class Checkpointer:
    """What a checkpoint holds and when one is written; the only place that writes or reads the
    trainer's ``client_state`` (HelloDeepSpeed's pattern: DeepSpeed's checkpoint carries the
    engine, this carries the rest).

    client_state: step, tokens seen, skipped steps, samples, the CPU and CUDA generators (dropout,
    data-free randomness), the exchange's state (the teachers in use, the byte totals and, with
    --peer_use diloco, the outer optimizer's state) and, with --carry_state,
    every rank's carried LSTM states (Student.carry_checkpoint), so that resume continues exactly.
    Written every --save_every steps, at the last step, on a stop request and at a
    --stop_after_steps slice; before each, the exports in flight are settled (a checkpoint never
    follows an export whose write failed unnoticed).
    """

    def __init__(self, students, exchange, flags: CheckpointFlags, last_step: int, device, log):
        self.students, self.exchange, self.flags, self.device, self.log = students, exchange, flags, device, log
        self.last_step = last_step  # --max_steps: its checkpoint is always written
        self.saved_at: int | None = None

    def due(self, step: int, forced: bool = False) -> bool:
        return forced or step % self.flags.save_every == 0 or step == self.last_step

    def rng_state(self) -> dict:
        import torch
        state = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, step: int) -> bool:
        """Checkpoint every hosted student; False if one could not be written ('latest' then still
        names the previous complete checkpoint)."""
        ok = True
        for s in self.students:
            try:
                save(s.engine, s.paths.checkpoints, step, {
                    "step": step, "tokens_seen": s.tokens_seen, "skipped_steps": s.skipped_steps,
                    "samples": step * s.global_batch, **self.rng_state(), **self.exchange.state(),
                    **s.carry_checkpoint()},
                    s.leader, self.flags.keep_checkpoints,
                    any_rank=lambda failed, s=s: flags_any([failed], s.comm.device, s.dp_group)[0])
            except CheckpointWriteError as e:
                ok = False
                self.log(f"WARNING: [group {s.id}] checkpoint of step {step} failed ({e}); 'latest' still names "
                         f"{latest_tag(s.paths.checkpoints)}", force=s.leader)
        if ok:
            self.saved_at = step
        return ok

    def restore(self, src_run) -> int:
        """Load the newest loadable checkpoint of every hosted student from run layout
        ``src_run``; returns the step to continue after (0: none). Raises ValueError when a
        checkpoint exists but none loads, or hosted groups stand at different steps."""
        import torch
        starts, state = set(), {}
        for s in self.students:
            ckpt = src_run.group(s.id).checkpoints
            tag, state = load(s.engine, ckpt, self.log) if ckpt.is_dir() else (None, {})
            if tag is None and list_tags(ckpt):
                raise ValueError(f"no checkpoint in {ckpt} can be loaded (see the warnings above); "
                                 "use --resume never to start over, or another --run_dir")
            starts.add(state.get("step", 0))
            s.tokens_seen = state.get("tokens_seen", 0)
            s.skipped_steps = state.get("skipped_steps", 0)
            if tag is not None:
                s.restore_carry(state, state.get("step", 0))
            if state.get("torch_rng") is not None:
                torch.set_rng_state(state["torch_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if len(starts) > 1:
            raise ValueError(f"hosted groups have checkpoints at different steps {sorted(starts)}; use --resume "
                             "never or remove the newer checkpoints")
        start = starts.pop()
        self.exchange.restore(state, start)
        self.saved_at = start
        return start
