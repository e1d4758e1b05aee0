"""The trainer's flags, grouped by concern as typed dataclasses: each field is one flag (its
type, default and help text), each group checks its own fields, and ``Flags.check`` adds the
combinations across groups. Components receive their own group (``Checkpointer(flags.checkpoint)``),
never the whole set.

``parse_args(argv)`` builds the command line from these dataclasses (one argparse group per
dataclass, so ``--help`` reads by concern) and returns a ``Flags``; ``check()`` returns
(errors, warnings), each message naming the flag and what to do, and runs before any compute.
It looks only at the flags: the ds_config, the data and the topology are checked by their own
modules, also before deepspeed.init_distributed. docs/flags.md is generated from this file
(``python -m codistill.flags --write-docs``; tests/unit/test_flags.py checks it is current).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "sample"  # the embedded corpus, prepared on first use
DOCS = ROOT / "docs" / "flags.md"


def flag(default, help: str, *, choices=None, metavar=None, doc_default=None, hidden=False):
    """One flag: a dataclass field whose metadata argparse and docs/flags.md read."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar,
                                            "doc_default": doc_default, "hidden": hidden})


class Group:
    """A dataclass of flags; ``check`` appends its own fields' errors and warnings."""
    title = ""

    def check(self, errors: list[str], warnings: list[str]) -> None:
        pass


def _at_least(group, errors, minimum: int, *names) -> None:
    for name in names:
        value = getattr(group, name)
        if value < minimum:
            errors.append(f"--{name} must be >= {minimum} (got {value})")


@dataclass
class RunFlags(Group):
    """Where the run lives, which groups this launch trains, and the launch-wide settings."""
    title = "run"
    run_dir: str = flag("runs/codistill", "the run directory shared by every group: group_i/ (checkpoints, exports, "
                        "TensorBoard, final/), config.json, summary.json (the layout: docs/design.md)")
    num_groups: int = flag(2, "G, the number of groups training a copy of the model each on its own shard "
                           "(1: the plain data-parallel baseline)")
    group_id: int | None = flag(None, "train only this group (one launch per group, e.g. a SLURM array task); "
                                "without it this launch trains every group, its ranks split among them")
    seed: int = flag(1234, "the base seed: group i initialises from seed + 7919 i and draws its own data order")
    log_every: int = flag(10, "steps between console lines (TensorBoard logs every step)")
    config: str | None = flag(None, "a JSON file (UTF-8) of flag defaults (see recipes/configs/); flags on the "
                              "command line win. Each key must be a flag and its value of the flag's type and "
                              "choices (exit 2 naming the file and key otherwise)", metavar="FILE")
    local_rank: int | None = flag(None, "set by the deepspeed launcher", hidden=True)

    def check(self, errors, warnings):
        _at_least(self, errors, 1, "num_groups", "log_every")
        if self.group_id is not None and not 0 <= self.group_id < max(1, self.num_groups):
            errors.append(f"--group_id {self.group_id} is outside 0..{self.num_groups - 1} (--num_groups "
                          f"{self.num_groups}); group ids count from 0, so use --group_id 0..{self.num_groups - 1} "
                          f"or raise --num_groups")


@dataclass
class ModelFlags(Group):
    """The architecture every group trains (the same in every group: peers run each other's weights)."""
    title = "model"
    model: str = flag("lstm", "lstm | transformer (presets, see --model_size) | hf (any transformers causal LM: "
                      "--hf_config or --init_from)", choices=[*sorted(PRESETS), "hf"])
    model_size: str = flag("tiny", "the preset. lstm: tiny (1x256), small (2x512), paper (2x1024, an approximation "
                           "of the paper's LSTM), and Zaremba et al.'s (2014) Penn Treebank LSTMs zaremba-small "
                           "(2x200, no dropout), medium (2x650, dropout 0.5, tied) and large "
                           "(2x1500, dropout 0.65, tied) - train those with --carry_state (docs/ptb.md); "
                           "transformer (Llama-style, built with transformers from a config, no hub): tiny, "
                           "small, gpt2-small (12x768)")
    hf_config: str | None = flag(None, "--model hf: a transformers config.json (or a directory holding one) of any "
                                 "causal LM (GPT-2, Llama, Mistral, Qwen2, Phi, GPT-NeoX, ...), trained from "
                                 "scratch; its vocab_size must be >= the data's (larger = padded embeddings); its "
                                 "identity (what teachers are checked against) is the config without "
                                 "dropout/version/path keys (docs/models.md)", metavar="PATH")
    init_from: str | None = flag(None, "--model hf: start every group from this local pretrained directory "
                                 "(save_pretrained's config.json + model.safetensors); its config is the "
                                 "architecture", metavar="DIR")
    trust_pickled_weights: bool = flag(False, "--init_from: also load pickled weights (pytorch_model.bin); "
                                       "unpickling runs any code the file holds, so they are refused without it")
    dropout: float | None = flag(None, "override every dropout rate of the preset (--model hf: each config key "
                                 "ending in dropout/pdrop)", doc_default="the preset's / config's")

    def check(self, errors, warnings):
        if self.model == "hf":
            if (self.hf_config is None) == (self.init_from is None):
                errors.append("--model hf needs exactly one of --hf_config PATH (a new model of that architecture) "
                              "or --init_from DIR (a local pretrained model, whose config.json is the architecture)")
        elif self.hf_config is not None or self.init_from is not None:
            errors.append(f"--hf_config/--init_from need --model hf (got --model {self.model})")
        elif self.model_size not in PRESETS[self.model]:
            errors.append(f"--model_size for --model {self.model} must be one of {sorted(PRESETS[self.model])} "
                          f"(got {self.model_size})")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            errors.append(f"--dropout must be in [0, 1) (got {self.dropout})")


@dataclass
class DataFlags(Group):
    """The tokens: data_prep's output directory, the window length and who reads which shard."""
    title = "data"
    data: str = flag(str(DEFAULT_DATA), "the data_prep output directory (manifest.json, tokenizer, shards, val.bin); "
                     "the default, the embedded corpus, is prepared automatically on first use",
                     doc_default="data/sample")
    seq_len: int = flag(64, "tokens per training window (and per validation window)")
    data_split: str = flag("disjoint", "disjoint: group i reads only its own shards (the method); shared: every "
                           "group reads all shards, each in its own order (the same-data comparison of the "
                           "paper's claim 3)", choices=["disjoint", "shared"])
    carry_state: bool = flag(False, "--model lstm: truncated BPTT as the LSTM literature trains. A group's tokens "
                             "are cut into (ranks x gradient_accumulation_steps x micro batch) contiguous streams, "
                             "one per row of the group's batch; step t reads window t mod W of each, and the LSTM's "
                             "(h, c) is carried (detached) from one step to the next; at the streams' end every "
                             "stream starts over from a zero state. Teachers carry their own state over the "
                             "student's streams; a swapped-in teacher and a skipped step (non-finite loss) start "
                             "from zeros. The checkpoint holds every rank's states, so a resume continues exactly. "
                             "Off: every window is a random window from a zero state (codistill/data.py)")

    def check(self, errors, warnings):
        _at_least(self, errors, 1, "seq_len")


@dataclass
class TrainingFlags(Group):
    """The optimisation: steps, learning-rate schedule, the loss's memory, divergence, measurements."""
    title = "training"
    ds_config: str = flag(str(ROOT / "ds_configs" / "zero2.json"), "the DeepSpeed config: zero1.json, zero2.json, "
                          "zero3.json ship (micro batch 16, no accumulation, clipping 1.0, AdamW lr 3e-3, bf16 "
                          "\"auto\": on where CUDA supports it, off on CPU); train_batch_size is derived (or checked, "
                          "with a clear error) from micro x accumulation x ranks per group",
                          doc_default="ds_configs/zero2.json")
    max_steps: int = flag(300, "optimizer steps of every group; the LR schedule runs over them")
    lr: float | None = flag(None, "the peak learning rate (after warmup)", doc_default="the ds_config optimizer's")
    warmup_steps: int = flag(20, "linear warmup steps, then cosine decay to --lr x --min_lr_ratio at --max_steps")
    min_lr_ratio: float = flag(0.1, "the cosine decay ends at --lr x this")
    target_val_loss: float | None = flag(None, "finish (checkpoint, final/, summary) at the first validation where "
                                         "every group of this launch has val loss <= LOSS, before --max_steps: "
                                         "steps-to-target studies (benchmarks/batch_scaling.py); the LR schedule "
                                         "still runs over --max_steps", metavar="LOSS")
    loss_chunk_mb: str = flag("auto", "MiB of fp32 [tokens, vocab] values per chunk of the loss (and of the top-K "
                              "teachers' probabilities), or auto: 32 on CPU; on CUDA 512, or 1/32 of the device's "
                              "free memory if that is less, never under 32 (codistill/loss.py resolve_chunk_mb). "
                              "Small chunks cost kernel launches on GPUs: 32 MiB at a 128 k vocabulary is 65 "
                              "tokens per chunk, 512 MiB 1024; at V = 2000, 32 MiB is 4194 tokens", metavar="MIB")
    loss_chunk_tokens: int | None = flag(None, "a fixed loss chunk in tokens instead of --loss_chunk_mb")
    noise_scale: bool = flag(False, "measure the gradient noise scale B_simple (McCandlish et al. 2018; "
                             "codistill/noise.py) on each group's leader, every --noise_scale_every steps, from the "
                             "gradients of the first micro-batch and of its quarters (detached parameter copies: "
                             "DeepSpeed never sees them; the RNG stream is restored), EMA-smoothed: "
                             "train/noise_scale (tokens) in TensorBoard and a console line reading it against the "
                             "group's batch. ZeRO 0-2 (ZeRO-3 is refused)")
    noise_scale_every: int = flag(50, "steps between noise-scale measurements (each costs one more forward and "
                                  "backward pass of one micro-batch, ~1.5 steps)")

    def check(self, errors, warnings):
        _at_least(self, errors, 1, "max_steps", "noise_scale_every")
        _at_least(self, errors, 0, "warmup_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"--min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.target_val_loss is not None and not self.target_val_loss > 0:
            errors.append(f"--target_val_loss must be > 0 nats (got {self.target_val_loss})")
        if self.lr is not None and not self.lr > 0:
            errors.append(f"--lr must be > 0 (got {self.lr})")
        if self.loss_chunk_tokens is not None:
            _at_least(self, errors, 1, "loss_chunk_tokens")
        if self.loss_chunk_mb != "auto":
            try:
                ok = math.isfinite(float(self.loss_chunk_mb)) and float(self.loss_chunk_mb) > 0
            except ValueError:
                ok = False
            if not ok:
                errors.append(f"--loss_chunk_mb must be auto or a finite number of MiB > 0 (got {self.loss_chunk_mb})")
        if self.warmup_steps >= self.max_steps:
            warnings.append(f"--warmup_steps {self.warmup_steps} >= --max_steps {self.max_steps}: the LR never "
                            f"leaves warmup")


@dataclass
class EvalFlags(Group):
    """Periodic validation on the held-out split (val.bin)."""
    title = "evaluation"
    eval_every: int = flag(50, "steps between validations (and at --max_steps)")
    eval_batches: int = flag(20, "micro-batches per validation, split over the group's ranks")
    eval_state: str = flag("fresh", "fresh: each validation window from a zero state; carried (--model lstm): the "
                           "same validation tokens cut into micro batch x ranks contiguous rows, the state carried "
                           "across the batches", choices=["fresh", "carried"])

    def check(self, errors, warnings):
        _at_least(self, errors, 1, "eval_every", "eval_batches")


@dataclass
class DistillFlags(Group):
    """The distillation term: its weight and schedule, the soft targets, an offline teacher."""
    title = "distillation"
    distill_weight: float = flag(1.0, "alpha, the weight of the distillation term (cross-entropy to the averaged "
                                 "teachers' distribution) added to the data term; 0 trains the baseline")
    burn_in_steps: int = flag(50, "steps before the distillation term switches on (the paper's burn-in: teachers "
                              "must have learnt something first)")
    distill_ramp_steps: int = flag(0, "after the burn-in, ramp alpha linearly from 0 to --distill_weight over this "
                                   "many steps (0: switch on at once)")
    temperature: float = flag(1.0, "softmax temperature of teacher and student in the distillation term (1: the "
                              "paper's choice)")
    label_smoothing: float = flag(0.0, "label smoothing of the data term: a baseline the paper compares against")
    teacher: str | None = flag(None, "offline (two-phase) distillation: a finished, fixed teacher - a group "
                               "directory of an earlier run (its final/, else its newest export), a final/ or "
                               "exports/ directory, or one export file - checked like a peer's export (safetensors "
                               "only, same model config and tokenizer); used from --burn_in_steps on; with "
                               "--num_groups 1 the only teacher, otherwise averaged with the peers", metavar="PATH")

    def check(self, errors, warnings):
        if not self.distill_weight >= 0:
            errors.append(f"--distill_weight must be >= 0 (got {self.distill_weight}); 0 gives the baseline")
        if not self.temperature > 0:
            errors.append(f"--temperature must be > 0 (got {self.temperature}); 1 is the paper's choice")
        if not 0 <= self.label_smoothing < 1:
            errors.append(f"--label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        _at_least(self, errors, 0, "burn_in_steps", "distill_ramp_steps")
        if self.teacher is not None:
            if not Path(self.teacher).exists():
                errors.append(f"--teacher {self.teacher}: no such file or directory; name a group directory of a "
                              f"finished run (e.g. runs/teacher/group_0) or one of its exports")
            if not self.distill_weight > 0:
                errors.append(f"--teacher {self.teacher} with --distill_weight 0: the teacher would never be used; "
                              f"leave --teacher out for the baseline, or set --distill_weight > 0")


@dataclass
class ExchangeFlags(Group):
    """The exchange of weights between groups: exports every K steps, and when a peer's is read."""
    title = "exchange"
    export_every: int = flag(25, "K: every K steps each group exports its weights (exports/, safetensors) for its "
                             "peers")
    keep_exports: int = flag(3, "exports kept per group (older ones are pruned); in sync mode at least the exports "
                             "since the last checkpoint are kept")
    teacher_sync: str = flag("auto", "on: swap teachers at fixed steps - at step s the peers' exports of step "
                             "s - K, deterministic, needs every group in this launch; off: follow each peer's "
                             "LATEST as it appears; auto: on unless --group_id", choices=["auto", "on", "off"])
    teacher_timeout: float = flag(300.0, "sync mode: seconds to wait for a peer's export of the step a swap needs "
                                  "before going on without that teacher (--peer_use average|diloco with "
                                  "--group_id: for the peers' exports of an exchange step); in a launch of several "
                                  "ranks it must be below --dist_timeout, as the other ranks wait in a collective "
                                  "meanwhile", metavar="SECONDS")
    max_teacher_staleness: int | None = flag(None, "drop a teacher whose export is more than this many steps old "
                                             "(sync teachers are K..2K steps old)")
    poll_interval: float = flag(1.0, "seconds between looks at a peer's LATEST", metavar="SECONDS")
    peer_use: str = flag("distill", "what a group does with its peers' weights at every exchange step s "
                         "(s % --export_every == 0): distill: run their exports as teachers (codistillation); "
                         "average: LocalSGD, every group's fp32 master weights become the mean over the groups; "
                         "diloco: DiLoCo's outer step, Nesterov SGD (--outer_lr, --outer_momentum) on the "
                         "pseudo-gradient (round-start weights - the groups' mean), every group continues from "
                         "the result with its inner optimizer state kept. average/diloco: no distillation term "
                         "(--distill_weight is ignored, alpha = 0), every group starts from group 0's "
                         "initialisation, exports are still written; one launch per group (--group_id) waits up to "
                         "--teacher_timeout for the peers' exports of step s and averages the groups present. "
                         "They need --num_groups >= 2 and refuse the teacher options (--teacher, "
                         "--teacher_partition, --teacher_offload, --teacher_topk, --max_teacher_staleness, "
                         "--temperature, --distill_ramp_steps) and --peer_models any: averaged groups train "
                         "one model (docs/averaging.md)",
                         choices=["distill", "average", "diloco"])
    outer_lr: float = flag(0.7, "--peer_use diloco: the outer learning rate (Douillard et al. 2023: 0.7)")
    outer_momentum: float = flag(0.9, "--peer_use diloco: the outer Nesterov momentum, in [0, 1) (Douillard et "
                                 "al. 2023: 0.9)")

    @property
    def averaging(self) -> bool:
        """Whether groups average their weights (average, diloco) instead of distilling."""
        return self.peer_use != "distill"

    def check(self, errors, warnings):
        _at_least(self, errors, 1, "export_every", "keep_exports")
        if not self.outer_lr > 0:
            errors.append(f"--outer_lr must be > 0 (got {self.outer_lr}); DiLoCo's default is 0.7")
        if not 0 <= self.outer_momentum < 1:
            errors.append(f"--outer_momentum must be in [0, 1) (got {self.outer_momentum}); DiLoCo's default is 0.9")
        if not self.poll_interval > 0:
            errors.append(f"--poll_interval must be > 0 seconds (got {self.poll_interval})")
        if not self.teacher_timeout >= 0:
            errors.append(f"--teacher_timeout must be >= 0 seconds (got {self.teacher_timeout})")
        if self.max_teacher_staleness is not None:
            _at_least(self, errors, 0, "max_teacher_staleness")

    def synchronous(self, group_id: int | None) -> bool:
        """Whether teachers swap at fixed steps (--teacher_sync, auto: when every group is in this launch)."""
        return self.teacher_sync == "on" or (self.teacher_sync == "auto" and group_id is None)


@dataclass
class TeacherFlags(Group):
    """How peers' teachers are held (memory placement, top-K) and when a bad one is dropped."""
    title = "teachers"
    teacher_partition: bool = flag(False, "each peer teacher is a ZeRO-3 inference engine (no optimizer) "
                                   "partitioned over the group's own ranks: ~1/ranks of its weights per rank, "
                                   "gathered submodule by submodule for its forward; swaps go into the partitions "
                                   "from the leader's read, one submodule at a time. Needs >= 2 ranks per group "
                                   "(otherwise warned and kept whole); docs/teacher_memory.md")
    teacher_offload: str = flag("none", "cpu: teacher weights live in (pinned) host memory and are copied to the "
                                "device by a forward pre-hook one submodule at a time and dropped after its forward "
                                "(device memory ~ one layer); exclusive with --teacher_partition",
                                choices=["none", "cpu"])
    teacher_topk: int = flag(0, "keep the averaged teacher distribution as its top K probabilities per token plus "
                             "the rest of the mass spread uniformly over the other V - K tokens (B x T x (12 K + 4) "
                             "bytes instead of B x T x V x 4); teachers run their body once and their output head "
                             "chunk by chunk; K >= V is the dense loss; 0: dense. Refused for architectures that "
                             "change logits after the head (Gemma's soft-capping, ...)", metavar="K")
    teacher_max_ppl_ratio: float = flag(3.0, "drop a peer's teacher whose perplexity on the student's own data "
                                        "exceeds the student's by this factor on average over "
                                        "--teacher_guard_window steps, until a newer export of that peer passes "
                                        "(0: off; codistill/teachers/health.py, docs/fault_tolerance.md)")
    teacher_guard_window: int = flag(5, "steps the teacher guard averages over")
    peer_models: str = flag("same", "same: a teacher (peer export or --teacher) must be this run's model config, "
                            "anything else is refused; any: a teacher may be another model - another architecture "
                            "or size (an LSTM group and a Transformer group, a small and a large Transformer) on the "
                            "same tokenizer - built from the model config its export declares (checked against its "
                            "tensors). Groups of one launch share the launch's model: give each --group_id launch "
                            "its own --model flags. Refused with --peer_use average|diloco (docs/averaging.md)",
                            choices=["same", "any"])

    def check(self, errors, warnings):
        _at_least(self, errors, 0, "teacher_topk")
        _at_least(self, errors, 1, "teacher_guard_window")
        if self.teacher_partition and self.teacher_offload != "none":
            errors.append("--teacher_partition and --teacher_offload cpu are alternatives: partition spreads a "
                          "teacher over the group's devices, offload keeps it in host memory; pick one")
        if not (self.teacher_max_ppl_ratio == 0 or self.teacher_max_ppl_ratio > 1):
            errors.append(f"--teacher_max_ppl_ratio must be > 1, or 0 to switch the teacher guard off (got "
                          f"{self.teacher_max_ppl_ratio})")


@dataclass
class CheckpointFlags(Group):
    """DeepSpeed checkpoints: when, how many, resuming, and what a failed write does."""
    title = "checkpoints"
    save_every: int = flag(100, "steps between checkpoints (and at the last step, a stop request and "
                           "--stop_after_steps)")
    keep_checkpoints: int = flag(2, "checkpoints kept per group (older ones are removed after a new one is "
                                 "complete)")
    resume: str = flag("auto", "auto: continue from the run directory's newest complete checkpoint (refused, exit "
                       "2 before anything is written, when its config.json records another model or another "
                       "tokenizer than --data's; only checkpoints whose marker's digests match their files are "
                       "loaded, weights-only); never: start over; PATH: start from another run directory's "
                       "checkpoints (docs/fault_tolerance.md)")
    stop_after_steps: int | None = flag(None, "checkpoint and exit 0 after this step, keeping "
                                        "the --max_steps schedule (time-sliced jobs; continue with --resume auto)")

    def check(self, errors, warnings):
        _at_least(self, errors, 1, "save_every", "keep_checkpoints")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            errors.append(f"--resume {self.resume}: not 'auto', 'never' or an existing run directory")


@dataclass
class FaultFlags(Group):
    """What a failure does: divergence, a write that fails, a rank that dies or hangs."""
    title = "faults"
    max_bad_steps: int = flag(5, "a NaN/Inf loss skips the step (no update, counted in train/skipped_steps); this "
                              "many in a row stop the run (exit 3)")
    on_write_error: str = flag("warn", "a failed export or checkpoint write (disk full, read-only directory, "
                               "whatever error type torch or DeepSpeed raise): warn and go on with the previous "
                               "one, or stop (exit 4); either way LATEST/latest keep naming the previous complete "
                               "one", choices=["warn", "stop"])
    dist_timeout: float = flag(600.0, "the timeout of every process group (the world's, DeepSpeed's own and the "
                               "groups'): a collective that waits this long for a rank that died or hangs fails, "
                               "and the rank exits 1 with one `error:` line (a rank that died is seen at once "
                               "under gloo). Raise it if one rank may legitimately keep the others waiting "
                               "longer (e.g. exports of a large model to a slow filesystem); see "
                               "docs/fault_tolerance.md", metavar="SECONDS")

    def check(self, errors, warnings):
        _at_least(self, errors, 1, "max_bad_steps")
        if not self.dist_timeout > 0:
            errors.append(f"--dist_timeout must be > 0 seconds (got {self.dist_timeout})")


GROUPS = {"run": RunFlags, "model": ModelFlags, "data": DataFlags, "training": TrainingFlags, "eval": EvalFlags,
          "distill": DistillFlags, "exchange": ExchangeFlags, "teachers": TeacherFlags,
          "checkpoint": CheckpointFlags, "faults": FaultFlags}


@dataclass
class Flags:
    """Every flag of recipes/train_lm.py, one typed group per concern."""
    run: RunFlags
    model: ModelFlags
    data: DataFlags
    training: TrainingFlags
    eval: EvalFlags
    distill: DistillFlags
    exchange: ExchangeFlags
    teachers: TeacherFlags
    checkpoint: CheckpointFlags
    faults: FaultFlags

    @property
    def codistill(self) -> bool:
        """Whether peers teach each other (G > 1, --peer_use distill and a distillation term)."""
        return self.run.num_groups > 1 and self.distill.distill_weight > 0 and not self.exchange.averaging

    @property
    def sync_teachers(self) -> bool:
        return self.exchange.synchronous(self.run.group_id)

    def as_dict(self) -> dict:
        """Every flag by name (config.json's "args", the --config file's keys)."""
        return {k: v for g in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

    def check(self) -> tuple[list[str], list[str]]:
        """(errors, warnings): each group's own checks, then the combinations across groups."""
        errors, warnings = [], []
        for name, value in sorted(self.as_dict().items()):  # inf passes every ">= 0" check (and diverges)
            if isinstance(value, float) and not math.isfinite(value):
                errors.append(f"--{name} must be a finite number (got {value})")
        for g in GROUPS:
            getattr(self, g).check(errors, warnings)
        self._check_across(errors, warnings)
        return errors, warnings

    def _check_across(self, errors, warnings) -> None:
        run, ex, tr, ck = self.run, self.exchange, self.training, self.checkpoint
        if run.group_id is not None and ex.teacher_sync == "on":
            errors.append("--teacher_sync on needs every group in this launch; use --teacher_sync off (or auto) "
                          "with --group_id")
        if self.teachers.peer_models == "any" and run.group_id is None and self.distill.teacher is None \
                and not ex.averaging:
            warnings.append("--peer_models any: every group of this launch trains this launch's model, so its teachers "
                            "are that model too; give each group its own launch (--group_id, with its own --model "
                            "flags) to codistill with peers of another model")
        if ck.stop_after_steps is not None and not 1 <= ck.stop_after_steps <= tr.max_steps:
            errors.append(f"--stop_after_steps must be in 1..--max_steps ({tr.max_steps}) (got "
                          f"{ck.stop_after_steps}); leave it out to train to --max_steps")
        if self.codistill and self.sync_teachers and ex.max_teacher_staleness is not None \
                and 0 <= ex.max_teacher_staleness < 2 * ex.export_every:
            errors.append(f"--max_teacher_staleness {ex.max_teacher_staleness} < 2 x --export_every "
                          f"({2 * ex.export_every}): sync teachers are K..2K steps old, so every teacher would be "
                          f"dropped; raise --max_teacher_staleness or leave it out")
        if self.codistill:
            if ex.export_every > tr.max_steps:
                errors.append(f"--export_every {ex.export_every} > --max_steps {tr.max_steps}: no group would ever "
                              f"export, so no teacher is ever used; lower --export_every, or set --distill_weight 0 "
                              f"(or --num_groups 1) for the plain baseline")
            elif self.distill.burn_in_steps >= tr.max_steps:
                warnings.append(f"--burn_in_steps {self.distill.burn_in_steps} >= --max_steps {tr.max_steps}: the "
                                f"distillation term never switches on, this run is the baseline")
            elif self.sync_teachers and 2 * ex.export_every >= tr.max_steps:
                warnings.append(f"2 x --export_every ({2 * ex.export_every}) >= --max_steps {tr.max_steps}: sync "
                                f"teachers (at step s the peers' exports of step s-K) never switch on; lower "
                                f"--export_every")
        if ex.averaging:
            self._check_averaging(errors, warnings)
        if self.data.carry_state or self.eval.eval_state == "carried":
            which = "--carry_state" if self.data.carry_state else "--eval_state carried"
            if self.model.model != "lstm":
                errors.append(f"{which} needs --model lstm (got --model {self.model.model}): only the LSTM has a "
                              "state to carry from one window to the next; a Transformer sees each window on its own")

    def _check_averaging(self, errors, warnings) -> None:
        """--peer_use average|diloco: G >= 2 groups in one launch, and none of the teacher options."""
        run, ex, d, tf, tr = self.run, self.exchange, self.distill, self.teachers, self.training
        use = f"--peer_use {ex.peer_use}"
        if run.num_groups < 2:
            errors.append(f"{use} needs --num_groups >= 2 (got {run.num_groups}): there is nobody to average with")
        refused = [(d.teacher is not None, f"--teacher {d.teacher}"),
                   (tf.teacher_partition, "--teacher_partition"),
                   (tf.teacher_offload != "none", f"--teacher_offload {tf.teacher_offload}"),
                   (tf.teacher_topk != 0, f"--teacher_topk {tf.teacher_topk}"),
                   (ex.max_teacher_staleness is not None, f"--max_teacher_staleness {ex.max_teacher_staleness}"),
                   (d.temperature != 1.0, f"--temperature {d.temperature}"),
                   (d.distill_ramp_steps != 0, f"--distill_ramp_steps {d.distill_ramp_steps}")]
        for bad, name in refused:
            if bad:
                errors.append(f"{use} refuses {name}: it configures distillation from teachers, and {use} runs no "
                              "teacher (no distillation term); leave it out, or use --peer_use distill")
        if tf.peer_models != "same":
            errors.append(f"{use} refuses --peer_models {tf.peer_models}: averaging weights needs every group to train "
                          "the same model (the same tensors); peers of other architectures or sizes can only teach: "
                          "use --peer_use distill")
        if ex.export_every > tr.max_steps:
            warnings.append(f"--export_every {ex.export_every} > --max_steps {tr.max_steps}: {use} never averages, "
                            "every group trains on its own")


def _fields():
    """(group name, dataclass field, its type) for every flag, in --help order."""
    for g, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield g, f, hints[f.name]


def _scalar(tp):
    """int for ``int | None``, and so on."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = {g: p.add_argument_group(g, cls.__doc__) for g, cls in GROUPS.items()}
    for g, f, tp in _fields():
        m, kind = f.metadata, _scalar(tp)
        help_ = argparse.SUPPRESS if m["hidden"] else m["help"].replace("%", "%%")
        if kind is bool:
            sections[g].add_argument(f"--{f.name}", action="store_true", help=help_)
        else:
            sections[g].add_argument(f"--{f.name}", type=None if kind is str else kind, default=f.default,
                                     choices=m["choices"], metavar=m["metavar"], help=help_)
    return p


def parse_args(argv=None, description: str | None = None) -> Flags:
    """The flags of recipes/train_lm.py (--config's file gives defaults, the command line wins);
    argparse checks types and choices (exit 2). Everything else: ``Flags.check``."""
    p = build_parser(description)
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        p.set_defaults(**config_defaults(p, pre.config))
    ns = vars(p.parse_args(argv))
    return Flags(**{g: cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)}) for g, cls in GROUPS.items()})


def config_defaults(p: argparse.ArgumentParser, path: str) -> dict:
    """The flag defaults of the --config JSON file ``path``, each checked as the command line
    would check it (its type and choices: argparse applies neither to set_defaults values);
    ``p.error`` (exit 2, naming the file and the key) otherwise."""
    try:
        defaults = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        p.error(f"--config {path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSON")
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"--config {path}: {e}")
    if not isinstance(defaults, dict):
        p.error(f"--config {path}: must hold a JSON object of flag defaults, e.g. {{\"max_steps\": 100}}")
    actions = {a.dest: a for a in p._actions}
    unknown = set(defaults) - set(actions)
    if unknown:
        p.error(f"--config {path}: unknown keys {sorted(unknown)}")
    for key, value in defaults.items():
        a, bad = actions[key], None
        if isinstance(value, str) and a.type is not None:
            continue  # argparse converts (and checks) string defaults itself
        if a.nargs == 0:  # store_true / store_false
            bad = not isinstance(value, bool) and "true or false"
        elif a.type in (int, float):
            ok = isinstance(value, int) if a.type is int else isinstance(value, (int, float))
            ok = (value is None and a.default is None) or (ok and not isinstance(value, bool))
            bad = not ok and f"a{'n integer' if a.type is int else ' number'}"
        elif a.type is None and value is not None and not isinstance(value, str):
            bad = "a string"
        if not bad and a.choices is not None and value not in a.choices:
            bad = f"one of {list(a.choices)}"
        if bad:
            p.error(f"--config {path}: {key!r} must be {bad} (got {json.dumps(value)})")
    return defaults


def model_config(model: ModelFlags, data: DataFlags, vocab_size: int):
    """The model the flags name, for data whose tokenizer has ``vocab_size`` ids: a preset, or
    (--model hf) the architecture of --hf_config / --init_from's config.json. The model's
    vocabulary may be larger than the data's (embeddings padded to a multiple, as HF models
    often are: the extra rows are never a target); a smaller one is an error naming both."""
    from model import hf_model_config, preset_config
    from model.hf import HFConfigError, pretrained_config, read_hf_config
    max_len = max(1024, data.seq_len)
    if model.model != "hf":
        return preset_config(model.model, model.model_size, vocab_size, max_len, dropout=model.dropout)
    flag_, path = ("--init_from", model.init_from) if model.init_from else ("--hf_config", model.hf_config)
    cfg = hf_model_config(read_hf_config(path, flag_), max_len, model.dropout)
    positions = getattr(pretrained_config(cfg.hf_config), "max_position_embeddings", None)
    if positions is not None and positions < data.seq_len:
        raise HFConfigError(f"{flag_} {path}: the model has {positions} positions (max_position_embeddings), "
                            f"fewer than --seq_len {data.seq_len}; use --seq_len <= {positions}")
    if cfg.vocab_size < vocab_size:
        raise HFConfigError(f"{flag_} {path}: the model's vocab_size is {cfg.vocab_size} but the data's tokenizer "
                            f"({data.data}) has {vocab_size} ids; use a config with vocab_size >= {vocab_size} "
                            "(or prepare the data with this model's tokenizer: data_prep --tokenizer DIR)")
    return cfg


# docs/flags.md: the tables below are generated from the dataclasses; the prose after END is kept.
BEGIN = "<!-- generated from codistill/flags.py by `python -m codistill.flags --write-docs`: edit the flags there -->"
END = "<!-- end of the generated tables -->"


def _doc_default(f) -> str:
    if f.metadata["doc_default"] is not None:
        return f.metadata["doc_default"]
    if f.default is None:
        return "-"
    if f.default is False:
        return "off"
    return f"`{f.default}`"


def docs_tables() -> str:
    lines = [BEGIN]
    for g, cls in GROUPS.items():
        lines += ["", f"## {cls.title.capitalize()}", "", cls.__doc__, "", "| flag | default | |", "|---|---|---|"]
        for _, f, _tp in (x for x in _fields() if x[0] == g):
            if f.metadata["hidden"]:
                continue
            name = f"`--{f.name}`" + (f" `{f.metadata['metavar']}`" if f.metadata["metavar"] else "")
            text = f.metadata["help"].replace("|", "\\|")
            if f.metadata["choices"] and f.name != "model":
                text += " (one of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + ")"
            lines.append(f"| {name} | {_doc_default(f)} | {text} |")
    return "\n".join([*lines, "", END])


def render_docs(current: str) -> str:
    """docs/flags.md with its tables regenerated (the title before BEGIN and the prose after END kept)."""
    head, _, rest = current.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head.rstrip("\n") + "\n\n" + docs_tables() + tail


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-docs"]:
        sys.exit("usage: python -m codistill.flags --write-docs   (regenerates docs/flags.md's tables)")
    from fileio import atomic_write_bytes
    atomic_write_bytes(DOCS, render_docs(DOCS.read_text()).encode())
    print(f"wrote {DOCS}")
