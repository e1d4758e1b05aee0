"""Model configuration: one small dataclass for both architectures, serialisable to JSON.

The JSON form is what a peer's export carries, so a student can rebuild (and check) the
architecture of every teacher it loads. ``config_hash`` is the identity used for that check.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    arch: str = "lstm"             # "lstm" | "transformer" | "hf" (any transformers causal LM: hf_config)
    vocab_size: int = 8000
    d_model: int = 256             # LSTM hidden size / Transformer width
    n_layers: int = 1
    d_embed: int = 0               # LSTM embedding size (0 = d_model)
    dropout: float = 0.0
    tie_embeddings: bool = False
    layer_norm: bool = False       # LSTM: LayerNorm on the last layer's output
    n_heads: int = 4               # Transformer only
    d_ff: int = 0                  # Transformer MLP width (0 = 4 * d_model)
    max_seq_len: int = 1024        # Transformer only (RoPE cache size)
    hf_config: dict | None = None  # arch "hf": the transformers config dict (model/hf.py)
    preset: str = field(default="", compare=False)  # informational, not part of the identity

    def __post_init__(self):
        if self.arch not in ("lstm", "transformer", "hf"):
            raise ValueError(f"model arch must be 'lstm', 'transformer' or 'hf', got {self.arch!r}")
        if (self.arch == "hf") != isinstance(self.hf_config, dict):
            raise ValueError("model arch 'hf' needs hf_config (a transformers config dict), and only it has one")
        if self.vocab_size < 2 or self.d_model < 1 or self.n_layers < 1:
            raise ValueError(f"invalid model config: {self}")
        if self.arch == "transformer" and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.tie_embeddings and self.arch == "lstm" and (self.d_embed or self.d_model) != self.d_model:
            raise ValueError("tie_embeddings needs d_embed == d_model for the LSTM")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def config_hash(self) -> str:
        """Hash of everything that determines the weights' shapes and the function computed."""
        d = self.to_dict()
        if self.arch == "hf":
            from model.hf import identity
            d = {"arch": "hf", "hf_config": identity(self.hf_config)}
            return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
        d.pop("preset")
        d.pop("hf_config")
        d.pop("dropout")  # dropout is off at inference; a teacher may differ in it
        d.pop("max_seq_len")  # RoPE tables are computed on the fly; no weight depends on it
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Size presets. "paper" approximates the paper's LSTM LM (2 x 1024 units; the paper's exact
# embedding size and vocabulary are not reproduced); "zaremba-small", "medium" and "large" are
# the regularised LSTMs of Zaremba et al. (2014). "gpt2-small" is GPT-2-small-like
# (12 x 768, 12 heads) built as a Llama-style decoder (RoPE, RMSNorm, SwiGLU).
PRESETS: dict[str, dict[str, dict]] = {
    "lstm": {
        "tiny": dict(d_model=256, d_embed=128, n_layers=1),
        "small": dict(d_model=512, n_layers=2, dropout=0.1, tie_embeddings=True, layer_norm=True),
        "paper": dict(d_model=1024, n_layers=2, dropout=0.1, tie_embeddings=True, layer_norm=True),
        # Zaremba et al. (2014) on the Penn Treebank: small (no dropout), medium and large with dropout on
        # the embedding, between the layers and before the softmax; medium/large tie the embeddings
        # (Press & Wolf 2017). Train them with --carry_state (benchmarks/ptb.py, docs/ptb.md).
        "zaremba-small": dict(d_model=200, n_layers=2),
        "medium": dict(d_model=650, n_layers=2, dropout=0.5, tie_embeddings=True),
        "large": dict(d_model=1500, n_layers=2, dropout=0.65, tie_embeddings=True),
    },
    "transformer": {
        "tiny": dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, tie_embeddings=True),
        "small": dict(d_model=384, n_layers=6, n_heads=6, d_ff=1536, tie_embeddings=True, dropout=0.1),
        "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, tie_embeddings=True,
                           dropout=0.1),
    },
}


def preset_config(arch: str, size: str, vocab_size: int, max_seq_len: int = 1024, **overrides) -> ModelConfig:
    if arch not in PRESETS:
        raise ValueError(f"--model must be one of {sorted(PRESETS)}, got {arch!r}")
    if size not in PRESETS[arch]:
        raise ValueError(f"--model_size for {arch} must be one of {sorted(PRESETS[arch])}, got {size!r}")
    kw = dict(PRESETS[arch][size])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(arch=arch, vocab_size=vocab_size, max_seq_len=max_seq_len, preset=size, **kw)


def hf_model_config(hf_config: dict, max_seq_len: int = 1024, dropout: float | None = None) -> ModelConfig:
    """``--model hf``: the config of any transformers causal LM (model/hf.py read_hf_config)."""
    from model.hf import shape_summary, with_dropout
    if dropout is not None:
        hf_config = with_dropout(hf_config, dropout)
    return ModelConfig(arch="hf", hf_config=hf_config, max_seq_len=max_seq_len, preset=hf_config.get("model_type", ""),
                       dropout=dropout or 0.0, **shape_summary(hf_config))
