"""The GPU tier: `pytest -m gpu` on a node with CUDA (skipped, with the reason, elsewhere).

What CPU tests cannot show: NCCL collectives on device tensors, bf16 "auto" switching on,
cuDNN LSTMs and bf16 teachers, the CUDA RNG in checkpoints, ZeRO-3 gathering on GPUs. Each run
is the real trainer under the real deepspeed launcher, 2 groups in one process on one GPU
(the main command's mapping), and a 2-rank world split where a second GPU exists.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import e2e_args, launch, read_scalars
from test_device_comm import run_teacher_parity

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run `pytest -m gpu` on a GPU node")]


def losses(run_dir, g, tag="train/loss"):
    return read_scalars(run_dir / f"group_{g}" / "tb", tag)


def native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@pytest.mark.parametrize("ds_config,model", [("zero2", "lstm"), ("zero2", "transformer"),
                                             ("zero3", "lstm"), ("zero3", "transformer")])
def test_two_groups_on_one_gpu_codistill_in_bf16(sample_data, tmp_path, ds_config, model):
    run_dir = tmp_path / f"{ds_config}_{model}"
    out = launch(e2e_args(sample_data, run_dir, ds_config=f"ds_configs/{ds_config}.json", model=model), gpu=True).stdout
    dtype = "bfloat16" if native_bf16() else "float32"
    assert f"{dtype} on cuda" in out, out
    for g in (0, 1):
        loss, ce = losses(run_dir, g), losses(run_dir, g, "train/ce")
        assert sum(loss[s] for s in range(1, 6)) / 5 > sum(ce[s] for s in range(36, 41)) / 5 + 0.3
        assert losses(run_dir, g, "train/distill")[40] > 0
        exp = load_file(run_dir / f"group_{g}" / "exports" / "step_000040.safetensors")
        assert {v.dtype for v in exp.values()} == {getattr(torch, dtype)}
        s = json.loads((run_dir / f"group_{g}" / "summary.json").read_text())
        assert s["peak_memory_of"].startswith("cuda") and s["peak_memory_bytes"] > 0


def test_resume_on_gpu_is_exact_and_checkpoints_the_cuda_rng(sample_data, tmp_path):
    """Dropout on (transformer tiny + --dropout 0.1) so that the CUDA generator matters."""
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    kw = dict(model="transformer", dropout=0.1, max_steps=16, export_every=4, burn_in_steps=4, eval_every=8,
              save_every=8)
    launch(e2e_args(sample_data, straight, **kw), gpu=True)
    launch(e2e_args(sample_data, sliced, stop_after_steps=8, **kw), gpu=True)
    state = torch.load(sliced / "group_0" / "checkpoints" / "global_step8" / "mp_rank_00_model_states.pt",
                       weights_only=False)  # our own checkpoint
    assert state["cuda_rng"].dtype == torch.uint8 and state["torch_rng"].dtype == torch.uint8
    launch(e2e_args(sample_data, sliced, **kw), gpu=True)
    for g in (0, 1):
        a, b = losses(straight, g), losses(sliced, g)
        assert sorted(a) == sorted(b) == list(range(1, 17))
        # cuDNN/atomics may reorder float sums: close, not bitwise (README: what stays nondeterministic)
        assert max(abs(a[s] - b[s]) for s in a) < 2e-3


def test_teacher_from_an_export_gives_the_students_logits_on_gpu(tmp_path):
    res = run_teacher_parity(tmp_path, "cuda", native_bf16())
    for arch, r in res.items():
        assert r["max_abs_diff"] <= 2 ** -7 * r["logit_scale"], (arch, r)
    assert res["transformer"]["buffer_dtypes"] == ["torch.float32"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_world_split_over_two_gpus_with_nccl(sample_data, tmp_path, ds_config):
    run_dir = tmp_path / ds_config
    out = launch(e2e_args(sample_data, run_dir, ds_config=f"ds_configs/{ds_config}.json"), num_ranks=2, gpu=True).stdout
    assert "this rank: [0], 1 rank(s) each" in out
    for g in (0, 1):
        assert losses(run_dir, g, f"teacher/step/group_{1 - g}")[40] == 20
        assert (run_dir / f"group_{g}" / "final" / "model.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_one_group_of_two_gpus_follows_its_leaders_latest_teachers(sample_data, tmp_path):
    """--group_id launches (latest teachers): group 0 on 2 GPUs; only its leader reads exports and
    the weights reach rank 1 by an NCCL broadcast."""
    run_dir = tmp_path / "latest"
    procs = [launch(e2e_args(sample_data, run_dir, group_id=0, poll_interval=0.2, max_steps=50), num_ranks=2,
                    background=True, gpu=True),
             launch(e2e_args(sample_data, run_dir, group_id=1, poll_interval=0.2, max_steps=50), background=True,
                    gpu=True)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert max(losses(run_dir, 0, "teacher/step/group_1").values()) >= 20
