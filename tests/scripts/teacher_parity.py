#!/usr/bin/env python
"""A teacher built from a student's export computes the student's logits.

    python tests/scripts/teacher_parity.py --device cpu --bf16 --out result.json

For each architecture (the LSTM, the repo's Transformer, an HF Llama config with
tie_word_embeddings written here; ``--arch`` picks) a real DeepSpeed engine (one rank;
ds_configs/zero2.json resolved for this device, bf16 forced on or off) holds the student; its
weights go through the exchange (write_export -> read_export; the tensors are handed to the
writer where they live, on the device: the GPU run exercises the writer's device path) into a
TeacherPool teacher built like the trainer builds it (the student's dtypes, on the student's
device). Both run on the same tokens at positions
0..max_seq_len-1; the JSON has the largest logit difference, and the difference a teacher
cast with ``module.to(dtype)`` (buffers too: the RoPE inv_freq) would have had.
Used by tests/integration/test_device_comm.py (CPU) and tests/e2e/test_gpu.py / benchmarks/gpu_smoke.py (CUDA).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("lstm", "transformer", "llama_tied")


def model_config(arch: str, vocab: int, seq_len: int, tmp: Path):
    """The tiny preset, or a tied Llama config written as a user writes one (config.json)."""
    from model import hf_model_config, preset_config
    from model.hf import read_hf_config
    if arch != "llama_tied":
        return preset_config(arch, "tiny", vocab, max_seq_len=seq_len)
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=True
                ).save_pretrained(tmp / "llama_tied")
    return hf_model_config(read_hf_config(tmp / "llama_tied"), max_seq_len=seq_len)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--arch", nargs="*", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--out", required=True)
    a = p.parse_args([x for x in sys.argv[1:] if not x.startswith("--local_rank")])
    import deepspeed

    from codistill.comm import rendezvous_defaults
    from codistill.ds_config import load_ds_config, resolve_ds_config
    from codistill.exports import read_export, write_export
    from codistill.teachers.pool import TeacherPool
    from model import build_model
    rendezvous_defaults()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(verbose=False)
    __import__('codistill.comm').comm.destroy_at_exit()  # gloo's threads end before Python does
    base = load_ds_config(ROOT / "ds_configs" / "zero2.json")
    base["bf16"] = {"enabled": a.bf16}
    cfg_ds = resolve_ds_config(base, 1, None, device)
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="teacher_parity_"))
    for arch in a.arch:
        torch.manual_seed(0)
        cfg = model_config(arch, 2000, a.seq_len, tmp)
        model = build_model(cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg_ds)
        engine.eval()
        x = torch.randint(0, cfg.vocab_size, (2, a.seq_len), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            student = engine(x).float()
        with tempfile.TemporaryDirectory() as d:
            write_export(Path(d), 10, engine.module.state_dict(), {"group": 1})
            exp = read_export(Path(d), 10)
        pool = TeacherPool(cfg, device, like=engine.module)
        pool.load(1, exp)
        with torch.inference_mode():
            teacher = pool.modules[1](x).float()
            naive = build_model(cfg).to(device=device, dtype=engine.get_data_types()[0]).eval()
            naive.load_state_dict(exp.state_dict)
            naive_logits = naive(x).float()
        tail = slice(a.seq_len // 4, None)  # positions >= 256 of 1024: where a bf16 RoPE table drifts
        results[arch] = {
            "dtype": str(engine.get_data_types()[0]), "param_dtypes": sorted({str(t.dtype) for t in
                                                                             pool.modules[1].parameters()}),
            "buffer_dtypes": sorted({str(t.dtype) for t in pool.modules[1].buffers()}),
            "max_abs_diff": (teacher - student).abs().max().item(),
            "max_abs_diff_late_positions": (teacher[:, tail] - student[:, tail]).abs().max().item(),
            "naive_cast_max_abs_diff_late_positions": (naive_logits[:, tail] - student[:, tail]).abs().max().item(),
            "logit_scale": student.abs().max().item(),
        }
    shutil.rmtree(tmp, ignore_errors=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
