"""Benchmark of data_prep/prepare.py on the embedded BBC News corpus.

    python benchmarks/data_prep_speed.py [--copies 8] [--scale_copies 32] [--repeats 2]
        [--out benchmarks/results/data_prep.json]

Measures, in one run on one machine:
  * SentencePiece's own encode speed (tokens/s, one thread, batches of 256 documents) on
    exactly the cleaned documents prepare.py tokenizes, returning ids as numpy arrays (its
    fastest way, the reference; prepare.py uses it too) and as lists of Python ints;
  * on ``--copies`` and ``--scale_copies`` copies of the corpus, interleaved ``--repeats``
    times: SentencePiece alone in its own process (the reference, timed next to each
    prepare.py run), two such processes at once (the machine's own 1 -> 2 process ceiling),
    and end-to-end tokens/s of ``prepare.py --tokenizer ...`` (a subprocess: start-up,
    reading, cleaning, hashing, de-duplication, encoding, writing, manifest) with 1 and 2
    workers: its ratio to SentencePiece's speed x workers (target >= 0.7), the 1 -> 2 worker
    speed-up end to end and for prepare.py's main loop alone (its ``tokenize_s``: without
    interpreter start-up, imports and finishing, which are serial and fixed);
  * peak RSS (ru_maxrss of the prepare.py process tree, via RUSAGE_CHILDREN of a wrapper
    process) at two corpus sizes: the sample (x1) and 4 edited copies of it (x4), with a
    reused tokenizer and with tokenizer training.
The x-copies are the real articles with " (copy k)" appended to the headline so that exact
de-duplication keeps them. Timings are best-of-``--repeats`` wall clock.

Web-text filters (issue 8), on a Common Crawl-format corpus: ``--filter_copies`` copies of the
sample written as .warc.wet.gz files with warcio (one WET file per copy), prepared with a
reused tokenizer: documents/s and MB/s (uncompressed text in) and peak RSS with every filter
off, language ID only, near-dup only, line filters only, and all on (the WET default), with 1
and 2 workers for "all on". The copies differ only by their headline, so near-dup drops
copies 1.. (a worst case for the index: every document is checked).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_prep.clean import clean_document
from data_prep.parallel import chunked
from data_prep.readers import Stats, read_documents
from data_prep.sample import sample_corpus_dir

ROOT = Path(__file__).resolve().parents[1]

PREPARE = ROOT / "data_prep" / "prepare.py"
_WRAP = ("import json, resource, subprocess, sys, time\n"
         "t = time.perf_counter(); r = subprocess.run(sys.argv[1:])\n"
         "dt = time.perf_counter() - t; u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
         "print(json.dumps({'rc': r.returncode, 'wall_s': dt, 'cpu_s': u.ru_utime + u.ru_stime,"
         " 'maxrss_kb': u.ru_maxrss}))\n")


def run_prepare(args: list[str]) -> dict:
    """Run prepare.py in a fresh wrapper process; return wall time, CPU time, peak RSS and
    prepare.py's own phase timings (``timing``: its DATA_PREP_TIMING line; ``tokenize_s`` is
    the read -> encode -> write loop, without interpreter start-up, imports and finishing)."""
    cmd = [sys.executable, "-c", _WRAP, sys.executable, str(PREPARE), *map(str, args), "--quiet"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "DATA_PREP_TIMING": "1"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise RuntimeError(f"prepare.py failed: {out.stderr}")
    timing = [line for line in out.stderr.splitlines() if line.startswith('{"')]
    r["timing"] = json.loads(timing[-1]) if timing else {}
    return r


def _med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def throughput(corpus: Path, tok: Path, td: Path, tag: str, repeats: int) -> dict:
    """Side by side on ``corpus``, interleaved ``repeats`` times so that load from other jobs
    hits every configuration alike: SentencePiece alone (encode time of exactly the documents
    prepare.py encodes, in its own process), two such processes at once (the machine's own
    1 -> 2 ceiling), and prepare.py --tokenizer end to end with 1 and 2 workers.

    Ratio per worker = SentencePiece's time / (workers x prepare.py's wall time), both on the
    same tokens; reported best-vs-best and as the median of the per-repeat ratios."""
    sp_cmd = sp_alone_cmd(tok, corpus, td / f"{tag}_sp.json")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    runs = {1: [], 2: []}
    alone, pair = [], []
    for i in range(repeats):
        alone.append(float(subprocess.run(sp_cmd, check=True, capture_output=True, text=True,
                                          env=env).stdout))
        ps = [subprocess.Popen(sp_cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        pair.append(max(float(q.communicate()[0]) for q in ps))
        for w in (1, 2):
            out = td / f"{tag}_w{w}_{i}"
            r = run_prepare(["--input", corpus, "--output", out, "--num_groups", 2,
                             "--tokenizer", tok, "--workers", w])
            m = json.loads((out / "manifest.json").read_text())
            r["tokens"] = sum(s["num_tokens"] for s in m["splits"].values())
            r["mb"] = sum(s["bytes"] for s in m["sources"]) / 2**20
            runs[w].append(r)
            shutil.rmtree(out)
    Path(sp_cmd[-1]).unlink()
    best = {w: min(runs[w], key=lambda r: r["wall_s"]) for w in (1, 2)}
    loop = {w: min(r["timing"]["tokenize_s"] for r in runs[w]) for w in (1, 2)}
    tokens = best[1]["tokens"]
    out = {"mb": best[1]["mb"], "tokens": tokens, "docs": best[1]["timing"].get("docs"),
           "sentencepiece_alone_s": min(alone), "sentencepiece_alone_all_s": alone,
           "sentencepiece_tokens_per_s": tokens / min(alone),
           "sentencepiece_pair_all_s": pair,
           "ceiling_2_processes": 2 * min(alone) / min(pair),
           "speedup_2_workers": best[1]["wall_s"] / best[2]["wall_s"],
           "speedup_2_workers_paired_median": _med([a["wall_s"] / b["wall_s"]
                                                    for a, b in zip(runs[1], runs[2])]),
           "speedup_2_workers_main_loop": loop[1] / loop[2], "workers": []}
    for w in (1, 2):
        r = best[w]
        out["workers"].append({
            "workers": w, "wall_s": r["wall_s"], "all_wall_s": [x["wall_s"] for x in runs[w]],
            "cpu_s": r["cpu_s"], "maxrss_kb": r["maxrss_kb"], "main_loop_s": loop[w],
            "serial_s": r["wall_s"] - r["timing"]["tokenize_s"],
            "tokens_per_s": tokens / r["wall_s"],
            "ratio_per_worker": min(alone) / (w * r["wall_s"]),
            "ratio_per_worker_paired_median": _med([a / (w * x["wall_s"])
                                                    for a, x in zip(alone, runs[w])]),
            "cpu_ratio": min(alone) / r["cpu_s"]})
    return out


def articles():
    for p in sorted(sample_corpus_dir().rglob("*.txt")):
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        yield p, [line for line in text.splitlines() if line.strip()]


def write_copies(dest: Path, copies: int, per_file: bool) -> Path:
    """copies x the corpus; per_file: one .txt per article (text_mode file), else one big
    .txt per copy (documents separated by blank lines)."""
    dest.mkdir(parents=True)
    arts = list(articles())
    for k in range(copies):
        big = None if per_file else open(dest / f"copy{k}.txt", "w", encoding="utf-8")
        for p, lines in arts:
            doc = "\n".join([lines[0] + (f" (copy {k})" if k else "")] + lines[1:])
            if per_file:
                (dest / f"{p.parent.name}_{p.stem}_{k}.txt").write_text(doc, encoding="utf-8")
            else:
                big.write(doc + "\n\n")
        if big:
            big.close()
    return dest


def write_wet_copies(dest: Path, copies: int) -> tuple[Path, int]:
    """copies x the corpus as WET files (one per copy); returns (dir, uncompressed text bytes)."""
    import io

    from warcio.warcwriter import WARCWriter

    dest.mkdir(parents=True)
    arts = list(articles())
    nbytes = 0
    for k in range(copies):
        with open(dest / f"CC-MAIN-bench-{k:05d}.warc.wet.gz", "wb") as f:
            w = WARCWriter(f, gzip=True)
            w.write_record(w.create_warcinfo_record(f.name, {"format": "WET"}))
            for i, (_p, lines) in enumerate(arts):
                doc = "\n".join([lines[0] + (f" (copy {k})" if k else "")] + lines[1:])
                data = doc.encode("utf-8")
                nbytes += len(data)
                w.write_record(w.create_warc_record(
                    f"http://news.bbc.co.uk/{k}/{i}.stm", "conversion", payload=io.BytesIO(data),
                    length=len(data), warc_content_type="text/plain"))
    return dest, nbytes


FILTER_CONFIGS = {  # name -> prepare.py flags
    "none": ["--lang_filter", "off", "--near_dup", "off", "--line_filters", "off"],
    "language": ["--lang_filter", "on", "--near_dup", "off", "--line_filters", "off"],
    "near_dup": ["--lang_filter", "off", "--near_dup", "on", "--line_filters", "off"],
    "line_filters": ["--lang_filter", "off", "--near_dup", "off", "--line_filters", "on"],
    "all": [],  # the defaults for WET input
}


def filter_runs(td: Path, tok: Path, copies: int, repeats: int, plan=None) -> list[dict]:
    wet, nbytes = write_wet_copies(td / "wet", copies)
    out = []
    plan = plan or [(name, 1) for name in FILTER_CONFIGS] + [("all", 2)]
    for name, w in plan:
        runs = []
        for i in range(repeats):
            o = td / f"filt_{name}_{w}_{i}"
            r = run_prepare(["--input", wet, "--output", o, "--num_groups", 2, "--tokenizer", tok,
                             "--workers", w, *FILTER_CONFIGS[name]])
            m = json.loads((o / "manifest.json").read_text())
            r.update(docs_in=m["documents_in"], docs_kept=m["documents_kept"],
                     dropped=m["dropped"], filters=m.get("filters", {}))
            runs.append(r)
        best = dict(min(runs, key=lambda r: r["wall_s"]))
        best.update(filters_on=name, workers=w, all_wall_s=[r["wall_s"] for r in runs],
                    text_mb=nbytes / 2**20, docs_per_s=best["docs_in"] / best["wall_s"],
                    mb_per_s=nbytes / 2**20 / best["wall_s"])
        best["copies"] = copies
        out.append(best)
        print(f"filters {name:12s} workers {w}: {best['docs_per_s']:,.0f} docs/s, "
              f"{best['mb_per_s']:.1f} MiB/s, peak RSS {best['maxrss_kb'] / 1024:.0f} MiB, "
              f"kept {best['docs_kept']}/{best['docs_in']}", flush=True)
    return out


def sp_speed(tokenizer: Path, corpus: Path, repeats: int) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = _clean_unique(corpus)
    batches = list(chunked(texts))
    out = {}
    for _ in range(repeats):  # SentencePiece's two ways of returning ids, interleaved
        for name, out_type in (("numpy", "numpy"), ("int", int)):
            t, c = time.perf_counter(), time.process_time()
            n = sum(len(ids) + 1 for b in batches for ids in sp.encode(b, num_threads=1, out_type=out_type))
            r = out.setdefault(name, {"seconds": float("inf"), "cpu_s": float("inf")})
            r["seconds"] = min(r["seconds"], time.perf_counter() - t)
            r["cpu_s"] = min(r["cpu_s"], time.process_time() - c)
    best = out["numpy"]  # the faster one (no Python int per token): the reference
    return {"tokens": n, "docs": len(texts), "seconds": best["seconds"], "cpu_s": best["cpu_s"],
            "tokens_per_s": n / best["seconds"], "tokens_per_cpu_s": n / best["cpu_s"],
            "int_lists": {**out["int"], "tokens_per_s": n / out["int"]["seconds"]},
            "mb": sum(len(t.encode()) for t in texts) / 2**20}


_SP_ALONE = ("import json, sys, time\n"
             "import sentencepiece as spm\n"
             "sp = spm.SentencePieceProcessor(model_file=sys.argv[1])\n"
             "with open(sys.argv[2], encoding='utf-8') as f:\n"
             "    batches = [[t.encode() for t in b] for b in json.load(f)]\n"
             "t = time.perf_counter()\n"
             "for b in batches: sp.encode(b, num_threads=1, out_type='numpy')\n"
             "print(time.perf_counter() - t)\n")


def sp_alone_cmd(tokenizer: Path, corpus: Path, data: Path) -> list[str]:
    """A command that times SentencePiece (1 thread, numpy ids, batches of 256) on exactly
    the documents prepare.py encodes from ``corpus`` (as JSON batches in ``data``; UTF-8
    bytes, like prepare.py's, by the time the clock starts) and prints it."""
    data.write_text(json.dumps(list(chunked(_clean_unique(corpus)))), encoding="utf-8")
    return [sys.executable, "-c", _SP_ALONE, str(tokenizer), str(data)]


def _clean_unique(corpus: Path) -> list[str]:
    """The documents prepare.py encodes: cleaned, exact duplicates removed, in order."""
    seen, texts = set(), []
    for raw in read_documents([corpus], Stats()):
        r = clean_document(raw)
        if not isinstance(r, str) and r not in seen:
            seen.add(r)
            texts.append(r.decode("utf-8"))
    return texts


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=8, help="corpus copies for the throughput runs")
    ap.add_argument("--scale_copies", type=int, default=32,
                    help="corpus copies for the second 1 -> 2 worker scaling point (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab_size", type=int, default=8000)
    ap.add_argument("--filter_copies", type=int, default=4,
                    help="corpus copies (WET files) for the web-text filter runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_prep.json"))
    args = ap.parse_args()
    info = machine()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    res = {"command": "python benchmarks/data_prep_speed.py " + " ".join(sys.argv[1:]),
           "git_commit": commit, "machine": info}
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as td:
        td = Path(td)
        x1 = sample_corpus_dir()
        x4 = write_copies(td / "x4", 4, per_file=True)
        big = write_copies(td / "big", args.copies, per_file=False)

        # tokenizer training on the sample (also the x1 "with training" RSS point)
        r = run_prepare(["--input", x1, "--output", td / "tok", "--num_groups", 6,
                         "--val_fraction", 0.05, "--text_mode", "file",
                         "--vocab_size", args.vocab_size])
        tok = td / "tok" / "tokenizer.model"
        res["train_x1"] = r
        print(f"prepare --sample (with tokenizer training): {r['wall_s']:.1f} s, "
              f"peak RSS {r['maxrss_kb'] / 1024:.0f} MiB", flush=True)

        ref = sp_speed(tok, big, args.repeats)
        res["sentencepiece"] = ref
        print(f"SentencePiece encode (1 thread): {ref['tokens_per_s'] / 1e6:.2f} M tok/s "
              f"on {ref['mb']:.0f} MiB ({ref['int_lists']['tokens_per_s'] / 1e6:.2f} M tok/s as int lists)",
              flush=True)

        # prepare.py vs SentencePiece, 1 and 2 workers, on the --copies corpus and on a larger
        # one (the fixed start-up weighs less there)
        res["throughput"] = [{"copies": args.copies,
                              **throughput(big, tok, td, "big", args.repeats)}]
        if args.scale_copies:
            bigger = write_copies(td / "bigger", args.scale_copies, per_file=False)
            res["throughput"].append({"copies": args.scale_copies,
                                      **throughput(bigger, tok, td, "bigger", args.repeats)})
            shutil.rmtree(bigger)
        for t in res["throughput"]:
            w1, w2 = t["workers"]
            print(f"{t['mb']:.0f} MiB: SentencePiece alone {t['sentencepiece_tokens_per_s'] / 1e6:.2f}"
                  f" M tok/s; prepare.py 1 worker {w1['tokens_per_s'] / 1e6:.2f} M tok/s (ratio "
                  f"{w1['ratio_per_worker']:.2f}), 2 workers {w2['tokens_per_s'] / 1e6:.2f} M tok/s"
                  f" (ratio per worker {w2['ratio_per_worker']:.2f}); 1 -> 2: "
                  f"{t['speedup_2_workers']:.2f}x (machine ceiling {t['ceiling_2_processes']:.2f}x)",
                  flush=True)

        res["memory"] = []
        for name, corpus in (("x1", x1), ("x4", x4)):
            for mode in ("reuse", "train"):
                extra = ["--tokenizer", tok] if mode == "reuse" else ["--vocab_size", args.vocab_size]
                out = td / f"mem_{name}_{mode}"
                r = run_prepare(["--input", corpus, "--output", out, "--num_groups", 2,
                                 "--text_mode", "file", *extra])
                m = json.loads((out / "manifest.json").read_text())
                r.update(corpus=name, tokenizer=mode, docs=m["documents_kept"],
                         tokens=sum(s["num_tokens"] for s in m["splits"].values()),
                         mb=m["sources"][0]["bytes"] / 2**20)
                res["memory"].append(r)
                print(f"peak RSS {name} ({r['mb']:.0f} MiB, {mode} tokenizer): "
                      f"{r['maxrss_kb'] / 1024:.0f} MiB", flush=True)
        res["filters"] = filter_runs(td, tok, args.filter_copies, args.repeats)
        # peak RSS with every filter on at 1 copy vs --filter_copies copies
        x1 = filter_runs(td / "x1", tok, 1, 1, plan=[("all", 1)])
        res["filters_memory"] = [x1[0], next(r for r in res["filters"]
                                             if r["filters_on"] == "all" and r["workers"] == 1)]
    info["loadavg_end"] = os.getloadavg()

    print("\n| measurement | value |\n|---|---|")
    print(f"| SentencePiece encode, 1 thread, {ref['mb']:.0f} MiB | {ref['tokens_per_s'] / 1e6:.2f}"
          f" M tok/s ({ref['tokens_per_cpu_s'] / 1e6:.2f} M tok per CPU-s); as int lists "
          f"{ref['int_lists']['tokens_per_s'] / 1e6:.2f} M tok/s |")
    for t in res["throughput"]:
        w1, w2 = t["workers"]
        c = f"{t['mb']:.0f} MiB"
        print(f"| {c}: SentencePiece alone, 1 thread (interleaved with the runs below) | "
              f"{t['sentencepiece_tokens_per_s'] / 1e6:.2f} M tok/s |")
        for w in (w1, w2):
            print(f"| {c}: prepare.py end-to-end, {w['workers']} worker(s) | "
                  f"{w['tokens_per_s'] / 1e6:.2f} M tok/s, ratio per worker "
                  f"{w['ratio_per_worker']:.2f} (paired median {w['ratio_per_worker_paired_median']:.2f})"
                  f"; per CPU-s {w['cpu_ratio']:.2f} |")
        print(f"| {c}: speed-up 1 -> 2 workers: end-to-end best; paired median; main loop | "
              f"{t['speedup_2_workers']:.2f}x; {t['speedup_2_workers_paired_median']:.2f}x; "
              f"{t['speedup_2_workers_main_loop']:.2f}x |")
        print(f"| {c}: the machine's ceiling, 2 independent SentencePiece processes vs 1 | "
              f"{t['ceiling_2_processes']:.2f}x |")
    for r in res["memory"]:
        print(f"| peak RSS, {r['corpus']} = {r['mb']:.0f} MiB / {r['docs']} docs, "
              f"{r['tokenizer']} tokenizer | {r['maxrss_kb'] / 1024:.0f} MiB |")
    print("\n| WET input, filters on | workers | docs/s | MiB/s | peak RSS | kept / in |\n"
          "|---|---|---|---|---|---|")
    for r in res["filters"]:
        print(f"| {r['filters_on']} | {r['workers']} | {r['docs_per_s']:,.0f} | "
              f"{r['mb_per_s']:.1f} | {r['maxrss_kb'] / 1024:.0f} MiB | "
              f"{r['docs_kept']:,} / {r['docs_in']:,} |")
    for r in res["filters_memory"]:
        print(f"| peak RSS, all filters, {r['copies']} WET copies ({r['text_mb']:.0f} MiB) | "
              f"{r['maxrss_kb'] / 1024:.0f} MiB |")
    print(f"\nmachine: {info['cpu']} x{info['cpu_count']}, load average "
          f"{info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
