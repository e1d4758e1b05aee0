"""Any transformers causal-LM architecture (GPT-2, Llama, Mistral, Qwen2, Phi, GPT-NeoX, ...),
built from a local config.json with AutoModelForCausalLM.from_config, or started from a local
pretrained directory (``--init_from``). Nothing is downloaded: everything comes from local files.

The architecture travels as the config dict (``ModelConfig.hf_config``): an export's metadata
carries it, so a peer rebuilds every teacher from it, and its identity (``identity``: the
config's full dict without keys that change neither the weights' shapes nor the function
computed - dropout, versions, paths, dtype) is what a teacher is checked against.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# keys of a transformers config that change neither the weights' shapes nor the computed function
VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "architectures",
            "_attn_implementation_autoset", "_attn_implementation", "output_attentions", "output_hidden_states",
            "return_dict", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
            "task_specific_params", "id2label", "label2id", "problem_type", "finetuning_task"}


class HFConfigError(ValueError):
    """A --hf_config / --init_from that cannot be used (names the path and what to do)."""


def read_hf_config(path, flag: str = "--hf_config") -> dict:
    """The config dict of a transformers causal LM, from config.json or a directory holding one,
    completed with the architecture's defaults (so a partial and a full config of the same model
    have the same identity)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise HFConfigError(f"{flag} {path}: no such file (give a transformers config.json or a directory "
                            "holding one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConfigError(f"{flag} {file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise HFConfigError(f"{flag} {file}: has no model_type (write the config with "
                            "PretrainedConfig.save_pretrained, or add e.g. \"model_type\": \"llama\")")
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        raise HFConfigError(f"{flag} {file}: transformers cannot build a config from it ({e})") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise HFConfigError(f"{flag} {file}: model_type {raw['model_type']!r} is not a causal language model "
                            "that AutoModelForCausalLM can build")
    return config.to_dict()


def pretrained_config(hf_config: dict):
    from transformers import AutoConfig
    return AutoConfig.for_model(**hf_config)


def identity(hf_config: dict) -> dict:
    """What identifies the architecture: the config without VOLATILE keys and dropout rates."""
    return {k: v for k, v in hf_config.items()
            if k not in VOLATILE and not k.endswith(("dropout", "pdrop", "_dropout_prob"))}


def with_dropout(hf_config: dict, p: float) -> dict:
    """The config with every dropout rate set to ``p`` (``--dropout``)."""
    return {k: (p if k.endswith(("dropout", "pdrop", "_dropout_prob")) and isinstance(v, (int, float)) else v)
            for k, v in hf_config.items()}


def shape_summary(hf_config: dict) -> dict:
    """Width, depth and heads under the names every config understands (attribute_map)."""
    c = pretrained_config(hf_config)
    return {"vocab_size": c.vocab_size, "d_model": c.hidden_size, "n_layers": c.num_hidden_layers,
            "n_heads": getattr(c, "num_attention_heads", 1)}


class HFCausalLM(nn.Module):
    """Wraps any AutoModelForCausalLM so that forward(input_ids) returns logits like the LSTM."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import AutoModelForCausalLM
        self.config = cfg
        # in torch's default dtype (fp32), like every other model of the repository, whatever the
        # config's "dtype"/"torch_dtype" says (real configs say bfloat16; transformers' _from_config
        # builds in config.dtype unless given one): the run's precision is DeepSpeed's to set (its
        # bf16 casts the parameters), and an fp32 run or a GPU without native bf16 must train in fp32
        self.hf = AutoModelForCausalLM.from_config(pretrained_config(cfg.hf_config), dtype=torch.get_default_dtype())

    def forward(self, input_ids: torch.Tensor, hidden_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V]; with ``hidden_only`` the base model's last hidden states [B, T, D]
        (architectures that scale or cap logits after the head differ from head(hidden): the
        teacher pool checks that once before using it, codistill/teachers/pool.py)."""
        if hidden_only:
            return self.hf.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.hf(input_ids=input_ids, use_cache=False).logits

    def output_head(self) -> nn.Linear:
        return self.hf.get_output_embeddings()


def load_pretrained(module: nn.Module, path, trust_pickle: bool = False) -> None:
    """Copy ``--init_from``'s weights into ``module`` (an HFCausalLM) in place, in the module's
    dtype. safetensors files are read with ``safe_open`` (mmap'd), one tensor at a time straight
    into its parameter: no second model and no full fp32 state dict is materialised (8 ranks x
    1 B parameters were 60-80 GB of host memory per node at start-up). Every module tensor must
    come from the files except outputs tied to another (lm_head of tied embeddings); a missing
    or unknown key or a shape that differs is an HFConfigError naming the file. Pickled weights
    (``trust_pickle``) go through pretrained_weights."""
    from safetensors import safe_open
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        module.load_state_dict(pretrained_weights(path, trust_pickle))
        return
    targets = module.state_dict(keep_vars=True)
    done = set()
    with torch.no_grad():
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for k in f.keys():
                        key = f"hf.{k}"
                        if key not in targets:
                            raise HFConfigError(f"--init_from {file}: holds {k!r}, which this architecture "
                                                "(its config.json) has no tensor for")
                        t = f.get_slice(k)
                        if tuple(t.get_shape()) != tuple(targets[key].shape):
                            raise HFConfigError(f"--init_from {file}: {k!r} has shape {tuple(t.get_shape())}, the "
                                                f"model built from its config.json {tuple(targets[key].shape)}")
                        targets[key].copy_(f.get_tensor(k))  # one tensor resident at a time, cast on copy
                        done.add(key)
            except (OSError, safetensors_errors()) as e:
                raise HFConfigError(f"--init_from {file}: not a readable safetensors file ({e})") from None
    tied = {k for k, t in targets.items() if any(t is targets[d] for d in done)}
    missing = sorted(set(targets) - done - tied - {k for k, _ in module.named_buffers()})
    if missing:
        raise HFConfigError(f"--init_from {path}: its safetensors files lack {missing[:5]}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                            + "; give a directory written by save_pretrained for this config.json")


def safetensors_errors() -> type:
    from safetensors import SafetensorError
    return SafetensorError


def pretrained_weights(path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a local pretrained directory (``--init_from``), as HFCausalLM state-dict
    keys. safetensors only (model.safetensors or sharded with model.safetensors.index.json);
    pickled weights (pytorch_model*.bin) are refused unless ``trust_pickle``: unpickling a file
    runs any code it holds."""
    from transformers import AutoModelForCausalLM
    path = Path(path)
    if not path.is_dir():
        raise HFConfigError(f"--init_from {path}: not a directory (give a directory written by "
                            "save_pretrained: config.json + model.safetensors)")
    has_st = any(path.glob("*.safetensors"))
    has_bin = any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_st and not has_bin:
        raise HFConfigError(f"--init_from {path}: holds no weights (model.safetensors)")
    if not has_st and not trust_pickle:
        raise HFConfigError(f"--init_from {path}: its weights are pickled (pytorch_model.bin), and unpickling "
                            "runs any code the file holds; convert them to safetensors (save_pretrained with "
                            "safe_serialization=True) or pass --trust_pickled_weights if you trust the file")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=has_st,
                                                     dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise HFConfigError(f"--init_from {path}: transformers cannot load it ({e})") from None
    return {f"hf.{k}": v for k, v in model.state_dict().items()}
