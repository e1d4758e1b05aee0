"""The exchange between groups: what a process publishes to its peers and which of their
exports it uses as teachers, when.

One object per process, ``Exchange``, owns the whole protocol; the trainer only calls it at
fixed points of a step (``before_step``, ``announce``/``after_sync`` around the step's sync,
``maybe_export``, ``settle`` before a checkpoint, ``state``/``restore`` for checkpoints):

- Exports: every K = --export_every steps each group's leader publishes its weights
  (codistill/exports.py: safetensors + metadata + LATEST). The device->host copy happens on the
  training thread; serialisation, sha256, fsync and the renames on a background thread
  (``ExportWriter``). One export is in flight at a time: the next export, a checkpoint and the
  end of the run wait for it, so a failed write (disk full) is known - warned, or the run stops
  with --on_write_error stop - before anything is built on it; LATEST keeps naming the previous
  complete export. Non-finite weights are never published.
- Sync teachers (every group in this launch, ``sync_schedule``): before step s = b + 1, at each
  export boundary b (b % K == 0, b >= 2K) every student swaps in its peers' exports of step
  b - K; the loader starts reading those half an interval before (b % K == K // 2), so its read
  never lands on a swap step. Teachers are a deterministic function of the step: runs are
  reproducible and resume is exact. An export that failed to be written is skipped (the
  previous teacher stays) without waiting for it.
- Latest teachers (one launch per group): the loader follows each peer's LATEST; when it has a
  new export ready, the group's leader announces it in the step's sync and every rank of the
  group swaps it in at the start of the next step.
- In a group of several ranks only the leader reads exports; the other ranks receive the
  weights by a broadcast over the group (TeacherPool.swap). A missing, late, corrupt or hostile
  export never stops training: the last good teacher stays (codistill/teachers/pool.py).
- --peer_use average|diloco (one launch hosting every group): no teachers; ``begin`` starts every
  group from group 0's weights, ``maybe_average`` at every export step (after the export was
  taken) sets every group to the mean of the groups' fp32 masters, or to DiLoCo's outer step
  from it (codistill/averaging.py). Bytes written and read per group: ``ExchangeBytes``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from codistill import faults
from codistill.averaging import (
    ExchangeBytes,
    OuterOptimizer,
    average,
    expected_shapes,
    gather_present,
    gradient_element_bytes,
    read_masters,
    read_peer,
    with_masters,
    write_masters,
)
from codistill.comm import StepOutcome, broadcast_tensors, flags_any
from codistill.exports import Export, clean_temp_files, read_export, read_latest, write_export
from codistill.flags import Flags, TeacherFlags
from codistill.layout import RunLayout
from codistill.teachers.health import TeacherGuard
from codistill.teachers.loader import FIXED_TEACHER, TeacherLoader, check_usable
from codistill.teachers.pool import TeacherPool
from fileio import ExportError


def sync_schedule(step: int, K: int) -> tuple[int | None, int | None]:
    """Sync teachers at (1-based) ``step``: (the peers' export step swapped in before the step,
    or None; the export step the loader starts reading before the step, or None)."""
    b = step - 1
    swap = b - K if b > 0 and b % K == 0 and b >= 2 * K else None
    prefetch = b - K // 2 if b > 0 and b % K == K // 2 and b - K // 2 >= K else None
    return swap, prefetch


def resume_prefetch(start: int, K: int) -> int | None:
    """After resuming at ``start``: the export the uninterrupted run's loader had been asked for
    (the one its next swap uses), or None."""
    pending = (start - 1) // K * K
    return pending if start and pending >= K else None


def broadcast_weights(weights: dict[str, torch.Tensor] | None, shapes: dict[str, torch.Size], src: int, group,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """fp32 weights of global rank ``src`` (``weights`` there, None elsewhere) as host tensors on every
    rank of ``group`` (None: the world): one tensor broadcast per tensor, on ``device`` (NCCL takes
    device tensors), so the device holds one tensor at a time. Not an object broadcast, which pickles
    the weights and stages all their bytes on the device at once. Collective over ``group``."""
    out = {}
    for k, shape in shapes.items():
        buf = (weights[k].to(device, torch.float32) if weights is not None
               else torch.empty(shape, dtype=torch.float32, device=device))
        broadcast_tensors([buf], src, group)
        out[k] = buf.cpu()
    return out


@dataclass
class WriteResult:
    step: int
    group: int
    error: Exception | None = None


class ExportWriter:
    """A group leader's exports, written on a background thread, one at a time."""

    def __init__(self, exports_dir, keep: int):
        self.dir, self.keep = exports_dir, keep
        self._thread: threading.Thread | None = None
        self._result: WriteResult | None = None

    def submit(self, group: int, step: int, state_dict: dict, meta: dict) -> None:
        """Start writing; ``state_dict`` must be host tensors the trainer no longer touches."""
        assert self._thread is None, "collect the previous export first"
        self._result = WriteResult(step, group)

        def work():
            try:
                write_export(self.dir, step, state_dict, meta, keep=self.keep)
            except (OSError, ExportError) as e:
                self._result.error = e

        self._thread = threading.Thread(target=work, name=f"export-writer-{group}", daemon=True)
        self._thread.start()

    def collect(self) -> WriteResult | None:
        """Wait for the export in flight; its result (None when there is none)."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, result, self._result = None, self._result, None
        return result


class Exchange:
    def __init__(self, cfg: Flags, topo, students, model_cfg, tokenizer_sha256: str, device, log,
                 fixed: Export | None = None):
        ex, tf = cfg.exchange, cfg.teachers  # its own flag groups; from the others, the few facts it needs
        self.flags, self.topo, self.log = ex, topo, log
        self.K, self.G = ex.export_every, topo.num_groups
        self.run = RunLayout(cfg.run.run_dir)
        self.sync = ex.teacher_sync == "on" or (ex.teacher_sync == "auto" and topo.all_groups_here)
        self.averaging, self.peer_use = ex.averaging, ex.peer_use  # --peer_use average|diloco
        self.exporting = cfg.codistill or (self.averaging and self.G > 1)  # peers teach each other, or average
        self.stop_on_write_error = cfg.faults.on_write_error == "stop"
        self.keep = ex.keep_exports
        if self.sync:  # the export a checkpoint's teacher came from must survive until the next checkpoint
            self.keep = max(self.keep, cfg.checkpoint.save_every // self.K + 2)
        self.model_cfg, self.cfg_hash, self.tok_hash = model_cfg, model_cfg.config_hash(), tokenizer_sha256
        self.device = device
        self.students = students
        self.peers = sorted({p for s in students for p in topo.peers(s.id)}) if cfg.codistill else []  # teachers
        # DiLoCo's outer optimizer: one per process (every group computes the same outer step)
        self.outer = OuterOptimizer(ex.outer_lr, ex.outer_momentum) if ex.peer_use == "diloco" else None
        self.rounds = 0  # averaging rounds done by this process (logged)
        # bytes on the wire per hosted group; the synchronous baseline: one data-parallel run over every
        # group's ranks (G x ranks per group)
        self.bytes = {s.id: ExchangeBytes(s.id, s.num_params, self.G * s.dp_size, gradient_element_bytes(s.engine),
                                          s.zero_stage) for s in students}
        # teachers get the student's dtypes on the student's device; a group of several ranks has
        # one reader (its leader), whose exports reach the other ranks by broadcast (TeacherPool.swap)
        self.pool = TeacherPool(model_cfg, device, like=students[0].engine.module,
                                comm=students[0].comm if len(students) == 1 else None,
                                placement=self.placement(tf, students, log), mpu=students[0].mpu,
                                ds_config=students[0].ds_cfg, topk=tf.teacher_topk, chunk_mb=students[0].chunk_mb,
                                peer_models=tf.peer_models)
        self.pool.reserve(self.peers)
        if fixed is not None:
            self.pool.load(FIXED_TEACHER, fixed, fixed=True)
        self.reader = self.pool.comm.leader
        self.loader = TeacherLoader(self.run.root, self.peers, self.pool.config_hash, self.tok_hash,
                                    "sync" if self.sync else "latest", ex.poll_interval, log,
                                    pin_memory=device.type == "cuda", expect=self.pool.expect,
                                    max_step=cfg.training.max_steps) \
            if self.peers and self.reader else None
        self.writers = {s.id: ExportWriter(self.run.group(s.id).exports, self.keep) for s in students if s.leader}
        self.in_flight: int | None = None  # step of the exports being written (the same on every rank)
        self.failed: set[tuple[int, int]] = set()  # (group, step) exports that could not be written
        self.guard = TeacherGuard(topo.hosted, {s.id for s in students if s.leader}, self.G,
                                  tf.teacher_max_ppl_ratio or None, tf.teacher_guard_window, log)
        self._held: dict[int, Export] = {}  # latest teachers: exports this leader announced
        self._swaps: dict[int, int] = {}    # latest teachers: peer -> export step to swap in next step
        for s in students:
            if s.leader:
                for name in clean_temp_files(self.run.group(s.id).exports):
                    log(f"[group {s.id}] removed {name}, a temp file of an export interrupted in an earlier run")

    @staticmethod
    def placement(tf: TeacherFlags, students, log) -> str:
        """Where teachers' weights live (codistill/teachers/placement.py), from --teacher_partition and
        --teacher_offload; partitioning needs one group per rank, of 2 or more ranks."""
        if tf.teacher_offload == "cpu":
            return "offload"
        if not tf.teacher_partition:
            return "full"
        if len(students) == 1 and students[0].dp_size > 1:
            return "partition"
        log("WARNING: --teacher_partition: each group here has one rank, so there is nothing to partition a "
            "teacher over; teachers are kept whole (start >= 2 ranks per group to partition them)")
        return "full"

    @property
    def mode(self) -> str:
        return "sync" if self.sync else "latest"

    def metadata(self, student) -> dict:
        """What every published set of weights says about itself (exports and final/)."""
        return {"group": student.id, "tokens_seen": student.tokens_seen, "model_config": self.model_cfg.to_dict(),
                "model_config_hash": self.cfg_hash, "tokenizer_sha256": self.tok_hash}

    def describe_teachers(self, student: int) -> str:
        """The teachers ``student`` has used and how they measured (for messages), or ''."""
        return self.guard.describe(student, self.pool.steps) if self.exporting or self.pool.fixed else ""

    def teacher_steps(self, student: int) -> dict[int, int]:
        """Peer -> export step of the teacher ``student`` uses now (for summary.json)."""
        return {p: self.pool.steps[p] for p in self.peers if p in self.pool.steps and p != student}

    # ---- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        state = {"teacher_steps": dict(self.pool.steps),
                 "exchange_bytes": {g: [b.written, b.read] for g, b in self.bytes.items()}}
        if self.outer is not None and self.outer.start is not None:
            state["outer_optimizer"] = self.outer.state_dict()
        return state

    def restore(self, state: dict, start: int) -> None:
        """The teachers in use when the checkpoint was written (read by the leader, broadcast to
        its group), and the prefetch the uninterrupted run had asked for."""
        for g, (written, read) in (state.get("exchange_bytes") or {}).items():
            if int(g) in self.bytes:
                self.bytes[int(g)].written, self.bytes[int(g)].read = int(written), int(read)
        if self.outer is not None and state.get("outer_optimizer") is not None:
            self.outer.load_state_dict(state["outer_optimizer"], f"the checkpoint of step {start}")
        restore = {}
        for peer, tstep in sorted((int(p), t) for p, t in (state.get("teacher_steps") or {}).items()):
            if peer in self.pool.steps:
                continue
            exp = None
            if self.reader:
                try:
                    exp = read_export(self.run.group(peer).exports, tstep, self.pool.config_hash, self.tok_hash)
                    check_usable(exp, self.pool.expect)
                except ExportError as e:
                    self.log(f"WARNING: cannot restore teacher of group {peer} at step {tstep} ({e}); "
                             "resume is not exact until the next teacher swap")
            restore[peer] = (tstep, exp)
        self._swap(restore)
        pending = resume_prefetch(start, self.K)
        if self.loader and self.sync and pending is not None:
            for p in self.peers:
                self.loader.want(p, pending)

    # ---- averaging (--peer_use average|diloco) ---------------------------------------------
    def all_masters(self) -> list[dict[str, torch.Tensor]]:
        """Every group's fp32 master weights, in group order, on every rank (a collective of the
        launch). One process hosting every group reads its engines (read_masters); a world split
        (each rank hosts some groups) sends each group's leader's copy to every rank, group by group
        and tensor by tensor, over the world (``broadcast_weights``; every rank of a group holds the
        same full values). Holds G copies of the model in host memory per rank while it runs; on
        the device, one tensor at a time (an all-gather of every rank's flattened copy would hold
        world-size copies of the model on each GPU: 32 GB at 8 ranks and 1 B parameters)."""
        own = {s.id: read_masters(s.engine) for s in self.students}  # a collective of each group
        if len(own) == self.G:
            return [own[g] for g in range(self.G)]
        shapes = {k: t.shape for k, t in own[self.students[0].id].items()}
        return [broadcast_weights(own.get(g), shapes, self.topo.group_ranks[g][0], None, self.device)
                for g in range(self.G)]

    def _set_all(self, weights: dict[str, torch.Tensor]) -> None:
        for s in self.students:
            write_masters(s.engine, weights)  # every rank of the group; the inner optimizer's state is kept

    def begin(self, start: int) -> None:
        """Before the first step of this launch: with --peer_use average|diloco a fresh run starts
        every group from group 0's initialisation (the groups seed their own otherwise) and DiLoCo's
        first round starts there; a resumed run has its weights and outer state from the checkpoint
        (Exchange.restore), or, from a checkpoint without outer state, opens the round at the mean
        of the groups' weights now (warned). Logs the synchronous data-parallel equivalent once."""
        if not self.averaging:
            return
        for s in self.students:
            if s.writer:
                b = self.bytes[s.id]
                s.writer.scalar("exchange/allreduce_equiv_bytes",
                                b.record()["exchange/dp_allreduce_bytes_per_step"], start)
        if start == 0:
            if self.topo.all_groups_here:
                weights = self.all_masters()[0]
                self._set_all(weights)
            else:  # --group_id: every launch initialised from group 0's seed (codistill/student.py)
                weights = read_masters(self.students[0].engine)
            if self.outer is not None:
                self.outer.begin(weights)
            self.log(f"--peer_use {self.peer_use}: every group starts from group 0's initialisation")
        elif self.outer is not None and self.outer.start is None:
            self.log(f"WARNING: the checkpoint of step {start} holds no DiLoCo outer state (written by another "
                     "--peer_use?): the outer momentum starts from zero and the round from the groups' mean now",
                     force=True)
            self.outer.begin(average(self.all_masters()) if self.topo.all_groups_here
                             else read_masters(self.students[0].engine))

    def maybe_average(self, step: int) -> str | None:
        """At every exchange step (after its export was taken): average: every group's masters become
        the mean over the groups; diloco: the outer step from the round's start and that mean.
        Every group of the launch is present (one launch); the result is the same bits everywhere.
        A group whose weights are not finite is never averaged in: "diverged" (every rank sees the
        same weights, so every rank decides the same), the groups keep their weights and the last
        checkpoints stay intact."""
        if not (self.averaging and self.exporting and step % self.K == 0):
            return None
        if not self.topo.all_groups_here:
            present, outcome = self._present_separate(step)
            if outcome:
                return outcome
        else:
            present = self.all_masters()
        if faults.active("nan_weights", step):  # test-only (codistill/faults.py)
            present[0] = {k: v * float("nan") for k, v in present[0].items()}
        bad = [g for g, w in enumerate(present) if not all(torch.isfinite(t).all() for t in w.values())]
        if bad:
            self.log.error(f"step {step}: group {bad[0]}'s weights are not finite ({len(bad)} group(s)); "
                           f"--peer_use {self.peer_use} would spread them to every group, so the run stops "
                           "without averaging (lower --lr and continue with --resume auto)")
            return "diverged"
        new = average(present) if self.outer is None else self.outer.step(present)
        self._set_all(new)
        self.rounds += 1
        return None

    def _present_separate(self, step: int):
        """--group_id (this launch trains one group): the weights to average at ``step``, in group order -
        this group's own export of ``step`` (its masters if that write failed) and every peer's export of
        ``step`` that arrives within --teacher_timeout and passes every check (gather_present); the
        group's leader reads them and broadcasts the result to the group's other ranks. Returns
        (weights, None) or (None, outcome) when settling the own export stops the run."""
        s = self.students[0]
        outcome = self.settle()  # this group's export of ``step`` is complete (or failed) before peers wait on it
        if outcome:
            return None, outcome
        own = read_masters(s.engine)  # a collective of the group
        present = None
        if s.leader:
            exp_shapes, names = expected_shapes(s.engine), list(own)
            if (s.id, step) not in self.failed:
                try:
                    own = read_peer(self.run.group(s.id).exports, s.id, step, self.cfg_hash, self.tok_hash,
                                    exp_shapes, names)  # the same bits the peers read
                except ExportError as e:
                    self.log(f"WARNING: [group {s.id}] step {step}: own export unreadable, averaging the masters ({e})")
            pending, arrived = set(self.topo.peers(s.id)), {}
            deadline = time.monotonic() + self.flags.teacher_timeout
            while True:
                for p in sorted(pending):
                    try:
                        latest = read_latest(self.run.group(p).exports, missing_ok=True)
                    except ExportError:
                        latest = None
                    if latest is not None and latest >= step:
                        arrived[p] = self.run.group(p).exports
                        pending.discard(p)
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(self.flags.poll_interval)
            for p in sorted(pending):
                self.log(f"WARNING: [group {s.id}] step {step}: group {p}'s export of step {step} did not arrive "
                         f"within --teacher_timeout {self.flags.teacher_timeout:g} s; averaging without it")
            present, groups, _ = gather_present(own, s.id, arrived, step, self.cfg_hash, self.tok_hash, exp_shapes,
                                                self.log)
            for p in groups:
                if p != s.id:
                    self.bytes[s.id].was_read(p, self.run.group(p).exports, step)
            self.log(f"[group {s.id}] step {step}: --peer_use {self.peer_use} over groups {groups}")
        if s.dp_size > 1:  # the leader's weights to the group's other ranks (broadcast_weights)
            n = s.comm.agree([len(present) if s.leader else 0])[0]
            shapes = {k: t.shape for k, t in own.items()}
            present = [broadcast_weights(present[i] if s.leader else None, shapes, s.comm.src, s.dp_group,
                                         s.comm.device) for i in range(n)]
        return present, None

    def _count_bytes(self, step: int, failed: list[bool]) -> None:
        """After the exports of ``step`` are settled: bytes each hosted group's leader wrote and (average,
        diloco: what reading its peers' exports of that step moves; in one launch the weights come from the
        engines) read; TensorBoard exchange/bytes_written, exchange/bytes_read (cumulative)."""
        for s in self.students:
            if not s.leader:
                continue
            b = self.bytes[s.id]
            if not failed[s.id]:
                b.wrote(self.run.group(s.id).exports, step)
            if self.averaging and self.topo.all_groups_here:  # separate launches count what they read
                for p in self.topo.peers(s.id):
                    if not failed[p]:
                        b.was_read(p, self.run.group(p).exports, step)
            self._log_bytes(s, step)

    def _log_bytes(self, s, step: int) -> None:
        if s.writer:
            b = self.bytes[s.id]
            s.writer.scalar("exchange/bytes_written", float(b.written), step)
            s.writer.scalar("exchange/bytes_read", float(b.read), step)

    def summary(self, group: int, steps: int) -> dict:
        """summary.json's exchange totals of ``group`` over ``steps`` steps."""
        b = self.bytes[group]
        per_step = b.record()["exchange/dp_allreduce_bytes_per_step"]
        return {"peer_use": self.peer_use, "averaging_rounds": steps // self.K if self.averaging else 0,
                "exchange_bytes": {"written": b.written, "read": b.read, "total": b.written + b.read,
                                   "allreduce_equiv_bytes_per_step": per_step,
                                   "allreduce_equiv_bytes": per_step * steps}}

    # ---- the step -------------------------------------------------------------------------
    def _swap(self, updates: dict, agree: bool = True) -> None:
        before = dict(self.pool.steps)
        self.pool.swap(updates, agree)
        if self.loader:  # copied into the teachers: the loader may read into these buffers again
            for _, exp in updates.values():
                if exp is not None:
                    self.loader.buffers.give(exp)
        for p in updates:
            if self.pool.steps.get(p) != before.get(p):
                self.guard.on_swap(p)
        for p, (tstep, exp) in updates.items():  # distill: the teachers' exports this reader read
            if exp is None or self.pool.steps.get(p) != tstep:
                continue
            for s in self.students:
                if s.leader and p in self.topo.peers(s.id):
                    try:
                        self.bytes[s.id].was_read(p, self.run.group(p).exports, tstep)
                    except OSError:  # pruned since it was read: count what it held
                        self.bytes[s.id].read += sum(t.numel() * t.element_size() for t in exp.state_dict.values())

    def before_step(self, step: int) -> float:
        """Teacher swaps due before ``step``; returns their milliseconds (loader waits included)."""
        if not self.peers:
            return 0.0
        t0 = time.perf_counter()
        if self.sync:
            swap, prefetch = sync_schedule(step, self.K)
            if swap is not None:
                due = [p for p in self.peers if (p, swap) not in self.failed]  # failed (warned): keep, no wait
                self._swap({p: (swap, self.loader.wait(p, swap, self.flags.teacher_timeout)
                                if self.loader else None) for p in due})
            if prefetch is not None and self.loader:
                for p in self.peers:
                    self.loader.want(p, prefetch)
            return (time.perf_counter() - t0) * 1e3 if swap is not None else 0.0
        if not self._swaps:
            return 0.0
        self._swap({p: (t, self._held.pop(p, None)) for p, t in self._swaps.items()}, agree=False)
        self._swaps = {}
        return (time.perf_counter() - t0) * 1e3

    def announce(self) -> dict[tuple[int, int], int]:
        """Latest teachers: (group, peer) -> export step this leader swaps in at the next step."""
        if self.sync or not self.loader:
            return {}
        for p in self.peers:
            exp = self.loader.take(p)
            if exp is not None:
                self._held[p] = exp
        return {(s.id, p): self._held[p].step for s in self.students for p in self.topo.peers(s.id)
                if p in self._held}

    def after_sync(self, out: StepOutcome, step: int) -> None:
        self._swaps = {p: t for (g, p), t in out.swaps.items() if g in self.topo.hosted}
        self.guard.apply(out.drops or {}, self.pool.steps, step)

    def observe(self, student: int, st) -> None:
        """The step's teacher health, for the quality guard (codistill/teachers/health.py)."""
        self.guard.observe(student, st.ce, st.teacher_ce, st.teacher_nonfinite)

    # ---- exports --------------------------------------------------------------------------
    def maybe_export(self, step: int) -> str | None:
        """Publish every hosted group's weights at export steps; an outcome ("write_error",
        "diverged") when the previous export's write makes the run stop, else None."""
        if not (self.exporting and step % self.K == 0):
            return None
        outcome = self.settle()
        for s in self.students:
            sd = s.full_state_dict()  # a collective of the group under ZeRO-3; host copies on the leader
            if self.averaging:  # what peers average: the fp32 masters, not a bf16 module's rounding of them
                sd = with_masters(s.engine, sd, read_masters(s.engine))  # read_masters: a collective of the group
            if s.leader:
                self.writers[s.id].submit(s.id, step, sd, self.metadata(s))
        self.in_flight = step
        return outcome

    def settle(self) -> str | None:
        """Wait for the exports in flight (before a checkpoint, the next export and the end), warn
        about failed ones, and tell every rank which failed (sync peers skip them)."""
        if self.in_flight is None:
            return None
        step, self.in_flight = self.in_flight, None
        failed, diverged = [False] * self.G, False
        for w in self.writers.values():
            r = w.collect()
            if r is None or r.error is None:
                continue
            if isinstance(r.error, ExportError):  # non-finite weights: never published
                self.log.error(f"[group {r.group}] {r.error}; stopping (lower --lr?)")
                diverged = True
            else:
                failed[r.group] = True
                self.log(f"WARNING: [group {r.group}] export of step {step} failed ({r.error}); peers keep its "
                         f"previous export (LATEST unchanged)", force=True)
        stop_mode = self.stop_on_write_error
        *failed, diverged = flags_any([*failed, diverged], self.device)  # every rank must know
        self.failed |= {(g, step) for g, f in enumerate(failed) if f}
        self._count_bytes(step, failed)
        if diverged:
            return "diverged"
        if stop_mode and any(failed):
            self.log.error(f"an export failed at step {step} and --on_write_error stop: exiting; the run "
                           "resumes from its last checkpoint with --resume auto")
            return "write_error"
        return None

    def close(self) -> None:
        for w in self.writers.values():
            w.collect()
        if self.loader:
            self.loader.close()
