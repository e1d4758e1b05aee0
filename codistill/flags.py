"""The trainer's flags: their definition (``parse_args``) and the combinations that cannot
work, caught before any compute (exit 2 with the fix named).

``check(args)`` returns (errors, warnings): each message names the flag and what to do. It
looks only at the parsed flags; the ds_config, data and topology are checked by their own
modules, also before deepspeed.init_distributed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "sample"  # the embedded corpus, prepared on first use


def parse_args(argv=None, description: str | None = None):
    """The flags of recipes/train_lm.py (plus --config defaults), with single-flag checks."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of flag defaults (see recipes/configs/); flags given here win")
    p.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data_prep output dir (default: the embedded "
                   "corpus, prepared automatically on first use)")
    p.add_argument("--model", default="lstm", choices=[*sorted(PRESETS), "hf"],
                   help="lstm | transformer (presets, --model_size) | hf (any transformers causal LM: --hf_config "
                        "or --init_from)")
    p.add_argument("--model_size", default="tiny")
    p.add_argument("--hf_config", default=None, metavar="PATH",
                   help="--model hf: a transformers config.json (or a directory holding one); trained from scratch")
    p.add_argument("--init_from", default=None, metavar="DIR",
                   help="--model hf: start from this local pretrained directory (save_pretrained's: config.json "
                        "+ model.safetensors); its config is the architecture")
    p.add_argument("--trust_pickled_weights", action="store_true",
                   help="--init_from: also load pickled weights (pytorch_model.bin); unpickling runs any code "
                        "the file holds")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's (or HF config's) dropout")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--carry_state", action="store_true",
                   help="--model lstm: truncated BPTT - each row of the batch is a contiguous stream through the "
                        "group's shard and the LSTM state is carried (detached) from step to step, teachers' too "
                        "(data_prep/dataset.py); off: every window starts from a zero state")
    p.add_argument("--eval_state", default="fresh", choices=["fresh", "carried"],
                   help="periodic validation: fresh (each window from a zero state) or carried (--model lstm: the "
                        "validation windows as contiguous rows, the state carried across them)")
    p.add_argument("--noise_scale", action="store_true",
                   help="measure the gradient noise scale (the data-parallel limit, in tokens) on each group's "
                        "leader: train/noise_scale in TensorBoard and a console line (ZeRO 0-2)")
    p.add_argument("--noise_scale_every", type=int, default=50, help="steps between noise-scale measurements "
                   "(each costs one more forward and backward pass of one micro-batch)")
    p.add_argument("--run_dir", default="runs/codistill")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the ds_config optimizer's)")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decay ends at lr * this")
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--target_val_loss", type=float, default=None, metavar="LOSS",
                   help="finish (checkpoint, final/, summary) at the first validation where every group's val loss "
                        "is <= LOSS, before --max_steps (steps-to-target studies: benchmarks/batch_scaling.py)")
    p.add_argument("--eval_batches", type=int, default=20)
    p.add_argument("--save_every", type=int, default=100)
    p.add_argument("--stop_after_steps", type=int, default=None,
                   help="checkpoint and exit after this step, keeping the --max_steps schedule (time-sliced jobs)")
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--resume", default="auto", help="auto | never | PATH of an earlier run directory (DeepSpeed "
                   "checkpoints are pickles: only resume from run directories you trust)")
    p.add_argument("--num_groups", type=int, default=2)
    p.add_argument("--group_id", type=int, default=None, help="train only this group (one launch per group)")
    p.add_argument("--data_split", default="disjoint", choices=["disjoint", "shared"],
                   help="disjoint: group i reads only its own shards (the method); shared: every group reads all "
                        "shards in its own order (the same-data comparison of the paper's claim 3)")
    # codistillation
    p.add_argument("--export_every", type=int, default=25)
    p.add_argument("--keep_exports", type=int, default=3)
    p.add_argument("--burn_in_steps", type=int, default=50)
    p.add_argument("--distill_weight", type=float, default=1.0)
    p.add_argument("--distill_ramp_steps", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument("--teacher_sync", default="auto", choices=["auto", "on", "off"],
                   help="on: swap teachers at fixed steps (deterministic; needs all groups in this launch); "
                        "off: follow peers' LATEST; auto: on unless --group_id")
    p.add_argument("--teacher_timeout", type=float, default=600.0)
    p.add_argument("--max_teacher_staleness", type=int, default=None,
                   help="drop a teacher whose export is more than this many steps old")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="offline (two-phase) distillation: a fixed, finished teacher - a group directory of an "
                        "earlier run (its final/ weights), or an export - used from --burn_in_steps on, averaged "
                        "with the peers' teachers if any (--num_groups 1: the only teacher)")
    p.add_argument("--teacher_max_ppl_ratio", type=float, default=3.0,
                   help="drop a peer's teacher whose perplexity on the student's own data exceeds the student's by "
                        "this factor over --teacher_guard_window steps, until a newer export passes (0: off; "
                        "codistill/health.py)")
    p.add_argument("--teacher_guard_window", type=int, default=5, help="steps the teacher guard averages over")
    p.add_argument("--poll_interval", type=float, default=1.0)
    # teachers that do not fit (codistill/placement.py says what each costs)
    p.add_argument("--teacher_partition", action="store_true",
                   help="each peer teacher is a ZeRO-3 inference engine partitioned over the group's own ranks: "
                        "~1/ranks of its weights per rank, gathered layer by layer for its forward; needs groups "
                        "of >= 2 ranks")
    p.add_argument("--teacher_offload", default="none", choices=["none", "cpu"],
                   help="cpu: teacher weights live in (pinned) host memory and are copied to the device one "
                        "submodule at a time for the forward (device memory ~ one layer; P x 2 bytes over PCIe "
                        "per teacher forward)")
    p.add_argument("--teacher_topk", type=int, default=0, metavar="K",
                   help="keep the averaged teacher distribution as its top K probabilities per token plus the rest "
                        "of the mass spread uniformly (B x T x K instead of B x T x V; K >= vocab = the dense "
                        "loss); 0: dense")
    p.add_argument("--loss_chunk_mb", type=float, default=32.0,
                   help="the loss (and top-K teacher probabilities) run over chunks of tokens holding this many "
                        "MiB of fp32 [tokens, vocab] values")
    p.add_argument("--loss_chunk_tokens", type=int, default=None, help="a fixed chunk in tokens instead of MiB")
    # faults
    p.add_argument("--max_bad_steps", type=int, default=5,
                   help="a step with a NaN/Inf loss is skipped (no update) and counted; stop after this many in a row")
    p.add_argument("--on_write_error", default="warn", choices=["warn", "stop"],
                   help="an export or checkpoint write fails (disk full): warn and keep training on the previous "
                        "one, or stop (exit 4); either way LATEST/latest keep naming the previous complete one")
    p.add_argument("--dist_timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a collective that waits longer than this for another rank (one that died or hangs) "
                        "fails and the rank exits 1 naming it; the process-group timeout of "
                        "init_process_group (docs/fault_tolerance.md)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        p.set_defaults(**config_defaults(p, pre.config))
    args = p.parse_args(argv)
    for name in ("max_steps", "seq_len", "eval_every", "eval_batches", "save_every", "export_every", "log_every",
                 "noise_scale_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.resume not in ("auto", "never") and not Path(args.resume).is_dir():
        p.error(f"--resume {args.resume}: not 'auto', 'never' or an existing run directory")
    if args.model == "hf":
        if (args.hf_config is None) == (args.init_from is None):
            p.error("--model hf needs exactly one of --hf_config PATH (a new model of that architecture) or "
                    "--init_from DIR (a local pretrained model, whose config.json is the architecture)")
    elif args.hf_config is not None or args.init_from is not None:
        p.error(f"--hf_config/--init_from need --model hf (got --model {args.model})")
    elif args.model_size not in PRESETS[args.model]:
        p.error(f"--model_size for --model {args.model} must be one of {sorted(PRESETS[args.model])}")
    return args


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


def check(a) -> tuple[list[str], list[str]]:
    errors, warnings = [], []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    for name, value in sorted(vars(a).items()):  # inf passes every ">= 0" below (and diverges)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"--{name} must be a finite number (got {value})")
    codistill = a.num_groups > 1 and a.distill_weight > 0
    need(a.num_groups >= 1, f"--num_groups must be >= 1 (got {a.num_groups})")
    if a.group_id is not None:
        need(0 <= a.group_id < max(1, a.num_groups),
             f"--group_id {a.group_id} is outside 0..{a.num_groups - 1} (--num_groups {a.num_groups}); "
             f"group ids count from 0, so use --group_id 0..{a.num_groups - 1} or raise --num_groups")
        need(a.teacher_sync != "on", "--teacher_sync on needs every group in this launch; "
             "use --teacher_sync off (or auto) with --group_id")
    need(a.distill_weight >= 0, f"--distill_weight must be >= 0 (got {a.distill_weight}); 0 gives the baseline")
    need(a.temperature > 0, f"--temperature must be > 0 (got {a.temperature}); 1 is the paper's choice")
    need(0 <= a.label_smoothing < 1, f"--label_smoothing must be in [0, 1) (got {a.label_smoothing})")
    need(a.keep_exports >= 1, f"--keep_exports must be >= 1 (got {a.keep_exports}): peers read the newest export")
    need(a.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1 (got {a.keep_checkpoints}): resume needs one")
    for name in ("burn_in_steps", "warmup_steps", "distill_ramp_steps"):
        need(getattr(a, name) >= 0, f"--{name} must be >= 0 (got {getattr(a, name)})")
    need(0 <= a.min_lr_ratio <= 1, f"--min_lr_ratio must be in [0, 1] (got {a.min_lr_ratio})")
    if a.target_val_loss is not None:
        need(a.target_val_loss > 0, f"--target_val_loss must be > 0 nats (got {a.target_val_loss})")
    if a.lr is not None:
        need(a.lr > 0, f"--lr must be > 0 (got {a.lr})")
    if a.dropout is not None:
        need(0 <= a.dropout < 1, f"--dropout must be in [0, 1) (got {a.dropout})")
    if a.loss_chunk_tokens is not None:
        need(a.loss_chunk_tokens >= 1, f"--loss_chunk_tokens must be >= 1 (got {a.loss_chunk_tokens})")
    need(a.loss_chunk_mb > 0, f"--loss_chunk_mb must be > 0 (got {a.loss_chunk_mb})")
    need(a.teacher_topk >= 0, f"--teacher_topk must be >= 0 (got {a.teacher_topk}); 0 keeps the dense distribution")
    need(not (a.teacher_partition and a.teacher_offload != "none"),
         "--teacher_partition and --teacher_offload cpu are alternatives: partition spreads a teacher over the "
         "group's devices, offload keeps it in host memory; pick one")
    need(a.poll_interval > 0, f"--poll_interval must be > 0 seconds (got {a.poll_interval})")
    need(a.teacher_timeout >= 0, f"--teacher_timeout must be >= 0 seconds (got {a.teacher_timeout})")
    need(a.dist_timeout > 0, f"--dist_timeout must be > 0 seconds (got {a.dist_timeout})")
    need(a.max_bad_steps >= 1, f"--max_bad_steps must be >= 1 (got {a.max_bad_steps})")
    need(a.teacher_max_ppl_ratio == 0 or a.teacher_max_ppl_ratio > 1, f"--teacher_max_ppl_ratio must be > 1, or 0 "
         f"to switch the teacher guard off (got {a.teacher_max_ppl_ratio})")
    need(a.teacher_guard_window >= 1, f"--teacher_guard_window must be >= 1 (got {a.teacher_guard_window})")
    if a.stop_after_steps is not None:
        need(1 <= a.stop_after_steps <= a.max_steps, f"--stop_after_steps must be in 1..--max_steps "
             f"({a.max_steps}) (got {a.stop_after_steps}); leave it out to train to --max_steps")
    if a.max_teacher_staleness is not None:
        need(a.max_teacher_staleness >= 0, f"--max_teacher_staleness must be >= 0 steps (got {a.max_teacher_staleness})")
        sync = a.teacher_sync == "on" or (a.teacher_sync == "auto" and a.group_id is None)
        if codistill and sync and 0 <= a.max_teacher_staleness < 2 * a.export_every:
            errors.append(f"--max_teacher_staleness {a.max_teacher_staleness} < 2 x --export_every "
                          f"({2 * a.export_every}): sync teachers are K..2K steps old, so every teacher would be "
                          f"dropped; raise --max_teacher_staleness or leave it out")
    if codistill:
        if a.export_every > a.max_steps:
            errors.append(f"--export_every {a.export_every} > --max_steps {a.max_steps}: no group would ever export, "
                          f"so no teacher is ever used; lower --export_every, or set --distill_weight 0 "
                          f"(or --num_groups 1) for the plain baseline")
        elif a.burn_in_steps >= a.max_steps:
            warnings.append(f"--burn_in_steps {a.burn_in_steps} >= --max_steps {a.max_steps}: the distillation "
                            f"term never switches on, this run is the baseline")
        elif (a.teacher_sync == "on" or (a.teacher_sync == "auto" and a.group_id is None)) \
                and 2 * a.export_every >= a.max_steps:
            warnings.append(f"2 x --export_every ({2 * a.export_every}) >= --max_steps {a.max_steps}: sync teachers "
                            f"(at step s the peers' exports of step s-K) never switch on; lower --export_every")
    if a.teacher is not None:
        need(Path(a.teacher).exists(), f"--teacher {a.teacher}: no such file or directory; name a group directory "
             f"of a finished run (e.g. runs/teacher/group_0) or one of its exports")
        need(a.distill_weight > 0, f"--teacher {a.teacher} with --distill_weight 0: the teacher would never be used; "
             f"leave --teacher out for the baseline, or set --distill_weight > 0")
    if a.carry_state or a.eval_state == "carried":
        which = "--carry_state" if a.carry_state else "--eval_state carried"
        need(a.model == "lstm", f"{which} needs --model lstm (got --model {a.model}): only the LSTM has a state to "
             "carry from one window to the next; a Transformer sees each window on its own")
    if a.warmup_steps >= a.max_steps:
        warnings.append(f"--warmup_steps {a.warmup_steps} >= --max_steps {a.max_steps}: the LR never leaves warmup")
    return errors, warnings


def model_config(a, vocab_size: int):
    """The model the flags name, for data whose tokenizer has ``vocab_size`` ids: a preset, or
    (--model hf) the architecture of --hf_config / --init_from's config.json. The model's
    vocabulary may be larger than the data's (embeddings padded to a multiple, as HF models
    often are: the extra rows are never a target); a smaller one is an error naming both."""
    from model import hf_model_config, preset_config
    from model.hf import HFConfigError, pretrained_config, read_hf_config
    max_len = max(1024, a.seq_len)
    if a.model != "hf":
        return preset_config(a.model, a.model_size, vocab_size, max_len, dropout=a.dropout)
    flag, path = ("--init_from", a.init_from) if a.init_from else ("--hf_config", a.hf_config)
    cfg = hf_model_config(read_hf_config(path, flag), max_len, a.dropout)
    positions = getattr(pretrained_config(cfg.hf_config), "max_position_embeddings", None)
    if positions is not None and positions < a.seq_len:
        raise HFConfigError(f"{flag} {path}: the model has {positions} positions (max_position_embeddings), "
                            f"fewer than --seq_len {a.seq_len}; use --seq_len <= {positions}")
    if cfg.vocab_size < vocab_size:
        raise HFConfigError(f"{flag} {path}: the model's vocab_size is {cfg.vocab_size} but the data's tokenizer "
                            f"({a.data}) has {vocab_size} ids; use a config with vocab_size >= {vocab_size} "
                            "(or prepare the data with this model's tokenizer: data_prep --tokenizer DIR)")
    return cfg
