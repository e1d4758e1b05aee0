#!/usr/bin/env python
"""Claim 1 in kind: does 2-way codistillation reach a target validation perplexity in fewer
steps than synchronous training, once doubling the batch has stopped helping?

    python benchmarks/convergence.py                 # CPU preset (tiny LSTM, embedded corpus)
    python benchmarks/convergence.py --preset gpu    # larger documented preset

Three runs through the same trainer, same model, same number of steps:
  (a) baseline, batch B (one group, all of the data)
  (b) baseline, batch 2B ("twice the workers": a doubled micro batch on one rank here)
  (c) 2-way codistillation, batch B per group, each group on its own half of the data.
Reported: final val ppl of each, and steps / compute time to reach the target (default: the
final val ppl of (a)). Curves go to benchmarks/results/convergence.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from common import PY, ROOT, bench_data, save_results, scalars, table, train

PRESETS = {
    "cpu": dict(model="lstm", model_size="tiny", seq_len=64, micro=16, steps=600, export_every=25,
                burn_in=100, eval_every=25, lr=3e-3),
    "gpu": dict(model="lstm", model_size="paper", seq_len=256, micro=64, steps=20000, export_every=200,
                burn_in=2000, eval_every=250, lr=1e-3),
}


def steps_to(curve: dict[int, float], target: float) -> int | None:
    return next((s for s in sorted(curve) if curve[s] <= target), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--target_ppl", type=float, help="default: the final val ppl of baseline (a)")
    ap.add_argument("--data", help="data-prep output (default: the embedded corpus, 6 shards)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--keep_runs", help="keep the run directories here (default: a temp dir)")
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    data = Path(a.data) if a.data else bench_data()
    base_cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    runs_root = Path(a.keep_runs) if a.keep_runs else Path(tempfile.mkdtemp())
    runs = {"a_baseline_B": (1, p["micro"]), "b_baseline_2B": (1, 2 * p["micro"]),
            "c_codistill_2xB": (2, p["micro"])}
    results, curves = {}, {}
    for name, (groups, micro) in runs.items():
        cfg_path = runs_root / f"{name}.ds.json"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(dict(base_cfg, train_micro_batch_size_per_gpu=micro)))
        run = runs_root / name
        wall = train(run, ["--ds_config", cfg_path, "--data", data, "--num_groups", groups, "--model", p["model"],
                           "--model_size", p["model_size"], "--seq_len", p["seq_len"], "--max_steps", p["steps"],
                           "--lr", p["lr"], "--warmup_steps", max(1, p["steps"] // 20),
                           "--eval_every", p["eval_every"], "--save_every", 10 ** 9, "--export_every", p["export_every"],
                           "--burn_in_steps", p["burn_in"], "--seed", a.seed])
        for g in range(groups):
            tb = run / f"group_{g}" / "tb"
            curves[f"{name}/group_{g}"] = scalars(tb, "val/ppl")
            step_time = scalars(tb, "perf/step_time")
            results[f"{name}/group_{g}"] = {"final_val_ppl": curves[f"{name}/group_{g}"][p["steps"]],
                                            "micro_batch": micro, "groups": groups, "run_wall_s": wall,
                                            "step_time": step_time}
    target = a.target_ppl or results["a_baseline_B/group_0"]["final_val_ppl"]
    rows = []
    for key, r in results.items():
        s = steps_to(curves[key], target)
        compute = sum(v for k, v in r.pop("step_time").items() if s is not None and k <= s) if s else None
        r.update(steps_to_target=s, compute_s_to_target=compute, val_ppl_curve=curves[key])
        rows.append([key, r["micro_batch"], round(r["final_val_ppl"], 2), s if s else "not reached",
                     "-" if compute is None else round(compute, 1)])
    print(table(rows, ["run", "batch (seqs/group)", "final val ppl", f"steps to ppl {target:.1f}",
                       "compute s to target (per group)"]))
    png = ROOT / "benchmarks" / "results" / "convergence.png"
    plot = [PY, str(ROOT / "recipes" / "plot_runs.py"), *[str(runs_root / n) for n in runs], "--metric", "val/ppl",
            "-o", str(png)]
    if (ROOT / "recipes" / "plot_runs.py").exists():
        subprocess.run(plot, check=True)
        print(f"wrote {png}")
    out = save_results(f"convergence_{a.preset}", {"preset": p, "data": str(data), "seed": a.seed,
                                                    "target_ppl": target, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
