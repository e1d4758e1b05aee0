"""Shared fixtures: the embedded corpus prepared once per session, a launcher for real
DeepSpeed runs (CPU, gloo), and TensorBoard's own event reader."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from codistill.comm import free_port  # noqa: F401  (shared with the benchmarks)
from codistill.runlog import read_events, read_scalars  # noqa: F401  (TensorBoard's own reader)

ROOT = Path(__file__).resolve().parents[1]
# Tests of one tier reuse another's helpers and fixtures by module name (tests/e2e/test_hf_e2e.py takes
# tests/unit/test_hf_models.py's configs and tests/integration/test_hf_tokenizer.py's tokenizer data),
# as they did when the tests were one folder: pytest imports each test file under its basename.
sys.path[1:1] = [str(ROOT / "tests" / tier) for tier in ("unit", "integration") if str(ROOT / "tests" / tier) not in sys.path]
PY = sys.executable
# The CPU tier is CPU on a GPU node too: DeepSpeed's CPU accelerator in this process (and every run
# started by env_for_runs), and codistill/device.py trains on CPU under DS_ACCELERATOR=cpu. GPU tests
# pop it from their runs' environment (env_for_runs(gpu=True), benchmarks/gpu_smoke.py) or use torch.cuda.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
DEEPSPEED = str(Path(PY).with_name("deepspeed"))
TORCHRUN = str(Path(PY).with_name("torchrun"))
# This interpreter's scripts first on PATH, for this process as for the runs it starts (env_for_runs):
# torch builds DeepSpeed's CPU comm op with the first `ninja` on PATH, and the venv's (pip, 1.13) and a
# system one (1.11) record a build differently, so each rebuilds what the other built (20-35 s a
# time) when a suite run without the venv activated mixes them.
if os.environ.get("PATH", "").split(os.pathsep)[0] != str(Path(PY).parent):
    os.environ["PATH"] = f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The embedded BBC News corpus, 6 disjoint group shards + val, small vocab for speed.
    ``CODISTILL_TEST_DATA=DIR``: a directory prepared that way beforehand (an air-gapped GPU
    node may lack the data-prep packages): ``python -c "from data_prep.prepare import
    prepare_sample; prepare_sample('DIR', num_groups=6, vocab_size=2000)"``."""
    if os.environ.get("CODISTILL_TEST_DATA"):
        return Path(os.environ["CODISTILL_TEST_DATA"])
    from data_prep.prepare import prepare_sample
    return prepare_sample(tmp_path_factory.mktemp("data") / "sample", num_groups=6, vocab_size=2000, quiet=True)


def env_for_runs(gpu: bool = False) -> dict:
    """The environment of a real run: DeepSpeed's CPU accelerator unless ``gpu``."""
    env = dict(os.environ)
    if gpu:
        env.pop("DS_ACCELERATOR", None)
    else:
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Log:
    """A trainer log (Console's interface) that keeps its lines, for in-process plan_run tests."""
    def __init__(self):
        self.lines = []

    def __call__(self, msg, force=False):
        self.lines.append(msg)

    error = warning = __call__


def ranks_command(num_ranks: int, launcher: str | None = None, gpu: bool = False) -> list[str]:
    """The command that starts ``num_ranks`` ranks of a script (append the script and its flags).

    ``launcher``: "deepspeed" (the README's launcher), "torchrun" (PyTorch's: the same env://
    world - RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT - as srun gives a
    SLURM task; about 4 s faster a launch here, with one Python start-up instead of the deepspeed
    runner's and launch.py's and no 1 s exit poll) or "python" (one rank: a 1-rank world,
    codistill/comm.py rendezvous_defaults). Default: python for one rank, torchrun for several
    (the deepspeed launcher on a GPU node). The deepspeed launcher itself runs the main command's
    shared run below, the fault tests that kill ranks, the GPU tier and SLURM's LAUNCHER=deepspeed."""
    launcher = launcher or ("python" if num_ranks == 1 else "deepspeed" if gpu else "torchrun")
    if launcher == "deepspeed":
        return [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port())]
    if launcher == "torchrun":
        return [TORCHRUN, "--nproc_per_node", str(num_ranks), "--master_port", str(free_port())]
    assert launcher == "python" and num_ranks == 1, (launcher, num_ranks)
    return [PY]


def launch(args: list[str], num_ranks: int = 1, timeout: int = 600, check: bool = True,
           background: bool = False, gpu: bool = False, launcher: str | None = None):
    """Run recipes/train_lm.py with ``num_ranks`` CPU ranks (GPUs with ``gpu``), started by
    ``launcher`` (ranks_command)."""
    cmd = [*ranks_command(num_ranks, launcher, gpu), str(ROOT / "recipes" / "train_lm.py"), *map(str, args)]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env_for_runs(gpu), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_runs(gpu), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_python(args: list[str], timeout: int = 300, gpu: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *map(str, args)], cwd=ROOT, env=env_for_runs(gpu), capture_output=True, text=True,
                          timeout=timeout, **kw)


def load_script(name: str):
    """A script of recipes/ (e.g. "generate") as a module: the recipes are scripts, not a package."""
    import importlib.util
    key = f"_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "recipes" / f"{name}.py")
        mod = sys.modules[key] = importlib.util.module_from_spec(spec)  # dataclasses need it registered
        spec.loader.exec_module(mod)
    return sys.modules[key]


def scalar_tags(tb_dir: Path) -> set[str]:
    return set(read_events(tb_dir))


# ---- small exports written by tests (teacher, exchange and fault-tolerance tests) -------------
def _test_model_config():
    from model import preset_config
    return preset_config("lstm", "tiny", vocab_size=64)


TOK = "tok-sha"


def export_meta(cfg=None, tok=TOK, group=1) -> dict:
    cfg = cfg or CFG
    return {"group": group, "tokens_seen": 1 << 30, "model_config": cfg.to_dict(),  # >= any step
            "model_config_hash": cfg.config_hash(), "tokenizer_sha256": tok}


def write_test_export(d, step, cfg=None, tok=TOK, seed=0, keep=3):
    """Export a freshly initialised ``cfg`` model (seed ``seed``) as step ``step`` into ``d``."""
    import torch

    from codistill.exports import write_export
    from model import build_model
    cfg = cfg or CFG
    torch.manual_seed(seed)
    sd = build_model(cfg).state_dict()
    write_export(d, step, sd, export_meta(cfg, tok), keep=keep)
    return sd


CFG = _test_model_config()


# ---- the main command's run, shared by tests/e2e/test_train.py and test_fault_tolerance.py ----
E2E_STEPS, E2E_K, E2E_BURN = 40, 10, 15


def e2e_args(data, run_dir, **kw) -> list[str]:
    """Flags of the tiny e2e runs (tiny LSTM, seq 32); ``kw`` overrides or adds flags."""
    args = {"--ds_config": "ds_configs/zero2.json", "--data": data, "--run_dir": run_dir, "--max_steps": E2E_STEPS,
            "--export_every": E2E_K, "--burn_in_steps": E2E_BURN, "--eval_every": 20, "--save_every": 20,
            "--eval_batches": 4, "--seq_len": 32, "--log_every": 5}
    args.update({f"--{k}": v for k, v in kw.items()})
    return [str(x) for kv in args.items() for x in kv]


@pytest.fixture(scope="session")
def main_run(sample_data, tmp_path_factory):
    """The main command's code path: one process hosting 2 groups (sync teachers)."""
    run_dir = tmp_path_factory.mktemp("main") / "run"
    proc = launch(e2e_args(sample_data, run_dir), launcher="deepspeed")  # the README's main command
    return run_dir, proc.stdout


TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    """Markers by folder: tests/unit (in-process, milliseconds to seconds), tests/integration (real
    DeepSpeed engines, several processes, a local HTTP server: seconds), tests/e2e (real training
    launches, SLURM, benchmarks' smoke runs: minutes). `pytest tests/unit` is the fast command and
    `-m unit` / `-m "not e2e"` select the same tiers."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts[0] in TIERS:
            item.add_marker(parts[0])


def pytest_sessionfinish(session, exitstatus):
    """Remove DeepSpeed's CPU all-reduce shared-memory buffers (/dev/shm/deepspeed_allreduce_buffer_*,
    66 MB each) that no live process maps. Ranks the fault tests kill never unlink theirs; a few
    hundred of them filled this machine's RAM once (the suite then swapped and was OOM-killed)."""
    shm = Path("/dev/shm")
    leaked = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    if not leaked:
        return
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(None, 5)[-1].strip() for line in maps.read_text().splitlines()
                          if "/dev/shm/deepspeed_allreduce_buffer_" in line)
        except OSError:  # the process ended meanwhile, or is not ours to read
            pass
    for p in leaked:
        if str(p) not in mapped:
            p.unlink(missing_ok=True)
