"""End-to-end runs of recipes/train_lm.py under the real DeepSpeed launcher (CPU, gloo).

DeepSpeed start-up costs seconds per launch, so runs are session fixtures shared by the
assertions that read them (TensorBoard events through TensorBoard's own reader, exports,
checkpoints, summary.json).
"""
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import E2E_BURN as BURN  # noqa: F401
from conftest import E2E_K as K
from conftest import E2E_STEPS as STEPS
from conftest import PY, ROOT, env_for_runs, launch, read_scalars, run_python, scalar_tags
from conftest import e2e_args as common
from safetensors.torch import load_file

# main_run (the main command's run, a session fixture) lives in conftest.py: e2e/test_fault_tolerance.py shares it



def losses(run_dir, group, tag="train/loss"):
    return read_scalars(Path(run_dir) / f"group_{group}" / "tb", tag)


def test_main_command_codistills(main_run):
    run_dir, out = main_run
    for g in (0, 1):
        gdir = run_dir / f"group_{g}"
        exports = sorted(p.name for p in (gdir / "exports").glob("step_*.safetensors"))
        assert exports and (gdir / "exports" / "LATEST").read_text() == "step_000040"
        distill, ce = losses(run_dir, g, "train/distill"), losses(run_dir, g, "train/ce")
        assert len(ce) == STEPS
        assert all(distill[s] == 0 for s in range(1, BURN + 1))
        teacher = losses(run_dir, g, f"teacher/step/group_{1 - g}")
        assert sorted(set(teacher.values())) == [10, 20]  # advances at every boundary, K stale
        assert all(distill[s] > 0 for s in teacher)            # on whenever a teacher is loaded
        assert min(teacher) == 2 * K + 1 and all(s - teacher[s] >= K for s in teacher)
        assert set(losses(run_dir, g, "teacher/staleness").values()) <= set(range(K, 2 * K + 1))
        tags = scalar_tags(gdir / "tb")
        for tag in ("train/loss", "train/ce", "train/distill", "train/ppl", "val/loss", "val/ppl", "lr",
                    "grad_norm", "perf/tokens_per_s", "perf/step_time", "teacher/step", "teacher/staleness",
                    "teacher/agreement", "teacher/reload_ms"):
            assert tag in tags, tag
        loss = losses(run_dir, g)
        assert sum(loss[s] for s in range(1, 6)) / 5 > sum(ce[s] for s in range(36, 41)) / 5 + 0.5
        final = load_file(gdir / "final" / "model.safetensors")
        assert "head.weight" in final and json.loads((gdir / "final" / "config.json").read_text())["arch"] == "lstm"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["groups"]) == {"group_0", "group_1"}
    for g in (0, 1):
        s = summary["groups"][f"group_{g}"]
        assert s["steps"] == STEPS and s["teacher_steps"] == {str(1 - g): 20}
        assert s["val_ppl"] == pytest.approx(losses(run_dir, g, "val/ppl")[STEPS], rel=1e-5)
        assert s["tokens_seen"] == STEPS * 16 * 32
    assert "teacher step in use" in out and "tensorboard --logdir" in out


def test_generate_samples_from_an_lstm_final_and_export(main_run):
    run_dir, _ = main_run
    args = ["recipes/generate.py", "--prompt", "The company said", "--max_new_tokens", "12", "--seed", "7",
            "--top_p", "0.9", "--num_samples", "2"]
    proc = run_python([*args, "--model", run_dir / "group_1"])  # final/; the tokenizer from the run's config.json
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = proc.stdout.split("--- sample 2 ---")
    assert len(samples) == 2 and all("The company said" in x for x in samples)
    assert run_python([*args, "--model", run_dir / "group_1"]).stdout == proc.stdout  # seeded
    greedy = run_python(["recipes/generate.py", "--model", run_dir / "group_0" / "exports" / "step_000020.json",
                         "--temperature", "0", "--max_new_tokens", "5"])
    assert greedy.returncode == 0 and greedy.stdout.strip(), greedy.stderr[-2000:]
    bad = run_python(["recipes/generate.py", "--model", run_dir / "group_0" / "nope"])
    assert bad.returncode == 2 and "--model" in bad.stderr and "no such file" in bad.stderr


def test_world_split_two_ranks_matches_one_process(main_run, sample_data, tmp_path):
    """2 ranks, 2 groups: the same groups, the same deterministic teachers, the same losses."""
    run_dir = tmp_path / "split"
    out = launch(common(sample_data, run_dir), num_ranks=2).stdout
    assert "this rank: [0], 1 rank(s) each" in out
    for g in (0, 1):
        a, b = losses(main_run[0], g), losses(run_dir, g)
        assert max(abs(a[s] - b[s]) for s in a) < 2e-3
        assert losses(run_dir, g, f"teacher/step/group_{1 - g}")[STEPS] == 20


def test_one_group_of_two_ranks_and_groups_never_share_gradients(sample_data, tmp_path):
    """4 ranks as 2 groups of 2 (ZeRO-2 inside each group): group 0's weights equal those of
    group 0 trained alone on 2 ranks, so nothing from group 1 (its data, its gradients) got in."""
    both, alone = tmp_path / "both", tmp_path / "alone"
    kw = dict(distill_weight=0, max_steps=12, eval_every=12, save_every=12)
    out = launch(common(sample_data, both, **kw), num_ranks=4).stdout
    assert "groups 2 (this rank: [0], 2 rank(s) each)" in out
    launch(common(sample_data, alone, group_id=0, **kw), num_ranks=2)
    w_both = load_file(both / "group_0" / "final" / "model.safetensors")
    w_alone = load_file(alone / "group_0" / "final" / "model.safetensors")
    assert all(torch.allclose(w_both[k], w_alone[k], atol=1e-6) for k in w_both)
    w_other = load_file(both / "group_1" / "final" / "model.safetensors")
    assert not torch.allclose(w_both["head.weight"], w_other["head.weight"])
    loss = losses(alone, 0)
    assert loss[12] < loss[1] - 0.2
    summary = json.loads((alone / "summary.json").read_text())
    assert summary["groups"]["group_0"]["tokens_seen"] == 12 * 2 * 16 * 32  # 2 ranks x micro 16


def test_separate_launches_per_group_share_a_run_dir(sample_data, tmp_path):
    run_dir = tmp_path / "array"
    procs = [launch(common(sample_data, run_dir, group_id=g, poll_interval=0.2, max_steps=50), background=True)
             for g in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "latest teachers" in outs[0]
    for g in (0, 1):
        teacher = losses(run_dir, g, f"teacher/step/group_{1 - g}")
        assert teacher and max(teacher.values()) >= 20, (g, teacher)
        assert max(losses(run_dir, g, "train/distill").values()) > 0
    assert set(json.loads((run_dir / "summary.json").read_text())["groups"]) <= {"group_0", "group_1"}


def test_peers_of_different_architectures_codistill(sample_data, tmp_path):
    """--peer_models any (issue 30 item 3): an LSTM group (1 rank) and a Transformer group (2 ranks,
    ZeRO-2: its leader tells the other rank the teacher's model) codistill through one run
    directory, each teacher built as the model the peer's exports declare. In turn, so that each
    has the other's exports whatever the machine's load: the Transformer trains to step 10 and
    stops, the LSTM trains to 30 with it as teacher, the Transformer resumes to 30 with the LSTM
    (each --group_id launch's model is recorded in its group's config.json for its resume check).
    --teacher of another model: tests/unit/test_peer_models.py."""
    run_dir = tmp_path / "mixed"
    kw = dict(max_steps=30, peer_models="any")
    transformer = common(sample_data, run_dir, group_id=1, model="transformer", **kw)
    launch([*transformer, "--stop_after_steps", "10"], num_ranks=2)
    launch(common(sample_data, run_dir, group_id=0, **kw))
    out = launch(transformer, num_ranks=2).stdout
    assert "resumed from step 10" in out, out[-3000:]
    for g, arch in ((0, "lstm"), (1, "transformer")):
        meta = json.loads((run_dir / f"group_{g}" / "final" / "meta.json").read_text())
        assert meta["model_config"]["arch"] == arch
        teacher = losses(run_dir, g, f"teacher/step/group_{1 - g}")
        assert teacher and max(teacher.values()) >= 10, (g, teacher)
        assert max(losses(run_dir, g, "train/distill").values()) > 0


def test_three_groups_average_two_teachers_and_measure_the_noise_scale(sample_data, tmp_path):
    run_dir = tmp_path / "three"
    proc = launch([*common(sample_data, run_dir, num_groups=3, max_steps=32), "--noise_scale",
                   "--noise_scale_every", "8"])
    for g in range(3):
        assert losses(run_dir, g, "teacher/num_peers")[32] == 2
        peers = [p for p in range(3) if p != g]
        assert all(losses(run_dir, g, f"teacher/step/group_{p}")[32] == 20 for p in peers)
        noise = losses(run_dir, g, "train/noise_scale")
        assert sorted(noise) == [8, 16, 24, 32] and all(v > 0 for v in noise.values()), noise
        assert f"[group {g}] step 32: batch 512 tokens, noise scale ~" in proc.stdout
    refused = launch([*common(sample_data, tmp_path / "z3"), "--noise_scale", "--ds_config", "ds_configs/zero3.json"],
                     num_ranks=2, check=False)
    assert refused.returncode != 0 and "--noise_scale needs the full parameters" in refused.stdout + refused.stderr


def test_zero3_two_ranks_exports_full_weights_and_trains_alone(sample_data, tmp_path):
    """ZeRO-3 over 2 ranks: exports gather the sharded weights; the peer never exports, so the
    group trains on CE alone and finishes."""
    run_dir = tmp_path / "z3"
    launch(common(sample_data, run_dir, ds_config="ds_configs/zero3.json", group_id=0, max_steps=10,
                  eval_every=10, save_every=10, export_every=5), num_ranks=2)
    from codistill.exports import read_export
    from model import build_model, preset_config
    exp = read_export(run_dir / "group_0" / "exports", 10)
    ref = build_model(preset_config("lstm", "tiny", 2000)).state_dict()
    assert {k: tuple(v.shape) for k, v in exp.state_dict.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert max(losses(run_dir, 0, "train/distill").values()) == 0
    assert (run_dir / "group_0" / "final" / "model.safetensors").is_file()


def test_zero3_world_split_codistills_with_each_groups_full_weights(sample_data, tmp_path):
    """`deepspeed --num_gpus 2 recipes/train_lm.py --ds_config ds_configs/zero3.json --num_groups 2`:
    each group's leader (global rank 0 and rank 1) exports its own group's full weights - equal
    to its final weights and to DeepSpeed's own fp32 reconstruction of the group's checkpoint -
    and the groups distill from each other."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from codistill.exports import read_export
    from model import build_model, preset_config
    run_dir = tmp_path / "z3split"
    out = launch(common(sample_data, run_dir, ds_config="ds_configs/zero3.json", num_groups=2, max_steps=12,
                        export_every=4, burn_in_steps=4, eval_every=12, save_every=12), num_ranks=2).stdout
    assert "this rank: [0], 1 rank(s) each" in out and "ZeRO-3" in out
    ref = {k: tuple(v.shape) for k, v in build_model(preset_config("lstm", "tiny", 2000)).state_dict().items()}
    for g in (0, 1):
        gdir = run_dir / f"group_{g}"
        exp = read_export(gdir / "exports", 12).state_dict
        assert {k: tuple(v.shape) for k, v in exp.items()} == ref
        final = load_file(gdir / "final" / "model.safetensors")
        ds_own = get_fp32_state_dict_from_zero_checkpoint(str(gdir / "checkpoints"), tag="global_step12")
        assert all(torch.equal(exp[k], final[k]) and torch.equal(exp[k], ds_own[k]) for k in ref)
        assert losses(run_dir, g, f"teacher/step/group_{1 - g}")[12] == 4
        assert losses(run_dir, g, "train/distill")[12] > 0
    a, b = (load_file(run_dir / f"group_{g}" / "final" / "model.safetensors") for g in (0, 1))
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_zero1_trains_on_a_group_of_two_ranks(sample_data, tmp_path):
    run_dir = tmp_path / "z1"
    out = launch(common(sample_data, run_dir, ds_config="ds_configs/zero1.json", num_groups=1, max_steps=8,
                        eval_every=8, save_every=8), num_ranks=2).stdout
    assert "ZeRO-1" in out
    loss = losses(run_dir, 0)
    assert len(loss) == 8 and loss[8] < loss[1]


def test_baseline_resume_is_exact_and_reads_all_shards(sample_data, tmp_path):
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    kw = dict(num_groups=1, max_steps=16, eval_every=8, save_every=8, model="transformer")
    launch(common(sample_data, straight, **kw))
    launch(common(sample_data, sliced, stop_after_steps=8, **kw))
    assert (sliced / "group_0" / "checkpoints" / "latest").read_text().strip() == "global_step8"
    assert not (sliced / "summary.json").exists()
    launch(common(sample_data, sliced, **kw))
    a, b = losses(straight, 0), losses(sliced, 0)
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert not (straight / "group_0" / "exports").exists()  # 1 group: the plain baseline, no exchange
    hf = straight / "group_0" / "final" / "hf"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.vocab_size == 2000


def test_bf16_training_falls_and_resumes_exactly(sample_data, tmp_path):
    """bf16 forced on CPU (DeepSpeed supports it there): the GPU's mixed-precision path - ZeRO kept
    for one-rank groups, fp32 gradient accumulation, bf16 teachers with fp32 buffers - trains,
    and a run stopped at step 8 and resumed ends exactly where the uninterrupted one does."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps(cfg))
    kw = dict(ds_config=ds, max_steps=16, export_every=4, burn_in_steps=4, eval_every=8, save_every=8)
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    out = launch(common(sample_data, straight, **kw)).stdout
    assert "| ZeRO-2 |" in out and "bfloat16 on cpu" in out, out
    launch(common(sample_data, sliced, stop_after_steps=8, **kw))
    launch(common(sample_data, sliced, **kw))
    for g in (0, 1):
        a, b = losses(straight, g), losses(sliced, g)
        assert sorted(a) == sorted(b) == list(range(1, 17))
        assert max(abs(a[s] - b[s]) for s in a) < 1e-5
        assert sum(a[s] for s in (1, 2, 3)) / 3 > sum(losses(straight, g, "train/ce")[s] for s in (14, 15, 16)) / 3 + 0.3
        assert losses(straight, g, "train/distill")[16] > 0
        exp = load_file(straight / f"group_{g}" / "exports" / "step_000016.safetensors")
        assert {v.dtype for v in exp.values()} == {torch.bfloat16}


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(main_run, sample_data, tmp_path):
    """Codistillation stopped mid-run as SLURM would (SIGTERM), then --resume auto: the same
    per-step losses and final weights as the uninterrupted main_run."""
    run_dir = tmp_path / "preempted"
    args = common(sample_data, run_dir, save_every=1000)
    proc = subprocess.Popen([PY, str(ROOT / "recipes" / "train_lm.py"), *map(str, args)], cwd=ROOT,
                            env=env_for_runs(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 5/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, "".join(seen) + rest
    assert "checkpoint saved" in rest
    tag = (run_dir / "group_0" / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.removeprefix("global_step"))
    assert 5 <= stopped_at < STEPS
    out = launch(common(sample_data, run_dir, save_every=1000)).stdout
    assert f"resumed from step {stopped_at}" in out
    for g in (0, 1):
        a, b = losses(main_run[0], g), losses(run_dir, g)
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
        assert max(abs(a[s] - b[s]) for s in a) < 1e-5
        wa = load_file(main_run[0] / f"group_{g}" / "final" / "model.safetensors")
        wb = load_file(run_dir / f"group_{g}" / "final" / "model.safetensors")
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_resume_with_another_model_is_refused(main_run, tmp_path):
    run_dir, _ = main_run
    cfg = json.loads((run_dir / "config.json").read_text())
    proc = run_python(["recipes/train_lm.py", *common(cfg["args"]["data"], run_dir, model_size="small")])
    assert proc.returncode == 2 and "another model" in proc.stderr


def test_offline_distillation_from_a_fixed_teacher(main_run, sample_data, tmp_path):
    """The paper's two-phase baseline: one group, no peers, main_run's finished group 0 as the
    only teacher (--teacher); CE alone during burn-in, then CE + distill against it; no exports."""
    teacher_dir = main_run[0] / "group_0"
    run_dir = tmp_path / "offline"
    proc = launch(common(sample_data, run_dir, num_groups=1, max_steps=20, burn_in_steps=5, save_every=100,
                         eval_every=10, teacher=teacher_dir))
    assert "fixed teacher (--teacher)" in proc.stdout and "step 40" in proc.stdout, proc.stdout
    loss, ce, distill = (losses(run_dir, 0, t) for t in ("train/loss", "train/ce", "train/distill"))
    assert len(ce) == 20 and all(distill[s] == 0 for s in range(1, 6)) and all(distill[s] > 0 for s in range(6, 21))
    assert all(loss[s] == pytest.approx(ce[s] + distill[s], rel=1e-5) for s in range(6, 21))  # alpha = 1
    tags = scalar_tags(run_dir / "group_0" / "tb")
    assert "teacher/agreement" in tags and not any(t.startswith("teacher/staleness") for t in tags)
    assert not (run_dir / "group_0" / "exports").exists()
    # a teacher of another architecture: refused before anything is written, naming both
    proc = run_python(["recipes/train_lm.py", *common(sample_data, tmp_path / "bad", num_groups=1, model_size="small",
                                                      teacher=teacher_dir)], timeout=120)
    assert proc.returncode == 2 and "model config differs" in proc.stderr, proc.stderr
    assert not (tmp_path / "bad").exists()


def test_carried_state_training_resumes_exactly_with_its_teacher(main_run, sample_data, tmp_path):
    """--carry_state on a group of 2 ranks with a fixed teacher (main_run's group 0): the LSTM
    state (and the teacher's, over the student's streams) is carried from step to step; a run
    stopped at step 6 and resumed gives the uninterrupted run's losses, because the checkpoint
    holds every rank's carried states (gathered to the leader's client_state)."""
    kw = dict(num_groups=1, max_steps=12, burn_in_steps=3, eval_every=6, save_every=6, warmup_steps=2,
              teacher=main_run[0] / "group_0", eval_state="carried")
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    launch(common(sample_data, straight, **kw) + ["--carry_state"], num_ranks=2)
    launch(common(sample_data, sliced, stop_after_steps=6, **kw) + ["--carry_state"], num_ranks=2)
    out = launch(common(sample_data, sliced, **kw) + ["--carry_state"], num_ranks=2).stdout
    assert "resumed from step 6" in out and "carried LSTM state" not in out, out  # no "starts from zeros" warning
    for tag in ("train/loss", "train/distill", "val/loss"):
        a, b = losses(straight, 0, tag), losses(sliced, 0, tag)
        assert sorted(a) == sorted(b) and max(abs(a[s] - b[s]) for s in a) < 1e-5, tag
    assert losses(straight, 0, "train/distill")[12] > 0
    saved = torch.load(sliced / "group_0" / "checkpoints" / "global_step6" / "mp_rank_00_model_states.pt",
                       weights_only=False)["carry_state"]
    (h0, _), (h1, _) = (r["student"][0] for r in saved["ranks"])
    assert h0.shape == h1.shape == (1, 16, 256) and not torch.equal(h0, h1)  # each rank's own 16 streams
    assert saved["dp_size"] == 2 and saved["streams"] == 32
    assert all(-1 in r["teachers"][0] for r in saved["ranks"])  # the fixed teacher's carried state
