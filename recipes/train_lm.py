#!/usr/bin/env python
"""Train language models with codistillation (Anil et al., 2018) under DeepSpeed.

    deepspeed recipes/train_lm.py --ds_config ds_configs/zero2.json            # 2 groups, 1 process
    deepspeed --num_gpus 4 recipes/train_lm.py --ds_config ds_configs/zero2.json --num_groups 2
    deepspeed recipes/train_lm.py ... --num_groups 2 --group_id 0               # one launch per group

Each group trains its own copy of the model on its own shard of the data. Every --export_every
steps it publishes its weights; every group runs its peers' stale exports in inference mode on
its own batch and adds alpha * CE(mean teacher probs, student probs) to its loss after
--burn_in_steps. --num_groups 1 or --distill_weight 0 is the plain baseline, same code.
--peer_use average|diloco averages the groups' weights at every export step instead (LocalSGD,
DiLoCo; one launch hosting every group; docs/averaging.md).

The story (main, below; its pieces in codistill/train.py): plan and check everything (nothing
written) -> start distributed -> lock the groups
-> build the students and the exchange -> resume -> train -> finish. The pieces: Student
(codistill/student.py), Exchange (codistill/exchange.py), Checkpointer (codistill/checkpoint.py),
StepControl (codistill/comm.py).
"""
from __future__ import annotations

import os
import sys
import time

from codistill import flags, outputs, runlog
from codistill.checkpoint import Checkpointer
from codistill.comm import StepControl, lost_rank_message
from codistill.exchange import Exchange
from codistill.layout import RunLayout
from codistill.student import Student
from codistill.topology import build_mpus
from codistill.train import (
    EXIT_CODES,
    ROOT,
    SETUP_ERRORS,
    banner,
    finish,
    init_distributed,
    load_inputs,
    lock_groups,
    plan_run,
    train,
)
from fileio import write_json


def parse_args(argv=None):
    return flags.parse_args(argv, description=__doc__)


def main(argv=None):
    cfg = parse_args(argv)
    log = runlog.Console(int(os.environ.get("RANK", 0)))
    try:
        p = plan_run(cfg, log)
        init_distributed(p.device, cfg.faults.dist_timeout)
        data, model_cfg, fixed = load_inputs(p, log)
    except SETUP_ERRORS as e:
        log.error(str(e))
        sys.exit(2)
    locks = lock_groups(p, p.device, log)
    students, exchange, outcome = [], None, "done"
    try:
        mpus = build_mpus(p.topo)
        p.rss_start_mib = outputs.rss_mib()
        students = [Student(g, cfg, p.topo, mpus[g], data, model_cfg, p.ds_cfgs[g], p.device, log) for g in p.topo.hosted]
        exchange = Exchange(cfg, p.topo, students, model_cfg, data.tokenizer_sha256, p.device, log, fixed)
        banner(p, students, exchange, fixed, log)
        ckpt = Checkpointer(students, exchange, cfg.checkpoint, cfg.training.max_steps, p.device, log)
        try:
            start = ckpt.restore(p.run if cfg.checkpoint.resume == "auto" else RunLayout(cfg.checkpoint.resume)) \
                if cfg.checkpoint.resume != "never" else 0
        except ValueError as e:
            log.error(str(e))
            sys.exit(2)
        if p.rank == 0:  # after every resume check passed: a refused resume leaves the run's record as it was
            record = {"args": cfg.as_dict(), "model": model_cfg.to_dict(), "tokenizer_sha256": data.tokenizer_sha256,
                      "ds_config": p.ds_base, "world_size": p.world, "hosted_groups_per_rank": len(p.topo.hosted),
                      "teacher_sync": exchange.sync, "git": outputs.git_sha(ROOT)}
            for path in {p.run.config, p.run.launch_config(cfg.run.group_id)}:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, record)
        if start:
            log(f"resumed from step {start} ({p.run.root if cfg.checkpoint.resume == 'auto' else cfg.checkpoint.resume})")
        t_start = time.time()
        control = StepControl(cfg.run.num_groups, p.device, swaps=bool(exchange.peers) and not exchange.sync,
                              guard=exchange.guard.enabled and bool(exchange.peers))
        outcome, step = train(cfg, students, exchange, ckpt, control, start, log)
        if outcome == "done":
            finish(p, students, exchange, ckpt, model_cfg, start, step, t_start, log)
    except RuntimeError as e:  # a peer rank died or hung (codistill/comm.py lost_rank_message)
        if (msg := lost_rank_message(e, p.rank, cfg.faults.dist_timeout)) is None:
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if exchange is not None:
            exchange.close()
        for s in students:
            s.close()
        for lock in locks:
            lock.release()
    if EXIT_CODES[outcome]:
        sys.exit(EXIT_CODES[outcome])


if __name__ == "__main__":
    main()
