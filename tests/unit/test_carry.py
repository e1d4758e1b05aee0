"""Carried LSTM state (--carry_state, --eval_state carried; model/lstm.py CarriedState): the
streams partition a group's shard, a carried state continues a sequence exactly, and teachers
carry theirs until a swap."""
import numpy as np
import pytest
import torch

from codistill.data import DataError, GroupStream, TokenData, eval_batches, eval_streams
from codistill.teachers.pool import TeacherPool
from model import build_model, preset_config
from model.lstm import CarriedState


def lstm(vocab=50, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(preset_config("lstm", "tiny", vocab, n_layers=2, **kw)).eval()


def test_a_carried_state_continues_the_sequence_exactly():
    model = lstm()
    x = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        whole = model(x)
        st = CarriedState()
        parts = torch.cat([model(x[:, i:i + 7], state=st) for i in range(0, 40, 7)], dim=1)
        fresh = model(x[:, 7:14])
    assert torch.allclose(parts, whole, atol=1e-5)
    assert not torch.allclose(fresh, whole[:, 7:14], atol=1e-3)  # without the state: another result
    assert st.hc[0].shape == (2, 3, 256) and not st.hc[0].requires_grad
    with pytest.raises(ValueError, match="carried LSTM state holds 3 rows"):
        model(x[:2, :5], state=st)


def test_carried_state_truncates_backpropagation():
    """Gradients of a window stop at its first token: the carried state is detached."""
    model = lstm().train()
    st = CarriedState()
    x = torch.randint(0, 50, (2, 8))
    model(x, state=st).sum().backward()
    first = st.hc[0].clone()
    model.zero_grad()
    model(x, state=st).sum().backward()  # no error: nothing of the first graph is reused
    assert not torch.equal(first, st.hc[0])


@pytest.fixture(scope="module")
def data(sample_data):
    return TokenData(sample_data)


def test_streams_partition_the_shard_and_advance_one_window_per_step(data):
    seq, micro, accum, dp = 8, 3, 2, 2
    streams = {g: GroupStream(data, g, 2, seq, seed=1) for g in (0, 1)}
    seen = {}
    for g, s in streams.items():
        length, windows = s.streams(dp * accum * micro)
        for step in range(3):
            for m in range(accum):
                for r in range(dp):
                    batch, fresh = s.stream_batch(step, m, accum, r, dp, micro)
                    assert batch.shape == (micro, seq + 1) and fresh == (step == 0)
                    for b in range(micro):
                        stream = (m * dp + r) * micro + b
                        start = stream * length + step * seq
                        assert torch.equal(batch[b], torch.from_numpy(s.tokens[start:start + seq + 1].astype(np.int64)))
                        seen.setdefault((g, stream), []).append(step)
    assert len(seen) == 2 * dp * accum * micro and all(v == [0, 1, 2] for v in seen.values())
    # two groups read different shards; within a group the streams are disjoint slices of it
    assert not np.array_equal(streams[0].tokens[:100], streams[1].tokens[:100])
    # window W wraps: the streams start over, flagged so the trainer resets the states
    length, windows = streams[0].streams(dp * accum * micro)
    again, fresh = streams[0].stream_batch(windows, 0, accum, 0, dp, micro)
    first, _ = streams[0].stream_batch(0, 0, accum, 0, dp, micro)
    assert fresh and torch.equal(again, first)
    with pytest.raises(DataError, match="--carry_state cuts group 0"):
        GroupStream(data, 0, 2, seq, seed=1).streams(10 ** 9)


def test_carried_validation_reads_the_fresh_windows_as_rows(data):
    """eval_streams holds exactly eval_batches' tokens (when they divide into rows), one
    contiguous row per batch row, spread over the ranks."""
    seq, micro, nb, dp = 16, 2, 3, 2
    fresh = [w for r in range(dp) for b in eval_batches(data, seq, micro, nb, r, dp) for w in b]
    rows = {r: eval_streams(data, seq, micro, nb, r, dp) for r in range(dp)}
    assert all(len(v) == nb and v[0].shape == (micro, seq + 1) for v in rows.values())
    toks = torch.from_numpy(np.asarray(data.tokens("val")).astype(np.int64))
    for r in range(dp):
        for j, batch in enumerate(rows[r]):
            for b in range(micro):
                row = r * micro + b
                start = (row * nb + j) * seq
                assert torch.equal(batch[b], toks[start:start + seq + 1])
    key = sorted(tuple(w.tolist()) for w in fresh)
    assert key == sorted(tuple(w.tolist()) for v in rows.values() for b in v for w in b)


@pytest.mark.parametrize("topk", [0, 5])
def test_teachers_carry_their_state_until_a_swap(topk):
    """TeacherPool.probs with ``states``: each teacher continues its rows where it stopped (the
    same distribution as one call over the whole rows); a swapped-in teacher starts from zeros."""
    from codistill.exports import Export
    cfg = preset_config("lstm", "tiny", 50, n_layers=2)
    peer = lstm(seed=3)
    pool = TeacherPool(cfg, torch.device("cpu"), topk=topk)
    pool.load(1, Export(step=10, state_dict=peer.state_dict(), meta={}))
    x = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        whole = torch.softmax(peer(x), -1)
    states = {}
    got = []
    for i in range(0, 24, 8):
        q, _ = pool.probs([1], x[:, i:i + 8], states=states)
        got.append((q.values.clone(), q.indices.clone()) if topk else q.clone())  # buffers reused next call
    if topk:
        top = torch.topk(whole, 5, dim=-1)
        assert torch.allclose(torch.cat([v for v, _ in got], 1), top.values, atol=1e-5)
    else:
        assert torch.allclose(torch.cat(got, 1), whole, atol=1e-5)
    assert states[1].tag == 10
    pool.load(1, Export(step=20, state_dict=peer.state_dict(), meta={}))  # a newer export: state reset
    q, _ = pool.probs([1], x[:, 8:16], states=states)
    with torch.no_grad():
        cold = torch.softmax(peer(x[:, 8:16]), -1)
    if topk:
        assert torch.allclose(q.values, torch.topk(cold, 5, dim=-1).values, atol=1e-5)
    else:
        assert torch.allclose(q, cold, atol=1e-5)
    assert states[1].tag == 20
