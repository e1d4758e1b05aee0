"""Flag combinations that cannot work, caught before any compute (exit 2 with the fix named).

``check(args)`` returns (errors, warnings): each message names the flag and what to do. It
looks only at the parsed flags; the ds_config, data and topology are checked by their own
modules, also before deepspeed.init_distributed.
"""
from __future__ import annotations

from pathlib import Path


def check(a) -> tuple[list[str], list[str]]:
    errors, warnings = [], []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

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
    if a.lr is not None:
        need(a.lr > 0, f"--lr must be > 0 (got {a.lr})")
    if a.dropout is not None:
        need(0 <= a.dropout < 1, f"--dropout must be in [0, 1) (got {a.dropout})")
    need(a.loss_chunk_tokens >= 1, f"--loss_chunk_tokens must be >= 1 (got {a.loss_chunk_tokens})")
    need(a.poll_interval > 0, f"--poll_interval must be > 0 seconds (got {a.poll_interval})")
    need(a.teacher_timeout >= 0, f"--teacher_timeout must be >= 0 seconds (got {a.teacher_timeout})")
    need(a.max_bad_steps >= 1, f"--max_bad_steps must be >= 1 (got {a.max_bad_steps})")
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
    if a.warmup_steps >= a.max_steps:
        warnings.append(f"--warmup_steps {a.warmup_steps} >= --max_steps {a.max_steps}: the LR never leaves warmup")
    return errors, warnings
