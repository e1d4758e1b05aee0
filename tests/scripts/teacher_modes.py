#!/usr/bin/env python
"""The CPU matrix of teacher placements, on 2 groups x 2 ranks (ZeRO-3 partitions over 2 ranks):

    deepspeed --num_gpus 4 tests/scripts/teacher_modes.py --out DIR

mode {full, partition, offload} x {dense, top-K} x dtype {fp32, bf16} x arch {LSTM, the repo's
Transformer (RoPE, untied head), an HF Llama config with tie_word_embeddings}. For each
(arch, dtype) rank 0 writes two peer exports; every combination builds a TeacherPool the way
the trainer does (``like``: a student module with DeepSpeed's bf16 - parameters cast, buffers
fp32) and swaps the exports in as the trainer does (only the group's leader has read the
export, TeacherPool.swap hands it to the other rank; once the leader has nothing to offer - a
refused or late export - and the previous teacher must stay). Each is measured against a
reference: a full teacher of the same dtype that this rank loads from the file itself.

Per combination DIR/rank_R.json records: an error (a build or forward that raised), the largest
difference of q (dense probabilities, or top-K values and rest, and whether the top-K indices are
equal) and of the teacher's cross entropy against the reference, for both exports and the kept
one; each buffer's dtype next to the student's and its largest difference from the reference's;
whether torch.nn.functional.linear is still the original function; the teacher bytes the rank
holds; and for the offloaded teacher the bytes copied to the device per probs() call next to the
unique parameter bytes. tests/e2e/test_teachers_placement.py asserts on them.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

V = 64
ORIGINAL_LINEAR = torch.nn.functional.linear
LLAMA_TIED = {"model_type": "llama", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": True}


def configs(tmp: Path) -> dict:
    from model import hf_model_config, preset_config
    from model.hf import read_hf_config
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "llama_tied.json").write_text(json.dumps(LLAMA_TIED))
    (tmp / "llama_untied.json").write_text(json.dumps(dict(LLAMA_TIED, tie_word_embeddings=False)))
    return {"lstm": preset_config("lstm", "tiny", V, d_model=64, d_embed=32),
            "transformer": preset_config("transformer", "tiny", V, max_seq_len=64, d_model=64, d_ff=128,
                                         tie_embeddings=False),
            "llama_tied": hf_model_config(read_hf_config(tmp / "llama_tied.json"), max_seq_len=64),
            "llama_untied": hf_model_config(read_hf_config(tmp / "llama_untied.json"), max_seq_len=64)}


def student_like(cfg, dtype):
    """The student module as its DeepSpeed engine holds it: bf16 casts parameters, not buffers."""
    from model import build_model
    m = build_model(cfg)
    for p in m.parameters():
        p.data = p.data.to(dtype)
    return m


def diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare(q, ref, h, h_ref, peer) -> dict:
    out = {"ce_diff": abs(h[peer].item() - h_ref[peer].item())}
    if isinstance(q, torch.Tensor):
        out["q_diff"] = diff(q, ref)
    else:
        out["q_diff"] = max(diff(q.values, ref.values), diff(q.rest, ref.rest))
        out["indices_equal"] = bool(torch.equal(q.indices, ref.indices))
    return out


def snapshot(q):
    return q.clone() if isinstance(q, torch.Tensor) else type(q)(q.values.clone(), q.indices.clone(), q.rest.clone())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--arch", nargs="*", default=["lstm", "transformer", "llama_tied", "llama_untied"])
    a = p.parse_args([x for x in sys.argv[1:] if not x.startswith("--local_rank")])
    import deepspeed
    import deepspeed.comm as dist

    from codistill.comm import GroupComm, rendezvous_defaults
    from codistill.ds_config import load_ds_config, resolve_ds_config
    from codistill.exports import read_export, write_export
    from codistill.teachers.placement import unique_tensors
    from codistill.teachers.pool import TeacherPool
    from codistill.topology import build_mpus, plan
    from model import build_model

    rendezvous_defaults()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    __import__('codistill.comm').comm.destroy_at_exit()  # gloo's threads end before Python does
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
    ds_fp32 = resolve_ds_config(base, topo.dp_size(gid), None, device)
    ds_bf16 = dict(ds_fp32, bf16={"enabled": True})  # bf16 on CPU, as a bf16 GPU run has it
    cfgs = configs(Path(a.out) / "configs")
    out = {"rank": rank, "group": gid, "leader": leader, "combos": {}}
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, V, (2, 48), generator=g)
    y = torch.randint(0, V, (2, 48), generator=g)

    for arch in a.arch:
        cfg = cfgs[arch]
        for dname, dtype, ds_cfg in (("fp32", torch.float32, ds_fp32), ("bf16", torch.bfloat16, ds_bf16)):
            exports = Path(a.out) / f"exports_{arch}_{dname}"
            if rank == 0:
                for step, seed in ((10, 1), (20, 2)):
                    torch.manual_seed(seed)
                    sd = build_model(cfg).state_dict()
                    head = next(k for k in sd if k.endswith(("head.weight", "lm_head.weight")))
                    tied = [k for k in sd if sd[k].data_ptr() == sd[head].data_ptr()]
                    w = sd[head] * 8  # peaked distributions, so that differences show (tied: every name)
                    for k in tied:
                        sd[k] = w
                    write_export(exports, step, sd, {"group": peer})
            dist.barrier()
            like = student_like(cfg, dtype)
            student_buffers = {n: b.dtype for n, b in like.named_buffers()}
            for topk in (0, 16):
                # the reference: a full teacher this rank loads from the file itself
                ref_pool = TeacherPool(cfg, device, dtype, like=like, topk=topk)
                refs = {}
                for step in (10, 20):
                    ref_pool.load(peer, read_export(exports, step))
                    q, h = ref_pool.probs([peer], x, 1.0, y, num_groups=2)
                    refs[step] = (snapshot(q), h.clone())
                ref_module = ref_pool.teachers[peer].module
                ref_buffers = dict(ref_module.named_buffers())
                param_bytes = sum(t.numel() * t.element_size() for t in unique_tensors(ref_module)
                                  if not any(t is b.data for b in ref_module.buffers()))
                for mode in ("full", "partition", "offload"):
                    name = f"{arch}/{dname}/{mode}/{'topk' if topk else 'dense'}"
                    rec = out["combos"][name] = {}
                    try:
                        pool = TeacherPool(cfg, device, dtype, like=like, comm=comm, placement=mode, mpu=mpu,
                                           ds_config=ds_cfg, topk=topk)
                        pool.reserve([peer])
                        rec["linear_is_original"] = torch.nn.functional.linear is ORIGINAL_LINEAR
                        for when, step, has in (("first", 10, True), ("kept", 20, False), ("second", 20, True)):
                            pool.swap({peer: (step, read_export(exports, step) if leader and has else None)})
                            teacher = pool.teachers[peer]
                            moved0 = getattr(teacher, "bytes_moved", 0)
                            q, h = pool.probs([peer], x, 1.0, y, num_groups=2)
                            ref_step = 10 if when == "kept" else step
                            rec[when] = dict(compare(q, refs[ref_step][0], h, refs[ref_step][1], peer),
                                             step=pool.steps[peer])
                            if mode == "offload":
                                rec[when]["bytes_moved"] = teacher.bytes_moved - moved0
                        rec["param_bytes"] = param_bytes
                        rec["ref_ce"] = [refs[s][1][peer].item() for s in (10, 20)]  # two different teachers
                        rec["buffers"] = {n: {"dtype": str(b.dtype), "student": str(student_buffers.get(n)),
                                              "diff": diff(b, ref_buffers[n]) if n in ref_buffers else None}
                                          for n, b in teacher.module.named_buffers()}
                        rec["resident_bytes"] = pool.resident_bytes()
                        rec["full_bytes"] = ref_pool.resident_bytes()
                    except Exception as e:  # recorded: the test names every failing combination
                        rec["error"] = f"{type(e).__name__}: {e}"
                        rec["traceback"] = traceback.format_exc()[-3000:]
                    finally:
                        torch.nn.functional.linear = ORIGINAL_LINEAR  # one combination's leak stays its own
                    dist.barrier()
    Path(a.out, f"rank_{rank}.json").write_text(json.dumps(out, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
