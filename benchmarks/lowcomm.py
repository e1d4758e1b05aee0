#!/usr/bin/env python
"""Codistillation next to the methods picked for low-communication training (issue 30 item 4):
G = 2 and 4 groups on disjoint shards of the registry corpus, the same model, per-group batch B
and steps in every arm; validation loss against steps and against bytes exchanged, each group's
val ppl, the ensemble's and the churn between groups.

    python benchmarks/lowcomm.py                          # CPU preset (tiny LSTM, registry corpus, ~26 min)
    python benchmarks/lowcomm.py --preset tiny            # smoke run (the tests use it)
    python benchmarks/lowcomm.py --keep_runs runs/lowcomm # a rerun reuses every finished arm

Arms (G groups, batch B per group, H = the exchange interval, --export_every):
  g<G>_independent    G groups, no exchange: --distill_weight 0 (no distillation term, so no exports)
  g<G>_sync_dp        synchronous data parallelism: --num_groups 1 (it reads every shard), batch G x B,
                      LR x sqrt(G) (the square-root rule of benchmarks/batch_scaling.py); its bytes are
                      the ring all-reduce of G ranks that the trainer reports for the same model
                      (summary.json exchange_bytes.allreduce_equiv_bytes_per_step of g<G>_independent)
  g<G>_sync_dp_lr1    the same at the groups' own LR: how much of sync DP's lead is its LR
  g<G>_average_H<H>   LocalSGD: every H steps every group's weights become the groups' mean
  g<G>_diloco_H<H>    DiLoCo: every H steps Nesterov SGD (--outer_lr 0.7, --outer_momentum 0.9) on the
                      pseudo-gradient (round start - the groups' mean)
  g<G>_distill_H<H>   codistillation: the peers' exports of every H steps are teachers after the burn-in
  g2_hetero_H<H>      an LSTM (group 0) and a Transformer (group 1) codistilling, one launch per group
                      (--group_id, started together) with --peer_models any
Bytes are per group: the export files it wrote plus the peers' exports it read (TensorBoard
exchange/bytes_written + exchange/bytes_read, summary.json exchange_bytes.total); for sync DP the
bytes each rank sends. Val ppl, ensemble ppl and churn: recipes/evaluate.py on the val split
(benchmarks/churn.py evaluate). Runs are kept (default runs/lowcomm_<preset>): an arm finished
(every group's summary.json) with the same flags is never retrained; any other is trained again
from scratch. Up to --jobs (2) single-launch arms train at once,
one thread each; the heterogeneous pair (two launches) trains alone.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from churn import evaluate
from common import (
    ROOT,
    add_run_args,
    bench_data,
    registry_data,
    runs_root,
    save_results,
    scalars,
    table,
    train_together,
)

from codistill.layout import RunLayout

PRESETS = {
    "tiny": dict(data="embedded", groups=[2], intervals=[4], model="lstm", model_size="tiny", seq_len=32, micro=8,
                 steps=16, burn_in=4, eval_every=8, lr=3e-3, warmup=2, val_tokens=2048, max_tokens=4096),
    # H = 10 (40 rounds: close to LocalSGD's frequent averaging) and 50 (8 rounds: DiLoCo's regime of few
    # outer steps, H = 1/8 of the run); the burn-in is the convergence benchmark's (100 steps)
    "cpu": dict(data="registry", groups=[2, 4], intervals=[10, 50], model="lstm", model_size="tiny", seq_len=64,
                micro=16, steps=400, burn_in=100, eval_every=25, lr=3e-3, warmup=20, val_tokens=16384,
                max_tokens=65536),
}
METHODS = ("average", "diloco", "distill")
HETERO = [("lstm", "tiny"), ("transformer", "tiny")]  # group 0, group 1
STYLE = {"independent": ("#888", "Independent groups"), "sync_dp": ("k", "sync DP (G x B)"),
         "sync_dp_lr1": ("#666", "sync DP (G x B), the groups' LR"),
         "average": ("C0", "LocalSGD"), "diloco": ("C1", "DiLoCo"), "distill": ("C2", "codistillation"),
         "hetero": ("C3", "codistillation LSTM + Transformer")}


def plan(p: dict) -> list[dict]:
    """Every arm: name, G, method, H, the trainer's --num_groups, micro batch and LR, extra flags."""
    out = []
    for G in p["groups"]:
        out += [dict(name=f"g{G}_independent", G=G, method="independent", H=None, groups=G, micro=p["micro"],
                     lr=p["lr"], flags=["--distill_weight", 0]),
                dict(name=f"g{G}_sync_dp", G=G, method="sync_dp", H=None, groups=1, micro=G * p["micro"],
                     lr=p["lr"] * math.sqrt(G), flags=[]),
                dict(name=f"g{G}_sync_dp_lr1", G=G, method="sync_dp_lr1", H=None, groups=1, micro=G * p["micro"],
                     lr=p["lr"], flags=[])]
        out += [dict(name=f"g{G}_{m}_H{H}", G=G, method=m, H=H, groups=G, micro=p["micro"], lr=p["lr"],
                     flags=["--peer_use", m]) for H in p["intervals"] for m in METHODS]
    H = p["intervals"][0]
    out.append(dict(name=f"g2_hetero_H{H}", G=2, method="hetero", H=H, groups=2, micro=p["micro"], lr=p["lr"],
                    flags=["--peer_use", "distill", "--peer_models", "any"]))
    return out


def trainer_args(p: dict, arm: dict, data: Path, ds_config: Path, seed: int, model=None) -> list:
    model, size = model or (p["model"], p["model_size"])
    return ["--ds_config", ds_config, "--data", data, "--num_groups", arm["groups"], "--model", model,
            "--model_size", size, "--seq_len", p["seq_len"], "--max_steps", p["steps"], "--lr", arm["lr"],
            "--warmup_steps", p["warmup"], "--eval_every", p["eval_every"],
            "--eval_batches", max(1, p["val_tokens"] // (arm["micro"] * p["seq_len"])),  # the same val tokens
            "--save_every", 10 ** 9, "--export_every", arm["H"] or p["steps"], "--burn_in_steps", p["burn_in"],
            "--outer_lr", 0.7, "--outer_momentum", 0.9, "--seed", seed, *arm["flags"]]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: arms training at once print from their own threads
    sys.stdout.flush()


def finished(run: Path, groups: int) -> bool:
    return all(RunLayout(run).group(g).summary.is_file() for g in range(groups))


def train_arm(p: dict, arm: dict, data: Path, root: Path, seed: int, threads: dict) -> None:
    """Train the arm unless it finished before with the same flags and batch (<arm>.cmd.json), then
    evaluate it (an evaluation newer than the run is reused too)."""
    run, ds, record = root / arm["name"], root / f"{arm['name']}.ds.json", root / f"{arm['name']}.cmd.json"
    base = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds_config = dict(base, train_micro_batch_size_per_gpu=arm["micro"])
    launches = [(run, trainer_args(p, arm, data, ds, seed, model) + ["--group_id", g]) for g, model in
                enumerate(HETERO)] if arm["method"] == "hetero" else [(run, trainer_args(p, arm, data, ds, seed))]
    planned = {"ds_config": ds_config, "launches": [[str(x) for x in args] for _, args in launches]}
    if finished(run, arm["groups"]) and record.is_file() and json.loads(record.read_text()) == planned:
        say(f"reused {arm['name']} (finished in {run})")
    else:
        shutil.rmtree(run, ignore_errors=True)
        ds.write_text(json.dumps(ds_config))
        wall = train_together(launches, env=threads)  # the heterogeneous pair: one launch per group, together
        record.write_text(json.dumps(planned, indent=1))
        say(f"trained {arm['name']} in {wall:.0f}s")
    ev = root / f"{arm['name']}.eval.json"
    if not ev.is_file() or ev.stat().st_mtime < RunLayout(run).group(0).summary.stat().st_mtime:
        evaluate(run, None, ev, p["max_tokens"], quiet=True)


def cumulative(points: dict[int, float], step: int) -> float:
    """The last cumulative value logged at or before ``step`` (0 before the first)."""
    return max(((s, v) for s, v in points.items() if s <= step), default=(0, 0.0))[1]


def collect(p: dict, arm: dict, root: Path, dp_per_step: float | None) -> dict:
    """One arm's numbers, read back from its run directory and its evaluation."""
    run = RunLayout(root / arm["name"])
    groups = [run.group(g) for g in range(arm["groups"])]
    summaries = [json.loads(g.summary.read_text()) for g in groups]
    losses = [scalars(g.tb, "val/loss") for g in groups]
    steps = sorted(set.intersection(*(set(x) for x in losses)))
    curve = {s: statistics.mean(x[s] for x in losses) for s in steps}
    if arm["groups"] == 1:  # sync DP
        bytes_at = {s: dp_per_step * s for s in steps}
    else:  # mean over groups of (written + read), cumulative at each evaluation
        logged = [(scalars(g.tb, "exchange/bytes_written"), scalars(g.tb, "exchange/bytes_read")) for g in groups]
        bytes_at = {s: statistics.mean(cumulative(w, s) + cumulative(r, s) for w, r in logged) for s in steps}
    ev = json.loads((root / f"{arm['name']}.eval.json").read_text())
    ppl = {k.split("/")[-1]: v["ppl"] for k, v in ev["groups"].items()}
    ens = ev["ensembles"].get(arm["name"], {}).get("ppl")
    churn = {m: statistics.mean(c[m] for c in ev["churn"]) if ev["churn"] else None
             for m in ("mean_abs_p_diff", "top1_disagreement", "sym_kl")}
    total = dp_per_step * p["steps"] if arm["groups"] == 1 else \
        statistics.mean(s["exchange_bytes"]["total"] for s in summaries)
    return dict({k: arm[k] for k in ("G", "method", "H", "micro", "lr")}, num_groups=arm["groups"],
                tokens_per_step_per_group=arm["micro"] * p["seq_len"], flags=[str(f) for f in arm["flags"]],
                models=[s.get("num_params") for s in summaries], train_wall_s=max(s["wall_time_s"] for s in summaries),
                val_ppl=ppl, val_ppl_mean=statistics.mean(ppl.values()), ensemble_ppl=ens, churn=churn,
                bytes_per_group=total, allreduce_equiv_bytes_per_step=summaries[0]["exchange_bytes"]
                ["allreduce_equiv_bytes_per_step"], final_val_loss=curve[steps[-1]], val_loss_curve=curve,
                bytes_curve=bytes_at, eval_tokens=ev["tokens"])


def verdict(p: dict, res: dict) -> list[str]:
    """Which arm wins where, and DiLoCo against the published shape (Douillard et al. 2023: DiLoCo
    on 8 workers as good as fully synchronous training, at 500x less communication)."""
    lines = []
    for G in p["groups"]:
        r = {k: v for k, v in res.items() if v.get("G") == G}
        ind, dp = r[f"g{G}_independent"], r[f"g{G}_sync_dp"]
        best = min(r, key=lambda k: r[k]["val_ppl_mean"])
        lines.append(f"G={G}: lowest single-model val ppl: {best} ({r[best]['val_ppl_mean']:.2f}); sync DP "
                     f"{dp['val_ppl_mean']:.2f} (at the groups' LR {r[f'g{G}_sync_dp_lr1']['val_ppl_mean']:.2f}), "
                     f"independent groups {ind['val_ppl_mean']:.2f} (their {G}-model "
                     f"ensemble {ind['ensemble_ppl']:.2f})")
        for H in p["intervals"]:
            arms = sorted(METHODS, key=lambda m: r[f"g{G}_{m}_H{H}"]["val_ppl_mean"])
            order = " < ".join(f"{m} {r[f'g{G}_{m}_H{H}']['val_ppl_mean']:.2f}" for m in arms)
            mb = {m: r[f"g{G}_{m}_H{H}"]["bytes_per_group"] / 1e6 for m in METHODS}
            cd = r[f"g{G}_distill_H{H}"]
            lines.append(f"  H={H}: {order}; bytes per group {mb['average']:.0f} / {mb['diloco']:.0f} / "
                         f"{mb['distill']:.0f} MB (average / diloco / distill) against sync DP's "
                         f"{dp['bytes_per_group'] / 1e6:.0f} MB; codistillation "
                         f"{'beats' if cd['val_ppl_mean'] < ind['val_ppl_mean'] else 'does not beat'} the "
                         f"independent groups ({cd['val_ppl_mean']:.2f} vs {ind['val_ppl_mean']:.2f}), its "
                         f"ensemble {cd['ensemble_ppl']:.2f}, churn {cd['churn']['mean_abs_p_diff']:.4f} vs "
                         f"{ind['churn']['mean_abs_p_diff']:.4f}")
        h0 = p["intervals"][0]
        if f"g{G}_hetero_H{h0}" in r:
            het, pair = r[f"g{G}_hetero_H{h0}"], r[f"g{G}_distill_H{h0}"]
            lines.append(f"  heterogeneous pair (H={h0}): LSTM {het['val_ppl']['group_0']:.2f}, Transformer "
                         f"{het['val_ppl']['group_1']:.2f}, ensemble {het['ensemble_ppl']:.2f}; the LSTM pair "
                         f"{pair['val_ppl_mean']:.2f}, ensemble {pair['ensemble_ppl']:.2f}")
        nats = {k: math.log(v["val_ppl_mean"]) for k, v in r.items()}
        for H in p["intervals"]:
            ind_, d = nats[f"g{G}_independent"], nats[f"g{G}_diloco_H{H}"]
            share = {k: (ind_ - d) / (ind_ - nats[f"g{G}_{k}"]) if ind_ > nats[f"g{G}_{k}"] else float("nan")
                     for k in ("sync_dp", "sync_dp_lr1")}
            lines.append(f"  DiLoCo H={H}: val loss {d:.3f} nats, sync DP {nats[f'g{G}_sync_dp']:.3f} (at the "
                         f"groups' LR {nats[f'g{G}_sync_dp_lr1']:.3f}), independent {ind_:.3f}: DiLoCo recovers "
                         f"{share['sync_dp']:.0%} of sync DP's gain over independent groups ({share['sync_dp_lr1']:.0%} "
                         f"of the groups'-LR one's) -> the published shape (close to sync DP: >= 75 % of that gain) "
                         f"{'holds' if share['sync_dp'] >= 0.75 else 'does not hold'} here")
    return lines


def plot(p: dict, res: dict, png: Path) -> Path:
    """Per G, val loss (mean over groups) against steps and against bytes per group (log x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(p["groups"]), 2, figsize=(12, 4.2 * len(p["groups"])), squeeze=False)
    for (ax_s, ax_b), G in zip(axes, p["groups"]):
        for r in res.values():
            if r.get("G") != G:
                continue
            color, label = STYLE[r["method"]]
            ls = "-." if r["method"] == "sync_dp_lr1" else "--" if r["H"] not in (None, p["intervals"][0]) else "-"
            label += f" H={r['H']}" if r["H"] else ""
            steps, loss = zip(*sorted(r["val_loss_curve"].items()))
            ax_s.plot(steps, loss, ls, color=color, label=label)
            pts = [(r["bytes_curve"][s], v) for s, v in zip(steps, loss) if r["bytes_curve"][s] > 0]
            if r["method"] == "independent":
                ax_b.axhline(r["final_val_loss"], color=color, ls=":", label=f"{label} (0 bytes): final")
            elif pts:
                ax_b.plot(*zip(*pts), ls, color=color, marker=".", label=label)
        ax_s.set(xlabel="step", ylabel="val loss (mean over groups)", title=f"G={G}: val loss vs step")
        ax_b.set(xscale="log", xlabel="bytes exchanged per group (cumulative)", ylabel="val loss",
                 title=f"G={G}: val loss vs bytes (sync DP: its all-reduce)")
        late = [v for r in res.values() if r.get("G") == G
                for s, v in r["val_loss_curve"].items() if s >= p["steps"] // 4]  # zoom past the first quarter
        for ax in (ax_s, ax_b):
            ax.set_ylim(min(late) - 0.02, max(late) + 0.02)
            ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                    help="single-launch arms trained at once (2: one thread each; default: %(default)s)")
    add_run_args(ap)
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    data = Path(a.data) if a.data else bench_data(2000) if p["data"] == "embedded" \
        else registry_data(2000, num_groups=max(p["groups"]))
    a.keep_runs = a.keep_runs or str(ROOT / "runs" / f"lowcomm_{a.preset}")  # kept: a rerun reuses them
    root = runs_root(a, "lowcomm_")
    arms = plan(p)
    results = {}
    threads = {"OMP_NUM_THREADS": "1"} if a.jobs > 1 else None
    single = [arm for arm in arms if arm["method"] != "hetero"]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda arm: train_arm(p, arm, data, root, a.seed, threads), single))
    for arm in arms[len(single):]:  # the heterogeneous pair: two launches, alone on the machine
        train_arm(p, arm, data, root, a.seed, {"OMP_NUM_THREADS": "1"})
    dp = {}
    for arm in arms:
        dp_per_step = dp.get(arm["G"])
        results[arm["name"]] = r = collect(p, arm, root, dp_per_step)
        if arm["method"] == "independent":
            dp[arm["G"]] = r["allreduce_equiv_bytes_per_step"]
    rows = []
    for name, r in results.items():
        dpb = results[f"g{r['G']}_sync_dp"]["bytes_per_group"]
        rows.append([name, f"{r['num_groups']} x {r['micro']}", round(r["val_ppl_mean"], 2),
                     round(r["ensemble_ppl"], 2) if r["ensemble_ppl"] else "-",
                     f"{r['churn']['mean_abs_p_diff']:.4f}" if r["churn"]["mean_abs_p_diff"] is not None else "-",
                     f"{r['bytes_per_group'] / 1e6:.1f}", f"{r['bytes_per_group'] / dpb:.3f}", round(r["train_wall_s"])])
    print(table(rows, ["arm", "groups x seqs", "val ppl (mean)", "ensemble ppl", "churn |dp(y)|",
                       "MB per group", "x sync DP", "train s"]))
    lines = verdict(p, results)
    print("\n".join(["", "verdict:", *lines]))
    name = f"lowcomm_{a.preset}"
    png = plot(p, results, Path(a.results_dir) / f"{name}.png")
    out = save_results(name, {"preset": p, "data": str(data), "seed": a.seed, "jobs": a.jobs, "results": results,
                              "verdict": lines}, a.results_dir)
    print(f"wrote {out}\nwrote {png}")


if __name__ == "__main__":
    main()
