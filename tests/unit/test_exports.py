"""The exchange: atomic exports, LATEST, pruning, refusing hostile or broken files, the loader."""
import json
import os
import pickle
import threading
import time

import pytest
import torch
from conftest import write_test_export

from codistill import faults
from codistill.exports import clean_temp_files, list_exports, read_export, read_latest, write_export
from codistill.layout import exports_dir
from codistill.teachers.loader import TeacherLoader
from fileio import ExportError
from model import build_model, preset_config

CFG = preset_config("lstm", "tiny", vocab_size=64)
TOK = "tok-sha"


def _meta(group=1):
    return {"group": group, "tokens_seen": 1 << 30, "model_config": CFG.to_dict(),
            "model_config_hash": CFG.config_hash(), "tokenizer_sha256": TOK}


def _export(run_dir, group, step, keep=3, seed=0):
    torch.manual_seed(seed)
    sd = build_model(CFG).state_dict()
    write_export(exports_dir(run_dir, group), step, sd, _meta(group), keep=keep)
    return sd


def test_roundtrip_latest_and_metadata(tmp_path):
    sd = _export(tmp_path, 1, 20)
    d = exports_dir(tmp_path, 1)
    assert read_latest(d) == 20
    exp = read_export(d, 20, CFG.config_hash(), TOK)
    assert exp.meta["group"] == 1 and exp.meta["step"] == 20
    assert all(torch.equal(exp.state_dict[k], v) for k, v in sd.items())
    assert not [p for p in d.iterdir() if ".tmp" in p.name]


def test_old_exports_are_pruned(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _export(tmp_path, 0, step, keep=2)
    assert list_exports(exports_dir(tmp_path, 0)) == [40, 50]
    assert sorted(p.name for p in exports_dir(tmp_path, 0).iterdir()) == [
        "LATEST", "step_000040.json", "step_000040.safetensors", "step_000050.json", "step_000050.safetensors"]


def test_reader_polling_during_writes_never_sees_a_partial_export(tmp_path):
    """A reader following LATEST while exports are written sees a complete, valid file or none."""
    d = exports_dir(tmp_path, 1)
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            step = read_latest(d, missing_ok=True)
            if step is None:
                continue
            try:
                exp = read_export(d, step, CFG.config_hash(), TOK)
                seen.add(exp.step)
            except ExportError as e:
                if "is missing" not in str(e):  # pruned between LATEST and the read: fine
                    errors.append(str(e))

    t = threading.Thread(target=reader)
    t.start()
    for step in range(1, 25):
        _export(tmp_path, 1, step, keep=2, seed=step)
    stop.set()
    t.join()
    assert not errors, errors[:3]
    assert len(seen) >= 2


def test_a_safetensors_header_whose_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A header of 0x380 bytes (or any length = 0x80 mod 256) makes the file's first byte 0x80,
    a pickle's first byte: the safetensors reading must be tried first (a real export of the
    2 x 200 LSTM was refused that way)."""
    from codistill.exports import write_export
    sd = build_model(CFG).state_dict()
    for k in range(300):
        path = write_export(tmp_path / f"e{k}", 10, {**sd, "pad" + "x" * k: torch.zeros(1)}, _meta(1))
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no header length = 0x80 mod 256 found")
    exp = read_export(path.parent, 10)
    assert torch.equal(exp.state_dict["embed.weight"], sd["embed.weight"])


def test_pickle_named_safetensors_is_refused_and_not_executed(tmp_path):
    _export(tmp_path, 1, 10)
    d = exports_dir(tmp_path, 1)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "step_000010.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ExportError, match="pickle"):
        read_export(d, 10, CFG.config_hash(), TOK)
    torch.save({"x": Payload()}, d / "step_000010.safetensors")  # a zip-format torch.save file
    with pytest.raises(ExportError, match="pickle"):
        read_export(d, 10, CFG.config_hash(), TOK)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["../../etc/passwd", "/tmp/step_000010", "step_10", "", "step_000010/../x"])
def test_latest_that_escapes_or_is_malformed_is_refused(tmp_path, content):
    _export(tmp_path, 1, 10)
    (exports_dir(tmp_path, 1) / "LATEST").write_text(content)
    with pytest.raises(ExportError, match="not an export name"):
        read_latest(exports_dir(tmp_path, 1))


def test_corrupt_exports_are_refused(tmp_path):
    _export(tmp_path, 1, 10)
    d = exports_dir(tmp_path, 1)
    blob = (d / "step_000010.safetensors").read_bytes()
    (d / "step_000010.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ExportError, match="size or checksum does not match"):
        read_export(d, 10)
    _export(tmp_path, 1, 20)
    (d / "step_000020.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        read_export(d, 20)
    with pytest.raises(ExportError, match="missing"):
        read_export(d, 30)


def test_mismatched_architecture_or_tokenizer_is_refused_naming_both(tmp_path):
    _export(tmp_path, 1, 10)
    other = preset_config("lstm", "small", vocab_size=64)
    with pytest.raises(ExportError, match=r"model config differs.*student " + other.config_hash()):
        read_export(exports_dir(tmp_path, 1), 10, other.config_hash(), TOK)
    with pytest.raises(ExportError, match="another tokenizer"):
        read_export(exports_dir(tmp_path, 1), 10, CFG.config_hash(), "other-tokenizer")


def test_nan_weights_are_never_exported(tmp_path):
    sd = build_model(CFG).state_dict()
    sd["head.weight"][0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN"):
        write_export(exports_dir(tmp_path, 0), 5, sd, _meta(0))
    assert read_latest(exports_dir(tmp_path, 0), missing_ok=True) is None


def _loader(tmp_path, mode, peers=(1,), log=None):
    return TeacherLoader(tmp_path, list(peers), CFG.config_hash(), TOK, mode=mode, poll_interval=0.05,
                         log=log or (lambda m: None))


def test_loader_latest_mode_follows_newest_and_survives_missing_and_bad_peers(tmp_path):
    msgs = []
    loader = _loader(tmp_path, "latest", peers=(1, 2), log=msgs.append)
    try:
        time.sleep(0.2)
        assert loader.take(1) is None and loader.take(2) is None  # no peer exported yet: CE alone
        _export(tmp_path, 1, 10)
        deadline = time.time() + 10
        exp = None
        while exp is None and time.time() < deadline:
            exp = loader.take(1)
            time.sleep(0.02)
        assert exp is not None and exp.step == 10
        # peer 2 publishes a hostile file: refused with one warning, loader keeps running (prepared aside
        # and moved into place at once, so the loader never sees the valid export it was made from)
        d2, scratch = exports_dir(tmp_path, 2), exports_dir(tmp_path / "scratch", 2)
        _export(tmp_path / "scratch", 2, 5)
        (scratch / "step_000005.safetensors").write_bytes(pickle.dumps({"a": 1}))
        d2.parent.mkdir(parents=True, exist_ok=True)
        scratch.rename(d2)
        _export(tmp_path, 1, 20)
        deadline = time.time() + 10
        while not any("group 2" in m for m in msgs) and time.time() < deadline:
            time.sleep(0.02)
        assert any("refusing export step 5" in m and "pickle" in m for m in msgs), msgs
        exp = None
        while exp is None and time.time() < deadline:
            exp = loader.take(1)
            time.sleep(0.02)
        assert exp is not None and exp.step == 20
        assert loader.take(2) is None
    finally:
        loader.close()


def test_loader_sync_mode_waits_for_the_wanted_step_and_times_out(tmp_path):
    msgs = []
    loader = _loader(tmp_path, "sync", log=msgs.append)
    try:
        _export(tmp_path, 1, 10)
        _export(tmp_path, 1, 20)
        loader.want(1, 10)
        exp = loader.wait(1, 10, timeout=10)
        assert exp is not None and exp.step == 10  # the wanted step, not LATEST (20)
        loader.want(1, 30)
        t0 = time.time()
        assert loader.wait(1, 30, timeout=0.3) is None  # never exported: no block beyond the timeout
        assert time.time() - t0 < 5
        assert any("did not arrive" in m for m in msgs)
    finally:
        loader.close()


def test_fixed_teacher_paths_resolve_to_validated_weights(tmp_path):
    """--teacher PATH: a group directory (final/ first, else its newest export), an exports/ or
    final/ directory, or one export file; anything else is refused with the fix named."""
    import hashlib

    from safetensors.torch import save

    from codistill.teachers.loader import read_fixed_teacher
    _export(tmp_path, 0, 10, seed=1)
    sd20 = _export(tmp_path, 0, 20, seed=2)
    gdir = tmp_path / "group_0"
    h, tok = CFG.config_hash(), TOK
    assert read_fixed_teacher(gdir, h, tok).step == 20                      # no final/: newest export
    assert read_fixed_teacher(gdir / "exports", h, tok).step == 20
    for f in ("step_000010.safetensors", "step_000010.json"):
        assert read_fixed_teacher(gdir / "exports" / f, h, tok).step == 10
    # a finished run's final/ (what save_final writes) wins over the exports
    torch.manual_seed(3)
    final_sd = build_model(CFG).state_dict()
    blob = save(final_sd)
    (gdir / "final").mkdir()
    (gdir / "final" / "model.safetensors").write_bytes(blob)
    (gdir / "final" / "meta.json").write_text(json.dumps(
        dict(_meta(0), step=40, weights_sha256=hashlib.sha256(blob).hexdigest())))
    for p in (gdir, gdir / "final"):
        exp = read_fixed_teacher(p, h, tok)
        assert exp.step == 40 and all(torch.equal(exp.state_dict[k], v) for k, v in final_sd.items())
    assert not all(torch.equal(sd20[k], v) for k, v in final_sd.items())
    with pytest.raises(ExportError, match="another tokenizer"):
        read_fixed_teacher(gdir, h, "other-tokenizer")
    with pytest.raises(ExportError, match="model config differs"):
        read_fixed_teacher(gdir, preset_config("lstm", "small", vocab_size=64).config_hash(), tok)
    with pytest.raises(ExportError, match=r"name one group, e.g. --teacher .*group_0"):
        read_fixed_teacher(tmp_path, h, tok)
    with pytest.raises(ExportError, match="must be an export"):
        read_fixed_teacher(gdir / "final" / "meta.json", h, tok)
    with pytest.raises(ExportError, match="no such file"):
        read_fixed_teacher(tmp_path / "nope", h, tok)
    # a pickle where the final weights should be: refused, never unpickled
    (gdir / "final" / "model.safetensors").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ExportError, match="pickle"):
        read_fixed_teacher(gdir, h, tok)


def test_export_write_error_keeps_the_previous_export_valid_and_named_by_latest(tmp_path, monkeypatch):
    d = tmp_path / "exports"
    write_test_export(d, 10)
    monkeypatch.setenv(faults.ENV, "export_oserror@20")  # fails after the weights file, before metadata/LATEST
    with pytest.raises(OSError, match="No space left"):
        write_test_export(d, 20, seed=1)
    assert read_latest(d) == 10 and list_exports(d) == [10]
    assert sorted(p.name for p in d.iterdir()) == ["LATEST", "step_000010.json", "step_000010.safetensors"]
    read_export(d, 10, CFG.config_hash(), TOK)
    monkeypatch.setenv(faults.ENV, "")
    write_test_export(d, 20, seed=1)  # the next write works again
    assert read_latest(d) == 20


def test_export_temp_files_of_a_killed_writer_are_ignored_then_cleaned(tmp_path):
    d = tmp_path / "exports"
    write_test_export(d, 10)
    leftovers = [d / ".step_000020.safetensors.tmp-999999", d / ".LATEST.tmp-999999", d / "step_000030.safetensors"]
    leftovers[0].write_bytes(b"half a safetensors file")
    leftovers[1].write_text("step_000020")
    leftovers[2].write_bytes((d / "step_000010.safetensors").read_bytes())  # killed before its metadata
    assert list_exports(d) == [10] and read_latest(d) == 10  # readers never look at temp files
    assert sorted(clean_temp_files(d)) == sorted(p.name for p in leftovers)
    assert not any(p.exists() for p in leftovers) and read_latest(d) == 10
