"""What a run leaves behind: group_i/final/ (weights + config + export metadata, and hf/ for
Transformers), each group's summary.json and the run's, the memory it used and the code it ran
(git_sha). What a run shows while it runs (console, TensorBoard): codistill/runlog.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from codistill.exports import write_weights
from codistill.layout import RunLayout
from fileio import write_json


def git_sha(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_final(s, state_dict, meta: dict, model_cfg, step: int, wall: float, teacher_steps: dict,
               log=None, rss_start_mib: float = 0.0, exchange: dict | None = None) -> None:
    """group_i/final/: model.safetensors + config.json + meta.json (the metadata of an export, so
    that ``--teacher`` and evaluate.py read it like one) (+ hf/ for Transformers), and
    group_i/summary.json. The directory appears complete or not at all."""
    final, tmp, old = s.paths.final, s.dir / ".final.tmp", s.dir / ".final.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    info = write_weights(tmp / "model.safetensors", tensors, step)
    (tmp / "config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step, weights="model.safetensors", **info),
                                              indent=2, sort_keys=True) + "\n")
    if model_cfg.arch in ("transformer", "hf"):
        problem = save_hf(model_cfg, tensors, s.data_dir, tmp / "hf")
        if problem and log is not None:
            log(f"WARNING: group {s.id}: {problem}", force=True)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    loss, ppl = s.last_val
    write_json(s.paths.summary, {
        "group": s.id, "steps": step, "tokens_seen": s.tokens_seen, "val_loss": loss, "val_ppl": ppl,
        "wall_time_s": round(wall, 2), "num_params": s.num_params, **peak_memory(s.device, rss_start_mib),
        "teacher_steps": {str(p): t for p, t in teacher_steps.items()}, **(exchange or {})})


PROBE = ("The government said on Tuesday that growth would slow to 3.5% - lower than forecast.\n\n"
         "Zürich, São Paulo & Kraków: naïve café prices rose by €2  (or £1.70).")


def save_hf(model_cfg, tensors: dict, data_dir, out) -> str | None:
    """final/hf/: the model and the data's tokenizer as one directory that
    AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained and
    pipeline("text-generation") load; the special-token ids of the model's config and
    generation config are the tokenizer's (EOS ends a document; it pads too).

    Returns a problem to report, or None: transformers maps some model types (qwen2, phi3, ...:
    its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) to their own tokenizer class, which rebuilds
    its own normalizer and pre-tokenizer; AutoTokenizer then encodes differently from the data
    unless the data was prepared with that model's own tokenizer. Checked here on a probe text."""
    from transformers import AutoTokenizer, GenerationConfig

    from data_prep.tokenizer import export_hf_tokenizer, load_text_tokenizer
    from model import build_model
    m = build_model(model_cfg)
    m.load_state_dict(tensors)
    tok = export_hf_tokenizer(data_dir, out)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    for k, v in ids.items():
        setattr(m.hf.config, k, v)
    m.hf.generation_config = GenerationConfig(**ids)
    m.hf.save_pretrained(str(out))
    auto = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    if auto(PROBE)["input_ids"] != load_text_tokenizer(data_dir).encode(PROBE):
        return (f"{out}: AutoTokenizer loads it as {type(auto).__name__}, which transformers builds with its own "
                f"pre-tokenizer for model_type {m.hf.config.model_type!r}, and it encodes text differently from "
                f"the data this model was trained on; load the tokenizer with "
                f"PreTrainedTokenizerFast.from_pretrained('{out}') instead, or prepare the data with this "
                "architecture's own tokenizer (data_prep --tokenizer DIR)")
    return None


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_memory(device, rss_start_mib: float = 0.0) -> dict:
    """The process's peak memory: allocated on its CUDA device, else the host's peak RSS; and
    ``memory``: RSS before the students were built (``rss_start_mib``, after imports and the
    process group), peak RSS (VmHWM) and peak CUDA allocation, MiB (benchmarks/teacher_memory.py)."""
    import resource
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = 0.0
    if device.type == "cuda":
        import torch
        cuda = torch.cuda.max_memory_allocated(device) / 2**20
    out = {"peak_memory_bytes": int(cuda * 2**20) if device.type == "cuda" else int(peak_rss * 2**20),
           "peak_memory_of": str(device) if device.type == "cuda" else "host RSS"}
    out["memory"] = {"rss_start_mib": round(rss_start_mib, 1), "rss_peak_mib": round(peak_rss, 1),
                     "cuda_peak_mib": round(cuda, 1)}
    return out


def merge_summaries(run_dir: Path, num_groups: int) -> dict:
    run, groups = RunLayout(run_dir), {}
    for i in range(num_groups):
        p = run.group(i).summary
        if p.is_file():
            groups[f"group_{i}"] = json.loads(p.read_text())
    summary = {"run_dir": str(run_dir), "num_groups": num_groups, "groups": groups}
    write_json(run.summary, summary)
    return summary


def print_table(summary: dict, run_dir: Path, log) -> None:
    log("")
    log(f"{'group':>6} | {'steps':>6} | {'tokens':>10} | {'val loss':>8} | {'val ppl':>8} | teacher step in use")
    for _name, s in summary["groups"].items():
        teachers = ", ".join(f"g{p}@{t}" for p, t in s["teacher_steps"].items()) or "-"
        log(f"{s['group']:>6} | {s['steps']:>6} | {s['tokens_seen']:>10} | {s['val_loss']:>8.4f} | "
            f"{s['val_ppl']:>8.2f} | {teachers}")
    log(f"\nsummary: {Path(run_dir) / 'summary.json'}")
    log(f"TensorBoard: tensorboard --logdir {run_dir}")
