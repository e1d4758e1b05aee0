"""Which device a rank trains on, and whether bf16 is real there.

``LOCAL_RANK`` is a rank's index among the ranks of its node, not a CUDA ordinal: with
per-task GPU binding (``srun --gpus-per-task=1``, containers given one GPU each) every rank
sees exactly one device, ``cuda:0``, whatever its local rank. ``pick_cuda_index`` maps the
local rank onto the devices this process can see.
"""
from __future__ import annotations

import torch


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


def train_device(local_rank: int, local_world: int | None = None) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", pick_cuda_index(local_rank, torch.cuda.device_count(), local_world))


def bf16_native(device: torch.device) -> bool:
    """bf16 in hardware on ``device``: Ampere or newer on CUDA. Emulated bf16 (V100, T4) is
    far slower than fp32 there, so "auto" must not pick it."""
    if device.type != "cuda":
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)
