"""Bring your own model (--model hf): three transformers architectures written by the test
(local files only) codistilled with real DeepSpeed; --init_from a local pretrained checkpoint;
final/hf/ loaded back by from_pretrained (model + tokenizer) and pipeline; recipes/generate.py."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import launch, read_scalars, run_python
from test_hf_models import write_configs
from test_hf_tokenizer import articles, corpus, hf_data, hf_dir  # noqa: F401 (fixtures: a BPE tokenizer's data)

COMMON = ["--max_steps", "6", "--export_every", "2", "--burn_in_steps", "2", "--eval_every", "6",
          "--eval_batches", "2", "--seq_len", "32", "--log_every", "1", "--save_every", "3"]


def codistilled(run_dir) -> None:
    """Both groups trained, exported, and used each other's export as a teacher."""
    for g in (0, 1):
        peers = read_scalars(run_dir / f"group_{g}" / "tb", "teacher/num_peers")
        assert peers.get(6) == 1, peers
        assert (run_dir / f"group_{g}" / "exports" / "LATEST").is_file()


def check_final_loads_in_the_hf_ecosystem(run_dir, data, auto_tokenizer: bool = True) -> None:
    """final/hf/ loads with AutoModelForCausalLM and AutoTokenizer (``auto_tokenizer``; else
    PreTrainedTokenizerFast), its logits are the trainer's, its tokenizer encodes like the
    data's, and pipeline("text-generation") runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, pipeline

    from codistill.exports import read_final
    from data_prep.tokenizer import load_text_tokenizer
    from model import ModelConfig, build_model
    final = run_dir / "group_0" / "final"
    exp = read_final(final)
    ours = build_model(ModelConfig.from_dict(json.loads((final / "config.json").read_text()))).eval()
    ours.load_state_dict(exp.state_dict)
    hf = AutoModelForCausalLM.from_pretrained(final / "hf", local_files_only=True).eval()
    tok = (AutoTokenizer if auto_tokenizer else PreTrainedTokenizerFast).from_pretrained(final / "hf",
                                                                                        local_files_only=True)
    text = "The government said on Tuesday that growth would slow, 3.5% lower than forecast."
    ids = load_text_tokenizer(data).encode(text)
    assert tok(text)["input_ids"] == ids  # no BOS/EOS added: what the model was trained on
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-5)
    out = pipeline("text-generation", model=str(final / "hf"), tokenizer=tok, device="cpu")(
        "The government", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The government")


@pytest.fixture(scope="module")
def hf_configs(tmp_path_factory):
    return write_configs(tmp_path_factory.mktemp("hf_configs"))


def test_gpt2_codistills_on_a_hf_tokenizers_data_and_its_final_model_loads_with_transformers(hf_data,  # noqa: F811
                                                                                            tmp_path):
    """GPT-2 on data tokenized by a BPE tokenizer trained with the tokenizers library, its
    embedding padded to a multiple of 64 (as HF models' often are)."""
    from transformers import GPT2Config

    from codistill.data import TokenData
    vocab = -(-TokenData(hf_data).vocab_size // 64) * 64
    GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128).save_pretrained(tmp_path / "cfg")
    run = tmp_path / "gpt2"
    launch(["--data", hf_data, "--model", "hf", "--hf_config", tmp_path / "cfg", "--run_dir", run, *COMMON])
    codistilled(run)
    check_final_loads_in_the_hf_ecosystem(run, hf_data)
    proc = run_python(["recipes/generate.py", "--model", run / "group_0", "--prompt", "The government",
                       "--max_new_tokens", "8", "--temperature", "0.8", "--top_k", "20", "--seed", "3"])
    assert proc.returncode == 0 and proc.stdout.startswith("The government"), proc.stderr[-2000:]
    again = run_python(["recipes/generate.py", "--model", run / "group_0", "--prompt", "The government",
                        "--max_new_tokens", "8", "--temperature", "0.8", "--top_k", "20", "--seed", "3"])
    assert again.stdout == proc.stdout  # seeded: the same text
    export = run / "group_1" / "exports"
    greedy = run_python(["recipes/generate.py", "--model", export, "--data", hf_data, "--temperature", "0",
                         "--max_new_tokens", "5"])
    assert greedy.returncode == 0, greedy.stderr[-2000:]


def test_qwen2_codistills_under_zero3_with_full_weights_exported(sample_data, hf_configs, tmp_path):
    from codistill.exports import read_export, read_latest
    run = tmp_path / "qwen2"
    proc = launch(["--data", sample_data, "--model", "hf", "--hf_config", hf_configs["qwen2"], "--run_dir", run,
                   "--ds_config", "ds_configs/zero3.json", *COMMON], num_ranks=2)
    codistilled(run)
    exp = read_export(run / "group_0" / "exports", read_latest(run / "group_0" / "exports"))
    emb = exp.state_dict["hf.model.embed_tokens.weight"]
    assert emb.shape == (2000, 64) and emb.abs().sum() > 0  # gathered, not a ZeRO-3 placeholder
    # transformers gives model_type qwen2 its own tokenizer class (its own pre-tokenizer): for data
    # tokenized otherwise the trainer says so, and the exported tokenizer loads as a plain fast one
    assert "AutoTokenizer loads it as Qwen2Tokenizer" in proc.stdout, proc.stdout[-3000:]
    check_final_loads_in_the_hf_ecosystem(run, sample_data, auto_tokenizer=False)


def test_llama_from_a_pretrained_checkpoint_starts_from_its_weights_and_resumes(sample_data, hf_configs, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from codistill.data import GroupStream, TokenData
    c = LlamaConfig.from_pretrained(hf_configs["llama"])
    torch.manual_seed(5)
    pre = AutoModelForCausalLM.from_config(c).eval()
    pre.save_pretrained(tmp_path / "pretrained")
    batch = GroupStream(TokenData(sample_data), 0, 2, 32, 1234).batch(0, 0, 1, 0, 1, 16)
    with torch.no_grad():
        logits = pre(batch[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    run = tmp_path / "llama"
    args = ["--data", sample_data, "--model", "hf", "--init_from", tmp_path / "pretrained", "--dropout", "0",
            "--run_dir", run, *COMMON]
    launch([*args, "--stop_after_steps", "3"], check=False)
    ce = read_scalars(run / "group_0" / "tb", "train/ce")
    assert ce[1] == pytest.approx(want, rel=1e-4), (ce[1], want)  # the checkpoint's loss on the same batch
    proc = launch(args)
    assert "resumed from step 3" in proc.stdout and "[group 0] step 4/6" in proc.stdout, proc.stdout[-3000:]
    assert "[group 0] step 3/6" not in proc.stdout  # not trained again from the pretrained weights
    codistilled(run)
    assert "AutoTokenizer loads it as" not in proc.stdout
    check_final_loads_in_the_hf_ecosystem(run, sample_data)  # a SentencePiece tokenizer, exported for transformers
