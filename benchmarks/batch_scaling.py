#!/usr/bin/env python
"""Where is the data-parallel limit? Steps to a target validation loss as a function of the
batch, fitted to McCandlish et al.'s (2018) curve S(B) = S_min (1 + B_noise / B), next to the
gradient noise scale the trainer measures (--noise_scale) on the same runs.

    python benchmarks/batch_scaling.py                     # CPU preset: registry corpus, tiny LSTM
    python benchmarks/batch_scaling.py --keep_runs runs/bs # resumable: finished runs are reused,
                                                           #   unfinished ones continue (--resume auto)
    python benchmarks/batch_scaling.py --preset tiny       # smoke run (the tests use it)

Each batch B (tokens per step) is one baseline run of the real trainer (one group, one rank;
batches past --micro_max sequences by gradient accumulation) with
  - the LR scaled as Adam's square-root rule (Malladi et al. 2022) from the preset's base,
    lr(B) = lr0 sqrt(B / B0), capped at lr_cap, constant after a short warmup (--min_lr_ratio 1),
    so that the number of steps, not a schedule, decides where a run is;
  - --target_val_loss: the run finishes at the first evaluation at or below the lowest target;
  - --noise_scale every eval: the raw estimates of tr(Sigma) and |G|^2 (train/noise_trace,
    train/noise_grad_sq) are pooled over the measurements taken while the validation loss is
    within --window nats of a target, and B_simple = mean tr(Sigma) / mean |G|^2 is that
    target's measured noise scale.
For each target: steps to it per batch (linear interpolation between evaluations), the fit of
S = S_min + S_min B_noise / B (least squares in relative error), the fitted B_noise against the
measured B_simple, and the batch where doubling it saves less than 20 % of the steps
(S(2B) / S(B) >= 0.8, i.e. B >= 1.5 B_noise). JSON and a log-log plot go to --results_dir.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from common import ROOT, add_run_args, registry_data, runs_root, save_results, scalars, table, train

from codistill.layout import RunLayout

PRESETS = {
    # seconds per run; the embedded corpus
    "tiny": dict(data="embedded", vocab=2000, model_size="tiny", seq_len=16, batches=[128, 256, 512], micro_max=16,
                 lr0=3e-3, b0=128, lr_cap=1e-2, warmup=2, targets=[6.6, 6.4], max_steps=60, val_tokens=2048,
                 eval_every={128: 4, 256: 2, 512: 2}, noise_every={128: 2, 256: 2, 512: 1}),
    # the study on file: ~12 M tokens of registry English, vocab 2000, the tiny LSTM (1 x 256)
    "cpu": dict(data="registry", vocab=2000, model_size="tiny", seq_len=64, batches=[1024, 4096, 16384, 65536],
                micro_max=256, lr0=3e-3, b0=1024, lr_cap=2.4e-2, warmup=20, targets=[5.0, 4.7, 4.4],
                max_steps=8000, val_tokens=131072, eval_every={1024: 100, 4096: 25, 16384: 8, 65536: 4},
                noise_every={1024: 25, 4096: 10, 16384: 4, 65536: 2}),
}


def run_plan(p: dict, batch: int) -> dict:
    seqs = batch // p["seq_len"]
    micro = min(seqs, p["micro_max"])
    if seqs % micro:
        raise SystemExit(f"batch {batch} = {seqs} sequences is not a multiple of the micro-batch {micro}")
    return dict(seqs=seqs, micro=micro, accum=seqs // micro, lr=min(p["lr_cap"], p["lr0"] * math.sqrt(batch / p["b0"])),
                eval_every=p["eval_every"][batch], noise_every=p["noise_every"][batch],
                eval_batches=max(1, p["val_tokens"] // (micro * p["seq_len"])))


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """The (interpolated) step at which the validation loss first reaches ``target``."""
    prev = (0, math.inf)
    for step, loss in curve:
        if loss <= target:
            if not math.isfinite(prev[1]):
                return float(step)
            return prev[0] + (step - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (step, loss)
    return None


def fit(batches: list[float], steps: list[float]) -> tuple[float, float] | None:
    """(S_min, B_noise) of S = S_min (1 + B_noise / B), least squares on S relative to itself."""
    if len(batches) < 2:
        return None
    b, s = np.asarray(batches, float), np.asarray(steps, float)
    A = np.stack([np.ones_like(b), 1 / b], axis=1) / s[:, None]
    (s_min, c), *_ = np.linalg.lstsq(A, np.ones_like(s), rcond=None)
    if s_min <= 0 or c <= 0:  # steps that grow with the batch (or a negative floor): not this curve
        return None
    return float(s_min), float(c / s_min)


def pooled_noise(measurements: list[tuple[float, float, float]], target: float, window: float) -> tuple[float | None, int]:
    """B_simple from the (val loss, tr(Sigma), |G|^2) measurements with |loss - target| <= window."""
    near = [(t, g) for loss, t, g in measurements if abs(loss - target) <= window]
    if not near:
        return None, 0
    trace, g2 = (float(np.mean(x)) for x in zip(*near))
    return (trace / g2 if g2 > 0 else math.inf), len(near)


def noise_measurements(tb: Path, curve) -> list[tuple[float, float, float]]:
    """(val loss interpolated at the measurement's step, tr(Sigma), |G|^2) of one run."""
    trace, g2 = scalars(tb, "train/noise_trace"), scalars(tb, "train/noise_grad_sq")
    steps = [s for s, _ in curve]
    losses = [v for _, v in curve]
    return [(float(np.interp(s, steps, losses)), trace[s], g2[s]) for s in sorted(set(trace) & set(g2))
            if steps and steps[0] <= s]


def plot(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (target, r) in enumerate(sorted(results["targets"].items(), key=lambda kv: -float(kv[0]))):
        pts = [(b, s) for b, s in zip(results["batches"], r["steps"]) if s]
        if not pts:
            continue
        color = f"C{i}"
        ax.loglog(*zip(*pts), "o", color=color, label=f"val loss {target}")
        if r["fit"]:
            bs = np.geomspace(min(results["batches"]) / 2, max(results["batches"]) * 4, 50)
            ax.loglog(bs, r["fit"]["s_min"] * (1 + r["fit"]["b_noise"] / bs), "-", color=color, alpha=0.6,
                      label=f"fit: B_noise {r['fit']['b_noise'] / 1e3:.1f} k")
            ax.axvline(r["fit"]["b_noise"], color=color, ls=":", alpha=0.6)
        if r.get("b_simple"):
            ax.axvline(r["b_simple"], color=color, ls="--", alpha=0.6)
    ax.set_xlabel("batch (tokens per step)")
    ax.set_ylabel("steps to the target val loss")
    ax.set_title("steps vs batch (dotted: fitted B_noise, dashed: measured B_simple)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--batches", type=int, nargs="+", help="tokens per step (default: the preset's)")
    ap.add_argument("--targets", type=float, nargs="+", help="validation losses (default: the preset's)")
    ap.add_argument("--window", type=float, default=0.1, help="nats around a target whose noise measurements are "
                    "pooled (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1234)
    add_run_args(ap)
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    if a.batches:
        p["batches"] = sorted(a.batches)
        for key in ("eval_every", "noise_every"):  # other batches: the base batch's interval, in tokens
            p[key] = {b: p[key].get(b, max(1, round(p[key][p["b0"]] * p["b0"] / b))) for b in p["batches"]}
    if a.targets:
        p["targets"] = a.targets
    if a.steps:
        p["max_steps"] = a.steps
    if a.data:
        data = Path(a.data)
    elif p["data"] == "embedded":
        from common import bench_data
        data = bench_data(p["vocab"])
    else:
        data = registry_data(p["vocab"])
    root = runs_root(a, "batch_scaling_")
    base_cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    lowest = min(p["targets"])
    runs, curves, measurements = {}, {}, []
    for batch in p["batches"]:
        r = run_plan(p, batch)
        run = root / f"batch_{batch}"
        summary = RunLayout(run).summary
        wall = 0.0
        if not summary.exists():  # finished runs are reused; an unfinished one continues from its checkpoint
            cfg = root / f"batch_{batch}.ds.json"
            cfg.write_text(json.dumps(dict(base_cfg, train_micro_batch_size_per_gpu=r["micro"],
                                           gradient_accumulation_steps=r["accum"])))
            print(f"batch {batch} tokens ({r['seqs']} x {p['seq_len']}, micro {r['micro']} x {r['accum']}), "
                  f"lr {r['lr']:.2e}: training to val loss {lowest} (at most {p['max_steps']} steps)", flush=True)
            wall = train(run, ["--ds_config", cfg, "--data", data, "--num_groups", 1, "--model", "lstm",
                               "--model_size", p["model_size"], "--seq_len", p["seq_len"], "--lr", r["lr"],
                               "--min_lr_ratio", 1, "--warmup_steps", p["warmup"], "--max_steps", p["max_steps"],
                               "--target_val_loss", lowest, "--eval_every", r["eval_every"],
                               "--eval_batches", r["eval_batches"], "--noise_scale", "--noise_scale_every",
                               r["noise_every"], "--save_every", 10 * r["eval_every"], "--log_every", r["eval_every"],
                               "--seed", a.seed], resume=True)
        tb = RunLayout(run).group(0).tb
        curves[batch] = curve = sorted(scalars(tb, "val/loss").items())
        measurements += noise_measurements(tb, curve)
        final = json.loads(summary.read_text())["groups"]["group_0"] if summary.exists() else {}
        runs[batch] = dict(r, wall_s=round(wall, 1), final_step=curve[-1][0] if curve else None,
                           final_val_loss=curve[-1][1] if curve else None, summary=final)
    results = {"preset": a.preset, "settings": p, "data": str(data), "batches": p["batches"], "runs": runs,
               "curves": {b: c for b, c in curves.items()}, "targets": {}}
    rows = []
    for target in p["targets"]:
        steps = [steps_to(curves[b], target) for b in p["batches"]]
        reached = [(b, s) for b, s in zip(p["batches"], steps) if s is not None]
        f = fit(*zip(*reached)) if len(reached) >= 2 else None
        b_simple, n = pooled_noise(measurements, target, a.window)
        entry = {"steps": steps, "fit": None, "b_simple": b_simple, "noise_measurements": n}
        if f:
            s_min, b_noise = f
            entry["fit"] = {"s_min": s_min, "b_noise": b_noise, "e_min_tokens": s_min * b_noise,
                            "limit_batch": 1.5 * b_noise,
                            "doubling_ratio": {b: (1 + b_noise / (2 * b)) / (1 + b_noise / b) for b in p["batches"]}}
            if b_simple:
                entry["b_simple_over_b_noise"] = b_simple / b_noise
        entry["measured_ratio_next_batch"] = {b: steps[i + 1] / steps[i] for i, b in enumerate(p["batches"][:-1])
                                              if steps[i] and steps[i + 1]}
        results["targets"][str(target)] = entry
        rows.append([target, *[f"{s:.0f}" if s else "-" for s in steps],
                     f"{f[0]:.0f}" if f else "-", f"{f[1] / 1e3:.1f} k" if f else "-",
                     f"{b_simple / 1e3:.1f} k ({n})" if b_simple else "-",
                     f"{1.5 * f[1] / 1e3:.1f} k" if f else "-"])
    header = ["target", *[f"S({b})" for b in p["batches"]], "S_min", "B_noise (fit)", "B_simple (meas.)",
              "limit 1.5 B_noise"]
    print(table(rows, header))
    out = Path(a.results_dir)
    name = "batch_scaling" if a.preset == "cpu" else f"batch_scaling_{a.preset}"
    plot(results, out / f"{name}.png")
    print(f"results: {save_results(name, results, out)}\nplot: {out / f'{name}.png'}")


if __name__ == "__main__":
    sys.exit(main())
