#!/usr/bin/env python
"""Every teacher placement gives the student the same teacher, on 2 groups x 2 ranks.

    deepspeed --num_gpus 4 tests/scripts/teacher_modes.py --out DIR

Each rank builds one TeacherPool per mode - full, partitioned (ZeRO-3 over its group's 2
ranks), offloaded, and top-K (K = V, and K < V on the partitioned teacher) - and swaps the
same peer exports into all of them the way the trainer does (only the group's leader has read
the export; TeacherPool.swap hands it to the other rank). On one batch per rank it records the
distillation loss (codistill_loss on fixed student logits) of every mode, the bytes of teacher
weights the rank holds, and what happens when the leader has no export to offer (a corrupt,
refused or late export: the loader hands over None) - the previous teacher must stay in every
mode. Writes DIR/rank_R.json; tests/e2e/test_train.py asserts on them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args([x for x in sys.argv[1:] if not x.startswith("--local_rank")])
    import deepspeed
    import deepspeed.comm as dist
    from codistill.comm import GroupComm, rendezvous_defaults
    from codistill.ds_config import load_ds_config, resolve_ds_config
    from codistill.exchange import read_export, write_export
    from codistill.loss import codistill_loss
    from codistill.teacher import TeacherPool
    from codistill.topology import build_mpus, plan
    from model import build_model, preset_config

    rendezvous_defaults()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = plan(world, rank, 2)
    (gid,) = topo.hosted
    peer = 1 - gid
    mpu = build_mpus(topo)[gid]
    leader = topo.is_group_leader(gid)
    device = torch.device("cpu")
    comm = GroupComm(device, topo.group_ranks[gid][0], mpu.get_data_parallel_group(), topo.dp_size(gid), leader)
    base = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    base["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    ds_cfg = resolve_ds_config(base, topo.dp_size(gid), None, device)
    cfg = preset_config("transformer", "tiny", 512)
    v = cfg.vocab_size

    exports = Path(a.out) / "exports"
    if rank == 0:
        for step, seed in ((10, 1), (20, 2)):
            torch.manual_seed(seed)
            sd = build_model(cfg).state_dict()
            w = sd["hf.lm_head.weight"] * 8   # peaked distributions, so that differences show (tied: both names)
            sd["hf.lm_head.weight"] = sd["hf.model.embed_tokens.weight"] = w
            write_export(exports, step, sd, {"group": peer})
    dist.barrier()

    def export(step):  # only the group's leader reads; the other rank receives by the swap
        return read_export(exports, step) if leader else None

    modes = {"full": {}, "partition": {"placement": "partition"}, "offload": {"placement": "offload"},
             "topk_v": {"topk": v}, "partition_topk": {"placement": "partition", "topk": 16},
             "full_topk": {"topk": 16}}
    pools = {m: TeacherPool(cfg, device, comm=comm, mpu=mpu, ds_config=ds_cfg, **kw) for m, kw in modes.items()}
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, v, (2, 24), generator=g)
    y = torch.randint(0, v, (2, 24), generator=g)
    s = torch.randn(2, 24, v, generator=g)

    def measure(pool):
        q, health = pool.probs([peer], x, 1.0, y, num_groups=2)
        loss, st = codistill_loss(s, y, q, 1.0)
        dense = q if isinstance(q, torch.Tensor) else None
        return {"loss": loss.item(), "distill": st.distill, "teacher_ce": health[peer].item(),
                "step": pool.steps.get(peer), "q": dense.clone() if dense is not None else None}

    out = {"rank": rank, "group": gid, "leader": leader}
    for name, pool in pools.items():
        pool.swap({peer: (10, export(10))})
        first = measure(pool)
        pool.swap({peer: (20, None)})      # the leader has nothing (refused / late): keep the teacher
        kept = measure(pool)
        pool.swap({peer: (20, export(20))})
        second = measure(pool)
        if name == "full":
            ref = {"first": first["q"], "second": second["q"]}
        for r in (first, kept, second):
            q = r.pop("q")
            r["q_max_diff_vs_full"] = None if q is None else (q - ref["second" if r is second else "first"]).abs().max().item()
        out[name] = {"first": first, "kept": kept, "second": second, "resident_bytes": pool.resident_bytes()}
    part = pools["partition"].teachers[peer]
    out["partition_full_bytes"] = part.full_bytes()
    Path(a.out, f"rank_{rank}.json").write_text(json.dumps(out, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
