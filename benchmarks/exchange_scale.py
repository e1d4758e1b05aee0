#!/usr/bin/env python
"""Does the exchange stay cheap at billion-parameter scale? Export and load speed against the
disk, and what the training thread pays, for Transformers of ~10 M, ~100 M and ~1 B parameters.

    python benchmarks/exchange_scale.py [--sizes 10m,100m,1b] [--dir /path/on/the/disk/to/test]

Each size runs in its own process (so its peak RSS is its own), with bf16 weights (what a GPU
run exports), built from config (no training needed):

- write: the trainer's export path (codistill/exchange.py ExportWriter -> write_export: finiteness
  check, safetensors' file writer, xxh3-64 digest, fsync, renames) against a plain sequential
  write + fsync of the same number of bytes to the same directory;
- read: the loader's path (read_export + check_usable: header check, then one pass reading into
  the buffer of the export swapped in before (ReadBuffers) with the digest and NaN/Inf check of
  each chunk while it is in cache; zero-copy tensors, shape checks) against a plain read of the
  same file (64 MiB reads into one buffer); both cold (the file's pages are dropped from the page
  cache first, posix_fadvise) and warm; "first" is a run's first read, into a fresh buffer;
- stall: a training-step loop (a small model's forward + backward + AdamW step) runs on the main
  thread while (a) an export is copied to the host and written in the background, and (b) the
  loader reads an export in the background and the trainer swaps it into a teacher
  (TeacherPool.load). Reported: the time the training thread spends in each (host copy, swap)
  next to one memcpy of the weights, and the step time while the background work runs, against
  the median step.
Targets: write and read >= 0.7x the plain disk speed; swap stall <= one memcpy of the weights.
Results: benchmarks/results/exchange_scale.json and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import PY, RESULTS, median, save_results, table

from codistill.exchange import ExportWriter
from codistill.exports import ReadBuffers, read_export
from codistill.student import host_copy
from codistill.teachers.loader import check_usable
from codistill.teachers.pool import TeacherPool
from model import ModelConfig, build_model, count_params

SIZES = {  # Llama-style decoders (model/transformer.py), tied embeddings
    "10m": dict(vocab_size=8000, d_model=320, n_layers=6, n_heads=5, d_ff=1280),
    "100m": dict(vocab_size=32000, d_model=768, n_layers=8, n_heads=12, d_ff=3072),
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=18, n_heads=16, d_ff=5504),
}


def config(size: str) -> ModelConfig:
    return ModelConfig(arch="transformer", tie_embeddings=True, max_seq_len=256, **SIZES[size])


def build_bf16(cfg: ModelConfig) -> torch.nn.Module:
    """The model on the host in bf16, initialised cheaply (values only need to be finite)."""
    with torch.device("meta"):
        m = build_model(cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02, generator=g)
    return m


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write(path: Path, nbytes: int) -> float:
    buf = bytearray(os.urandom(1 << 20)) * 64  # 64 MiB of incompressible bytes, written repeatedly
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(memoryview(buf)[:min(left, len(buf))])
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def plain_read(path: Path) -> float:
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


class StepLoop:
    """The training thread's stand-in: steps of a small LSTM LM until stopped; step times kept."""

    def __init__(self):
        from model import preset_config
        torch.manual_seed(0)
        self.model = build_model(preset_config("lstm", "tiny", 2000))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.x = torch.randint(0, 2000, (16, 65))

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(self.model(self.x[:, :-1]).flatten(0, 1), self.x[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - t0

    def while_running(self, fn) -> tuple[float, list[float]]:
        """Run ``fn`` in a background thread; step on this thread until it returns."""
        done, out = threading.Event(), {}

        def work():
            t = time.perf_counter()
            out["r"] = fn()
            out["s"] = time.perf_counter() - t
            done.set()

        th = threading.Thread(target=work)
        th.start()
        steps = []
        while not done.is_set():
            steps.append(self.step())
        th.join()
        return out["s"], steps


def child(size: str, workdir: Path) -> dict:
    cfg = config(size)
    model = build_bf16(cfg)
    sd = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in sd.values()}.values())
    res = {"size": size, "params": count_params(model), "weights_mib": nbytes / 2**20}
    loop = StepLoop()
    base = [loop.step() for _ in range(15)][5:]
    res["step_median_ms"] = median(base) * 1e3

    # write: the export path in the background, the training loop on this thread
    t0 = time.perf_counter()
    snapshot = host_copy(sd)  # on the training thread: the device->host copy (a memcpy on CPU)
    res["host_copy_ms"] = (time.perf_counter() - t0) * 1e3
    writer = ExportWriter(workdir / "exports", keep=2)
    write_s, steps = loop.while_running(lambda: (writer.submit(0, 10, snapshot, {"group": 0}), writer.collect())[1])
    path = workdir / "exports" / "step_000010.safetensors"
    fbytes = path.stat().st_size
    res["export_write_s"] = write_s
    res["export_write_mb_s"] = fbytes / 2**20 / write_s
    res["steps_during_write"] = len(steps)
    res["step_during_write_median_ms"] = median(steps) * 1e3 if steps else None
    res["step_during_write_max_ms"] = max(steps) * 1e3 if steps else None
    plain = plain_write(workdir / "plain.bin", fbytes)
    res["plain_write_mb_s"] = fbytes / 2**20 / plain
    res["write_vs_plain"] = res["export_write_mb_s"] / res["plain_write_mb_s"]

    # read: cold and warm, loader path against a plain read of the same file
    pool = TeacherPool(cfg, torch.device("cpu"), dtype=torch.bfloat16)
    expect = pool.expected_shapes()

    bufs = ReadBuffers(keep=1)  # the loader's: the buffer of an export swapped in is read into again

    def load():
        exp = read_export(workdir / "exports", 10, buffers=bufs)
        check_usable(exp, expect)
        return exp

    drop_cache(path)
    t0 = time.perf_counter()
    bufs.give(load())  # the first read of a run: into a fresh buffer (page faults on first touch)
    res["load_first_cold_mb_s"] = fbytes / 2**20 / (time.perf_counter() - t0)
    for temp in ("cold", "warm"):
        if temp == "cold":
            drop_cache(path)
        t = plain_read(path)
        res[f"plain_read_{temp}_mb_s"] = fbytes / 2**20 / t
        if temp == "cold":
            drop_cache(path)
        t0 = time.perf_counter()
        exp = load()
        res[f"load_{temp}_mb_s"] = fbytes / 2**20 / (time.perf_counter() - t0)
        res[f"load_vs_plain_{temp}"] = res[f"load_{temp}_mb_s"] / res[f"plain_read_{temp}_mb_s"]
        bufs.give(exp)

    # stall of a swap: the loader reads in the background, then the trainer copies into the teacher
    drop_cache(path)
    read_s, steps = loop.while_running(lambda: bufs.give(load()))
    res["steps_during_read"] = len(steps)
    res["step_during_read_median_ms"] = median(steps) * 1e3 if steps else None
    res["step_during_read_max_ms"] = max(steps) * 1e3 if steps else None
    exp = load()
    pool.reserve([1])
    dst = {k: torch.empty_like(v) for k, v in exp.state_dict.items()}
    swaps, memcpy = [], []
    for _ in range(4):  # interleaved, so both see the same machine (its memory bandwidth varies ~2x)
        t0 = time.perf_counter()
        pool.load(1, exp)
        swaps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for k, v in exp.state_dict.items():
            dst[k].copy_(v)
        memcpy.append(time.perf_counter() - t0)
    res["swap_ms"] = min(swaps) * 1e3
    res["memcpy_ms"] = min(memcpy) * 1e3
    res["swap_vs_memcpy"] = res["swap_ms"] / res["memcpy_ms"]
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10m,100m,1b")
    ap.add_argument("--dir", help="directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--results_dir", default=str(RESULTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.dir))))
        return
    rows, results = [], {}
    for size in a.sizes.split(","):
        if size not in SIZES:
            sys.exit(f"--sizes: {size} is not one of {sorted(SIZES)}")
        with tempfile.TemporaryDirectory(dir=a.dir, prefix=f"exchange_{size}_") as d:
            proc = subprocess.run([PY, __file__, "--child", size, "--dir", d], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{size} failed:\n{proc.stderr[-3000:]}")
        r = results[size] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append([size, f"{r['params'] / 1e6:.0f}M", f"{r['weights_mib']:.0f}",
                     f"{r['export_write_mb_s']:.0f} / {r['plain_write_mb_s']:.0f} = {r['write_vs_plain']:.2f}",
                     f"{r['load_cold_mb_s']:.0f} / {r['plain_read_cold_mb_s']:.0f} = {r['load_vs_plain_cold']:.2f}",
                     f"{r['load_warm_mb_s']:.0f} / {r['plain_read_warm_mb_s']:.0f} = {r['load_vs_plain_warm']:.2f}",
                     f"{r['load_first_cold_mb_s']:.0f}",
                     f"{r['host_copy_ms']:.0f}", f"{r['swap_ms']:.0f} / {r['memcpy_ms']:.0f}",
                     f"{r['step_median_ms']:.0f} / {r['step_during_write_median_ms'] or 0:.0f} / "
                     f"{r['step_during_read_median_ms'] or 0:.0f}", f"{r['peak_rss_mib']:.0f}"])
        print(f"{size}: {json.dumps(r)}", flush=True)
    header = ["size", "params", "MiB", "write MB/s (export / plain)", "read cold MB/s (load / plain)",
              "read warm MB/s", "first read MB/s", "host copy ms", "swap / memcpy ms", "step ms: alone / writing / reading",
              "peak RSS MiB"]
    print(table(rows, header))
    path = save_results("exchange_scale", {"results": results}, a.results_dir)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
