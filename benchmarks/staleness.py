#!/usr/bin/env python
"""Claim 2 in kind: how stale may teachers be? 2-way codistillation with exports every K steps
for several K (sync teachers: at step s a student uses its peer's export of step s-K..s-2K),
next to the baseline of the same groups (--distill_weight 0): final val ppl and the compute
overhead of the exchange (median step time, mean step time - which includes writing exports and
swapping teachers - and the time spent in exports).

    python benchmarks/staleness.py                   # CPU preset: K in 5 25 100, 600 steps
    python benchmarks/staleness.py --preset gpu      # larger documented preset
    python benchmarks/staleness.py --preset tiny     # smoke run (the tests use it)
    python benchmarks/staleness.py --every 10 50     # your own K values
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import add_run_args, bench_data, median, plot, runs_root, save_results, scalars, table, train

from codistill.layout import RunLayout

PRESETS = {
    "tiny": dict(model="lstm", model_size="tiny", seq_len=32, steps=16, every=[2, 4], burn_in=4, eval_every=8,
                 eval_batches=2),
    "cpu": dict(model="lstm", model_size="tiny", seq_len=64, steps=600, every=[5, 25, 100], burn_in=100,
                eval_every=50, eval_batches=20),
    "gpu": dict(model="lstm", model_size="paper", seq_len=256, steps=20000, every=[50, 500, 2500], burn_in=2000,
                eval_every=500, eval_batches=50),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--every", nargs="+", type=int, help="export intervals K (default: the preset's)")
    ap.add_argument("--seed", type=int, default=1234)
    add_run_args(ap)
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    if a.every:
        p["every"] = a.every
    if any(2 * k >= p["steps"] - p["burn_in"] for k in p["every"]):
        ap.error(f"every K in --every {p['every']} needs 2K < steps - burn_in ({p['steps']} - {p['burn_in']}) "
                 f"or its teachers never switch on")
    data = Path(a.data) if a.data else bench_data()
    root = runs_root(a, "staleness_")
    common = ["--data", data, "--num_groups", 2, "--model", p["model"], "--model_size", p["model_size"],
              "--seq_len", p["seq_len"], "--max_steps", p["steps"], "--burn_in_steps", p["burn_in"],
              "--eval_every", p["eval_every"], "--eval_batches", p["eval_batches"], "--save_every", 10 ** 9,
              "--warmup_steps", max(1, p["steps"] // 20), "--seed", a.seed]
    configs = [("baseline", ["--distill_weight", 0, "--export_every", p["steps"]])] + \
              [(f"export_every_{k}", ["--export_every", k]) for k in p["every"]]
    results, rows = {}, []
    for name, extra in configs:
        wall = train(root / name, common + extra)
        print(f"trained {name} in {wall:.0f}s")
        tbs = [root / RunLayout(name).group(g).tb for g in (0, 1)]
        after = [v for tb in tbs for s, v in scalars(tb, "perf/step_time").items() if s > p["burn_in"]]
        staleness = [v for tb in tbs for v in scalars(tb, "teacher/staleness").values()]
        results[name] = {
            "export_every": None if name == "baseline" else int(name.rsplit("_", 1)[1]),
            "val_ppl": [scalars(tb, "val/ppl")[p["steps"]] for tb in tbs],
            "median_step_s": median(after), "mean_step_s": statistics.fmean(after), "wall_s": wall,
            "teacher_staleness_mean": statistics.fmean(staleness) if staleness else None,
            "teacher_staleness_max": max(staleness) if staleness else None}
    base = results["baseline"]
    for name, r in results.items():
        r["median_step_vs_baseline"] = r["median_step_s"] / base["median_step_s"]
        r["mean_step_vs_baseline"] = r["mean_step_s"] / base["mean_step_s"]
        rows.append([name, round(r["val_ppl"][0], 2), round(r["val_ppl"][1], 2),
                     "-" if r["teacher_staleness_mean"] is None else round(r["teacher_staleness_mean"], 1),
                     round(r["median_step_s"] * 1e3, 1), round(r["median_step_vs_baseline"], 3),
                     round(r["mean_step_vs_baseline"], 3)])
    print(table(rows, ["run", "val ppl group 0", "val ppl group 1", "mean teacher age (steps)", "median step ms",
                       "median step vs baseline", "mean step vs baseline"]))
    suffix = "" if a.preset == "cpu" else f"_{a.preset}"
    png = plot([root / n for n, _ in configs], Path(a.results_dir) / f"staleness{suffix}.png",
               title=f"validation perplexity by export interval ({a.preset} preset)")
    print(f"wrote {png}")
    out = save_results(f"staleness_{a.preset}", {"preset": p, "data": str(data), "seed": a.seed,
                                                  "results": results}, a.results_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
