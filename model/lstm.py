"""LSTM language model, the paper's model family (torch.nn.LSTM, cuDNN on GPU)."""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.head import project


class LSTMLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d_embed = cfg.d_embed or cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d_embed)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(d_embed, cfg.d_model, num_layers=cfg.n_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.05)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=cfg.d_model ** -0.5)

    def forward(self, input_ids: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V]; with ``hidden_only`` the states the output head takes [B, T, D]."""
        x = self.drop(self.embed(input_ids))
        x, _ = self.lstm(x)
        x = self.drop(self.norm(x))
        return x if hidden_only else project(self.head, x)

    def output_head(self) -> nn.Linear:
        return self.head

