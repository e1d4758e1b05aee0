"""Transformer language model built with transformers from a config (no hub downloads)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import ModelConfig
from model.head import project


def hf_config(cfg: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff or 4 * cfg.d_model, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


class TransformerLM(nn.Module):
    """Wraps a LlamaForCausalLM so that forward(input_ids) returns logits like the LSTM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.hf = LlamaForCausalLM(hf_config(cfg))

    def forward(self, input_ids: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V]; with ``hidden_only`` the states the output head takes [B, T, D]."""
        h = self.hf.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return h if hidden_only else project(self.hf.lm_head, h)

    def output_head(self) -> nn.Linear:
        return self.hf.lm_head
