"""The GPU tier: `pytest -m gpu` on a node with CUDA runs every check of benchmarks/gpu_smoke.py
(one home for what the GPU tier checks: the README's main command; bf16 with every teacher mode -
full, --teacher_offload cpu, --teacher_topk, and on 2+ GPUs --teacher_partition with ZeRO-3 over
a group's 2 ranks - for the LSTM, the repo's Transformer and a tied HF Llama config; ZeRO-3;
the NCCL world split; --carry_state; --noise_scale; --init_from; --peer_use average and diloco
(one launch per group, a group on 2 ZeRO-3 ranks); --peer_models any; an exact resume under
deterministic kernels; teacher == student logits in bf16), one test per check, without the
smoke command's time budget. A check that needs more GPUs than the node has is skipped with
that reason; on a machine without CUDA every GPU test is skipped ("needs CUDA").

What runs on CPU here (not marked gpu): the smoke command's plumbing - its plan and SKIP reasons
with no GPU, and the classification of a check that cannot finish (the --minutes budget ran out:
SKIP; its own limit: FAIL; its processes killed, the deepspeed launcher's children included).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import PY, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # gpu_smoke imports its sibling common.py
_spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
gpu_smoke = sys.modules["gpu_smoke"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_smoke)

needs_cuda = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run `pytest -m gpu` on a GPU node")]


def with_marks(marks):
    def deco(fn):
        for m in reversed(marks):
            fn = m(fn)
        return fn
    return deco


# ---- the GPU tier ------------------------------------------------------------------------------
@with_marks(needs_cuda)
@pytest.mark.parametrize("name", [c.name for c in gpu_smoke.CHECKS if c.name != "throughput"])
def test_gpu_check(name, sample_data, tmp_path):
    """One check of benchmarks/gpu_smoke.py (throughput is a measurement, left to the command)."""
    sm = gpu_smoke.Smoke("cuda", str(sample_data), minutes=60, root=tmp_path)
    r = gpu_smoke.run_check(sm, gpu_smoke.BY_NAME[name])
    if r["result"] == "SKIP":
        pytest.skip(r["detail"])
    assert r["result"] == "PASS", r["detail"]


# ---- the smoke command's plumbing, on CPU ------------------------------------------------------
def smoke_cli(tmp_path, *args, timeout=120) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "out"
    proc = subprocess.run([PY, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    files = sorted(out.glob("gpu_smoke_*.json"))
    assert proc.returncode == 0 and len(files) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(files[0].read_text()), files[0].with_suffix(".txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU plan is checked where there is no GPU")
def test_the_smoke_plan_names_every_check_and_why_it_cannot_run_here(tmp_path):
    _, res, txt = smoke_cli(tmp_path, "--dry_run")
    names = [c.name for c in gpu_smoke.CHECKS]
    assert res["order"] == names and set(res["checks"]) == set(names) and res["dry_run"] is True
    for arch in gpu_smoke.ARCHS:  # every teacher mode for every architecture
        assert {f"teachers/{arch}/{m}" for m in ("full", "offload", "topk", "partition")} <= set(names)
    assert {"main", "zero3", "split", "carry_state", "noise_scale", "init_from", "average", "diloco",
            "peer_models", "resume", "parity"} <= set(names)
    for name, c in res["checks"].items():
        need = gpu_smoke.BY_NAME[name].gpus
        assert c["result"] == "SKIP" and c["detail"] == f"needs {need} GPUs, 0 available", (name, c)
    assert "check | result" in txt and "teachers/llama_tied/partition" in txt
    # on CPU ranks with one "device" allowed: the 2-GPU checks are the ones skipped
    _, res, _ = smoke_cli(tmp_path / "cpu", "--dry_run", "--device", "cpu", "--devices", "1", "--only",
                          "teachers/lstm,split")
    assert {n: c["result"] for n, c in res["checks"].items()} == {
        "teachers/lstm/full": "PLANNED", "teachers/lstm/offload": "PLANNED", "teachers/lstm/topk": "PLANNED",
        "teachers/lstm/partition": "SKIP", "split": "SKIP"}


def sleeper_check(sm, pid_file) -> dict:
    """A check whose process starts a child and sleeps: as a deepspeed launcher does."""
    code = ("import subprocess, sys, time, pathlib; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(c.pid)); time.sleep(120)")
    sm.call([PY, "-c", code])
    return {"detail": "finished"}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie (killed, not yet reaped by init) is gone too
        return f.read().split(")")[-1].split()[0] == "Z"


@pytest.mark.parametrize("case", ["budget", "own_limit"])
def test_a_check_that_cannot_finish_is_skip_when_the_budget_ran_out_and_fail_at_its_own_limit(tmp_path, case):
    """The issue's 'last run times out as FAIL rather than SKIP': the budget cut is SKIP; a check
    past its own limit is FAIL. Either way the whole process group is gone within seconds."""
    sm = gpu_smoke.Smoke("cpu", minutes=3 / 60 if case == "budget" else 10, root=tmp_path)
    check = gpu_smoke.Check("sleeper", lambda s: sleeper_check(s, tmp_path / "child.pid"),
                            timeout=100 if case == "budget" else 3, estimate=1)
    t0 = time.time()
    r = gpu_smoke.run_check(sm, check)
    assert time.time() - t0 < 25
    if case == "budget":
        assert r["result"] == "SKIP" and r["ok"] is None and r["detail"].startswith("budget exhausted: killed"), r
    else:
        assert r["result"] == "FAIL" and r["ok"] is False and "past the check's own limit" in r["detail"], r
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.time() + 10
    while not gone(child) and time.time() < deadline:
        time.sleep(0.2)
    assert gone(child), "the check's grandchild outlived it"


def test_checks_that_cannot_start_are_skip_with_the_reason(tmp_path):
    sm = gpu_smoke.Smoke("cpu", minutes=0.5, devices=1, root=tmp_path)
    ran = []
    r = gpu_smoke.run_check(sm, gpu_smoke.Check("two", lambda s: ran.append(1) or {"detail": ""}, gpus=2))
    assert r["result"] == "SKIP" and r["detail"] == "needs 2 ranks, 1 available", r
    r = gpu_smoke.run_check(sm, gpu_smoke.Check("long", lambda s: ran.append(1) or {"detail": ""}, estimate=60))
    assert r["result"] == "SKIP" and r["detail"].startswith("budget exhausted:") and "needs ~60 s" in r["detail"], r
    r = gpu_smoke.run_check(sm, gpu_smoke.Check("ok", lambda s: ran.append(1) or {"detail": "ran"}, estimate=1))
    assert r["result"] == "PASS" and r["ok"] is True and ran == [1], r
    bad = gpu_smoke.Check("bad", lambda s: gpu_smoke.need(False, "expected x, got y"), estimate=1)
    r = gpu_smoke.run_check(sm, bad)
    assert r["result"] == "FAIL" and r["detail"] == "Failed: expected x, got y", r
