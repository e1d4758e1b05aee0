"""The exchange's protocol pieces without a training run: the sync schedule, the background
export writer, and the zero-copy safetensors reader."""
from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
import zlib

import pytest
import torch
import xxhash
from safetensors.torch import load, save, save_file

from codistill import faults
from codistill.exchange import ExportWriter, resume_prefetch, sync_schedule
from codistill.exports import (
    DIGESTS,
    ReadBuffers,
    parse_safetensors,
    read_export,
    read_latest,
    read_safetensors,
    write_export,
)
from fileio import ExportError


def test_sync_schedule_swaps_at_boundaries_and_prefetches_half_an_interval_before():
    K = 10
    sched = {s: sync_schedule(s, K) for s in range(1, 61)}
    swaps = {s: w for s, (w, _) in sched.items() if w is not None}
    reads = {s: r for s, (_, r) in sched.items() if r is not None}
    assert swaps == {21: 10, 31: 20, 41: 30, 51: 40}           # before step b+1 at b = 2K, 3K, ...: export b - K
    assert reads == {16: 10, 26: 20, 36: 30, 46: 40, 56: 50}   # read K//2 after it was written, K//2 before its swap
    for s, e in swaps.items():
        assert K <= s - 1 - e and e % K == 0 and reads[e + K // 2 + 1] == e  # every swap was prefetched first
    assert {sync_schedule(s, 1)[0] for s in range(3, 9)} == {1, 2, 3, 4, 5, 6}  # K = 1: a swap every step
    assert resume_prefetch(0, K) is None and resume_prefetch(10, K) is None
    assert resume_prefetch(25, K) == 20 and resume_prefetch(21, K) == 20 and resume_prefetch(30, K) == 20


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(64, 32, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
            "c": torch.arange(5), "d": torch.randn(3, 2, generator=g).half()}


def test_export_writer_runs_in_the_background_and_reports_a_full_disk(tmp_path, monkeypatch):
    w = ExportWriter(tmp_path / "exports", keep=3)
    assert w.collect() is None
    w.submit(0, 10, _weights(), {"group": 0})
    r = w.collect()
    assert r.step == 10 and r.error is None and read_latest(tmp_path / "exports") == 10
    assert torch.equal(read_export(tmp_path / "exports", 10).state_dict["a"], _weights()["a"])
    monkeypatch.setenv(faults.ENV, "export_oserror@20")
    w.submit(0, 20, _weights(1), {"group": 0})
    r = w.collect()
    assert isinstance(r.error, OSError) and read_latest(tmp_path / "exports") == 10  # LATEST unchanged
    bad = _weights()
    bad["a"][0, 0] = float("nan")
    w.submit(0, 30, bad, {"group": 0})
    assert isinstance(w.collect().error, ExportError)


def test_export_writer_does_not_hold_the_training_thread(tmp_path):
    """A probe thread (the training loop's stand-in) keeps running while 64 MB are written."""
    big = {f"w{i}": torch.randn(1024, 4096) for i in range(4)}
    w, gaps, done = ExportWriter(tmp_path, keep=1), [], threading.Event()

    def probe():
        t = time.perf_counter()
        while not done.is_set():
            torch.ones(8).add_(1)
            now = time.perf_counter()
            gaps.append(now - t)
            t = now

    th = threading.Thread(target=probe)
    th.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    w.submit(0, 1, big, {"group": 0})
    submit_s = time.perf_counter() - t0
    r = w.collect()
    done.set()
    th.join()
    assert r.error is None and submit_s < 0.05 and len(gaps) > 100


def test_zero_copy_reader_equals_safetensors_and_views_one_buffer(tmp_path):
    sd = _weights()
    save_file(sd, str(tmp_path / "w.safetensors"))
    got = read_safetensors(tmp_path / "w.safetensors", tuple(DIGESTS))
    data = (tmp_path / "w.safetensors").read_bytes()
    assert got.digests == {"weights_xxh3_64": xxhash.xxh3_64(data).hexdigest(), "weights_crc32": zlib.crc32(data),
                           "weights_sha256": hashlib.sha256(data).hexdigest()} and got.nbytes == len(data)
    assert got.nonfinite == [] and parse_safetensors(got.buffer, "w").keys() == got.tensors.keys()
    buf, got, ref = got.buffer, got.tensors, load(data)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    base = buf.untyped_storage().data_ptr()
    assert all(base <= t.untyped_storage().data_ptr() < base + buf.numel() for t in got.values())  # views, no copy


def test_writer_writes_safetensors_format_that_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    from codistill.exports import file_digest, write_weights
    e = torch.randn(10, 4)
    sd = dict(_weights(), tied=e, also_tied=e, scalar=torch.tensor(3.5), empty=torch.zeros(0, 3),
              mask=torch.tensor([True, False, True]), strided=torch.randn(6, 4)[:, 1], i64=torch.arange(3),
              h=torch.randn(3).half(), bf=torch.randn(3).bfloat16())
    for chunk in (5, 1 << 20):
        info = write_weights(tmp_path / "w.safetensors", sd, 7, chunk=chunk)
        assert info == file_digest(tmp_path / "w.safetensors")  # the digest of what is on disk
        back = load_file(str(tmp_path / "w.safetensors"))
        assert back.keys() == sd.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                                for k, v in sd.items())


def test_reader_finds_every_nan_and_inf_whatever_the_chunk_boundaries(tmp_path):
    """Each chunk's floating-point elements are checked while in cache; an element cut by a
    chunk boundary is checked once, with the chunk that completes it."""
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        sd = _weights(trial)
        sd["e"] = torch.randn(300, generator=g)
        bad = {n for n in ("a", "b", "d", "e") if torch.rand((), generator=g) < 0.5}
        for n in bad:
            flat = sd[n].view(-1)
            flat[int(torch.randint(flat.numel(), (), generator=g))] = float("nan") if trial % 2 else float("inf")
        save_file(sd, str(tmp_path / "w.safetensors"))
        for chunk in (7, 64, 333, 1 << 20):
            got = read_safetensors(tmp_path / "w.safetensors", chunk=chunk)
            assert set(got.nonfinite) == bad, (trial, chunk)
            assert all(torch.equal(got.tensors[k], v) or k in bad for k, v in sd.items())


def test_reader_reuses_the_buffer_of_a_consumed_export(tmp_path):
    for step, seed in ((10, 0), (20, 1)):
        write_export(tmp_path, step, _weights(seed), {"group": 0})
    bufs = ReadBuffers(keep=1)
    first = read_export(tmp_path, 10, buffers=bufs)
    ptr = first.buffer.data_ptr()
    bufs.give(first)
    assert first.state_dict == {} and first.buffer is None  # the export is not usable after give()
    second = read_export(tmp_path, 20, buffers=bufs)
    assert second.buffer.data_ptr() == ptr                  # same memory, new contents
    assert all(torch.equal(second.state_dict[k], v) for k, v in _weights(1).items())
    assert read_export(tmp_path, 10, buffers=bufs).buffer.data_ptr() != ptr  # in use: a fresh one


def test_exports_recorded_with_a_crc32_are_still_read(tmp_path):
    write_export(tmp_path, 10, _weights(), {"group": 0})
    meta = json.loads((tmp_path / "step_000010.json").read_text())
    blob = (tmp_path / "step_000010.safetensors").read_bytes()
    del meta["weights_xxh3_64"]
    (tmp_path / "step_000010.json").write_text(json.dumps(dict(meta, weights_crc32=zlib.crc32(blob))))
    assert torch.equal(read_export(tmp_path, 10).state_dict["a"], _weights()["a"])
    (tmp_path / "step_000010.json").write_text(json.dumps(dict(meta, weights_crc32=zlib.crc32(blob) ^ 1)))
    with pytest.raises(ExportError, match="checksum does not match"):
        read_export(tmp_path, 10)


@pytest.mark.parametrize("mutate,msg", [
    (lambda h: h["a"].update(data_offsets=[0, 10 ** 9]), "offsets"),
    (lambda h: h["a"].update(shape=[65, 32]), "size"),
    (lambda h: h["a"].update(dtype="PICKLE"), "'PICKLE'"),
    (lambda h: h.update(x=[1, 2]), "tensor 'x'"),
])
def test_zero_copy_reader_refuses_a_lying_header(mutate, msg):
    blob = save({"a": torch.zeros(64, 32)})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    mutate(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    bad = struct.pack("<Q", len(h)) + h + blob[8 + n:]
    with pytest.raises(ExportError, match=msg):
        parse_safetensors(torch.frombuffer(bytearray(bad), dtype=torch.uint8), "w")


def test_tied_weights_are_written_once_each_and_read_back(tmp_path):
    e = torch.randn(10, 4)
    write_export(tmp_path, 5, {"embed.weight": e, "head.weight": e}, {"group": 0})
    sd = read_export(tmp_path, 5).state_dict
    assert torch.equal(sd["embed.weight"], e) and torch.equal(sd["head.weight"], e)
