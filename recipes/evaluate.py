#!/usr/bin/env python
"""Evaluate the groups of a codistillation run: perplexity, ensemble, prediction churn.

    python recipes/evaluate.py --run_dir runs/A
    python recipes/evaluate.py --run_dir runs/A --compare runs/B --json results.json
    python recipes/evaluate.py --run_dir runs/A --weights latest_export --max_tokens 100000

For every group of run A (and of run B with --compare): validation loss (nats/token), token
perplexity and word perplexity; the perplexity of the ensemble of all groups of a run (the
average of their predicted probabilities); and prediction churn (codistill/metrics.py: mean
|p_a(y) - p_b(y)| of the true next token, top-1 disagreement rate, symmetric KL = the mean of
KL(a||b) and KL(b||a)) between the groups of A pairwise, between group i of A and group i of
B, and between the ensemble of A and the ensemble of B.

The split is cut into consecutive non-overlapping windows of seq_len+1 tokens that share
their boundary token (window k: tokens k*T .. k*T+T), so every token of the split but the
first is predicted exactly once. --max_tokens keeps the first floor(max_tokens/T) windows.
Deterministic. How a model sees them (--state; the JSON's "state"):

- carried (the default for LSTMs, --state auto): the windows' tokens are cut into --batch_size
  contiguous rows and each LSTM runs along its rows window by window, carrying its state
  across windows, as Zaremba et al. (2014) and the LSTM literature measure perplexity; the
  result equals one call over each whole row (tests/unit/test_carry.py). Only each row's first
  token is predicted without context (--batch_size 1: one row, the whole split).
- fresh (the default as soon as a model is not an LSTM; Transformers have no state to carry):
  every window from a zero state / an empty context, batches of --batch_size windows - the
  number training's periodic validation reports (--eval_state fresh).

Word perplexity = exp(total NLL / words), words = whitespace-separated words (str.split) of
the evaluated target tokens decoded with the data's tokenizer (SentencePiece or Hugging Face), document by document
(the span is cut at EOS tokens; EOS tokens are not words). The JSON also gives
word_ppl_with_eos, which counts each EOS as one more word (the Penn Treebank convention when
documents are sentences).

Weights are read through safetensors only: group_i/final/model.safetensors (+ config.json),
or an export (group_i/exports/step_N.safetensors + .json) through the same reader the
teachers use (codistill/exports.py: header check, sha256, tokenizer hash).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from codistill.data import DataError, TokenData
from codistill.device import cpu_requested
from codistill.exports import export_name, read_export, read_final, read_latest
from codistill.layout import GroupLayout, RunLayout
from codistill.metrics import Totals, count_words_in_tokens, ensemble_log_probs, log_probs, ppl
from codistill.outputs import git_sha
from fileio import ExportError, write_json
from model import ModelConfig, build_model
from model.lstm import CarriedState

ROOT = Path(__file__).resolve().parents[1]


class EvalError(Exception):
    """A user-facing problem: printed as 'error: ...' with exit status 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="run directory of recipes/train_lm.py (run A)")
    p.add_argument("--compare", help="a second run directory (run B): churn of group i of A vs group i of B")
    p.add_argument("--data", help="data_prep output dir (default: run A's config.json args.data)")
    p.add_argument("--split", default="val")
    p.add_argument("--json", help="write all numbers to this JSON file (atomically)")
    p.add_argument("--weights", default="final", help="final | latest_export | step_N (an export step)")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens of the split")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=None, help="window length (default: run A's --seq_len)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available, cpu under DS_ACCELERATOR=cpu)")
    p.add_argument("--state", default="auto", choices=["auto", "carried", "fresh"],
                   help="carried: LSTMs carry their state across windows along --batch_size rows; fresh: every "
                        "window from scratch; auto: carried when every model is an LSTM")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Loading runs and weights

def run_config(run_dir: Path) -> dict:
    path = RunLayout(run_dir).config
    return read_json(path) if path.is_file() else {}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{path} is not valid JSON ({e})") from None


def find_groups(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        raise EvalError(f"run directory {run_dir} does not exist")
    groups = [g.dir for g in RunLayout(run_dir).groups()]
    if not groups:
        raise EvalError(f"{run_dir} has no group_i directories: is it a run directory of recipes/train_lm.py?")
    return groups


def load_weights(gdir: Path, weights: str, data: TokenData) -> tuple[ModelConfig, dict, dict]:
    """(model config, state dict, info) of one group, through the reader teachers use (safetensors
    only; header, size/checksum and tokenizer checked)."""
    paths = GroupLayout(gdir, -1)
    try:
        if weights == "final":
            exp = read_final(paths.final, expect_tokenizer=data.tokenizer_sha256)
            info = {"weights": str(paths.final / "model.safetensors")}
        else:
            if weights == "latest_export":
                step = read_latest(paths.exports)
            elif re.fullmatch(r"step_\d+", weights):
                step = int(weights.split("_")[1])
            else:
                raise EvalError(f"--weights must be final, latest_export or step_N, got {weights!r}")
            exp = read_export(paths.exports, step, expect_tokenizer=data.tokenizer_sha256)
            info = {"weights": str(paths.exports / f"{export_name(step)}.safetensors"), "step": step,
                    "tokens_seen": exp.meta.get("tokens_seen")}
    except ExportError as e:
        raise EvalError(str(e)) from None
    sd, cfg_dict = exp.state_dict, exp.meta.get("model_config")
    if weights == "final" and (paths.final / "config.json").is_file():  # the architecture the model is rebuilt from
        cfg_dict = read_json(paths.final / "config.json")
    if not isinstance(cfg_dict, dict):
        raise EvalError(f"{info['weights']}: its metadata has no model_config")
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise EvalError(f"{gdir}: invalid model config ({e})") from None
    if cfg.vocab_size < data.vocab_size or (cfg.arch != "hf" and cfg.vocab_size != data.vocab_size):
        raise EvalError(f"{gdir} was trained with vocab_size {cfg.vocab_size} but the tokenizer of {data.dir} has "
                        f"{data.vocab_size} pieces: evaluate it on the data it was trained on (--data)")
    return cfg, sd, info


def build(cfg: ModelConfig, sd: dict, device, where: Path) -> torch.nn.Module:
    m = build_model(cfg)
    try:
        m.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise EvalError(f"{where}: weights do not fit the saved model config ({str(e).splitlines()[0]})") from None
    return m.to(device).eval()


def check_run_tokenizer(run_dir: Path, data: TokenData) -> None:
    """Refuse to evaluate a run on data tokenized differently from what it was trained on
    (only checkable when the run's training data directory is still there)."""
    trained_on = run_config(run_dir).get("args", {}).get("data")
    if not trained_on:
        return
    try:
        tdata = TokenData(trained_on)
    except DataError:
        return
    if tdata.dir.resolve() != data.dir.resolve() and tdata.tokenizer_sha256 != data.tokenizer_sha256:
        raise EvalError(f"{run_dir} was trained on {trained_on}, whose tokenizer differs from {data.dir}'s: "
                        "its predictions are over other token ids")


# ---------------------------------------------------------------------------------------------
# Evaluation

def windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None) -> int:
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise EvalError(f"the split has {len(tokens)} tokens (or --max_tokens {max_tokens}): fewer than one "
                        f"window of --seq_len {seq_len} + 1")
    return n


def carried_rows(n_tokens: int, batch_size: int) -> tuple[int, int]:
    """--state carried: (rows, tokens per row) of ``n_tokens`` predicted tokens."""
    rows = min(batch_size, n_tokens)
    return rows, n_tokens // rows


def batches(tokens: np.ndarray, seq_len: int, n_windows: int, batch_size: int, carried: bool):
    """Host batches [B, <= seq_len+1] of the evaluated tokens: --batch_size windows at a time
    (fresh), or window t of every row (carried; module docstring)."""
    if not carried:
        for start in range(0, n_windows, batch_size):
            idx = range(start, min(n_windows, start + batch_size))
            yield np.stack([tokens[k * seq_len:k * seq_len + seq_len + 1] for k in idx])
        return
    rows, length = carried_rows(n_windows * seq_len, batch_size)
    for t in range(0, length, seq_len):
        end = min(t + seq_len, length)
        yield np.stack([tokens[r * length + t:r * length + end + 1] for r in range(rows)])


def evaluate(runs: dict[str, list[tuple[str, torch.nn.Module]]], tokens: np.ndarray, seq_len: int, n_windows: int,
             batch_size: int, device, carried: bool = False) -> dict:
    """One pass over the batches; every model's log-probs of a batch are computed once and
    reused for its own NLL, the ensembles and all churn pairs. ``carried``: every model (an
    LSTM) carries its state from one batch to the next."""
    names = [n for members in runs.values() for n, _ in members]
    models = {n: m for members in runs.values() for n, m in members}
    single = {n: Totals() for n in names}
    ens = {r: Totals() for r, members in runs.items() if len(members) > 1}
    pairs = []
    for members in runs.values():
        pairs += [(a, b) for (a, _), (b, _) in combinations(members, 2)]
    run_names = list(runs)
    if len(run_names) == 2:
        ra, rb = (runs[r] for r in run_names)
        pairs += [(a, b) for (a, _), (b, _) in zip(ra, rb)]
        ens_pair = (run_names[0], run_names[1]) if len(ra) > 1 or len(rb) > 1 else None
    else:
        ens_pair = None
    churn = {p: Totals() for p in pairs}
    ens_churn = Totals()
    kw = {n: {"state": CarriedState()} if carried else {} for n in names}
    with torch.no_grad():
        for rows in batches(tokens, seq_len, n_windows, batch_size, carried):
            batch = torch.from_numpy(rows.astype(np.int64)).to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            lp = {n: log_probs(models[n](x, **kw[n])) for n in names}
            for n in names:
                single[n].add_nll(lp[n], y)
            ens_lp = {r: ensemble_log_probs([lp[n] for n, _ in runs[r]]) for r in runs}
            for r in ens:
                ens[r].add_nll(ens_lp[r], y)
            for (a, b), t in churn.items():
                t.add_churn(lp[a], lp[b], y)
            if ens_pair:
                ens_churn.add_churn(ens_lp[ens_pair[0]], ens_lp[ens_pair[1]], y)
            del lp, ens_lp
    return {"single": single, "ensemble": ens, "churn": churn, "ensemble_churn": ens_churn if ens_pair else None,
            "ensemble_pair": ens_pair}


def run_label(run_dir: Path, other: Path | None) -> str:
    name = run_dir.resolve().name
    if other is not None and other.resolve().name == name:  # runs/seed1/run vs runs/seed2/run
        name = f"{run_dir.resolve().parent.name}/{name}"
    return name


def fmt_table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def eval_device(name: str | None) -> torch.device:
    """--device, else CUDA where there is one - but CPU under DS_ACCELERATOR=cpu (the CPU test tier
    on a GPU node), as the trainer trains there (codistill/device.py cpu_requested)."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() and not cpu_requested() else "cpu"))


def main(argv=None) -> dict:
    if argv is not None:
        argv = [str(a) for a in argv]
    args = parse_args(argv)
    t0 = time.time()
    run_a = Path(args.run_dir)
    run_b = Path(args.compare) if args.compare else None
    groups = {run_a: find_groups(run_a)}
    if run_b is not None:
        groups[run_b] = find_groups(run_b)
    cfg_a = run_config(run_a)
    data_dir = args.data or cfg_a.get("args", {}).get("data")
    if not data_dir:
        raise EvalError(f"{run_a}/config.json does not name the training data: pass --data DIR")
    try:
        data = TokenData(data_dir)
        tokens = data.tokens(args.split)
    except DataError as e:
        raise EvalError(str(e)) from None
    seq_len = args.seq_len or cfg_a.get("args", {}).get("seq_len")
    if not seq_len or seq_len < 1:
        raise EvalError("the window length is unknown: pass --seq_len")
    if args.batch_size < 1:
        raise EvalError("--batch_size must be >= 1")
    device = eval_device(args.device)

    labels = {run_a: run_label(run_a, run_b)}
    if run_b is not None:
        labels[run_b] = run_label(run_b, run_a)
        if labels[run_b] == labels[run_a]:
            labels[run_b] += "(B)"
    runs, infos, vocab = {}, {}, {}
    for rdir, gdirs in groups.items():
        check_run_tokenizer(rdir, data)
        members = []
        for gdir in gdirs:
            cfg, sd, info = load_weights(gdir, args.weights, data)
            name = f"{labels[rdir]}/{gdir.name}"
            vocab[name] = cfg.vocab_size
            members.append((name, build(cfg, sd, device, gdir)))
            infos[name] = dict(info, model=cfg.to_dict())
        runs[labels[rdir]] = members
    if len(set(vocab.values())) > 1:
        raise EvalError(f"the models have different vocabularies ({vocab}): churn is only defined between models "
                        "over the same tokens")

    n_windows = windows(tokens, seq_len, args.max_tokens)
    lstm = all(info["model"]["arch"] == "lstm" for info in infos.values())
    if args.state == "carried" and not lstm:
        raise EvalError("--state carried needs LSTMs: a Transformer has no state to carry across windows "
                        "(use --state fresh or auto)")
    carried = args.state == "carried" or (args.state == "auto" and lstm)
    n_tok = n_windows * seq_len
    if carried:
        rows, length = carried_rows(n_tok, args.batch_size)
        n_tok = rows * length
    from data_prep.tokenizer import load_text_tokenizer
    words, eos = count_words_in_tokens(np.asarray(tokens[1:n_tok + 1]), data.eos_id,
                                       load_text_tokenizer(data.dir).decode)

    res = evaluate(runs, tokens, seq_len, n_windows, args.batch_size, device, carried)
    out = {
        "command": " ".join(["python", "recipes/evaluate.py", *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": git_sha(ROOT), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_dir": str(run_a), "compare": str(run_b) if run_b else None,
        "runs": {labels[r]: str(r) for r in groups},
        "data": str(data.dir), "split": args.split, "weights": args.weights, "seq_len": seq_len,
        "windows": n_windows, "tokens": n_tok,
        "state": (f"carried: the LSTM state carried across windows along {rows} contiguous rows of {length} tokens"
                  if carried else "fresh: every window from a zero state"),
        "state_mode": "carried" if carried else "fresh", "batch_size": args.batch_size, "words": words, "eos": eos, "device": str(device),
        "word_count": "whitespace words (str.split) of the evaluated target tokens decoded per document "
                      "with the data's SentencePiece model; EOS not counted (word_ppl_with_eos counts it)",
        "sym_kl": "(KL(a||b) + KL(b||a)) / 2, nats per token",
        "groups": {}, "ensembles": {}, "churn": [],
    }
    for name, t in res["single"].items():
        m = t.model_metrics(words)
        m["word_ppl_with_eos"] = ppl(t.nll, words + eos) if words + eos else None
        out["groups"][name] = dict(m, **infos[name])
    for r, t in res["ensemble"].items():
        m = t.model_metrics(words)
        m["word_ppl_with_eos"] = ppl(t.nll, words + eos) if words + eos else None
        out["ensembles"][r] = dict(m, members=[n for n, _ in runs[r]])
    for (a, b), t in res["churn"].items():
        out["churn"].append(dict(a=a, b=b, **t.churn_metrics()))
    if res["ensemble_churn"] is not None:
        ra, rb = res["ensemble_pair"]
        out["churn"].append(dict(a=f"{ra}/ensemble", b=f"{rb}/ensemble", **res["ensemble_churn"].churn_metrics()))
    out["eval_seconds"] = round(time.time() - t0, 3)

    print(f"{args.split} split of {data.dir}: {n_tok} tokens ({n_windows} windows of {seq_len}), {words} words; "
          f"weights: {args.weights}; state {out['state']}; device {device}")
    rows = [[n, g["loss"], g["ppl"], g.get("word_ppl", float("nan"))] for n, g in out["groups"].items()]
    rows += [[f"{r}/ensemble({len(e['members'])})", e["loss"], e["ppl"], e.get("word_ppl", float("nan"))]
             for r, e in out["ensembles"].items()]
    print(fmt_table(rows, ["model", "loss", "ppl", "word ppl"]))
    if out["churn"]:
        print("\nprediction churn (mean |p_a(y)-p_b(y)|, top-1 disagreement, symmetric KL (mean of both directions))")
        print(fmt_table([[f"{c['a']} vs {c['b']}", c["mean_abs_p_diff"], c["top1_disagreement"], c["sym_kl"]]
                         for c in out["churn"]], ["pair", "|dp(y)|", "top1 disagree", "sym KL"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.json), out)
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
