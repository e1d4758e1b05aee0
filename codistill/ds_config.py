"""Loading a DeepSpeed JSON config and resolving what it leaves to the run and the device.

``"auto"`` values are resolved by device, so that one config file is right on a CPU (where
it was measured) and on a GPU node:

    key                                   CPU                 CUDA
    bf16.enabled                          off                 on where bf16 is native (Ampere+)
    zero_optimization.overlap_comm        false               true
    zero_optimization.*_bucket_size       5e7                 5e8 (DeepSpeed's default)
    optimizer.params.fused (torch_adam)   dropped             true (torch's fused AdamW, no JIT build)

DeepSpeed's throughput timer (``timers.throughput``) is off unless the config sets it: it
synchronizes the device in every forward and every step (deepspeed/utils/timer.py
ThroughputTimer.start/stop, ``synchronized`` true by default); the trainer measures tokens/s
itself. ZeRO-1/2 with overlap_comm (on CUDA) still synchronize the device at the end of every
micro-batch's backward (stage_1_and_2.py independent_gradient_partition_epilogue: the reduced
gradients' buffers are reused); docs/gpu.md counts the syncs.

Mixed precision: with bf16 on, gradients are accumulated in fp32 (``data_types.grad_accum_dtype``
"fp32", unless the config says otherwise) and ZeRO stage 0 is run as stage 1: DeepSpeed's stage 0
with bf16 uses its unfused bf16 optimizer, which accumulates gradients (and clips by a norm
computed) in bf16. A one-rank group in fp32 runs ZeRO-1/2 as stage 0 (nothing to partition;
measured on CPU, see the comment below).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from codistill.device import bf16_native


class ConfigError(ValueError):
    pass


# The top-level keys DeepSpeed 0.19.8 reads, from DeepSpeedConfig._initialize_params
# (deepspeed/runtime/config.py) and the sub-configs it calls: get_zero_config, get_monitor_config
# (tensorboard, wandb, csv_monitor, comet), get_aio_config (runtime/swap_tensor/constants.py),
# FLOPS_PROFILER (profiling/constants.py), AUTOTUNING (autotuning/constants.py), get_timers_config,
# get_tensor_parallel_config, get_data_efficiency_config, get_hybrid_engine_config, ... DeepSpeed
# itself ignores any other key, so a typo would silently drop a setting: load_ds_config refuses it.
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "managed_gradient_accumulation", "steps_per_print", "dump_state", "disable_python_gc", "disable_allgather",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "gradient_clipping", "optimizer", "scheduler",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "fp16", "bf16",
    "bfloat16", "torch_autocast", "data_types", "wall_clock_breakdown", "memory_breakdown", "timers",
    "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet",
    "aio", "autotuning", "checkpoint", "pipeline", "data_efficiency", "weight_quantization", "vocabulary_size",
    "hybrid_engine", "compile", "tensor_parallel", "expert_parallel", "use_data_before_expert_parallelism",
    "sequence_parallel_size", "dataloader_drop_last", "log_level",
})
# keys whose value DeepSpeed (and resolve_ds_config) reads as a JSON object
OBJECT_KEYS = ("optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "bfloat16", "torch_autocast",
               "data_types", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb",
               "csv_monitor", "comet", "aio", "autotuning", "checkpoint", "pipeline", "data_efficiency",
               "hybrid_engine", "compile", "tensor_parallel", "timers")


def load_ds_config(path: str | Path) -> dict:
    """The JSON object of ``path`` without its "_comment"-style keys; ConfigError (naming the
    file and the fix) for a file that is missing, not UTF-8 JSON, not an object, has a top-level
    key DeepSpeed does not know (the closest known key suggested) or a block that is no object."""
    import difflib
    path = Path(path)
    where = f"--ds_config {path}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist (see ds_configs/ for examples)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte {e.start}): save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must hold a JSON object")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    for key in cfg:
        if key not in DEEPSPEED_KEYS:
            from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS as removed
            close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1)
            raise ConfigError(f"{where}: {key!r} is not a DeepSpeed config key"
                              + (f" ({removed[key]})" if key in removed else "")
                              + (f"; did you mean {close[0]!r}?" if close else "")
                              + " (DeepSpeed would ignore it; prefix it with '_' for a comment)")
    for key in OBJECT_KEYS:
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"{where}: {key!r} must be a JSON object, e.g. \"{key}\": {{...}} "
                              f"(got {json.dumps(cfg[key])})")
    params = cfg.get("optimizer", {}).get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: optimizer.params must be a JSON object (got {json.dumps(params)})")
    return cfg


def resolve_ds_config(cfg: dict, dp_size: int, lr: float | None, device: torch.device, where: str = "--ds_config") -> dict:
    """A copy of ``cfg`` ready for deepspeed.initialize for a group of ``dp_size`` ranks."""
    cfg = copy.deepcopy(cfg)
    try:
        micro = int(cfg.get("train_micro_batch_size_per_gpu", 0))
        accum = int(cfg.get("gradient_accumulation_steps", 1))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: train_micro_batch_size_per_gpu and gradient_accumulation_steps must be "
                          "integers") from None
    if micro < 1 or accum < 1:
        raise ConfigError(f"{where}: set train_micro_batch_size_per_gpu >= 1 and gradient_accumulation_steps >= 1 "
                          f"(got {micro} and {accum})")
    batch = micro * accum * dp_size
    given = cfg.get("train_batch_size", "auto")
    if given != "auto" and int(given) != batch:
        raise ConfigError(f"{where}: train_batch_size={given} does not equal train_micro_batch_size_per_gpu ({micro}) x "
                          f"gradient_accumulation_steps ({accum}) x ranks per group ({dp_size}) = {batch}; "
                          f"fix one of them or set train_batch_size to \"auto\"")
    cfg["train_batch_size"] = batch
    on_gpu = device.type == "cuda"
    for key in ("bf16", "fp16"):
        block = cfg.get(key)
        if isinstance(block, dict) and block.get("enabled") == "auto":
            block["enabled"] = key == "bf16" and bf16_native(device)
    if not on_gpu and cfg.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{where}: fp16 is not supported on CPU; use bf16 \"auto\" or disable fp16")
    zero = dict(cfg.get("zero_optimization", {}))
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0-3, got {stage!r}")
    cfg.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    for key, gpu, cpu in (("overlap_comm", True, False), ("reduce_bucket_size", 500_000_000, 50_000_000),
                          ("allgather_bucket_size", 500_000_000, 50_000_000)):
        if zero.get(key) == "auto":
            zero[key] = gpu if on_gpu else cpu
    params = cfg.get("optimizer", {}).get("params", {})
    if params.get("fused") == "auto":
        if on_gpu and params.get("torch_adam"):
            params["fused"] = True
        else:
            del params["fused"]
    bf16 = bool(cfg.get("bf16", {}).get("enabled"))
    if bf16:
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        if stage == 0:
            zero["stage"] = stage = 1
    elif dp_size == 1 and stage in (1, 2) and not zero.get("offload_optimizer") and not on_gpu:
        # A one-rank group has nothing to partition: ZeRO-1/2 would only add their gradient
        # bucketing to every step (+25% step time measured on the tiny LSTM on CPU), so run it
        # as plain data parallelism in fp32 on CPU. ZeRO-3, offloading and GPUs keep what was asked.
        zero["stage"] = 0
    if zero or "zero_optimization" in cfg:
        cfg["zero_optimization"] = zero
    if "optimizer" in cfg and lr is not None:
        cfg["optimizer"].setdefault("params", {})["lr"] = lr
    return cfg
