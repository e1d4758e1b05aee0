#!/usr/bin/env python
"""What codistillation costs per step: baseline vs 1 and 2 peers, next to the FLOP floor,
and the stall a teacher reload causes. One run, side by side.

    python benchmarks/codistill_overhead.py [--steps 100] [--size tiny]

- baseline: --num_groups 1; codistillation: --num_groups 2 (1 peer) and 3 (2 peers), all
  groups hosted by one process, same model, batch and data per group. Step time is the
  trainer's perf/step_time (forward, teacher forwards, loss, backward, optimizer) after the
  teachers are on.
- floor = 1 + peers * F / (F + B): each teacher adds one forward pass. F and B are measured
  here on the same model and batch (F = forward, F + B = forward + backward).
- reload stall: teachers are swapped in between steps (teacher/reload_ms); a step with a
  reload costs step_time + reload time. Target: worst such step < 1.2x the median step.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, bench_data, median, save_results, scalars, table, train

from data_prep.dataset import GroupStream, TokenData  # noqa: E402
from model import build_model, preset_config  # noqa: E402


def forward_backward_share(data, size, micro, seq_len, reps=20) -> float:
    torch.manual_seed(0)
    model = build_model(preset_config("lstm", size, data.vocab_size))
    b = GroupStream(data, 0, 1, seq_len, seed=0).batch(0, 0, 1, 0, 1, micro)
    x, y = b[:, :-1], b[:, 1:]
    fwd, both = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        both.append(time.perf_counter() - t0)
    return median(fwd[3:]) / median(both[3:])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--export_every", type=int, default=10)
    a = ap.parse_args()
    data_dir = bench_data()
    data = TokenData(data_dir)
    micro = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())["train_micro_batch_size_per_gpu"]
    share = forward_backward_share(data, a.size, micro, a.seq_len)
    K = a.export_every
    on_from = 2 * K + 1  # first step with teachers (sync mode: boundary 2K swaps in exports of K)
    common = ["--data", data_dir, "--model_size", a.size, "--max_steps", a.steps, "--seq_len", a.seq_len,
              "--eval_every", 10 ** 6, "--save_every", 10 ** 6, "--export_every", K, "--burn_in_steps", K]
    res, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for peers in (0, 1, 2):
            run = Path(tmp) / f"peers{peers}"
            wall = train(run, common + ["--num_groups", peers + 1])
            step_times, stalls, normal, reload_ms = [], [], [], []
            for g in range(peers + 1):
                tb = run / f"group_{g}" / "tb"
                st = scalars(tb, "perf/step_time")
                reload = scalars(run / "group_0" / "tb", "teacher/reload_ms")  # one reload per rank, logged by group 0
                step_times += [v for s, v in st.items() if s >= on_from]
                stalls += [st[s] + reload[s] / 1e3 for s in reload if s in st]
                reload_ms = list(reload.values())
                normal += [v for s, v in st.items() if s >= on_from and s not in reload]
            med = median(step_times)
            res[peers] = {"median_step_s": med, "wall_s": wall, "reload_steps": len(stalls),
                          "worst_reload_step_s": max(stalls) if stalls else None,
                          "median_no_reload_step_s": median(normal), "worst_no_reload_step_s": max(normal) if normal else None,
                          "median_reload_step_s": median(stalls), "reload_ms_median": median(reload_ms),
                          "reload_ms_max": max(reload_ms) if reload_ms else None}
        base = res[0]["median_step_s"]
        for peers in (0, 1, 2):
            r = res[peers]
            r["ratio"] = r["median_step_s"] / base
            r["floor"] = 1 + peers * share
            r["ratio_vs_floor"] = r["ratio"] / r["floor"]
            stall = r["worst_reload_step_s"] / r["median_no_reload_step_s"] if r["worst_reload_step_s"] else None
            r["worst_reload_vs_median"] = stall
            noise = r["worst_no_reload_step_s"] / r["median_no_reload_step_s"] if stall else None
            rows.append([peers, round(r["median_step_s"] * 1e3, 1), round(r["ratio"], 3), round(r["floor"], 3),
                         round(r["ratio_vs_floor"], 3), "-" if stall is None else round(r["reload_ms_max"], 1),
                         "-" if stall is None else round(stall, 3), "-" if noise is None else round(noise, 3)])
    print(table(rows, ["peers", "median step ms", "ratio vs baseline", "FLOP floor", "ratio / floor",
                       "max reload ms", "worst reload step / median", "worst other step / median"]))
    print(f"F/(F+B) measured = {share:.3f}; targets: ratio within 10% of the floor, worst reload step < 1.2x median")
    out = save_results("codistill_overhead", {"size": a.size, "steps": a.steps, "seq_len": a.seq_len,
                                              "micro_batch": micro, "export_every": K, "forward_share": share,
                                              "results": {str(k): v for k, v in res.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
