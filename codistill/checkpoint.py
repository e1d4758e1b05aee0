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
- Resume picks the newest tag that has the marker (normally the one ``latest`` names) and
  whose files still have the sizes the marker lists; when ``latest`` names anything else (a
  partial tag, a missing one, garbage, a truncated one) it warns and falls back. A tag that
  DeepSpeed cannot load is skipped the same way. Checkpoints written before
  the marker existed (no tag has one) are loaded through ``latest`` as before.
- Pruning removes a tag's marker before its files, so a kill during pruning never leaves a
  marked, half-deleted tag. Unmarked tags (interrupted saves) are removed at the next save.
- A write error (disk full) during a save leaves ``latest`` on the previous complete tag; the
  partial tag is removed and the error is raised to the caller, which warns or stops
  (``--on_write_error``).

Resume uses DeepSpeed's own loader (``engine.load_checkpoint``, a full ``torch.load``) on the
run's own checkpoint directory only; nothing a peer group wrote is ever unpickled (peers'
exports are safetensors, read by codistill/exchange.py).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from codistill import faults
from codistill.files import atomic_write_bytes, fsync_dir, fsync_tree

COMPLETE = "codistill_complete.json"
TAG = re.compile(r"^global_step(\d+)$")


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


def damage(tag_dir: Path) -> str | None:
    """Why a complete tag cannot be trusted (a file listed in its marker is missing or has
    another size: deleted or truncated since), or None. Cheap: sizes only, nothing is read."""
    try:
        files = json.loads((Path(tag_dir) / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE} ({e})"
    for name, size in files.items():
        f = Path(tag_dir) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when saved"
    return None


def read_latest(ckpt_dir: Path) -> str | None:
    try:
        raw = (Path(ckpt_dir) / "latest").read_text(errors="replace").strip()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return raw


def save(engine, ckpt_dir: Path, step: int, client_state: dict, leader: bool, keep: int) -> None:
    """Save ``engine`` as tag global_step{step}; ``latest`` moves only once it is complete.

    Raises OSError (after cleaning up the partial tag) when the checkpoint cannot be written.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_name(step)
    tag_dir = ckpt_dir / tag
    if leader and tag_dir.exists() and read_latest(ckpt_dir) != tag:
        _remove_tag(tag_dir)  # leftovers of an interrupted save of this step: never overwrite in place
    try:
        with faults.checkpoint_write_error(engine, step):
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        faults.sigkill("sigkill_in_save", step)
        if leader:
            fsync_tree(tag_dir)
            files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
            atomic_write_bytes(tag_dir / COMPLETE, json.dumps(
                {"tag": tag, "step": step, "time": time.time(), "files": files}, indent=1).encode())
            atomic_write_bytes(ckpt_dir / "latest", tag.encode())
            fsync_dir(ckpt_dir)
    except OSError:
        if leader and read_latest(ckpt_dir) != tag:
            _remove_tag(tag_dir)
        raise
    if leader:
        prune(ckpt_dir, keep)


def _remove_tag(tag_dir: Path) -> None:
    try:
        (Path(tag_dir) / COMPLETE).unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    shutil.rmtree(tag_dir, ignore_errors=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete tags; never the one ``latest`` names; drop partial tags."""
    latest = read_latest(ckpt_dir)
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
    """Tags to try for resume, best first; warns when ``latest`` is not the newest complete tag."""
    ckpt_dir = Path(ckpt_dir)
    tags = list_tags(ckpt_dir)
    latest = read_latest(ckpt_dir)
    if not any(is_complete(p) for _, p in tags):  # legacy checkpoints (no markers): trust 'latest'
        return [latest] if latest and TAG.match(latest) and (ckpt_dir / latest).is_dir() else []
    complete = []
    for _, p in reversed(tags):
        if is_complete(p):
            why = damage(p)
            if why is None:
                complete.append(p.name)
            else:
                log(f"WARNING: checkpoint {p} is damaged ({why}); skipping it")
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
        elif damage(ckpt_dir / latest):
            why = f"names {latest}, which is damaged"
        else:
            why = f"names {latest}, older than the complete {complete[0]} (interrupted before 'latest' moved)"
        log(f"WARNING: {ckpt_dir / 'latest'} {why}; resuming from {complete[0]}, the newest complete checkpoint")
    return complete


def load(engine, ckpt_dir: Path, log: Callable[[str], None] = print) -> tuple[str | None, dict]:
    """Load the newest loadable complete checkpoint into ``engine``: (tag or None, client_state)."""
    for i, tag in enumerate(candidates(ckpt_dir, log)):
        try:
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
    data-free randomness), the exchange's state (the teachers in use) and, with --carry_state,
    every rank's carried LSTM states (Student.carry_checkpoint), so that resume continues exactly.
    Written every --save_every steps, at the last step, on a stop request and at a
    --stop_after_steps slice; before each, the exports in flight are settled (a checkpoint never
    follows an export whose write failed unnoticed).
    """

    def __init__(self, students, exchange, args, device, log):
        self.students, self.exchange, self.args, self.device, self.log = students, exchange, args, device, log
        self.saved_at: int | None = None

    def due(self, step: int, forced: bool = False) -> bool:
        return forced or step % self.args.save_every == 0 or step == self.args.max_steps

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
                    s.leader, self.args.keep_checkpoints)
            except OSError as e:
                ok = False
                self.log(f"WARNING: [group {s.id}] checkpoint of step {step} failed ({e}); 'latest' still names "
                         f"{read_latest(s.paths.checkpoints)}", force=s.leader)
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
