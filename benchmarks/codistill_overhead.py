#!/usr/bin/env python
"""What codistillation costs per step: baseline vs 1 and 2 peers, next to the FLOP floor,
and the stall a teacher reload causes. One run, side by side.

    python benchmarks/codistill_overhead.py [--steps 60] [--repeats 3] [--size tiny]

- baseline: --num_groups 1; codistillation: --num_groups 2 (1 peer) and 3 (2 peers), all
  groups hosted by one process, same model, batch and data per group. Step time is the
  trainer's perf/step_time (forward, teacher forwards, loss, backward, optimizer) after the
  teachers are on. The configurations run interleaved, --repeats times each (0, 1, 2 peers,
  0, 1, 2, ...), so that the drift of a shared machine falls on all of them alike.
- floor = 1 + peers * F / (F + B): each teacher adds one forward pass. F and B are measured
  here on the same model and batch (F = forward, F + B = forward + backward).
- reload stall: teachers are swapped in between steps (teacher/reload_ms, waiting for the
  loader included); a step with a reload costs step_time + reload time. Target: worst such
  step < 1.2x the median step. Also shown: the worst such step against the steps around it
  (drift removed) and the worst step without a reload (the machine's own noise).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, bench_data, median, save_results, scalars, table, train

from codistill.data import GroupStream, TokenData
from codistill.layout import RunLayout
from model import build_model, preset_config


def forward_backward_share(data, size, micro, seq_len, reps=30) -> float:
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


def collect(run: Path, groups: int, on_from: int) -> dict:
    """{(group, step): (step time, teacher swap time)} of one run, from the teachers' first step on.

    The swap (waiting for the loader included) happens once per rank between steps; it is
    charged in full to every group's step (logged by group 0)."""
    reload = scalars(RunLayout(run).group(0).tb, "teacher/reload_ms")
    return {(g, s): (v, reload.get(s, 0.0) / 1e3) for g in range(groups)
            for s, v in scalars(RunLayout(run).group(g).tb, "perf/step_time").items() if s >= on_from}


def summarise(runs: list[dict], K: int) -> dict:
    """Pooled over runs: median step, steps with a swap (step + swap) against those without.

    Two views of the worst step with a swap: over all runs (on a shared machine this is the
    machine's noise as much as the swap), and per step the fastest of the repeated runs (the
    runs are deterministic, so step s does the same work in each; a spike rarely hits the
    same step of every run, a stall does)."""
    steps = [t for r in runs for t, _ in r.values()]
    normal = [t for r in runs for t, w in r.values() if not w]
    stall = [t + w for r in runs for t, w in r.values() if w]
    best = {k: min(r[k][0] + r[k][1] for r in runs) for k in set.intersection(*(set(r) for r in runs))}
    swapped = {k for k, (_, w) in runs[0].items() if w}
    best_normal = median([v for k, v in best.items() if k not in swapped])
    out = {"median_step_s": median(steps), "steps_measured": len(steps), "reload_steps": len(stall),
           "median_no_reload_step_s": median(normal), "worst_no_reload_step_s": max(normal)}
    if not stall:
        return out
    # each position in the export interval against the 10 steps around it (drift removed)
    position: dict[int, list] = {}
    for r in runs:
        for (g, s), (t, w) in r.items():
            near = [r[(g, u)][0] for u in range(s - 5, s + 6) if u != s and (g, u) in r and not r[(g, u)][1]]
            position.setdefault(s % K, []).append((t + w) / median(near))
    out.update({
        "median_reload_step_s": median(stall), "worst_reload_step_s": max(stall),
        "worst_reload_vs_median": max(stall) / median(normal),
        "worst_no_reload_vs_median": max(normal) / median(normal),
        "best_of_repeats_worst_reload_vs_median": max(best[k] for k in swapped if k in best) / best_normal,
        "best_of_repeats_worst_no_reload_vs_median": max(v for k, v in best.items() if k not in swapped) / best_normal,
        "step_vs_neighbours_by_position": {p: median(v) for p, v in sorted(position.items())},
        "reload_ms_median": median([w * 1e3 for r in runs for w in {s: w for (_, s), (_, w) in r.items() if w}.values()]),
        "reload_ms_max": max(w * 1e3 for r in runs for _, w in r.values())})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved (0,1,2,0,1,2,...)")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--export_every", type=int, default=10)
    a = ap.parse_args()
    data_dir = bench_data()
    data = TokenData(data_dir)
    micro = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())["train_micro_batch_size_per_gpu"]
    K = a.export_every
    on_from = 2 * K + 1  # first step with teachers (sync mode: boundary 2K swaps in exports of K)
    common = ["--data", data_dir, "--model_size", a.size, "--max_steps", a.steps, "--seq_len", a.seq_len,
              "--eval_every", 10 ** 6, "--save_every", 10 ** 6, "--export_every", K, "--burn_in_steps", K]
    runs: dict[int, list] = {0: [], 1: [], 2: []}
    walls: dict[int, list] = {0: [], 1: [], 2: []}
    shares, res, rows, pos_rows = [], {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):  # interleaved, so that drift of a shared machine hits every configuration
            shares.append(forward_backward_share(data, a.size, micro, a.seq_len))
            for peers in (0, 1, 2):
                run = Path(tmp) / f"peers{peers}_rep{rep}"
                walls[peers].append(train(run, common + ["--num_groups", peers + 1]))
                runs[peers].append(collect(run, peers + 1, on_from))
                shutil.rmtree(run)
    share = median(shares)
    base = median([t for r in runs[0] for t, _ in r.values()])
    for peers in (0, 1, 2):
        x = res[peers] = summarise(runs[peers], K)
        x.update(ratio=x["median_step_s"] / base, floor=1 + peers * share, wall_s=walls[peers])
        x["ratio_vs_floor"] = x["ratio"] / x["floor"]
        stall = "worst_reload_vs_median" in x
        rows.append([peers, round(x["median_step_s"] * 1e3, 1), round(x["ratio"], 3), round(x["floor"], 3),
                     round(x["ratio_vs_floor"], 3)] + (["-"] * 5 if not stall else [
                         round(x["reload_ms_max"], 1), round(x["worst_reload_vs_median"], 3),
                         round(x["worst_no_reload_vs_median"], 3),
                         round(x["best_of_repeats_worst_reload_vs_median"], 3),
                         round(x["best_of_repeats_worst_no_reload_vs_median"], 3)]))
        if stall:
            pos_rows.append([peers] + [round(v, 3) for v in x["step_vs_neighbours_by_position"].values()])
    print(table(rows, ["peers", "median step ms", "ratio vs baseline", "FLOP floor", "ratio / floor",
                       "max swap ms", "worst swap step / median", "worst other / median",
                       "best-of-repeats: worst swap step / median", "... worst other / median"]))
    print("\nstep time / median of the 10 steps around it, by position in the export interval "
          f"(swap at position 1, loader reads at position {K // 2 + 1}):")
    print(table(pos_rows, ["peers"] + [str(p) for p in sorted(res[1]["step_vs_neighbours_by_position"])]))
    print(f"F/(F+B) measured = {share:.3f}; targets: ratio within 10% of the floor, worst reload step < 1.2x median")
    out = save_results("codistill_overhead", {"size": a.size, "steps": a.steps, "repeats": a.repeats,
                                              "seq_len": a.seq_len, "micro_batch": micro, "export_every": K,
                                              "forward_share": share, "forward_share_per_repeat": shares,
                                              "results": {str(k): v for k, v in res.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
