"""Which device a rank trains on, and whether bf16 is real there.

``LOCAL_RANK`` is a rank's index among the ranks of its node, not a CUDA ordinal: with
per-task GPU binding (``srun --gpus-per-task=1``, containers given one GPU each) every rank
sees exactly one device, ``cuda:0``, whatever its local rank. ``pick_cuda_index`` maps the
local rank onto the devices this process can see, and ``bind_device`` (called once, before
``deepspeed.init_distributed``) makes ``LOCAL_RANK`` name that ordinal, because DeepSpeed 0.19.8
reads ``LOCAL_RANK`` as the CUDA ordinal in places no argument reaches:

- ``deepspeed/runtime/zero/partition_parameters.py`` ``Init.__init__``: ``self.local_device =
  torch.device(get_accelerator().device_name(os.environ["LOCAL_RANK"]))`` then ``set_device``
  (zero.Init of a ZeRO-3 student and of a partitioned teacher): ``cuda:3`` on a task that sees
  one GPU is "invalid device ordinal";
- ``deepspeed/runtime/zero/utils.py`` (``get_lst_from_rank0`` / ``assert_ints_same_as_other_ranks``):
  tensors on ``cuda:LOCAL_RANK``;
- ``deepspeed/runtime/engine.py`` ``DeepSpeedEngine._set_distributed_vars``: the engine's device is
  ``args.device_rank`` if given, else ``self.local_rank`` = ``int(os.environ["LOCAL_RANK"])``
  (``_configure_with_arguments``; ``_do_args_sanity_check`` asserts ``args.local_rank ==
  LOCAL_RANK``): an engine
  built without args (the optimizer-less teacher engine) would take the node-local index.

The node-local index is kept as ``CODISTILL_NODE_LOCAL_RANK`` (logs, and a second call of
``bind_device`` stays idempotent). On CPU nothing is rewritten.

``DS_ACCELERATOR=cpu`` (what the CPU test tier and ``benchmarks/* --device cpu`` set) means CPU
even where CUDA is available: the trainer and DeepSpeed's accelerator must agree.
"""
from __future__ import annotations

import argparse
import os

import torch

NODE_LOCAL_RANK = "CODISTILL_NODE_LOCAL_RANK"


class DeviceError(RuntimeError):
    pass


def pick_cuda_index(local_rank: int, visible: int, local_world: int | None = None) -> int:
    """The CUDA ordinal for ``local_rank`` when this process sees ``visible`` devices.

    - one visible device: it (per-task binding, or a one-GPU node);
    - as many visible devices as local ranks (or more): the local rank's own;
    - otherwise a clear error: silently stacking ranks on one GPU is never what was meant.
    """
    if visible < 1:
        raise DeviceError("CUDA is available but this process sees no GPU (CUDA_VISIBLE_DEVICES is empty?)")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise DeviceError(
        f"LOCAL_RANK {local_rank} but this process sees only {visible} GPUs"
        + (f" for {local_world} local ranks" if local_world else "")
        + ": start one rank per visible GPU (deepspeed --num_gpus / --include, srun --ntasks-per-node) "
        "or bind one GPU per task (srun --gpus-per-task=1)")


def cpu_requested(env=None) -> bool:
    """``DS_ACCELERATOR=cpu`` (in ``env``, default the process's): DeepSpeed runs its CPU
    accelerator, so the trainer trains on CPU."""
    return (os.environ if env is None else env).get("DS_ACCELERATOR", "").strip().lower() == "cpu"


def train_device(local_rank: int, local_world: int | None = None, env=None) -> torch.device:
    if cpu_requested(env) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", pick_cuda_index(local_rank, torch.cuda.device_count(), local_world))


def bind_device(env=None) -> torch.device:
    """This rank's training device; on CUDA, ``env["LOCAL_RANK"]`` becomes its ordinal (the
    launcher's value kept as ``CODISTILL_NODE_LOCAL_RANK``). Call before deepspeed.init_distributed.
    ``env``: the process's environment unless given."""
    env = os.environ if env is None else env
    node_local = int(env.get(NODE_LOCAL_RANK, env.get("LOCAL_RANK", 0)))
    device = train_device(node_local, int(env.get("LOCAL_WORLD_SIZE", 0)) or None, env)
    env[NODE_LOCAL_RANK] = str(node_local)
    if device.type == "cuda":
        env["LOCAL_RANK"] = str(device.index)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in env:  # engine.py _configure_with_arguments asserts they agree
            env["OMPI_COMM_WORLD_LOCAL_RANK"] = env["LOCAL_RANK"]
    return device


def engine_args(device: torch.device) -> argparse.Namespace | None:
    """The ``args`` of every deepspeed.initialize: the engine's device (``device_rank``) and
    ``local_rank``, both the ordinal ``bind_device`` chose (None on CPU: DeepSpeed's defaults)."""
    if device.type != "cuda":
        return None
    return argparse.Namespace(device_rank=device.index, local_rank=device.index)


def bf16_native(device: torch.device) -> bool:
    """bf16 in hardware on ``device``: Ampere or newer on CUDA. Emulated bf16 (V100, T4) is
    far slower than fp32 there, so "auto" must not pick it."""
    if device.type != "cuda":
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)
