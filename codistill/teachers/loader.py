"""Peers' stale checkpoints as teachers: the background loader that reads them, and when a student
swaps one in (the in-memory teacher modules: codistill/teachers/pool.py).

TeacherLoader (a reader thread per peer beside the training loop) reads peers' exports from disk
into CPU memory - file read, size/checksum check, safetensors parse, shape and finiteness checks - so
the trainer only pays for copying ready tensors into its teacher modules between steps
(TeacherPool.load; from pinned memory without blocking on a GPU).

Two ways to choose which export a student uses:
- "sync" (one launch hosting every group, so all groups export at the same steps): at each
  export boundary s the trainer swaps in each peer's export of step s - K, which the loader
  has had K steps to prefetch. Teachers are then a deterministic function of the step
  (staleness between K and 2K steps), so runs are reproducible and resume is exact.
- "latest" (groups in separate launches, e.g. SLURM array tasks): the loader follows each
  peer's LATEST and the trainer swaps in whatever new export is ready, never waiting. "New"
  means another file than the last one tried, not only a higher step: a peer that restarts
  from an older checkpoint (or joins late, or rewrites a refused export) is picked up at its
  next export without restarting anyone else.
A missing, dead, corrupt or hostile peer never stops training: the last good teacher stays
(or plain CE is used), and the problem is logged once per peer and kind. Nor does a stuck one
(its files block or crawl): its read is abandoned after a deadline, other peers are read by
their own threads, and the training loop never waits for a read (TeacherLoader).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from codistill.exports import (
    EXPORT_NAME,
    CudaPinning,
    Export,
    ReadBuffers,
    check_specs,
    export_name,
    read_export,
    read_final,
    read_latest,
)
from codistill.layout import exports_dir
from fileio import ExportError

FIXED_TEACHER = -1  # the pool slot of --teacher PATH (peers are groups 0..G-1)


def read_fixed_teacher(path: Path, config_hash: str | None = None, tokenizer_sha256: str | None = None,
                       flag: str = "--teacher") -> Export:
    """The weights named by ``--teacher PATH`` (offline two-phase distillation), validated like a
    peer's export: safetensors only, same model config and tokenizer as the student.

    PATH may be a group directory of a finished run (its final/, else its newest export), a
    final/ or exports/ directory, or one export file (step_N.safetensors or step_N.json).
    """
    path = Path(path)
    if path.is_file():
        m = EXPORT_NAME.match(path.stem)
        if not m or path.suffix not in (".safetensors", ".json"):
            raise ExportError(f"{flag} {path}: a file must be an export (step_N.safetensors or step_N.json)")
        return read_export(path.parent, int(m.group(1)), config_hash, tokenizer_sha256)
    if not path.is_dir():
        raise ExportError(f"{flag} {path}: no such file or directory")
    if (path / "final").is_dir() or (path / "exports").is_dir():  # a group directory
        path = path / "final" if (path / "final" / "meta.json").is_file() else path / "exports"
    if (path / "meta.json").is_file() or (path / "model.safetensors").is_file():  # a final/ directory
        return read_final(path, config_hash, tokenizer_sha256, where=f"{flag} {path}")
    if (path / "LATEST").is_file():
        return read_export(path, read_latest(path), config_hash, tokenizer_sha256)
    groups = sorted(p.name for p in path.glob("group_*") if p.is_dir())
    hint = f"; name one group, e.g. {flag} {path / groups[0]}" if groups else ""
    raise ExportError(f"{flag} {path}: not a group directory, final/ or exports/ directory, or export file{hint}")


READ_TIMEOUT_S = 60.0  # a read of a peer's files not done by then is abandoned (TeacherLoader)


def file_identity(path: Path) -> tuple | None:
    """(path, inode, size, mtime_ns) of ``path`` itself (a symlink is not followed; stat never
    opens, so a FIFO cannot block it), or None when it does not exist: a file rewritten or
    replaced by the peer has another identity."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def describe(e: Exception, path: Path) -> str:
    """An error of a reader of a peer's files as one line naming the file (ExportError's
    messages already do)."""
    return str(e) if isinstance(e, ExportError) else f"{path}: cannot be read ({type(e).__name__}: {e})"


def check_usable(exp: Export, expect) -> None:
    """Refuse weights a teacher cannot use: other tensor names, shapes or dtypes than ``expect``
    (a dict, or a function of the export's metadata: TeacherPool.expect; codistill/exports.py
    check_specs; the loader already checks them on the header, before reading, and non-finite
    values as it reads)."""
    if callable(expect):
        expect = expect(exp.meta, f"step {exp.step}")
    if expect is not None:
        check_specs({k: (tuple(v.shape), v.dtype) for k, v in exp.state_dict.items()}, expect, f"step {exp.step}")


class _Reader:
    """One peer's reads, on a daemon thread of their own (``TeacherLoader``): ``busy`` says what
    it is reading and since when, for the loader's watchdog; ``abandoned`` is set by the watchdog
    when that read passed its deadline (the thread then ends after the read, if it ever returns)."""

    def __init__(self, loader: TeacherLoader, peer: int):
        self.peer, self.abandoned = peer, False
        self.busy: tuple[str, float, tuple, int | None] | None = None  # (what, since, identities, step)
        self.thread = threading.Thread(target=loader._serve, args=(self,), name=f"teacher-loader-{peer}",
                                       daemon=True)

    @contextlib.contextmanager
    def doing(self, what: str, keys: tuple, step: int | None = None):
        self.busy = (what, time.monotonic(), keys, step)
        try:
            yield
        finally:
            self.busy = None


class TeacherLoader:
    """Peers' exports read into CPU memory off the training thread (see the module docstring).

    Threads: one reader per peer, so a peer whose files block or crawl (a FIFO or a device named
    LATEST or step_N.*, a hung filesystem) delays no other peer; a watchdog. The training loop's
    calls (``take``, ``want``, ``wait``) take ``_lock``, which a reader holds only to hand over a
    finished Export or record a refusal - never during I/O - so they never wait for a read.

    A read that has not returned after ``read_timeout`` seconds is abandoned by the watchdog and
    logged once: the training loop goes on with that peer's last good teacher (or plain CE), a
    sync-mode ``wait`` for it returns None at once, and a new reader follows the peer, but reads
    no file the stuck thread is still blocked on (the same path, inode, size and mtime; a file
    the peer rewrites is read again). At most ``max_stuck`` stuck threads per peer: past that the
    peer is no longer read (logged). A stuck read that returns hands its export over only if
    nothing newer of its peer was handed over meanwhile.

    A refused export (any error of the readers, ExportError or not) is warned about once and
    remembered by the identity of its two files: it is not read again until one of them changes
    (a file replaced while it was being read is simply read again).
    """

    def __init__(self, run_dir: Path, peers: list[int], config_hash: str, tokenizer_sha256: str,
                 mode: str = "latest", poll_interval: float = 1.0, log: Callable[[str], None] = print,
                 pin_memory: bool = False, expect: dict[str, tuple] | None = None,
                 read_timeout: float = READ_TIMEOUT_S, max_stuck: int = 4, max_step: int | None = None):
        """``pin_memory``: read into pinned host memory (a CUDA student copies from it without
        blocking); ``expect``: tensor name -> (shape, dtype) the student's teachers have (an export with
        other names, shapes or dtypes is refused here, not when it is swapped in); ``max_step``: no
        peer's export can be later (the run's --max_steps: a peer claiming more would never become
        stale under --max_teacher_staleness)."""
        if mode not in ("sync", "latest"):
            raise ValueError(f"teacher loader mode must be sync or latest, got {mode!r}")
        self.run_dir, self.peers, self.mode = Path(run_dir), list(peers), mode
        self.config_hash, self.tokenizer_sha256 = config_hash, tokenizer_sha256
        self.poll_interval, self.log = poll_interval, log
        self.pin_memory, self.expect = pin_memory, expect
        self.read_timeout, self.max_stuck, self.max_step = read_timeout, max_stuck, max_step
        # the trainer gives swapped-in exports back; pinned for this rank's GPU (the current one here)
        self.buffers = ReadBuffers(keep=len(self.peers),
                                   pinning=CudaPinning(torch.cuda.current_device()) if pin_memory else None)
        self._lock = threading.Condition()        # the training loop's: dict operations only under it
        self._want: dict[int, int] = {}           # sync mode: peer -> step to prefetch
        self._ready: dict[int, Export] = {}       # peer -> loaded, not yet taken
        self._seen: dict[int, int] = {}           # peer -> newest step loaded (or refused, or stuck)
        self._seen_sig: dict[int, tuple] = {}     # latest mode: peer -> identities of the export last tried
        self._refused: dict[int, set] = {p: set() for p in self.peers}  # peer -> identities of refused exports
        self._events: dict[int, int] = {p: 0 for p in self.peers}       # peer -> hand-overs and refusals so far
        self._warned: set[tuple] = set()
        self._warn_lock = threading.Lock()
        self.read_ms: list[float] = []
        self._stop = threading.Event()
        self._readers: dict[int, _Reader] = {}
        self._stuck: dict[int, list[_Reader]] = {p: [] for p in self.peers}
        for peer in self.peers:
            self._start_reader(peer)
        self._thread = threading.Thread(target=self._watch, name="teacher-loader-watchdog", daemon=True)
        self._thread.start()

    # -- trainer side: never blocks on a read ------------------------------------------------
    def want(self, peer: int, step: int) -> None:
        with self._lock:
            self._want[peer] = step
            self._lock.notify_all()

    def take(self, peer: int) -> Export | None:
        """The newest loaded export of ``peer`` not handed over yet (never blocks)."""
        with self._lock:
            return self._ready.pop(peer, None)

    def wait(self, peer: int, step: int, timeout: float) -> Export | None:
        """Sync mode: the export of ``peer`` at ``step``, waiting at most ``timeout`` seconds
        (None at once when it was refused or its read is stuck)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                exp = self._ready.get(peer)
                if exp is not None and exp.step == step:
                    return self._ready.pop(peer)
                if self._seen.get(peer, -1) >= step or self._stop.is_set():
                    return None  # refused or stuck (already warned) or superseded
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, self.poll_interval))
        self.warn_once(peer, "timeout", f"peer group {peer}: export of step {step} did not arrive within "
                       f"{timeout:.0f}s; keeping the previous teacher")
        return None

    def close(self, timeout: float = 2.0) -> None:
        """Stop every thread; waits at most ``timeout`` seconds for reads in progress (a stuck
        one is left behind: the threads are daemons)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)  # the watchdog first: it starts readers
        for r in list(self._readers.values()):
            r.thread.join(max(0.0, deadline - time.monotonic()))

    def warn_once(self, peer: int, kind, msg: str) -> None:
        with self._warn_lock:
            if (peer, kind) in self._warned:
                return
            self._warned.add((peer, kind))
        self.log(f"WARNING: {msg}")

    # -- the readers ---------------------------------------------------------------------------
    def _start_reader(self, peer: int) -> None:
        r = self._readers[peer] = _Reader(self, peer)
        r.thread.start()

    def _serve(self, me: _Reader) -> None:
        while not self._stop.is_set() and not me.abandoned:
            try:
                self._poll(me)
            except Exception as e:  # never let a reader die
                self.warn_once(me.peer, "unexpected", f"peer group {me.peer}: loader error {e!r}")
            with self._lock:
                if not self._stop.is_set() and not me.abandoned:
                    self._lock.wait(self.poll_interval)

    def _stuck_on(self, peer: int, keys) -> bool:
        """Whether a stuck thread of ``peer`` is still blocked on one of these files."""
        keys = {k for k in keys if k is not None}
        return any(z.thread.is_alive() and (b := z.busy) is not None and keys & set(b[2]) for z in self._stuck[peer])

    def _poll(self, me: _Reader) -> None:
        """One look at the peer: which export is due, and if it is new, read and hand it over."""
        peer = me.peer
        d = exports_dir(self.run_dir, peer)
        if self.mode == "sync":
            with self._lock:
                target = self._want.get(peer)
                if target is None or target <= self._seen.get(peer, -1):
                    return
        else:
            latest = (file_identity(d / "LATEST"),)
            if self._stuck_on(peer, latest):
                return
            try:
                with me.doing(str(d / "LATEST"), latest):
                    target = read_latest(d, missing_ok=True)
            except Exception as e:  # ExportError, or whatever a reader let escape: never a dead thread
                self.warn_once(peer, ("latest", latest), f"peer group {peer}: {describe(e, d / 'LATEST')}")
                return
            if target is None:
                return
        name = export_name(target)
        files = (d / f"{name}.json", d / f"{name}.safetensors")
        ident = tuple(file_identity(f) for f in files)
        if self.mode == "sync" and ident[0] is None:
            return  # not exported yet: wait for it (the trainer's wait() has the timeout)
        with self._lock:
            if ident in self._refused[peer] or (self.mode == "latest" and ident == self._seen_sig.get(peer)):
                return  # any new export counts in latest mode, even an older step (a peer restarted)
            events = self._events[peer]
        if self._stuck_on(peer, ident):
            return
        t0 = time.perf_counter()
        try:
            with me.doing(f"{files[0]} + {files[1].name}", ident, target):
                exp = read_export(d, target, self.config_hash, self.tokenizer_sha256, pin_memory=self.pin_memory,
                                  buffers=self.buffers, expect=self.expect, max_step=self.max_step)
        except Exception as e:  # ExportError, or whatever a reader let escape (a refusal all the same)
            if tuple(file_identity(f) for f in files) != ident:
                return  # replaced while being read: read it again at the next poll
            self.warn_once(peer, ("bad", ident), f"peer group {peer}: refusing export step {target}: "
                           f"{describe(e, files[0])}; keeping the last good teacher")
            with self._lock:
                self._refused[peer].add(ident)
                self._handed(peer, target, ident)
            return
        self.read_ms.append((time.perf_counter() - t0) * 1e3)
        with self._lock:
            if me.abandoned and self._events[peer] != events:
                return  # a stuck read that came back after its peer moved on
            self._ready[peer] = exp
            self._handed(peer, target, ident)

    def _handed(self, peer: int, target: int, ident: tuple) -> None:
        """Record a hand-over or refusal (under ``_lock``)."""
        self._seen[peer], self._seen_sig[peer] = target, ident
        self._events[peer] += 1
        self._lock.notify_all()

    # -- the watchdog ----------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(min(self.poll_interval, self.read_timeout / 4)):
            for peer, r in list(self._readers.items()):
                busy = r.busy
                if busy is None or time.monotonic() - busy[1] <= self.read_timeout:
                    continue
                what, _, _, step = busy
                r.abandoned = True
                self._stuck[peer] = [z for z in self._stuck[peer] if z.thread.is_alive()] + [r]
                self.warn_once(peer, ("stuck", what), f"peer group {peer}: reading {what} has not returned "
                               f"after {self.read_timeout:.0f}s (a FIFO or device file, or a hung filesystem?); "
                               "abandoned: training goes on with this peer's last good teacher, the other peers "
                               "are read as usual, and the file is not read again while that read is stuck")
                if step is not None and self.mode == "sync":
                    with self._lock:  # wait() for it returns at once
                        self._seen[peer] = max(self._seen.get(peer, -1), step)
                        self._lock.notify_all()
                if len(self._stuck[peer]) >= self.max_stuck:
                    self.warn_once(peer, "given-up", f"peer group {peer}: {len(self._stuck[peer])} reads of its "
                                   "files are stuck; not reading this peer any more in this run")
                    del self._readers[peer]
                    continue
                self._start_reader(peer)
