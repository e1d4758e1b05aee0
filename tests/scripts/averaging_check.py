#!/usr/bin/env python
"""LocalSGD averaging and DiLoCo's outer step on real DeepSpeed engines, 2 ranks (gloo, CPU):

    deepspeed --num_gpus 2 tests/scripts/averaging_check.py --out DIR

Two "groups" = two engines in this process over the same 2 ranks (so ZeRO-3 partitions every
master across both ranks, and each group's collectives run over 2 ranks, as in a real group).
For ZeRO-2 and ZeRO-3 x fp32 and bf16, on a tiny LSTM whose parameters mostly have an odd
number of elements (a padded last partition under ZeRO-3) and a ZeRO-3 persistence threshold
that keeps some parameters gathered and partitions the rest:
1. both engines train 2 steps on different data (Adam moments non-zero, masters differ);
2. read_masters on both; the module's weights must equal the masters cast to its dtype;
3. LocalSGD: write_masters(average) into both; the masters read back must equal the hand mean
   (a + b) / 2 bit for bit, the module's weights the mean cast, the inner optimizer's state on
   every rank (every tensor of its state_dict: moments, steps) unchanged, and a forward of the
   engine must give the logits of a host module holding the new weights;
4. DiLoCo: two rounds (train 1 step, outer step, write) against torch.optim.SGD(nesterov=True)
   on the pseudo-gradient (bit for bit) and against the formula written out (a stated tolerance:
   ATen's add with alpha uses a fused multiply-add in its vectorised loop); a round resumed
   mid-way from the outer state saved through torch.save/torch.load(weights_only=True) - as
   DeepSpeed's client_state is loaded here - gives the bit-identical result.
DIR/rank_R.json: {"cases": {name: [failures]}, "seconds": ...}; tests/integration/test_averaging.py asserts.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

V = 65  # with d_embed 33 and d_model 25: embed (65 x 33) and head (65 x 25) have an odd number of elements


def model_config():
    from model import preset_config
    return preset_config("lstm", "tiny", V, d_model=25, d_embed=33)


def engine_for(ds_cfg, seed):
    import deepspeed

    from model import build_model
    torch.manual_seed(seed)
    model = build_model(model_config())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    return engine


def train(engine, steps, seed):
    g = torch.Generator().manual_seed(seed * 1000 + torch.distributed.get_rank())
    for _ in range(steps):
        batch = torch.randint(0, V, (2, 17), generator=g)
        logits = engine(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        engine.backward(loss)
        engine.step()


def module_weights(engine) -> dict[str, torch.Tensor]:
    """The module's full weights as the forward sees them (gathered under ZeRO-3)."""
    import deepspeed
    out = {}
    for n, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
            out[n] = p.detach().to("cpu", copy=True)
    return out


def optimizer_state(engine) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the inner optimizer's state on this rank (its partition under ZeRO)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = []
    for i, st in enumerate(inner.state.values()):  # not state_dict(): ZeRO-3 keys it by flat partitions
        for k, v in sorted(st.items()):
            out.append((f"{i}.{k}", v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)))
    return out


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class Case:
    def __init__(self, name):
        self.name, self.bad = name, []

    def equal(self, what, a: dict, b: dict):
        for k in a:
            if not torch.equal(a[k], b[k]):
                d = (a[k].float() - b[k].float()).abs().max().item()
                self.bad.append(f"{what}: {k} differs (max {d:.3g})")
                return

    def check(self, ok, msg):
        if not ok:
            self.bad.append(msg)


def run_case(case: Case, stage: int, dtype: torch.dtype, base: dict):
    from codistill.averaging import OuterOptimizer, average, gradient_element_bytes, read_masters, write_masters
    from codistill.ds_config import resolve_ds_config
    from model import build_model
    cfg = json.loads(json.dumps(base))
    cfg["zero_optimization"]["stage"] = stage
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1000  # embed/head/LSTM partitioned, biases kept
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds = resolve_ds_config(cfg, 2, None, torch.device("cpu"))
    case.check(ds["zero_optimization"]["stage"] == stage, f"ran as stage {ds['zero_optimization']['stage']}")
    A, B = engine_for(ds, 1), engine_for(ds, 2)
    case.check(gradient_element_bytes(A) == (2 if dtype == torch.bfloat16 else 4),
               f"gradient bytes per element {gradient_element_bytes(A)}")
    if stage == 3:
        pers = [n for n, p in A.module.named_parameters() if p.ds_persist]
        odd = [n for n, p in A.module.named_parameters() if p.ds_numel % 2]
        case.check(pers and len(pers) < len(list(A.module.parameters())), f"persistent params: {pers}")
        case.check(len(odd) >= 2, f"odd-sized params: {odd}")
    train(A, 2, 1)
    train(B, 2, 2)

    def masters_and_module(what, want=None):
        m = {"A": read_masters(A), "B": read_masters(B)}
        for g, e in (("A", A), ("B", B)):
            mod = module_weights(e)
            case.equal(f"{what}: module {g} vs its masters cast", mod, {k: v.to(dtype) for k, v in m[g].items()})
            if want is not None:
                case.equal(f"{what}: masters {g} vs expected", m[g], want)
        return m["A"], m["B"]

    mA, mB = masters_and_module("trained")
    case.check(any(not torch.equal(mA[k], mB[k]) for k in mA), "the two groups' masters are equal before averaging")
    opt_before = {"A": optimizer_state(A), "B": optimizer_state(B)}

    def opt_unchanged(what):
        for g, e in (("A", A), ("B", B)):
            now = optimizer_state(e)
            case.check([k for k, _ in now] == [k for k, _ in opt_before[g]], f"{what}: optimizer {g} state keys changed")
            for (k, a), (_, b) in zip(opt_before[g], now):
                if not torch.equal(a, b):
                    case.bad.append(f"{what}: optimizer {g} state {k} changed")
                    break

    # ---- LocalSGD
    avg = average([mA, mB])
    case.equal("average vs (a + b) / 2", avg, {k: (mA[k] + mB[k]) / 2 for k in mA})
    write_masters(A, avg)
    write_masters(B, avg)
    masters_and_module("after average", avg)
    opt_unchanged("after average")
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = build_model(model_config())
    ref.load_state_dict({k: v.to(dtype) for k, v in avg.items()})
    with torch.no_grad():
        A.eval()
        got, want = A(x).float(), ref.to(dtype)(x).float()
        A.train()
    case.check(torch.allclose(got, want, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2),
               f"forward after average: logits differ from a host module's by {(got - want).abs().max().item():.3g}")

    # ---- DiLoCo: two rounds, the second resumed from the state saved mid-way
    outer = OuterOptimizer(lr=0.7, momentum=0.9)
    outer.begin(avg)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in avg.items()}
    sgd = torch.optim.SGD(list(params.values()), lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    momentum = {}
    start = avg
    for rnd in range(2):
        train(A, 1, 10 + rnd)
        train(B, 1, 20 + rnd)
        nA, nB = masters_and_module(f"round {rnd} trained")
        saved = roundtrip(outer.state_dict())
        opt_before = {"A": optimizer_state(A), "B": optimizer_state(B)}
        new = outer.step([nA, nB])
        resumed = OuterOptimizer(lr=0.7, momentum=0.9)
        resumed.begin(start)  # the model's names and shapes, as the trainer has them on resume
        resumed.load_state_dict(roundtrip(saved))
        case.equal(f"round {rnd}: resumed outer step vs uninterrupted", resumed.step([nA, nB]), new)
        for k, p in params.items():
            p.grad = start[k] - (nA[k] + nB[k]) / 2
        sgd.step()
        case.equal(f"round {rnd}: outer step vs torch SGD nesterov", new, {k: p.detach() for k, p in params.items()})
        for k in start:  # the formula written out: m = mu*m + g; new = start - lr*(g + mu*m)
            g = start[k] - (nA[k] + nB[k]) / 2
            momentum[k] = g if k not in momentum else 0.9 * momentum[k] + g
            hand = start[k] - 0.7 * (g + 0.9 * momentum[k])
            tol = 8 * torch.finfo(torch.float32).eps * max(1.0, start[k].abs().max().item())
            if not torch.allclose(new[k], hand, rtol=0, atol=tol):
                case.bad.append(f"round {rnd}: {k} differs from the formula by {(new[k] - hand).abs().max().item():.3g}")
        write_masters(A, new)
        write_masters(B, new)
        masters_and_module(f"round {rnd} after outer step", new)
        opt_unchanged(f"round {rnd} after outer step")
        start = new
    train(A, 1, 99)  # training goes on from the written masters
    case.check(all(torch.isfinite(v).all() for v in read_masters(A).values()), "non-finite after training on")
    for e in (A, B):
        e.destroy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cases", nargs="*", default=["zero2_fp32", "zero2_bf16", "zero3_fp32", "zero3_bf16"])
    a = p.parse_args([x for x in sys.argv[1:] if not x.startswith("--local_rank")])
    import deepspeed
    import deepspeed.comm as dist

    from codistill.comm import rendezvous_defaults
    from codistill.ds_config import load_ds_config
    rendezvous_defaults()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    __import__('codistill.comm').comm.destroy_at_exit()  # gloo's threads end before Python does
    rank = dist.get_rank()
    base = load_ds_config(ROOT / "ds_configs" / "zero2.json")
    base["train_micro_batch_size_per_gpu"] = 2
    out = {"rank": rank, "cases": {}}
    t0 = time.time()
    for name in a.cases:
        stage, dname = name.split("_")
        case = Case(name)
        try:
            run_case(case, int(stage[-1]), {"fp32": torch.float32, "bf16": torch.bfloat16}[dname], base)
        except Exception:
            case.bad.append("raised: " + traceback.format_exc()[-3000:])
        out["cases"][name] = case.bad
        dist.barrier()
    out["seconds"] = time.time() - t0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank_{rank}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
