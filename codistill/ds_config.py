"""Loading a DeepSpeed JSON config and resolving what it leaves to the run (bf16 "auto", batch)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch


class ConfigError(ValueError):
    pass


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path} does not exist (see ds_configs/ for examples)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--ds_config {path} must hold a JSON object")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def resolve_ds_config(cfg: dict, dp_size: int, lr: float | None, device: torch.device, where: str = "--ds_config") -> dict:
    """A copy of ``cfg`` ready for deepspeed.initialize for a group of ``dp_size`` ranks."""
    cfg = copy.deepcopy(cfg)
    try:
        micro = int(cfg.get("train_micro_batch_size_per_gpu", 0))
        accum = int(cfg.get("gradient_accumulation_steps", 1))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: train_micro_batch_size_per_gpu and gradient_accumulation_steps must be integers")
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
            block["enabled"] = bool(on_gpu and (key == "bf16" and torch.cuda.is_bf16_supported()))
    if not on_gpu and cfg.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{where}: fp16 is not supported on CPU; use bf16 \"auto\" or disable fp16")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0-3, got {stage!r}")
    if dp_size == 1 and stage in (1, 2) and not zero.get("offload_optimizer"):
        # A one-rank group has nothing to partition: ZeRO-1/2 would only add their gradient
        # bucketing to every step (+25% step time measured on the tiny LSTM), so run it as
        # plain data parallelism. ZeRO-3 and offloading are kept as asked.
        cfg["zero_optimization"] = dict(zero, stage=0)
    if "optimizer" in cfg and lr is not None:
        cfg["optimizer"].setdefault("params", {})["lr"] = lr
    return cfg
