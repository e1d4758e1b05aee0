"""Peers' stale checkpoints as teachers: a background loader and the in-memory teacher modules.

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

from codistill.comm import GroupComm, GroupSync
from codistill.exchange import (
    EXPORT_NAME,
    Export,
    ExportError,
    ReadBuffers,
    export_name,
    read_export,
    read_final,
    read_latest,
)
from codistill.layout import exports_dir
from codistill.loss import TopK, chunk_rows, topk_of
from codistill.placement import FullTeacher, OffloadedTeacher, PartitionedTeacher, teacher_ds_config
from codistill.weights_file import check_specs
from model import ModelConfig, build_model
from model.lstm import CarriedState

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


def check_usable(exp: Export, expect: dict[str, tuple] | None) -> None:
    """Refuse weights a teacher cannot use: other tensor names, shapes or dtypes than ``expect``
    (codistill/weights_file.py check_specs; the loader already checks them on the header, before
    reading, and non-finite values as it reads)."""
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
                 read_timeout: float = READ_TIMEOUT_S, max_stuck: int = 4):
        """``pin_memory``: read into pinned host memory (a CUDA student copies from it without
        blocking); ``expect``: tensor name -> (shape, dtype) the student's teachers have (an export with
        other names, shapes or dtypes is refused here, not when it is swapped in)."""
        if mode not in ("sync", "latest"):
            raise ValueError(f"teacher loader mode must be sync or latest, got {mode!r}")
        self.run_dir, self.peers, self.mode = Path(run_dir), list(peers), mode
        self.config_hash, self.tokenizer_sha256 = config_hash, tokenizer_sha256
        self.poll_interval, self.log = poll_interval, log
        self.pin_memory, self.expect = pin_memory, expect
        self.read_timeout, self.max_stuck = read_timeout, max_stuck
        self.buffers = ReadBuffers(keep=len(self.peers))  # the trainer gives swapped-in exports back
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
                exp = read_export(d, target, self.config_hash, self.tokenizer_sha256,
                                  pin_memory=self.pin_memory, buffers=self.buffers, expect=self.expect)
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


def working_dtypes(like: torch.nn.Module | None, dtype: torch.dtype = torch.float32):
    """(the dtype most of ``like``'s parameters have, name -> dtype of each of its tensors)."""
    if like is None:
        return dtype, {}
    dtypes = {n: t.dtype for n, t in [*like.named_parameters(), *like.named_buffers()]}
    counts: dict[torch.dtype, int] = {}
    for _n, t in like.named_parameters():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel() + getattr(t, "ds_numel", 0)
    return (max(counts, key=counts.get) if counts else dtype), dtypes


def build_frozen(model_config: ModelConfig, device: torch.device, like: torch.nn.Module | None = None,
                 dtype: torch.dtype = torch.float32, pin: bool = False) -> torch.nn.Module:
    """A frozen copy of the architecture, built directly on ``device`` in its working dtype
    (``pin``: on the CPU in pinned memory, for a teacher offloaded from a CUDA device).

    With ``like`` (the student's module, as its DeepSpeed engine holds it) every parameter and
    buffer gets the dtype the student's tensor of the same name has: DeepSpeed's bf16 casts
    parameters and leaves buffers (the Transformer's RoPE ``inv_freq``) in fp32, and a teacher
    must compute what the student computes. ``module.to(dtype)`` would cast both.
    """
    dtype, dtypes = working_dtypes(like, dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in ``dtype``; buffers computed in fp32 stay fp32
    try:
        with torch.device(device):
            module = build_model(model_config)
    finally:
        torch.set_default_dtype(prev)
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        want = dtypes.get(n, dtype if isinstance(t, torch.nn.Parameter) else t.dtype)
        if (t.dtype != want and t.is_floating_point()) or pin:
            t.data = t.data.to(want).pin_memory() if pin else t.data.to(want)
    return module.eval().requires_grad_(False)


class TeacherPool:
    """One frozen teacher per peer on this rank, shared by every student this rank hosts.

    Teachers compute with the student's dtypes on the student's device (``build_frozen``); where
    their weights live is the ``placement`` (codistill/placement.py): "full" on the device,
    "partition" (ZeRO-3 over the group's ranks; needs ``mpu`` and the student's ``ds_config``)
    or "offload" (host memory, streamed). In a group of several ranks only the group's leader
    reads exports; ``swap`` hands the weights to the other ranks over the group (``comm``), so
    every rank of a group uses the same teacher at the same step and a shared filesystem sees
    one read per group and export. With ``topk`` > 0 the averaged distribution is kept as its
    top K per token (codistill/loss.py TopK), computed ``chunk_mb`` MiB of probabilities at a time.
    """

    def __init__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32,
                 like: torch.nn.Module | None = None, comm: GroupComm | None = None, placement: str = "full",
                 mpu=None, ds_config: dict | None = None, topk: int = 0, chunk_mb: float = 32.0):
        if placement not in ("full", "partition", "offload"):
            raise ValueError(f"teacher placement must be full, partition or offload, got {placement!r}")
        self.model_config, self.device, self.dtype, self.like = model_config, device, dtype, like
        self.comm = comm or GroupComm.single(device)
        self.placement, self.mpu, self.ds_config = placement, mpu, ds_config
        self.topk, self.chunk_mb = topk, chunk_mb
        self.teachers: dict[int, object] = {}  # peers with weights loaded: their placement objects
        self.steps: dict[int, int] = {}
        self._spare: dict[int, object] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._warned: set[tuple] = set()
        self.fixed: set[int] = set()

    @property
    def modules(self) -> dict[int, torch.nn.Module]:
        """Peer -> its teacher's module (a ZeRO-3 one holds only this rank's partitions)."""
        return {p: t.module for p, t in self.teachers.items()}

    def expected_shapes(self) -> dict[str, tuple]:
        """Tensor name -> (shape, dtype) an export must have to be swapped in (for the loader;
        a floating dtype stands for fp32/bf16/fp16: codistill/weights_file.py check_specs)."""
        module = build_frozen(self.model_config, torch.device("meta"))
        return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}

    def _build(self):
        if self.placement == "partition":
            t = PartitionedTeacher(lambda: build_model(self.model_config), teacher_ds_config(self.ds_config), self.mpu,
                                   dtypes=working_dtypes(self.like, self.dtype)[1])
        elif self.placement == "offload":
            t = OffloadedTeacher(build_frozen(self.model_config, torch.device("cpu"), self.like, self.dtype,
                                              pin=self.device.type == "cuda"), self.device)
        else:
            t = FullTeacher(build_frozen(self.model_config, self.device, self.like, self.dtype))
        if self.topk and self.model_config.arch == "hf":
            check_head_only(t, self.model_config, self.device)
        return t

    def reserve(self, peers: list[int]) -> None:
        """Build the peers' teachers up front, so that a swap is only a copy of weights."""
        for peer in peers:
            if peer not in self._spare:
                self._spare[peer] = self._build()

    def load(self, peer: int, export: Export, fixed: bool = False) -> float:
        """Swap ``export`` into the peer's teacher; returns the milliseconds it took. On this rank
        alone, except for a partitioned teacher (collective over the group: every rank calls it,
        the leader's weights are used). A ``fixed`` teacher (``--teacher PATH``) is never stale:
        it is not a peer that stopped publishing."""
        t0 = time.perf_counter()
        if fixed:
            self.fixed.add(peer)
        self.reserve([peer])
        teacher = self._spare[peer]
        comm = self.comm if self.placement == "partition" else GroupComm.single(self.device)
        with torch.no_grad():
            teacher.receive(export.state_dict, comm)  # names and shapes checked by the reader (check_usable)
        self.teachers[peer] = teacher
        self.steps[peer] = export.step
        return (time.perf_counter() - t0) * 1e3

    def swap(self, updates: dict[int, tuple[int, Export | None]], agree: bool = True) -> float:
        """Swap peers' teachers on every rank of the group at once; returns milliseconds.

        ``updates``: peer -> (export step, the export on the group's leader / None elsewhere);
        the same peers on every rank of the group. With ``agree`` the leader first tells its
        ranks which of them it has (it may have none: a refused or late export), one broadcast;
        without it the ranks already agree (the steps were announced through StepControl).
        Collective over the group: every rank of the group calls it with the same peers.
        """
        t0 = time.perf_counter()
        peers = sorted(updates)
        steps = [updates[p][0] if updates[p][1] is not None else -1 for p in peers] if self.comm.leader \
            else [updates[p][0] for p in peers]
        if agree:
            steps = self.comm.agree(steps)
        for p, step in zip(peers, steps):
            if step < 0:
                continue
            exp = updates[p][1]
            self.reserve([p])
            teacher = self._spare[p]
            with torch.no_grad():
                teacher.receive(exp.state_dict if exp is not None else None, self.comm)
            self.teachers[p], self.steps[p] = teacher, step
        return (time.perf_counter() - t0) * 1e3

    def resident_bytes(self) -> int:
        """Bytes of teacher weights this rank holds on its device (every reserved teacher)."""
        return sum(t.resident_bytes() for t in self._spare.values())

    def active(self, student: int, step: int, max_staleness: int | None, warn_after: int | None = None,
               log: Callable[[str], None] | None = None) -> list[int]:
        """The peers whose teachers ``student`` uses at ``step``.

        A peer whose newest good export is older than ``max_staleness`` steps is dropped (the
        loss averages the others, or is plain CE); without a cap it stays in use however old
        it gets. Either way it is logged once per export: older than ``warn_after`` steps
        (the peer died or stalls) and dropped.
        """
        out = []
        for p in sorted(self.modules):
            if p == student:
                continue
            if p in self.fixed:
                out.append(p)
                continue
            age = step - self.steps[p]
            if warn_after is not None and age > warn_after:
                self._warn(log, ("stale", p, self.steps[p]), f"peer group {p} has published nothing newer than "
                           f"step {self.steps[p]} for {age} steps (dead or stalled?); still using that export")
            if max_staleness is not None and age > max_staleness:
                self._warn(log, ("dropped", p, self.steps[p]), f"peer group {p}'s teacher (step {self.steps[p]}) "
                           f"is {age} steps old > --max_teacher_staleness {max_staleness}: dropped until it "
                           "exports again")
                continue
            out.append(p)
        return out

    def _warn(self, log, key, msg) -> None:
        if log is not None and key not in self._warned:
            self._warned.add(key)
            log(f"WARNING: {msg}")

    def probs(self, peers: list[int], input_ids: torch.Tensor, temperature: float = 1.0,
              targets: torch.Tensor | None = None, use: list[int] | None = None, num_groups: int = 0,
              states: dict | None = None):
        """The averaged teacher distribution on the student's batch and each teacher's health:
        dense (``_dense``) or top-K (``_topk``). A partitioned teacher runs under no_grad (its
        ZeRO-3 hooks gather parameters into tensors that must outlive inference mode).

        ``states`` (--carry_state, LSTM teachers): peer -> model.lstm.CarriedState, the student's
        per-teacher states for these rows, carried in and updated. A state is tagged with the export
        step of the teacher that computed it; a swapped-in teacher starts from zeros (its weights
        are hundreds of steps newer: the old state is another network's)."""
        use = list(peers) if use is None else use
        fn = self._topk if self.topk else self._dense
        kw = {p: self._carried(p, states) for p in peers} if states is not None else {p: {} for p in peers}
        with torch.no_grad() if self.placement == "partition" else torch.inference_mode():
            return fn(peers, input_ids, temperature, targets, use, num_groups, kw)

    def _carried(self, peer: int, states: dict) -> dict:
        st = states.get(peer)
        if st is None or st.tag != self.steps.get(peer):
            st = states[peer] = CarriedState(tag=self.steps.get(peer))
        return {"state": st}

    def _dense(self, peers, input_ids, temperature, targets, use, num_groups, kw):
        """The averaged teacher distribution on the student's batch (fp32), and each teacher's health.

        Every peer in ``peers`` runs; the average is over those in ``use`` (default: all) whose
        probabilities are finite on this batch - a teacher that is not is left out of this step,
        so the student never sees a NaN through a teacher (all left out: q is all zeros, i.e. no
        distillation this step). Returns (q, health): q None when ``use`` is empty; health a
        device tensor of 2 x (``num_groups`` + 1) values: per group id p (the fixed teacher last)
        the teacher's cross entropy on ``targets`` (0 for teachers not run), then for each 1 where
        its probabilities were non-finite. No host sync: the trainer reads health in the step's sync.

        q lives in a buffer reused by the next call (the trainer consumes it, through the
        student's backward, before asking again): allocating B*T*V floats afresh every step costs
        more than the softmax itself on CPU.
        """
        out, count, health, layout = None, None, None, GroupSync(num_groups)
        for p in peers:
            logits = self.teachers[p](input_ids, **kw[p])
            if temperature != 1.0:
                logits = logits / temperature
            shape = (*logits.shape[:-1], logits.shape[-1])
            into_out = p in use and out is None
            buf = self._buffer("probs" if into_out else "tmp", shape, logits.device)
            torch.softmax(logits, dim=-1, dtype=torch.float32, out=buf)
            ok = torch.isfinite(buf.sum())  # probabilities sum to B*T: no overflow, NaN/Inf propagate
            if health is None:
                health = torch.zeros(layout.health_width, device=buf.device)
            if targets is not None and num_groups:
                p_y = buf.gather(-1, targets.unsqueeze(-1)).clamp_min(torch.finfo(buf.dtype).tiny)
                health[layout.health_ce(p)] = -p_y.log().mean()
                health[layout.health_nonfinite(p)] = (~ok).float()
            if p not in use:
                continue
            torch.where(ok, buf, buf.new_zeros(()), out=buf)
            count = ok.float() if count is None else count + ok.float()
            if into_out:
                out = buf
            else:
                out.add_(buf)
        if out is not None and len(use) > 1:
            out.div_(count.clamp_min(1.0))
        return out, health

    def _topk(self, peers, input_ids, temperature, targets, use, num_groups, kw):
        """``_dense``'s result with q kept as TopK: every teacher runs its body once (states
        before the output head, [B, T, D]), then for ``chunk_mb`` MiB of tokens at a time each
        teacher's head, softmax and the average, of which the top K per token are kept. No
        [B, T, V] tensor exists. A teacher is left out of the average for each token where its
        probabilities are not finite (the dense form leaves it out of the whole batch)."""
        n = input_ids.numel()
        hidden = [self.teachers[p](input_ids, hidden_only=True, **kw[p]).reshape(n, -1) for p in peers]
        layout = GroupSync(num_groups)
        health = torch.zeros(layout.health_width, device=input_ids.device)
        with contextlib.ExitStack() as stack:
            heads = [stack.enter_context(self.teachers[p].head_weight()) for p in peers]
            v = heads[0].shape[0]
            k = min(self.topk, v)
            q = TopK(self._buffer("topk_values", (n, k)), self._buffer("topk_indices", (n, k), dtype=torch.int64),
                     self._buffer("topk_rest", (n,)))
            rows = chunk_rows(v, self.chunk_mb)
            for i in range(0, n, rows):
                acc, count = None, None
                for p, h, w in zip(peers, hidden, heads):
                    z = torch.nn.functional.linear(h[i:i + rows], w).float()
                    if temperature != 1.0:
                        z = z / temperature
                    probs = torch.softmax(z, dim=-1)
                    ok = torch.isfinite(probs.sum(-1))
                    if targets is not None and num_groups:
                        p_y = probs.gather(-1, targets.reshape(-1)[i:i + rows, None])
                        health[layout.health_ce(p)] -= p_y.clamp_min(torch.finfo(probs.dtype).tiny).log().sum() / n
                        bad = layout.health_nonfinite(p)
                        health[bad] = torch.maximum(health[bad], (~ok).any().float())
                    if p not in use:
                        continue
                    probs = torch.where(ok[:, None], probs, probs.new_zeros(()))
                    acc = probs if acc is None else acc.add_(probs)
                    count = ok.float() if count is None else count + ok.float()
                if acc is None:
                    return None, health
                if len(use) > 1:
                    acc.div_(count.clamp_min(1.0)[:, None])
                t = topk_of(acc, k)
                q.values[i:i + rows], q.indices[i:i + rows], q.rest[i:i + rows] = t.values, t.indices, t.rest
        shape = input_ids.shape
        return TopK(q.values.unflatten(0, shape), q.indices.unflatten(0, shape), q.rest.unflatten(0, shape)), health

    def _buffer(self, name: str, shape: tuple, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        device = device or self.device
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.device != device:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


# config keys of transformers models that change logits after the output head (a value other than
# None / 1.0): Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling, ...
AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_head_only(teacher, config: ModelConfig, device: torch.device) -> None:
    """--teacher_topk computes teachers' logits as head(hidden states) chunk by chunk; refuse an
    architecture whose logits are more than that: a known post-head scaling in its config, or
    logits that differ from head(hidden) on a probe input."""
    bad = [k for k in AFTER_HEAD if (config.hf_config or {}).get(k) not in (None, 1, 1.0)]
    x = torch.arange(8, device=device)[None] % config.vocab_size
    with torch.no_grad():
        full = teacher(x).float()
        hidden = teacher(x, hidden_only=True)  # before gathering the head: a ZeRO-3 forward releases a tied
        with teacher.head_weight() as w:      # embedding's weight (the head's) when the embedding is done
            mine = torch.nn.functional.linear(hidden, w).float()
    if bad or not torch.allclose(full, mine, rtol=1e-3, atol=1e-3):
        why = f" ({', '.join(bad)} in its config)" if bad else ""
        raise ValueError(f"--teacher_topk: this model's logits are not its output head applied to its last hidden "
                         f"states{why}: its architecture changes them after the head; run it without --teacher_topk")
