"""Teachers that do not fit (issues 17 and 28) on 2 groups x 2 ranks with ZeRO-3, as a matrix
(tests/scripts/teacher_modes.py, one launch): mode {full, partition, offload} x {dense, top-K}
x dtype {fp32, bf16} x arch {LSTM, the repo's Transformer (RoPE), an HF Llama tied and untied}. Every
combination builds, receives the weights from the group's leader, keeps its teacher when the
leader has none to offer, and gives the probabilities of a full teacher this rank loads itself;
its buffers keep the student's dtype (a RoPE inv_freq built inside zero.Init was bf16);
torch.nn.functional.linear is still torch's afterwards (zero.Init replaced it); a rank holds
about half of a partitioned teacher; an offloaded one moves every parameter to the device once
per forward (a tied matrix once). The trainer runs with partitioned top-K teachers."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from conftest import ROOT, e2e_args, env_for_runs, launch, ranks_command, read_scalars

ARCHS = ("lstm", "transformer", "llama_tied", "llama_untied")
# bf16 is held to exactness too (measured: 0 on every rank): each placement runs the same bf16
# kernels on the same bf16 weights in the same order on one CPU. A tolerance wide enough for a
# real reordering of bf16 sums (an ulp of a logit, 2^-8 relative, through the softmax of these
# peaked distributions: ~1e-2) would also pass the bug it is here for: a partitioned teacher
# whose RoPE inv_freq was built in bf16 differs from the full one by 3e-3 to 8e-3 in probability
# at 48 positions (issue 28 item 1). On a GPU, where kernels may differ by layout, allow that ulp.
BF16_TOL = 0.0


def check_matrix(ranks: list[dict]) -> list[str]:
    """Every failed expectation of the matrix, named by rank and combination."""
    bad = []
    for r in ranks:
        combos = r["combos"]
        want = {f"{a}/{d}/{m}/{k}" for a in ARCHS for d in ("fp32", "bf16")
                for m in ("full", "partition", "offload") for k in ("dense", "topk")}
        if set(combos) != want:
            bad.append(f"rank {r['rank']}: combinations {sorted(want ^ set(combos))} missing or extra")
        for name, c in sorted(combos.items()):
            where = f"rank {r['rank']} {name}"
            if "error" in c:
                bad.append(f"{where}: {c['error']}")
                continue
            tol = 0.0 if "/fp32/" in name else BF16_TOL  # fp32: exact
            if c["ref_ce"][0] == c["ref_ce"][1]:
                bad.append(f"{where}: the two exports give the same teacher: the swap is not tested")
            if not c["linear_is_original"]:
                bad.append(f"{where}: torch.nn.functional.linear was replaced")
            for when, step in (("first", 10), ("kept", 10), ("second", 20)):
                m = c[when]
                if m["step"] != step:
                    bad.append(f"{where} {when}: teacher step {m['step']} != {step}")
                if not (m["q_diff"] <= tol and m["ce_diff"] <= tol):
                    bad.append(f"{where} {when}: probabilities differ from the full teacher's by {m['q_diff']:.3g} "
                               f"(teacher CE by {m['ce_diff']:.3g}; allowed {tol})")
                if m.get("indices_equal") is False:
                    bad.append(f"{where} {when}: other top-K tokens than the full teacher's")
                if "bytes_moved" in m and m["bytes_moved"] != c["param_bytes"]:
                    bad.append(f"{where} {when}: {m['bytes_moved']} bytes moved to the device in a forward, "
                               f"the parameters are {c['param_bytes']}")
            for n, b in c["buffers"].items():
                if b["dtype"] != b["student"]:
                    bad.append(f"{where}: buffer {n} is {b['dtype']}, the student's is {b['student']}")
                if b["diff"] is None or b["diff"] != 0:
                    bad.append(f"{where}: buffer {n} differs from the full teacher's by {b['diff']}")
            whole = c["full_bytes"]
            if "/partition/" in name and abs(c["resident_bytes"] - whole / 2) > 0.05 * whole:
                bad.append(f"{where}: holds {c['resident_bytes']} of {whole} bytes, not about half")
            if "/offload/" in name and c["resident_bytes"] > 0.05 * whole:
                bad.append(f"{where}: holds {c['resident_bytes']} of {whole} bytes between forwards")
    return bad


def test_every_teacher_placement_dtype_and_architecture_gives_the_full_teachers_probabilities(tmp_path):
    cmd = [*ranks_command(4), str(ROOT / "tests" / "scripts" / "teacher_modes.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_runs(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(4)]
    assert [r["group"] for r in ranks] == [0, 0, 1, 1] and [r["leader"] for r in ranks] == [True, False, True, False]
    bad = check_matrix(ranks)
    assert not bad, f"{len(bad)} failures:\n" + "\n".join(bad[:60])


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
