"""codistill/averaging.py (issue 30 items 1, 2, 5: the core of LocalSGD and DiLoCo, not yet
wired into the trainer): the outer step against torch.optim.SGD(nesterov=True), its exact resume,
the peer filter and the bytes formulas on CPU; the masters read and written on real 2-rank
DeepSpeed engines (ZeRO-2 and ZeRO-3, bf16) by tests/scripts/averaging_check.py."""
from __future__ import annotations

import io
import json
import subprocess

import pytest
import torch
from conftest import ROOT, env_for_runs, ranks_command

from codistill import averaging
from codistill.exports import write_export
from fileio import ExportError


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}


def test_average_is_the_fp32_mean_in_group_order():
    ws = [_weights(i) for i in range(3)]
    mean = averaging.average(ws)
    for k in ws[0]:
        assert torch.equal(mean[k], (ws[0][k] + ws[1][k] + ws[2][k]) / 3)


def test_the_outer_step_is_torch_nesterov_sgd_and_resumes_exactly():
    start = _weights(0)
    outer = averaging.OuterOptimizer(lr=0.7, momentum=0.9)
    outer.begin(start)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    sgd = torch.optim.SGD(list(ref.values()), lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    rounds = [[_weights(10 + 2 * r), _weights(11 + 2 * r)] for r in range(3)]
    for r, present in enumerate(rounds):
        if r == 1:  # resume mid-run from the state as DeepSpeed's client_state holds it (weights-only)
            buf = io.BytesIO()
            torch.save(outer.state_dict(), buf)
            outer = averaging.OuterOptimizer(lr=0.7, momentum=0.9)
            outer.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        new = outer.step(present)
        mean = averaging.average(present)
        for k, p in ref.items():
            p.grad = p.detach() - mean[k]
        sgd.step()
        for k in start:
            assert torch.equal(new[k], ref[k].detach()), (r, k)
    with pytest.raises(ValueError, match="lr must be > 0"):
        averaging.OuterOptimizer(lr=0)
    with pytest.raises(ValueError, match="incomplete"):
        averaging.OuterOptimizer().load_state_dict({"start": {}})


def test_the_ring_all_reduce_bytes():
    assert averaging.allreduce_bytes(1000, 1, 2) == 0
    assert averaging.allreduce_bytes(1000, 4, 2) == 2 * 3 / 4 * 1000 * 2
    assert averaging.allreduce_bytes(1000, 4, 2, zero_stage=3) == 3 * 3 / 4 * 1000 * 2
    with pytest.raises(ValueError):
        averaging.allreduce_bytes(1000, 0, 2)


def test_only_peer_exports_that_pass_the_checks_are_averaged(tmp_path):
    own, good, bad = _weights(0), _weights(1), _weights(2)
    meta = {"model_config_hash": "cfg", "tokenizer_sha256": "tok", "tokens_seen": 10}
    dirs = {}
    for peer, w, cfg in ((1, good, "cfg"), (2, bad, "another model")):  # 2: another model's export
        dirs[peer] = tmp_path / f"group_{peer}" / "exports"
        write_export(dirs[peer], 5, w, dict(meta, group=peer, model_config_hash=cfg))
    dirs[3] = tmp_path / "group_3" / "exports"  # never exported: absent
    expect = {k: (tuple(v.shape), v.dtype) for k, v in own.items()}
    logged = []
    present, groups, refused = averaging.gather_present(own, 0, dirs, 5, "cfg", "tok", expect, log=logged.append)
    assert groups == [0, 1] and set(refused) == {2, 3}, refused
    assert torch.equal(present[1]["a"], good["a"]) and len(logged) == 2
    with pytest.raises(ExportError, match="peer group 1"):
        averaging.read_peer(dirs[1], 1, 5, "another-config", "tok", expect, list(own))
    assert averaging.export_bytes(dirs[1], 5) > sum(v.numel() * 4 for v in good.values())


def test_masters_are_averaged_and_stepped_exactly_on_2_rank_engines(tmp_path):
    """ZeRO-2 and ZeRO-3 (masters partitioned over 2 ranks, a padded last partition), bf16:
    the module equals the masters, the average is (a + b) / 2 bit for bit, Adam state unchanged,
    DiLoCo rounds equal torch's Nesterov SGD and resume bit-identically (the script's docstring)."""
    cmd = [*ranks_command(2), str(ROOT / "tests/scripts/averaging_check.py"), "--out", str(tmp_path), "--cases", "zero2_bf16",
           "zero3_bf16"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for_runs(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        cases = json.loads((tmp_path / f"rank_{rank}.json").read_text())["cases"]
        assert set(cases) == {"zero2_bf16", "zero3_bf16"} and all(v == [] for v in cases.values()), cases
