"""The training run in pieces, told in order by recipes/train_lm.py main: plan and check
everything before any compute (``plan_run``: nothing written, exit 2 on a bad flag) -> start
distributed (``init_distributed``) -> read the data, model config and ``--teacher``
(``load_inputs``) -> lock the hosted groups (``lock_groups``) -> ``train`` (one ``train_step``
of every hosted group per step; the exchange decides swaps and exports, the checkpointer saves)
-> ``finish`` (final weights, evaluation, summary.json).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from codistill import faults, flags, outputs, runlog
from codistill.checkpoint import latest_tag
from codistill.comm import (
    collective_timeout,
    destroy_at_exit,
    flags_any,
    rendezvous_defaults,
    watch_start_up,
)
from codistill.data import DataError, TokenData
from codistill.device import DeviceError, bind_device
from codistill.ds_config import ConfigError, load_ds_config, resolve_ds_config
from codistill.flags import Flags
from codistill.layout import RunLayout
from codistill.lock import GroupLock, LockError
from codistill.teachers.loader import check_usable, read_fixed_teacher
from codistill.teachers.pool import declared_config, tensor_specs
from codistill.topology import TopologyError
from codistill.topology import plan as plan_topology
from fileio import ExportError, read_bounded
from model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

EXIT_CODES = {"done": 0, "sliced": 0,
              "requeue": 75,     # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving a checkpoint; resume me
              "diverged": 3,     # --max_bad_steps consecutive non-finite losses (or non-finite weights)
              "write_error": 4}  # an export or checkpoint could not be written and --on_write_error stop
SETUP_ERRORS = (ConfigError, TopologyError, DataError, ExportError, DeviceError, ValueError)


@dataclass
class Plan:
    """Everything decided before the first collective, from the flags, the ds_config and the data."""
    cfg: Flags
    rank: int
    world: int
    device: torch.device
    topo: object
    ds_base: dict
    ds_cfgs: dict
    run: RunLayout
    rss_start_mib: float = 0.0  # before the students are built (summary.json "memory")


def plan_run(cfg, log) -> Plan:
    """Every check that can fail before any compute; writes nothing (exit 2 on a bad flag)."""
    errors, warnings = cfg.check()
    try:
        faults.parse(os.environ.get(faults.ENV))
    except ValueError as e:
        errors.append(str(e))
    for w in warnings:
        log.warning(w)
    if errors:
        raise ValueError("\nerror: ".join(errors))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ex, waits = cfg.exchange, leader_waits(cfg)
    if world > 1 and waits and not ex.teacher_timeout < cfg.faults.dist_timeout:
        raise ValueError(f"--teacher_timeout {ex.teacher_timeout:g} s must be below --dist_timeout "
                         f"{cfg.faults.dist_timeout:g} s in a launch of {world} ranks: while a group's leader waits "
                         f"for a peer's export ({waits}), the other ranks wait in a collective, which would "
                         "time out first and stop the run instead of it going on without that peer. Lower "
                         "--teacher_timeout or raise --dist_timeout")
    device = bind_device()  # on CUDA, LOCAL_RANK becomes the chosen ordinal (DeepSpeed reads it as one)
    ds_base = load_ds_config(cfg.training.ds_config)
    topo = plan_topology(world, rank, cfg.run.num_groups, cfg.run.group_id)
    ds_cfgs = {g: resolve_ds_config(ds_base, topo.dp_size(g), cfg.training.lr, device, f"--ds_config {cfg.training.ds_config}")
               for g in topo.hosted}
    if Path(cfg.data.data).exists() or Path(cfg.data.data).resolve() != flags.DEFAULT_DATA.resolve():  # fail fast
        early = TokenData(cfg.data.data)
        early.check_tokenizer()
        early.check_run(topo.hosted, cfg.run.num_groups, cfg.data.seq_len, shared=cfg.data.data_split == "shared")
    return Plan(cfg, rank, world, device, topo, ds_base, ds_cfgs, RunLayout(cfg.run.run_dir))


def leader_waits(cfg) -> str | None:
    """What a group's leader waits up to --teacher_timeout for, if anything: sync teachers' swaps
    (Exchange.before_step, loader.wait) and --group_id averaging's peers (Exchange._present_separate)."""
    if cfg.codistill and cfg.exchange.synchronous(cfg.run.group_id):
        return "a sync teacher's swap"
    if cfg.exchange.averaging and cfg.run.group_id is not None:
        return f"--peer_use {cfg.exchange.peer_use} with --group_id"
    return None


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """env:// rendezvous; defaults make plain `python recipes/train_lm.py` a 1-rank world.
    A collective waits at most ``timeout_s`` (--dist_timeout) for a rank that died or hangs.

    On CUDA the NCCL process group is bound to this rank's device (``device_id``) here, before
    DeepSpeed would bind it to cuda:LOCAL_RANK - the wrong device (or none) when each task sees
    only its own GPU (codistill/device.py)."""
    import deepspeed
    rendezvous_defaults()
    timeout = collective_timeout(timeout_s)  # also every process group DeepSpeed and build_mpus make
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if int(os.environ["WORLD_SIZE"]) > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl", device_id=device, timeout=timeout)
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores among this node's ranks
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    watchdog = watch_start_up()  # a stale JIT build lock would hang here silently
    deepspeed.init_distributed(verbose=False, timeout=timeout)
    watchdog.cancel()
    destroy_at_exit()


def load_inputs(p: Plan, log):
    """The data (the embedded corpus prepared on first use), the model config, the --teacher."""
    import deepspeed.comm as dist
    cfg, data_dir = p.cfg, Path(p.cfg.data.data)
    fresh = not (data_dir / "manifest.json").exists() and data_dir.resolve() == flags.DEFAULT_DATA.resolve()
    if fresh:
        if p.rank == 0:
            from data_prep.prepare import prepare_sample
            print(f"preparing the embedded corpus into {data_dir} (first run only)", flush=True)
            prepare_sample(data_dir)
        dist.barrier()
    data = TokenData(data_dir)
    data.check_tokenizer()
    if fresh:  # prepared just now: plan_run had nothing to check
        data.check_run(p.topo.hosted, cfg.run.num_groups, cfg.data.seq_len, shared=cfg.data.data_split == "shared")
    for g in p.topo.hosted:
        data.group_shards(g, cfg.run.num_groups)
    model_cfg = flags.model_config(cfg.model, cfg.data, data.vocab_size)
    record = p.run.launch_config(cfg.run.group_id)
    if cfg.checkpoint.resume == "auto" and record.is_file():  # config.json is rewritten only after these pass
        try:
            recorded = json.loads(read_bounded(record, 16 << 20, "run record"))  # a regular file, bounded
            prev = recorded["model"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            recorded, prev = {}, None
        if prev is not None and ModelConfig.from_dict(prev).config_hash() != model_cfg.config_hash():
            raise ValueError(f"{record} was written for another model ({prev}) than this run's "
                             f"({model_cfg.to_dict()}), e.g. another --model/--model_size or tokenizer vocabulary; "
                             "use a new --run_dir or --resume never")
        tok = recorded.get("tokenizer_sha256") if isinstance(recorded, dict) else None
        if tok is not None and tok != data.tokenizer_sha256:
            raise ValueError(f"--data {data_dir} was tokenized by another tokenizer (sha256 {data.tokenizer_sha256[:12]}) "
                             f"than the run in {p.run.root} (config.json: {tok[:12]}), even if the vocabulary size "
                             "matches; resume with the run's --data, or use a new --run_dir or --resume never")
    fixed = None  # --teacher PATH: read and validated before anything is written
    if cfg.distill.teacher is not None and cfg.distill.distill_weight > 0:
        same = cfg.teachers.peer_models == "same"  # --peer_models any: the model the teacher's metadata declares
        fixed = read_fixed_teacher(cfg.distill.teacher, model_cfg.config_hash() if same else None,
                                   data.tokenizer_sha256)
        check_usable(fixed, tensor_specs(model_cfg) if same else
                     lambda meta, where: tensor_specs(declared_config(meta, model_cfg, f"--teacher {where}")))
    return data, model_cfg, fixed


def lock_groups(p: Plan, device, log) -> list[GroupLock]:
    """One writer per group: a second launch on the same run_dir and group exits 2 (codistill/lock.py)."""
    locks, errors = [], []
    for g in p.topo.hosted:
        if p.topo.is_group_leader(g):
            lock = GroupLock(p.run.group(g).dir)
            try:
                if lock.acquire():
                    locks.append(lock)
                else:
                    log(f"WARNING: {lock.path}: this filesystem cannot flock; nothing stops a second launch "
                        f"from writing group {g} at the same time", force=True)
            except LockError as e:
                errors.append(str(e))
    if flags_any([bool(errors)], device)[0]:
        for e in errors:
            print(f"error: {e}", file=sys.stderr, flush=True)
        for lock in locks:
            lock.release()
        sys.exit(2)
    return locks


def banner(p: Plan, students, exchange, fixed, log) -> None:
    a, s0 = p.cfg, students[0]
    asked = p.ds_base.get("zero_optimization", {}).get("stage", 0)
    zero = f"ZeRO-{s0.zero_stage}" + (f" (ds_config: ZeRO-{asked}; " + (
        "bf16 with fp32 gradient accumulation)" if s0.zero_stage > asked else
        "one rank per group has nothing to partition)") if asked != s0.zero_stage else "")
    dtype = str(s0.engine.get_data_types()[0]).removeprefix("torch.")
    log(f"model {a.model.model}/{s0.model_cfg.preset}: {s0.num_params / 1e6:.2f}M params | world {p.world} | "
        f"groups {a.run.num_groups} (this rank: {p.topo.hosted}, {s0.dp_size} rank(s) each) | "
        f"batch {s0.global_batch}x{a.data.seq_len} tokens/group | {zero} | {dtype} on {p.device.type} | "
        + ("every group reads all the data (--data_split shared) | " if a.data.data_split == "shared" and a.run.num_groups > 1 else "")
        + (f"--peer_use {a.exchange.peer_use} every {a.exchange.export_every} steps" if exchange.averaging else
           f"codistillation {'on' if exchange.exporting else 'off'}"
           + (f" ({exchange.mode} teachers{teacher_modes(exchange.pool)})" if exchange.exporting else ""))
        + (" | fixed teacher (offline distillation)" if fixed is not None else ""))
    if fixed is not None:
        log(f"fixed teacher (--teacher): {a.distill.teacher}, step {fixed.step}, {fixed.meta.get('tokens_seen', '?')} tokens seen")


def teacher_modes(pool) -> str:
    """", partitioned, top-64" and the like, for the banner (codistill/teachers/placement.py)."""
    where = {"partition": "partitioned (ZeRO-3)", "offload": "offloaded to host memory"}.get(pool.placement)
    return "".join(f", {m}" for m in (where, f"top-{pool.topk} probabilities" if pool.topk else None) if m)


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption or time limit): finish the step, checkpoint, exit 75."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def train_step(cfg, step, students, exchange, control, stop, bad_in_a_row, log, clock):
    """One step of every hosted student, around the step's one sync; returns the sync's outcome.
    Host syncs (ours; DeepSpeed's optimizer may add its own): exactly one, in control.sync.
    Teacher swaps add one per swap."""
    reload_ms = exchange.before_step(step)
    bad = {s.id: s.forward_backward(step, exchange.pool, exchange.guard, log) for s in students}
    t0 = time.perf_counter()
    out = control.sync(stop.requested, bad, exchange.announce(), torch.cat([s.stats_for_sync() for s in students]),
                       exchange.guard.proposals())
    sync_s = time.perf_counter() - t0
    exchange.after_sync(out, step)
    for i, s in enumerate(students):
        st = s.finish_step(step, out.bad[s.id], s.sync.split(out.local, i), sync_s)
        exchange.observe(s.id, st)
        if st.skipped:
            log(f"WARNING: [group {s.id}] step {step}: loss is {st.loss}; step skipped, no update "
                f"({bad_in_a_row[s.id] + 1} in a row, {s.skipped_steps} in all; --max_bad_steps "
                f"{cfg.faults.max_bad_steps})", force=s.leader)
        runlog.log_train(s, step, st, exchange.pool, reload_ms, log, cfg.run.log_every, cfg.training.max_steps, *clock)
    return out


def target_reached(students, target: float) -> bool:
    """Whether every group of the run (all ranks agree: one all-reduce) has val loss <= target."""
    missed = any(not s.last_val[0] <= target for s in students)  # NaN: not reached
    return not flags_any([missed], students[0].device)[0]


def train(cfg, students, exchange, ckpt, control, start, log) -> tuple[str, int]:
    """The loop: steps until --max_steps (or --target_val_loss), an export/checkpoint failure,
    divergence, a stop request or the --stop_after_steps slice; returns (outcome, last step)."""
    stop, bad_in_a_row, clock, step = StopFlag(), [0] * cfg.run.num_groups, (time.time(), start), start
    exchange.begin(start)
    for step in range(start + 1, cfg.training.max_steps + 1):
        out = train_step(cfg, step, students, exchange, control, stop, bad_in_a_row, log, clock)
        bad_in_a_row = [n + 1 if b else 0 for n, b in zip(bad_in_a_row, out.bad)]
        if max(bad_in_a_row) >= cfg.faults.max_bad_steps:
            latest = {s.id: latest_tag(s.paths.checkpoints) for s in students}
            teachers = "; ".join(f"group {s.id}: {d}" for s in students if (d := exchange.describe_teachers(s.id)))
            cause = (f" Distillation was on (teachers {teachers}); a teacher's non-finite probabilities never reach "
                     "the student, but a bad peer can still drive it away: check that peer's run, or continue "
                     "with --resume auto and --distill_weight 0 or a lower --lr." if teachers else
                     " Lower --lr and continue with --resume auto.")
            log.error(f"{cfg.faults.max_bad_steps} steps in a row (up to step {step}) had a NaN/Inf loss "
                      f"(--max_bad_steps {cfg.faults.max_bad_steps}); stopping without saving. The last good "
                      f"checkpoints ({latest}) are intact.{cause}")
            return "diverged", step
        outcome = exchange.maybe_export(step)
        if outcome:
            return outcome, step
        outcome = exchange.maybe_average(step)
        if outcome:
            return outcome, step
        if step % cfg.eval.eval_every == 0 or step == cfg.training.max_steps:
            for s in students:
                runlog.log_eval(s, step, *s.evaluate(), log)
            if cfg.training.target_val_loss is not None and target_reached(students, cfg.training.target_val_loss):
                log(f"step {step}: every group's val loss is <= --target_val_loss {cfg.training.target_val_loss}; finishing")
                return "done", step
        sliced = step == cfg.checkpoint.stop_after_steps
        if ckpt.due(step, forced=out.stop or sliced):
            outcome = exchange.settle()
            if outcome:
                return outcome, step
            if not ckpt.save(step) and (cfg.faults.on_write_error == "stop" or out.stop or sliced):
                log.error(f"the checkpoint of step {step} could not be written; exiting. 'latest' still "
                          "names the previous complete checkpoint")
                return "write_error", step
        if out.stop:
            log(f"stop requested (SIGTERM/SIGUSR1): checkpoint saved at step {step}; exiting with "
                f"{EXIT_CODES['requeue']} so the job can be requeued and resumed with --resume auto")
            return "requeue", step
        if sliced and step < cfg.training.max_steps:
            log(f"--stop_after_steps {step}: checkpoint saved; continue with --resume auto")
            return "sliced", step
    return "done", step


def finish(p: Plan, students, exchange, ckpt, model_cfg, start, step, t_start, log) -> None:
    """The end of --max_steps: last checkpoint, final/ weights, summaries and the table."""
    import deepspeed.comm as dist
    if start >= p.cfg.training.max_steps:
        log(f"nothing to do: the checkpoint is already at step {start} >= --max_steps {p.cfg.training.max_steps}")
        for s in students:
            s.evaluate()
    elif ckpt.saved_at != step:
        ckpt.save(step)
    exchange.settle()
    wall = time.time() - t_start
    for s in students:
        sd = s.full_state_dict()  # a collective of the group under ZeRO-3
        if s.leader:
            outputs.save_final(s, sd, exchange.metadata(s), model_cfg, step, wall, exchange.teacher_steps(s.id), log,
                              p.rss_start_mib, exchange.summary(s.id, step))
    dist.barrier()
    if p.rank == 0:
        outputs.print_table(outputs.merge_summaries(p.run.root, p.cfg.run.num_groups), p.run.root, log)
