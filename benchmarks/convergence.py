#!/usr/bin/env python
"""Claims 1 and 3 in kind, next to the paper's other baselines: does 2-way codistillation reach
a target validation perplexity in fewer steps than synchronous training, once doubling the batch
has stopped helping - and does it matter whether the groups see disjoint or the same data?

    python benchmarks/convergence.py                 # CPU preset (tiny LSTM, embedded corpus)
    python benchmarks/convergence.py --preset gpu --data DIR   # paper-size LSTM past the predicted limit
    python benchmarks/convergence.py --preset tiny   # smoke run (seconds per run; the tests use it)
    python benchmarks/convergence.py --preset limit --runs a_baseline_B b_baseline_2B c_codistill_2xB \
        g_codistill_no_wd                            # claim 1 at the data-parallel limit that
                                                     #   benchmarks/batch_scaling.py measured

Runs through the same trainer, same model, same number of steps (pick with --runs):
  a_baseline_B        synchronous baseline, batch B, one group reading all the data
  b_baseline_2B       the same with batch 2B ("twice the workers": a doubled micro batch here)
  c_codistill_2xB     2-way codistillation, batch B per group, each group on its own half (claim 1)
  d_codistill_same    the same, but both groups read all the data in their own order (claim 3)
  e_offline_distill   two-phase distillation: batch B, one group, a_baseline_B's final model as a
                      fixed teacher (--teacher); it costs a_baseline_B's training on top
  f_label_smoothing   a_baseline_B with --label_smoothing 0.1 (the paper's "is it only smoothing?")
  g_codistill_no_wd   c_codistill_2xB with the optimizer's weight decay off: Sodhani et al. (2020)
                      found codistillation regularizes, and pays in under-fitting regimes only when
                      other regularization is reduced (the tiny LSTM has no dropout to reduce)
The "limit" preset trains on the registry corpus at the batch where doubling it saves < 20 % of
the steps (benchmarks/batch_scaling.py), with that study's LR rule (2B: lr x sqrt 2) and constant LR.
Reported: final val ppl of each, steps and compute time to reach the target (default: the final
val ppl of a_baseline_B). Curves go to <results_dir>/convergence[_preset].png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import (
    ROOT,
    add_jobs_arg,
    add_run_args,
    bench_data,
    plot,
    registry_data,
    runs_root,
    save_results,
    scalars,
    table,
    train_all,
)

from codistill.layout import RunLayout

PRESETS = {
    "tiny": dict(model="lstm", model_size="tiny", seq_len=32, micro=8, steps=16, export_every=4,
                 burn_in=4, eval_every=8, lr=3e-3, eval_batches=2),
    "cpu": dict(model="lstm", model_size="tiny", seq_len=64, micro=16, steps=600, export_every=25,
                burn_in=100, eval_every=25, lr=3e-3, eval_batches=20),
    # claim 1 at the data-parallel limit measured by benchmarks/batch_scaling.py (docs/results.md)
    "limit": dict(model="lstm", model_size="tiny", seq_len=64, micro=512, steps=160, export_every=10,
                  burn_in=40, eval_every=10, lr=3e-3 * 32 ** 0.5, eval_batches=4, data="registry", min_lr_ratio=1.0,
                  warmup=20, lr_2B=2 ** 0.5),
    # past the limit that benchmarks/batch_scaling.py predicts for a longer run: the fitted B_noise
    # grew as L^-4.1 (10.7 k tokens at val loss 5.0, 18 k at 4.4), i.e. ~58 k at 3.3 (limit 88 k);
    # 512 x 256 = 131 k tokens per step stays past it down to ~3.0 (nats of that study's 2,000-piece
    # vocabulary: measure your own data's with --noise_scale). LR: the study's square-root rule
    # from 1e-3 at 16 k. Needs --data of >= 5000 x 131 k = 0.66 B tokens (one pass).
    "gpu": dict(model="lstm", model_size="paper", seq_len=256, micro=512, steps=5000, export_every=100,
                burn_in=500, eval_every=100, lr=1e-3 * 8 ** 0.5, eval_batches=8, lr_2B=2 ** 0.5, needs_data=True),
}
# name -> (groups, micro batch factor, extra trainer flags)
RUNS = {
    "a_baseline_B": (1, 1, []),
    "b_baseline_2B": (1, 2, []),
    "c_codistill_2xB": (2, 1, []),
    "d_codistill_same": (2, 1, ["--data_split", "shared"]),
    "e_offline_distill": (1, 1, ["--teacher", "{runs}/a_baseline_B/group_0"]),
    "f_label_smoothing": (1, 1, ["--label_smoothing", 0.1]),
    "g_codistill_no_wd": (2, 1, []),
}
DS_OPTIMIZER = {"g_codistill_no_wd": {"weight_decay": 0.0}}  # run -> optimizer params changed


def steps_to(curve: dict[int, float], target: float) -> int | None:
    return next((s for s in sorted(curve) if curve[s] <= target), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--target_ppl", type=float, help="default: the final val ppl of a_baseline_B")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--export_every", type=int, help="override the preset's export interval K (sync teachers are "
                    "K..2K steps old); the results get the suffix _export<K>")
    ap.add_argument("--burn_in", type=int, help="override the preset's burn-in; the results get the suffix _burnin<N>")
    add_run_args(ap)
    add_jobs_arg(ap)
    a = ap.parse_args()
    names = [n for n in RUNS if n in a.runs]
    if "e_offline_distill" in names and "a_baseline_B" not in names:
        ap.error("e_offline_distill distils from a_baseline_B's final model: run both")
    if a.target_ppl is None and "a_baseline_B" not in names:
        ap.error("without a_baseline_B, give --target_ppl")
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    variant = ""
    for key in ("export_every", "burn_in"):
        if getattr(a, key) is not None:
            p[key] = getattr(a, key)
            variant += f"_{key.replace('_every', '').replace('_', '')}{p[key]}"
    if p.get("needs_data") and not a.data:
        ap.error(f"--preset {a.preset} needs --data: a corpus of at least {p['steps'] * p['micro'] * p['seq_len'] / 1e9:.2f} "
                 "B tokens (steps x batch, one pass), e.g. Common Crawl (data_prep/fetch_common_crawl.py, docs/data.md)")
    data = Path(a.data) if a.data else registry_data() if p.get("data") == "registry" else bench_data()
    base_cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    root = runs_root(a, "convergence_")
    results, curves, planned = {}, {}, {}
    for name in names:
        groups, factor, extra = RUNS[name]
        micro = factor * p["micro"]
        cfg_path = root / f"{name}.ds.json"
        optimizer = dict(base_cfg["optimizer"], params={**base_cfg["optimizer"]["params"], **DS_OPTIMIZER.get(name, {})})
        cfg_path.write_text(json.dumps(dict(base_cfg, train_micro_batch_size_per_gpu=micro, optimizer=optimizer)))
        lr = p["lr"] * (p.get("lr_2B", 1.0) if factor == 2 else 1.0)
        extra = [str(x).format(runs=root) for x in extra]
        args = ["--ds_config", cfg_path, "--data", data, "--num_groups", groups, "--model", p["model"],
                "--model_size", p["model_size"], "--seq_len", p["seq_len"], "--max_steps", p["steps"],
                "--lr", lr, "--warmup_steps", p.get("warmup", max(1, p["steps"] // 20)),
                "--min_lr_ratio", p.get("min_lr_ratio", 0.1),
                "--eval_every", p["eval_every"],  # the same validation tokens for B and 2B:
                "--eval_batches", max(1, p["eval_batches"] // factor),  # it counts micro-batches
                "--save_every", 10 ** 9, "--export_every", p["export_every"],
                "--burn_in_steps", p["burn_in"], "--seed", a.seed, *extra]
        planned[name] = dict(args=args, groups=groups, micro=micro, extra=extra, lr=lr, optimizer=optimizer)
    # e_offline_distill distils from a_baseline_B's final model: it trains after the others
    order = [[n for n in names if n != "e_offline_distill"], [n for n in names if n == "e_offline_distill"]]
    walls = {n: w for batch in order for n, w in zip(batch, train_all([(root / n, planned[n]["args"]) for n in batch], a))}
    for name in names:
        r, wall, run = planned[name], walls[name], root / name
        print(f"trained {name} in {wall:.0f}s")
        for g in range(r["groups"]):
            tb = RunLayout(run).group(g).tb
            curves[f"{name}/group_{g}"] = scalars(tb, "val/ppl")
            results[f"{name}/group_{g}"] = {"final_val_ppl": curves[f"{name}/group_{g}"][p["steps"]],
                                            "micro_batch": r["micro"], "groups": r["groups"], "flags": r["extra"],
                                            "lr": r["lr"], "optimizer": r["optimizer"]["params"],
                                            "run_wall_s": wall, "step_time": scalars(tb, "perf/step_time")}
    target = a.target_ppl or results["a_baseline_B/group_0"]["final_val_ppl"]
    rows = []
    for key, r in results.items():
        s = steps_to(curves[key], target)
        compute = sum(v for k, v in r.pop("step_time").items() if k <= s) if s else None
        r.update(steps_to_target=s, compute_s_to_target=compute, val_ppl_curve=curves[key])
        rows.append([key, r["micro_batch"], round(r["final_val_ppl"], 2), s if s else "not reached",
                     "-" if compute is None else round(compute, 1)])
    print(table(rows, ["run", "batch (seqs/group)", "final val ppl", f"steps to ppl {target:.1f}",
                       "compute s to target (per group)"]))
    suffix = ("" if a.preset == "cpu" else f"_{a.preset}") + variant
    png = plot([root / n for n in names], Path(a.results_dir) / f"convergence{suffix}.png",
               title=f"validation perplexity ({a.preset} preset)")
    print(f"wrote {png}")
    out = save_results(f"convergence_{a.preset}{variant}", {"preset": p, "runs": names, "data": str(data), "seed": a.seed,
                                                    "target_ppl": target, "results": results}, a.results_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
