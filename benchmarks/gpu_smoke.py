#!/usr/bin/env python
"""The GPU tier as one prepared command: does what users run work on this node, and what does
codistillation cost here?

    python benchmarks/gpu_smoke.py [--data DIR] [--minutes 9] [--out DIR] [--only a,b] [--devices N]
    python benchmarks/gpu_smoke.py --dry_run             # the plan: what would run, what would be skipped and why

Every check is the real trainer (recipes/train_lm.py, the deepspeed launcher where a check has
several ranks) or a real script, on bf16 where the GPU has it natively (bf16 "auto"):

    main                     the README's main command (2 groups in one process, ZeRO-2)
    teachers/A/M             A in {lstm, transformer, llama_tied (an HF Llama config with
                             tie_word_embeddings, written here)}, M in {full, offload (--teacher_offload
                             cpu), topk (--teacher_topk 16)}: 2 groups in one process, teachers used
    teachers/A/partition     2+ GPUs: --teacher_partition, ZeRO-3, group 0 on 2 ranks (its teachers,
                             exports and final weights gathered over its 2 ranks, its leader's teacher
                             reaching rank 1 by NCCL), group 1 a separate launch; latest teachers, no race:
                             group 0 starts only once group 1's export is on disk (polled with a deadline)
    teachers/llama_tied/partition_topk, .../offload_topk
                             the same with top-K teachers, partitioned (ZeRO-3) and offloaded (ZeRO-2): a
                             tied head under each, gathered or fetched over a group's 2 ranks
    teachers/transformer/partition_per_task
                             the partition check with group 0's ranks bound one GPU each (torchrun,
                             CUDA_VISIBLE_DEVICES=LOCAL_RANK, as srun --gpus-per-task=1 binds): LOCAL_RANK 1
                             names a GPU its rank cannot see, so zero.Init and the teacher's engine must
                             take the mapped device (codistill/device.py bind_device)
    zero3                    ZeRO-3, 2 groups in one process
    split                    2+ GPUs: 2 ranks, one group each (NCCL world split)
    carry_state, noise_scale --carry_state (LSTM), --noise_scale (LSTM, ZeRO-2)
    init_from                --model hf --init_from a tied Llama saved here: step 1's loss is that model's
    resume                   stop at half, --resume auto, against an uninterrupted run: bitwise equal, both
                             runs under torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG
    parity                   tests/scripts/teacher_parity.py: a teacher built from an export gives the
                             student's bf16 logits (LSTM, Transformer, tied Llama)
    average                  --peer_use average, 2 groups in one process: equal at the end, fp32 exports
    diloco                   --peer_use diloco, one launch per group: group 0 on 2 ranks under ZeRO-3 (1 on a
                             1-GPU node), group 1 on 1: bit-identical at the end
    peer_models              --peer_models any: an LSTM group taught by a Transformer group's exports
    throughput               tokens/s of the baseline and of codistillation with 1 peer, the overhead ratio
                             next to the FLOP floor 1 + F/(F+B) (a measurement; always PASS when it runs)

Each check has its own time limit. A check is SKIP, with the reason, when it cannot run here: it
needs more GPUs than the node has (or than --devices allows), or the --minutes budget is spent
(before it starts, or while it runs: then it is killed and reported as SKIP, not FAIL). A check that
exceeds its own limit is FAIL. Results (JSON + a text table) are rewritten after every check under
--out (default: $OUT if set, else benchmarks/results): gpu_smoke_<gpu>.json / .txt. Exit status 1
when a check failed, else 0. Every process a check starts is killed (its whole process group) when
its time is up, so the command stops by itself within --minutes plus a few seconds.
`--device cpu --quick` runs the same checks on CPU ranks with tiny sizes (plumbing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when imported by the tests
import torch  # noqa: E402
from common import DEEPSPEED, PY, RESULTS, ROOT, free_port, median, save_results, scalars, table  # noqa: E402

from codistill.layout import RunLayout  # noqa: E402
from fileio import atomic_write_bytes

ARCHS = ("lstm", "transformer", "llama_tied")
MODES = ("full", "offload", "topk")
TOPK = 16
# the banner's words for each teacher mode (recipes/train_lm.py teacher_modes)
MODE_FLAGS = {"full": ([], None), "offload": (["--teacher_offload", "cpu"], "offloaded to host memory"),
              "topk": (["--teacher_topk", str(TOPK)], f"top-{TOPK} probabilities"),
              "partition": (["--teacher_partition"], "partitioned (ZeRO-3)")}
DETERMINISTIC_SITE = '''"""Written by benchmarks/gpu_smoke.py for its resume check: deterministic kernels in every
process of the run (cuBLAS needs CUBLAS_WORKSPACE_CONFIG; torch.use_deterministic_algorithms also
sets cudnn.deterministic). warn_only: an op without a deterministic kernel warns (the check
reports it) instead of raising."""
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
'''


class Skip(Exception):
    """The check cannot run here (too few GPUs, budget spent): SKIP with this reason."""


class Failed(Exception):
    """The check ran and an expectation failed: FAIL with this message."""


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise Failed(msg)


@dataclass
class Check:
    name: str
    fn: Callable[[Smoke], dict]  # returns {"detail": str, **numbers}; raises Failed / Skip
    gpus: int = 1                  # GPUs needed (CPU ranks with --device cpu)
    timeout: float = 120           # its own limit, seconds, for all its processes together
    estimate: float = 30           # seconds it needs at least: not started with less budget left


class Smoke:
    """The state of one gpu_smoke command: the budget, where runs go, the processes of the check
    in progress (killed when its time is up)."""

    def __init__(self, device: str = "cuda", data: str | None = None, minutes: float = 9.0, quick: bool = False,
                 devices: int | None = None, root: Path | None = None):
        self.device, self.quick = device, quick
        self.deadline = time.time() + minutes * 60
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = Path(data) if data else ROOT / "data" / "sample"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PATH"] = f"{Path(PY).parent}{os.pathsep}{self.env.get('PATH', '')}"
        if device == "cpu":
            self.env["DS_ACCELERATOR"] = "cpu"
        else:
            self.env.pop("DS_ACCELERATOR", None)
        have = torch.cuda.device_count() if device == "cuda" else 4
        self.gpus = min(have, devices) if devices is not None else have
        self.bf16 = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        self.dtype = "bfloat16" if self.bf16 else "float32"
        self.check_deadline = self.deadline
        self.procs: list[subprocess.Popen] = []

    # ---- processes: each in its own process group, killed with the check's time ----------
    def start(self, cmd: list, env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(p)
        return p

    def finish(self, p: subprocess.Popen, check: bool = True) -> str:
        """Wait for ``p`` until the check's deadline; its output. Past the deadline: Skip if the
        --minutes budget ran out, Failed if the check's own limit did."""
        try:
            out, _ = p.communicate(timeout=max(0.0, self.check_deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.kill(p)
            try:
                out, _ = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a process outside the group holds the pipe
                out = ""
            if self.check_deadline >= self.deadline:
                raise Skip(f"budget exhausted: killed at the --minutes deadline while running "
                           f"({self.tail(out, 300)})") from None
            raise Failed(f"timed out: past the check's own limit ({self.tail(out, 600)})") from None
        if check and p.returncode:
            raise Failed(f"{' '.join(p.args[:2])} ... exit {p.returncode}: {self.tail(out)}")
        return out

    def call(self, cmd: list, env: dict | None = None, check: bool = True) -> str:
        return self.finish(self.start(cmd, env), check)

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        """The whole process group (the deepspeed launcher's workers too, even where the launcher
        itself has exited): SIGTERM (the trainer checkpoints and exits), SIGKILL 10 s later."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            t = time.time() + (10 if sig == signal.SIGTERM else 5)
            while time.time() < t:
                p.poll()
                try:
                    os.killpg(p.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)

    @staticmethod
    def tail(s: str, n: int = 1500) -> str:
        return (s or "")[-n:].strip()

    # ---- the trainer -------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.root / name.replace("/", "_")

    def train_cmd(self, run: Path, flags: list, ranks: int = 1, per_task: bool = False) -> list:
        """The trainer on ``ranks`` ranks by the deepspeed launcher (every rank sees every GPU); with
        ``per_task`` by torchrun, each rank seeing only GPU LOCAL_RANK (CUDA_VISIBLE_DEVICES), as
        `srun --gpus-per-task=1` binds a task: every rank's LOCAL_RANK then names a GPU it cannot see."""
        script = [ROOT / "recipes" / "train_lm.py", "--run_dir", run, "--data", self.data, *flags]
        if per_task:
            return [Path(PY).with_name("torchrun"), "--nproc_per_node", ranks, "--master_port", free_port(),
                    "--no-python", "bash", "-c", 'CUDA_VISIBLE_DEVICES=$LOCAL_RANK exec "$0" "$@"', PY, *script]
        return [DEEPSPEED, "--num_gpus", ranks, "--master_port", free_port(), *script]

    def train(self, name: str, flags: list, ranks: int = 1, env: dict | None = None) -> tuple[Path, str]:
        run = self.run_dir(name)
        return run, self.call(self.train_cmd(run, flags, ranks), env)

    def tiny(self, steps: int = 30, k: int = 5, burn: int = 10) -> list:
        """Flags of a short run with teachers on early (tiny sizes)."""
        if self.quick:
            steps, k, burn = 12, 4, 4
        return ["--max_steps", steps, "--export_every", k, "--burn_in_steps", burn, "--eval_every", steps,
                "--save_every", steps, "--eval_batches", 4, "--seq_len", 32, "--log_every", 10]

    def vocab(self) -> int:
        man = self.data / "manifest.json"
        if not man.exists():  # the embedded corpus, prepared on first use (as the trainer would)
            from data_prep.prepare import prepare_sample
            prepare_sample(self.data, quiet=True)
        return json.loads(man.read_text())["vocab_size"]

    def model_flags(self, arch: str) -> list:
        if arch == "llama_tied":
            return ["--model", "hf", "--hf_config", self.tied_llama()]
        return ["--model", arch, "--model_size", "tiny"]

    def tied_llama(self, save_weights: bool = False) -> Path:
        """A tiny Llama config with tie_word_embeddings, written as a user writes one
        (tests/unit/test_hf_models.py); with ``save_weights``, a pretrained directory of it."""
        from transformers import LlamaConfig
        d = self.root / ("llama_pretrained" if save_weights else "llama_tied")
        if not (d / "config.json").exists():
            c = LlamaConfig(vocab_size=self.vocab(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=True)
            if save_weights:
                from transformers import AutoModelForCausalLM
                torch.manual_seed(5)
                m = AutoModelForCausalLM.from_config(c)
                with torch.no_grad():  # peaked predictions: a loss far from ln(V), which any other init gives
                    m.get_input_embeddings().weight.mul_(30)
                m.save_pretrained(d)
            else:
                c.save_pretrained(d)
        return d


# ---- what the checks read from a run -------------------------------------------------------
def tb(run: Path, g: int, tag: str) -> dict:
    return scalars(RunLayout(run).group(g).tb, tag)


def tok_s(run: Path, g: int = 0) -> float:
    """Median tokens/s of one group's steps after the first 10 (start-up excluded)."""
    v = tb(run, g, "perf/tokens_per_s")
    return median([x for s, x in v.items() if s > 10]) if v else float("nan")


def peak_gb(run: Path) -> float:
    peaks = []
    for g in (0, 1):
        f = RunLayout(run).group(g).summary
        if f.exists():  # summary.json "memory": cuda_peak_mib on a GPU, the process's peak RSS elsewhere
            mem = json.loads(f.read_text()).get("memory", {})
            peaks.append(mem.get("cuda_peak_mib") or mem.get("rss_peak_mib", 0))
    return max(peaks, default=0) / 1024


def expect_codistilled(sm: Smoke, run: Path, out: str | None, groups=(0, 1), words: str | None = None) -> None:
    """The banner names the device's dtype (and ``words``); every group's losses are finite, its
    distillation term on and a peer's export in use; its exports are in the training dtype."""
    if out is not None:
        need(f"{sm.dtype} on {sm.device}" in out, f"banner lacks '{sm.dtype} on {sm.device}': {sm.tail(out, 800)}")
        if words:
            need(words in out, f"banner lacks '{words}': {sm.tail(out, 800)}")
    from safetensors.torch import load_file
    for g in groups:
        loss = tb(run, g, "train/loss")
        need(bool(loss) and all(math.isfinite(v) for v in loss.values()), f"group {g}: losses {loss}")
        need(max(tb(run, g, "train/distill").values(), default=0) > 0, f"group {g}: no distillation term")
        used = [max((e[2] for e in v), default=0) for v in scalars_with_prefix(run, g, "teacher/step/").values()]
        need(any(s > 0 for s in used), f"group {g}: no peer's export was used as a teacher")
        exp = RunLayout(run).group(g).exports
        files = sorted(exp.glob("step_*.safetensors"))
        need(bool(files), f"group {g}: no exports in {exp}")
        dtypes = {str(t.dtype) for t in load_file(files[-1]).values()}
        need(dtypes == {f"torch.{sm.dtype}"}, f"group {g}: export {files[-1].name} holds {dtypes}, not {sm.dtype}")


def scalars_with_prefix(run: Path, g: int, prefix: str) -> dict:
    from codistill.runlog import read_events
    return {t: v for t, v in read_events(RunLayout(run).group(g).tb).items() if t.startswith(prefix)}


# ---- the checks ----------------------------------------------------------------------------
def check_main(sm: Smoke) -> dict:
    steps = 12 if sm.quick else 300
    run, out = sm.train("main", ["--ds_config", "ds_configs/zero2.json", "--max_steps", steps, "--eval_batches", 10,
                                 "--log_every", 50] + (["--export_every", 4, "--burn_in_steps", 4] if sm.quick else []))
    expect_codistilled(sm, run, out)
    return {"detail": f"{tok_s(run) / 1e3:.1f}k tok/s/group, peak {peak_gb(run):.2f} GiB",
            "tokens_per_s": tok_s(run), "peak_gib": peak_gb(run)}


def teacher_check(arch: str, mode: str) -> Callable[[Smoke], dict]:
    flags, words = MODE_FLAGS[mode]

    def fn(sm: Smoke) -> dict:
        run, out = sm.train(f"teachers/{arch}/{mode}", [*sm.model_flags(arch), *flags, *sm.tiny()])
        expect_codistilled(sm, run, out, words=words)
        return {"detail": f"distill {tb(run, 0, 'train/distill')[max(tb(run, 0, 'train/distill'))]:.3f}, "
                          f"peak {peak_gb(run):.2f} GiB", "peak_gib": peak_gb(run)}
    return fn


def wait_for_export(sm: Smoke, run: Path, g: int, step: int, proc: subprocess.Popen) -> None:
    """Poll (with the check's deadline) until group ``g``'s LATEST names an export >= ``step``."""
    latest = RunLayout(run).group(g).exports / "LATEST"
    while True:
        if latest.exists():
            m = re.search(r"(\d+)", latest.read_text())
            if m and int(m.group(1)) >= step:
                return
        if proc.poll() is not None:
            raise Failed(f"group {g} exited {proc.returncode} before exporting step {step}: "
                         f"{sm.tail(proc.stdout.read())}")
        if time.time() > sm.check_deadline:
            sm.finish(proc)  # raises Skip / Failed as the deadline says
        time.sleep(0.5)


def partition_check(arch: str, modes: tuple = ("partition",), ds: str = "zero3",
                    per_task: bool = False) -> Callable[[Smoke], dict]:
    flags = [f for m in modes for f in MODE_FLAGS[m][0]]
    words = ", ".join(MODE_FLAGS[m][1] for m in modes)
    name = f"teachers/{arch}/{'_'.join(modes)}" + ("_per_task" if per_task else "")

    def fn(sm: Smoke) -> dict:
        """Group 1 (1 rank) starts first; group 0 (2 ranks, ZeRO-3 by default: its teachers, exports
        and final weights over both) starts once group 1's first export is complete, so its leader
        finds a teacher at its burn-in; its leader's teacher reaches rank 1 by NCCL."""
        run = sm.run_dir(name)
        k = 4 if sm.quick else 5
        common = [*sm.model_flags(arch), *flags, "--ds_config", f"ds_configs/{ds}.json", "--num_groups", 2,
                  "--poll_interval", 0.2, *sm.tiny()]
        g1 = sm.start(sm.train_cmd(run, [*common, "--group_id", 1]))
        wait_for_export(sm, run, 1, k, g1)
        out = sm.call(sm.train_cmd(run, [*common, "--group_id", 0], ranks=2, per_task=per_task))
        sm.finish(g1)
        need("this rank: [0], 2 rank(s) each" in out, f"group 0 is not 2 ranks: {sm.tail(out, 800)}")
        expect_codistilled(sm, run, out, groups=(0,), words=words)
        from safetensors.torch import load_file
        mine, peer = (load_file(RunLayout(run).group(g).final / "model.safetensors") for g in (0, 1))
        shapes = {n: tuple(t.shape) for n, t in mine.items()}
        need(shapes == {n: tuple(t.shape) for n, t in peer.items()} and all(t.numel() for t in mine.values()),
             "group 0's final weights (gathered over its 2 ZeRO-3 ranks) are not the full model")
        return {"detail": f"group 0 on 2 ranks, teacher step {max(tb(run, 0, 'teacher/step/group_1').values())}, "
                          f"peak {peak_gb(run):.2f} GiB", "peak_gib": peak_gb(run)}
    return fn


def check_zero3(sm: Smoke) -> dict:
    run, out = sm.train("zero3", ["--ds_config", "ds_configs/zero3.json", *sm.tiny()])
    need("ZeRO-3" in out, f"banner lacks ZeRO-3: {sm.tail(out, 800)}")
    expect_codistilled(sm, run, out)
    return {"detail": f"2 groups in one process, peak {peak_gb(run):.2f} GiB", "peak_gib": peak_gb(run)}


def check_split(sm: Smoke) -> dict:
    run, out = sm.train("split", sm.tiny(), ranks=2)
    need("this rank: [0], 1 rank(s) each" in out, f"not a world split: {sm.tail(out, 800)}")
    expect_codistilled(sm, run, out)
    return {"detail": f"2 ranks, 1 group each, peak {peak_gb(run):.2f} GiB", "peak_gib": peak_gb(run)}


def check_carry_state(sm: Smoke) -> dict:
    run, out = sm.train("carry_state", ["--model", "lstm", "--carry_state", *sm.tiny()])
    expect_codistilled(sm, run, out)
    return {"detail": f"final train loss {tb(run, 0, 'train/loss')[max(tb(run, 0, 'train/loss'))]:.3f}"}


def check_noise_scale(sm: Smoke) -> dict:
    run, out = sm.train("noise_scale", ["--model", "lstm", "--noise_scale", "--noise_scale_every", 4, *sm.tiny()])
    expect_codistilled(sm, run, out)
    noise = tb(run, 0, "train/noise_scale")
    need(bool(noise) and all(math.isfinite(v) for v in noise.values()), f"train/noise_scale: {noise}")
    return {"detail": f"B_simple {list(noise.values())[-1]:.3g} tokens", "noise_scale": list(noise.values())[-1]}


def check_init_from(sm: Smoke) -> dict:
    """Step 1's cross entropy is the pretrained model's on the same batch (computed here with the
    trainer's dtypes on its device: bf16 parameters, fp32 buffers, as DeepSpeed casts); the
    pretrained embeddings are scaled x30 so any other start is far off."""
    from transformers import AutoModelForCausalLM

    from codistill.data import GroupStream, TokenData
    pre_dir = sm.tied_llama(save_weights=True)
    run, out = sm.train("init_from", ["--model", "hf", "--init_from", pre_dir, "--dropout", 0, *sm.tiny()])
    expect_codistilled(sm, run, out)
    dev = torch.device(sm.device)
    pre = AutoModelForCausalLM.from_pretrained(pre_dir, local_files_only=True).to(dev).eval()
    if sm.bf16:
        for p in pre.parameters():
            p.data = p.data.to(torch.bfloat16)
    batch = GroupStream(TokenData(sm.data), 0, 2, 32, 1234).batch(0, 0, 1, 0, 1, 16).to(dev)
    with torch.no_grad():
        logits = pre(batch[:, :-1]).logits.float()
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    got = tb(run, 0, "train/ce")[1]
    # bf16: the trainer's kernels may round differently (fused vs unfused paths); 2 bf16 epsilons
    # (2 * 2^-7) of the loss, far below the gap to a fresh init's ln(V)
    tol = 2 * 2 ** -7 if sm.bf16 else 1e-4
    need(abs(got - want) <= tol * abs(want), f"step 1 CE {got:.4f}, the pretrained model's {want:.4f}")
    return {"detail": f"step 1 CE {got:.3f} = pretrained {want:.3f}", "ce_step1": got, "ce_pretrained": want}


def check_resume(sm: Smoke) -> dict:
    """Deterministic kernels in both runs, so a resumed run equals the uninterrupted one bitwise
    (otherwise two GPU runs differ by the order of float sums, a difference no fixed bound captures)."""
    site = sm.root / "deterministic_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(DETERMINISTIC_SITE)
    env = dict(sm.env, CUBLAS_WORKSPACE_CONFIG=":4096:8",
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), sm.env.get("PYTHONPATH")])))
    steps = 12 if sm.quick else 40
    kw = ["--model", "transformer", "--model_size", "tiny", "--dropout", 0.1, *sm.tiny(steps),
          "--save_every", steps // 2]
    a_run, a_out = sm.train("resume_straight", kw, env=env)
    _, s_out = sm.train("resume_sliced", [*kw, "--stop_after_steps", steps // 2], env=env)
    b_run, out = sm.train("resume_sliced", kw, env=env)
    need(f"resumed from step {steps // 2}" in out, f"did not resume: {sm.tail(out, 800)}")
    warned = sorted(set(re.findall(r"(\w+) does not have a deterministic implementation", a_out + s_out + out)))
    diffs = []
    for g in (0, 1):
        x, y = tb(a_run, g, "train/loss"), tb(b_run, g, "train/loss")
        need(sorted(x) == sorted(y) == list(range(1, steps + 1)), f"group {g}: steps {sorted(x)} vs {sorted(y)}")
        diffs.append(max(abs(x[s] - y[s]) for s in x))
    need(max(diffs) == 0, f"max |loss diff| {max(diffs):.3g} after resume under deterministic algorithms"
         + (f"; ops without a deterministic kernel: {warned}" if warned else ""))
    return {"detail": f"resumed at {steps // 2}: losses bitwise equal", "max_loss_diff": max(diffs),
            "nondeterministic_ops": warned}


def check_parity(sm: Smoke) -> dict:
    out = sm.root / "parity.json"
    cmd = [PY, ROOT / "tests" / "scripts" / "teacher_parity.py", "--device", sm.device, "--out", out]
    sm.call(cmd + (["--bf16"] if sm.bf16 else []) + (["--seq_len", 256] if sm.quick else []))
    r = json.loads(out.read_text())
    for arch, v in r.items():
        # the same weights, dtypes and device: what may differ is a kernel's choice (cuDNN's
        # flattened LSTM weights, another GEMM layout) rounding a bf16 output: 1 bf16 epsilon
        # (2^-7) of the largest logit; fp32: exact
        need(v["max_abs_diff"] <= (2 ** -7 * v["logit_scale"] if sm.bf16 else 0.0), f"{arch}: {v}")
    if sm.bf16:  # the measure can fail: a teacher cast with module.to(bf16) (RoPE table too) drifts
        t = r["transformer"]
        need(t["naive_cast_max_abs_diff_late_positions"] > t["max_abs_diff_late_positions"], f"transformer: {t}")
    return {"detail": ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in r.items()), "results": r}


def final_weights(run: Path, g: int) -> dict:
    from safetensors.torch import load_file
    return load_file(RunLayout(run).group(g).final / "model.safetensors")


def check_average(sm: Smoke) -> dict:
    """--peer_use average, 2 groups in one process (ZeRO-2): the last step is an exchange step, so
    both groups end with the same weights (bit for bit); the exports hold fp32 masters."""
    k = 4 if sm.quick else 5
    run, out = sm.train("average", ["--peer_use", "average", *sm.tiny()])
    from safetensors.torch import load_file
    a, b = final_weights(run, 0), final_weights(run, 1)
    need(set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), "the groups' final weights differ "
         "after the last exchange step")
    last = sorted(RunLayout(run).group(0).exports.glob("step_*.safetensors"))[-1]
    dtypes = {str(t.dtype) for t in load_file(last).values()}
    need(dtypes == {"torch.float32"}, f"export {last.name} holds {dtypes}, not the fp32 masters")
    need(f"{sm.dtype} on {sm.device}" in out, f"banner lacks '{sm.dtype} on {sm.device}': {sm.tail(out, 800)}")
    return {"detail": f"2 groups averaged every {k} steps, equal at the end; exports fp32"}


def check_diloco(sm: Smoke) -> dict:
    """--peer_use diloco in one launch per group (--group_id; NCCL between a group's ranks): group 0
    on 2 ranks under ZeRO-3 where the node has 2 GPUs (its leader reads the exports and broadcasts
    the weights to rank 1), else 1; group 1 on 1 rank (GPU 0, shared). Both take the same outer
    steps from the same exports, so both end bit-identical."""
    run = sm.run_dir("diloco")
    ranks = min(2, sm.gpus)
    common = ["--peer_use", "diloco", "--num_groups", 2, "--poll_interval", 0.2, "--teacher_timeout", 120,
              *sm.tiny()]
    g1 = sm.start(sm.train_cmd(run, [*common, "--group_id", 1]))
    out = sm.call(sm.train_cmd(run, [*common, "--group_id", 0, "--ds_config", "ds_configs/zero3.json"], ranks=ranks))
    out1 = sm.finish(g1)
    steps = 12 if sm.quick else 30
    for g, o in ((0, out), (1, out1)):
        need(f"[group {g}] step {steps}: --peer_use diloco over groups [0, 1]" in o,
             f"group {g} did not average over both groups at step {steps}: {sm.tail(o, 800)}")
    a, b = final_weights(run, 0), final_weights(run, 1)
    need(set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), "the groups' final weights differ")
    return {"detail": f"group 0 on {ranks} rank(s) (ZeRO-3), group 1 on 1: bit-identical at the end"}


def check_peer_models(sm: Smoke) -> dict:
    """--peer_models any: a Transformer group (1, started first) teaches an LSTM group (0) that starts
    once the Transformer's first export is on disk; the LSTM builds its teacher as that Transformer."""
    run = sm.run_dir("peer_models")
    k = 4 if sm.quick else 5
    common = ["--peer_models", "any", "--num_groups", 2, "--poll_interval", 0.2, *sm.tiny()]
    g1 = sm.start(sm.train_cmd(run, [*common, "--group_id", 1, "--model", "transformer", "--model_size", "tiny"]))
    wait_for_export(sm, run, 1, k, g1)
    out = sm.call(sm.train_cmd(run, [*common, "--group_id", 0, "--model", "lstm", "--model_size", "tiny"]))
    sm.finish(g1)
    expect_codistilled(sm, run, out, groups=(0,))
    return {"detail": f"LSTM taught by a Transformer, teacher step {max(tb(run, 0, 'teacher/step/group_1').values())}"}


def fwd_share(device: str, size: str, micro: int, seq_len: int, vocab: int, reps: int = 20) -> float:
    """F / (F + B) of one student step in plain PyTorch on ``device`` (bf16 where native)."""
    from model import build_model, preset_config
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(preset_config("transformer", size, vocab)).to(dev)
    x = torch.randint(0, vocab, (micro, seq_len + 1), device=dev)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        model = model.to(torch.bfloat16)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def fwd():
        with torch.no_grad():
            model(x[:, :-1])

    def both():
        torch.nn.functional.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten()).backward()

    f = [timed(fwd) for _ in range(reps)]
    fb = [timed(both) for _ in range(reps)]
    return median(f[3:]) / median(fb[3:])


def check_throughput(sm: Smoke) -> dict:
    size, seq = ("tiny", 64) if sm.quick else ("small", 256)
    steps, k = (12, 4) if sm.quick else (120, 20)
    flags = ["--model", "transformer", "--model_size", size, "--seq_len", seq, "--max_steps", steps,
             "--export_every", k, "--burn_in_steps", 0, "--eval_every", 1000, "--save_every", 100000,
             "--eval_batches", 10, "--log_every", 50]
    base, _ = sm.train("tp_base", [*flags, "--num_groups", 1])
    cod, _ = sm.train("tp_codistill", [*flags, "--num_groups", 2])
    t0 = tb(base, 0, "perf/step_time")
    t1 = [v for s, v in tb(cod, 0, "perf/step_time").items() if s > 2 * k]  # teachers on from 2K + 1
    ratio = median(t1) / median([v for s, v in t0.items() if s > min(10, steps // 2)])
    floor = 1 + fwd_share(sm.device, size, 16, seq, sm.vocab())
    return {"detail": f"baseline {tok_s(base) / 1e3:.1f}k tok/s, 1 peer {tok_s(cod) / 1e3:.1f}k tok/s/group: "
                      f"ratio {ratio:.2f} vs floor {floor:.2f} ({ratio / floor:.2f} of it)",
            "baseline_tokens_per_s": tok_s(base), "codistill_tokens_per_s": tok_s(cod), "ratio": ratio,
            "flop_floor": floor, "ratio_over_floor": ratio / floor, "peak_gib_baseline": peak_gb(base),
            "peak_gib_codistill": peak_gb(cod)}


# In priority order: when the budget runs short, the later ones are the ones skipped.
CHECKS = [Check("main", check_main, timeout=150, estimate=40),
          *[Check(f"teachers/{a}/{m}", teacher_check(a, m), timeout=100, estimate=25) for a in ARCHS for m in MODES],
          *[Check(f"teachers/{a}/partition", partition_check(a), gpus=2, timeout=150, estimate=45) for a in ARCHS],
          Check("teachers/llama_tied/partition_topk", partition_check("llama_tied", ("partition", "topk")), gpus=2,
                timeout=150, estimate=45),
          Check("teachers/llama_tied/offload_topk", partition_check("llama_tied", ("offload", "topk"), "zero2"),
                gpus=2, timeout=150, estimate=45),
          Check("teachers/transformer/partition_per_task", partition_check("transformer", per_task=True), gpus=2,
                timeout=150, estimate=45),
          Check("zero3", check_zero3, timeout=100, estimate=25),
          Check("split", check_split, gpus=2, timeout=100, estimate=30),
          Check("carry_state", check_carry_state, timeout=100, estimate=25),
          Check("noise_scale", check_noise_scale, timeout=100, estimate=25),
          Check("init_from", check_init_from, timeout=100, estimate=30),
          Check("resume", check_resume, timeout=200, estimate=75),
          Check("parity", check_parity, timeout=150, estimate=30),
          Check("average", check_average, timeout=100, estimate=25),
          Check("diloco", check_diloco, timeout=150, estimate=40),
          Check("peer_models", check_peer_models, timeout=150, estimate=40),
          Check("throughput", check_throughput, timeout=200, estimate=60)]
BY_NAME = {c.name: c for c in CHECKS}


def run_check(sm: Smoke, c: Check) -> dict:
    """One check: {"result": PASS | FAIL | SKIP, "ok": True | False | None, "detail", "seconds", ...}."""
    t0 = time.time()
    left = sm.deadline - t0
    try:
        if sm.gpus < c.gpus:
            raise Skip(f"needs {c.gpus} {'GPUs' if sm.device == 'cuda' else 'ranks'}, "
                       f"{sm.gpus} available{' (--devices)' if sm.device == 'cuda' else ''}")
        if left < c.estimate:
            raise Skip(f"budget exhausted: {max(0, left):.0f} s of --minutes left, the check needs ~{c.estimate:.0f} s")
        sm.check_deadline = min(t0 + c.timeout, sm.deadline)
        r = {"result": "PASS", "ok": True, **c.fn(sm)}
    except Skip as e:
        r = {"result": "SKIP", "ok": None, "detail": str(e)}
    except (Failed, AssertionError, KeyError, ValueError, OSError, RuntimeError) as e:
        r = {"result": "FAIL", "ok": False, "detail": f"{type(e).__name__}: {str(e)[-1500:]}"}
    finally:
        for p in sm.procs:
            sm.kill(p)
        sm.procs.clear()
    r["seconds"] = round(time.time() - t0, 1)
    return r


def select(only: str | None) -> list[Check]:
    """--only: names or prefixes ("teachers/lstm" = its 3-4 checks), comma separated."""
    if not only:
        return CHECKS
    want = [w.strip() for w in only.split(",") if w.strip()]
    bad = [w for w in want if not any(c.name == w or c.name.startswith(w + "/") for c in CHECKS)]
    if bad:
        sys.exit(f"gpu_smoke --only: unknown checks {bad}; choose from {[c.name for c in CHECKS]}")
    return [c for c in CHECKS if any(c.name == w or c.name.startswith(w + "/") for w in want)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a prepared data directory (default: the embedded corpus, prepared on first use)")
    ap.add_argument("--minutes", type=float, default=9.0, help="the budget: no check runs past it (default 9)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--devices", type=int, help="use at most this many GPUs (checks needing more are SKIP)")
    ap.add_argument("--only", help="comma list of check names or prefixes (e.g. main,teachers/lstm)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (plumbing check)")
    ap.add_argument("--dry_run", action="store_true", help="write the plan (SKIP reasons included), run nothing")
    ap.add_argument("--out", "--results_dir", dest="out", default=os.environ.get("OUT") or str(RESULTS),
                    help="where gpu_smoke_<gpu>.json/.txt go (default: $OUT, else benchmarks/results)")
    ap.add_argument("--keep_runs", help="keep the run directories here (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available() and not a.dry_run:
        sys.exit("gpu_smoke: no CUDA device here (--device cpu --quick checks the plumbing on CPU ranks)")
    todo = select(a.only)
    sm = Smoke(a.device, a.data, a.minutes, a.quick, a.devices, a.keep_runs)
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" and torch.cuda.is_available() else a.device
    print(f"gpu_smoke on {gpu} ({sm.gpus} device(s)), expecting {sm.dtype}; budget {a.minutes:g} min; "
          f"runs under {sm.root}", flush=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    results, rows = {}, []

    def save() -> Path:
        path = save_results(f"gpu_smoke_{tag}", {"gpu": gpu, "devices": sm.gpus, "dtype": sm.dtype,
                                                  "torch": torch.__version__, "quick": a.quick, "dry_run": a.dry_run,
                                                  "minutes": a.minutes, "order": list(results), "checks": results}, a.out)
        atomic_write_bytes(path.with_suffix(".txt"), (table(rows, ["check", "result", "seconds", "detail"]) + "\n")
                           .encode())
        return path

    for c in todo:
        if a.dry_run:
            r = {"result": "SKIP" if sm.gpus < c.gpus else "PLANNED", "ok": None, "seconds": 0.0,
                 "detail": (f"needs {c.gpus} GPUs, {sm.gpus} available" if sm.gpus < c.gpus else
                            f"limit {c.timeout:.0f} s, needs ~{c.estimate:.0f} s")}
        else:
            r = run_check(sm, c)
        results[c.name] = r
        rows.append([c.name, r["result"], r["seconds"], r["detail"][:200].replace("\n", " ")])
        print(f"{c.name:28s} {r['result']:4s} {r['seconds']:6.1f} s  {r['detail'][:300]}", flush=True)
        path = save()
    print()
    print(table(rows, ["check", "result", "seconds", "detail"]))
    print(f"\nresults: {path} (+ .txt)")
    if not a.keep_runs:
        shutil.rmtree(sm.root, ignore_errors=True)
    return 1 if any(r["ok"] is False for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
