"""Teachers that do not fit (issue 17) on 2 groups x 2 ranks with ZeRO-3: partitioned, offloaded
and top-K teachers give the student the teacher the full one gives, a rank holds about half of
a partitioned teacher, and a refused or late export keeps the previous teacher in every mode
(tests/scripts/teacher_modes.py); the trainer runs with partitioned top-K teachers."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from conftest import DEEPSPEED, ROOT, e2e_args, env_for_runs, free_port, launch, read_scalars

MODES = ("full", "partition", "offload", "topk_v", "partition_topk", "full_topk")


def test_every_teacher_placement_gives_the_full_teachers_loss(tmp_path):
    cmd = [DEEPSPEED, "--num_gpus", "4", "--master_port", str(free_port()),
           str(ROOT / "tests" / "scripts" / "teacher_modes.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_runs(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(4)]
    assert [r["group"] for r in ranks] == [0, 0, 1, 1] and [r["leader"] for r in ranks] == [True, False, True, False]
    for r in ranks:
        full = r["full"]
        assert full["first"]["teacher_ce"] != full["second"]["teacher_ce"]  # the two exports are different teachers
        for mode in MODES:
            m = r[mode]
            # a refused or late export (the leader has none to offer): the previous teacher stays
            assert m["kept"]["step"] == 10 and m["kept"]["loss"] == m["first"]["loss"], (mode, m)
            assert m["second"]["step"] == 20
            ref = r["full_topk"] if mode == "partition_topk" else full
            for when in ("first", "second"):
                assert abs(m[when]["loss"] - ref[when]["loss"]) <= 1e-5, (mode, when, m[when], ref[when])
                assert math.isclose(m[when]["teacher_ce"], full[when]["teacher_ce"], rel_tol=1e-5)
                if m[when]["q_max_diff_vs_full"] is not None:
                    assert m[when]["q_max_diff_vs_full"] <= 1e-6, (mode, when)
        # K = V: the dense loss (float32 summation order aside); K < V: not the dense loss
        assert abs(r["topk_v"]["first"]["loss"] - full["first"]["loss"]) <= 1e-5
        # each rank of a 2-rank group holds half of a partitioned teacher (+ its unpartitioned buffers)
        whole = r["partition_full_bytes"]
        assert whole == full["resident_bytes"]
        assert abs(r["partition"]["resident_bytes"] - whole / 2) <= 0.01 * whole, r["partition"]["resident_bytes"]
        assert r["offload"]["resident_bytes"] <= 0.01 * whole  # parameters are on the device only in their forward


def test_trainer_runs_partitioned_top_k_teachers(sample_data, tmp_path):
    """`deepspeed --num_gpus 4 recipes/train_lm.py --ds_config ds_configs/zero3.json --num_groups 2
    --teacher_partition --teacher_topk 16`: teachers are swapped in and used, and summary.json
    reports the leader's memory."""
    run_dir = tmp_path / "run"
    out = launch(e2e_args(sample_data, run_dir, ds_config="ds_configs/zero3.json", num_groups=2, max_steps=10,
                          export_every=3, burn_in_steps=3, eval_every=10, save_every=10) +
                 ["--teacher_partition", "--teacher_topk", "16"], num_ranks=4).stdout
    assert "partitioned (ZeRO-3), top-16 probabilities" in out
    for g in (0, 1):
        distill = read_scalars(Path(run_dir) / f"group_{g}" / "tb", "train/distill")
        assert distill[10] > 0 and all(math.isfinite(v) for v in distill.values())
        assert read_scalars(Path(run_dir) / f"group_{g}" / "tb", f"teacher/step/group_{1 - g}")[10] == 6
        summary = json.loads((run_dir / f"group_{g}" / "summary.json").read_text())
        mem = summary["memory"]
        assert 0 < mem["rss_start_mib"] < mem["rss_peak_mib"], mem
