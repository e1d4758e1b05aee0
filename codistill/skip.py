"""Skipping an optimizer step whose loss is NaN/Inf, with DeepSpeed's counters kept consistent.

The trainer runs the forward and backward passes of every micro-batch of a step, then learns in
the step's one sync (codistill/comm.py StepControl) whether any rank of the group saw a
non-finite loss - no host sync per micro-batch. If one did, the update at the accumulation
boundary is not taken: instead of the last ``engine.step()``, skip_step drops the step's
gradients (all of them, the non-finite ones included): from ``param.grad`` and, under ZeRO,
from the optimizer's partitioned accumulation buffers (checked against a run that never saw the
step for ZeRO 0, 2 and 3 in tests/e2e/test_fault_tolerance.py, and by hand for ZeRO 1 with DeepSpeed
0.19.8; these buffers are DeepSpeed internals, so re-check the test after a DeepSpeed upgrade).

The step is then accounted like DeepSpeed accounts an fp16-overflow step (``skipped_steps``
+1, ``global_steps`` +1, samples counted) with one difference: the LR scheduler is stepped,
so the LR keeps following the step counter and a skipped step does not shift the schedule of
the rest of the run. ``micro_steps`` advances by a whole step, so the accumulation boundary
stays aligned. These counters are part of DeepSpeed's checkpoint, so resume stays exact.
"""
from __future__ import annotations


def skip_step(engine, micros_done: int) -> None:
    """Account a step as skipped; ``micros_done``: the ``engine.step()`` calls already made in it
    (the non-boundary micro-batches). Every micro-batch's backward pass has run."""
    accum = engine.gradient_accumulation_steps()
    engine.zero_grad()
    opt = engine.optimizer
    if engine.zero_optimization_stage() and hasattr(opt, "zero_grad"):
        opt.zero_grad()
        # ZeRO-1/2 keep reduced gradients of earlier micro-steps in their own buffers
        for name in ("all_grad_tensors", "averaged_gradients", "accumulated_grads_in_cpu"):
            buffers = getattr(opt, name, None)
            if isinstance(buffers, dict):
                if name == "accumulated_grads_in_cpu":
                    buffers.clear()
                else:
                    for k in buffers:
                        buffers[k] = None
    engine.micro_steps += accum - micros_done
    engine.skipped_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
