#!/usr/bin/env python
"""Device synchronizations and host reads of tensor values per training step of
recipes/train_lm.py, counted in a real run:

    deepspeed --num_gpus 2 tests/scripts/count_syncs.py OUT.json TRAIN_LM FLAGS...

Every call of DeepSpeed's ``get_accelerator().synchronize`` (and of ``torch.cuda.synchronize``,
where reached) is counted, and every read of a tensor's value on the host (Tensor.item, tolist,
__bool__, __float__, __int__: on a GPU each one of a device tensor is a device->host copy the host
waits for), with where it happened (the first frame outside torch and its caller). Rank 0 writes
to OUT.json, for each call of ``codistill.train.train_step`` (one training step of every hosted
group: forward/backward, the step's sync, the optimizer update; evaluation, exports and
checkpoints are outside it), [step, synchronize calls, [read sites]].

On CPU every tensor is a host tensor, so a read counted here is a host sync on a GPU only where
its tensor lives on the device there (tests/integration/test_syncs.py says which do).
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
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))


# a tensor's value read on the host: on a GPU each is a device->host copy the host waits for
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def where(frame) -> str:
    """"deepspeed/<file>:<function>:<line>", "codistill/<file>:<function>:<line>", ... of a frame."""
    path = Path(frame.f_code.co_filename)
    for top in ("deepspeed", "codistill", "model", "recipes"):
        if top in path.parts:
            rel = path.parts[len(path.parts) - path.parts[::-1].index(top) - 1:]
            return f"{'/'.join(rel)}:{frame.f_code.co_name}:{frame.f_lineno}"
    return f"{path.name}:{frame.f_code.co_name}:{frame.f_lineno}"


def site(frame) -> str:
    """Where a read happened: its frame and its caller's ("<frame> <- <caller>")."""
    if frame is None:
        return "?"
    return where(frame) + (f" <- {where(frame.f_back)}" if frame.f_back is not None else "")


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
    reads = {"on": False, "sites": []}
    torch_dir = str(Path(torch.__file__).parent)

    def read_counted(fn):
        def wrapper(self, *a, **kw):
            if reads["on"] and threading.current_thread() is threading.main_thread():  # the training thread
                f = sys._getframe(1)
                while f is not None and f.f_code.co_filename.startswith(torch_dir):
                    f = f.f_back  # the first caller outside torch (DeepSpeed's or the trainer's code)
                reads["sites"].append(site(f))
            return fn(self, *a, **kw)
        wrapper.__name__ = fn.__name__
        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, read_counted(getattr(torch.Tensor, name)))
    per_step, step_fn = [], train.train_step

    def train_step(cfg, step, *a, **kw):
        before = calls["n"]
        reads["sites"], reads["on"] = [], True
        try:
            result = step_fn(cfg, step, *a, **kw)
        finally:
            reads["on"] = False
        per_step.append([step, calls["n"] - before, reads["sites"]])
        return result

    train.train_step = train_step  # what codistill/train.py train() calls
    try:
        train_lm.main(train_argv)
    finally:
        if int(os.environ.get("RANK", 0)) == 0:
            out.write_text(json.dumps({"per_step": per_step, "total": calls["n"]}))


if __name__ == "__main__":
    main()
