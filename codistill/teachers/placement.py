"""Where a teacher's weights live on a rank: whole on the device, partitioned over the group
(ZeRO-3), or in host memory streamed to the device one submodule at a time.

A teacher is a frozen copy of the architecture that a student runs in inference mode on its
own batch. Each placement answers the same four questions for TeacherPool:

- ``receive(state_dict | None, comm)``: new weights. Collective over the group: the group's
  leader has the export (``state_dict``), the other ranks get None and receive it from the
  leader - by a broadcast of every tensor (full, offloaded), or submodule by submodule inside
  ``deepspeed.zero.GatheredParameters(modifier_rank=0)`` (partitioned: a rank never holds more
  of the teacher than its own partition plus one submodule gathered);
- ``__call__(input_ids, hidden_only=False, **kw)``: the forward (logits, or the states before the
  output head for top-K teacher probabilities, which apply the head chunk by chunk); ``kw`` go
  to the model (an LSTM teacher's carried ``state``, model/lstm.py);
- ``head_weight()``: a context yielding the output head's weight on the device;
- ``resident_bytes()``: the bytes of teacher weights this rank holds on its device between
  forwards (for logs, tests and benchmarks/teacher_memory.py).

Placements (``--teacher_partition``, ``--teacher_offload cpu``):

    full        every rank holds the whole teacher on its device: (G-1) x P x 2 bytes in bf16
    partition   a DeepSpeed ZeRO-3 engine without an optimizer (as DeepSpeed-Chat runs its frozen
                reference model) over the student's own group: P x 2 / ranks bytes per rank,
                gathered layer by layer for the forward (one more all-gather per layer and step)
    offload     weights in host memory (pinned on CUDA); each submodule's parameters are copied
                to the device by a forward pre-hook and dropped after its forward: the device
                holds one submodule at a time, every forward moves P x 2 bytes over PCIe. On a
                CPU device the "copy" is a host memcpy: the mechanism runs, nothing is saved.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from codistill.comm import GroupComm


def unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's persistent state, each storage once (tied embeddings are one tensor)."""
    seen, out = set(), []
    for t in module.state_dict(keep_vars=True).values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t.data)
    return out


def output_head(module: nn.Module) -> nn.Linear:
    """The output projection of one of our models (model/: LSTMLM, TransformerLM, HFCausalLM)."""
    inner = getattr(module, "module", module)  # a DeepSpeed engine wraps the model
    return inner.output_head()


class FullTeacher:
    """The whole teacher on the device (the default)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, input_ids, hidden_only: bool = False, **kw):
        return self.module(input_ids, hidden_only=hidden_only, **kw)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: t.data for k, t in self.module.state_dict(keep_vars=True).items()}

    def receive(self, state_dict: dict | None, comm: GroupComm) -> None:
        if state_dict is not None:
            for k, t in self.state_tensors().items():
                t.copy_(state_dict[k], non_blocking=True)  # from pinned memory on a GPU: no wait
        if comm.size > 1:
            comm.broadcast(unique_tensors(self.module))

    @contextlib.contextmanager
    def head_weight(self):
        yield output_head(self.module).weight

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in unique_tensors(self.module))


class OffloadedTeacher(FullTeacher):
    """Weights in host memory; a submodule's parameters are on the device only during its forward.

    Every submodule that owns parameters gets a forward pre-hook that points them at device
    copies of their host tensors and a forward hook that drops them again. The host tensors are
    the teacher's storage: ``receive`` writes into them. Per forward every parameter crosses to
    the device once (``bytes_moved`` counts the bytes copied, for tests and benchmarks):

    - a tied matrix (an embedding that is also the output head) is fetched at its first use and
      kept until the forward ends (after a ``hidden_only`` forward, until ``head_weight`` has
      used it), not fetched again by the second submodule that owns it;
    - on CUDA the next submodule's copy is queued on a side stream while the current one
      computes (the order is the one the previous forward of the same kind ran in), from
      pinned memory; the compute stream waits for its event before using it, and the copies
      are marked as used by the compute stream (``record_stream``) so that the caching
      allocator does not hand their memory out again before the kernels that read them ran
      (c10/cuda/CUDACachingAllocator.cpp: a block is reused once every stream it was
      recorded on has passed its free). On a CPU device the fetch stays synchronous
      (``prefetch=True`` runs the same bookkeeping there with synchronous copies, for tests).
    """

    def __init__(self, module: nn.Module, device: torch.device, prefetch: bool | None = None):
        super().__init__(module)  # built on the CPU (pinned when the device is CUDA)
        self.device = device
        self.params = {id(p): p for p in module.parameters()}
        self.host = {i: p.data for i, p in self.params.items()}
        self.empty = torch.empty(0, device=device)
        for _name, b in module.named_buffers():  # small (RoPE frequencies): stay on the device
            b.data = b.data.to(device)
        owners: dict[int, int] = {}
        for sub in module.modules():
            own = list(sub.parameters(recurse=False))
            if own:
                for p in own:
                    owners[id(p)] = owners.get(id(p), 0) + 1
                sub.register_forward_pre_hook(self._fetch)
                sub.register_forward_hook(self._drop)
        self.shared = {i for i, n in owners.items() if n > 1}  # tied: owned by several submodules
        self.bytes_moved = 0
        self.prefetched_bytes = 0  # of bytes_moved, those copied ahead of their submodule's forward
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        self.stream = torch.cuda.Stream(device) if self.prefetch and device.type == "cuda" else None
        self._held: dict[int, torch.Tensor] = {}  # shared parameters fetched in this forward
        self._order: dict[bool, list] = {}  # hidden_only -> submodules in the order their forwards ran
        self._trace: list = []
        self._hidden_only = False
        self._prefetched: dict[int, tuple] = {}  # id(submodule) -> (event, {id(p): device tensor})
        self._release()

    def __call__(self, input_ids, hidden_only: bool = False, **kw):
        self._release()
        self._trace, self._hidden_only, self._prefetched = [], hidden_only, {}
        out = self.module(input_ids, hidden_only=hidden_only, **kw)
        self._order.setdefault(hidden_only, self._trace)
        # the head's weight (tied: the embedding) stays fetched for head_weight after a body-only forward
        self._release(keep=id(output_head(self.module).weight) if hidden_only else None)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters(remove_duplicate=False))
        return {k: self.host[id(params[k])] if k in params else t.data
                for k, t in self.module.state_dict(keep_vars=True).items()}

    def _copy(self, i: int) -> torch.Tensor:
        host = self.host[i]
        self.bytes_moved += host.numel() * host.element_size()
        return host.to(self.device, non_blocking=True, copy=True)  # from pinned memory: no host wait

    def _fetch(self, sub, args):
        self._trace.append(sub)
        event, ready = self._prefetched.pop(id(sub), (None, {}))
        if event is not None:  # CUDA: copied on the side stream
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in ready.values():
                t.record_stream(compute)
        for p in sub.parameters(recurse=False):
            t = self._held.get(id(p))
            if t is None:
                t = ready[id(p)] if id(p) in ready else self._copy(id(p))
                if id(p) in self.shared:
                    self._held[id(p)] = t
            p.data = t
        if self.prefetch:
            self._prefetch_next(sub)

    def _prefetch_next(self, sub) -> None:
        """Queue the copies of the submodule that ran after ``sub`` last time on the side stream."""
        order = self._order.get(self._hidden_only)
        i = len(self._trace) - 1
        if order is None or i + 1 >= len(order) or order[i] is not sub:
            return  # the first forward of its kind (the order is being recorded), the last submodule, or another path
        nxt = order[i + 1]
        if id(nxt) in self._prefetched:
            return
        event = None
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            ready = {id(p): self._copy(id(p)) for p in nxt.parameters(recurse=False) if id(p) not in self._held}
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.prefetched_bytes += sum(t.numel() * t.element_size() for t in ready.values())
        self._prefetched[id(nxt)] = (event, ready)

    def _drop(self, sub, args, out):
        for p in sub.parameters(recurse=False):
            if id(p) not in self.shared:
                p.data = self.empty

    def _release(self, keep: int | None = None) -> None:
        """Every parameter off the device; the shared one ``keep`` stays fetched for head_weight."""
        for _i, p in self.params.items():
            p.data = self.empty
        self._held = {i: t for i, t in self._held.items() if i == keep}

    def _sync(self) -> None:
        """Wait for copies still reading the host tensors (CUDA) before they are written."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive(self, state_dict: dict | None, comm: GroupComm) -> None:
        self._sync()
        self._release()
        tensors = self.state_tensors()
        if state_dict is not None:
            for k, t in tensors.items():
                t.copy_(state_dict[k])
        if comm.size > 1:  # through the device (NCCL moves device memory), one tensor at a time
            seen = set()
            for t in tensors.values():
                if t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                staged = t.to(comm.device, copy=True)
                comm.broadcast([staged])
                t.copy_(staged)

    @contextlib.contextmanager
    def head_weight(self):
        """The head's weight on the device: the one the body-only forward kept (tied), else a copy."""
        i = id(output_head(self.module).weight)
        w = self._held.pop(i, None)
        yield w if w is not None else self._copy(i)

    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.module.buffers())


class PartitionedTeacher:
    """A ZeRO-3 inference engine over the group's ranks: each rank keeps 1/ranks of every
    parameter; DeepSpeed gathers a submodule's parameters for its forward and frees them after."""

    def __init__(self, build, ds_config: dict, mpu, dtypes: dict[str, torch.dtype] | None = None):
        """``build()`` makes the module; its parameters get the config's dtype (bf16 when the
        student's is): zero.Init is given no dtype (DeepSpeed 0.19 turns an explicit one into
        bf16 on a CPU). Its buffers get the dtype the student's buffer of the same name has
        (``dtypes``; DeepSpeed's bf16 leaves a student's buffers in fp32):

        - zero.Init wraps torch.arange and casts its floating results to the run's dtype
          (deepspeed/runtime/zero/partition_parameters.py, zero_wrapper_for_fp_tensor_constructor,
          installed by _add_tensor_creation_wrappers), so a Llama ``inv_freq`` - 1 / base **
          (arange(0, d, 2, dtype=float) / d) - would be computed from bf16 positions: a RoPE phase
          error growing with the distance (~0.2 rad at 1000 tokens), another function than the
          student's. transformers guards its own ZeRO-3 path the same way
          (transformers/integrations/deepspeed.py prevent_arange_dtype_change, entered before
          zero.Init);
        - any other buffer built in the run's dtype is cast to the student's afterwards (exact
          for the constants such buffers hold; persistent ones are overwritten by ``receive``).

        No memory-efficient linear: it would replace torch.nn.functional.linear with a Python
        autograd.Function for the whole process, the student's layers included. zero.Init's
        ``mem_efficient_linear`` argument is overridden by the config's
        ``zero_optimization.memory_efficient_linear`` (default true; partition_parameters.py
        Init.__init__), so teacher_ds_config sets that to false."""
        import deepspeed
        import torch._dynamo  # noqa: F401  (imported inside zero.Init, whose patched Tensor.__new__ it rejects)
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
        group = mpu.get_data_parallel_group() if mpu is not None else None  # None: the whole world
        with prevent_arange_dtype_change(), deepspeed.zero.Init(
                data_parallel_group=group, config_dict_or_path=ds_config, mpu=mpu, mem_efficient_linear=False):
            module = build()  # partitioned as it is built: the full teacher never exists on a rank
        for n, b in module.named_buffers():
            want = (dtypes or {}).get(n, torch.float32)
            if b.is_floating_point() and b.dtype != want:
                b.data = b.data.to(want)
        from codistill.device import engine_args  # the device zero.Init bound (cuda:LOCAL_RANK, codistill/device.py)
        here = torch.device(deepspeed.accelerator.get_accelerator().current_device_name())
        self.engine, *_ = deepspeed.initialize(args=engine_args(here), model=module, config=ds_config, mpu=mpu)
        self.engine.eval()
        self.module = self.engine.module.requires_grad_(False)
        self.keys = set(self.module.state_dict().keys())

    def __call__(self, input_ids, hidden_only: bool = False, **kw):
        return self.engine(input_ids, hidden_only=hidden_only, **kw)

    def receive(self, state_dict: dict | None, comm: GroupComm) -> None:
        """Leader's weights into every rank's partitions, one submodule at a time: DeepSpeed
        gathers it, the leader (data-parallel rank 0 of the group) writes, and on exit DeepSpeed
        broadcasts from it and partitions again."""
        import deepspeed
        done = set()
        names = {id(p): n for n, p in self.module.named_parameters()}
        for prefix, sub in self.module.named_modules():
            params = [p for p in sub.parameters(recurse=False) if id(p) not in done]
            if params:
                done.update(id(p) for p in params)
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    if state_dict is not None and comm.leader:
                        for p in params:
                            p.data.copy_(state_dict[names[id(p)]])
            buffers = [(n, b) for n, b in sub.named_buffers(prefix=prefix, recurse=False) if n in self.keys]
            if buffers:  # not partitioned (persistent ones only: the others are computed at build)
                if state_dict is not None and comm.leader:
                    for n, b in buffers:
                        b.copy_(state_dict[n])
                comm.broadcast([b for _, b in buffers])

    @contextlib.contextmanager
    def head_weight(self):
        import deepspeed
        w = output_head(self.module).weight
        with deepspeed.zero.GatheredParameters([w]):
            yield w

    def resident_bytes(self) -> int:
        n = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.module.parameters())
        return n + sum(b.numel() * b.element_size() for b in self.module.buffers())

    def full_bytes(self) -> int:
        return sum(p.ds_numel * p.ds_tensor.element_size() for p in self.module.parameters())


def teacher_ds_config(student_cfg: dict) -> dict:
    """The DeepSpeed config of a partitioned teacher: ZeRO-3 without an optimizer, the student's
    precision and batch sizes, and its ZeRO-3 knobs (prefetch, persistence threshold) if set."""
    zero = {k: v for k, v in student_cfg.get("zero_optimization", {}).items()
            if k.startswith("stage3_") or k in ("overlap_comm",)}
    # memory_efficient_linear off: on, zero.Init replaces torch.nn.functional.linear process-wide
    cfg = {"zero_optimization": dict(zero, stage=3, memory_efficient_linear=False),
           "train_micro_batch_size_per_gpu": student_cfg["train_micro_batch_size_per_gpu"],
           "gradient_accumulation_steps": student_cfg.get("gradient_accumulation_steps", 1),
           "train_batch_size": student_cfg["train_batch_size"]}
    for key in ("bf16", "fp16"):
        if student_cfg.get(key, {}).get("enabled"):
            cfg[key] = {"enabled": True}
    return cfg
