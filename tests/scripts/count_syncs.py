#!/usr/bin/env python
"""Device synchronizations per training step of recipes/train_lm.py, counted in a real run:

    deepspeed --num_gpus 2 tests/scripts/count_syncs.py OUT.json TRAIN_LM FLAGS...

Every call of DeepSpeed's ``get_accelerator().synchronize`` (and of ``torch.cuda.synchronize``,
where reached) is counted; rank 0 writes to OUT.json the count inside each call of
``codistill.train.train_step`` (one training step of every hosted group: forward/backward, the
step's sync, the optimizer update; evaluation, exports and checkpoints are outside it).

On CPU ``zero_optimization.overlap_comm`` "auto" resolves to false (and DeepSpeed's CPU
accelerator cannot run it: its streams are None), so ZeRO-1/2's overlap_comm sync is not counted
here; docs/gpu.md states it from the source (stage_1_and_2.py
independent_gradient_partition_epilogue). Stream and event syncs (ZeRO-3's
reduce_and_partition_stream) are not counted either.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    out, train_argv = Path(argv[0]), argv[1:]

    import train_lm
    from deepspeed.accelerator import get_accelerator

    from codistill import train

    calls = {"n": 0}
    acc = get_accelerator()

    def counted(fn):
        def wrapper(*a, **kw):
            calls["n"] += 1
            return fn(*a, **kw)
        return wrapper

    acc.synchronize = counted(acc.synchronize)  # instance attribute: every get_accelerator().synchronize()
    torch.cuda.synchronize = counted(torch.cuda.synchronize)
    per_step, step_fn = [], train.train_step

    def train_step(cfg, step, *a, **kw):
        before = calls["n"]
        result = step_fn(cfg, step, *a, **kw)
        per_step.append([step, calls["n"] - before])
        return result

    train.train_step = train_step  # what codistill/train.py train() calls
    try:
        train_lm.main(train_argv)
    finally:
        if int(os.environ.get("RANK", 0)) == 0:
            out.write_text(json.dumps({"per_step": per_step, "total": calls["n"]}))


if __name__ == "__main__":
    main()
