"""Device synchronizations per training step, counted in real 2-rank DeepSpeed runs of the
shipped configs (tests/scripts/count_syncs.py wraps get_accelerator().synchronize and
torch.cuda.synchronize). The trainer's own host sync (the step's control all-reduce read back
to the host) is no device synchronize; what is counted is DeepSpeed's.

With the shipped configs: 0 per step on CPU for ZeRO-1, 2 and 3. DeepSpeed's throughput timer
(on by default) would add 2 per step from its third (utils/timer.py ThroughputTimer.start in the
forward, stop in the step): the shipped configs and resolve_ds_config turn it off. On CUDA,
ZeRO-1/2 with overlap_comm add 1 per micro-batch (docs/gpu.md; CPU cannot run overlap_comm)."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, env_for_runs, ranks_command

STEPS = 6


def count_syncs(data, tmp_path, ds_config) -> dict:
    out = tmp_path / "syncs.json"
    cmd = [*ranks_command(2), str(ROOT / "tests/scripts/count_syncs.py"),
           str(out), "--ds_config", str(ds_config), "--data", str(data), "--run_dir", str(tmp_path / "run"),
           "--num_groups", "1", "--max_steps", str(STEPS), "--eval_every", "1000", "--export_every", "1000",
           "--save_every", "1000", "--eval_batches", "1", "--seq_len", "32", "--resume", "never"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_runs(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("config", ["zero1", "zero2", "zero3"])
def test_shipped_configs_make_no_device_sync_per_step(sample_data, tmp_path, config):
    res = count_syncs(sample_data, tmp_path, ROOT / "ds_configs" / f"{config}.json")
    assert [s for s, _ in res["per_step"]] == list(range(1, STEPS + 1))
    assert [n for _, n in res["per_step"]] == [0] * STEPS, res


def test_the_counter_sees_deepspeeds_throughput_timer(sample_data, tmp_path):
    """The control: the same run with DeepSpeed's default timer counts its 2 syncs per step."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["timers"] = {"throughput": {"enabled": True}}
    path = tmp_path / "zero2_timer.json"
    path.write_text(json.dumps(cfg))
    res = count_syncs(sample_data, tmp_path, path)
    assert [n for _, n in res["per_step"]] == [0, 0] + [2] * (STEPS - 2), res
