"""Bad flags, configs and data are refused before any compute, with the flag and the fix named.

codistill/flags.py check() and recipes/train_lm.py plan_run() are pure (they write nothing and
start nothing), so every case is checked in-process; one real launch per kind proves the command
line's contract (exit 2, "error: ..." on stderr, nothing written)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import Log, e2e_args, load_script, run_python

from codistill import flags


def train_lm():
    return load_script("train_lm")


@pytest.mark.parametrize("extra,msg", [
    (["--export_every", "50"], "--export_every 50 > --max_steps 40"),
    (["--keep_exports", "0"], "--keep_exports must be >= 1"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    (["--distill_weight", "-1"], "--distill_weight must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--label_smoothing", "1.0"], "--label_smoothing must be in [0, 1)"),
    (["--target_val_loss", "0"], "--target_val_loss must be > 0 nats"),
    (["--teacher_sync", "on", "--group_id", "0"], "--teacher_sync on needs every group"),
    (["--num_groups", "1", "--group_id", "1"], "--group_id 1 is outside 0..0"),
    (["--max_teacher_staleness", "5"], "--max_teacher_staleness 5 < 2 x --export_every"),
    (["--stop_after_steps", "41"], "--stop_after_steps must be in 1..--max_steps"),
    (["--max_bad_steps", "0"], "--max_bad_steps must be >= 1"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--burn_in_steps", "-1"], "--burn_in_steps must be >= 0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--distill_weight", "inf"], "--distill_weight must be a finite number (got inf)"),
    (["--lr", "nan"], "--lr must be a finite number (got nan)"),
    (["--dist_timeout", "0"], "--dist_timeout must be > 0 seconds"),
    (["--loss_chunk_mb", "0"], "--loss_chunk_mb must be auto or a finite number of MiB > 0"),
    (["--loss_chunk_mb", "big"], "--loss_chunk_mb must be auto or a finite number of MiB > 0"),
])
def test_bad_flag_combinations_name_the_flag(sample_data, tmp_path, extra, msg):
    errors, _ = flags.parse_args([*e2e_args(sample_data, tmp_path / "run"), *extra]).check()
    assert any(msg in e for e in errors), errors


def test_flag_warnings_for_runs_that_would_never_distill():
    def warnings(*argv):
        return flags.parse_args(["--max_steps", "100", "--export_every", "10", *argv]).check()[1]

    assert warnings() == []
    assert "sync teachers" in warnings("--export_every", "50")[0]
    assert warnings("--export_every", "50", "--group_id", "0") == []  # latest mode: a teacher from step K on
    assert "--burn_in_steps 100 >= --max_steps 100" in warnings("--burn_in_steps", "100")[0]
    assert warnings("--burn_in_steps", "100", "--distill_weight", "0") == []  # the baseline anyway


@pytest.mark.parametrize("extra,msg", [
    (["--ds_config", "requirements.txt"], "not valid JSON"),
    (["--data", "/nonexistent/data"], "does not exist"),
    (["--num_groups", "4"], "cannot be divided"),
    (["--ds_config", "BAD_BATCH"], "does not equal"),
    (["--data", "BAD_TOKENIZER"], "not a SentencePiece model"),
    (["--resume", "/nonexistent/run"], "not 'auto', 'never' or an existing run directory"),
])
def test_bad_config_or_data_is_refused_by_the_plan(sample_data, tmp_path, extra, msg):
    extra = list(extra)
    if "BAD_BATCH" in extra:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 6}))
        extra[extra.index("BAD_BATCH")] = str(bad)
    if "BAD_TOKENIZER" in extra:
        bad = tmp_path / "data"
        shutil.copytree(sample_data, bad)
        (bad / "tokenizer.model").write_bytes(b"not a model")
        extra[extra.index("BAD_TOKENIZER")] = str(bad)
    tl = train_lm()
    argv = [*e2e_args(sample_data, tmp_path / "run"), *extra]
    with pytest.raises(tl.SETUP_ERRORS, match=msg):
        tl.plan_run(tl.parse_args(argv), Log())
    assert not (tmp_path / "run").exists()  # the plan writes nothing


def test_the_plan_of_a_good_run_writes_nothing(sample_data, tmp_path):
    tl = train_lm()
    p = tl.plan_run(tl.parse_args(e2e_args(sample_data, tmp_path / "run", num_groups=3)), Log())
    assert p.topo.hosted == [0, 1, 2] and p.ds_cfgs[0]["train_batch_size"] == 16 and p.device.type == "cpu"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,msg", [(["--keep_exports", "0"], "--keep_exports must be >= 1"),
                                       (["--group_id", "7"], "outside 0..1"),
                                       (["--num_groups", "4"], "cannot be divided")])
def test_the_command_line_exits_2_and_writes_nothing(sample_data, tmp_path, extra, msg):
    proc = run_python(["recipes/train_lm.py", *e2e_args(sample_data, tmp_path / "run"), *extra], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {msg}" in proc.stderr or (msg in proc.stderr and "error:" in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_target_val_loss_needs_every_hosted_group_at_or_below_it():
    """--target_val_loss finishes the run only when every group has reached it (a NaN has not)."""
    from types import SimpleNamespace

    from codistill.train import target_reached
    groups = lambda *losses: [SimpleNamespace(last_val=(v, 0.0), device=torch.device("cpu")) for v in losses]  # noqa: E731
    assert target_reached(groups(4.0, 4.5), 4.5)
    assert not target_reached(groups(4.0, 4.6), 4.5)
    assert not target_reached(groups(float("nan")), 4.5)


@pytest.mark.parametrize("content,msg", [
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[1, 2]", "must hold a JSON object"),
    (b'{"max_steps": null}', "'max_steps' must be an integer (got null)"),
    (b'{"distill_weight": "heavy"}', "invalid float value"),  # argparse converts string defaults
    (b'{"model": "rnn"}', "'model' must be one of"),
    (b'{"carry_state": "yes"}', "'carry_state' must be true or false"),
    (b'{"optimizer": "AdamW"}', "unknown keys ['optimizer']"),
])
def test_a_bad_config_file_exits_2_naming_it(tmp_path, capsys, content, msg):
    bad = tmp_path / "flags.json"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        flags.parse_args(["--config", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and (str(bad) in err or "distill_weight" in err), err


@pytest.mark.parametrize("content,msg", [
    (b'{"train_micro_batch_size_per_gpu": 4, "optimizer": "AdamW"}',
     "'optimizer' must be a JSON object, e.g. \"optimizer\": {...} (got \"AdamW\")"),
    (b'{"optimizer": {"type": "AdamW", "params": 0.1}}', "optimizer.params must be a JSON object"),
    (b'{"zero_optimisation": {"stage": 2}}', "'zero_optimisation' is not a DeepSpeed config key; "
                                             "did you mean 'zero_optimization'?"),
    (b'{"gradient_acumulation_steps": 2}', "did you mean 'gradient_accumulation_steps'?"),
    (b'{"amp": {"enabled": true}}', "NVIDIA Apex AMP integration has been removed"),
    (b'{"bf16": {"enabled": "auto"}, "_comment": "\xe9t\xe9"}', "is not UTF-8 text (byte 43)"),
    (b"[]", "must hold a JSON object"),
])
def test_a_bad_ds_config_is_refused_naming_the_file(tmp_path, content, msg):
    from codistill.ds_config import ConfigError, load_ds_config
    bad = tmp_path / "ds.json"
    bad.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_ds_config(bad)
    assert msg in str(e.value) and f"--ds_config {bad}" in str(e.value), str(e.value)


def test_every_shipped_config_passes_the_checks():
    from pathlib import Path

    from codistill.ds_config import load_ds_config
    root = Path(__file__).resolve().parents[2]
    configs = sorted((root / "ds_configs").glob("*.json"))
    assert len(configs) == 3
    for f in configs:
        assert "_comment" not in load_ds_config(f) and "zero_optimization" in load_ds_config(f)
    for f in sorted((root / "recipes" / "configs").glob("*.json")):
        assert flags.parse_args(["--config", str(f)]).check()[0] == [], f


def _break_data(sample_data, tmp_path, how):
    import numpy as np
    d = tmp_path / "data"
    shutil.copytree(sample_data, d)
    if how == "id":
        m = np.memmap(d / "group_1.bin", dtype=np.uint16, mode="r+")
        m[77] = 65000
        m.flush()
    elif how == "dir":
        (d / "group_0.bin").unlink()
        (d / "group_0.bin").mkdir()
    return d


@pytest.mark.parametrize("how,extra,msg", [
    ("id", [], r"group_1\.bin \(split group_1\) holds token id 65000 at token offset 77"),
    ("dir", [], r"group_0\.bin \(split group_0\) is not a regular file"),
    (None, ["--seq_len", "1000000"], r"fewer than --seq_len\+1=1000001"),
])
def test_broken_data_is_refused_by_the_plan(sample_data, tmp_path, how, extra, msg):
    """Before deepspeed.init_distributed (today's alternative: a traceback at the first batch)."""
    tl = train_lm()
    data = _break_data(sample_data, tmp_path, how) if how else sample_data
    with pytest.raises(tl.SETUP_ERRORS, match=msg):
        tl.plan_run(tl.parse_args([*e2e_args(data, tmp_path / "run"), *extra]), Log())
    assert not (tmp_path / "run").exists()


def test_the_command_line_exits_2_on_a_ds_config_typo_and_broken_data(sample_data, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW"},
                               "wall_clock_breakdwn": False}))
    proc = run_python(["recipes/train_lm.py", *e2e_args(sample_data, tmp_path / "run"), "--ds_config", bad],
                      timeout=120)
    assert proc.returncode == 2 and "did you mean 'wall_clock_breakdown'?" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_every_flag_is_typed_documented_and_in_one_group():
    """Issue 29 item 2: one dataclass per concern; every flag has help text; the parser, the
    --config keys and config.json's "args" are the same set of names."""
    import dataclasses
    import typing
    names = []
    for _g, cls in flags.GROUPS.items():
        assert cls.__doc__ and cls.title, cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            names.append(f.name)
            assert len(f.metadata["help"]) >= 20, f"--{f.name} has no real help text"
            assert hints[f.name] in (int, float, str, bool, int | None, float | None, str | None), f.name
    assert len(names) == len(set(names))
    parser = flags.build_parser()
    dests = {a.dest for a in parser._actions} - {"help"}
    assert dests == set(names)
    assert set(flags.parse_args([]).as_dict()) == set(names)
    assert all(a.help for a in parser._actions if a.dest != "local_rank")


def test_docs_flags_md_is_generated_from_the_dataclasses():
    """docs/flags.md's tables are current: regenerate with `python -m codistill.flags --write-docs`."""
    current = flags.DOCS.read_text()
    assert flags.render_docs(current) == current, "docs/flags.md is stale: run python -m codistill.flags --write-docs"
    for _g, cls in flags.GROUPS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata["hidden"] or f"`--{f.name}`" in current, f.name


def test_components_receive_their_own_flag_group():
    """No component reads the whole namespace with getattr(args, ...): the Checkpointer gets
    CheckpointFlags, the Exchange its exchange/teacher groups (typed attribute access)."""
    import inspect

    from codistill.checkpoint import Checkpointer
    root = flags.ROOT
    for f in [*(root / "codistill").glob("*.py"), root / "recipes" / "train_lm.py"]:
        assert "getattr(args" not in f.read_text(), f
    assert inspect.signature(Checkpointer).parameters["flags"].annotation == "CheckpointFlags"
