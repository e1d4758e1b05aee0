"""Skipping an optimizer step whose loss is NaN/Inf, with DeepSpeed's counters kept consistent.

The trainer checks each micro-batch's loss before its backward pass (all ranks of the group
agree through one all-reduce). At the first non-finite loss the rest of the step is
abandoned: no backward, no ``engine.step()``, so no optimizer update. Gradients of earlier
micro-batches of the same step (gradient accumulation > 1) are dropped.

The step is then accounted like DeepSpeed accounts an fp16-overflow step (``skipped_steps``
+1, ``global_steps`` +1, samples counted) with one difference: the LR scheduler is stepped,
so the LR keeps following the step counter and a skipped step does not shift the schedule of
the rest of the run. ``micro_steps`` advances by a whole step, so the accumulation boundary
stays aligned. These counters are part of DeepSpeed's checkpoint, so resume stays exact.
"""
from __future__ import annotations


def skip_step(engine, micros_done: int) -> None:
    accum = engine.gradient_accumulation_steps()
    if micros_done:
        # earlier micro-batches of this step already accumulated gradients: drop them
        # (verified with ZeRO stage 0; ZeRO-1/2 use the optimizer's own zero_grad)
        engine.zero_grad()
        if engine.zero_optimization_stage() and hasattr(engine.optimizer, "zero_grad"):
            engine.optimizer.zero_grad()
    engine.micro_steps += accum - micros_done
    engine.skipped_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
