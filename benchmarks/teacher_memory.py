#!/usr/bin/env python
"""How much memory codistillation's teachers take on each GPU rank, and which placement fits:
an analytic model, its table for Llama shapes of 125M to 70B parameters, and a check of the
model against the real trainer's peak memory on CPU.

    python benchmarks/teacher_memory.py                  # tables + measured check (6-10 min, 2 cores)
    python benchmarks/teacher_memory.py --no-measure     # tables only (instant)
    python benchmarks/teacher_memory.py --no-measure --activation_checkpointing --micro_batches 1   # what-ifs

The model counts the bytes one rank holds, by component (``bytes_per_rank``). P parameters, w
bytes per weight in the compute dtype (bf16 on a GPU: 2; fp32 on CPU: 4), G groups of n ranks
each, a micro-batch of B x T tokens, vocabulary V, width d:

    student       weights P*w, fp32 master copy 4P, fp32 gradients 4P (grad_accum_dtype fp32
                  under bf16), Adam's two fp32 moments 8P, partitioned over the group's n ranks
                  as DeepSpeed does it: ZeRO-1 the master and moments (with bf16 DeepSpeed's
                  BF16_Optimizer keeps full fp32 gradients), ZeRO-2 also the gradients, ZeRO-3
                  also the weights (18/n bytes per parameter in bf16; the ZeRO paper's 16 has
                  16-bit gradients). fp32 stage 0 and fp32 ZeRO-3 keep no separate master copy
                  (the weights are it); fp32 ZeRO-1/2 clone one (stage_1_and_2.py). ZeRO-2/3 add
                  the gradient reduce bucket (reduce_bucket_size elements x w; 5e8 on GPU),
                  ZeRO-3 the layer it gathers for the forward. Non-fused AdamW (torch's foreach,
                  the CPU path) allocates one fp32 temporary of the optimizer's partition per step.
    activations   what autograd keeps for the backward pass: per layer and token
                  d*(w*(8 + 2*kv_dim/d + 4*d_ff/d) + 4) bytes (the 4 only under bf16: RMSNorm's
                  fp32 upcasts), plus d*(3w + 4) outside the layers - measured on transformers'
                  Llama (sdpa attention) with saved_tensors_hooks (tests/unit/test_teacher_memory.py
                  measures it again). The trainer has no activation checkpointing;
                  --activation_checkpointing shows what it would leave: each layer's input, w*d
                  per layer and token, plus one layer's activations while it is recomputed.
    logits        student logits B*T*V*w, their gradient (as big), one fp32 loss chunk
                  (--loss_chunk_mb, 32 MiB).
    teachers      G-1 peers. full: (G-1)*P*w on every rank. partition: (G-1)*P*w/n (ZeRO-3 over
                  the group's ranks) + one layer gathered for the forward. offload: weights in
                  pinned host memory ((G-1)*P*w host bytes per rank); the device holds 2 layers
                  (the one computing, the next one arriving). A "layer" is a decoder block or
                  the V x d embedding, whichever is bigger: an upper bound on the submodules
                  DeepSpeed and the offload hooks actually hold.
    probabilities dense: the fp32 average B*T*V*4, plus a second such buffer with 2+ teachers.
                  top-K: B*T*K*(4 + 8) (fp32 values, int64 indices) + B*T*4 (rest mass), one
                  fp32 chunk (--loss_chunk_mb) and the teachers' states before the output head,
                  (G-1)*B*T*d*w (each teacher runs its body once, then its head chunk by chunk).
    host          on the group's leader: the loader's read buffers (G-1)*P*w (pinned on a GPU),
                  the copy of its own weights being exported, P*w; when training ends, the
                  final/ copy P*w and (Transformers) the fp32 model final/hf is written from, 4P.

Components are held in phases: the student's and teachers' states all along; the teachers'
forward transients (one teacher's logits B*T*V*w while its softmax is taken, or the top-K hidden
states and head chunk, the gathered or streamed layers) are freed before the student's forward;
the step's (activations, logits, gradient, optimizer temporary) after its update. The device
peak is the states plus the larger of the two transient sets; the step's own set is summed
(activations are freed during the backward pass, before the update's temporary: an upper
bound). "Fits" means the peak is at most 90% of an 80 GiB GPU: the other 10% are left for the
CUDA context, NCCL buffers and the allocator's fragmentation. Teachers' own inference
activations (freed layer by layer) are not counted.

Measured check (--measure, default on): the real trainer (recipes/train_lm.py, fp32 on CPU, a
few steps, teachers swapped in at step 5) with a weights-dominated Llama (38 M parameters, 4 x 64
tokens) and a probabilities-dominated one (1.5 M parameters, 32 x 256 tokens). On CPU the device
and the host are the same RAM, so the prediction is the states (device and host) plus the
largest of the teachers' forward, the step, an export being written and the end of training
(an export's write, shorter than a step here, falls between two steps' peaks), against the
growth of the group leader's RSS (summary.json "memory": VmHWM at the end minus RSS before the
students are built). A one-rank group runs zero2.json as stage 0, a two-rank one as ZeRO-2.
glibc keeps freed heap memory resident, so the runs set MALLOC_MMAP_THRESHOLD_=65536: tensors'
pages go back to the kernel when freed and peak RSS follows peak live bytes (as
torch.cuda.max_memory_allocated does on a GPU). Each case is compared absolutely and, against a reference case, by its
difference (which cancels the framework's own overhead, reported by the baseline rows); PASS
within 20%. Results: benchmarks/results/teacher_memory.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MiB, GiB = 2**20, 2**30
GPU_BYTES = 80 * GiB
USABLE = 0.9  # of GPU_BYTES; the rest is headroom (CUDA context, NCCL, fragmentation)
TOLERANCE = 0.2
MODES = ("full", "partition", "offload")


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder (RMSNorm, SwiGLU MLP, RoPE, grouped-query attention), as
    model/transformer.py and ``--model hf`` build it."""
    name: str
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.d_model // self.n_heads * self.n_kv_heads

    @property
    def block_params(self) -> int:
        d = self.d_model
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.d_ff + 2 * d

    @property
    def params(self) -> int:
        return self.n_layers * self.block_params + self.vocab * self.d_model * (1 if self.tied else 2) + self.d_model

    @property
    def largest_layer(self) -> int:
        return max(self.block_params, self.vocab * self.d_model)

    def activation_bytes(self, tokens: int, w: int, checkpointing: bool = False) -> int:
        """Bytes autograd saves for the backward pass over ``tokens`` tokens; with activation
        checkpointing, each layer's input and one layer's activations while it is recomputed."""
        d, upcast = self.d_model, 4 if w < 4 else 0
        per_layer = w * (8 + 2 * self.kv_dim / d + 4 * self.d_ff / d) + upcast
        layers = self.n_layers * w + per_layer if checkpointing else self.n_layers * per_layer
        return int(tokens * d * (layers + 3 * w + upcast))

    def hf_config(self, max_positions: int = 1024) -> dict:
        """The transformers config of this shape (for ``--model hf --hf_config``)."""
        from transformers import LlamaConfig
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.d_model, num_hidden_layers=self.n_layers,
                           num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                           intermediate_size=self.d_ff, tie_word_embeddings=self.tied,
                           max_position_embeddings=max_positions).to_dict()


SHAPES = {  # 32 k vocabulary throughout (Llama 2's); P computed from the shapes
    "125m": Shape("125m", 32000, 768, 12, 12, 12, 2048, tied=False),   # GPT-3 Small's width/depth, SwiGLU
    "1b": Shape("1b", 32000, 2048, 16, 32, 8, 8192, tied=True),        # Llama 3.2 1B with a 32 k vocabulary
    "7b": Shape("7b", 32000, 4096, 32, 32, 32, 11008, tied=False),     # Llama 2 7B
    "70b": Shape("70b", 32000, 8192, 80, 64, 8, 28672, tied=False),    # Llama 2 70B
}


@dataclass
class Memory:
    """Bytes by component and by when they are held. On the device: ``state`` all along,
    ``teacher`` during the teachers' forward, ``step`` during the student's forward, backward and
    update (the teachers run first, so those two never overlap). On the group leader's host:
    ``host`` all along, ``export`` while an export is being written (a background thread; the
    copy is freed when the write ends), ``end`` when training ends."""
    state: dict
    teacher: dict
    step: dict
    host: dict
    export: dict
    end: dict

    @property
    def device_peak(self) -> int:
        return sum(self.state.values()) + max(sum(self.teacher.values()), sum(self.step.values()))

    @property
    def host_peak(self) -> int:
        return sum(self.host.values()) + max(sum(self.export.values()), sum(self.end.values()))

    @property
    def fits(self) -> bool:
        return self.device_peak <= USABLE * GPU_BYTES

    @property
    def one_memory_peak(self) -> int:
        """Device and host as one memory (a CPU run), with an export written between two steps'
        peaks (a write shorter than a step; a longer one can add its P*w to a step's peak)."""
        phases = (self.teacher, self.step, self.export, self.end)
        return sum(self.state.values()) + sum(self.host.values()) + max(sum(p.values()) for p in phases)


def student_bytes(P: int, n: int, stage: int, w: int, fused_adam: bool, reduce_bucket: float,
                  layer: int) -> tuple[dict, dict]:
    """A DeepSpeed student's (states, step transients) on one of its group's n ranks (see the
    module docstring); stage 0 gradients exist from the backward pass to the update only."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if stage == 0 and w < 4:
        raise ValueError("ZeRO stage 0 with bf16 runs as ZeRO-1 (codistill/ds_config.py)")
    opt = n if stage >= 1 else 1
    grads = {"student_grads": 4 * P // (n if stage >= 2 else 1)}
    state = {"student_weights": P * w // (n if stage == 3 else 1),
             "student_master": 4 * P // n if w < 4 or stage in (1, 2) else 0,
             **(grads if stage else {}),
             "student_adam": 8 * P // opt,
             "zero_bucket": int(reduce_bucket) * w if stage >= 2 else 0}
    step = {**({} if stage else grads), "optimizer_step_temp": 0 if fused_adam else 4 * P // opt,
            "student_gathered": layer * w if stage == 3 else 0}
    return state, step


def bytes_per_rank(shape: Shape, groups: int, ranks: int, zero_stage: int = 3, teachers: str = "full", topk: int = 0,
                   micro_batch: int = 4, seq: int = 2048, weight_bytes: int = 2, fused_adam: bool = True,
                   loss_chunk_mb: float = 32.0, reduce_bucket: float = 5e8, checkpointing: bool = False) -> Memory:
    """The bytes one rank of a group holds (and its leader's host bytes), by component and phase.
    ``checkpointing``: activation checkpointing, which the trainer does not have (a what-if)."""
    if teachers not in MODES:
        raise ValueError(f"teachers must be one of {MODES}, got {teachers!r}")
    if teachers == "partition" and ranks < 2:
        raise ValueError("partitioned teachers need groups of >= 2 ranks")
    P, w, V, d, layer = shape.params, weight_bytes, shape.vocab, shape.d_model, shape.largest_layer
    peers, tokens = groups - 1, micro_batch * seq
    chunk = min(int(loss_chunk_mb * MiB), tokens * V * 4)
    state, step = student_bytes(P, ranks, zero_stage, w, fused_adam, reduce_bucket, layer)
    step.update(student_activations=shape.activation_bytes(tokens, w, checkpointing), student_logits=tokens * V * w,
                student_logits_grad=tokens * V * w, loss_chunk=chunk)
    teacher, host, export = {}, {}, {}
    if peers:
        if teachers == "full":
            state["teacher_weights"] = peers * P * w
        elif teachers == "partition":
            state["teacher_weights"] = peers * P * w // ranks
            teacher["teacher_gathered"] = layer * w
        else:
            host["teacher_weights_offloaded"] = peers * P * w
            teacher["teacher_streamed"] = 2 * layer * w
        if topk:
            state["teacher_topk"] = tokens * (topk * 12 + 4)
            teacher.update(teacher_hidden=peers * tokens * d * w, teacher_chunk=chunk)
        else:
            state["teacher_probs"] = tokens * V * 4
            state["teacher_probs_spare"] = tokens * V * 4 if peers >= 2 else 0
            teacher["teacher_logits"] = tokens * V * w  # one teacher's, while its softmax is taken
        host["loader_buffers"] = peers * P * w
        export["export_snapshot"] = P * w
    return Memory(state, teacher, step, host, export, {"final_weights": P * w, "final_hf_model": 4 * P})


# ---- the tables ---------------------------------------------------------------------------
def layouts(name: str) -> list[tuple[int, int]]:
    """(ZeRO stage, ranks per group) rows of a model's table."""
    ns = (1, 8, 64) if name == "70b" else (1, 8)
    return [(3, n) for n in ns] + [(1, 8), (2, 8)]


def mib(part: dict) -> dict:
    return {k: round(v / MiB, 1) for k, v in part.items() if v}


def breakdown(m: Memory) -> dict:
    return {"device_state": mib(m.state), "device_teacher_forward": mib(m.teacher), "device_step": mib(m.step),
            "host": mib(m.host), "host_export": mib(m.export), "host_end": mib(m.end)}


def grid(micro_batches, seq: int, topk: int, checkpointing: bool) -> tuple[list[dict], list[dict]]:
    """Every (model, micro-batch, ZeRO layout, G, teacher mode, probabilities) row, and the MiB by
    component of the rows with 8 ranks per group and 8 groups (the rest: ``bytes_per_rank``)."""
    rows, parts = [], []
    for name, shape in SHAPES.items():
        for B, (stage, n), G in itertools.product(micro_batches, layouts(name), (1, 2, 4, 8)):
            modes = [(m, k) for m in MODES for k in (0, topk) if m != "partition" or n > 1] if G > 1 else [("full", 0)]
            for mode, k in modes:
                m = bytes_per_rank(shape, G, n, stage, mode, k, B, seq, checkpointing=checkpointing)
                row = {"model": name, "micro_batch": B, "zero_stage": stage, "ranks_per_group": n, "groups": G,
                       "teachers": mode if G > 1 else "none", "probs": f"top{k}" if k else "dense",
                       "device_peak_gib": round(m.device_peak / GiB, 2),
                       "leader_host_peak_gib": round(m.host_peak / GiB, 2), "fits_80gb": m.fits}
                rows.append(row)
                if (stage, n, G) == (3, 8, 8):
                    parts.append(dict(row, mib=breakdown(m)))
    return rows, parts


def print_tables(rows: list[dict], B: int, seq: int, topk: int, checkpointing: bool) -> None:
    from common import table
    cols = [(mode, p) for mode in MODES for p in ("dense", f"top{topk}")]
    for name, shape in SHAPES.items():
        mine = [r for r in rows if r["model"] == name and r["micro_batch"] == B]
        tokens = f"{B} x {seq} tokens" + (", activation checkpointing" if checkpointing else "")
        body = []
        for stage, n in layouts(name):
            at = {(r["groups"], r["teachers"], r["probs"]): r for r in mine
                  if (r["zero_stage"], r["ranks_per_group"]) == (stage, n)}
            for G in (2, 4, 8):
                cells = [at.get((G, m, p)) for m, p in cols]
                body.append([f"ZeRO-{stage}", n, G, f"{at[(1, 'none', 'dense')]['device_peak_gib']:.1f}"]
                            + [f"{c['device_peak_gib']:.1f}" + ("" if c["fits_80gb"] else " x") if c else "-"
                               for c in cells]
                            + [" / ".join(f"{at[(G, m, 'dense')]['leader_host_peak_gib']:.1f}"
                                          for m in ("full", "offload"))])
        print(f"\n{name}: P = {shape.params / 1e9:.3f} B (d {shape.d_model}, {shape.n_layers} layers, d_ff "
              f"{shape.d_ff}, kv heads {shape.n_kv_heads}/{shape.n_heads}, vocab {shape.vocab}); micro-batch "
              f"{tokens}; device peak GiB per rank (x: over {USABLE * GPU_BYTES / GiB:.0f} GiB)")
        print(table(body, ["student", "n", "G", "no teachers", *(f"{m} {p}" for m, p in cols),
                           "leader host GiB full / offload"]))


# ---- the measured check -------------------------------------------------------------------
CONFIGS = {  # weights-dominated and probabilities-dominated; fp32 on CPU
    "W": (Shape("cpu-38m", 8000, 512, 8, 8, 8, 2048, tied=True), 4, 64),
    "Q": (Shape("cpu-1.5m", 8000, 128, 2, 4, 4, 512, tied=True), 32, 256),
}


@dataclass(frozen=True)
class Case:
    name: str
    config: str          # key of CONFIGS
    ranks: int           # world size of the launch (groups x ranks per group)
    groups: int
    teachers: str = "full"
    topk: int = 0
    ref: str | None = None  # the case whose growth this one's difference is compared with

    @property
    def per_group(self) -> int:
        return self.ranks // self.groups

    @property
    def flags(self) -> list[str]:
        return (["--teacher_partition"] if self.teachers == "partition" else []) + \
               (["--teacher_offload", "cpu"] if self.teachers == "offload" else []) + \
               (["--teacher_topk", str(self.topk)] if self.topk else [])

    def predict(self) -> Memory:
        """The model for this run: fp32, torch's foreach AdamW, the CPU bucket (touched up to P)."""
        shape, B, T = CONFIGS[self.config]
        n = self.per_group
        stage = 0 if n == 1 else 2  # ds_configs/zero2.json; a one-rank fp32 group runs as stage 0
        return bytes_per_rank(shape, self.groups, n, stage, self.teachers, self.topk, B, T, weight_bytes=4,
                              fused_adam=False, reduce_bucket=min(5e7, shape.params))


CASES = [
    Case("W baseline (no teachers)", "W", 1, 1),
    Case("W full, G=2", "W", 2, 2, ref="W baseline (no teachers)"),
    Case("W full, G=3", "W", 3, 3, ref="W full, G=2"),
    Case("W offload, G=2", "W", 2, 2, "offload", ref="W baseline (no teachers)"),
    Case("W full, G=2, n=2", "W", 4, 2),
    Case("W partition, G=2, n=2", "W", 4, 2, "partition", ref="W full, G=2, n=2"),
    Case("Q baseline (no teachers)", "Q", 1, 1),
    Case("Q dense, G=2", "Q", 2, 2, ref="Q baseline (no teachers)"),
    Case("Q top-64, G=2", "Q", 2, 2, topk=64, ref="Q dense, G=2"),
]


def trainer_flags() -> str:
    from common import PY, ROOT
    return subprocess.run([PY, str(ROOT / "recipes" / "train_lm.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout


def verdict(measured: float, predicted: float) -> tuple[float, str]:
    ratio = measured / predicted if predicted else float("nan")
    return ratio, "PASS" if abs(ratio - 1) <= TOLERANCE else "FAIL"


def measure(a, root: Path) -> list[dict]:
    from common import bench_data, train
    help_text = trainer_flags()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave RSS (see the module docstring)
    data = Path(a.data) if a.data else bench_data()
    zero2 = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json").read_text())
    for key, (shape, B, T) in CONFIGS.items():  # the model (--model hf) and a zero2.json of its micro-batch
        (root / f"{key}.json").write_text(json.dumps(shape.hf_config(max(1024, T))))
        (root / f"ds_{key}.json").write_text(json.dumps(dict(zero2, train_micro_batch_size_per_gpu=B)))
    out: dict[str, dict] = {}
    for case in CASES:
        missing = [f for f in case.flags if f.startswith("--") and f not in help_text]
        if missing:
            print(f"{case.name}: skipped - the trainer has no {missing[0]} flag (yet)", flush=True)
            continue
        shape, B, T = CONFIGS[case.config]
        run = root / "".join(c for c in case.name.replace(" ", "_") if c.isalnum() or c in "_=")
        args = ["--model", "hf", "--hf_config", root / f"{case.config}.json", "--ds_config",
                root / f"ds_{case.config}.json", "--data", data, "--num_groups", case.groups,
                "--seq_len", T, "--max_steps", a.steps or 6, "--export_every", 2, "--burn_in_steps", 0,
                "--warmup_steps", 1, "--eval_every", 1000, "--eval_batches", 1, "--save_every", 1000,
                "--log_every", 1000, *case.flags]
        wall = train(run, args, case.ranks)
        summary = json.loads((run / "group_0" / "summary.json").read_text())
        mem = summary.get("memory")
        if not mem:
            sys.exit(f"{run}/group_0/summary.json has no 'memory' (rss_start_mib, rss_peak_mib): this trainer does "
                     "not record its peak memory yet")
        if summary["num_params"] != shape.params:
            sys.exit(f"{case.name}: the trainer built {summary['num_params']} parameters, the model counts "
                     f"{shape.params}: the Shape formula no longer matches the architecture")
        pred = case.predict()
        r = {"case": case.name, "ranks": case.ranks, "groups": case.groups, "teachers": case.teachers,
             "topk": case.topk, "params": shape.params, "micro_batch": B, "seq": T, "wall_s": round(wall, 1),
             "rss_start_mib": mem["rss_start_mib"], "rss_peak_mib": mem["rss_peak_mib"],
             "measured_growth_mib": mem["rss_peak_mib"] - mem["rss_start_mib"],
             "predicted_mib": pred.one_memory_peak / MiB,
             "predicted_mib_by_phase": breakdown(pred),
             "ref": case.ref}
        r["ratio"], r["verdict"] = verdict(r["measured_growth_mib"], r["predicted_mib"])
        if case.ref in out:
            ref = out[case.ref]
            r["measured_diff_mib"] = r["measured_growth_mib"] - ref["measured_growth_mib"]
            r["predicted_diff_mib"] = r["predicted_mib"] - ref["predicted_mib"]
            r["diff_ratio"], r["diff_verdict"] = verdict(r["measured_diff_mib"], r["predicted_diff_mib"])
        out[case.name] = r
        print(f"{case.name}: growth {r['measured_growth_mib']:.0f} MiB, predicted {r['predicted_mib']:.0f} MiB "
              f"({r['ratio']:.2f}, {r['verdict']}; {wall:.0f} s)", flush=True)
    return list(out.values())


def print_measured(rows: list[dict]) -> None:
    from common import table

    def diff(r):
        return (f"{r['measured_diff_mib']:+.0f} / {r['predicted_diff_mib']:+.0f} = {r['diff_ratio']:.2f} "
                f"{r['diff_verdict']}") if "diff_ratio" in r else "-"

    body = [[r["case"], f"{r['params'] / 1e6:.1f}M", f"{r['micro_batch']}x{r['seq']}",
             f"{r['measured_growth_mib']:.0f}", f"{r['predicted_mib']:.0f}", f"{r['ratio']:.2f} {r['verdict']}",
             r["ref"] if "diff_ratio" in r else "-", diff(r)] for r in rows]
    print("\nMeasured on CPU (fp32; RSS growth of group 0's leader, MiB; PASS within 20%)")
    print(table(body, ["case", "P", "B x T", "measured", "predicted", "ratio", "difference vs",
                       "difference measured / predicted"]))


def main() -> None:
    from common import add_run_args, runs_root, save_results
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the trainer on CPU and compare its peak memory with the model")
    ap.add_argument("--micro_batches", default="4", help="micro-batch sizes (sequences per rank), comma-"
                    "separated: the first is printed, all go to the JSON")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--activation_checkpointing", action="store_true",
                    help="tables as if the student checkpointed its activations (the trainer does not: a what-if)")
    add_run_args(ap)
    a = ap.parse_args()
    micro = [int(b) for b in a.micro_batches.split(",")]
    rows, parts = grid(micro, a.seq, a.topk, a.activation_checkpointing)
    print_tables(rows, micro[0], a.seq, a.topk, a.activation_checkpointing)
    measured = []
    if a.measure:
        root = runs_root(a, "teacher_memory_")
        measured = measure(a, root)
        print_measured(measured)
        if not a.keep_runs:
            shutil.rmtree(root)  # checkpoints of every run: GBs
    assumptions = {"gpu_bytes": GPU_BYTES, "usable_fraction": USABLE, "weight_bytes": 2, "grad_accum_dtype": "fp32",
                   "adam": "fused (no step temporary) on GPU", "reduce_bucket_elements": 5e8,
                   "seq": a.seq, "loss_chunk_mb": 32.0, "activation_checkpointing": a.activation_checkpointing,
                   "shapes": {k: dict(vars(s), params=s.params, largest_layer=s.largest_layer)
                              for k, s in SHAPES.items()},
                   "measured_allocator": "MALLOC_MMAP_THRESHOLD_=65536", "tolerance": TOLERANCE}
    results = {"assumptions": assumptions, "table": rows, "components": parts, "measured": measured}
    path = save_results("teacher_memory", results, a.results_dir)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
