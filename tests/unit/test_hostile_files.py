"""A peer's files against the reader: symlinks, FIFOs, devices, directories, unbounded sizes,
poisoned tensors and steps (issue 31 items 4, 6, 7), and the writer against device tensors and
the reader's pinned buffers (issue 28 items 3, 10). Real files throughout: os.mkfifo, symlinks
to /dev/zero and to files outside the run directory, sparse files, hand-edited headers. A FIFO
is read on a thread joined with a timeout, so a reader that blocked would fail, not hang."""
from __future__ import annotations

import gc
import json
import os
import struct
import threading
import time

import pytest
import torch
from conftest import CFG, TOK, export_meta, write_test_export
from safetensors.torch import save_file

from codistill.exports import (
    ReadBuffers,
    file_digest,
    read_export,
    read_latest,
    read_safetensors,
    write_export,
    write_weights,
)
from codistill.layout import exports_dir
from codistill.teachers.loader import check_usable
from codistill.teachers.pool import TeacherPool
from fileio import ExportError, MissingFile, read_bounded

HASH = CFG.config_hash()
NAME = "step_000010"


def returns(fn, timeout=10.0):
    """``fn()`` on a thread: (its result or exception); fails if it has not returned in time."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"blocked for more than {timeout}s"
    return out


def refused(fn, *needles):
    """``fn()`` raised an ExportError whose message has every needle (a file name among them)."""
    out = returns(fn)
    e = out.get("error")
    assert isinstance(e, ExportError), out
    assert all(n in str(e) for n in needles), (str(e), needles)
    return str(e)


def _export(tmp_path, step=10):
    d = exports_dir(tmp_path, 1)
    write_test_export(d, step)
    return d


def _bless(d, name=NAME, **fields):
    """What a hostile peer does after tampering: the metadata records the file's real size and
    digest (so the digest check alone cannot catch it), plus ``fields``."""
    meta = json.loads((d / f"{name}.json").read_text())
    meta.update(file_digest(d / f"{name}.safetensors"), **fields)
    (d / f"{name}.json").write_text(json.dumps(meta))


# ---- the safe-open primitive -----------------------------------------------------------------
def test_read_bounded_refuses_what_is_not_a_regular_file_and_what_is_too_large(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("the victim's secret")
    (tmp_path / "link").symlink_to(outside)
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    with open(tmp_path / "big", "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that takes no disk
    for name, needle in (("link", "symbolic link"), ("zero", "symbolic link"), ("fifo", "a FIFO"),
                         ("dir", "a directory"), ("big", "more than a file can be")):
        msg = refused(lambda name=name: read_bounded(tmp_path / name, 4096), str(tmp_path / name), needle)
        assert "secret" not in msg
    assert isinstance(returns(lambda: read_bounded(tmp_path / "nope", 10))["error"], MissingFile)
    assert read_bounded(outside, 4096) == b"the victim's secret"
    refused(lambda: read_bounded("/dev/zero", 4096), "/dev/zero is a device")


# ---- LATEST ----------------------------------------------------------------------------------
@pytest.mark.parametrize("plant", ["outside", "devzero", "fifo", "directory", "huge"])
def test_a_planted_latest_is_refused_without_blocking_reading_or_echoing_it(tmp_path, plant):
    d = _export(tmp_path)
    latest = d / "LATEST"
    latest.unlink()
    outside = tmp_path / "id_rsa"
    outside.write_text("-----BEGIN PRIVATE KEY----- hunter2")
    {"outside": lambda: latest.symlink_to(outside), "devzero": lambda: latest.symlink_to("/dev/zero"),
     "fifo": lambda: os.mkfifo(latest), "directory": lambda: latest.mkdir(),
     "huge": lambda: latest.write_bytes(b"step_000010" + b" " * (1 << 20))}[plant]()
    msg = refused(lambda: read_latest(d), str(latest))
    assert "hunter2" not in msg and "PRIVATE" not in msg and len(msg) < 400


def test_a_latest_naming_garbage_is_echoed_only_briefly(tmp_path):
    d = _export(tmp_path)
    (d / "LATEST").write_text("x" * 60)
    msg = refused(lambda: read_latest(d), "not an export name")
    assert "x" * 25 not in msg


# ---- metadata ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plant", ["devzero", "fifo", "directory", "nested", "huge", "outside"])
def test_planted_or_hostile_metadata_is_one_export_error_naming_the_file(tmp_path, plant):
    d = _export(tmp_path)
    meta = d / f"{NAME}.json"
    good = meta.read_text()
    meta.unlink()
    if plant == "devzero":
        meta.symlink_to("/dev/zero")
    elif plant == "fifo":
        os.mkfifo(meta)
    elif plant == "directory":
        meta.mkdir()
    elif plant == "nested":
        meta.write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json.loads
    elif plant == "huge":
        meta.write_text(good)
        with open(meta, "ab") as f:
            f.truncate(1 << 33)  # 8 GiB, sparse
    else:
        (tmp_path / "outside.json").write_text(good)
        meta.symlink_to(tmp_path / "outside.json")
    refused(lambda: read_export(d, 10, HASH, TOK), str(meta))


@pytest.mark.parametrize("field,value,needle", [
    ("weights_bytes", 10 ** 12, "does not match its metadata"),   # 1 TB: a size mismatch, nothing allocated
    ("weights_bytes", 1 << 50, "not a byte/token count"),
    ("weights_bytes", "12", "not a byte/token count"),
    ("tokens_seen", -5, "not a byte/token count"),
    ("step", True, "does not describe step"),
])
def test_metadata_fields_of_the_wrong_kind_or_size_are_refused(tmp_path, field, value, needle):
    d = _export(tmp_path)
    meta = json.loads((d / f"{NAME}.json").read_text())
    meta[field] = value
    (d / f"{NAME}.json").write_text(json.dumps(meta))
    refused(lambda: read_export(d, 10, HASH, TOK), needle)


def test_a_claimed_step_is_bounded(tmp_path):
    """A peer claiming step 10^12 would never become stale: refused (MAX_STEP); a caller that
    knows a tighter bound (``max_step``) gets it enforced; in sync mode the file's name, which the
    reader's schedule chooses, must match the metadata's step."""
    huge = 10 ** 12
    d = exports_dir(tmp_path, 1)
    write_export(d, huge, {"w": torch.ones(2)}, export_meta())
    refused(lambda: read_export(d, huge), f"claims step {huge}")
    write_export(d, 500, {"w": torch.ones(2)}, export_meta())
    assert read_export(d, 500, max_step=600).step == 500
    refused(lambda: read_export(d, 500, max_step=400), "claims step 500")
    meta = json.loads((d / "step_000500.json").read_text())
    (d / "step_000600.json").write_text(json.dumps(meta))  # step 500's metadata under another name
    (d / "step_000600.safetensors").write_bytes((d / "step_000500.safetensors").read_bytes())
    refused(lambda: read_export(d, 600), "does not describe step 600")
    # its own metadata bounds it too: no step is trained on fewer than one token
    write_export(d, 700, {"w": torch.ones(2)}, dict(export_meta(), tokens_seen=699))
    refused(lambda: read_export(d, 700), "claims step 700 after only 699 tokens")


def test_the_loader_bounds_a_latest_peer_by_the_runs_max_steps(tmp_path):
    """In latest mode (one launch per group) nothing else bounds a peer's step: the loader refuses
    an export beyond the run's --max_steps (Exchange passes it), names it and keeps the last good
    teacher; a later honest export is picked up."""
    from codistill.teachers.loader import TeacherLoader
    d = exports_dir(tmp_path, 1)
    write_test_export(d, 10**6)
    msgs = []
    loader = TeacherLoader(tmp_path, [1], CFG.config_hash(), TOK, mode="latest", poll_interval=0.02,
                           log=msgs.append, max_step=1000)
    try:
        deadline = time.time() + 10
        while not msgs and time.time() < deadline:
            time.sleep(0.02)
        assert msgs and "claims step 1000000" in msgs[0] and "(1000)" in msgs[0], msgs
        assert loader.take(1) is None
        write_test_export(d, 40)
        deadline = time.time() + 10
        while (got := loader.take(1)) is None and time.time() < deadline:
            time.sleep(0.02)
        assert got is not None and got.step == 40
    finally:
        loader.close()


# ---- the weights file ----------------------------------------------------------------------------
@pytest.mark.parametrize("plant", ["devzero", "fifo", "directory", "outside"])
def test_a_planted_weights_file_is_refused_without_blocking(tmp_path, plant):
    d = _export(tmp_path)
    w = d / f"{NAME}.safetensors"
    good = w.read_bytes()
    w.unlink()
    {"devzero": lambda: w.symlink_to("/dev/zero"), "fifo": lambda: os.mkfifo(w), "directory": lambda: w.mkdir(),
     "outside": lambda: (tmp_path / "o.safetensors").write_bytes(good) or w.symlink_to(tmp_path / "o.safetensors")
     }[plant]()
    refused(lambda: read_export(d, 10, HASH, TOK), str(w))


def test_an_export_padded_with_sparse_zeros_is_refused_before_any_buffer(tmp_path):
    """4 GiB of sparse zeros after the tensors, with the metadata recording the padded file's
    size and digest: refused by the header (the tensors must tile the file), nothing allocated."""
    d = _export(tmp_path)
    w = d / f"{NAME}.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:
        f.truncate(size + (4 << 30))
    meta = json.loads((d / f"{NAME}.json").read_text())
    meta["weights_bytes"] = size + (4 << 30)  # the digest is not even reached; the size is the padded one
    (d / f"{NAME}.json").write_text(json.dumps(meta))
    taken = []

    class Watch(ReadBuffers):
        def take(self, nbytes, pin_memory):
            taken.append(nbytes)
            return super().take(nbytes, pin_memory)

    t0 = time.perf_counter()
    refused(lambda: read_export(d, 10, HASH, TOK, buffers=Watch(keep=1)), str(w), "after the last tensor")
    assert taken == [] and time.perf_counter() - t0 < 5


def _handmade(path, entries: dict, data: bytes):
    """A safetensors file with the header ``entries`` exactly as given (offsets by hand)."""
    raw = json.dumps(entries).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_overlapping_or_gapped_tensors_are_refused(tmp_path):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    f = tmp_path / "w.safetensors"
    _handmade(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, data)
    assert torch.equal(read_safetensors(f).tensors["b"], torch.arange(4, 8, dtype=torch.float32))  # the control
    _handmade(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, data[:16])
    refused(lambda: read_safetensors(f), "overlaps another tensor")
    _handmade(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data[:12])
    refused(lambda: read_safetensors(f), "overlaps another tensor")
    _handmade(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, data[:24])
    refused(lambda: read_safetensors(f), "a gap before it")


def test_f64_weights_holding_1e300_are_refused_by_reader_and_writer(tmp_path):
    """1e300 is finite in F64 (it passes a NaN/Inf check) and +inf in the fp32 teacher."""
    f = tmp_path / "w.safetensors"
    save_file({"w": torch.full((4,), 1e300, dtype=torch.float64)}, str(f))
    refused(lambda: read_safetensors(f), "F64")
    refused(lambda: write_weights(tmp_path / "x.safetensors", {"w": torch.ones(2, dtype=torch.float64)}, 1),
            "tensor w is torch.float64")
    save_file({"w": torch.full((4,), 3.4e38)}, str(f))  # finite in fp32, +inf in a bf16 teacher
    assert read_safetensors(f).nonfinite == ["w"]


def test_each_tensor_dtype_and_shape_is_checked_against_the_model(tmp_path):
    """The loader's ``expect`` (TeacherPool.expected_shapes: shape and dtype) is checked on the
    header, before the data is read: a model fp32 tensor may come as fp32/bf16/fp16, an integer
    buffer only as itself."""
    expect = TeacherPool(CFG, torch.device("cpu")).expected_shapes()
    d = _export(tmp_path)
    exp = read_export(d, 10, HASH, TOK, expect=expect)
    check_usable(exp, expect)
    sd = {k: v.clone() for k, v in exp.state_dict.items()}
    name = next(k for k, v in sd.items() if v.is_floating_point())
    write_export(d, 20, dict(sd, **{name: sd[name].bfloat16()}), export_meta())
    assert read_export(d, 20, HASH, TOK, expect=expect).state_dict[name].dtype == torch.bfloat16
    write_export(d, 30, dict(sd, **{name: sd[name].to(torch.int32)}), export_meta())
    refused(lambda: read_export(d, 30, HASH, TOK, expect=expect), f"tensor {name} is torch.int32")
    write_export(d, 40, dict(sd, **{name: sd[name][:1]}), export_meta())
    refused(lambda: read_export(d, 40, HASH, TOK, expect=expect), f"tensor {name} has shape")
    write_export(d, 50, dict(sd, extra=torch.ones(1)), export_meta())
    refused(lambda: read_export(d, 50, HASH, TOK, expect=expect), "unexpected ['extra']")


# ---- the writer and device tensors ------------------------------------------------------------------
class OnDevice(torch.Tensor):
    """A CPU tensor that says it is on cuda:0 (``.numpy()`` fails on it as on a real CUDA tensor):
    ops run on its CPU data and stay "on the device", except a copy to the CPU, which gives a
    plain CPU tensor - the path write_weights takes with a GPU student's weights."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                   device=torch.device("cuda", 0), requires_grad=False)

    def __init__(self, data):
        self.inner = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map
        kwargs = dict(kwargs or {})
        to_cpu = func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        if to_cpu:
            kwargs.pop("device")
        out = func(*tree_map(lambda a: a.inner if isinstance(a, OnDevice) else a, args), **kwargs)
        return out if to_cpu else tree_map(lambda a: OnDevice(a) if isinstance(a, torch.Tensor) else a, out)


def test_the_writer_copies_device_tensors_to_host_and_refuses_meta_ones(tmp_path):
    sd = {"w": torch.randn(5, 3), "b": torch.arange(4), "h": torch.randn(7).bfloat16()}
    on_device = {k: OnDevice(v) for k, v in sd.items()}
    assert all(v.device.type == "cuda" for v in on_device.values())
    write_export(tmp_path, 10, on_device, export_meta())
    back = read_export(tmp_path, 10).state_dict
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    with torch.device("meta"):
        ghost = torch.nn.Linear(3, 2).state_dict()
    refused(lambda: write_export(tmp_path, 20, ghost, export_meta()), "tensor weight is on the meta device")
    assert not (tmp_path / "step_000020.safetensors").exists() and read_latest(tmp_path) == 10


# ---- pinned read buffers ---------------------------------------------------------------------------
class FakePinning:
    """CudaPinning's interface on a CPU: records what would be registered, unregistered, fenced."""

    def __init__(self):
        self.pinned, self.unpinned, self.synced = {}, [], 0

    def pin(self, buf):
        self.pinned[buf.data_ptr()] = buf.numel()

    def unpin(self, ptr):
        self.unpinned.append(ptr)

    def fence(self):
        me = self

        class Event:
            def synchronize(self):
                me.synced += 1
        return Event()


def test_pinned_read_buffers_are_exact_reused_after_their_fence_and_released(tmp_path):
    for step, seed in ((10, 0), (20, 1), (30, 2)):
        write_test_export(tmp_path, step, seed=seed)
    size = (tmp_path / "step_000010.safetensors").stat().st_size
    assert size & (size - 1)  # not a power of two, so rounding up would show
    pins = FakePinning()
    bufs = ReadBuffers(keep=1, pinning=pins)
    a = read_export(tmp_path, 10, pin_memory=True, buffers=bufs)
    assert pins.pinned == {a.buffer.data_ptr(): size} and bufs.pinned_bytes == size  # exactly the file
    ptr_a = a.buffer.data_ptr()
    b = read_export(tmp_path, 20, pin_memory=True, buffers=bufs)  # a still in use: a second buffer
    assert bufs.pinned_bytes == 2 * size and b.buffer.data_ptr() != ptr_a
    bufs.give(a)
    bufs.give(b)  # keep=1: a's buffer is let go
    del a, b
    gc.collect()
    assert pins.unpinned == [ptr_a] and bufs.pinned_bytes == size and pins.synced == 1  # a's copies, then unpinned
    c = read_export(tmp_path, 30, pin_memory=True, buffers=bufs)  # reuses b's, after its copies finished
    assert pins.synced == 2 and bufs.pinned_bytes == size and len(pins.pinned) == 2
    assert all(torch.equal(c.state_dict[k], v) for k, v in read_export(tmp_path, 30).state_dict.items())
    assert read_export(tmp_path, 10, buffers=bufs).buffer.numel() == size  # unpinned reads: exact too


def test_pinning_registers_on_the_ranks_gpu_from_any_thread(monkeypatch):
    """CUDA's current device is per host thread and 0 in a new one: CudaPinning makes the rank's
    ordinal current around every cudaHostRegister/Unregister, which run on the loader's reader
    threads and wherever a buffer's last reference drops (else each rank opens a context on GPU 0).
    On a CPU: torch.cuda.device and the registration calls record the device they run under."""
    from torch.cuda import _pin_memory_utils

    from codistill.exports import CudaPinning
    current, seen = threading.local(), []

    class device:  # torch.cuda.device's interface: make an ordinal current for the with-block
        def __init__(self, idx):
            self.idx = idx

        def __enter__(self):
            self.prev, current.idx = getattr(current, "idx", 0), self.idx

        def __exit__(self, *exc):
            current.idx = self.prev

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_pin_memory_utils, "pin_memory", lambda ptr, n: seen.append(("pin", getattr(current, "idx", 0))))
    monkeypatch.setattr(_pin_memory_utils, "unpin_memory", lambda ptr: seen.append(("unpin", getattr(current, "idx", 0))))
    pins, buf = CudaPinning(3), torch.empty(16, dtype=torch.uint8)
    for fn in (lambda: pins.pin(buf), lambda: pins.unpin(buf.data_ptr())):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert seen == [("pin", 3), ("unpin", 3)]
    seen.clear()
    CudaPinning().pin(buf)  # no ordinal given: the thread's current device, as before
    assert seen == [("pin", 0)]
