#!/usr/bin/env python
"""Claim 4 in kind: do two retrains of a codistilled model disagree less ("prediction churn")
than two retrains of an ordinary model, about as little as two 2-model ensembles?

    python benchmarks/churn.py --preset tiny     # smoke run (seconds of training per run)
    python benchmarks/churn.py                   # CPU preset (tiny LSTM, embedded corpus)
    python benchmarks/churn.py --preset gpu      # larger documented preset

Four runs through the same trainer, two seeds each of:
  base_seedS:   2 groups with --distill_weight 0, i.e. two INDEPENDENT baselines, each on its
                own half of the data (exactly the data a codistilled group sees);
  codist_seedS: 2-way codistillation, same groups, same data, same steps.
Then recipes/evaluate.py --compare between the two seeds of each kind gives, on the val split:
  baseline churn   = base_seed1/group_0 vs base_seed2/group_0
  ensemble churn   = ensemble(base_seed1) vs ensemble(base_seed2)   (2-model ensembles)
  codistill churn  = codist_seed1/group_0 vs codist_seed2/group_0
(mean |p_a(y) - p_b(y)| of the true next token, top-1 disagreement, symmetric KL) and the
val ppl of each. The paper's result: codistillation's churn is close to the ensemble's and far
below the baseline's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from common import PY, ROOT, add_jobs_arg, add_run_args, bench_data, runs_root, save_results, table, train_all

PRESETS = {
    "tiny": dict(model="lstm", model_size="tiny", seq_len=32, steps=20, export_every=5, burn_in=5,
                 eval_every=10, lr=3e-3, max_tokens=4096),
    "cpu": dict(model="lstm", model_size="tiny", seq_len=64, steps=600, export_every=25, burn_in=100,
                eval_every=50, lr=3e-3, max_tokens=None),
    "gpu": dict(model="lstm", model_size="paper", seq_len=256, steps=20000, export_every=200, burn_in=2000,
                eval_every=500, lr=1e-3, max_tokens=None),
}


def evaluate(a: Path, b: Path | None, out: Path, max_tokens, quiet: bool = False) -> dict:
    """recipes/evaluate.py over run ``a``'s groups (and run ``b``'s: --compare): each group's ppl,
    the ensemble of each run's groups, churn between every pair."""
    cmd = [PY, str(ROOT / "recipes" / "evaluate.py"), "--run_dir", str(a), "--json", str(out),
           "--state", "fresh"]  # every window from zeros, as these results were measured
    if b is not None:
        cmd += ["--compare", str(b)]
    if max_tokens:
        cmd += ["--max_tokens", str(max_tokens)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if not quiet:
        print(proc.stdout)
    return json.loads(out.read_text())


def pair(res: dict, a: str, b: str) -> dict:
    return next(c for c in res["churn"] if c["a"] == a and c["b"] == b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--seeds", default="1,2", help="the two retrain seeds")
    ap.add_argument("--plot_from", metavar="JSON", help="only redraw the bar chart of a results file of this script")
    add_run_args(ap)
    add_jobs_arg(ap)
    a = ap.parse_args()
    if a.plot_from:
        res = json.loads(Path(a.plot_from).read_text())
        preset = res["preset"].get("name", Path(a.plot_from).stem.removeprefix("churn_"))
        suffix = "" if preset == "cpu" else f"_{preset}"
        rows = {k: (v, v["val_ppl_seed1"]) for k, v in res["results"].items()}
        print(f"wrote {bar_chart(rows, Path(a.results_dir) / f'churn{suffix}.png', preset)}")
        return
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    seeds = [int(s) for s in a.seeds.split(",")]
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise SystemExit("--seeds needs two different seeds, e.g. 1,2")
    data = Path(a.data) if a.data else bench_data(2000 if a.preset == "tiny" else 8000)
    root = runs_root(a, "churn_")
    runs = {f"{kind}_seed{s}": [
        "--data", data, "--num_groups", 2, "--distill_weight", distill, "--model", p["model"],
        "--model_size", p["model_size"], "--seq_len", p["seq_len"], "--max_steps", p["steps"],
        "--lr", p["lr"], "--warmup_steps", max(1, p["steps"] // 20), "--eval_every", p["eval_every"],
        "--save_every", 10 ** 9, "--export_every", p["export_every"], "--burn_in_steps", p["burn_in"],
        "--seed", s] for kind, distill in (("base", 0), ("codist", 1)) for s in seeds}
    walls = dict(zip(runs, train_all([(root / name, args) for name, args in runs.items()], a)))
    for name, wall in walls.items():
        print(f"trained {name} in {wall:.0f}s")
    s1, s2 = seeds
    base = evaluate(root / f"base_seed{s1}", root / f"base_seed{s2}", root / "eval_base.json", p["max_tokens"])
    cd = evaluate(root / f"codist_seed{s1}", root / f"codist_seed{s2}", root / "eval_codist.json", p["max_tokens"])
    rows = {
        "baseline (1 model)": (pair(base, f"base_seed{s1}/group_0", f"base_seed{s2}/group_0"),
                               base["groups"][f"base_seed{s1}/group_0"]["ppl"]),
        "2-model ensemble": (pair(base, f"base_seed{s1}/ensemble", f"base_seed{s2}/ensemble"),
                             base["ensembles"][f"base_seed{s1}"]["ppl"]),
        "codistillation (1 model)": (pair(cd, f"codist_seed{s1}/group_0", f"codist_seed{s2}/group_0"),
                                     cd["groups"][f"codist_seed{s1}/group_0"]["ppl"]),
    }
    print(table([[k, ppl_, c["mean_abs_p_diff"], c["top1_disagreement"], c["sym_kl"]]
                 for k, (c, ppl_) in rows.items()],
                ["model", f"val ppl (seed {s1})", "churn |dp(y)|", "top-1 disagreement", "sym KL"]))
    out = save_results(f"churn_{a.preset}", {
        "preset": p, "data": str(data), "seeds": seeds, "train_wall_s": walls, "tokens_evaluated": base["tokens"],
        "results": {k: {"val_ppl_seed1": v, **c} for k, (c, v) in rows.items()},
        "evaluate": {"baseline": base, "codistill": cd}}, a.results_dir)
    print(f"wrote {out}")
    suffix = "" if a.preset == "cpu" else f"_{a.preset}"
    print(f"wrote {bar_chart(rows, Path(a.results_dir) / f'churn{suffix}.png', a.preset)}")


def bar_chart(rows: dict, png: Path, preset: str) -> Path:
    """One panel per churn metric, one bar per kind of model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [("mean_abs_p_diff", "mean |p_a(y) - p_b(y)|"), ("top1_disagreement", "top-1 disagreement"),
               ("sym_kl", "symmetric KL")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, label) in zip(axes, metrics):
        order = ["baseline (1 model)", "2-model ensemble", "codistillation (1 model)"]
        names = sorted(rows, key=lambda n: order.index(n) if n in order else len(order))
        colors = {"baseline (1 model)": "#888", "2-model ensemble": "#4a7", "codistillation (1 model)": "#37c"}
        ax.bar(range(len(names)), [rows[n][0][key] for n in names], color=[colors.get(n, "#c73") for n in names])
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"prediction churn between two retrains (different seeds), {preset} preset", fontsize=11)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png


if __name__ == "__main__":
    main()
