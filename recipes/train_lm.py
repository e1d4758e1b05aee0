#!/usr/bin/env python
"""Train language models with codistillation (Anil et al., 2018) under DeepSpeed.

    deepspeed recipes/train_lm.py --ds_config ds_configs/zero2.json            # 2 groups, 1 process
    deepspeed --num_gpus 4 recipes/train_lm.py --ds_config ds_configs/zero2.json --num_groups 2
    deepspeed recipes/train_lm.py ... --num_groups 2 --group_id 0               # one launch per group

Each group trains its own copy of the model on its own shard of the data. Every --export_every
steps it publishes its weights; every group runs its peers' stale exports in inference mode on
its own batch and adds alpha * CE(mean teacher probs, student probs) to its loss after
--burn_in_steps. --num_groups 1 or --distill_weight 0 is the plain baseline, same code.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from codistill.comm import GroupComm, StepControl, flags_any, rendezvous_defaults, sum_over  # noqa: E402
from codistill.device import DeviceError, train_device  # noqa: E402
from codistill.ds_config import ConfigError, load_ds_config, resolve_ds_config  # noqa: E402
from codistill.exchange import Export, ExportError, clean_temp_files, read_export, write_export  # noqa: E402
from codistill.loss import codistill_loss, distill_alpha  # noqa: E402
from codistill.skip import skip_step  # noqa: E402
from codistill.teacher import FIXED_TEACHER, TeacherLoader, TeacherPool, exports_dir, read_fixed_teacher  # noqa: E402
from codistill.lock import GroupLock, LockError  # noqa: E402
from codistill.topology import TopologyError, build_mpus, plan  # noqa: E402
from codistill import checkpoint, faults, flags, runlog  # noqa: E402
from data_prep.dataset import DataError, GroupStream, TokenData, eval_batches  # noqa: E402
from model import PRESETS, ModelConfig, build_model, count_params, preset_config  # noqa: E402

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving a checkpoint; resume me
EXIT_DIVERGED = 3  # --max_bad_steps consecutive non-finite losses (or non-finite weights)
EXIT_WRITE_ERROR = 4  # an export or checkpoint could not be written and --on_write_error stop
DEFAULT_DATA = ROOT / "data" / "sample"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of flag defaults (see recipes/configs/); flags given here win")
    p.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data_prep output dir (default: the embedded "
                   "corpus, prepared automatically on first use)")
    p.add_argument("--model", default="lstm", choices=sorted(PRESETS))
    p.add_argument("--model_size", default="tiny")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--run_dir", default="runs/codistill")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the ds_config optimizer's)")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decay ends at lr * this")
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=20)
    p.add_argument("--save_every", type=int, default=100)
    p.add_argument("--stop_after_steps", type=int, default=None,
                   help="checkpoint and exit after this step, keeping the --max_steps schedule (time-sliced jobs)")
    p.add_argument("--keep_checkpoints", type=int, default=2)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--resume", default="auto", help="auto | never | PATH of an earlier run directory (DeepSpeed "
                   "checkpoints are pickles: only resume from run directories you trust)")
    p.add_argument("--num_groups", type=int, default=2)
    p.add_argument("--group_id", type=int, default=None, help="train only this group (one launch per group)")
    p.add_argument("--data_split", default="disjoint", choices=["disjoint", "shared"],
                   help="disjoint: group i reads only its own shards (the method); shared: every group reads all "
                        "shards in its own order (the same-data comparison of the paper's claim 3)")
    # codistillation
    p.add_argument("--export_every", type=int, default=25)
    p.add_argument("--keep_exports", type=int, default=3)
    p.add_argument("--burn_in_steps", type=int, default=50)
    p.add_argument("--distill_weight", type=float, default=1.0)
    p.add_argument("--distill_ramp_steps", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--label_smoothing", type=float, default=0.0)
    p.add_argument("--teacher_sync", default="auto", choices=["auto", "on", "off"],
                   help="on: swap teachers at fixed steps (deterministic; needs all groups in this launch); "
                        "off: follow peers' LATEST; auto: on unless --group_id")
    p.add_argument("--teacher_timeout", type=float, default=600.0)
    p.add_argument("--max_teacher_staleness", type=int, default=None,
                   help="drop a teacher whose export is more than this many steps old")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="offline (two-phase) distillation: a fixed, finished teacher - a group directory of an "
                        "earlier run (its final/ weights), or an export - used from --burn_in_steps on, averaged "
                        "with the peers' teachers if any (--num_groups 1: the only teacher)")
    p.add_argument("--poll_interval", type=float, default=1.0)
    p.add_argument("--loss_chunk_tokens", type=int, default=4096)
    # faults
    p.add_argument("--max_bad_steps", type=int, default=5,
                   help="a step with a NaN/Inf loss is skipped (no update) and counted; stop after this many in a row")
    p.add_argument("--on_write_error", default="warn", choices=["warn", "stop"],
                   help="an export or checkpoint write fails (disk full): warn and keep training on the previous "
                        "one, or stop (exit 4); either way LATEST/latest keep naming the previous complete one")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        try:
            defaults = json.loads(Path(pre.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--config {pre.config}: {e}")
        unknown = set(defaults) - {a.dest for a in p._actions}
        if unknown:
            p.error(f"--config {pre.config}: unknown keys {sorted(unknown)}")
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    for name in ("max_steps", "seq_len", "eval_every", "eval_batches", "save_every", "export_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.resume not in ("auto", "never") and not Path(args.resume).is_dir():
        p.error(f"--resume {args.resume}: not 'auto', 'never' or an existing run directory")
    if args.model_size not in PRESETS[args.model]:
        p.error(f"--model_size for --model {args.model} must be one of {sorted(PRESETS[args.model])}")
    return args


def check_flags(args, log) -> None:
    """Flag combinations that cannot work: exit 2 naming the flag and the fix (codistill/flags.py)."""
    errors, warnings = flags.check(args)
    try:
        faults.parse(os.environ.get(faults.ENV))
    except ValueError as e:
        errors.append(str(e))
    for w in warnings:
        log.warning(w)
    if errors:
        for e in errors:
            log.error(e)
        sys.exit(2)


def init_distributed(device: torch.device) -> None:
    """env:// rendezvous; defaults make plain `python recipes/train_lm.py` a 1-rank world.

    On CUDA the NCCL process group is bound to this rank's device (``device_id``) here, before
    DeepSpeed would bind it to cuda:LOCAL_RANK - the wrong device (or none) when each task sees
    only its own GPU (codistill/device.py)."""
    import datetime
    import deepspeed
    rendezvous_defaults()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if int(os.environ["WORLD_SIZE"]) > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores among this node's ranks
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    deepspeed.init_distributed(verbose=False)


def load_data(args, rank: int, barrier) -> TokenData:
    """The data-prep output; the embedded corpus is prepared on first use of the default path."""
    data_dir = Path(args.data)
    if not (data_dir / "manifest.json").exists() and data_dir.resolve() == DEFAULT_DATA.resolve():
        if rank == 0:
            from data_prep.prepare import prepare_sample
            print(f"preparing the embedded corpus into {data_dir} (first run only)", flush=True)
            prepare_sample(data_dir)
        barrier()
    data = TokenData(data_dir)
    data.check_tokenizer()
    return data


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption or time limit): finish the step, checkpoint, exit 75."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


class Group:
    """Everything one hosted group needs: its engine, data stream, logs and exchange dirs."""

    def __init__(self, gid, args, topo, mpu, data, model_cfg, ds_cfg, device, log):
        import deepspeed
        self.id, self.args, self.topo, self.device = gid, args, topo, device
        self.dir = Path(args.run_dir) / f"group_{gid}"
        self.leader = topo.is_group_leader(gid)
        self.dp_rank, self.dp_size = topo.dp_rank(gid), topo.dp_size(gid)
        self.micro = ds_cfg["train_micro_batch_size_per_gpu"]
        self.accum = ds_cfg.get("gradient_accumulation_steps", 1)
        self.global_batch = ds_cfg["train_batch_size"]
        self.stream = GroupStream(data, gid, topo.num_groups, args.seq_len, args.seed, args.data_split == "shared")
        self.val = eval_batches(data, args.seq_len, self.micro, args.eval_batches, self.dp_rank, self.dp_size)
        torch.manual_seed(args.seed + 7919 * gid)  # independent initialisation per group
        model = build_model(model_cfg)
        self.num_params = count_params(model)
        optimizer = None
        if "optimizer" not in ds_cfg:
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr or 1e-3)
        device_rank = argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None
        self.engine, _, _, _ = deepspeed.initialize(
            args=device_rank, model=model, model_parameters=model.parameters(), optimizer=optimizer, config=ds_cfg,
            mpu=mpu, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor))
        self.zero_stage = self.engine.zero_optimization_stage()
        self.dp_group = mpu.get_data_parallel_group() if mpu else None
        self.comm = GroupComm(device, topo.group_ranks[gid][0], self.dp_group, self.dp_size, self.leader)
        self.tokens_seen = 0
        self.step_tokens = self.global_batch * args.seq_len
        self.writer = runlog.TBWriter(self.dir / "tb") if self.leader else None
        self.last_val = (float("nan"), float("nan"))
        self.skipped_steps = 0  # steps skipped for a non-finite loss
        self._pending = None    # forward_backward's device results, consumed by finish_step
        self._norm = None       # (step, device tensor) of the last update's gradient norm, logged a step late
        if self.leader:
            for name in clean_temp_files(self.dir / "exports"):
                log(f"[group {gid}] removed {name}, a temp file of an export interrupted in an earlier run")

    def lr_factor(self, step: int) -> float:
        a = self.args
        if step < a.warmup_steps:
            return (step + 1) / a.warmup_steps
        progress = min(1.0, (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps))
        return a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def forward_backward(self, step, pool, log=print) -> torch.Tensor:
        """Forward and backward passes of every micro-batch of ``step``; the optimizer update
        waits for finish_step, after the step's one sync (StepControl) has told every rank of
        the group whether any of them saw a non-finite loss. No host sync here: the returned
        flag and the statistics stay on the device."""
        a = self.args
        t0 = time.perf_counter()
        alpha = distill_alpha(step, a.distill_weight, a.burn_in_steps, a.distill_ramp_steps)
        peers = pool.active(self.id, step, a.max_teacher_staleness, 2 * a.export_every, log) if alpha > 0 else []
        stats = torch.zeros(4, device=self.device)  # loss, ce, distill, agreement (means over micro-batches)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.engine.train()
        for micro in range(self.accum):
            batch = self.stream.batch(step - 1, micro, self.accum, self.dp_rank, self.dp_size, self.micro)
            if self.device.type == "cuda":  # a copy from pageable memory may wait for the device
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            x, y = batch[:, :-1], batch[:, 1:]
            q = pool.probs(peers, x, a.temperature) if peers else None
            logits = self.engine(x)
            faults.sigkill("sigkill", step)  # test-only hook: a crash in the middle of a step
            loss, st = codistill_loss(logits, y, q, alpha, a.temperature, a.label_smoothing, a.loss_chunk_tokens)
            if faults.active("nan_loss", step):
                loss = loss * float("nan")
            bad |= ~torch.isfinite(loss.detach())
            self.engine.backward(loss)  # a non-finite loss's gradients are dropped by finish_step
            if micro < self.accum - 1:
                self.engine.step()  # not the accumulation boundary: DeepSpeed only counts it
            stats += torch.cat([loss.detach().float().reshape(1), st.values]) / self.accum
        self._pending = (alpha, peers, stats, time.perf_counter() - t0)
        return bad

    def stats_for_sync(self) -> torch.Tensor:
        """This group's part of the step's sync (rank-local, not reduced): the 4 loss statistics,
        then the step and value of the previous update's gradient norm (-1, 0 when there is none)."""
        if self._norm is None:
            tail = torch.zeros(2, device=self.device)
            tail[0] = -1.0  # a fill on the device, not a host->device copy
        else:
            step, norm = self._norm
            tail = torch.stack([norm.new_full((), float(step)), norm])
        return torch.cat([self._pending[2], tail])

    def finish_step(self, step, skip: bool, host: list[float], sync_s: float) -> "runlog.StepStats":
        """The optimizer update (or, when any rank of the group saw a non-finite loss, a skipped
        step: no update, counted, gradients dropped); ``host`` is this group's part of the sync."""
        alpha, peers, _, fb_s = self._pending
        t0 = time.perf_counter()
        grad_norm = None
        if skip:
            skip_step(self.engine, self.accum - 1)
            self.skipped_steps += 1
        else:
            if self.zero_stage == 0:  # the plain optimizer keeps no norm; DeepSpeed's own do
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
            self.engine.step()
            if grad_norm is None:
                grad_norm = self.engine.get_global_grad_norm()
        if self.writer and host[4] >= 0:  # the previous update's norm, now on the host
            self.writer.scalar("grad_norm", host[5], int(host[4]))
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.detach().float().reshape(()).to(self.device)
        elif grad_norm is not None:  # DeepSpeed gives a float in some paths (e.g. inf after an overflow)
            grad_norm = torch.full((), float(grad_norm), device=self.device)
        self._norm = None if grad_norm is None else (step, grad_norm)
        self.tokens_seen += self.step_tokens
        return runlog.StepStats(
            loss=host[0], ce=host[1] if not skip else float("nan"), distill=host[2] if not skip else float("nan"),
            agreement=host[3], alpha=alpha, peers=peers, skipped=skip, skipped_steps=self.skipped_steps,
            step_time=fb_s + sync_s + time.perf_counter() - t0, lr=self.engine.get_lr()[0])

    def flush_grad_norm(self) -> None:
        """Log the last update's gradient norm (at the end of a run: there is no next sync)."""
        if self._norm is not None and self.writer:
            self.writer.scalar("grad_norm", float(self._norm[1]), self._norm[0])
        self._norm = None

    @torch.no_grad()
    def evaluate(self):
        """Validation loss/perplexity over the group's ranks: totals summed on the device, one
        all-reduce over the group and one host sync at the end."""
        self.engine.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.val:
            batch = batch.to(self.device)
            logits = self.engine(batch[:, :-1]).float()
            tot[0] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            tot[1] += batch[:, 1:].numel()
        sum_over(tot, self.dp_group)
        self.engine.train()
        s, n = tot.tolist()
        loss = s / n
        self.last_val = (loss, math.exp(min(loss, 50)))
        return self.last_val

    def full_state_dict(self):
        """Full weights on the group leader, on the host; None elsewhere. Under ZeRO-3 the
        parameters are gathered over the group's own ranks (a collective of the group), one
        submodule at a time, so no rank holds more than the largest submodule gathered."""
        if self.zero_stage != 3:
            sd = self.engine.module.state_dict()
            return {k: v.detach().to("cpu") for k, v in sd.items()} if self.leader else None
        import deepspeed
        module = self.engine.module
        gathered: dict[int, torch.Tensor | None] = {}
        for sub in module.modules():
            params = [p for p in sub.parameters(recurse=False) if id(p) not in gathered]  # tied weights: once
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for p in params:
                    gathered[id(p)] = p.detach().to("cpu", copy=True) if self.leader else None
        if not self.leader:
            return None
        return {k: gathered[id(t)] if id(t) in gathered else t.detach().to("cpu", copy=True)
                for k, t in module.state_dict(keep_vars=True).items()}


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    log = runlog.Console(rank)
    try:
        device = train_device(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None)
    except DeviceError as e:
        log.error(str(e))
        sys.exit(2)

    # ---- everything that can be wrong is checked before any compute ---------------------
    check_flags(args, log)

    def checked(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except (ConfigError, TopologyError, DataError, ExportError, ValueError) as e:
            log.error(str(e))
            sys.exit(2)

    ds_base = checked(load_ds_config, args.ds_config)
    topo = checked(plan, world, rank, args.num_groups, args.group_id)
    ds_cfgs = {g: checked(resolve_ds_config, ds_base, topo.dp_size(g), args.lr, device, f"--ds_config {args.ds_config}")
               for g in topo.hosted}
    if Path(args.data).exists() or Path(args.data).resolve() != DEFAULT_DATA.resolve():  # fail fast
        early = checked(TokenData, args.data)
        checked(early.check_tokenizer)
        for g in topo.hosted:
            checked(early.group_shards, g, args.num_groups)
    init_distributed(device)
    import deepspeed.comm as dist
    data = checked(load_data, args, rank, dist.barrier)
    for g in topo.hosted:
        checked(data.group_shards, g, args.num_groups)
    model_cfg = checked(preset_config, args.model, args.model_size, data.vocab_size, max(1024, args.seq_len),
                        dropout=args.dropout)
    fixed = None  # --teacher PATH: read and validated before anything is written
    if args.teacher is not None and args.distill_weight > 0:
        fixed = checked(read_fixed_teacher, args.teacher, model_cfg.config_hash(), data.tokenizer_sha256)

    sync = args.teacher_sync == "on" or (args.teacher_sync == "auto" and topo.all_groups_here)
    if sync and topo.separate_launch:
        log.error("--teacher_sync on needs every group in this launch; use --teacher_sync off with --group_id")
        sys.exit(2)
    keep_exports = args.keep_exports
    if sync:  # the export a checkpoint's teacher came from must survive until the next checkpoint
        keep_exports = max(keep_exports, args.save_every // args.export_every + 2)
    exporting = args.num_groups > 1 and args.distill_weight > 0  # codistillation: peers teach each other
    run_dir = Path(args.run_dir)
    old_cfg = run_dir / "config.json"
    if args.resume == "auto" and old_cfg.is_file():
        try:
            prev = json.loads(old_cfg.read_text())["model"]
        except (json.JSONDecodeError, KeyError, TypeError):
            prev = None
        if prev is not None and checked(ModelConfig.from_dict, prev).config_hash() != model_cfg.config_hash():
            log.error(f"{old_cfg} was written for another model ({prev}) than this run's ({model_cfg.to_dict()}), "
                      f"e.g. another --model/--model_size or tokenizer vocabulary; use a new --run_dir or --resume never")
            sys.exit(2)
    # one writer per group: a second launch on the same run_dir and group refuses (codistill/lock.py)
    locks, lock_errors = [], []
    for g in topo.hosted:
        if topo.is_group_leader(g):
            lock = GroupLock(run_dir / f"group_{g}")
            try:
                if lock.acquire():
                    locks.append(lock)
                else:
                    log(f"WARNING: {lock.path}: this filesystem cannot flock; nothing stops a second launch "
                        f"from writing group {g} at the same time", force=True)
            except LockError as e:
                lock_errors.append(str(e))
    if flags_any([bool(lock_errors)], device)[0]:
        for e in lock_errors:
            print(f"error: {e}", file=sys.stderr, flush=True)
        for lock in locks:
            lock.release()
        sys.exit(2)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        runlog.write_json(run_dir / "config.json", {
            "args": vars(args), "model": model_cfg.to_dict(), "ds_config": ds_base, "world_size": world,
            "hosted_groups_per_rank": len(topo.hosted), "teacher_sync": sync, "git": runlog.git_sha(ROOT)})

    mpus = build_mpus(topo)
    groups = [Group(g, args, topo, mpus[g], data, model_cfg, ds_cfgs[g], device, log) for g in topo.hosted]
    g0 = groups[0]
    asked = ds_base.get("zero_optimization", {}).get("stage", 0)
    zero = f"ZeRO-{g0.zero_stage}" + (f" (ds_config: ZeRO-{asked}; " + (
        "bf16 with fp32 gradient accumulation)" if g0.zero_stage > asked else
        "one rank per group has nothing to partition)") if asked != g0.zero_stage else "")
    dtype = g0.engine.get_data_types()[0]
    log(f"model {args.model}/{args.model_size}: {g0.num_params / 1e6:.2f}M params | world {world} | "
        f"groups {args.num_groups} (this rank: {topo.hosted}, {g0.dp_size} rank(s) each) | "
        f"batch {g0.global_batch}x{args.seq_len} tokens/group | {zero} | {str(dtype).removeprefix('torch.')} on "
        f"{device.type} | "
        + ("every group reads all the data (--data_split shared) | " if args.data_split == "shared" and args.num_groups > 1 else "")
        + f"codistillation {'on' if exporting else 'off'}" + (f" ({'sync' if sync else 'latest'} teachers)" if exporting else "")
        + (" | fixed teacher (offline distillation)" if fixed is not None else ""))

    peers = sorted({p for g in topo.hosted for p in topo.peers(g)}) if exporting else []
    # teachers get the student's dtypes on the student's device; a group of several ranks has
    # one reader (its leader), whose exports reach the other ranks by broadcast (TeacherPool.swap)
    pool = TeacherPool(model_cfg, device, like=g0.engine.module, comm=g0.comm if len(groups) == 1 else None)
    pool.reserve(peers)
    cfg_hash, tok_hash = model_cfg.config_hash(), data.tokenizer_sha256
    if fixed is not None:
        pool.load(FIXED_TEACHER, fixed, fixed=True)
        log(f"fixed teacher (--teacher): {args.teacher}, step {fixed.step}, "
            f"{fixed.meta.get('tokens_seen', '?')} tokens seen")
    reader = pool.comm.leader
    loader = TeacherLoader(run_dir, peers, cfg_hash, tok_hash, "sync" if sync else "latest",
                           args.poll_interval, log) if peers and reader else None

    # ---- resume ------------------------------------------------------------------------
    start = 0
    if args.resume != "never":
        src = run_dir if args.resume == "auto" else Path(args.resume)
        starts, teacher_steps = set(), {}
        for g in groups:
            ckpt = src / f"group_{g.id}" / "checkpoints"
            tag, state = checkpoint.load(g.engine, ckpt, log) if ckpt.is_dir() else (None, {})
            if tag is None and checkpoint.list_tags(ckpt):
                log.error(f"no checkpoint in {ckpt} can be loaded (see the warnings above); "
                          "use --resume never to start over, or another --run_dir")
                sys.exit(2)
            starts.add(state.get("step", 0))
            g.tokens_seen = state.get("tokens_seen", 0)
            g.skipped_steps = state.get("skipped_steps", 0)
            restore_rng(state, device)
            teacher_steps.update({int(p): t for p, t in (state.get("teacher_steps") or {}).items()})
        if len(starts) > 1:
            log.error(f"hosted groups have checkpoints at different steps {sorted(starts)}; use --resume never "
                      "or remove the newer checkpoints")
            sys.exit(2)
        start = starts.pop()
        if start:
            log(f"resumed from step {start} ({src})")
        restore = {}  # the teachers in use when the checkpoint was written: read by the leader
        for peer, tstep in sorted(teacher_steps.items()):
            if peer in pool.steps:
                continue
            exp = None
            if reader:
                try:
                    exp = read_export(exports_dir(run_dir, peer), tstep, cfg_hash, tok_hash)
                except ExportError as e:
                    log(f"WARNING: cannot restore teacher of group {peer} at step {tstep} ({e}); "
                        "resume is not exact until the next teacher swap")
            restore[peer] = (tstep, exp)
        pool.swap(restore)
        pending = (start - 1) // args.export_every * args.export_every
        if loader and sync and start and pending >= args.export_every:
            for p in peers:  # the export the uninterrupted run was prefetching at this step
                loader.want(p, pending)

    # ---- training ----------------------------------------------------------------------
    stop = StopFlag()
    control = StepControl(args.num_groups, device, swaps=bool(peers) and not sync)
    bad_in_a_row = [0] * args.num_groups  # every group's, known to every rank through the sync
    t_start, step, saved_at, exit_code = time.time(), start, start, 0
    failed_exports: set[tuple[int, int]] = set()  # (group, step) exports that could not be written
    held: dict[int, Export] = {}  # latest teachers: exports this leader announced, swapped in next step
    swaps: dict[int, int] = {}    # latest teachers: peer -> step to swap in at the start of this step
    K = args.export_every
    try:
        for step in range(start + 1, args.max_steps + 1):
            reload_ms = 0.0
            b = step - 1  # boundary b: sync teachers become the peers' exports of step b - K
            if peers and sync and b > 0:
                if b % K == 0 and b >= 2 * K:
                    t0 = time.perf_counter()
                    due = [p for p in peers if (p, b - K) not in failed_exports]  # failed (warned): keep, no wait
                    pool.swap({p: (b - K, loader.wait(p, b - K, args.teacher_timeout) if loader else None) for p in due})
                    reload_ms = (time.perf_counter() - t0) * 1e3  # waiting for the loader included
                if loader and b % K == K // 2 and b - K // 2 >= K:  # prefetch the exports of b - K//2 half an
                    for p in peers:  # interval before they are needed: the loader's read never lands on a swap step
                        loader.want(p, b - K // 2)
            elif swaps:  # latest teachers: what the leaders announced in the previous step's sync
                reload_ms = pool.swap({p: (t, held.pop(p, None)) for p, t in swaps.items()}, agree=False)
                swaps = {}
            # Host syncs of a step (ours; DeepSpeed's optimizer may add its own): exactly one, in
            # control.sync below. Swap steps add one per swap, evaluation one per evaluation.
            bad = {g.id: g.forward_backward(step, pool, log) for g in groups}
            announce = {}
            if loader and not sync:
                for p in peers:
                    exp = loader.take(p)
                    if exp is not None:
                        held[p] = exp
                announce = {(g.id, p): held[p].step for g in groups for p in topo.peers(g.id) if p in held}
            t0 = time.perf_counter()
            out = control.sync(stop.requested, bad, announce, torch.cat([g.stats_for_sync() for g in groups]))
            sync_s = time.perf_counter() - t0
            swaps = {p: t for (g, p), t in out.swaps.items() if g in topo.hosted}
            for i, g in enumerate(groups):
                st = g.finish_step(step, out.bad[g.id], out.local[6 * i:6 * (i + 1)], sync_s)
                if st.skipped:
                    log(f"WARNING: [group {g.id}] step {step}: loss is {st.loss}; step skipped, no update "
                        f"({bad_in_a_row[g.id] + 1} in a row, {g.skipped_steps} in all; --max_bad_steps "
                        f"{args.max_bad_steps})", force=g.leader)
                runlog.log_train(g, step, st, pool, reload_ms, log, args, t_start, start)
            bad_in_a_row = [n + 1 if b_ else 0 for n, b_ in zip(bad_in_a_row, out.bad)]
            stopping = out.stop
            if max(bad_in_a_row) >= args.max_bad_steps:
                latest = {g.id: checkpoint.read_latest(g.dir / "checkpoints") for g in groups}
                log.error(f"{args.max_bad_steps} steps in a row (up to step {step}) had a NaN/Inf loss "
                          f"(--max_bad_steps {args.max_bad_steps}); stopping without saving. The last good "
                          f"checkpoints ({latest}) are intact: lower --lr and continue with --resume auto")
                exit_code = EXIT_DIVERGED
                break
            if step % K == 0 and exporting:
                failed = [False] * args.num_groups
                for g in groups:
                    sd = g.full_state_dict()
                    if g.leader:
                        try:
                            write_export(exports_dir(run_dir, g.id), step, sd, {
                                "group": g.id, "tokens_seen": g.tokens_seen, "model_config": model_cfg.to_dict(),
                                "model_config_hash": cfg_hash, "tokenizer_sha256": tok_hash}, keep=keep_exports)
                        except OSError as e:
                            failed[g.id] = True
                            log(f"WARNING: [group {g.id}] export of step {step} failed ({e}); peers keep its "
                                f"previous export (LATEST unchanged)", force=True)
                        except ExportError as e:  # non-finite weights: never published
                            log.error(f"[group {g.id}] {e}; stopping (lower --lr?)")
                            sys.exit(EXIT_DIVERGED)
                if sync or args.on_write_error == "stop":  # every rank must know (sync peers skip it)
                    failed = flags_any(failed, device)
                failed_exports |= {(gid, step) for gid, f in enumerate(failed) if f}
                if args.on_write_error == "stop" and any(failed):
                    log.error(f"an export failed at step {step} and --on_write_error stop: exiting; the run "
                              "resumes from its last checkpoint with --resume auto")
                    exit_code = EXIT_WRITE_ERROR
                    break
            if step % args.eval_every == 0 or step == args.max_steps:
                for g in groups:
                    loss, ppl = g.evaluate()
                    runlog.log_eval(g, step, loss, ppl, log)
            sliced = step == args.stop_after_steps
            if step % args.save_every == 0 or step == args.max_steps or stopping or sliced:
                if not save_checkpoint(groups, step, pool, args, log, device):
                    if args.on_write_error == "stop" or stopping or sliced:
                        log.error(f"the checkpoint of step {step} could not be written; exiting. 'latest' still "
                                  "names the previous complete checkpoint")
                        exit_code = EXIT_WRITE_ERROR
                        break
                else:
                    saved_at = step
            if stopping:
                log(f"stop requested (SIGTERM/SIGUSR1): checkpoint saved at step {step}; exiting with "
                    f"{EXIT_REQUEUE} so the job can be requeued and resumed with --resume auto")
                exit_code = EXIT_REQUEUE
                break
            if sliced and step < args.max_steps:
                log(f"--stop_after_steps {step}: checkpoint saved; continue with --resume auto")
                break
        else:  # ---- the end: the loop ran to --max_steps ----------------------------------
            if start >= args.max_steps:
                log(f"nothing to do: the checkpoint is already at step {start} >= --max_steps {args.max_steps}")
                for g in groups:
                    g.evaluate()
            elif saved_at != step:
                save_checkpoint(groups, step, pool, args, log, device)
            wall = time.time() - t_start
            for g in groups:
                sd = g.full_state_dict()
                if g.leader:
                    runlog.save_final(g, sd, model_cfg, step, wall, pool, peers, tok_hash)
            dist.barrier()
            if rank == 0:
                runlog.print_table(runlog.merge_summaries(run_dir, args.num_groups), run_dir, log)
    finally:
        if loader:
            loader.close()
        for g in groups:
            g.flush_grad_norm()
            if g.writer:
                g.writer.close()
        for lock in locks:
            lock.release()
    if exit_code:
        sys.exit(exit_code)


def rng_state(device: torch.device) -> dict:
    """The generators a step draws from: the CPU's, and the CUDA device's this rank trains on
    (dropout on GPU). Saved in every checkpoint, so that resume continues the same stream."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    if state.get("torch_rng") is not None:
        torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def save_checkpoint(groups, step, pool, args, log, device) -> bool:
    """Checkpoint every hosted group (codistill/checkpoint.py: 'latest' moves only when complete)."""
    ok = True
    for g in groups:
        ckpt = g.dir / "checkpoints"
        try:
            checkpoint.save(g.engine, ckpt, step, {
                "step": step, "tokens_seen": g.tokens_seen, **rng_state(device),
                "teacher_steps": dict(pool.steps), "samples": step * g.global_batch,
                "skipped_steps": g.skipped_steps}, g.leader, args.keep_checkpoints)
        except OSError as e:
            ok = False
            log(f"WARNING: [group {g.id}] checkpoint of step {step} failed ({e}); 'latest' still names "
                f"{checkpoint.read_latest(ckpt)}", force=g.leader)
    return ok


if __name__ == "__main__":
    main()
