#!/usr/bin/env python
"""Sample text from a trained model: a group's final/ or any export, LSTM or Transformer/HF.

    python recipes/generate.py --model runs/codistill/group_0 --prompt "The government said"
    python recipes/generate.py --model runs/A/group_1/exports/step_000500.safetensors \\
        --max_new_tokens 60 --temperature 0.8 --top_k 50 --top_p 0.95 --seed 1 --num_samples 3

--model takes what --teacher takes: a group directory (its final/, else its newest export), a
final/ or exports/ directory, or one export file; the weights are read through the teachers'
validated reader (safetensors only). The tokenizer is the one of the data the run trained on
(--data, default: the run's config.json), checked against the weights' tokenizer hash.
--temperature 0 is greedy decoding; otherwise top-k then top-p (nucleus) filtering, then a draw
from torch's generator seeded with --seed (the same flags give the same text). Without a prompt
a sample starts at a document boundary (EOS); it stops at EOS or after --max_new_tokens.
The whole context (at most --context tokens) is re-run for every new token: no KV cache, which
keeps one code path for every architecture; the presets take seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from codistill.teachers.loader import read_fixed_teacher
from fileio import ExportError
from model import ModelConfig, build_model


class GenerateError(Exception):
    """A user-facing problem: printed as 'error: ...' with exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="group dir, final/ or exports/ dir, or an export file")
    p.add_argument("--data", help="data_prep output dir whose tokenizer the model was trained with "
                   "(default: the run's config.json)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="keep the smallest set with this much probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--context", type=int, default=256, help="tokens of context the model sees (the newest)")
    a = p.parse_args(argv)
    for name, ok in (("max_new_tokens", a.max_new_tokens >= 1), ("temperature", a.temperature >= 0),
                     ("top_k", a.top_k >= 0), ("top_p", 0 < a.top_p <= 1), ("num_samples", a.num_samples >= 1),
                     ("context", a.context >= 1)):
        if not ok:
            p.error(f"--{name} {getattr(a, name)} is out of range (see --help)")
    return a


def find_data(model_path: Path) -> Path:
    """The --data of the run that wrote ``model_path`` (its config.json, a few levels up)."""
    for d in [model_path.resolve(), *model_path.resolve().parents][:5]:
        if (d / "config.json").is_file() and any(d.glob("group_*")):  # a run directory (final/ has one too)
            try:
                return Path(json.loads((d / "config.json").read_text())["args"]["data"])
            except (json.JSONDecodeError, KeyError, TypeError):
                break
    raise GenerateError(f"--model {model_path}: cannot find the run's config.json to know its data; pass --data DIR "
                        "(the data_prep output the model was trained on)")


def load(model_path: Path, data_dir: Path | None):
    from data_prep.tokenizer import load_text_tokenizer
    data_dir = data_dir or find_data(model_path)
    try:
        tok = load_text_tokenizer(data_dir)
    except Exception as e:  # noqa: BLE001 - data_prep names the file and the fix
        raise GenerateError(f"--data {data_dir}: {e}") from None
    try:
        exp = read_fixed_teacher(model_path, None, None, flag="--model")
    except ExportError as e:
        raise GenerateError(str(e)) from None
    if exp.meta.get("tokenizer_sha256") not in (None, tok.sha256):
        raise GenerateError(f"--model {model_path} was trained with another tokenizer than {data_dir}'s "
                            f"({exp.meta.get('tokenizer_sha256')} vs {tok.sha256}); pass the run's --data")
    try:
        cfg = ModelConfig.from_dict(exp.meta["model_config"])
        model = build_model(cfg)
        model.load_state_dict(exp.state_dict)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise GenerateError(f"--model {model_path}: its weights and model config do not fit ({e})") from None
    return model.eval(), cfg, tok


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf (the most
    likely token always stays)."""
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # the mass before this token already reached p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model, ids: list[int], a, eos: int, vocab: int, gen: torch.Generator, max_context: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(a.max_new_tokens):
        x = torch.tensor([ids[-max_context:]])
        logits = model(x)[0, -1, :vocab].float()  # ids past the tokenizer's (padded embeddings) are never drawn
        if a.temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(filter_logits(logits / a.temperature, a.top_k, a.top_p), -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == eos:
            break
        ids.append(nxt)
        out.append(nxt)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        model, cfg, tok = load(Path(a.model), Path(a.data) if a.data else None)
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = tok.encode(a.prompt) if a.prompt else []
    context = min(a.context, cfg.max_seq_len) if cfg.arch != "lstm" else a.context
    gen = torch.Generator().manual_seed(a.seed)
    for i in range(a.num_samples):
        new = sample(model, [tok.eos_id, *prompt], a, tok.eos_id, tok.vocab_size, gen, context)
        if a.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tok.decode(prompt + new), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
