#!/usr/bin/env python
"""Draw a TensorBoard scalar (default val/ppl) of several runs into one PNG.

    python recipes/plot_runs.py runs/A runs/B -o curves.png
    python recipes/plot_runs.py runs/A runs/B --metric val/loss --x tokens --groups 0 -o loss.png

One line per run and group, labelled "runname/group_i" (runname = the run directory's name,
or parent/name when two runs share a name). Event files are read with TensorBoard's own
reader (EventAccumulator). x axis:
- step:   the training step the scalar was logged at;
- tokens: tokens seen by the group at that step (perf/tokens_seen logged at the same step;
          the nearest earlier logged step is used when that exact step is missing);
- time:   the event's wall time minus the group's first event's wall time, in seconds
          (a resumed run's pause is included).
The y axis is logarithmic for perplexity metrics (any tag containing "ppl").
"""
from __future__ import annotations

import argparse
import bisect
import os
import sys
from pathlib import Path

from codistill.layout import RunLayout
from codistill.runlog import read_events

ROOT = Path(__file__).resolve().parents[1]


class PlotError(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories of recipes/train_lm.py")
    p.add_argument("--metric", default="val/ppl", help="TensorBoard scalar tag (default val/ppl)")
    p.add_argument("--x", default="step", choices=["step", "tokens", "time"])
    p.add_argument("--groups", default="all", help="all | comma-separated group ids, e.g. 0,1")
    p.add_argument("--title", default=None)
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    return p.parse_args(argv)


def run_labels(runs: list[Path]) -> list[str]:
    names = [r.resolve().name for r in runs]
    return [f"{r.resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def group_dirs(run: Path, groups: str) -> list[Path]:
    if not run.is_dir():
        raise PlotError(f"run directory {run} does not exist")
    found = [g for g in RunLayout(run).groups() if g.tb.is_dir()]
    if groups != "all":
        try:
            want = {int(g) for g in groups.split(",")}
        except ValueError:
            raise PlotError(f"--groups must be 'all' or ids like 0,1; got {groups!r}") from None
        found = [g for g in found if g.id in want]
    return [g.dir for g in found]


def curves(runs: list[Path], metric: str, x: str, groups: str) -> list[tuple[str, list, list]]:
    lines = []
    for run, label in zip(runs, run_labels(runs)):
        for gdir in group_dirs(run, groups):
            ev = read_events(gdir / "tb")
            pts = ev.get(metric)
            if not pts:
                continue
            ys = [v for _, _, v in pts]
            if x == "step":
                xs = [s for _, s, _ in pts]
            elif x == "time":
                t0 = min(w for series in ev.values() for w, _, _ in series)
                xs = [w - t0 for w, _, _ in pts]
            else:
                tok = ev.get("perf/tokens_seen")
                if not tok:
                    raise PlotError(f"{gdir}/tb has no perf/tokens_seen scalars: cannot use --x tokens")
                steps = [s for _, s, _ in tok]
                xs = []
                for _, s, _ in pts:
                    i = bisect.bisect_right(steps, s) - 1
                    xs.append(tok[i][2] if i >= 0 else 0.0)
            lines.append((f"{label}/{gdir.name}", xs, ys))
    return lines


def plot(lines, metric: str, x: str, output: Path, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for label, xs, ys in lines:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 15 else None, markersize=3, linewidth=1.5)
    if "ppl" in metric and all(y > 0 for _, _, ys in lines for y in ys):
        ax.set_yscale("log")
        from matplotlib.ticker import ScalarFormatter
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel({"step": "step", "tokens": "tokens seen (per group)", "time": "wall time (s)"}[x])
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {x}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def main(argv=None) -> list:
    if argv is not None:
        argv = [str(a) for a in argv]
    args = parse_args(argv)
    runs = [Path(r) for r in args.runs]
    lines = curves(runs, args.metric, args.x, args.groups)
    if not lines:
        raise PlotError(f"no group of {', '.join(map(str, runs))} (groups {args.groups}) has TensorBoard scalars "
                        f"{args.metric!r} under group_i/tb")
    plot(lines, args.metric, args.x, Path(args.output), args.title)
    print(f"wrote {args.output}: {len(lines)} line(s): {', '.join(name for name, _, _ in lines)}")
    return lines


if __name__ == "__main__":
    try:
        main()
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
