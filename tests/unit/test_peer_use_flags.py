"""--peer_use average|diloco's flag refusals, in-process through plan_run (nothing is written):
the runs themselves are tested by tests/e2e/test_peer_use.py."""
from __future__ import annotations

import pytest
from conftest import Log, e2e_args, load_script


@pytest.mark.parametrize("extra,msg", [
    (["--peer_use", "average", "--num_groups", "1"], r"--peer_use average needs --num_groups >= 2 \(got 1\)"),
    (["--peer_use", "average", "--teacher", "TEACHER"], r"--peer_use average refuses --teacher \S+"),
    (["--peer_use", "diloco", "--teacher_topk", "8"], r"--peer_use diloco refuses --teacher_topk 8"),
    (["--peer_use", "diloco", "--teacher_offload", "cpu"], r"refuses --teacher_offload cpu"),
    (["--peer_use", "average", "--temperature", "2"], r"refuses --temperature 2.0"),
    (["--peer_use", "diloco", "--outer_lr", "0"], r"--outer_lr must be > 0 \(got 0.0\)"),
    (["--peer_use", "diloco", "--outer_momentum", "1"], r"--outer_momentum must be in \[0, 1\) \(got 1.0\)"),
    (["--peer_use", "average", "--peer_models", "any"], r"--peer_use average refuses --peer_models any: averaging"),
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


def test_peer_models_any_in_one_launch_of_every_group_is_warned_useless(sample_data, tmp_path):
    tl = load_script("train_lm")
    log = Log()
    tl.plan_run(tl.parse_args([*e2e_args(sample_data, tmp_path / "run"), "--peer_models", "any"]), log)
    assert any("--peer_models any: every group of this launch trains this launch's model" in m for m in log.lines)
    log = Log()
    tl.plan_run(tl.parse_args([*e2e_args(sample_data, tmp_path / "run", group_id=0), "--peer_models", "any"]), log)
    assert not any("--peer_models any" in m for m in log.lines)


@pytest.mark.parametrize("extra,world,refused", [
    (["--teacher_timeout", "600"], 2, "a sync teacher's swap"),                     # the old default: equal
    (["--group_id", "0", "--peer_use", "diloco", "--teacher_timeout", "900"], 2, "--peer_use diloco with --group_id"),
    (["--group_id", "0", "--teacher_timeout", "900"], 2, None),  # latest teachers: the leader never waits
    (["--teacher_timeout", "900"], 1, None),                     # one rank: no collective waits with it
    (["--teacher_timeout", "900", "--dist_timeout", "1200"], 2, None),
    ([], 2, None),                                               # the defaults: 300 s < 600 s
])
def test_a_leaders_wait_must_end_before_its_ranks_collective_times_out(sample_data, tmp_path, monkeypatch, extra,
                                                                        world, refused):
    """While a group's leader waits up to --teacher_timeout for a peer's export, the launch's other
    ranks wait in a collective: with --teacher_timeout >= --dist_timeout they would time out (and
    stop the run) before the leader gives up on the peer, so the plan refuses it, naming both flags."""
    tl = load_script("train_lm")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    cfg = tl.parse_args([*e2e_args(sample_data, tmp_path / "run"), *extra])
    if refused:
        with pytest.raises(tl.SETUP_ERRORS, match=r"--teacher_timeout \d+ s must be below --dist_timeout 600 s in "
                                                   rf"a launch of 2 ranks: while a group's leader waits for a "
                                                   rf"peer's export \({refused}\)"):
            tl.plan_run(cfg, Log())
    else:
        tl.plan_run(cfg, Log())
    assert not (tmp_path / "run").exists()
