"""Device synchronizations and host reads of tensor values per training step, counted in real
2-rank DeepSpeed runs of the shipped configs (tests/scripts/count_syncs.py wraps
get_accelerator().synchronize, torch.cuda.synchronize and Tensor.item/tolist/__bool__/__float__/
__int__ on the training thread).

Device synchronizes with the shipped configs: 0 per step on CPU for ZeRO-1, 2 and 3. DeepSpeed's
throughput timer (on by default) would add 2 per step from its third (utils/timer.py
ThroughputTimer.start in the forward, stop in the step): the shipped configs and resolve_ds_config
turn it off. On CUDA, ZeRO-1/2 with overlap_comm add 1 per micro-batch (docs/gpu.md; CPU cannot
run overlap_comm).

Host reads per step (docs/gpu.md "Host syncs"): the trainer's own is exactly 1 (the step's control
all-reduce, codistill/comm.py StepControl.sync). DeepSpeed's, each a host sync on a GPU where its
tensor is on the device there:
- the gradient norm's validity (runtime/utils.py is_invalid_grad_norm: ``bool(...any())`` of the
  device norm): ZeRO-1/2 twice (stage_1_and_2.py step, before the update, and
  unscale_and_clip_grads), ZeRO-3 once (stage3.py step);
- bf16 ZeRO-2 (bf16.check_grad_overflow, DeepSpeed's default true): has_overflow's ``.item()`` of
  the all-reduced overflow flag, one more;
- bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer): the norm's validity and clip_tensors_by_global_norm's
  ``clip_coef < 1``;
- the optimizer's step counter (torch.optim.Adam's single-tensor path, ``_get_value(state["step"])``
  of a host tensor): on a GPU the shipped configs take torch's fused AdamW (codistill/ds_config.py),
  whose kernel reads the step on the device (torch/optim/adam.py _fused_adam), so no sync.
These are the steady state, from step 3: in steps 1-2 ZeRO-3 also checks that every rank recorded
the same parameter-fetch trace (partitioned_param_coordinator.py, zero/utils.py
assert_ints_same_as_other_ranks: 1 and 42 reads here, once per run).
"""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, env_for_runs, ranks_command

STEPS = 6


def count_syncs(data, tmp_path, ds_config, steps: int = STEPS, flags: tuple = ("--num_groups", "1",
                "--export_every", "1000")) -> dict:
    out = tmp_path / "syncs.json"
    cmd = [*ranks_command(2), str(ROOT / "tests/scripts/count_syncs.py"),
           str(out), "--ds_config", str(ds_config), "--data", str(data), "--run_dir", str(tmp_path / "run"),
           "--max_steps", str(steps), "--eval_every", "1000", "--save_every", "1000", "--eval_batches", "1",
           "--seq_len", "32", "--resume", "never", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_runs(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    res["log"] = proc.stdout
    return res


NORM = "deepspeed/runtime/utils.py:is_invalid_grad_norm"
STEP_COUNTER = "optimizer step counter"  # a host tensor; on a GPU fused AdamW reads none
# DeepSpeed's reads per step: (where, its caller), in the order they happen
DEEPSPEED_READS = {
    "zero1": [(NORM, "stage_1_and_2.py:step"), (NORM, "stage_1_and_2.py:unscale_and_clip_grads"), STEP_COUNTER],
    "zero2": [(NORM, "stage_1_and_2.py:step"), (NORM, "stage_1_and_2.py:unscale_and_clip_grads"), STEP_COUNTER],
    "zero3": [(NORM, "stage3.py:step"), STEP_COUNTER],
    "zero2_bf16": [("deepspeed/runtime/zero/stage_1_and_2.py:has_overflow", "stage_1_and_2.py:_check_overflow"),
                   (NORM, "stage_1_and_2.py:step"), (NORM, "stage_1_and_2.py:unscale_and_clip_grads"), STEP_COUNTER],
    "zero1_bf16": [(NORM, "bf16_optimizer.py:step"),
                   ("deepspeed/runtime/utils.py:clip_tensors_by_global_norm", "bf16_optimizer.py:step"),
                   STEP_COUNTER],
}


def kind(site: str):
    """A read site "file:function:line <- file:function:line" as (where, its caller's file:function)."""
    here, _, caller = site.partition(" <- ")
    here = here.rsplit(":", 1)[0]
    caller = "/".join(caller.rsplit(":", 1)[0].split("/")[-1:])
    if here in ("deepspeed/runtime/zero/stage_1_and_2.py:_optimizer_step", "deepspeed/runtime/bf16_optimizer.py:step",
                "deepspeed/runtime/zero/stage3.py:step_with_gradscaler"):
        return STEP_COUNTER  # the first frame outside torch around torch.optim's step: its counter
    return here, caller


def ds_config(tmp_path, config: str):
    stage, _, dtype = config.partition("_")
    if not dtype:
        return ROOT / "ds_configs" / f"{stage}.json"
    cfg = json.loads((ROOT / "ds_configs" / f"{stage}.json").read_text())
    cfg["bf16"] = {"enabled": True}
    path = tmp_path / f"{config}.json"
    path.write_text(json.dumps(cfg))
    return path


# zero1 in fp32 takes zero2's optimizer path (stage_1_and_2.py, the same reads); under bf16, as a GPU
# runs the shipped zero1.json, it takes DeepSpeed's BF16_Optimizer: that one is counted
@pytest.mark.parametrize("config", ["zero2", "zero3", "zero2_bf16", "zero1_bf16"])
def test_shipped_configs_make_no_device_sync_and_these_host_reads_per_step(sample_data, tmp_path, config):
    res = count_syncs(sample_data, tmp_path, ds_config(tmp_path, config))
    assert [s for s, _, _ in res["per_step"]] == list(range(1, STEPS + 1))
    assert [n for _, n, _ in res["per_step"]] == [0] * STEPS, res
    for step, _, sites in res["per_step"]:
        ours = [s for s in sites if not s.startswith("deepspeed/")]
        assert len(ours) == 1 and ours[0].startswith("codistill/comm.py:sync:"), (step, ours)  # the step's sync
        if step > 2:  # steady state: ZeRO-3 checks its parameter-fetch trace across ranks in steps 1-2
            assert [kind(s) for s in sites if s.startswith("deepspeed/")] == DEEPSPEED_READS[config], (step, sites)


def test_a_codistillation_step_reads_one_host_value_of_the_trainers(sample_data, tmp_path):
    """2 groups on 2 ranks (the world split), sync teachers from step 9 (K = 4), top-K teachers:
    the steps with teachers read no more host values of the trainer's than those without - the
    teachers' probabilities, the distillation loss and the teacher guard stay on the device."""
    res = count_syncs(sample_data, tmp_path, ROOT / "ds_configs" / "zero2.json", steps=12,
                      flags=("--num_groups", "2", "--export_every", "4", "--burn_in_steps", "4", "--teacher_topk", "8"))
    assert "teachers g1@4" in res["log"] and "top-8" in res["log"], res["log"][-3000:]
    for step, n, sites in res["per_step"]:
        ours = [s for s in sites if not s.startswith("deepspeed/")]
        assert n == 0 and len(ours) == 1 and ours[0].startswith("codistill/comm.py:sync:"), (step, n, ours)


def test_the_counter_sees_deepspeeds_throughput_timer(sample_data, tmp_path):
    """The control: the same run with DeepSpeed's default timer counts its 2 syncs per step."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["timers"] = {"throughput": {"enabled": True}}
    path = tmp_path / "zero2_timer.json"
    path.write_text(json.dumps(cfg))
    res = count_syncs(sample_data, tmp_path, path)
    assert [n for _, n, _ in res["per_step"]] == [0, 0] + [2] * (STEPS - 2), res
