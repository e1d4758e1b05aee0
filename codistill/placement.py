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
    copies of their host tensors (``non_blocking`` from pinned memory: the copy is queued on the
    current stream before the submodule's kernels) and a forward hook that drops them again. The
    host tensors are the teacher's storage: ``receive`` writes into them.
    """

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__(module)  # built on the CPU (pinned when the device is CUDA)
        self.device = device
        self.host = {id(p): p.data for p in module.parameters()}
        self.empty = torch.empty(0, device=device)
        for name, b in module.named_buffers():  # small (RoPE frequencies): stay on the device
            b.data = b.data.to(device)
        for sub in module.modules():
            if any(True for _ in sub.parameters(recurse=False)):
                sub.register_forward_pre_hook(self._fetch)
                sub.register_forward_hook(self._drop)
        self._drop_all()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters(remove_duplicate=False))
        return {k: self.host[id(params[k])] if k in params else t.data
                for k, t in self.module.state_dict(keep_vars=True).items()}

    def _fetch(self, sub, args):
        for p in sub.parameters(recurse=False):
            p.data = self.host[id(p)].to(self.device, non_blocking=True, copy=True)

    def _drop(self, sub, args, out):
        for p in sub.parameters(recurse=False):
            p.data = self.empty

    def _drop_all(self) -> None:
        for p in self.module.parameters():
            p.data = self.empty

    def receive(self, state_dict: dict | None, comm: GroupComm) -> None:
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
        w = output_head(self.module).weight
        yield self.host[id(w)].to(self.device, non_blocking=True, copy=True)

    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.module.buffers())


class PartitionedTeacher:
    """A ZeRO-3 inference engine over the group's ranks: each rank keeps 1/ranks of every
    parameter; DeepSpeed gathers a submodule's parameters for its forward and frees them after."""

    def __init__(self, build, ds_config: dict, mpu):
        """``build()`` makes the module; its dtype is the config's (bf16 when the student's is):
        zero.Init is given no dtype (DeepSpeed 0.19 turns an explicit one into bf16 on a CPU) and
        no memory-efficient linear (it would replace torch.nn.functional.linear for the whole
        process, the student's layers included)."""
        import deepspeed
        import torch._dynamo  # noqa: F401  (imported inside zero.Init, whose patched Tensor.__new__ it rejects)
        group = mpu.get_data_parallel_group() if mpu is not None else None  # None: the whole world
        with deepspeed.zero.Init(data_parallel_group=group, config_dict_or_path=ds_config, mpu=mpu,
                                 mem_efficient_linear=False):
            module = build()  # partitioned as it is built: the full teacher never exists on a rank
        self.engine, *_ = deepspeed.initialize(model=module, config=ds_config, mpu=mpu)
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
    cfg = {"zero_optimization": dict(zero, stage=3),
           "train_micro_batch_size_per_gpu": student_cfg["train_micro_batch_size_per_gpu"],
           "gradient_accumulation_steps": student_cfg.get("gradient_accumulation_steps", 1),
           "train_batch_size": student_cfg["train_batch_size"]}
    for key in ("bf16", "fp16"):
        if student_cfg.get(key, {}).get("enabled"):
            cfg[key] = {"enabled": True}
    return cfg
