"""--peer_use average|diloco (LocalSGD, DiLoCo) wired into the trainer (docs/averaging.md): real
launches with two groups in one launch (one process, or the world split), and the exchange's
byte counts of every method. The flag refusals: tests/unit/test_peer_use_flags.py."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, e2e_args, launch, read_scalars
from safetensors.torch import load_file

from codistill.averaging import average
from codistill.exports import export_name


def _final(run_dir, g):
    return load_file(run_dir / f"group_{g}" / "final" / "model.safetensors")


def _export(run_dir, g, step):
    return load_file(run_dir / f"group_{g}" / "exports" / f"{export_name(step)}.safetensors")


@pytest.mark.parametrize("ranks", [1, 2])
def test_average_sets_every_group_to_the_mean(sample_data, tmp_path, ranks):
    """--peer_use average, K = 10, 20 steps, 2 groups in one launch: one process hosting both
    (ranks 1: the engines are read directly) or the world split (ranks 2, one group per rank: an
    all_gather over the world). Step 20 is an exchange step, so both groups' final weights are the
    fp32 mean of their exports of step 20 (taken just before the average), bit for bit, and equal;
    between exchange steps the groups differ."""
    run = tmp_path / "avg"
    proc = launch(e2e_args(sample_data, run, max_steps=20, peer_use="average"), num_ranks=ranks)
    assert "--peer_use average every 10 steps" in proc.stdout
    a, b = _final(run, 0), _final(run, 1)
    e0, e1 = _export(run, 0, 20), _export(run, 1, 20)
    assert set(a) == set(e0) and any(not torch.equal(e0[k], e1[k]) for k in e0)  # trained apart in the round
    mean = average([e0, e1])
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], mean[k]), k
    # the exports of step 10 differ too (each group trained on its own shard since the common start)
    assert any(not torch.equal(x, y) for x, y in zip(_export(run, 0, 10).values(), _export(run, 1, 10).values()))
    summary = json.loads((run / "group_0" / "summary.json").read_text())
    size = sum((run / "group_0" / "exports" / f"{export_name(20)}{s}").stat().st_size for s in (".safetensors", ".json"))
    assert summary["peer_use"] == "average" and summary["averaging_rounds"] == 2
    assert summary["exchange_bytes"]["written"] > size  # two exports of about that size
    assert summary["exchange_bytes"]["read"] > size
    written = read_scalars(run / "group_0" / "tb", "exchange/bytes_written")
    assert sorted(written) == [10, 20] and written[20] == pytest.approx(summary["exchange_bytes"]["written"], rel=1e-6)
    assert read_scalars(run / "group_1" / "tb", "exchange/bytes_read")[20] > size
    equiv = read_scalars(run / "group_0" / "tb", "exchange/allreduce_equiv_bytes")
    assert list(equiv) == [0] and equiv[0] == summary["exchange_bytes"]["allreduce_equiv_bytes_per_step"] \
        == 2 * (2 - 1) / 2 * summary["num_params"] * 4  # fp32 gradients over 2 ranks


def test_diloco_resume_is_exact(sample_data, tmp_path):
    """--peer_use diloco, K = 10, 25 steps: uninterrupted vs stopped after step 15 (mid-round: the
    round's start and the outer momentum come from the checkpoint) and resumed: bit-identical
    final weights in both groups."""
    kw = dict(max_steps=25, peer_use="diloco")
    full = tmp_path / "full"
    launch(e2e_args(sample_data, full, **kw))
    sliced = tmp_path / "sliced"
    proc = launch(e2e_args(sample_data, sliced, stop_after_steps=15, **kw))
    assert "--stop_after_steps 15: checkpoint saved" in proc.stdout
    assert not (sliced / "group_0" / "final").exists()
    proc = launch(e2e_args(sample_data, sliced, resume="auto", **kw))
    assert "resumed from step 15" in proc.stdout
    for g in (0, 1):
        a, b = _final(full, g), _final(sliced, g)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (g, k)
    # step 25 is 5 steps into a round: the groups have moved apart from the common outer result
    assert any(not torch.equal(x, y) for x, y in zip(_final(full, 0).values(), _final(full, 1).values()))
    s = json.loads((full / "group_1" / "summary.json").read_text())
    r = json.loads((sliced / "group_1" / "summary.json").read_text())
    # the totals resume too (the exports' metadata may differ by a few bytes: a resumed run's own fields)
    assert abs(s["exchange_bytes"]["written"] - r["exchange_bytes"]["written"]) < 64
    assert r["exchange_bytes"]["written"] > 2 * 4 * r["num_params"]  # two fp32 exports (steps 10, 20)
    assert s["val_loss"] == r["val_loss"]


def test_distill_counts_the_bytes_of_its_exports_and_teachers(main_run):
    """--peer_use distill (the default, the main command): bytes written are its exports, bytes read
    the teachers' exports it swapped in (sync teachers: the peer's export of step s - K at s)."""
    run_dir, stdout = main_run
    assert "codistillation on (sync teachers" in stdout
    for g in (0, 1):
        summary = json.loads((run_dir / f"group_{g}" / "summary.json").read_text())
        assert summary["peer_use"] == "distill" and summary["averaging_rounds"] == 0
        b = summary["exchange_bytes"]
        exports = len(list((run_dir / f"group_{g}" / "exports").glob("*.safetensors")))
        assert b["written"] > exports * 4 * summary["num_params"] > 0
        assert 0 < b["read"] < b["written"]  # teachers start at 2K: fewer swapped in than written
        written = read_scalars(run_dir / f"group_{g}" / "tb", "exchange/bytes_written")
        assert max(written) == 40 and written[40] == pytest.approx(b["written"], rel=1e-6)  # TensorBoard: float32
        assert max(read_scalars(run_dir / f"group_{g}" / "tb", "exchange/bytes_read").values()) == pytest.approx(b["read"], rel=1e-6)


def test_a_group_with_non_finite_weights_is_never_averaged_in(sample_data, tmp_path, monkeypatch):
    """A group's weights turn NaN before the exchange step 20 (injected): the run stops with exit 3
    naming the group instead of spreading NaN to every group; the checkpoint of step 10 (the last
    one, --save_every 10) is intact and no final/ is written."""
    from codistill import faults
    monkeypatch.setenv(faults.ENV, "nan_weights@20")
    run = tmp_path / "nan"
    proc = launch(e2e_args(sample_data, run, max_steps=30, save_every=10, peer_use="average"), check=False)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "step 20: group 0's weights are not finite" in out and "stops without averaging" in out
    for g in (0, 1):
        assert not (run / f"group_{g}" / "final").exists()
        assert (run / f"group_{g}" / "checkpoints" / "latest").read_text().strip().endswith("10")


def test_separate_launches_per_group_run_diloco_like_one_launch(sample_data, tmp_path):
    """--group_id 0 and --group_id 1 in two launches on one run_dir, --peer_use diloco, K = 10, 20
    steps: each waits for the other's export of every exchange step and takes the same outer step,
    so both end with the same weights - bit for bit those of one launch hosting both groups (the
    same initialisation, data and outer steps; the tiny LSTM has no dropout)."""
    kw = dict(max_steps=20, peer_use="diloco", teacher_timeout=300, poll_interval=0.2)
    run = tmp_path / "separate"
    procs = [launch(e2e_args(sample_data, run, group_id=g, **kw), background=True) for g in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for g in (0, 1):
        assert f"[group {g}] step 20: --peer_use diloco over groups [0, 1]" in outs[g]
        summary = json.loads((run / f"group_{g}" / "summary.json").read_text())
        assert summary["exchange_bytes"]["read"] > 2 * 4 * summary["num_params"]  # the peer's 2 exports
    one = tmp_path / "one"
    launch(e2e_args(sample_data, one, **kw))
    a, b, c = _final(run, 0), _final(run, 1), _final(one, 0)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k


def test_a_separate_launch_averages_the_groups_present(sample_data, tmp_path):
    """--group_id 0 alone (its peer never starts), --peer_use average, bf16: each exchange step waits
    --teacher_timeout, warns that group 1's export did not arrive and averages over group 0 alone
    (its own weights): the run finishes. What it exports for the peers to average is its fp32
    masters, not the bf16 module (whose weights are those masters rounded)."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps(cfg))
    run = tmp_path / "alone"
    proc = launch(e2e_args(sample_data, run, group_id=0, max_steps=10, peer_use="average", teacher_timeout=1,
                           poll_interval=0.2, ds_config=ds))
    assert "group 1's export of step 10 did not arrive within --teacher_timeout 1 s" in proc.stdout
    assert "[group 0] step 10: --peer_use average over groups [0]" in proc.stdout
    final, export = _final(run, 0), _export(run, 0, 10)
    assert {v.dtype for v in export.values()} == {torch.float32}
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in export.values())  # not bf16 values
    for k, v in final.items():
        assert torch.equal(v.float(), export[k].to(v.dtype).float()), k


def test_a_separate_launch_of_two_ranks_gives_its_ranks_the_leaders_weights(sample_data, tmp_path):
    """--group_id 0 on 2 ranks under ZeRO-3 (each rank holds half of every parameter) and --group_id 1
    on 1 rank, --peer_use diloco, K = 10, 20 steps: group 0's leader reads both exports and sends the
    weights to its rank 1 by tensor broadcasts (Exchange._share). Both groups take the same outer
    steps, so both end with the same weights bit for bit: group 0's final model is gathered from
    both ranks' partitions, so a rank 1 that averaged anything else would show."""
    kw = dict(max_steps=20, peer_use="diloco", teacher_timeout=300, poll_interval=0.2)
    run = tmp_path / "run"
    procs = [launch(e2e_args(sample_data, run, group_id=0, ds_config="ds_configs/zero3.json", **kw), num_ranks=2,
                    background=True),
             launch(e2e_args(sample_data, run, group_id=1, **kw), background=True)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for g in (0, 1):
        assert f"[group {g}] step 20: --peer_use diloco over groups [0, 1]" in outs[g]
    a, b = _final(run, 0), _final(run, 1)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
