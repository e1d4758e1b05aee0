"""What a run shows and leaves behind: console lines, TensorBoard scalars (written here, and
read back by tests, benchmarks and plots through ``read_events``), final weights, summary.json."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from codistill.exports import write_weights
from codistill.layout import RunLayout
from fileio import write_json


class Console:
    """Prints from global rank 0, or from every group leader with a group prefix."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, msg: str, force: bool = False) -> None:
        if self.rank == 0 or force:
            print(msg, flush=True)

    def error(self, msg: str) -> None:
        if self.rank == 0:
            print(f"error: {msg}", file=sys.stderr, flush=True)

    def warning(self, msg: str) -> None:
        if self.rank == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)


class TBWriter:
    """torch's SummaryWriter, created lazily so that ranks that log nothing write no files."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.w.add_scalar(tag, value, step)

    def close(self) -> None:
        self.w.flush()
        self.w.close()


@dataclass
class StepStats:
    """One group's training step as the logs show it (host values, after the step's sync)."""
    loss: float             # ce + alpha * distill: the optimised loss less the constant alpha * T^2 H(teacher)
    ce: float
    distill: float          # KL(teacher || student) (0 without a teacher)
    agreement: float        # top-1 agreement with the averaged teacher (nan without one)
    distill_ce: float       # the cross entropy against the teacher that is optimised (= distill + T^2 H(teacher))
    alpha: float
    lr: float
    step_time: float        # seconds: this group's passes and update, plus the step's sync
    peers: list = field(default_factory=list)  # the teachers used
    skipped: bool = False
    skipped_steps: int = 0
    teacher_ce: dict = field(default_factory=dict)         # peer -> its cross entropy on this batch's targets
    teacher_nonfinite: dict = field(default_factory=dict)  # peer -> its probabilities were non-finite (left out)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_train(g, step: int, st: StepStats, pool, reload_ms: float, log, log_every: int, max_steps: int,
              t_start: float, start_step: int) -> None:
    tok_s = g.step_tokens / st.step_time if st.step_time > 0 else 0.0
    w = g.writer
    if w:
        w.scalar("train/loss", st.loss, step)
        w.scalar("train/ce", st.ce, step)
        w.scalar("train/distill", st.distill, step)
        w.scalar("train/distill_ce", st.distill_ce, step)
        w.scalar("train/ppl", math.exp(min(st.ce, 50)), step)
        w.scalar("train/alpha", st.alpha, step)
        w.scalar("lr", st.lr, step)
        w.scalar("perf/tokens_per_s", tok_s, step)
        w.scalar("perf/step_time", st.step_time, step)
        w.scalar("perf/tokens_seen", g.tokens_seen, step)
        w.scalar("train/skipped_steps", st.skipped_steps, step)
        peers = [p for p in st.peers if p not in pool.fixed]  # a --teacher PATH is not stale
        if st.peers:
            w.scalar("teacher/agreement", st.agreement, step)
        if peers:
            for p in peers:
                w.scalar(f"teacher/step/group_{p}", pool.steps[p], step)
            w.scalar("teacher/step", min(pool.steps[p] for p in peers), step)
            w.scalar("teacher/staleness", max(step - pool.steps[p] for p in peers), step)
        loaded = [p for p in pool.steps if p != g.id and p not in pool.fixed]
        if loaded and st.alpha > 0:  # also for teachers dropped by --max_teacher_staleness
            for p in loaded:
                w.scalar(f"teacher/staleness/group_{p}", step - pool.steps[p], step)
            w.scalar("teacher/num_peers", len(peers), step)
        if reload_ms:
            w.scalar("teacher/reload_ms", reload_ms, step)
        for p, ce in st.teacher_ce.items():
            w.scalar(f"teacher/ce/group_{p}", ce, step)
        if st.teacher_ce:
            w.scalar("teacher/nonfinite", sum(st.teacher_nonfinite.values()), step)
            w.scalar("teacher/dropped", len(st.teacher_ce) - len(st.peers), step)
    if g.leader and (step % log_every == 0 or step == max_steps):
        elapsed = time.time() - t_start
        eta = elapsed / max(1, step - start_step) * (max_steps - step)
        teacher = ",".join("fixed" if p in pool.fixed else f"g{p}@{pool.steps[p]}" for p in st.peers) or "-"
        log(f"[group {g.id}] step {step}/{max_steps} | loss {st.loss:.4f} ce {st.ce:.4f} "
            f"kl {st.distill:.4f} | ppl {math.exp(min(st.ce, 50)):.1f} | teachers {teacher} | "
            f"{tok_s / 1e3:.1f}k tok/s | eta {fmt_time(eta)}", force=True)


def log_eval(g, step: int, loss: float, ppl: float, log) -> None:
    if g.writer:
        g.writer.scalar("val/loss", loss, step)
        g.writer.scalar("val/ppl", ppl, step)
        g.writer.scalar("val/ppl_vs_tokens", ppl, g.tokens_seen)
        g.writer.w.flush()
    if g.leader:
        log(f"[group {g.id}] step {step} | val loss {loss:.4f} | val ppl {ppl:.2f}", force=True)


def git_sha(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_final(s, state_dict, meta: dict, model_cfg, step: int, wall: float, teacher_steps: dict,
               log=None, rss_start_mib: float = 0.0) -> None:
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
        "teacher_steps": {str(p): t for p, t in teacher_steps.items()}})


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


def read_events(tb_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """tag -> [(wall time, step, value)] by step, from every event file in ``tb_dir``, through
    TensorBoard's own reader (a later file wins for a step written twice, e.g. after resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[str, dict[int, tuple]] = {}
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            d = out.setdefault(tag, {})
            for e in ea.Scalars(tag):
                d[e.step] = (e.wall_time, e.step, e.value)
    return {tag: [d[s] for s in sorted(d)] for tag, d in out.items()}


def read_scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of ``tag`` in ``tb_dir``."""
    return {s: v for _, s, v in read_events(tb_dir).get(tag, [])}
