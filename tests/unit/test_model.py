"""Models: shapes, config round trips, and loss falling on the embedded corpus."""
import json

import pytest
import torch

from codistill.data import GroupStream, TokenData
from model import PRESETS, ModelConfig, build_model, count_params, preset_config


@pytest.mark.parametrize("arch,size", [("lstm", "tiny"), ("lstm", "small"), ("transformer", "tiny")])
def test_shapes_and_roundtrip(arch, size):
    cfg = preset_config(arch, size, vocab_size=300)
    m = build_model(cfg)
    logits = m(torch.randint(0, 300, (3, 17)))
    assert logits.shape == (3, 17, 300)
    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.config_hash() == cfg.config_hash()
    m2 = build_model(again)
    m2.load_state_dict(m.state_dict())
    m.eval(), m2.eval()
    x = torch.randint(0, 300, (2, 9))
    assert torch.equal(m(x), m2(x))
    assert count_params(m) == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def test_presets_exist_and_hash_identity():
    assert {"tiny", "small", "paper"} <= set(PRESETS["lstm"])
    assert {"tiny", "small", "gpt2-small"} <= set(PRESETS["transformer"])
    paper = preset_config("lstm", "paper", 8000)
    assert paper.d_model == 1024 and paper.n_layers == 2
    a, b = preset_config("lstm", "tiny", 100), preset_config("lstm", "tiny", 101)
    assert a.config_hash() != b.config_hash()
    assert preset_config("lstm", "tiny", 100, dropout=0.3).config_hash() == a.config_hash()
    with pytest.raises(ValueError, match="model_size"):
        preset_config("lstm", "huge", 100)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"arch": "lstm", "bogus": 1})


def test_tied_embeddings_share_storage():
    m = build_model(preset_config("lstm", "small", vocab_size=200))
    assert m.head.weight is m.embed.weight


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_loss_falls_on_embedded_corpus(sample_data, arch):
    data = TokenData(sample_data)
    torch.manual_seed(0)
    m = build_model(preset_config(arch, "tiny", data.vocab_size))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    stream = GroupStream(data, 0, 6, seq_len=32, seed=0)
    losses = []
    for step in range(40):
        b = stream.batch(step, 0, 1, 0, 1, 16)
        loss = torch.nn.functional.cross_entropy(m(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
