"""The GPU/cluster paths that CPU can check: device choice, the collectives' device, ds_config
resolution by device, teachers with the student's dtypes, and the step's one sync and the
teacher broadcast over a real 2-process gloo group."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import load_script

from codistill import comm
from codistill.comm import GroupComm, StepControl, device_tensor
from codistill.device import DeviceError, bf16_native, pick_cuda_index
from codistill.ds_config import resolve_ds_config
from codistill.exports import Export
from codistill.teachers.pool import TeacherPool, build_frozen
from model import build_model, preset_config


def test_collective_tensors_are_made_on_the_device_given():
    for dev in (torch.device("meta"), torch.device("cpu")):
        t = device_tensor([True, False, 3], dev)
        assert t.device.type == dev.type and t.shape == (3,)
        assert device_tensor(torch.ones(2, 2), dev, torch.int64).device.type == dev.type
    assert comm.flags_any([False, True], torch.device("cpu")) == [False, True]  # a 1-rank world


def test_step_control_decodes_flags_swaps_and_local_values():
    ctl = StepControl(3, torch.device("cpu"), swaps=True)
    out = ctl.sync(True, {1: torch.tensor(True), 2: torch.tensor(False)}, {(0, 2): 40, (1, 0): 0},
                   torch.tensor([1.5, 2.5]))
    assert out.stop and out.bad == [False, True, False]
    assert out.swaps == {(0, 2): 40, (1, 0): 0}  # step 0 is a real export step, not "no swap"
    assert out.local == [1.5, 2.5]
    plain = StepControl(3, torch.device("cpu")).sync(False, {0: torch.tensor(False)}, {}, None)
    assert not plain.stop and plain.swaps == {} and plain.local == []


def test_local_rank_is_mapped_onto_the_visible_gpus():
    assert pick_cuda_index(3, 1) == 0          # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    assert pick_cuda_index(3, 8) == 3          # one process per GPU, all visible
    assert pick_cuda_index(0, 2) == 0
    with pytest.raises(DeviceError, match="sees only 2 GPUs"):
        pick_cuda_index(3, 2, local_world=4)
    with pytest.raises(DeviceError, match="sees no GPU"):
        pick_cuda_index(0, 0)


def test_auto_bf16_refuses_emulated_bf16(monkeypatch):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return including_emulation  # a V100/T4: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert bf16_native(torch.device("cuda", 0)) is False and asked == {"including_emulation": False}
    assert bf16_native(torch.device("cpu")) is False


BASE = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True, "fused": "auto"}},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "overlap_comm": "auto", "reduce_bucket_size": "auto",
                              "allgather_bucket_size": "auto"}}


def test_ds_config_on_cpu_is_what_was_measured():
    cfg = resolve_ds_config(BASE, 1, None, torch.device("cpu"))
    assert cfg["bf16"]["enabled"] is False and "data_types" not in cfg
    assert cfg["zero_optimization"] == {"stage": 0, "overlap_comm": False, "reduce_bucket_size": 50_000_000,
                                        "allgather_bucket_size": 50_000_000}  # 1 rank, fp32: stage 0
    assert "fused" not in cfg["optimizer"]["params"]
    assert resolve_ds_config(BASE, 2, None, torch.device("cpu"))["zero_optimization"]["stage"] == 2
    assert BASE["zero_optimization"]["overlap_comm"] == "auto"  # the caller's dict is left alone


def test_ds_config_on_gpu_accumulates_in_fp32_and_keeps_zero(monkeypatch):
    monkeypatch.setattr("codistill.ds_config.bf16_native", lambda device: True)
    cfg = resolve_ds_config(BASE, 1, None, torch.device("cuda", 0))
    assert cfg["bf16"]["enabled"] is True and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 500_000_000,
                                        "allgather_bucket_size": 500_000_000}  # no stage-0 shortcut on GPU
    assert cfg["optimizer"]["params"]["fused"] is True
    stage0 = dict(BASE, zero_optimization={"stage": 0}, bf16={"enabled": True})
    assert resolve_ds_config(stage0, 1, None, torch.device("cuda", 0))["zero_optimization"]["stage"] == 1
    mine = dict(BASE, data_types={"grad_accum_dtype": "bf16"})
    assert resolve_ds_config(mine, 1, None, torch.device("cuda", 0))["data_types"] == {"grad_accum_dtype": "bf16"}
    monkeypatch.setattr("codistill.ds_config.bf16_native", lambda device: False)  # V100: fp32
    assert resolve_ds_config(BASE, 1, None, torch.device("cuda", 0))["bf16"]["enabled"] is False


def test_bf16_forced_on_cpu_gets_fp32_accumulation_and_no_stage_0():
    cfg = resolve_ds_config(dict(BASE, bf16={"enabled": True}), 1, None, torch.device("cpu"))
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"} and cfg["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_frozen_teacher_takes_the_students_dtypes_and_keeps_buffers_fp32(arch):
    cfg = preset_config(arch, "tiny", 300, max_seq_len=64)
    student = build_model(cfg)
    for p in student.parameters():  # what DeepSpeed's bf16 does: parameters only
        p.data = p.data.to(torch.bfloat16)
    teacher = build_frozen(cfg, torch.device("cpu"), like=student)
    assert {n: t.dtype for n, t in teacher.named_parameters()} == {n: t.dtype for n, t in student.named_parameters()}
    assert {n: t.dtype for n, t in teacher.named_buffers()} == {n: t.dtype for n, t in student.named_buffers()}
    if arch == "transformer":
        assert teacher.hf.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def _two_ranks(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dev = torch.device("cpu")
        cfg = preset_config("transformer", "tiny", 300, max_seq_len=64)
        # latest teachers: rank 0 (the group's leader) announces peer 1's export of step 30
        out = StepControl(2, dev, swaps=True).sync(rank == 1, {0: torch.tensor(rank == 1)},
                                                   {(0, 1): 30} if rank == 0 else {}, torch.tensor([float(rank)]))
        pool = TeacherPool(cfg, dev, comm=GroupComm(dev, src=0, group=None, size=2, leader=rank == 0))
        torch.manual_seed(5)
        ref = build_model(cfg).state_dict()
        exp = Export(step=30, meta={}, state_dict=ref) if rank == 0 else None
        pool.swap({1: (out.swaps[(0, 1)], exp)}, agree=False)         # only the leader has read it
        got = pool.modules[1].state_dict()
        same = all(torch.equal(got[k], ref[k]) for k in ref)
        refused = pool.swap({1: (40, None)})                           # the leader has none: nobody swaps
        with open(os.path.join(result_dir, f"r{rank}"), "w") as f:
            f.write(repr((out.stop, out.bad, out.swaps, out.local, same, pool.steps[1], refused >= 0)))
        torch.distributed.barrier()  # neither rank tears gloo down while the other is still in a collective
    finally:
        torch.distributed.destroy_process_group()


def test_group_ranks_follow_their_leader_over_gloo(tmp_path):
    """Two real processes: the step's sync gives both ranks the same stop/skip/swap answers,
    and a teacher read by the leader alone reaches the other rank by broadcast."""
    from conftest import free_port
    mp.start_processes(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [eval((tmp_path / f"r{r}").read_text()) for r in (0, 1)]
    for r, (stop, bad, swaps, local, same, step, _) in enumerate(results):
        assert stop and bad == [True, False] and swaps == {(0, 1): 30}
        assert local == [float(r)]  # rank-local values are not reduced
        assert same and step == 30  # rank 1 never read the export, yet has its weights


def run_teacher_parity(tmp_path, device: str, bf16: bool) -> dict:
    import json

    from conftest import run_python
    out = tmp_path / f"parity_{device}_{bf16}.json"
    proc = run_python(["tests/scripts/teacher_parity.py", "--device", device, "--out", out] + (["--bf16"] if bf16 else []),
                      timeout=600, gpu=device != "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("bf16", [False, True])
def test_teacher_from_an_export_gives_the_students_logits(tmp_path, bf16):
    """Every architecture, positions 0..1023, a real DeepSpeed engine as the student: fp32 equal to
    fp32 rounding (1e-5 of the logit scale: oneDNN/MKL GEMMs may round differently for the
    teacher's freshly allocated weights - alignment and the CPU's ISA pick the kernel - while a
    bf16 RoPE table or buffer is off by ~1e-2); bf16 (forced on CPU) within bf16's rounding, while
    a teacher cast with module.to(bf16) - buffers included - drifts on the Transformer's late
    positions (what the trainer did before)."""
    res = run_teacher_parity(tmp_path, "cpu", bf16)
    for arch, r in res.items():
        assert r["dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
        assert r["max_abs_diff"] <= (2 ** -8 if bf16 else 1e-5) * r["logit_scale"], (arch, r)
    if bf16:
        assert res["transformer"]["buffer_dtypes"] == ["torch.float32"]
        assert res["transformer"]["naive_cast_max_abs_diff_late_positions"] > 4 * res["transformer"]["max_abs_diff"]


def _hung_peer(rank, port, result_dir):
    import time
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=comm.collective_timeout(2))
    group = torch.distributed.new_group([0, 1])  # no timeout given: as DeepSpeed makes its groups
    if rank == 1:
        time.sleep(12)  # a hung rank
    t0, outcome = time.monotonic(), "ok"
    try:
        torch.distributed.all_reduce(torch.ones(3), group=group)
    except RuntimeError as e:
        outcome = comm.lost_rank_message(e, rank, 2) or repr(e)
    with open(os.path.join(result_dir, f"r{rank}"), "w") as f:
        f.write(repr((time.monotonic() - t0, outcome)))


def test_dist_timeout_bounds_every_process_group_not_only_the_world(tmp_path):
    """A rank that hangs: the other's collective on a group made without a timeout (DeepSpeed's
    clone of the world, build_mpus' groups) fails after --dist_timeout, not gloo's 30 minutes."""
    import time

    from conftest import free_port
    t0 = time.monotonic()
    try:
        mp.start_processes(_hung_peer, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    except mp.ProcessExitedException as e:
        # Under load gloo sometimes ends the timed-out rank with std::terminate (SIGABRT, "terminate
        # called without an active exception") instead of raising - as NCCL's watchdog may abort: the
        # process still ends within the bound, which is what --dist_timeout promises (seen once in ~6 runs)
        assert e.error_index == 0 and e.signal_name == "SIGABRT" and time.monotonic() - t0 < 12, e
        return
    waited, outcome = eval((tmp_path / "r0").read_text())
    assert 1.5 < waited < 9 and outcome.startswith("rank 0: a collective failed") and "Timed out" in outcome, outcome


def test_lost_rank_message_recognises_a_dead_peer_only():
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                        "by peer [127.0.0.1]:10150. This is typically caused by a remote worker crashing.")
    msg = comm.lost_rank_message(gloo, 0, 600)
    assert msg.startswith("rank 0: a collective failed") and "--dist_timeout 600 s" in msg and "--resume auto" in msg
    assert comm.lost_rank_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 0, 600) is None
    assert comm.lost_rank_message(torch.distributed.DistBackendError("NCCL watchdog"), 1, 5).startswith("rank 1")


def test_a_rank_killed_mid_training_ends_the_other_within_a_bounded_time(sample_data, tmp_path):
    """Two ranks of one group started as srun/torchrun start them (no deepspeed launcher, which
    would kill the survivor itself: deepspeed/launcher/launch.py main's sigkill_handler): rank 1
    is SIGKILLed in step 3 (CODISTILL_FAULT_INJECT); rank 0's next collective fails, and it exits
    1 with one error line naming the cause, not a traceback, well within --dist_timeout."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, e2e_args, env_for_runs, free_port
    port, procs, logs = free_port(), [], [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    argv = e2e_args(sample_data, tmp_path / "run", num_groups=1, max_steps=20, dist_timeout=30)
    for r in (0, 1):
        env = dict(env_for_runs(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CODISTILL_FAULT_INJECT="sigkill:1@3")
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen([sys.executable, "recipes/train_lm.py", *argv], cwd=ROOT, env=env,
                                          stdout=f, stderr=subprocess.STDOUT))
    try:
        procs[1].wait(timeout=120)
        killed = time.monotonic()
        procs[0].wait(timeout=60)
        survived_s = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    out = logs[0].read_text()
    assert procs[1].returncode == -9 and procs[0].returncode == 1, out[-4000:]
    assert "error: rank 0: a collective failed" in out and "--resume auto" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert survived_s < 30  # gloo sees the closed connection at once; a hung peer: --dist_timeout


def _fake_cuda(monkeypatch, visible: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)


def test_ds_accelerator_cpu_trains_on_cpu_on_a_gpu_node(monkeypatch):
    """Issue 28 item 11: the CPU tier (DS_ACCELERATOR=cpu) on a CUDA node trains on CPU, as
    DeepSpeed's CPU accelerator does, and leaves LOCAL_RANK alone."""
    from codistill.device import bind_device, engine_args, train_device
    _fake_cuda(monkeypatch, 2)
    env = {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert train_device(1, 2, env) == torch.device("cpu")
    assert bind_device(env) == torch.device("cpu") and env["LOCAL_RANK"] == "1"
    assert engine_args(torch.device("cpu")) is None
    env["DS_ACCELERATOR"] = "cuda"
    assert train_device(1, 2, env) == torch.device("cuda", 1)
    evaluate = load_script("evaluate")  # recipes/evaluate.py evaluates where the trainer trains
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert evaluate.eval_device(None) == torch.device("cpu") and evaluate.eval_device("cuda").type == "cuda"
    monkeypatch.delenv("DS_ACCELERATOR")
    assert evaluate.eval_device(None) == torch.device("cuda")


def test_local_rank_becomes_the_mapped_ordinal_before_deepspeed_reads_it(monkeypatch):
    """Issue 28 item 4: with one visible GPU (srun --gpus-per-task=1) and LOCAL_RANK=3, the rank
    trains on cuda:0 and LOCAL_RANK says 0, because DeepSpeed 0.19.8 reads LOCAL_RANK as the CUDA
    ordinal: zero.Init's ``self.local_device = torch.device(get_accelerator().device_name(
    os.environ["LOCAL_RANK"]))`` (runtime/zero/partition_parameters.py Init.__init__) and an engine's
    ``self.local_rank = int(os.environ['LOCAL_RANK'])`` (runtime/engine.py _configure_with_arguments,
    used by _set_distributed_vars when args carry no device_rank; _do_args_sanity_check asserts
    args.local_rank == LOCAL_RANK)."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from codistill.device import NODE_LOCAL_RANK, bind_device, engine_args
    _fake_cuda(monkeypatch, 1)
    env = {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    dev = bind_device(env)
    assert dev == torch.device("cuda", 0)
    assert env["LOCAL_RANK"] == "0" and env[NODE_LOCAL_RANK] == "3" and env["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"
    assert torch.device(CUDA_Accelerator().device_name(env["LOCAL_RANK"])) == dev  # zero.Init's local_device
    args = engine_args(dev)
    assert args.device_rank == args.local_rank == int(env["LOCAL_RANK"]) == 0  # the engine's sanity check holds
    assert bind_device(env) == dev and env[NODE_LOCAL_RANK] == "3"  # a second call maps the node-local rank again
    _fake_cuda(monkeypatch, 8)  # all GPUs visible: rank 3 keeps cuda:3
    env = {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}
    assert bind_device(env) == torch.device("cuda", 3) and env["LOCAL_RANK"] == "3"


def test_loss_chunk_mb_auto_is_resolved_by_device(monkeypatch):
    """Issue 28 item 9: --loss_chunk_mb auto is 32 MiB on CPU and 512 MiB on CUDA (or 1/32 of
    the free device memory, if less): ~1 k tokens per chunk at a 128 k vocabulary, not 65."""
    from codistill.loss import chunk_rows, resolve_chunk_mb
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_chunk_mb("auto", cpu) == resolve_chunk_mb(None, cpu) == 32.0
    assert chunk_rows(128_000, resolve_chunk_mb("auto", cpu)) == 65
    free = {"bytes": 80 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    assert resolve_chunk_mb("auto", gpu) == 512.0
    assert chunk_rows(128_000, resolve_chunk_mb("auto", gpu)) == 1048
    free["bytes"] = 4 * 2**30  # a small or busy GPU: 1/32 of what is free
    assert resolve_chunk_mb("auto", gpu) == 128.0
    free["bytes"] = 2**28
    assert resolve_chunk_mb("AUTO", gpu) == 32.0
    assert resolve_chunk_mb(64, gpu) == resolve_chunk_mb("64", cpu) == 64.0  # a number is taken as given
    for bad in (0, -1, "lots"):
        with pytest.raises(ValueError, match="--loss_chunk_mb"):
            resolve_chunk_mb(bad, cpu)


def test_the_step_sync_is_read_and_written_by_name():
    """Issue 29 item 3: one named layout (GroupSync) for each hosted group's part of the sync."""
    from codistill.comm import GroupSync
    lay = GroupSync(num_groups=3)
    assert lay.width == len(GroupSync.HEAD) + 2 * 4 and lay.slot(-1) == 3
    health = [0.0] * lay.health_width
    health[lay.health_ce(1)], health[lay.health_nonfinite(-1)] = 2.5, 1.0
    one = [7.0, 0.5, 1.0, 2.0, 3.0, 0.9, 4.0, *health]
    local = [0.0] * lay.width + one  # the second hosted group's part follows the first's
    got = lay.split(local, 1)
    assert (got["norm_step"], got["loss"], got["distill_ce"]) == (7.0, 1.0, 4.0)
    assert got["health"][lay.health_ce(1)] == 2.5 and got["health"][lay.health_nonfinite(-1)] == 1.0
    assert len({lay.health_ce(p) for p in (-1, 0, 1, 2)} | {lay.health_nonfinite(p) for p in (-1, 0, 1, 2)}) == 8


def test_start_up_watchdog_names_a_stale_jit_build_lock(tmp_path, monkeypatch):
    """A JIT build killed mid-way leaves torch's FileBaton lock, and every later start waits on it
    silently (it happened here after an OOM kill): the trainer's watchdog names it."""
    import time
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    new = tmp_path / "py311_cpu" / "other_op" / "lock"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.touch()
    os.utime(old, (time.time() - 600, time.time() - 600))
    os.utime(new, (time.time() + 60, time.time() + 60))  # made after this start began: a live build
    assert comm.stale_build_locks(time.time()) == [old]
    said = []
    comm.watch_start_up(0.05, warn=said.append).join(5)
    assert len(said) == 1 and str(old) in said[0] and "remove them" in said[0] and str(new) not in said[0]
    # a start that finishes first says nothing
    t = comm.watch_start_up(0.05, warn=said.append)
    t.cancel()
    time.sleep(0.1)
    assert len(said) == 1
