#!/usr/bin/env python
"""What each teacher placement costs per step, side by side in one run (issue 17 item 6).

    python benchmarks/teacher_speed.py [--steps 30] [--repeats 2] [--size tiny] [--topk 64]

One group of 2 ranks (ZeRO-3, the deepspeed launcher) distils from a fixed teacher (--teacher,
a finished 1-rank run made first), so that a partitioned teacher has a group to be partitioned
over and every mode runs the same teacher on the same batches. Modes: full (the default),
--teacher_partition, --teacher_offload cpu, --teacher_topk K, and partition + top-K. Step time
is the trainer's perf/step_time (median over the steps after --burn_in_steps), the modes run
interleaved --repeats times so that a shared machine's drift falls on all of them alike, and
each is reported relative to the full teacher of the same repeat.

On a CPU the "device" is host memory: offloading copies weights memcpy-fast and saves nothing,
and a partitioned teacher's all-gathers go through gloo/shared memory; on GPUs the costs differ
(PCIe for offload, NVLink/IB all-gathers for partition) - docs/teacher_memory.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import bench_data, median, save_results, scalars, table, train

from codistill.layout import RunLayout

MODES = {"full": [], "partition": ["--teacher_partition"], "offload": ["--teacher_offload", "cpu"],
         "topk": ["--teacher_topk", "{k}"], "partition+topk": ["--teacher_partition", "--teacher_topk", "{k}"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", default="tiny", help="LSTM preset")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--burn_in", type=int, default=5)
    a = ap.parse_args()
    data = bench_data()
    root = Path(tempfile.mkdtemp(prefix="teacher_speed_"))
    common = ["--data", data, "--model", "lstm", "--model_size", a.size, "--seq_len", 64, "--eval_every", 10**6,
              "--save_every", 10**6, "--log_every", 10**6, "--eval_batches", 1]
    train(root / "teacher", [*common, "--num_groups", 1, "--max_steps", 5, "--distill_weight", 0,
                             "--ds_config", "ds_configs/zero2.json"])
    teacher = root / "teacher" / "group_0"
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(a.repeats):
        for mode, flags in MODES.items():
            run = root / f"{mode}_{rep}"
            train(run, [*common, "--num_groups", 1, "--max_steps", a.steps, "--burn_in_steps", a.burn_in,
                        "--teacher", teacher, "--ds_config", "ds_configs/zero3.json",
                        *[f.format(k=a.topk) for f in flags]], num_ranks=2)
            st = scalars(RunLayout(run).group(0).tb, "perf/step_time")
            times[mode].append(median([v for s, v in st.items() if s > a.burn_in + 1]))
    rows, out = [], {}
    for mode in MODES:
        ratios = [t / f for t, f in zip(times[mode], times["full"])]
        out[mode] = {"step_ms": [round(t * 1e3, 2) for t in times[mode]], "vs_full": [round(r, 3) for r in ratios]}
        rows.append([mode, median(times[mode]) * 1e3, median(ratios)])
    print(table(rows, ["teacher mode", "step ms (median)", "x full teacher"]))
    path = save_results("teacher_speed", {"size": a.size, "steps": a.steps, "repeats": a.repeats, "topk": a.topk,
                                          "ranks_per_group": 2, "zero_stage": 3, "modes": out})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
