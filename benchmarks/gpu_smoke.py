#!/usr/bin/env python
"""One command for a GPU node: does the recipe run there, and what does codistillation cost?

    python benchmarks/gpu_smoke.py [--data DIR] [--minutes 9]

Runs, each as the real trainer under the real deepspeed launcher (no internet needed; --data
defaults to the embedded corpus, prepared on first use, or bring a prepared directory):

    main         the README's main command (2 groups in one process, ZeRO-2, bf16 "auto")
    split        2 ranks, one group each (NCCL world split) - where 2 GPUs exist
    zero3        ZeRO-3: 2 ranks (world split) where 2 GPUs exist, else 2 groups in one process
    transformer  the Transformer "small" preset, 2 groups
    resume       stop at step 30, --resume auto, compare with an uninterrupted run
    parity       a teacher built from an export gives the student's logits (both architectures)
    throughput   tokens/s of the baseline (1 group) and of codistillation with 1 peer (2 groups,
                 one process), the overhead ratio next to the FLOP floor 1 + F/(F+B) (F, B measured
                 on the same model and batch in plain PyTorch with CUDA syncs)

and prints a pass/fail table with tokens/s and peak GPU memory per run; writes
benchmarks/results/gpu_smoke_<gpu>.json. Stops by itself: each run has a time limit and runs
that would start after --minutes are skipped (reported as such).
`--device cpu --only main,throughput --quick` checks the script's plumbing on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEEPSPEED, PY, ROOT, RESULTS, free_port, median, save_results, scalars, table
from codistill.layout import RunLayout

import torch

CHECKS = ["main", "split", "zero3", "transformer", "resume", "parity", "throughput"]


class Smoke:
    def __init__(self, a):
        self.a, self.deadline = a, time.time() + a.minutes * 60
        self.root = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if a.device == "cpu":
            self.env["DS_ACCELERATOR"] = "cpu"
        else:
            self.env.pop("DS_ACCELERATOR", None)
        self.gpus = torch.cuda.device_count() if a.device == "cuda" else 2
        self.rows, self.results = [], {}

    def steps(self, n: int) -> int:
        return max(12, n // 10) if self.a.quick else n

    def train(self, name: str, flags: list, ranks: int = 1, timeout: float = 240) -> tuple[Path, str]:
        run = self.root / name
        flags = list(map(str, flags))
        if self.a.quick:  # plumbing only: small models, teachers early (later flags win)
            flags = [{"small": "tiny", "256": "64"}.get(f, f) for f in flags]
            flags += ["--export_every", "4", "--burn_in_steps", "4"]
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               str(ROOT / "recipes" / "train_lm.py"), "--run_dir", str(run), *map(str, flags)]
        if self.a.data:
            cmd += ["--data", self.a.data]
        left = self.deadline - time.time()
        if left < 20:
            raise TimeoutError("skipped: --minutes reached")
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=min(timeout, left))
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
        return run, proc.stdout

    def record(self, name: str, ok: bool, detail: str, **extra) -> None:
        self.rows.append([name, "PASS" if ok else "FAIL", detail])
        self.results[name] = {"ok": ok, "detail": detail, **extra}
        print(f"{name:12s} {'PASS' if ok else 'FAIL'}  {detail}", flush=True)

    def run(self, name: str, fn) -> None:
        t0 = time.time()
        try:
            fn()
        except TimeoutError as e:
            self.rows.append([name, "SKIP", str(e)])
            self.results[name] = {"ok": None, "detail": str(e)}
            print(f"{name:12s} SKIP  {e}", flush=True)
        except (subprocess.TimeoutExpired, RuntimeError, AssertionError, KeyError, ValueError) as e:
            self.record(name, False, f"{type(e).__name__}: {str(e)[-600:]}")
        self.results.setdefault(name, {})["seconds"] = round(time.time() - t0, 1)


def tok_s(run: Path) -> float:
    """Median tokens/s of one group's steps after the first 10 (start-up excluded)."""
    v = scalars(RunLayout(run).group(0).tb, "perf/tokens_per_s")
    return median([x for s, x in v.items() if s > 10]) if v else float("nan")


def peak_gb(run: Path) -> float:
    s = json.loads((run / "summary.json").read_text())["groups"]
    return max(g.get("peak_memory_bytes", 0) for g in s.values()) / 2**30


def codistilled(run: Path, groups=(0, 1)) -> bool:
    return all(max(scalars(RunLayout(run).group(g).tb, "train/distill").values(), default=0) > 0 for g in groups)


def fwd_share(device: str, size: str, micro: int, seq_len: int, vocab: int, reps: int = 20) -> float:
    """F / (F + B) of one student step in plain PyTorch on ``device`` (bf16 autocast where native)."""
    from model import build_model, preset_config
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(preset_config("transformer", size, vocab)).to(dev)
    x = torch.randint(0, vocab, (micro, seq_len + 1), device=dev)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if bf16:
        model = model.to(torch.bfloat16)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def fwd():
        with torch.no_grad():
            model(x[:, :-1])

    def both():
        torch.nn.functional.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten()).backward()

    f = [timed(fwd) for _ in range(reps)]
    fb = [timed(both) for _ in range(reps)]
    return median(f[3:]) / median(fb[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a prepared data directory (default: the embedded corpus)")
    ap.add_argument("--minutes", type=float, default=9.0, help="start no run after this (default 9)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", help=f"comma list of {CHECKS}")
    ap.add_argument("--quick", action="store_true", help="a tenth of the steps (plumbing check)")
    ap.add_argument("--results_dir", default=str(RESULTS))
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_smoke: no CUDA device here (use --device cpu for a plumbing check)")
    todo = a.only.split(",") if a.only else CHECKS
    unknown = set(todo) - set(CHECKS)
    if unknown:
        sys.exit(f"--only: unknown checks {sorted(unknown)}; choose from {CHECKS}")
    sm = Smoke(a)
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    dtype = "bfloat16" if a.device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    print(f"gpu_smoke on {gpu} ({sm.gpus} device(s)), expecting {dtype}; runs under {sm.root}", flush=True)
    common = ["--eval_batches", "10", "--log_every", "50"]

    def main_cmd():
        run, out = sm.train("main", ["--ds_config", "ds_configs/zero2.json", "--max_steps", sm.steps(300), *common])
        ok = f"{dtype} on {a.device}" in out and codistilled(run)
        sm.record("main", ok, f"{tok_s(run) / 1e3:.1f}k tok/s/group, peak {peak_gb(run):.2f} GiB",
                  tokens_per_s=tok_s(run), peak_gib=peak_gb(run))

    def split():
        if sm.gpus < 2:
            raise TimeoutError("skipped: needs 2 GPUs")
        run, out = sm.train("split", ["--max_steps", sm.steps(100), "--export_every", "10", *common], ranks=2)
        sm.record("split", "1 rank(s) each" in out and codistilled(run), f"peak {peak_gb(run):.2f} GiB",
                  peak_gib=peak_gb(run))

    def zero3():
        ranks = 2 if sm.gpus >= 2 else 1
        run, out = sm.train("zero3", ["--ds_config", "ds_configs/zero3.json", "--max_steps", sm.steps(100),
                                      "--export_every", "10", *common], ranks=ranks)
        from safetensors.torch import load_file
        w = [load_file(RunLayout(run).group(g).final / "model.safetensors") for g in (0, 1)]
        ok = "ZeRO-3" in out and codistilled(run) and all(v.numel() > 0 for v in w[1].values())
        sm.record("zero3", ok, f"{ranks} rank(s), peak {peak_gb(run):.2f} GiB", peak_gib=peak_gb(run))

    def transformer():
        run, out = sm.train("transformer", ["--model", "transformer", "--model_size", "small", "--seq_len", "256",
                                            "--max_steps", sm.steps(100), "--export_every", "10", *common])
        sm.record("transformer", codistilled(run), f"{tok_s(run) / 1e3:.1f}k tok/s/group, "
                  f"peak {peak_gb(run):.2f} GiB", tokens_per_s=tok_s(run), peak_gib=peak_gb(run))

    def resume():
        kw = ["--model", "transformer", "--dropout", "0.1", "--max_steps", "60", "--export_every", "10",
              "--save_every", "30", *common]
        a_run, _ = sm.train("resume_straight", kw)
        sm.train("resume_sliced", [*kw, "--stop_after_steps", "30"])
        b_run, out = sm.train("resume_sliced", kw)
        diffs = []
        for g in (0, 1):
            x, y = (scalars(RunLayout(r).group(g).tb, "train/loss") for r in (a_run, b_run))
            diffs.append(max(abs(x[s] - y[s]) for s in x))
        sm.record("resume", "resumed from step 30" in out and max(diffs) < 2e-3,
                  f"max |loss diff| {max(diffs):.2e} after resume", max_loss_diff=max(diffs))

    def parity():
        out = sm.root / "parity.json"
        cmd = [PY, str(ROOT / "tests" / "scripts" / "teacher_parity.py"), "--device", a.device, "--out", str(out)]
        if dtype == "bfloat16":
            cmd.append("--bf16")
        proc = subprocess.run(cmd, cwd=ROOT, env=sm.env, capture_output=True, text=True,
                              timeout=max(20, min(300, sm.deadline - time.time())))
        if proc.returncode:
            raise RuntimeError(proc.stderr[-1500:])
        r = json.loads(out.read_text())
        ok = all(v["max_abs_diff"] <= 2 ** -7 * v["logit_scale"] for v in r.values())
        sm.record("parity", ok, ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in r.items()), results=r)

    def throughput():
        flags = ["--model", "transformer", "--model_size", "small", "--seq_len", "256",
                 "--max_steps", sm.steps(120), "--export_every", "20", "--burn_in_steps", "0", "--eval_every", "1000",
                 "--save_every", "100000", *common]
        base, _ = sm.train("tp_base", [*flags, "--num_groups", "1"])
        cod, _ = sm.train("tp_codistill", [*flags, "--num_groups", "2"])
        t0 = scalars(RunLayout(base).group(0).tb, "perf/step_time")
        k = 4 if a.quick else 20
        t1 = {s: v for s, v in scalars(RunLayout(cod).group(0).tb, "perf/step_time").items()
              if s > 2 * k}  # teachers on from 2K + 1
        ratio = median(list(t1.values())) / median([v for s, v in t0.items() if s > 10])
        vocab = json.loads(((Path(a.data) if a.data else ROOT / "data" / "sample") / "manifest.json")
                           .read_text())["vocab_size"]
        share = fwd_share(a.device, "tiny" if a.quick else "small", 16, 64 if a.quick else 256, vocab)
        floor = 1 + share
        sm.record("throughput", True, f"baseline {tok_s(base) / 1e3:.1f}k tok/s, 1 peer {tok_s(cod) / 1e3:.1f}k "
                  f"tok/s/group: ratio {ratio:.2f} vs floor {floor:.2f} ({ratio / floor:.2f} of it)",
                  baseline_tokens_per_s=tok_s(base), codistill_tokens_per_s=tok_s(cod), ratio=ratio,
                  flop_floor=floor, ratio_over_floor=ratio / floor, peak_gib_baseline=peak_gb(base),
                  peak_gib_codistill=peak_gb(cod))

    for name, fn in [("main", main_cmd), ("split", split), ("zero3", zero3), ("transformer", transformer),
                     ("resume", resume), ("parity", parity), ("throughput", throughput)]:
        if name in todo:
            sm.run(name, fn)
    print()
    print(table(sm.rows, ["check", "result", "detail"]))
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    path = save_results(f"gpu_smoke_{tag}", {"gpu": gpu, "devices": sm.gpus, "dtype": dtype,
                                              "torch": torch.__version__, "checks": sm.results}, a.results_dir)
    print(f"\nresults: {path}")
    shutil.rmtree(sm.root, ignore_errors=True)
    sys.exit(0 if all(r.get("ok") is not False for r in sm.results.values()) else 1)


if __name__ == "__main__":
    main()
