"""What a run shows while it runs: console lines and TensorBoard scalars (written here, and read
back by tests, benchmarks and plots through ``read_events``). What it leaves behind (final/,
summary.json): codistill/outputs.py."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class Console:
    """Prints from global rank 0, or from every group leader with a group prefix."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, msg: str, force: bool = False) -> None:
        if self.rank == 0 or force:
            print(msg, flush=True)

    def error(self, msg: str) -> None:
        if self.rank == 0:
            print(f"error: {msg}", file=sys.stderr, flush=True)

    def warning(self, msg: str) -> None:
        if self.rank == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)


class TBWriter:
    """torch's SummaryWriter, created lazily so that ranks that log nothing write no files."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.w.add_scalar(tag, value, step)

    def close(self) -> None:
        self.w.flush()
        self.w.close()


@dataclass
class StepStats:
    """One group's training step as the logs show it (host values, after the step's sync)."""
    loss: float             # ce + alpha * distill: the optimised loss less the constant alpha * T^2 H(teacher)
    ce: float
    distill: float          # KL(teacher || student) (0 without a teacher)
    agreement: float        # top-1 agreement with the averaged teacher (nan without one)
    distill_ce: float       # the cross entropy against the teacher that is optimised (= distill + T^2 H(teacher))
    alpha: float
    lr: float
    step_time: float        # seconds: this group's passes and update, plus the step's sync
    peers: list = field(default_factory=list)  # the teachers used
    skipped: bool = False
    skipped_steps: int = 0
    teacher_ce: dict = field(default_factory=dict)         # peer -> its cross entropy on this batch's targets
    teacher_nonfinite: dict = field(default_factory=dict)  # peer -> its probabilities were non-finite (left out)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_train(g, step: int, st: StepStats, pool, reload_ms: float, log, log_every: int, max_steps: int,
              t_start: float, start_step: int) -> None:
    tok_s = g.step_tokens / st.step_time if st.step_time > 0 else 0.0
    w = g.writer
    if w:
        w.scalar("train/loss", st.loss, step)
        w.scalar("train/ce", st.ce, step)
        w.scalar("train/distill", st.distill, step)
        w.scalar("train/distill_ce", st.distill_ce, step)
        w.scalar("train/ppl", math.exp(min(st.ce, 50)), step)
        w.scalar("train/alpha", st.alpha, step)
        w.scalar("lr", st.lr, step)
        w.scalar("perf/tokens_per_s", tok_s, step)
        w.scalar("perf/step_time", st.step_time, step)
        w.scalar("perf/tokens_seen", g.tokens_seen, step)
        w.scalar("train/skipped_steps", st.skipped_steps, step)
        peers = [p for p in st.peers if p not in pool.fixed]  # a --teacher PATH is not stale
        if st.peers:
            w.scalar("teacher/agreement", st.agreement, step)
        if peers:
            for p in peers:
                w.scalar(f"teacher/step/group_{p}", pool.steps[p], step)
            w.scalar("teacher/step", min(pool.steps[p] for p in peers), step)
            w.scalar("teacher/staleness", max(step - pool.steps[p] for p in peers), step)
        loaded = [p for p in pool.steps if p != g.id and p not in pool.fixed]
        if loaded and st.alpha > 0:  # also for teachers dropped by --max_teacher_staleness
            for p in loaded:
                w.scalar(f"teacher/staleness/group_{p}", step - pool.steps[p], step)
            w.scalar("teacher/num_peers", len(peers), step)
        if reload_ms:
            w.scalar("teacher/reload_ms", reload_ms, step)
        for p, ce in st.teacher_ce.items():
            w.scalar(f"teacher/ce/group_{p}", ce, step)
        if st.teacher_ce:
            w.scalar("teacher/nonfinite", sum(st.teacher_nonfinite.values()), step)
            w.scalar("teacher/dropped", len(st.teacher_ce) - len(st.peers), step)
    if g.leader and (step % log_every == 0 or step == max_steps):
        elapsed = time.time() - t_start
        eta = elapsed / max(1, step - start_step) * (max_steps - step)
        teacher = ",".join("fixed" if p in pool.fixed else f"g{p}@{pool.steps[p]}" for p in st.peers) or "-"
        log(f"[group {g.id}] step {step}/{max_steps} | loss {st.loss:.4f} ce {st.ce:.4f} "
            f"kl {st.distill:.4f} | ppl {math.exp(min(st.ce, 50)):.1f} | teachers {teacher} | "
            f"{tok_s / 1e3:.1f}k tok/s | eta {fmt_time(eta)}", force=True)


def log_eval(g, step: int, loss: float, ppl: float, log) -> None:
    if g.writer:
        g.writer.scalar("val/loss", loss, step)
        g.writer.scalar("val/ppl", ppl, step)
        g.writer.scalar("val/ppl_vs_tokens", ppl, g.tokens_seen)
        g.writer.w.flush()
    if g.leader:
        log(f"[group {g.id}] step {step} | val loss {loss:.4f} | val ppl {ppl:.2f}", force=True)


def read_events(tb_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """tag -> [(wall time, step, value)] by step, from every event file in ``tb_dir``, through
    TensorBoard's own reader (a later file wins for a step written twice, e.g. after resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[str, dict[int, tuple]] = {}
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            d = out.setdefault(tag, {})
            for e in ea.Scalars(tag):
                d[e.step] = (e.wall_time, e.step, e.value)
    return {tag: [d[s] for s in sorted(d)] for tag, d in out.items()}


def read_scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of ``tag`` in ``tb_dir``."""
    return {s: v for _, s, v in read_events(tb_dir).get(tag, [])}
