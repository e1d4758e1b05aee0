"""The trainer's own collectives, each on the device its process group works on.

Under NCCL (what ``deepspeed.init_distributed`` picks on CUDA) a process group has no CPU
backend: a collective on a CPU tensor fails with "No backend type associated with device type
cpu". So every tensor the trainer hands to a collective is made here, on ``device`` (the
process's accelerator, or the CPU under gloo). Nothing else in the repository calls
``all_reduce``/``broadcast`` directly.

Host syncs: ``flags_any`` and ``StepControl.sync`` end in one device->host copy each (the
caller needs the answer on the host); ``sum_over`` and ``broadcast_tensors`` do not sync.
"""
from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous; tests and benchmarks use it too)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_defaults() -> None:
    """env:// variables for a process started without a launcher: a 1-rank world on a free port."""
    import os
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def collective_timeout(seconds: float) -> datetime.timedelta:
    """``seconds`` (--dist_timeout) as the timeout of every process group made from now on,
    returned for init_process_group. A group made without a timeout takes the backend's default
    (torch/distributed/distributed_c10d.py _get_default_timeout: the module globals
    default_pg_timeout, 30 min for gloo, and default_pg_nccl_timeout, 10 min), not the world's,
    and DeepSpeed makes its groups that way (deepspeed/utils/groups.py _clone_world_group, the
    data-parallel group of a run whose group is the whole world; comm/torch.py new_group), as
    does topology.build_mpus: so the defaults themselves are set."""
    from torch.distributed import distributed_c10d as c10d
    timeout = datetime.timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def destroy_at_exit() -> None:
    """Destroy the process groups at interpreter exit, while Python is still whole. Without it
    gloo's worker threads may still hold work objects holding tensors when the interpreter is torn
    down, and the process dies with SIGABRT ("terminate called without an active exception") after
    a run that succeeded (seen here under load after 2-rank runs; pytorch/pytorch PR 179291 names
    the cause). A no-op where no group exists or it was destroyed already."""
    import atexit

    def teardown():
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # exiting anyway: never turn a clean exit into a traceback
                pass
    atexit.register(teardown)


def stale_build_locks(before: float) -> list:
    """torch's JIT extension build locks (``<TORCH_EXTENSIONS_DIR>/<python_cpu|cuda>/<op>/lock``)
    made before the time ``before``. DeepSpeed builds its CPU communication op under torch's FileBaton
    (torch/utils/file_baton.py): an O_EXCL file with no owner recorded, which every later start
    polls for ever. A build killed mid-way (an OOM kill, a cancelled job) leaves it behind, and
    nothing says so; a lock this old with no build running is that."""
    import os
    from pathlib import Path
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    out = []
    for lock in root.glob("*/*/lock"):
        try:
            if lock.stat().st_mtime < before:
                out.append(lock)
        except OSError:  # released meanwhile
            pass
    return sorted(out)


def watch_start_up(after_s: float = 120.0, warn=None):
    """A daemon timer that, if start-up (rendezvous + DeepSpeed's op build) still runs after
    ``after_s``, names any build lock made before it started and what to do; cancel it once
    started."""
    import sys
    import threading
    import time
    t0 = time.time()

    def check():
        locks = stale_build_locks(t0)
        if locks:
            msg = (f"warning: still starting after {after_s:.0f} s and waiting on torch extension build lock(s) "
                   f"{', '.join(map(str, locks))}: a build killed mid-way leaves them; if no other run is "
                   f"building now, remove them and start again")
            (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
    t = threading.Timer(after_s, check)
    t.daemon = True
    t.start()
    return t


# What a collective raises on a rank whose peer died or hung past the process-group timeout:
# gloo's transport errors are plain RuntimeErrors ("[.../gloo/transport/tcp/pair.cc:553]
# Connection closed by peer ...", "Timed out waiting ... for recv"); NCCL's are DistBackendError
# (torch/distributed/__init__.py: torch._C._DistBackendError, a DistError). Under NCCL the
# watchdog may instead abort the process after the timeout (init_process_group's docstring in
# torch/distributed/distributed_c10d.py): non-zero either way, and within --dist_timeout.
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "/gloo/")


def lost_rank_message(e: BaseException, rank: int, timeout_s: float) -> str | None:
    """The error line for a collective that failed because another rank of the launch died or
    stopped answering (None if ``e`` is something else)."""
    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError)
                                              and any(m in text.lower() for m in _LOST_PEER))):
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    return (f"rank {rank}: a collective failed ({first[:300]}): another rank of this launch died or did not answer "
            f"within --dist_timeout {timeout_s:g} s; see that rank's log. Exiting 1: training can continue from "
            "the last complete checkpoint with --resume auto")


def device_tensor(values, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` (numbers, or tensors) as one 1-D tensor on ``device``: what a collective takes."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=dtype).reshape(-1)
    return torch.tensor([float(v) for v in values], dtype=dtype, device=device)


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def flags_any(flags: Sequence[bool], device: torch.device, group=None) -> list[bool]:
    """Each flag, true if it is true on any rank of ``group`` (one all-reduce, one host sync)."""
    t = device_tensor(flags, device)
    if _world(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def sum_over(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum of ``t`` (already on the group's device) over the ranks of ``group``."""
    if _world(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int, group=None) -> None:
    """Broadcast every tensor in place from global rank ``src`` over ``group`` (teacher weights:
    the group leader read them, the other ranks of the group receive them)."""
    if _world(group) > 1:
        for t in tensors:
            dist.broadcast(t, src=src, group=group)


@dataclass
class GroupComm:
    """How a rank reaches the other ranks of its group: the leader's global rank, the group's
    process group (None = the whole world), its size and the device collectives run on."""
    device: torch.device
    src: int = 0
    group: object = None
    size: int = 1
    leader: bool = True

    @classmethod
    def single(cls, device: torch.device) -> GroupComm:
        return cls(device)

    def agree(self, values: list[int]) -> list[int]:
        """The leader's ``values`` on every rank of the group (one broadcast, one host sync)."""
        if self.size == 1 or not values:
            return list(values)
        t = device_tensor(values, self.device, torch.int64)
        dist.broadcast(t, src=self.src, group=self.group)
        return [int(v) for v in t.tolist()]

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        if self.size > 1:
            broadcast_tensors(tensors, self.src, self.group)


class StepControl:
    """The one collective and the one host sync of a training step.

    After every hosted group's forward and backward passes (before any optimizer update), each
    rank contributes an int64 vector, all-reduced with MAX over the whole world:

        [0]                       stop requested (SIGTERM/SIGUSR1) on this rank
        [1 + g]                   group g's loss was non-finite on this rank (skip its update)
        [1 + G + g * G + p]       (latest teachers only) group g's leader swaps in peer p's export
                                  of step s at the next step: s + 1 (0 = no swap); the other ranks
                                  of the group follow it
        [1 + G + S + g * G + p]   (teacher guard on) group g's leader's verdict on peer p's teacher:
                                  1 use, 2 dropped (codistill/teachers/health.py); S = the swap slots

    A rank writes only the slots of the groups it hosts, so MAX gives every rank the group-wide
    answer for every group, whatever the topology (one group per launch, a world split, or
    several groups per rank). The rank's own values that need no agreement (the loss of each
    hosted group, for the console) ride along in the same device->host copy.
    """

    def __init__(self, num_groups: int, device: torch.device, swaps: bool = False, guard: bool = False):
        self.G, self.device = num_groups, device
        self.n_swap = num_groups * num_groups if swaps else 0  # slots only where leaders announce swaps
        self.n_drop = num_groups * num_groups if guard else 0  # slots only where leaders judge teachers

    def sync(self, stop: bool, bad: dict[int, torch.Tensor], announce: dict[tuple[int, int], int],
             local: torch.Tensor | None = None, drops: dict[tuple[int, int], int] | None = None) -> StepOutcome:
        G = self.G
        n = 1 + G + self.n_swap + self.n_drop
        ctrl = torch.zeros(n, dtype=torch.int64, device=self.device)
        ctrl[0] = int(stop)
        for g, flag in bad.items():
            ctrl[1 + g] = flag.to(torch.int64)
        for (g, p), step in announce.items():
            ctrl[1 + G + g * G + p] = step + 1
        for (g, p), state in (drops or {}).items() if self.n_drop else ():
            ctrl[1 + G + self.n_swap + g * G + p] = state
        if _world(None) > 1:
            dist.all_reduce(ctrl, op=dist.ReduceOp.MAX)
        parts = [ctrl.double()] + ([local.detach().double().reshape(-1)] if local is not None else [])
        vals = torch.cat(parts).tolist()  # the step's host sync
        swaps = {divmod(i, G): int(v) - 1 for i, v in enumerate(vals[1 + G:1 + G + self.n_swap]) if v > 0}
        drops = {divmod(i, G): int(v) for i, v in enumerate(vals[1 + G + self.n_swap:n]) if v > 0}
        return StepOutcome(stop=bool(vals[0]), bad=[bool(v) for v in vals[1:1 + G]], swaps=swaps, local=vals[n:],
                           drops=drops)


@dataclass(frozen=True)
class GroupSync:
    """The named layout of one hosted group's values in the step's sync (``StepControl.sync``'s
    ``local``: rank-local, not reduced, read on the host after the one device->host copy). Every
    writer and reader goes through it: Student.stats_for_sync / finish_step, TeacherPool.probs
    (the health part) and the trainer's split of ``StepOutcome.local`` per hosted group.

        [norm_step, norm, loss, ce, distill, agreement, distill_ce,   (HEAD: 7 values)
         teacher ce per slot ..., teacher non-finite per slot ...]    (HEALTH: 2 x slots)

    A slot per peer group (its id) plus one for the fixed teacher (--teacher, id -1): G + 1.
    ``norm_step`` is -1 when no gradient norm is pending."""
    num_groups: int
    HEAD = ("norm_step", "norm", "loss", "ce", "distill", "agreement", "distill_ce")
    STATS = HEAD[2:]  # the loss statistics Student.forward_backward averages over micro-batches

    @property
    def slots(self) -> int:
        return self.num_groups + 1

    @property
    def width(self) -> int:
        return len(self.HEAD) + self.health_width

    @property
    def health_width(self) -> int:
        return 2 * self.slots

    def slot(self, teacher: int) -> int:
        """The slot of peer group ``teacher`` (-1: the fixed teacher, after the peers)."""
        return teacher if teacher >= 0 else self.num_groups

    def health_ce(self, teacher: int) -> int:
        """Index, within the health part, of ``teacher``'s cross-entropy on the student's targets."""
        return self.slot(teacher)

    def health_nonfinite(self, teacher: int) -> int:
        """Index, within the health part, of whether ``teacher``'s probabilities were non-finite."""
        return self.slots + self.slot(teacher)

    def split(self, local: list[float], index: int) -> dict:
        """The ``index``-th hosted group's values of ``local``, by name: the HEAD names, and
        ``health`` (the list of 2 x slots values, read with health_ce / health_nonfinite)."""
        part = local[self.width * index:self.width * (index + 1)]
        return {**dict(zip(self.HEAD, part)), "health": part[len(self.HEAD):]}


@dataclass
class StepOutcome:
    stop: bool                          # some rank was asked to stop
    bad: list[bool]                     # per group: skip this step's update
    swaps: dict[tuple[int, int], int]   # (group, peer) -> export step its leader swaps in next
    local: list[float]                  # this rank's values passed as ``local``
    drops: dict = None                  # (group, peer) -> teacher state its leader announced (codistill/teachers/health.py)
