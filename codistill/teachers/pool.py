"""The in-memory teacher modules of one rank: built frozen, loaded from a peer's export between
steps, and run for the step's soft targets (TeacherPool).

Where their weights live: codistill/teachers/placement.py. How exports reach them: codistill/teachers/loader.py.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import torch

from codistill.comm import GroupComm, GroupSync
from codistill.exports import CudaPinning, Export, pinned_copies
from codistill.loss import TopK, chunk_rows, topk_of
from codistill.teachers.placement import FullTeacher, OffloadedTeacher, PartitionedTeacher, teacher_ds_config
from fileio import ExportError
from model import ModelConfig, build_model
from model.lstm import CarriedState

# Building a model sets torch's process-wide default dtype for a while (build_frozen; transformers'
# from_config): builds on the training thread and the loader's (TeacherPool.expect) take turns.
BUILD_LOCK = threading.Lock()


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
                 dtype: torch.dtype = torch.float32, pin: CudaPinning | None = None) -> torch.nn.Module:
    """A frozen copy of the architecture, built directly on ``device`` in its working dtype
    (``pin``: on the CPU, its parameters in one exactly sized block of pinned memory registered by
    ``pin`` - exports.pinned_copies - for a teacher offloaded from a CUDA device).

    With ``like`` (the student's module, as its DeepSpeed engine holds it) every parameter and
    buffer gets the dtype the student's tensor of the same name has: DeepSpeed's bf16 casts
    parameters and leaves buffers (the Transformer's RoPE ``inv_freq``) in fp32, and a teacher
    must compute what the student computes. ``module.to(dtype)`` would cast both.
    """
    dtype, dtypes = working_dtypes(like, dtype)
    with BUILD_LOCK:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters are created in ``dtype``; buffers computed in fp32 stay fp32
        try:
            with torch.device(device):
                module = build_model(model_config)
        finally:
            torch.set_default_dtype(prev)
    def want(n, t):
        return dtypes.get(n, dtype if isinstance(t, torch.nn.Parameter) else t.dtype) if t.is_floating_point() \
            else t.dtype

    named = [*module.named_parameters(), *module.named_buffers()]  # tied weights once
    if pin is not None:
        params = list(module.named_parameters())
        views, module._pinned_block = pinned_copies([(t.data, want(n, t)) for n, t in params], pin)
        for (_, t), v in zip(params, views):
            t.data = v
        named = list(module.named_buffers())  # buffers: moved to the device by OffloadedTeacher
    for n, t in named:
        if t.dtype != want(n, t):
            t.data = t.data.to(want(n, t))
    return module.eval().requires_grad_(False)


def declared_config(meta: dict, own: ModelConfig, where: str) -> ModelConfig:
    """The model an export (or final/) declares in its metadata, for a teacher built from it
    (--peer_models any): a valid model config whose hash is the one the metadata gives, on this
    student's vocabulary (the tokenizer itself is checked by its sha256). Raises ExportError."""
    d = meta.get("model_config")
    if not isinstance(d, dict):
        raise ExportError(f"{where}: its metadata declares no model_config")
    try:
        cfg = ModelConfig.from_dict(d)
        digest = cfg.config_hash()
    except Exception as e:  # noqa: BLE001 - any malformed declaration is the peer's fault, refused
        raise ExportError(f"{where}: its model_config is not a valid model config ({type(e).__name__}: {e})") from None
    if digest != meta.get("model_config_hash"):
        raise ExportError(f"{where}: its model_config hashes to {digest}, not to the model_config_hash "
                          f"{meta.get('model_config_hash')!r} it claims; its metadata contradicts itself")
    if cfg.vocab_size != own.vocab_size:
        raise ExportError(f"{where}: its model has a vocabulary of {cfg.vocab_size}, this student's {own.vocab_size}: "
                          "teacher and student must share the tokenizer")
    return cfg


def tensor_specs(config: ModelConfig) -> dict[str, tuple]:
    """Tensor name -> (shape, dtype) of ``config``'s weights, from a build on the meta device."""
    with BUILD_LOCK, torch.device("meta"):
        module = build_model(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


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

    ``peer_models`` "same": every teacher is the student's ``model_config`` (built up front by
    ``reserve``); "any": each teacher is the model its export declares (``declared_config``),
    built when the first export of that model arrives and rebuilt if a peer changes model; the
    group's leader tells its other ranks the model with the weights (``swap``).
    """

    def __init__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32,
                 like: torch.nn.Module | None = None, comm: GroupComm | None = None, placement: str = "full",
                 mpu=None, ds_config: dict | None = None, topk: int = 0, chunk_mb: float = 32.0,
                 peer_models: str = "same"):
        if placement not in ("full", "partition", "offload"):
            raise ValueError(f"teacher placement must be full, partition or offload, got {placement!r}")
        if peer_models not in ("same", "any"):
            raise ValueError(f"peer_models must be same or any, got {peer_models!r}")
        self.model_config, self.device, self.dtype, self.like = model_config, device, dtype, like
        self.peer_models = peer_models
        self.configs: dict[int, ModelConfig] = {}  # peer -> the model its (spare) teacher is built as
        self._specs: dict[str, dict[str, tuple]] = {}  # config hash -> tensor_specs
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

    def expected_shapes(self, config: ModelConfig | None = None) -> dict[str, tuple]:
        """Tensor name -> (shape, dtype) an export of ``config`` (default: the student's model) must
        have to be swapped in (a floating dtype stands for fp32/bf16/fp16: codistill/exports.py
        check_specs). Cached per model."""
        config = config or self.model_config
        key = config.config_hash()
        if key not in self._specs:
            self._specs[key] = tensor_specs(config)
        return self._specs[key]

    @property
    def config_hash(self) -> str | None:
        """The model config hash a teacher's export must declare (None: any model, --peer_models any)."""
        return self.model_config.config_hash() if self.peer_models == "same" else None

    @property
    def expect(self):
        """What an export's tensors must be (the readers' ``expect``): the student's model's tensors,
        or (--peer_models any) a function of the export's metadata giving its declared model's."""
        if self.peer_models == "same":
            return self.expected_shapes()
        return lambda meta, where: self.expected_shapes(declared_config(meta, self.model_config, where))

    def config_of(self, export: Export) -> ModelConfig:
        """The model ``export``'s teacher is (validated by its reader)."""
        if self.peer_models == "same":
            return self.model_config
        return declared_config(export.meta, self.model_config, f"step {export.step}")

    def _build(self, config: ModelConfig):
        if self.placement == "partition":
            t = PartitionedTeacher(lambda: build_model(config), teacher_ds_config(self.ds_config), self.mpu,
                                   dtypes=working_dtypes(self.like, self.dtype)[1])
        elif self.placement == "offload":
            pin = CudaPinning(self.device.index) if self.device.type == "cuda" else None
            t = OffloadedTeacher(build_frozen(config, torch.device("cpu"), self.like, self.dtype, pin), self.device)
        else:
            t = FullTeacher(build_frozen(config, self.device, self.like, self.dtype))
        if self.topk and config.arch == "hf":
            check_head_only(t, config, self.device)
        return t

    def reserve(self, peers: list[int], config: ModelConfig | None = None) -> None:
        """Build the peers' teachers (as ``config``, default the student's model) up front, so that
        a swap is only a copy of weights; a teacher built as another model is rebuilt. With
        --peer_models any a teacher is built when its model is known (``config`` given)."""
        if config is None and self.peer_models == "any":
            return
        config = config or self.model_config
        for peer in peers:
            if peer not in self._spare or self.configs[peer] != config:
                self._spare.pop(peer, None)
                self.teachers.pop(peer, None)
                self._spare[peer], self.configs[peer] = self._build(config), config

    def load(self, peer: int, export: Export, fixed: bool = False) -> float:
        """Swap ``export`` into the peer's teacher; returns the milliseconds it took. On this rank
        alone, except for a partitioned teacher (collective over the group: every rank calls it,
        the leader's weights are used). A ``fixed`` teacher (``--teacher PATH``) is never stale:
        it is not a peer that stopped publishing."""
        t0 = time.perf_counter()
        if fixed:
            self.fixed.add(peer)
        self.reserve([peer], self.config_of(export))
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
        configs = self._agree_configs(peers, steps, updates)
        for p, step in zip(peers, steps):
            if step < 0:
                continue
            exp = updates[p][1]
            self.reserve([p], configs[p])
            teacher = self._spare[p]
            with torch.no_grad():
                teacher.receive(exp.state_dict if exp is not None else None, self.comm)
            self.teachers[p], self.steps[p] = teacher, step
        return (time.perf_counter() - t0) * 1e3

    def _agree_configs(self, peers, steps, updates) -> dict[int, ModelConfig | None]:
        """Peer -> the model of the export swapped in (None: the student's model, --peer_models
        same). --peer_models any: the leader's, told to the group's other ranks with one object
        broadcast (a swap is rare: every --export_every steps)."""
        if self.peer_models == "same":
            return {p: None for p in peers}
        mine = [self.config_of(updates[p][1]).to_dict() if s >= 0 and self.comm.leader else None
                for p, s in zip(peers, steps)]
        if self.comm.size > 1:
            box = [mine]
            torch.distributed.broadcast_object_list(box, src=self.comm.src, group=self.comm.group)
            mine = box[0]
        return {p: ModelConfig.from_dict(d) if d is not None else None for p, d in zip(peers, mine)}

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
        kw = {p: self._carried(p, states) if states is not None and self.configs[p].arch == "lstm" else {}
              for p in peers}  # a Transformer teacher of an LSTM student sees each window on its own
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
