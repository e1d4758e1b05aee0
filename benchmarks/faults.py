#!/usr/bin/env python
"""Fault-injection report: each fault of the reliability issue injected into a real run (tiny
LSTM, real DeepSpeed, CPU), then checked against an uninterrupted reference run.

    python benchmarks/faults.py [--data DIR] [--keep_runs DIR]

Prints a table - case, injected, what happened, survived, steps lost, data lost - and writes
benchmarks/results/faults.json. "steps lost" is training work that had to be redone (or steps
skipped on purpose); "data lost" is what the run directory lost: a checkpoint or export that is
incomplete, unreadable, non-finite or named by latest/LATEST while broken, or per-step losses
after a resume that differ from the uninterrupted run's ("none" when all of that holds).
Faults come from the test-only CODISTILL_FAULT_INJECT hook (codistill/faults.py), real signals,
and files written by hand into a peer's exports directory.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import PY, ROOT, add_run_args, bench_data, runs_root, save_results, scalars, table

from codistill import checkpoint, faults
from codistill.exports import list_exports, read_export, write_export
from codistill.layout import RunLayout, exports_dir

STEPS = 30
BASE = {"--ds_config": "ds_configs/zero2.json", "--max_steps": STEPS, "--export_every": 5, "--burn_in_steps": 5,
        "--eval_every": 15, "--eval_batches": 2, "--save_every": 5, "--seq_len": 32, "--log_every": 1}


def flags(data, run_dir, **kw) -> list[str]:
    a = dict(BASE, **{"--data": data, "--run_dir": run_dir}, **{f"--{k}": v for k, v in kw.items()})
    return [str(x) for kv in a.items() for x in kv]


def env(extra=None) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    e.update(extra or {})
    return e


def start(args, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen([PY, str(ROOT / "recipes" / "train_lm.py"), *args], cwd=ROOT, env=env(extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(args, extra_env=None, until=None, then=None) -> tuple[int, str]:
    """Run the trainer; when a line matches ``until``, call ``then(proc)`` once."""
    proc = start(args, extra_env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if until and then and re.search(until, line):
            then(proc)
            then = None
    proc.wait()
    return proc.returncode, "".join(lines)


def losses(run_dir: Path, group: int) -> dict[int, float]:
    return scalars(RunLayout(run_dir).group(group).tb, "train/loss")


def damage(run_dir: Path, groups, ref: Path | None = None, before: int | None = None) -> str:
    """What the run directory lost, or 'none'."""
    problems = []
    for g in groups:
        paths = RunLayout(run_dir).group(g)
        ckpt = paths.checkpoints
        if ckpt.is_dir():
            latest = checkpoint.latest_tag(ckpt)
            if latest and (not checkpoint.is_complete(ckpt / latest) or checkpoint.damage(ckpt / latest)):
                problems.append(f"group {g}: latest names incomplete or damaged {latest}")
        exp = paths.exports
        if (exp / "LATEST").is_file():
            for step in list_exports(exp):
                try:
                    e = read_export(exp, step)
                    if not all(bool(v.float().isfinite().all()) for v in e.state_dict.values()):
                        problems.append(f"group {g}: export {step} not finite")
                except Exception as err:  # noqa: BLE001 - any failure is damage
                    problems.append(f"group {g}: export {step} unreadable ({err})")
        if ref is not None:
            a, b = losses(ref, g), losses(run_dir, g)
            diff = [s for s in a if (before is None or s < before) and s in b and abs(a[s] - b[s]) > 1e-5]
            if diff:
                problems.append(f"group {g}: losses differ from the uninterrupted run at steps {diff[:3]}...")
    return "; ".join(problems) or "none"


def resumed_from(out: str) -> int | None:
    m = re.search(r"resumed from step (\d+)", out)
    return int(m.group(1)) if m else None


def export(d: Path, step: int, cfg, tok: str, seed: int = 0) -> None:
    import torch

    from model import build_model
    torch.manual_seed(seed)
    write_export(d, step, build_model(cfg).state_dict(), {
        "group": 1, "tokens_seen": 1 << 30, "model_config": cfg.to_dict(), "model_config_hash": cfg.config_hash(),
        "tokenizer_sha256": tok}, keep=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--only", nargs="+", metavar="CASE", choices=sorted(NEW_CASES),
                    help="run only these cases (and the reference run), e.g. to check a new case; the results "
                         "file then holds only them")
    a = ap.parse_args()
    data = Path(a.data) if a.data else bench_data(2000)
    root = runs_root(a, "faults_")
    rows = []

    def record(case, injected, happened, survived, steps_lost, data_lost):
        rows.append({"case": case, "injected": injected, "what happened": happened, "survived": survived,
                     "steps lost": steps_lost, "data lost": data_lost})
        print(f"[{len(rows)}] {case}: survived={survived} steps_lost={steps_lost} data_lost={data_lost}", flush=True)

    t0 = time.time()
    ref = root / "reference"
    code, out = run(flags(data, ref))
    assert code == 0, out[-3000:]
    if a.only:
        for name in a.only:
            NEW_CASES[name](data, root, ref, record)
        finish(rows, data, t0, a, suffix="_only")
        return

    # 1. kill -9 mid-step, then --resume auto
    d = root / "kill9"
    code1, _ = run(flags(data, d), {faults.ENV: "sigkill@13"})
    code2, out = run(flags(data, d))
    r = resumed_from(out)
    record("kill -9 mid-step", "SIGKILL inside step 13 (after forward, before backward)",
           f"exit {code1}; resume: exit {code2}, from step {r}", code1 == -9 and code2 == 0 and r == 10,
           13 - 1 - (r or 0), damage(d, (0, 1), ref))

    # 1b. kill -9 inside a checkpoint save
    d = root / "kill9_save"
    code1, _ = run(flags(data, d), {faults.ENV: "sigkill_in_save@20"})
    code2, out = run(flags(data, d))
    r = resumed_from(out)
    record("kill -9 inside a checkpoint save", "SIGKILL after step 20's files, before the save completed",
           f"exit {code1}; 'latest' stayed on step 15; resume: exit {code2}, from step {r}",
           code1 == -9 and code2 == 0 and r == 15, 20 - (r or 0), damage(d, (0, 1), ref))

    # 2. SIGTERM (preemption)
    d = root / "sigterm"
    code1, out1 = run(flags(data, d), until=r"\[group 1\] step 12/", then=lambda p: p.send_signal(signal.SIGTERM))
    stopped = int(re.findall(r"checkpoint saved at step (\d+)", out1)[-1]) if "checkpoint saved at step" in out1 else None
    code2, out = run(flags(data, d))
    r = resumed_from(out)
    record("SIGTERM (SLURM preemption)", "SIGTERM during step ~12", f"exit {code1} (75 = requeue me) after "
           f"checkpointing step {stopped}; resume: exit {code2}, from step {r}",
           code1 == 75 and code2 == 0 and r is not None and r == stopped, 0, damage(d, (0, 1), ref))

    # 3/9. NaN losses: skipped and counted, then a stop after --max_bad_steps
    d = root / "nan"
    code, out = run(flags(data, d), {faults.ENV: "nan_loss@12,13"})
    skipped = scalars(RunLayout(d).group(0).tb, "train/skipped_steps").get(STEPS)
    record("NaN loss, 2 steps", "loss = NaN at steps 12 and 13", f"exit {code}; {skipped:.0f} steps skipped "
           "(no update), training went on", code == 0 and skipped == 2, "2 (skipped on purpose)",
           damage(d, (0, 1), ref, before=12))
    d = root / "nan_diverged"
    code, out = run(flags(data, d, max_bad_steps=3), {faults.ENV: "nan_loss@17-30"})
    latest = checkpoint.latest_tag(RunLayout(d).group(0).checkpoints)
    record("NaN loss, diverged", "loss = NaN from step 17 on, --max_bad_steps 3",
           f"exit {code} (3 = diverged) at step 19 with a clear error; 'latest' = {latest}",
           code == 3 and latest == "global_step15", "run stopped; resumable from step 15", damage(d, (0, 1), ref, before=17))

    # 8. disk full during an export and a checkpoint
    d = root / "write_error"
    code, out = run(flags(data, d), {faults.ENV: "export_oserror@20;ckpt_oserror@20"})
    record("disk full (export + checkpoint)", "OSError ENOSPC writing step 20's export and checkpoint",
           f"exit {code}; warned, LATEST/latest kept step 15's, training went on (--on_write_error warn)",
           code == 0 and "export of step 20 failed" in out, 0, damage(d, (0, 1)))
    d = root / "write_error_stop"
    code1, _ = run(flags(data, d, on_write_error="stop"), {faults.ENV: "export_oserror@20"})
    code2, out = run(flags(data, d))
    r = resumed_from(out)
    record("disk full, --on_write_error stop", "OSError ENOSPC writing step 20's export",
           f"exit {code1} (4 = write error); resume: exit {code2}, from step {r}", code1 == 4 and code2 == 0 and r == 15,
           20 - (r or 0), damage(d, (0, 1), ref))

    # 3-6. dead, late, corrupt and hostile peers (group 0 alone, latest teachers)
    from codistill.data import TokenData
    from model import preset_config
    cfg, tok = preset_config("lstm", "tiny", TokenData(data).vocab_size, 1024), TokenData(data).tokenizer_sha256
    d = root / "peers"
    ed = {p: exports_dir(d, p) for p in (1, 2, 3, 4)}  # group 5 never exports at all
    marker = root / "PAYLOAD_RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    export(ed[1], 2, cfg, tok)                                   # 1: exports once, then dead
    export(ed[2], 1, cfg, tok)
    (ed[2] / "step_000001.safetensors").write_bytes(pickle.dumps(Payload()))  # 2: hostile pickle ...
    ed[3].mkdir(parents=True)
    (ed[3] / "LATEST").write_text("../../group_1/exports/step_000002")        # 3: path escape
    export(ed[4], 1, cfg, tok)                                   # 4: truncated
    blob = (ed[4] / "step_000001.safetensors").read_bytes()
    (ed[4] / "step_000001.safetensors").write_bytes(blob[: len(blob) // 2])
    code, out = run(flags(data, d, num_groups=6, group_id=0, burn_in_steps=0, max_teacher_staleness=25,
                          poll_interval=0.05, save_every=1000), until=r"\[group 0\] step 8/",
                    then=lambda p: export(ed[2], 8, cfg, tok, seed=2))  # ... then joins late, valid
    peers = scalars(RunLayout(d).group(0).tb, "teacher/num_peers")
    refused = sum(s in out for s in ("pickle", "not an export name", "checksum does not match"))
    record("dead, late, corrupt and hostile peers", "peer 1 dead after step 2; peer 2 a pickle payload named "
           ".safetensors then joins at step 8; peer 3 LATEST = ../../; peer 4 truncated; peer 5 silent; --max_teacher_staleness 25",
           f"exit {code}; {refused} bad files refused with a warning; payload ran: {marker.exists()}; "
           f"teachers in use at the end: {peers.get(STEPS, float('nan')):.0f} (dead peer dropped past the cap)",
           code == 0 and not marker.exists() and refused == 3 and peers.get(STEPS) == 1, 0, damage(d, (0,)))

    # 7-8. a peer gone wrong: its export passes every file check but holds NaN weights, or finite
    # garbage (random, std 3); group 0 alone, latest teachers, against the same run without that peer
    lone_args = dict(num_groups=2, group_id=0, burn_in_steps=5, poll_interval=0.05, save_every=1000,
                     max_steps=80, eval_every=40)

    def val_ppl(run_dir):
        return json.loads((RunLayout(run_dir).summary).read_text())["groups"]["group_0"]["val_ppl"]

    run(flags(data, root / "lone", **lone_args))
    lone = val_ppl(root / "lone")
    for kind, what, sign in (("nan", "NaN weights (valid metadata and checksum)", "refusing export step 10"),
                             ("garbage", "random finite weights, std 3", "teacher g1@10 dropped")):
        d = root / f"bad_peer_{kind}"
        faults.write_bad_export(exports_dir(d, 1), 10, cfg, tok, kind)
        code, out = run(flags(data, d, **lone_args))
        ratio = val_ppl(d) / lone if code == 0 else float("nan")
        record(f"peer exports {what}", f"peer 1's only export (step 10) holds {what}",
               f"exit {code}; {'refused on load' if kind == 'nan' else 'teacher used, measured, dropped'} "
               f"({'reported' if sign in out else 'NOT reported'}); val ppl {val_ppl(d) if code == 0 else 0:.1f} vs "
               f"{lone:.1f} without that peer ({ratio - 1:+.1%})",
               code == 0 and sign in out and abs(ratio - 1) < 0.05, 0, damage(d, (0,)))

    # 11. the same group launched twice
    d = root / "twice"
    args = flags(data, d, group_id=0, max_steps=3000, save_every=1000, eval_every=1000, export_every=1000)
    first = start(args)
    for line in first.stdout:
        if "[group 0] step 3/" in line:
            break
    second = subprocess.run([PY, str(ROOT / "recipes" / "train_lm.py"), *args], cwd=ROOT, env=env(),
                            capture_output=True, text=True)
    first.send_signal(signal.SIGTERM)
    first.communicate()
    record("same group launched twice", "a second launch with the same --group_id and --run_dir",
           f"second: exit {second.returncode}, 'already being trained by PID ...'; first: exit {first.returncode}",
           second.returncode == 2 and "already being trained" in second.stderr and first.returncode == 75, 0,
           damage(d, (0,)))

    for case in NEW_CASES.values():
        case(data, root, ref, record)
    finish(rows, data, t0, a)


def finish(rows, data, t0, a, suffix="") -> None:
    cols = ["case", "injected", "what happened", "survived", "steps lost", "data lost"]
    print(table([[r[c] if c != "survived" else ("yes" if r[c] else "NO") for c in cols] for r in rows], cols))
    out_path = save_results("faults" + suffix, {"data": str(data), "steps": STEPS, "flags": BASE, "cases": rows,
                                       "wall_s": round(time.time() - t0, 1)}, a.results_dir)
    print(f"wrote {out_path}")
    if not all(r["survived"] for r in rows):
        sys.exit(1)


def planted_checkpoint(data, root, ref, record) -> None:
    """Issue 31 item 1: a pickle payload planted in a group's own checkpoints/ (a newer tag, a marker
    whose digests match it, 'latest' naming it) is refused on the requeue, never unpickled."""
    d = root / "planted_ckpt"
    code1, _ = run(flags(data, d), {faults.ENV: "sigkill@13"})
    ckpt, ran = RunLayout(d).group(0).checkpoints, root / "CKPT_PAYLOAD_RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    planted = ckpt / "global_step15"
    planted.mkdir()
    for f in (ckpt / "global_step10").iterdir():
        if f.name != checkpoint.COMPLETE:
            (planted / f.name).write_bytes(pickle.dumps({"module": Payload()}))
    (planted / checkpoint.COMPLETE).write_text(json.dumps({"files": checkpoint.manifest(planted)}))
    (ckpt / "latest").write_text("global_step15")
    code2, out = run(flags(data, d))
    r, refused = resumed_from(out), "global_step15 cannot be loaded (UnpicklingError: Weights only" in out
    record("pickle planted in checkpoints/", "group 0: a tag global_step15 of pickle payloads, a marker with their "
           "digests, 'latest' on it; then a requeue", f"exit {code2}; refused by the weights-only load "
           f"({'reported' if refused else 'NOT reported'}); payload ran: {ran.exists()}; resumed from step {r}",
           code1 == -9 and code2 == 0 and refused and not ran.exists() and r == 10, 13 - 1 - (r or 0),
           damage(d, (0, 1), ref))


def read_only_checkpoints(data, root, ref, record) -> None:
    """Issue 31 item 3: group 0's checkpoints/ on a real tmpfs remounted read-only mid-run: torch.save's
    and DeepSpeed's RuntimeErrors are write failures, so --on_write_error warn goes on."""
    d = root / "read_only"
    mnt = RunLayout(d).group(0).checkpoints
    mnt.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        record("checkpoints/ becomes read-only", "skipped: mounting a tmpfs needs root", "not run", True, 0, "not run")
        return
    try:
        code, out = run(flags(data, d), until=r"\[group 1\] step 12/",
                        then=lambda p: subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True))
        latest, warned = checkpoint.latest_tag(mnt), len(re.findall(r"checkpoint of step \d+ failed", out))
        lost = damage(d, (0, 1), ref)  # before the tmpfs (group 0's checkpoints) goes
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    record("checkpoints/ becomes read-only", "group 0's checkpoints/ (a tmpfs) remounted read-only during step ~12",
           f"exit {code}; {warned} checkpoint failures warned, 'latest' kept {latest}, training went on "
           "(--on_write_error warn)", code == 0 and latest == "global_step10" and warned >= 3, 0, lost)


def stuck_peer(data, root, ref, record) -> None:
    """A peer whose LATEST is a FIFO (a read that never returns) beside a healthy peer: group 0 alone
    trains at its usual pace with the healthy teacher and exits cleanly (docs/fault_tolerance.md,
    "Stuck peers"; the read is abandoned after teacher.READ_TIMEOUT_S, longer than this run)."""
    from codistill.data import TokenData
    from model import preset_config
    cfg, tok = preset_config("lstm", "tiny", TokenData(data).vocab_size, 1024), TokenData(data).tokenizer_sha256
    d = root / "stuck_peer"
    exports_dir(d, 1).mkdir(parents=True)
    os.mkfifo(exports_dir(d, 1) / "LATEST")
    export(exports_dir(d, 2), 1, cfg, tok)
    t = time.time()
    code, out = run(flags(data, d, num_groups=3, group_id=0, burn_in_steps=0, poll_interval=0.05, save_every=1000))
    wall = time.time() - t
    peers = scalars(RunLayout(d).group(0).tb, "teacher/num_peers")
    record("stuck peer (FIFO as LATEST)", "peer 1's LATEST is a FIFO nobody writes; peer 2 healthy",
           f"exit {code} in {wall:.0f} s; teachers in use at the end: {peers.get(STEPS, float('nan')):.0f} "
           "(the healthy peer); the loop never waited on the stuck read",
           code == 0 and peers.get(STEPS) == 1, 0, damage(d, (0,)))


# cases added for issue 31 (also run by --only)
NEW_CASES = {"planted_checkpoint": planted_checkpoint, "read_only_checkpoints": read_only_checkpoints,
             "stuck_peer": stuck_peer}


if __name__ == "__main__":
    main()
