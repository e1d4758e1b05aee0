#!/usr/bin/env python
"""Tokens/s of recipes/train_lm.py (one group, ZeRO-2, DeepSpeed) against a minimal plain
PyTorch loop of the same model, batch and optimizer, measured side by side in one run.

    python benchmarks/train_throughput.py [--steps 60] [--sizes tiny small] [--ranks 1 2]

Both sides time the same thing per step: forward, loss, backward, clipping, optimizer step
(the trainer's perf/step_time scalar; the plain loop's own timer), median over the steps after
the first 10. The plain loop runs in this process with as many threads as a 1-rank DeepSpeed run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, bench_data, median, save_results, scalars, table, train

from codistill.data import GroupStream, TokenData
from codistill.layout import RunLayout
from codistill.loss import codistill_loss
from model import build_model, preset_config


def plain_loop(data, size, steps, micro, seq_len, lr=3e-3, clip=1.0):
    torch.manual_seed(0)
    model = build_model(preset_config("lstm", size, data.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    stream = GroupStream(data, 0, 1, seq_len, seed=0)
    times = []
    for step in range(steps):
        b = stream.batch(step, 0, 1, 0, 1, micro)
        t0 = time.perf_counter()
        loss, _ = codistill_loss(model(b[:, :-1]), b[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        times.append(time.perf_counter() - t0)
    return micro * seq_len / median(times[10:])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--seq_len", type=int, default=64)
    a = ap.parse_args()
    data_dir = bench_data()
    data = TokenData(data_dir)
    micro = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())["train_micro_batch_size_per_gpu"]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            torch.set_num_threads(max(1, torch.get_num_threads()))
            plain = plain_loop(data, size, a.steps, micro, a.seq_len)
            for ranks in a.ranks:
                run = Path(tmp) / f"{size}_{ranks}"
                train(run, ["--data", data_dir, "--num_groups", 1, "--model_size", size, "--max_steps", a.steps,
                            "--seq_len", a.seq_len, "--eval_every", 10 ** 6, "--save_every", 10 ** 6,
                            "--lr", 3e-3], num_ranks=ranks)
                step_time = median([v for s, v in scalars(RunLayout(run).group(0).tb, "perf/step_time").items() if s > 10])
                ds = micro * ranks * a.seq_len / step_time
                r = {"size": size, "ranks": ranks, "plain_tokens_per_s": plain, "deepspeed_tokens_per_s": ds,
                     "ratio_vs_plain_1rank": ds / plain}
                results.append(r)
                rows.append([size, ranks, round(plain), round(ds), round(ds / plain, 3)])
    print(table(rows, ["preset", "ranks", "plain torch tok/s (1 proc)", "train_lm.py tok/s", "ratio"]))
    print("target: ratio >= 0.9 on one rank")
    print(f"wrote {save_results('train_throughput', {'steps': a.steps, 'seq_len': a.seq_len, 'micro_batch': micro, 'results': results})}")


if __name__ == "__main__":
    main()
