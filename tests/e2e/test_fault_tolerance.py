"""Faults injected into real runs (issue 7) and the pieces that handle them, in-process.

Real runs are tiny (LSTM tiny, seq 32, <= 50 steps) and started with plain `python
recipes/train_lm.py` (a 1-rank world, the SIGTERM test's way) to save the launcher's start-up;
the uninterrupted reference is the shared `main_run` fixture (conftest.py). Faults come from
the test-only hook CODISTILL_FAULT_INJECT (codistill/faults.py) or from files planted in a
peer's exports directory.
"""
import json
import math
import os
import pickle
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import CFG, E2E_STEPS, PY, ROOT, TOK, e2e_args, env_for_runs, launch, read_scalars, run_python  # noqa: F401
from conftest import write_test_export as _export
from safetensors.torch import load_file

from codistill import checkpoint, faults
from codistill.exports import list_exports, read_export, read_latest
from codistill.layout import exports_dir
from model import preset_config


def tb(run_dir, group, tag):
    return read_scalars(Path(run_dir) / f"group_{group}" / "tb", tag)


def test_burn_in_past_max_steps_only_warns(sample_data, tmp_path):
    """A warning, not an error; checked with --stop_after_steps so that it stops almost at once."""
    proc = run_python(["recipes/train_lm.py", *e2e_args(sample_data, tmp_path / "run", burn_in_steps=40,
                                                        max_steps=4, export_every=2, save_every=4, eval_every=4)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning: --burn_in_steps 40 >= --max_steps 4" in proc.stderr


def _popen(args, env_extra=None):
    env = env_for_runs()
    env.update(env_extra or {})
    return subprocess.Popen([PY, str(ROOT / "recipes" / "train_lm.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill9_inside_a_checkpoint_save_then_resume_is_exact(main_run, sample_data, tmp_path):
    """SIGKILL after DeepSpeed wrote step 20's files but before the save completed; 'latest' then
    planted on the partial tag (as DeepSpeed's own non-atomic writer could leave it) and an
    export temp file left behind. --resume auto falls back to step 10 with a warning, removes the
    temp file, and the losses and final weights equal the uninterrupted main_run's."""
    run_dir = tmp_path / "killed"
    args = e2e_args(sample_data, run_dir, save_every=10)
    proc = _popen(args, {faults.ENV: "sigkill_in_save@20"})
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, out
    for g in (0, 1):
        ckpt = run_dir / f"group_{g}" / "checkpoints"
        assert checkpoint.latest_tag(ckpt) == "global_step10"  # never moved to the partial tag
        if g == 0:  # killed inside group 0's save; group 1's had not started
            assert (ckpt / "global_step20").is_dir() and not checkpoint.is_complete(ckpt / "global_step20")
        (ckpt / "latest").write_text("global_step20")
    temp = run_dir / "group_0" / "exports" / ".step_000030.safetensors.tmp-424242"
    temp.write_bytes(b"partial")
    proc = run_python(["recipes/train_lm.py", *args], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "names global_step20, which is incomplete" in out and "resumed from step 10" in out
    assert "names global_step20, which does not exist" in out
    assert not temp.exists()
    for g in (0, 1):
        a, b = tb(main_run[0], g, "train/loss"), tb(run_dir, g, "train/loss")
        assert sorted(b) == list(range(1, E2E_STEPS + 1))
        assert max(abs(a[s] - b[s]) for s in a) < 1e-5
        wa = load_file(main_run[0] / f"group_{g}" / "final" / "model.safetensors")
        wb = load_file(run_dir / f"group_{g}" / "final" / "model.safetensors")
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
        tags = checkpoint.list_tags(run_dir / f"group_{g}" / "checkpoints")
        assert tags and all(checkpoint.is_complete(p) for _, p in tags)


def test_nan_steps_skipped_write_errors_survived_then_stop_after_max_bad_steps(main_run, sample_data, tmp_path):
    """NaN loss at 12,13 (skipped, counted, training goes on), a failed export and a failed
    checkpoint at step 20 (warned; LATEST/latest keep the previous ones; at boundary 30 the peers
    keep their step-10 teacher instead of waiting for the missing export), then NaN from 31 on:
    the run stops at 33 (--max_bad_steps 3) with exit 3, its last good checkpoint intact."""
    run_dir = tmp_path / "nan"
    proc = _popen(e2e_args(sample_data, run_dir, save_every=5, max_bad_steps=3, teacher_timeout=120),
                  {faults.ENV: "nan_loss@12,13,31-40;export_oserror@20;ckpt_oserror@20"})
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3, out
    assert "did not arrive" not in out
    for g in (0, 1):  # no swap waited for the failed export (--teacher_timeout 120 s): measured, not wall time
        assert max(tb(run_dir, g, "teacher/reload_ms").values(), default=0) < 30_000
    assert "--max_bad_steps 3" in out and "steps in a row" in out
    assert "step 12: loss is nan; step skipped" in out and "export of step 20 failed" in out
    assert "checkpoint of step 20 failed" in out and "'latest' still names global_step15" in out
    assert "step 33: loss is nan" in out and "step 34" not in out
    for g in (0, 1):
        gdir = run_dir / f"group_{g}"
        skipped = tb(run_dir, g, "train/skipped_steps")
        assert skipped[11] == 0 and skipped[12] == 1 and skipped[13] == 2 and skipped[30] == 2 and skipped[33] == 5
        loss, ref = tb(run_dir, g, "train/loss"), tb(main_run[0], g, "train/loss")
        assert all(abs(loss[s] - ref[s]) < 1e-5 for s in range(1, 12))
        assert 12 not in loss and 13 not in loss and all(s in loss for s in range(14, 21))
        lr, ref_lr = tb(run_dir, g, "lr"), tb(main_run[0], g, "lr")
        assert all(abs(lr[s] - ref_lr[s]) < 1e-9 for s in range(1, 34))  # skips do not shift the schedule
        teacher = tb(run_dir, g, f"teacher/step/group_{1 - g}")
        assert teacher[30] == 10 and teacher[33] == 10  # peer's export 20 failed: kept 10, no wait
        ckpt = gdir / "checkpoints"
        assert checkpoint.latest_tag(ckpt) == "global_step30" and not (ckpt / "global_step20").exists()
        assert checkpoint.is_complete(ckpt / "global_step30")
        # our own checkpoint (not a peer's): DeepSpeed's counters stayed consistent with the skips
        states = torch.load(ckpt / "global_step30" / "mp_rank_00_model_states.pt", weights_only=False)
        assert states["global_steps"] == 30 and states["skipped_steps"] == 2
        assert states["lr_scheduler"]["last_epoch"] == 30
        exp = gdir / "exports"
        assert read_latest(exp) == 30 and list_exports(exp) == [10, 30]
        for step in (10, 30):
            assert all(torch.isfinite(v).all() for v in read_export(exp, step).state_dict.values())


def test_dead_late_restarted_and_hostile_peers_in_latest_mode(sample_data, tmp_path):
    """Group 0 of 6 trains alone (--group_id 0, latest teachers); the test plays its peers:
    1: exported once, then dead (kept with a warning, staleness grows, dropped past
       --max_teacher_staleness), later restarts and exports again (picked up, no restart of group 0);
    2: a pickle payload named .safetensors, then joins late with a valid export;
    3: LATEST escaping the exports dir; 4: truncated safetensors;
    5: bad JSON, then LATEST naming a missing file, then another architecture.
    The run finishes; every bad file is refused with a warning; the payload never runs."""
    from codistill.data import TokenData
    run_dir = tmp_path / "peers"
    cfg = preset_config("lstm", "tiny", 2000, 1024)
    tok = TokenData(sample_data).tokenizer_sha256
    ed = {p: exports_dir(run_dir, p) for p in range(1, 6)}
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _export(ed[1], 2, cfg, tok, seed=1)
    (ed[1] / ".step_000020.safetensors.tmp-4242").write_bytes(b"partial")  # not group 0's to clean
    _export(ed[2], 1, cfg, tok)
    (ed[2] / "step_000001.safetensors").write_bytes(pickle.dumps(Payload()))
    ed[3].mkdir(parents=True)
    (ed[3] / "LATEST").write_text("../../group_1/exports/step_000002")
    _export(ed[4], 1, cfg, tok)
    blob = (ed[4] / "step_000001.safetensors").read_bytes()
    (ed[4] / "step_000001.safetensors").write_bytes(blob[: len(blob) // 2])
    _export(ed[5], 1, cfg, tok)
    (ed[5] / "step_000001.json").write_text("{not json")

    steps, cap = 50, 20
    proc = _popen(e2e_args(sample_data, run_dir, group_id=0, num_groups=6, max_steps=steps, burn_in_steps=0,
                           max_teacher_staleness=cap, poll_interval=0.05, log_every=1, save_every=1000,
                           eval_every=1000, teacher_timeout=1,
                           teacher_max_ppl_ratio=0))  # the peers' weights are random: the guard is tested elsewhere
    lines, done = [], set()
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"\[group 0\] step (\d+)/", line)
        n = int(m.group(1)) if m else 0
        if n >= 8 and "join" not in done:
            done.add("join")
            _export(ed[2], 8, cfg, tok, seed=2)            # peer 2 joins late
            (ed[5] / "LATEST").write_text("step_000099")  # peer 5: LATEST names a missing file
        if n >= 16 and "arch" not in done:
            done.add("arch")
            _export(ed[5], 16, preset_config("lstm", "small", 2000, 1024), tok)
        if n >= 36 and "restart" not in done:
            done.add("restart")
            _export(ed[1], 36, cfg, tok, seed=3)           # peer 1 restarts from its checkpoint
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert not marker.exists()
    for needle in ("refusing export step 1: " + str(ed[2] / "step_000001.safetensors"), "not an export name",
                   "checksum does not match", "not valid JSON", "step_000099 in", "model config differs",
                   "peer group 1 has published nothing newer than step 2",
                   "peer group 1's teacher (step 2) is 21 steps old > --max_teacher_staleness 20"):
        assert out.count(needle) == 1, (needle, out[-5000:])
    assert "pickle" in out
    t1, t2 = tb(run_dir, 0, "teacher/step/group_1"), tb(run_dir, 0, "teacher/step/group_2")
    stale1 = tb(run_dir, 0, "teacher/staleness/group_1")
    peers, distill = tb(run_dir, 0, "teacher/num_peers"), tb(run_dir, 0, "train/distill")
    assert set(t1.values()) == {2, 36} and set(t2.values()) == {8}
    assert max(stale1.values()) > cap and stale1[cap + 3] == cap + 1           # keeps growing while dropped
    assert max(peers.values()) == 2 and peers[steps] == 1 and distill[steps] > 0
    gap = [s for s in peers if peers[s] == 0]                                   # both dropped: CE alone
    assert gap and all(distill[s] == 0 for s in gap) and min(gap) >= cap + 3
    assert all(distill[s] > 0 for s in peers if peers[s] > 0)
    assert json.loads((run_dir / "group_0" / "summary.json").read_text())["teacher_steps"] == {"1": 36, "2": 8}


def test_export_write_error_with_stop_exits_4_then_resume_is_exact(main_run, sample_data, tmp_path):
    """--on_write_error stop: a full disk at step 20's export stops the run (exit 4) before its
    checkpoint; LATEST and 'latest' still name step 10's complete files; --resume auto then ends
    exactly where the uninterrupted main_run ended."""
    run_dir = tmp_path / "full"
    args = e2e_args(sample_data, run_dir, save_every=10)
    proc = _popen([*args, "--on_write_error", "stop"], {faults.ENV: "export_oserror@20"})
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 4, out
    assert "export of step 20 failed" in out and "--on_write_error stop" in out
    for g in (0, 1):
        gdir = run_dir / f"group_{g}"
        assert checkpoint.latest_tag(gdir / "checkpoints") == "global_step10"
        assert read_latest(gdir / "exports") == 10 and list_exports(gdir / "exports") == [10]
        assert not [p for p in (gdir / "exports").iterdir() if p.name.startswith(".")]
    # issue 31 item 1: files planted in group 0's own checkpoints/ - a pickle payload in every
    # file of a newer tag, a marker whose digests match them, 'latest' naming it - are refused by
    # the weights-only load on this requeue: the payload never runs, step 10 is resumed
    pwned, ckpt = tmp_path / "pwned", run_dir / "group_0" / "checkpoints"
    planted = ckpt / "global_step20"
    planted.mkdir()
    for f in (ckpt / "global_step10").iterdir():
        if f.name != checkpoint.COMPLETE:
            (planted / f.name).write_bytes(pickle.dumps({"module": _Payload(str(pwned))}))
    (planted / checkpoint.COMPLETE).write_text(json.dumps({"files": checkpoint.manifest(planted)}))
    (ckpt / "latest").write_text("global_step20")
    proc = run_python(["recipes/train_lm.py", *args], timeout=300)
    assert proc.returncode == 0 and "resumed from step 10" in proc.stdout, proc.stdout + proc.stderr
    assert not pwned.exists(), "the planted payload ran"
    assert re.search(r"global_step20 cannot be loaded \(UnpicklingError: Weights only load failed", proc.stdout)
    for g in (0, 1):
        a, b = tb(main_run[0], g, "train/loss"), tb(run_dir, g, "train/loss")
        assert max(abs(a[s] - b[s]) for s in a) < 1e-5


class _Payload:
    """Unpickled, it creates the file ``path`` (what a planted checkpoint would do, harmlessly)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _scalars_per_events_file(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = []
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        out.append({e.step: e.value for e in ea.Scalars(tag)} if tag in ea.Tags()["scalars"] else {})
    return out


def test_kill9_of_one_rank_mid_step_then_resume_continues_exactly(sample_data, tmp_path, monkeypatch):
    """One group of 2 ranks (real ZeRO-2 partitioning): rank 1 is SIGKILLed in the middle of step
    13, the launcher takes the job down; --resume auto continues from the newest complete
    checkpoint (step 10), and steps 11-12, computed by both runs, give the same losses."""
    run_dir = tmp_path / "rank_killed"
    args = e2e_args(sample_data, run_dir, num_groups=1, max_steps=16, save_every=5, eval_every=16)
    monkeypatch.setenv(faults.ENV, "sigkill:1@13")
    proc = launch(args, num_ranks=2, check=False, launcher="deepspeed")  # its sigkill handler ends rank 0
    assert proc.returncode != 0, proc.stdout[-3000:]
    ckpt = run_dir / "group_0" / "checkpoints"
    assert checkpoint.latest_tag(ckpt) == "global_step10" and checkpoint.is_complete(ckpt / "global_step10")
    assert not (run_dir / "summary.json").exists()
    monkeypatch.delenv(faults.ENV)
    out = launch(args, num_ranks=2, launcher="deepspeed").stdout
    assert "resumed from step 10" in out
    first, second = _scalars_per_events_file(run_dir / "group_0" / "tb", "train/loss")
    assert max(first) <= 12 and sorted(second) == list(range(11, 17))
    both = sorted(set(first) & set(second))  # the killed run's last few events may be lost unflushed
    assert both and both[0] == 11 and all(abs(first[s] - second[s]) < 1e-5 for s in both)
    assert json.loads((run_dir / "summary.json").read_text())["groups"]["group_0"]["steps"] == 16


SKIP_CHECK = r'''
import copy, os, sys
import torch, deepspeed
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
from codistill.skip import skip_step
for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", argv[2])):
    os.environ.setdefault(k, v)
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
__import__('codistill.comm').comm.destroy_at_exit()  # gloo's threads end before Python does
world = int(os.environ["WORLD_SIZE"])
cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 8 * world,
       "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}, "steps_per_print": 10**9,
       "zero_optimization": {"stage": int(argv[0])}}
torch.manual_seed(0)
base = torch.nn.Linear(8, 1)
data = [torch.randn(4, 8) for _ in range(6)]

def engine():
    m = copy.deepcopy(base)
    e, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg,
                                 lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    return e

def full_step(e, xs):
    for x in xs:
        e.backward(e(x).pow(2).mean())
        e.step()

ref, skp = engine(), engine()
full_step(ref, data[0:2]); full_step(ref, data[4:6])
full_step(skp, data[0:2])
skp.backward(skp(data[2]).pow(2).mean()); skp.step()  # micro 0 of the bad step reached DeepSpeed's buffers
skp.backward(skp(data[3]).pow(2).mean() * float("nan"))  # micro 1's loss is NaN; its backward runs too
skip_step(skp, 1)                                       # the step's sync said: drop the whole step
full_step(skp, data[4:6])
with deepspeed.zero.GatheredParameters(list(ref.module.parameters())), \
        deepspeed.zero.GatheredParameters(list(skp.module.parameters())):
    same = all(a.numel() and torch.allclose(a, b) for a, b in zip(ref.module.parameters(), skp.module.parameters()))
with open(os.path.join(argv[3], f"result_{os.environ['RANK']}"), "w") as f:
    f.write(f"{same} {skp.global_steps} {skp.micro_steps} {skp.skipped_steps} {ref.global_steps} {ref.micro_steps}")
'''


@pytest.mark.parametrize("stage,ranks", [(0, 1), (2, 2), (3, 2)])
def test_skipping_a_step_after_accumulated_micro_batches_leaves_no_trace(tmp_path, stage, ranks):
    """Gradient accumulation 2, the second micro-batch's loss is non-finite and, as in the
    trainer, its backward pass has run (NaN gradients reached DeepSpeed): after skip_step the
    weights equal those of a run that never saw the bad step (every gradient of the step is
    dropped, also from ZeRO-2/3's partitioned buffers), and DeepSpeed's counters count it."""
    from conftest import free_port, ranks_command
    script = tmp_path / "skip_check.py"
    script.write_text(SKIP_CHECK)
    port = str(free_port())
    cmd = [*ranks_command(ranks), str(script), str(stage), str(ROOT), port, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_runs(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [(tmp_path / f"result_{r}").read_text().split() for r in range(ranks)]
    assert all(r == ["True", "3", "6", "1", "2", "4"] for r in results), results


def test_second_launch_on_the_same_group_refuses_and_writes_nothing(sample_data, tmp_path):
    """Case 11: the same --group_id and run_dir launched twice; the second exits 2 naming the
    first's PID and host, the first is untouched and still stops cleanly (SIGTERM -> 75)."""
    run_dir = tmp_path / "twice"
    args = e2e_args(sample_data, run_dir, group_id=0, max_steps=2000, log_every=1, save_every=1000,
                    eval_every=1000, export_every=1000)
    first = _popen(args)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if "[group 0] step 3/" in line:
            break
    cfg_mtime = (run_dir / "config.json").stat().st_mtime_ns
    second = run_python(["recipes/train_lm.py", *args], timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"already being trained by PID {first.pid} on host" in second.stderr, second.stderr
    assert (run_dir / "config.json").stat().st_mtime_ns == cfg_mtime and first.poll() is None
    first.send_signal(signal.SIGTERM)
    out = "".join(lines) + first.communicate(timeout=120)[0]
    assert first.returncode == 75, out
    ckpt = run_dir / "group_0" / "checkpoints"
    assert checkpoint.is_complete(ckpt / checkpoint.latest_tag(ckpt))


# ---- a bad peer never poisons the others (codistill/teachers/health.py) -------------------------------

@pytest.fixture(scope="module")
def lone_student(sample_data, tmp_path_factory):
    """The reference: group 0 of 2 in its own launch (latest teachers) with its peer absent."""
    run_dir = tmp_path_factory.mktemp("lone") / "run"
    out = launch(_bad_peer_args(sample_data, run_dir)).stdout
    return json.loads((run_dir / "summary.json").read_text())["groups"]["group_0"]["val_ppl"], out


def _bad_peer_args(data, run_dir):
    return e2e_args(data, run_dir, group_id=0, num_groups=2, burn_in_steps=5, max_steps=80, eval_every=40,
                    save_every=1000, poll_interval=0.1)


@pytest.mark.parametrize("kind", ["nan", "garbage"])
def test_a_bad_peer_is_refused_or_dropped_and_the_student_ends_as_if_it_were_absent(
        sample_data, tmp_path, lone_student, kind):
    """A peer whose export passes every file check but holds NaN weights (refused on load), or
    random finite weights of std 3 (its teacher is used, measured, dropped): the student finishes
    (exit 0), says why, and ends within 5% of the run without that peer."""
    from codistill.data import TokenData
    from codistill.faults import write_bad_export
    from model import preset_config
    run_dir = tmp_path / kind
    cfg = preset_config("lstm", "tiny", 2000, max_seq_len=1024)
    write_bad_export(run_dir / "group_1" / "exports", 10, cfg, TokenData(sample_data).tokenizer_sha256, kind)
    proc = launch(_bad_peer_args(sample_data, run_dir))
    out = proc.stdout
    ppl = json.loads((run_dir / "summary.json").read_text())["groups"]["group_0"]["val_ppl"]
    if kind == "nan":
        assert "refusing export step 10" in out and "NaN/Inf" in out, out
        assert not tb(run_dir, 0, "teacher/ce/group_1")  # never swapped in
    else:
        assert "teacher g1@10 dropped" in out and "the student's" in out, out
        dropped = tb(run_dir, 0, "teacher/dropped")
        assert max(dropped.values()) == 1 and dropped[80] == 1 and min(s for s, v in dropped.items() if v) <= 12
        ce, tce = tb(run_dir, 0, "train/ce"), tb(run_dir, 0, "teacher/ce/group_1")
        assert all(tce[s] > ce[s] + math.log(3) for s in tce)  # measured all along, far worse than the student
    assert abs(ppl / lone_student[0] - 1) < 0.05, (ppl, lone_student[0])
    assert "lower --lr" not in out and "steps in a row" not in out


def test_the_main_commands_healthy_teachers_are_never_dropped(main_run):
    run_dir, out = main_run
    assert "dropped" not in out
    for g in (0, 1):
        dropped = tb(run_dir, g, "teacher/dropped")
        assert dropped and max(dropped.values()) == 0
        assert tb(run_dir, g, f"teacher/ce/group_{1 - g}")
