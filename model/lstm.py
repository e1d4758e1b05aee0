"""LSTM language model, the paper's model family (torch.nn.LSTM, cuDNN on GPU).

The LSTM can carry its recurrent state from one window to the next (truncated backpropagation
through time, and stateful evaluation, as Zaremba et al. 2014 train and measure it): pass a
``CarriedState`` as ``state=``; the forward starts from its (h, c) (zeros when it is empty) and
leaves the final (h, c) in it, detached, for the next window of the same rows. A holder, not a
return value, so the call goes through a DeepSpeed engine and the teachers' placements unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.head import project


class CarriedState:
    """The (h, c) an LSTM leaves after a window, for the next window of the same rows.

    ``hc``: (h, c), each [layers, rows, d_model], detached (no gradient flows into the previous
    window: truncated BPTT), or None (start from zeros). ``tag``: what the state was computed
    with (e.g. a teacher's export step), for the caller to decide when it no longer applies."""

    __slots__ = ("hc", "tag")

    def __init__(self, hc=None, tag=None):
        self.hc, self.tag = hc, tag

    def reset(self) -> None:
        self.hc = None

    def to(self, device) -> CarriedState:
        return CarriedState(None if self.hc is None else tuple(t.to(device) for t in self.hc), self.tag)


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

    def forward(self, input_ids: torch.Tensor, hidden_only: bool = False,
                state: CarriedState | None = None) -> torch.Tensor:
        """Logits [B, T, V]; with ``hidden_only`` the states the output head takes [B, T, D].
        With ``state`` the LSTM starts from ``state.hc`` and leaves its final (h, c) there."""
        x = self.drop(self.embed(input_ids))
        start = None if state is None else state.hc
        if start is not None and start[0].shape[1] != input_ids.shape[0]:
            raise ValueError(f"the carried LSTM state holds {start[0].shape[1]} rows but the batch has "
                             f"{input_ids.shape[0]}: a carried state continues the same rows")
        x, hc = self.lstm(x, start)
        if state is not None:
            state.hc = (hc[0].detach(), hc[1].detach())
        x = self.drop(self.norm(x))
        return x if hidden_only else project(self.head, x)

    def output_head(self) -> nn.Linear:
        return self.head

