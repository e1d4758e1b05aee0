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
        (t / checkpoint.COMPLETE).write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 1}}))
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
    # checkpoints from before the completion marker: trust 'latest' as before
    legacy = tmp_path / "legacy"
    _tag(legacy, 5, complete=False)
    (legacy / "latest").write_text("global_step5")
    assert checkpoint.candidates(legacy) == ["global_step5"]


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
            if tag == "global_step20":
                raise RuntimeError("PytorchStreamReader failed reading zip archive")
            return os.path.join(d, tag), {"step": int(tag[11:])}

    eng = Engine()
    for s in (10, 20, 30):
        checkpoint.save(eng, ckpt, s, {}, leader=True, keep=5)
    (ckpt / "global_step30" / "model.pt").write_bytes(b"trunc")
    tag, state = checkpoint.load(eng, ckpt, msgs.append)
    assert (tag, state) == ("global_step10", {"step": 10}) and eng.tried == ["global_step20", "global_step10"]
    assert any("global_step30 is damaged (model.pt has 5 bytes" in m for m in msgs)
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

    checkpoint.save(Engine(), ckpt, 10, {}, leader=True, keep=2)
    assert checkpoint.read_latest(ckpt) == "global_step10" and checkpoint.is_complete(ckpt / "global_step10")
    monkeypatch.setenv(faults.ENV, "ckpt_oserror@20")
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(Engine(), ckpt, 20, {}, leader=True, keep=2)
    assert checkpoint.read_latest(ckpt) == "global_step10" and not (ckpt / "global_step20").exists()
    assert isinstance(Engine.checkpoint_engine.save, type(CE().save))  # the hook is undone
