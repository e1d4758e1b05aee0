"""Group topology and the deterministic training stream."""
import numpy as np
import pytest

from codistill.data import DataError, GroupStream, TokenData, eval_batches
from codistill.topology import TopologyError, plan


def test_world_split_consecutive_ranks():
    topos = [plan(4, r, 2) for r in range(4)]
    assert [t.hosted for t in topos] == [[0], [0], [1], [1]]
    assert topos[0].group_ranks == {0: [0, 1], 1: [2, 3]}
    assert [t.dp_rank(t.hosted[0]) for t in topos] == [0, 1, 0, 1]
    assert topos[2].is_group_leader(1) and not topos[3].is_group_leader(1)


def test_several_groups_per_rank():
    assert plan(1, 0, 2).hosted == [0, 1]
    assert [plan(2, r, 4).hosted for r in range(2)] == [[0, 1], [2, 3]]
    t = plan(2, 1, 4)
    assert t.dp_size(2) == 1 and t.peers(2) == [0, 1, 3]


def test_one_launch_per_group():
    t = plan(2, 1, 3, group_id=2)
    assert t.hosted == [2] and t.group_ranks == {2: [0, 1]} and t.separate_launch
    assert t.peers(2) == [0, 1]


@pytest.mark.parametrize("world,groups,gid,msg", [(3, 2, None, "equal groups"), (2, 3, None, "evenly"),
                                                  (1, 2, 2, "outside"), (1, 0, None, ">= 1")])
def test_invalid_topologies(world, groups, gid, msg):
    with pytest.raises(TopologyError, match=msg):
        plan(world, 0, groups, gid)


def test_stream_is_deterministic_disjoint_across_ranks_and_one_pass(sample_data):
    data = TokenData(sample_data)
    s = GroupStream(data, 0, 2, seq_len=32, seed=7)
    a = s.batch(5, 1, 2, 0, 2, 4)
    assert np.array_equal(a, GroupStream(data, 0, 2, 32, 7).batch(5, 1, 2, 0, 2, 4))  # resume: same batch
    other_rank = s.batch(5, 1, 2, 1, 2, 4)
    assert not any(np.array_equal(x, y) for x in a for y in other_rank)
    # one epoch visits every window exactly once before anything repeats
    starts = {int(s._perm(0)[i]) for i in range(s.num_windows)}
    assert starts == set(range(s.num_windows))
    assert a.shape == (4, 33)


def test_groups_read_disjoint_shards_and_baseline_reads_all(sample_data):
    data = TokenData(sample_data)
    assert data.group_shards(0, 2) == ["group_0", "group_1", "group_2"]
    assert data.group_shards(1, 2) == ["group_3", "group_4", "group_5"]
    assert data.group_shards(0, 1) == [f"group_{i}" for i in range(6)]
    total = sum(data.splits[f"group_{i}"]["num_tokens"] for i in range(6))
    assert len(GroupStream(data, 0, 1, 32, 0).tokens) == total
    with pytest.raises(DataError, match="--num_groups 4"):
        data.group_shards(0, 4)


def test_shared_data_split_gives_every_group_all_data_in_its_own_order(sample_data):
    data = TokenData(sample_data)
    g0, g1 = (GroupStream(data, g, 2, 32, 0, shared=True) for g in (0, 1))
    assert np.array_equal(g0.tokens, GroupStream(data, 0, 1, 32, 0).tokens) and np.array_equal(g0.tokens, g1.tokens)
    assert not np.array_equal(g0.batch(0, 0, 1, 0, 1, 8), g1.batch(0, 0, 1, 0, 1, 8))  # own order per group
    with pytest.raises(DataError, match="--num_groups 4"):
        GroupStream(data, 0, 4, 32, 0, shared=True)


def test_eval_batches_fixed_and_split_over_ranks(sample_data):
    data = TokenData(sample_data)
    one = eval_batches(data, 32, 4, 3, 0, 1)
    r0, r1 = eval_batches(data, 32, 4, 3, 0, 2), eval_batches(data, 32, 4, 3, 1, 2)
    assert sum(len(b) for b in one) == 12 and sum(len(b) for b in r0 + r1) == 24
    assert np.array_equal(one[0], eval_batches(data, 32, 4, 3, 0, 1)[0])


def test_data_errors_are_clear(tmp_path, sample_data):
    with pytest.raises(DataError, match="does not exist"):
        TokenData(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json is missing"):
        TokenData(tmp_path / "empty")
    with pytest.raises(DataError, match="seq_len"):
        GroupStream(TokenData(sample_data), 0, 6, seq_len=10 ** 7, seed=0)


def test_recipe_config_files_parse_and_command_line_wins():
    from pathlib import Path

    from codistill import flags
    root = Path(__file__).resolve().parents[2] / "recipes" / "configs"
    files = sorted(root.glob("*.json"))
    assert files
    for f in files:
        args = flags.parse_args(["--config", str(f)])
        assert args.model.model in ("lstm", "transformer")
    args = flags.parse_args(["--config", str(root / "lstm_paper.json"), "--max_steps", "7"])
    assert args.model.model_size == "paper" and args.training.max_steps == 7


def _copy(sample_data, tmp_path):
    import shutil
    d = tmp_path / "data"
    shutil.copytree(sample_data, d)
    return d, TokenData(d)


def test_token_ids_beyond_the_vocab_are_refused_naming_shard_and_offset(sample_data, tmp_path):
    """Found before any compute by a chunked max over the memmap (without it, the embedding's
    index error at the first window that draws the bad id)."""
    d, data = _copy(sample_data, tmp_path)
    data.check_run([1], 2, seq_len=32)  # a good dataset passes
    toks = np.memmap(d / "group_4.bin", dtype=data.dtype, mode="r+")
    toks[1234] = data.vocab_size  # one id out of range, in a shard group 1 reads
    toks.flush()
    del toks
    data.check_run([0], 2, seq_len=32)  # group 0 never reads group_4
    for chunk in (7, 1 << 24):  # found in any chunk
        with pytest.raises(DataError, match=rf"group_4\.bin \(split group_4\) holds token id {data.vocab_size} at "
                                            r"token offset 1234 .*vocab_size=2000"):
            data.check_ids("group_4", chunk=chunk)
    with pytest.raises(DataError, match="group_4.bin"):
        data.check_run([1], 2, seq_len=32)
    with pytest.raises(DataError, match="group_4.bin"):
        data.check_run([0], 2, seq_len=32, shared=True)  # shared: every group reads every shard


def test_broken_split_files_name_the_file(sample_data, tmp_path):
    d, data = _copy(sample_data, tmp_path)
    with open(d / "group_2.bin", "r+b") as f:  # truncated to an odd byte count
        f.truncate(f.seek(0, 2) - 1)
    with pytest.raises(DataError, match=r"group_2\.bin \(split group_2\) has \d+ bytes.*truncated"):
        data.tokens("group_2")
    with open(d / "group_3.bin", "r+b") as f:  # truncated by whole tokens: the manifest's count tells
        f.truncate(f.seek(0, 2) - 2)
    with pytest.raises(DataError, match=r"group_3\.bin .*truncated"):
        data.tokens("group_3")
    (d / "val.bin").unlink()
    (d / "val.bin").mkdir()
    with pytest.raises(DataError, match=r"val\.bin \(split val\) is not a regular file"):
        data.check_run([5], 6, seq_len=32)  # group 5's shard is fine; val is read by every group


def test_seq_len_longer_than_a_split_is_found_at_plan_time(sample_data):
    data = TokenData(sample_data)
    val = data.splits["val"]["num_tokens"]
    smallest = min(sum(data.splits[s]["num_tokens"] for s in data.group_shards(g, 2)) for g in (0, 1))
    assert val < smallest  # the val split is the shortest: a seq_len between them fails on val only
    with pytest.raises(DataError, match=rf"the val split of .* has {val} tokens, fewer than --seq_len\+1"):
        data.check_run([0, 1], 2, seq_len=val)
    with pytest.raises(DataError, match=r"group 1's shard has \d+ tokens, fewer than --seq_len\+1"):
        data.check_run([1], 2, seq_len=10 ** 8)
