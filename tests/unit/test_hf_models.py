"""Any transformers causal LM (--model hf): configs written by the tests themselves (local files
only), their identity, --init_from's safetensors-only rule, and recipes/generate.py's sampling."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script

from codistill.flags import model_config, parse_args
from model import ModelConfig, build_model, hf_model_config
from model.hf import HFConfigError, pretrained_weights, read_hf_config

V = 2000  # the test corpus' vocabulary (tests/conftest.py sample_data)


def tiny_configs(vocab: int = V) -> dict:
    """Tiny configs of three architectures, as a user would write them."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    kv = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    return {"gpt2": GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=2, eos_token_id=2),
            "llama": LlamaConfig(vocab_size=vocab, **kv, tie_word_embeddings=True),
            "qwen2": Qwen2Config(vocab_size=vocab, **kv)}


def write_configs(tmp_path, vocab: int = V) -> dict:
    out = {}
    for name, c in tiny_configs(vocab).items():
        c.save_pretrained(tmp_path / name)
        out[name] = tmp_path / name
    return out


def test_any_causal_lm_builds_from_a_local_config_with_a_stable_identity(tmp_path):
    paths = write_configs(tmp_path)
    hashes = set()
    for _name, path in paths.items():
        cfg = hf_model_config(read_hf_config(path))
        assert cfg.arch == "hf" and cfg.vocab_size == V and cfg.n_layers == 2 and cfg.d_model == 64
        m = build_model(cfg)
        assert m(torch.randint(0, V, (2, 9))).shape == (2, 9, V)
        again = ModelConfig.from_dict(json.loads(cfg.to_json()))  # what an export's metadata carries
        assert again.config_hash() == cfg.config_hash()
        build_model(again).load_state_dict(m.state_dict())
        # dropout and the file's form (a partial config.json) change nothing of the identity
        assert hf_model_config(read_hf_config(path), dropout=0.3).config_hash() == cfg.config_hash()
        hashes.add(cfg.config_hash())
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"model_type": "llama", "vocab_size": V, "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "max_position_embeddings": 128,
                                   "tie_word_embeddings": True}))
    assert hf_model_config(read_hf_config(partial)).config_hash() == \
        hf_model_config(read_hf_config(paths["llama"])).config_hash()
    assert len(hashes) == 3  # another architecture is another identity: its exports are refused


def test_bad_hf_configs_are_refused_with_the_flag_named(tmp_path):
    (tmp_path / "no_type.json").write_text(json.dumps({"vocab_size": 10}))
    (tmp_path / "vit.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "broken.json").write_text("{")
    for name, msg in (("no_type.json", "has no model_type"), ("vit.json", "not a causal language model"),
                      ("broken.json", "not valid JSON"), ("missing", "no such file")):
        with pytest.raises(HFConfigError, match=msg):
            read_hf_config(tmp_path / name)
    paths = write_configs(tmp_path, vocab=100)
    args = parse_args(["--model", "hf", "--hf_config", str(paths["llama"])])
    with pytest.raises(HFConfigError, match=r"vocab_size is 100 but the data's tokenizer .* has 2000 ids"):
        model_config(args.model, args.data, 2000)
    assert model_config(args.model, args.data, 90).vocab_size == 100  # a padded embedding is fine
    for argv in (["--model", "hf"], ["--model", "hf", "--hf_config", "a", "--init_from", "b"],
                 ["--hf_config", str(paths["llama"])]):
        assert any("--hf_config" in e for e in parse_args(argv).check()[0]), argv


def test_init_from_reads_safetensors_and_refuses_pickled_weights(tmp_path):
    from transformers import AutoModelForCausalLM
    c = tiny_configs()["qwen2"]
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(c)
    ref.save_pretrained(tmp_path / "st")
    sd = pretrained_weights(tmp_path / "st")
    m = build_model(hf_model_config(read_hf_config(tmp_path / "st")))
    m.load_state_dict(sd)
    x = torch.randint(0, V, (2, 7))
    assert torch.allclose(m(x), ref(x).logits, atol=1e-5)
    c.save_pretrained(tmp_path / "pickled")  # what older checkpoints are: config.json + pytorch_model.bin
    torch.save(ref.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(HFConfigError, match="pickled.*--trust_pickled_weights"):
        pretrained_weights(tmp_path / "pickled")
    m.load_state_dict(pretrained_weights(tmp_path / "pickled", trust_pickle=True))  # the user's explicit choice
    assert torch.allclose(m(x), ref(x).logits, atol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFConfigError, match="holds no weights"):
        pretrained_weights(tmp_path / "empty")


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    filter_logits = load_script("generate").filter_logits
    kept = lambda k, p: torch.isfinite(filter_logits(logits, k, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0, 1.0) == [0, 1, 2, 3, 4]
    assert kept(2, 1.0) == [0, 1]
    assert kept(0, 0.6) == [0, 1]           # 0.5 < 0.6: the second token is needed
    assert kept(0, 0.5) == [0]              # the first already holds 0.5
    assert kept(0, 0.01) == [0]             # the most likely token always stays
    assert kept(3, 0.8) == [0, 1] and kept(3, 0.9) == [0, 1, 2]  # top-p over the top-k, renormalised
    shuffled = logits[torch.tensor([3, 0, 4, 1, 2])]
    assert torch.isfinite(filter_logits(shuffled, 0, 0.6)).nonzero().flatten().tolist() == [1, 3]


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_config_that_says_bfloat16_builds_in_fp32(tmp_path, key):
    """Issue 28 item 7: real configs say bfloat16; the model is built in fp32 (the run's precision
    is DeepSpeed's bf16 setting, which casts the parameters), so an fp32 run trains in fp32."""
    from transformers import LlamaConfig
    c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
    raw = c.to_dict()
    raw.pop("dtype", None)
    raw[key] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = hf_model_config(read_hf_config(tmp_path), max_seq_len=64)
    model = build_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    assert model(torch.randint(0, 64, (2, 8))).dtype == torch.float32


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # llama: tied embeddings, no lm_head in the file
def test_init_from_streams_safetensors_into_the_module_without_a_second_model(tmp_path, monkeypatch, arch):
    """Issue 28 item 12: --init_from is read tensor by tensor (safe_open, mmap'd) into the student's
    own parameters: transformers' from_pretrained (a whole second model in fp32 on every rank) is
    never called; the result is the pretrained model; a file of another shape is refused, named."""
    from transformers import AutoModelForCausalLM

    from model.hf import load_pretrained
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(tiny_configs()[arch])
    ref.save_pretrained(tmp_path / "st")
    m = build_model(hf_model_config(read_hf_config(tmp_path / "st")))

    def no_second_model(*a, **kw):
        raise AssertionError("from_pretrained materialised a second model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_second_model)
    load_pretrained(m, tmp_path / "st")
    x = torch.randint(0, V, (2, 7))
    assert torch.equal(m(x), ref(x).logits)
    other = AutoModelForCausalLM.from_config(tiny_configs(vocab=V + 8)[arch])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(HFConfigError, match=r"other/model.safetensors.*shape"):
        load_pretrained(m, tmp_path / "other")
