"""--peer_use average|diloco (LocalSGD, DiLoCo) wired into the trainer (docs/averaging.md): the
flag refusals (in-process, through plan_run: nothing is written), and real one-launch runs with
two groups in one process."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import e2e_args, launch, load_script, read_scalars
from safetensors.torch import load_file

from codistill.averaging import average
from codistill.exports import export_name


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, msg, force=False):
        self.lines.append(msg)

    error = warning = __call__


@pytest.mark.parametrize("extra,msg", [
    (["--peer_use", "average", "--num_groups", "1"], r"--peer_use average needs --num_groups >= 2 \(got 1\)"),
    (["--peer_use", "diloco", "--group_id", "1"], r"--peer_use diloco with --group_id 1 \(one launch per group\) "
                                                  r"is not wired yet"),
    (["--peer_use", "average", "--teacher", "TEACHER"], r"--peer_use average refuses --teacher \S+"),
    (["--peer_use", "diloco", "--teacher_topk", "8"], r"--peer_use diloco refuses --teacher_topk 8"),
    (["--peer_use", "diloco", "--teacher_offload", "cpu"], r"refuses --teacher_offload cpu"),
    (["--peer_use", "average", "--temperature", "2"], r"refuses --temperature 2.0"),
    (["--peer_use", "diloco", "--outer_lr", "0"], r"--outer_lr must be > 0 \(got 0.0\)"),
    (["--peer_use", "diloco", "--outer_momentum", "1"], r"--outer_momentum must be in \[0, 1\) \(got 1.0\)"),
])
def test_averaging_flags_are_refused_by_the_plan(sample_data, tmp_path, extra, msg):
    tl = load_script("train_lm")
    extra = [str(tmp_path) if x == "TEACHER" else x for x in extra]
    with pytest.raises(tl.SETUP_ERRORS, match=msg):
        tl.plan_run(tl.parse_args([*e2e_args(sample_data, tmp_path / "run"), *extra]), Log())
    assert not (tmp_path / "run").exists()


def test_averaging_flags_plan(sample_data, tmp_path):
    tl = load_script("train_lm")
    cfg = tl.parse_args(e2e_args(sample_data, tmp_path / "run", peer_use="diloco"))
    p = tl.plan_run(cfg, Log())
    assert p.topo.hosted == [0, 1] and cfg.exchange.averaging and not cfg.codistill
    assert (cfg.exchange.outer_lr, cfg.exchange.outer_momentum) == (0.7, 0.9)
    assert not tl.parse_args(e2e_args(sample_data, tmp_path / "run")).exchange.averaging  # distill by default
    assert not (tmp_path / "run").exists()


def _final(run_dir, g):
    return load_file(run_dir / f"group_{g}" / "final" / "model.safetensors")


def _export(run_dir, g, step):
    return load_file(run_dir / f"group_{g}" / "exports" / f"{export_name(step)}.safetensors")


def test_average_sets_every_group_to_the_mean(sample_data, tmp_path):
    """One process hosting 2 groups, --peer_use average, K = 10, 20 steps: step 20 is an exchange
    step, so both groups' final weights are the fp32 mean of their exports of step 20 (taken just
    before the average), bit for bit, and equal; between exchange steps the groups differ."""
    run = tmp_path / "avg"
    proc = launch(e2e_args(sample_data, run, max_steps=20, peer_use="average"))
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
    assert sorted(written) == [10, 20] and written[20] == summary["exchange_bytes"]["written"]
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
