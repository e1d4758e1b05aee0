"""The repo's sbatch scripts, submitted unmodified to a real SLURM controller on this machine.

slurm/local_cluster.sh installs (if missing) and starts munged + slurmctld + slurmd; the tests
submit slurm/prepare_data.sbatch, slurm/codistill.sbatch (a 2-task job array: two codistilling
groups) and slurm/baseline.sbatch with tiny settings passed only through --export and sbatch
options, and check what the jobs left behind. A requeue test signals a running array task
(SIGUSR1 to the job steps, as --signal=USR1@120 does before the time limit) and checks that it
checkpointed, requeued itself as <array>_<task> and finished from its checkpoint; another does
the same through the batch shell with LAUNCHER=deepspeed. The cluster is the tests' own
(/tmp/slurm-pytest, port 6917, 2 slurmd nodes) and is always stopped at the end.

Skipped (with the reason) only when SLURM is not installed and cannot be installed here
(not root, no apt-get, apt-get failing): local_cluster.sh exits 3 in exactly those cases.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
# The tests' own cluster (state dir and ports apart from a developer's /tmp/slurm-local on 6817),
# with two slurmd "nodes" so that a --nodes=2 job runs; always stopped at the end.
STATE_DIR = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/slurm-pytest"))
PORT = os.environ.get("SLURM_TEST_PORT", "6917")

# Tiny, CPU-only settings: one CPU rank per group, no GPUs.
CPU_OPTS = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=15:00"]
TINY = {"MODEL": "lstm", "MODEL_SIZE": "tiny", "SEQ_LEN": "64", "DS_CONFIG": "ds_configs/zero2.json",
        "EXTRA_ARGS": "--eval_batches 4 --log_every 5 --warmup_steps 5"}


# ---------------------------------------------------------------- helpers
def _env(**extra) -> dict:
    env = dict(os.environ)
    # jobs inherit the submitter's environment: put this interpreter's venv first on PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["SLURM_CONF"] = str(STATE_DIR / "slurm.conf")
    env["SLURM_LOCAL_DIR"] = str(STATE_DIR)
    env["SLURM_LOCAL_PORT"] = PORT
    env["SLURM_LOCAL_NODES"] = "2"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def _run(cmd, timeout=30, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(["timeout", str(timeout)] + [str(c) for c in cmd], cwd=ROOT, env=kw.pop("env", _env()),
                       capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {p.returncode}\n{p.stdout}\n{p.stderr}\n{_daemon_logs()}")
    return p


def _daemon_logs(lines: int = 25) -> str:
    out = []
    for f in sorted((STATE_DIR / "log").glob("slurm*.log")):
        tail = f.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {f} (last {lines} lines)\n" + "\n".join(tail))
    return "\n".join(out)


def _job_logs(log_dir: Path) -> str:
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')}" for f in sorted(log_dir.glob("*.out")))


def _diag(log_dir: Path) -> str:
    return f"\n===== job logs =====\n{_job_logs(log_dir)}\n===== daemon logs =====\n{_daemon_logs()}"


def _export(**kv) -> str:
    # sbatch --export=ALL,K=V,...: values must not contain commas; quote values with spaces
    parts = ["ALL"]
    for k, v in kv.items():
        v = str(v)
        assert "," not in v, (k, v)
        parts.append(f"{k}={v}")
    return "--export=" + ",".join(parts)


def _sbatch(script: str, *opts, export: dict, wait: bool, timeout: int = 60) -> tuple[str, subprocess.CompletedProcess]:
    """Submit ``script``; with ``wait``, return when every task of the job has finished, with
    sbatch --wait's exit status (the largest task exit code; 124 past ``timeout``). The job is
    polled every second with scontrol: sbatch --wait polls at 2, 8, 32, 32... s (src/sbatch/sbatch.c
    _job_wait, while the sleep is below MinJobAge / 2), which noticed a 12 s job at 42 s."""
    p = _run(["sbatch", "--parsable", *opts, _export(**export), script], timeout=60, check=False)
    m = re.match(r"(\d+)", p.stdout.strip())
    jobid = m.group(1) if m else ""
    if not (wait and jobid and p.returncode == 0):
        return jobid, p
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = _job_fields(jobid)
        if recs and all(r.get("JobState") in FINISHED for r in recs):
            codes = [int(r.get("ExitCode", "1:0").split(":")[0]) or (r["JobState"] != "COMPLETED") for r in recs]
            return jobid, subprocess.CompletedProcess(p.args, max(codes), p.stdout, p.stderr)
        time.sleep(1)
    _run(["scancel", jobid], check=False)
    return jobid, subprocess.CompletedProcess(p.args, 124, p.stdout, p.stderr + f"\njob {jobid}: timed out")


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")


def _job_fields(jobid: str) -> list[dict]:
    """scontrol show job -> one dict per (array task) record."""
    p = _run(["scontrol", "show", "job", jobid], check=False)
    recs = []
    for block in p.stdout.strip().split("\n\n"):
        d = dict(re.findall(r"(\w+)=(\S*)", block))
        if d:
            recs.append(d)
    return recs


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the tests' local cluster with slurm/local_cluster.sh; always stop it afterwards."""
    env = _env()
    p = subprocess.run(["timeout", "1200", "bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True)
    try:
        if p.returncode == 3:
            reason = "SLURM cannot be installed/started here: " + (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"\nSKIP test_slurm: {reason}", file=sys.stderr)
            pytest.skip(reason)
        assert p.returncode == 0, f"local_cluster.sh start failed ({p.returncode}):\n{p.stdout}\n{p.stderr}\n{_daemon_logs()}"
        yield env
    finally:
        s = subprocess.run(["timeout", "120", "bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True)
        if s.returncode != 0:
            print(f"local_cluster.sh stop failed: {s.stdout}{s.stderr}", file=sys.stderr)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def prepared(slurm_cluster, work):
    """slurm/prepare_data.sbatch on the embedded corpus (--sample), waited for (_sbatch)."""
    logs = work / "logs_prep"
    logs.mkdir()
    data = work / "data"
    jobid, p = _sbatch("slurm/prepare_data.sbatch", "--cpus-per-task=1", "--time=10:00", f"--output={logs}/%x_%j.out",
                       export={"DATA_DIR": data}, wait=True, timeout=300)
    assert p.returncode == 0, f"prepare_data.sbatch failed: {p.stdout}{p.stderr}{_diag(logs)}"
    assert (data / "manifest.json").is_file(), _diag(logs)
    return data


# ---------------------------------------------------------------- tests
def test_local_cluster_status(slurm_cluster):
    p = _run(["bash", CLUSTER, "status"])
    assert "idle" in p.stdout or "mix" in p.stdout, p.stdout
    p = _run(["sinfo", "-h", "-o", "%P %a %D"])
    assert p.stdout.split() == ["debug*", "up", "2"], p.stdout  # default partition, up, 2 nodes


def test_prepare_data_sbatch(prepared, work):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest, manifest
    log = next((work / "logs_prep").glob("prepare_data_*.out")).read_text()
    assert "embedded sample corpus" in log and "done:" in log, log


def test_prepare_data_array_and_merge(prepared, work):
    """slurm/prepare_data_array.sh: tokenizer job -> 2-task shard array -> merge job
    (afterok). The tokenizer and every shard file are byte-identical to the single job's."""
    logs = work / "logs_prep_array"
    logs.mkdir()
    data = work / "data_array"
    env = _env(NUM_SHARDS="2", DATA_DIR=str(data), WAIT="1")
    p = _run(["bash", "slurm/prepare_data_array.sh", "--cpus-per-task=1", "--time=10:00",
              f"--output={logs}/%x_%j.out"], env=env, timeout=300, check=False)
    assert p.returncode == 0, f"prepare_data_array.sh failed: {p.stdout}{p.stderr}{_diag(logs)}"
    assert p.stdout.strip().isdigit(), p.stdout  # the merge job id, for afterok chaining
    assert "shard array job" in p.stderr and "merge job" in p.stderr, p.stderr
    shards = sorted((work / "data_array.shards").glob("shard_*"))
    assert [d.name for d in shards] == ["shard_00000", "shard_00001"], _diag(logs)
    single = {f.name: f.read_bytes() for f in prepared.iterdir() if f.name != "manifest.json"}
    merged = {f.name: f.read_bytes() for f in data.iterdir() if f.name != "manifest.json"}
    assert merged == single, _diag(logs)
    ms, mm = (json.loads((d / "manifest.json").read_text()) for d in (prepared, data))
    assert ms.pop("tokenizer_trained") and not mm.pop("tokenizer_trained")  # shared, not trained
    assert mm == ms
    merge_log = next(logs.glob("prep_merge_*.out")).read_text()
    assert "merged 2 shards" in merge_log and "done:" in merge_log, merge_log


def test_codistill_array(prepared, work):
    """A 2-task job array = two groups that codistill through the shared run directory."""
    logs = work / "logs_cd"
    logs.mkdir()
    run = work / "run_cd"
    steps, burn_in, every = 30, 5, 5
    jobid, p = _sbatch("slurm/codistill.sbatch", "--array=0-1", *CPU_OPTS, f"--output={logs}/%x_%A_%a.out",
                       export=dict(TINY, DATA_DIR=prepared, RUN_DIR=run, STEPS=steps, EXPORT_EVERY=every,
                                   BURN_IN=burn_in, EVAL_EVERY=15, SAVE_EVERY=10),
                       wait=True, timeout=420)
    diag = _diag(logs)
    assert jobid, p.stderr
    assert p.returncode == 0, f"job -> {p.returncode}: {p.stderr}{diag}"

    recs = {r.get("ArrayTaskId"): r for r in _job_fields(jobid)}
    assert set(recs) == {"0", "1"}, (recs.keys(), diag)
    for tid, r in recs.items():
        assert r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0", (tid, r["JobState"], r["ExitCode"], diag)

    for g in (0, 1):
        log = logs / f"codistill_{jobid}_{g}.out"
        assert log.is_file(), diag  # one log per array task (%A_%a)
        text = log.read_text()
        assert f"group {g} of 2" in text and f"--group_id {g}" in text, text
        assert f"tensorboard --logdir {run}" in text, text  # TensorBoard directory printed

        gdir = run / f"group_{g}"
        latest = (gdir / "exports" / "LATEST").read_text().strip()
        assert latest, diag
        assert (gdir / "final").is_dir(), diag

        sc = _scalars(gdir / "tb")
        distill = [v for s, v in sc.get("train/distill", []) if s > burn_in + every]
        assert distill and max(distill) > 0, (sorted(sc), sc.get("train/distill"), diag)
        tsteps = [v for _, v in sc.get("teacher/step", [])]
        assert tsteps and max(tsteps) > 0, (sc.get("teacher/step"), diag)  # loaded the peer's exports
        assert tsteps == sorted(tsteps), tsteps  # teacher step only moves forward

        summ = json.loads((gdir / "summary.json").read_text())
        assert summ["steps"] == steps, summ
        peer = str(1 - g)
        assert int(summ["teacher_steps"][peer]) > 0, summ


def test_diloco_array(prepared, work):
    """The same array script with --peer_use diloco (issue 30): each task is one group's launch; at
    every exchange step it waits for the other task's export and both take the same outer step,
    so the two groups end with bit-identical weights."""
    import torch
    from safetensors.torch import load_file
    logs = work / "logs_diloco"
    logs.mkdir()
    run = work / "run_diloco"
    jobid, p = _sbatch("slurm/codistill.sbatch", "--array=0-1", *CPU_OPTS, f"--output={logs}/%x_%A_%a.out",
                       export=dict(TINY, DATA_DIR=prepared, RUN_DIR=run, STEPS=10, EXPORT_EVERY=5, BURN_IN=0,
                                   EVAL_EVERY=10, SAVE_EVERY=10,
                                   EXTRA_ARGS=TINY["EXTRA_ARGS"] + " --peer_use diloco --teacher_timeout 300 "
                                                                   "--poll_interval 0.2"),
                       wait=True, timeout=420)
    diag = _diag(logs)
    assert jobid and p.returncode == 0, f"job -> {p.returncode}: {p.stderr}{diag}"
    for g in (0, 1):
        text = (logs / f"codistill_{jobid}_{g}.out").read_text()
        for step in (5, 10):
            assert f"[group {g}] step {step}: --peer_use diloco over groups [0, 1]" in text, diag
    a, b = (load_file(run / f"group_{g}" / "final" / "model.safetensors") for g in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_for(pred, timeout, what, diag=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{diag()}")


def test_requeue_resumes_from_checkpoint(prepared, work):
    """SIGUSR1 to a running array task -> checkpoint, exit 75, scontrol requeue, resume, finish."""
    logs = work / "logs_rq"
    logs.mkdir()
    run = work / "run_rq"
    steps = 50
    # Re-run a single group of a 2-group run (--array=1): the requeue must name <array>_<task>.
    jobid, p = _sbatch("slurm/codistill.sbatch", "--array=1", *CPU_OPTS, f"--output={logs}/%x_%A_%a.out",
                       export=dict(TINY, DATA_DIR=prepared, RUN_DIR=run, NUM_GROUPS=2, STEPS=steps, EXPORT_EVERY=10,
                                   BURN_IN=10, EVAL_EVERY=25, SAVE_EVERY=1000),
                       wait=False)
    assert jobid and p.returncode == 0, p.stderr
    task = f"{jobid}_1"
    log = logs / f"codistill_{jobid}_1.out"
    diag = lambda: _diag(logs)  # noqa: E731

    def progressed():
        m = re.findall(r"\[group 1\] step (\d+)/", log.read_text()) if log.is_file() else []
        return m and int(m[-1]) >= 10

    try:
        _wait_for(progressed, 240, "the task to reach step 10", diag)
        _run(["scancel", "--signal=USR1", task])  # what --signal=USR1@120 does before the time limit

        def restarted():
            r = _job_fields(task)
            return r and int(r[0].get("Restarts", "0")) >= 1 and r[0]
        _wait_for(restarted, 120, "the task to requeue (Restarts>=1)", diag)

        def finished():
            r = _job_fields(task)
            return r and r[0]["JobState"] in FINISHED and r[0]
        rec = _wait_for(finished, 300, "the requeued task to finish", diag)
    finally:
        _run(["scancel", jobid], check=False)  # no-op when done; never leave a job behind
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec["JobState"], rec["ExitCode"], diag())
    assert int(rec["Restarts"]) >= 1, rec
    assert f"requeueing {task}" in text, diag()
    m = re.search(r"checkpoint saved at step (\d+)", text)
    assert m, diag()
    saved = int(m.group(1))
    assert 10 <= saved < steps, saved
    assert f"resumed from step {saved}" in text, diag()  # the second run continued from the checkpoint
    assert "restart 1" in text, diag()
    summ = json.loads((run / "group_1" / "summary.json").read_text())
    assert summ["steps"] == steps, summ


def test_baseline_sbatch_two_nodes(prepared, work):
    """The same trainer without codistillation, one group over 2 nodes (srun, env:// rendezvous)."""
    logs = work / "logs_base"
    logs.mkdir()
    run = work / "run_base"
    jobid, p = _sbatch("slurm/baseline.sbatch", "--nodes=2", *CPU_OPTS, f"--output={logs}/%x_%j.out",
                       export=dict(TINY, DATA_DIR=prepared, RUN_DIR=run, STEPS=10, EVAL_EVERY=10, SAVE_EVERY=10),
                       wait=True, timeout=300)
    assert p.returncode == 0, f"baseline.sbatch -> {p.returncode}{_diag(logs)}"
    text = (logs / f"baseline_{jobid}.out").read_text()
    assert "--num_groups 1" in text and "codistillation off" in text, text
    assert "ranks: 2 x 1" in text and "| world 2 |" in text, text  # one rank on each of the 2 nodes
    summ = json.loads((run / "summary.json").read_text())
    assert summ["num_groups"] == 1 and summ["groups"]["group_0"]["steps"] == 10, summ
    assert not (run / "group_0" / "exports" / "LATEST").exists()  # nothing exported without peers


def test_deepspeed_launcher_batch_signal_requeue(prepared, work):
    """LAUNCHER=deepspeed (hostfile launcher from the batch shell), non-array job: a SIGUSR1 to
    the batch shell (as --signal=B:USR1@N would send) is forwarded to the rank, which
    checkpoints; the job requeues itself by its plain job id and resumes."""
    logs = work / "logs_ds"
    logs.mkdir()
    run = work / "run_ds"
    steps = 25
    jobid, p = _sbatch("slurm/baseline.sbatch", *CPU_OPTS, f"--output={logs}/%x_%j.out",
                       export=dict(TINY, LAUNCHER="deepspeed", DATA_DIR=prepared, RUN_DIR=run, STEPS=steps,
                                   EVAL_EVERY=25, SAVE_EVERY=1000),
                       wait=False)
    assert jobid and p.returncode == 0, p.stderr
    log = logs / f"baseline_{jobid}.out"
    diag = lambda: _diag(logs)  # noqa: E731

    def progressed():
        m = re.findall(r"\[group 0\] step (\d+)/", log.read_text()) if log.is_file() else []
        return m and int(m[-1]) >= 5

    try:
        _wait_for(progressed, 240, "the job to reach step 5", diag)
        _run(["scancel", "--batch", "--signal=USR1", jobid])

        def finished():
            r = _job_fields(jobid)
            return r and r[0]["JobState"] in FINISHED and r[0]
        rec = _wait_for(finished, 300, "the requeued job to finish", diag)
    finally:
        _run(["scancel", jobid], check=False)
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and int(rec["Restarts"]) >= 1, (rec["JobState"], rec["Restarts"], diag())
    assert "launcher: deepspeed" in text and "batch shell got SIGUSR1" in text, diag()
    m = re.search(r"checkpoint saved at step (\d+)", text)
    assert m and f"requeueing {jobid} " in text, diag()
    assert f"resumed from step {m.group(1)}" in text, diag()
    assert json.loads((run / "summary.json").read_text())["groups"]["group_0"]["steps"] == steps
