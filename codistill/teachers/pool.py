"""The in-memory teacher modules of one rank: built frozen, loaded from a peer's export between
steps, and run for the step's soft targets (TeacherPool).

Where their weights live: codistill/teachers/placement.py. How exports reach them: codistill/teachers/loader.py.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from codistill.comm import GroupComm, GroupSync
from codistill.exports import (
    Export,
)
from codistill.loss import TopK, chunk_rows, topk_of
from codistill.teachers.placement import FullTeacher, OffloadedTeacher, PartitionedTeacher, teacher_ds_config
from model import ModelConfig, build_model
from model.lstm import CarriedState


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
    their weights live is the ``placement`` (codistill/teachers/placement.py): "full" on the device,
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
        a floating dtype stands for fp32/bf16/fp16: codistill/exports.py check_specs)."""
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
