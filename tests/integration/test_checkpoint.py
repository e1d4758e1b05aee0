"""codistill/checkpoint.py: crash-safe tags, 'latest', resume candidates, pruning, write errors."""
import json
import os
from pathlib import Path

import pytest

from codistill import checkpoint, faults


def _tag(ckpt, step, complete=True):
    t = ckpt / f"global_step{step}"
    t.mkdir(parents=True)
    (t / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (t / checkpoint.COMPLETE).write_text(json.dumps({"files": checkpoint.manifest(t)}))
    return t


def test_resume_candidates_skip_an_incomplete_or_bogus_latest(tmp_path):
    ckpt, msgs = tmp_path / "checkpoints", []
    _tag(ckpt, 10)
    _tag(ckpt, 20, complete=False)  # a save killed before it finished
    (ckpt / "latest").write_text("global_step10")
    assert checkpoint.candidates(ckpt, msgs.append) == ["global_step10"] and not msgs
    (ckpt / "latest").write_text("global_step20")  # as DeepSpeed's own writer could leave it
    assert checkpoint.candidates(ckpt, msgs.append) == ["global_step10"]
    assert "incomplete" in msgs[-1] and "resuming from global_step10" in msgs[-1]
    for bogus, why in (("../../etc", "not a checkpoint tag"), ("", "not a checkpoint tag"),
                       ("global_step30", "does not exist")):
        (ckpt / "latest").write_text(bogus)
        assert checkpoint.candidates(ckpt, msgs.append) == ["global_step10"] and why in msgs[-1]
    _tag(ckpt, 30)  # complete, killed before 'latest' moved to it
    (ckpt / "latest").write_text("global_step10")
    assert checkpoint.candidates(ckpt, msgs.append) == ["global_step30", "global_step10"]
    # a tag without a marker is never loaded, even when 'latest' names it and no other tag exists
    # (an older version's checkpoint, or files planted in checkpoints/); nor one with a marker
    # from before digests (sizes only)
    legacy, msgs = tmp_path / "legacy", []
    _tag(legacy, 5, complete=False)
    (legacy / "latest").write_text("global_step5")
    assert checkpoint.candidates(legacy, msgs.append) == [] and "never loaded" in msgs[-1]
    t = _tag(legacy, 6, complete=False)
    (t / checkpoint.COMPLETE).write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 1}}))
    assert checkpoint.candidates(legacy, msgs.append) == [] and "lists no digests" in msgs[-2]


def test_a_file_planted_in_a_complete_tag_or_a_same_size_rewrite_is_refused(tmp_path):
    """The marker lists the exact set of files: an extra one (a planted pickle beside the real
    files) refuses the tag by name before anything is read; a file rewritten with the same size
    is refused by its digest before DeepSpeed's loader is called."""
    ckpt, msgs, tried = tmp_path / "checkpoints", [], []

    class Engine:
        checkpoint_engine = type("CE", (), {"load": lambda self, path, map_location=None: None})()

        def load_checkpoint(self, d, tag):
            tried.append(tag)
            return os.path.join(d, tag), {"step": int(tag[11:])}

    _tag(ckpt, 10)
    _tag(ckpt, 20)
    t30 = _tag(ckpt, 30)
    (ckpt / "latest").write_text("global_step30")
    (t30 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x80planted")
    (ckpt / "global_step20" / "mp_rank_00_model_states.pt").write_bytes(b"y")  # same size, other bytes
    assert checkpoint.load(Engine(), ckpt, msgs.append) == ("global_step10", {"step": 10}) and tried == ["global_step10"]
    assert any("global_step30 is refused (zero_pp_rank_0_mp_rank_00_optim_states.pt was not written by this run"
               in m for m in msgs), msgs
    assert any("global_step20 is refused (mp_rank_00_model_states.pt does not match the digest" in m for m in msgs)
    assert Engine.checkpoint_engine.load(None) is None  # the weights-only loader is undone


def test_resume_skips_a_truncated_or_unloadable_checkpoint(tmp_path):
    """A marked tag whose file was truncated later is skipped by size; one that DeepSpeed's
    loader rejects is skipped after the attempt; the next older complete tag is loaded."""
    ckpt, msgs = tmp_path / "checkpoints", []

    class CE:
        def save(self, sd, path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(b"weights of " + Path(path).parent.name.encode())

    class Engine:
        checkpoint_engine = CE()
        tried = []

        def save_checkpoint(self, d, tag, client_state, save_latest):
            self.checkpoint_engine.save({}, os.path.join(d, tag, "model.pt"))

        def load_checkpoint(self, d, tag):
            self.tried.append(tag)
            assert "load" in self.checkpoint_engine.__dict__  # DeepSpeed's loads are weights-only here
            if tag == "global_step20":
                raise RuntimeError("PytorchStreamReader failed reading zip archive")
            return os.path.join(d, tag), {"step": int(tag[11:])}

    eng = Engine()
    for s in (10, 20, 30):
        checkpoint.save(eng, ckpt, s, {}, leader=True, keep=5)
    (ckpt / "global_step30" / "model.pt").write_bytes(b"trunc")
    tag, state = checkpoint.load(eng, ckpt, msgs.append)
    assert (tag, state) == ("global_step10", {"step": 10}) and eng.tried == ["global_step20", "global_step10"]
    assert any("global_step30 is refused (model.pt has 5 bytes" in m for m in msgs)
    assert any("global_step20 cannot be loaded (RuntimeError" in m for m in msgs)


def test_prune_drops_partial_tags_and_never_the_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for s in (10, 20, 30):
        _tag(ckpt, s)
    _tag(ckpt, 40, complete=False)
    (ckpt / "latest").write_text("global_step30")
    checkpoint.prune(ckpt, keep=2)
    assert [p.name for _, p in checkpoint.list_tags(ckpt)] == ["global_step20", "global_step30"]


def test_write_error_during_checkpoint_save_keeps_latest(tmp_path, monkeypatch):
    """checkpoint.save with a fake engine whose writer fails: partial tag removed, latest unchanged."""
    ckpt = tmp_path / "checkpoints"

    class CE:
        def save(self, sd, path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(b"data")

    class Engine:
        checkpoint_engine = CE()

        def save_checkpoint(self, d, tag, client_state, save_latest):
            assert save_latest is False  # 'latest' is ours to move
            self.checkpoint_engine.save({}, os.path.join(d, tag, "model.pt"))

    (ckpt / "global_step10").mkdir(parents=True)  # planted before the save, 'latest' naming it
    (ckpt / "global_step10" / "planted.pt").write_bytes(b"\x80")
    (ckpt / "latest").write_text("global_step10")
    checkpoint.save(Engine(), ckpt, 10, {}, leader=True, keep=2)
    assert checkpoint.latest_tag(ckpt) == "global_step10" and checkpoint.is_complete(ckpt / "global_step10")
    assert checkpoint.tag_files(ckpt / "global_step10") == ["model.pt"]  # the marker blesses only what it wrote
    monkeypatch.setenv(faults.ENV, "ckpt_oserror@20")
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left"):
        checkpoint.save(Engine(), ckpt, 20, {}, leader=True, keep=2)
    assert checkpoint.latest_tag(ckpt) == "global_step10" and not (ckpt / "global_step20").exists()
    assert "save" not in vars(Engine.checkpoint_engine)  # the hook is undone
    monkeypatch.delenv(faults.ENV)
    # another rank of the group failed (any_rank says so): no marker, 'latest' stays, tag removed
    with pytest.raises(checkpoint.CheckpointWriteError, match="another rank"):
        checkpoint.save(Engine(), ckpt, 30, {}, leader=True, keep=2, any_rank=lambda failed: True)
    assert checkpoint.latest_tag(ckpt) == "global_step10" and not (ckpt / "global_step30").exists()


def test_write_failures_are_classified_whatever_their_type():
    """torch.save reports ENOSPC as RuntimeError, and a tag directory DeepSpeed could not create
    as RuntimeError too; both are write failures. Other RuntimeErrors are not."""
    import torch
    assert checkpoint.is_write_failure(OSError(28, "No space left on device"))
    assert checkpoint.is_write_failure(RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"))
    with pytest.raises(RuntimeError) as e:
        torch.save({"x": 1}, "/nonexistent-dir-for-codistill-test/x.pt")
    assert checkpoint.is_write_failure(e.value), str(e.value)
    assert not checkpoint.is_write_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not checkpoint.is_write_failure(ValueError("No space left"))


REAL_ENGINE = r'''
import os, subprocess, sys
from pathlib import Path
import torch, deepspeed
case, ckpt, port = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port)):
    os.environ.setdefault(k, v)
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
__import__('codistill.comm').comm.destroy_at_exit()  # gloo's threads end before Python does
from codistill import checkpoint
stage = 2 if case == "planted" else 0
cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "steps_per_print": 10**9,
       "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}, "zero_optimization": {"stage": stage}}
torch.manual_seed(0)
m = torch.nn.Linear(128, 128)
e, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
e.backward(e(torch.randn(2, 128)).pow(2).mean()); e.step()
checkpoint.save(e, ckpt, 10, {"step": 10, "rng": torch.get_rng_state()}, leader=True, keep=3)
want = {k: v.clone() for k, v in e.module.state_dict().items()}
msgs = []
def loads_step_10():
    with torch.no_grad():
        for p in e.module.parameters():
            p.add_(1.0)
    tag, state = checkpoint.load(e, ckpt, msgs.append)
    assert tag == "global_step10" and state["step"] == 10, (tag, msgs)
    assert all(torch.equal(v, e.module.state_dict()[k]) for k, v in want.items())

if case == "planted":  # a pickle payload, a forged marker whose digests match it, and 'latest'
    pwned = ckpt.parent / "pwned"
    class Payload:
        def __reduce__(self):
            return (open, (str(pwned), "w"))
    bad = ckpt / "global_step20"
    bad.mkdir()
    for f in (ckpt / "global_step10").iterdir():
        if f.name != checkpoint.COMPLETE:
            torch.save({"module": Payload()}, bad / f.name)
    (bad / checkpoint.COMPLETE).write_text(__import__("json").dumps({"files": checkpoint.manifest(bad)}))
    (ckpt / "latest").write_text("global_step20")
    loads_step_10()
    assert not pwned.exists(), "the payload ran"
    refused = [m for m in msgs if "global_step20 cannot be loaded" in m]
    assert refused and "Weights only load failed" in refused[0], msgs
else:  # a full disk, then a read-only one
    filler = ckpt.parent / "filler"
    free = os.statvfs(ckpt).f_bavail * os.statvfs(ckpt).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * (free - 64 * 1024))
    try:
        checkpoint.save(e, ckpt, 20, {"step": 20}, leader=True, keep=3)
        raise AssertionError("the save on a full disk did not fail")
    except checkpoint.CheckpointWriteError as err:
        print("full:", err)
    assert checkpoint.latest_tag(ckpt) == "global_step10" and not (ckpt / "global_step20").exists()
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(ckpt.parent)], check=True)
    try:
        checkpoint.save(e, ckpt, 30, {"step": 30}, leader=True, keep=3)
        raise AssertionError("the save on a read-only disk did not fail")
    except checkpoint.CheckpointWriteError as err:
        print("read-only:", err)
    assert checkpoint.latest_tag(ckpt) == "global_step10"
    loads_step_10()
print("OK")
'''


def _run_real_engine(tmp_path, case, ckpt):
    from conftest import free_port, run_python
    script = tmp_path / "real_engine.py"
    script.write_text(REAL_ENGINE)
    proc = run_python([script, case, ckpt, free_port()], timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only), unmounted afterwards."""
    import subprocess
    d = tmp_path / "tmpfs"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_planted_pickle_is_never_unpickled_even_with_a_forged_marker(tmp_path):
    """A real DeepSpeed engine (ZeRO-2: its loss scaler and stage enum are the allowed classes):
    a tag planted with a pickle payload, a marker whose digests match it and 'latest' naming it
    is refused by the weights-only load - the payload never runs - and the previous good tag is
    loaded, weights equal."""
    _run_real_engine(tmp_path, "planted", tmp_path / "checkpoints")


def test_checkpoint_on_a_full_then_read_only_disk_warns_and_keeps_latest(tmp_path, tmpfs):
    """A real tmpfs: torch.save's RuntimeError on ENOSPC and DeepSpeed's on a tag directory it
    cannot create both become CheckpointWriteError; no partial tag is left on the full disk,
    'latest' keeps naming the previous tag, which still loads."""
    out = _run_real_engine(tmp_path, "disk", tmpfs / "checkpoints")
    assert "full: checkpoint" in out and "read-only: checkpoint" in out, out


def test_resume_with_data_of_another_tokenizer_is_refused_before_anything_is_rewritten(sample_data, tmp_path):
    """The model config hash leaves the tokenizer out (same vocabulary size, same hash): the
    tokenizer hash config.json records must match --data's, checked in load_inputs, before
    config.json (written after the resume checks) or anything else is written."""
    from conftest import e2e_args, load_script
    tl = load_script("train_lm")
    log = type("Log", (), {"__call__": lambda self, m, force=False: None, "error": print, "warning": print})()
    p = tl.plan_run(tl.parse_args([*e2e_args(sample_data, tmp_path / "run"), "--resume", "auto"]), log)
    data, model_cfg, _ = tl.load_inputs(p, log)  # no config.json yet: a fresh run
    p.run.root.mkdir(parents=True)
    recorded = json.dumps({"model": model_cfg.to_dict(), "tokenizer_sha256": "0" * 64})
    p.run.config.write_text(recorded)
    with pytest.raises(ValueError, match="tokenized by another tokenizer .* even if the vocabulary size matches"):
        tl.load_inputs(p, log)
    assert p.run.config.read_text() == recorded and sorted(os.listdir(p.run.root)) == ["config.json"]
    p.run.config.write_text(json.dumps({"model": model_cfg.to_dict(), "tokenizer_sha256": data.tokenizer_sha256}))
    assert tl.load_inputs(p, log)[1].config_hash() == model_cfg.config_hash()
