"""Language models: one interface (config dataclass -> module whose forward gives logits)."""
from __future__ import annotations

from torch import nn

from model.config import PRESETS, ModelConfig, hf_model_config, preset_config

__all__ = ["ModelConfig", "PRESETS", "preset_config", "hf_model_config", "build_model", "count_params"]


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "lstm":
        from model.lstm import LSTMLM
        return LSTMLM(cfg)
    if cfg.arch == "hf":
        from model.hf import HFCausalLM
        return HFCausalLM(cfg)
    from model.transformer import TransformerLM
    return TransformerLM(cfg)


def count_params(module: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
