"""A student: one group's model under its DeepSpeed engine, and its half of a training step.

A step is split at the step's one sync (codistill/comm.py StepControl): ``forward_backward``
runs every micro-batch's forward and backward pass (teachers' probabilities from the
exchange's pool, the codistillation loss) with no host sync; ``finish_step`` then takes the
optimizer update - or skips it when any rank of the group saw a non-finite loss - and turns
the synced statistics into the step's log record.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from codistill import faults, runlog
from codistill.comm import GroupComm, GroupSync, sum_over
from codistill.data import GroupStream, eval_batches, eval_streams
from codistill.device import engine_args
from codistill.flags import Flags
from codistill.layout import RunLayout
from codistill.loss import chunk_rows, codistill_loss, distill_alpha, resolve_chunk_mb
from codistill.noise import NoiseScale
from codistill.noise import measure as measure_gradients
from codistill.noise import reading as noise_reading
from codistill.skip import skip_step
from model import build_model, count_params
from model.lstm import CarriedState


def host_copy(state_dict: dict) -> dict:
    """The weights copied to host memory (the device->host copy of an export: after it, training
    may change the module while a background thread writes the copy)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


class Student:
    """One hosted group's model: its DeepSpeed engine (ZeRO over the group's own ranks), data
    stream, validation batches and TensorBoard writer, and its half of a training step."""

    def __init__(self, gid, cfg: Flags, topo, mpu, data, model_cfg, ds_cfg, device, log):
        import deepspeed
        self.id, self.topo, self.device = gid, topo, device
        self.sync = GroupSync(topo.num_groups)  # this group's values in the step's sync
        # the flag groups a group's training reads: its schedule and loss, and the teachers' age limit
        self.training, self.distill, self.exchange_flags = cfg.training, cfg.distill, cfg.exchange
        if cfg.exchange.averaging:  # --peer_use average|diloco: peers' weights are averaged, never distilled
            self.distill = dataclasses.replace(cfg.distill, distill_weight=0.0)
        self.paths = RunLayout(cfg.run.run_dir).group(gid)
        self.data_dir = data.dir
        self.dir = self.paths.dir
        self.leader = topo.is_group_leader(gid)
        self.dp_rank, self.dp_size = topo.dp_rank(gid), topo.dp_size(gid)
        self.micro = ds_cfg["train_micro_batch_size_per_gpu"]
        self.accum = ds_cfg.get("gradient_accumulation_steps", 1)
        self.global_batch = ds_cfg["train_batch_size"]
        self.stream = GroupStream(data, gid, topo.num_groups, cfg.data.seq_len, cfg.run.seed,
                                  cfg.data.data_split == "shared")
        self.carried_eval = cfg.eval.eval_state == "carried"
        self.val = (eval_streams if self.carried_eval else eval_batches)(
            data, cfg.data.seq_len, self.micro, cfg.eval.eval_batches, self.dp_rank, self.dp_size)
        # --carry_state: per micro-batch of a step, the student's LSTM state and its teachers' (peer ->
        # state, tagged with the teacher's export step) carried from one step to the next
        self.carry = self.teacher_carry = None
        if cfg.data.carry_state:
            self.num_streams = self.dp_size * self.accum * self.micro
            self.stream.streams(self.num_streams)  # a shard too short for the streams fails here
            self.carry = [CarriedState() for _ in range(self.accum)]
            self.teacher_carry = [{} for _ in range(self.accum)]
        # independent initialisation per group; --peer_use average|diloco: every group starts from group 0's
        # (also in separate --group_id launches), then draws its own randomness (dropout) from its own seed
        torch.manual_seed(cfg.run.seed + (0 if cfg.exchange.averaging else 7919 * gid))
        self.model_cfg = model_cfg
        model = build_model(model_cfg)
        if cfg.exchange.averaging:
            torch.manual_seed(cfg.run.seed + 7919 * gid)
        if cfg.model.init_from:  # every group starts from the same pretrained weights
            from model.hf import load_pretrained  # streamed tensor by tensor, no second copy
            load_pretrained(model, cfg.model.init_from, cfg.model.trust_pickled_weights)
        self.num_params = count_params(model)
        optimizer = None
        if "optimizer" not in ds_cfg:
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr or 1e-3)
        self.engine, _, _, _ = deepspeed.initialize(
            args=engine_args(device), model=model, model_parameters=model.parameters(), optimizer=optimizer, config=ds_cfg,
            mpu=mpu, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor))
        self.zero_stage = self.engine.zero_optimization_stage()
        if cfg.training.noise_scale and self.zero_stage == 3:  # every rank: they all stop
            raise ValueError("--noise_scale needs the full parameters on the group's leader, which ZeRO-3 "
                             "partitions; measure it with ZeRO-1/2 (ds_configs/zero2.json)")
        self.mpu, self.ds_cfg = mpu, ds_cfg  # a partitioned teacher (--teacher_partition) uses the group's too
        self.dp_group = mpu.get_data_parallel_group() if mpu else None
        self.comm = GroupComm(device, topo.group_ranks[gid][0], self.dp_group, self.dp_size, self.leader)
        self.tokens_seen = 0
        self.step_tokens = self.global_batch * cfg.data.seq_len
        self.writer = runlog.TBWriter(self.paths.tb) if self.leader else None
        self.last_val = (float("nan"), float("nan"))
        self.skipped_steps = 0  # steps skipped for a non-finite loss
        self._pending = None    # forward_backward's device results, consumed by finish_step
        self._norm = None       # (step, device tensor) of the last update's gradient norm, logged a step late
        self.log = log
        self.chunk_mb = resolve_chunk_mb(cfg.training.loss_chunk_mb, device)  # the loss's and top-K teachers'
        self.noise = NoiseScale() if cfg.training.noise_scale and self.leader else None
        self._noise_batch = None  # (x, y) of this step's first micro-batch when the noise scale is due

    def lr_factor(self, step: int) -> float:
        a = self.training
        if step < a.warmup_steps:
            return (step + 1) / a.warmup_steps
        progress = min(1.0, (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps))
        return a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def forward_backward(self, step, pool, guard=None, log=print) -> torch.Tensor:
        """Forward and backward passes of every micro-batch of ``step``; the optimizer update
        waits for finish_step, after the step's one sync (StepControl) has told every rank of
        the group whether any of them saw a non-finite loss. No host sync here: the returned
        flag and the statistics stay on the device."""
        a, d, ex = self.training, self.distill, self.exchange_flags
        t0 = time.perf_counter()
        alpha = distill_alpha(step, d.distill_weight, d.burn_in_steps, d.distill_ramp_steps)
        peers = pool.active(self.id, step, ex.max_teacher_staleness, 2 * ex.export_every, log) if alpha > 0 else []
        use = [p for p in peers if guard is None or not guard.excluded(self.id, p)]  # dropped ones run, unused
        G = self.topo.num_groups
        stats = torch.zeros(len(GroupSync.STATS), device=self.device)  # means over micro-batches
        health = torch.zeros(self.sync.health_width, device=self.device)  # per teacher (TeacherPool.probs)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.engine.train()
        for micro in range(self.accum):
            batch, model_kw, teacher_kw = self.micro_batch(step, micro, peers)
            if self.device.type == "cuda":  # a copy from pageable memory may wait for the device
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            x, y = batch[:, :-1], batch[:, 1:]
            if self.noise is not None and micro == 0 and step % a.noise_scale_every == 0:
                self._noise_batch = (x, y)
            q, h = pool.probs(peers, x, d.temperature, y, use, G, **teacher_kw) if peers else (None, None)
            if h is not None:
                health += h / self.accum
            logits = self.engine(x, **model_kw)
            faults.sigkill("sigkill", step)  # test-only hook: a crash in the middle of a step
            chunk = a.loss_chunk_tokens or chunk_rows(logits.shape[-1], self.chunk_mb)
            loss, st = codistill_loss(logits, y, q, alpha, d.temperature, d.label_smoothing, chunk)
            if faults.active("nan_loss", step):
                loss = loss * float("nan")
            bad |= ~torch.isfinite(loss.detach())
            self.engine.backward(loss)  # a non-finite loss's gradients are dropped by finish_step
            if micro < self.accum - 1:
                self.engine.step()  # not the accumulation boundary: DeepSpeed only counts it
            ce, distill, agree, kl = st.values
            shown = loss.detach().float() - alpha * (distill - kl)  # the optimised loss less alpha * T^2 H(q)
            stats += torch.stack([shown, ce, kl, agree, distill]) / self.accum  # GroupSync.STATS's order
        self._pending = (alpha, use, peers, torch.cat([stats, health]), time.perf_counter() - t0)
        return bad

    def micro_batch(self, step: int, micro: int, peers: list[int]) -> tuple[torch.Tensor, dict, dict]:
        """Micro-batch ``micro`` of ``step`` (host tensor [micro, seq_len+1]) and the keyword
        arguments of the student's and the teachers' forwards: {} and {} unless --carry_state,
        where they carry this micro-batch's states. At the streams' start every state is reset; a
        teacher not run this step loses its state (it would be stale when it comes back), a
        swapped one too (TeacherPool.probs: its state is tagged with another export step)."""
        if self.carry is None:
            return self.stream.batch(step - 1, micro, self.accum, self.dp_rank, self.dp_size, self.micro), {}, {}
        batch, fresh = self.stream.stream_batch(step - 1, micro, self.accum, self.dp_rank, self.dp_size, self.micro)
        teachers = self.teacher_carry[micro]
        if fresh:
            self.carry[micro].reset()
            teachers.clear()
        for p in [p for p in teachers if p not in peers]:
            del teachers[p]
        return batch, {"state": self.carry[micro]}, {"states": teachers}

    def reset_carry(self) -> None:
        """Forget every carried state (after a skipped step: a non-finite loss may come with a
        non-finite state)."""
        for st, teachers in zip(self.carry or [], self.teacher_carry or []):
            st.reset()
            teachers.clear()

    def carry_checkpoint(self) -> dict:
        """--carry_state: every rank's carried states for the checkpoint's client_state, which
        only the group's leader writes (collective over the group: one all_gather_object of a few
        host tensors per rank, at checkpoints only). {} without --carry_state."""
        if self.carry is None:
            return {}
        mine = {"student": [st.to("cpu").hc for st in self.carry],
                "teachers": [{p: (st.tag, st.to("cpu").hc) for p, st in d.items()} for d in self.teacher_carry]}
        ranks = [mine]
        if self.dp_size > 1:
            ranks = [None] * self.dp_size
            torch.distributed.all_gather_object(ranks, mine, group=self.dp_group)
        return {"carry_state": {"streams": self.num_streams, "dp_size": self.dp_size, "grad_accum": self.accum,
                                "ranks": ranks}}

    def restore_carry(self, state: dict, step: int) -> None:
        """The carried states of checkpoint ``state`` (client_state) for this rank; from zeros,
        with a warning, when it has none for this layout of streams."""
        if self.carry is None:
            return
        saved = state.get("carry_state")
        layout = (self.num_streams, self.dp_size, self.accum)
        if not saved or (saved["streams"], saved["dp_size"], saved["grad_accum"]) != layout:
            got = "none" if not saved else f"{saved['streams']} streams over {saved['dp_size']} rank(s)"
            self.log(f"WARNING: [group {self.id}] the checkpoint of step {step} holds no carried LSTM state for "
                     f"{self.num_streams} streams over {self.dp_size} rank(s) (it has {got}): the states start from "
                     "zeros", force=self.leader)
            return
        mine = saved["ranks"][self.dp_rank]
        self.carry = [CarriedState(hc).to(self.device) for hc in mine["student"]]
        self.teacher_carry = [{p: CarriedState(hc, tag).to(self.device) for p, (tag, hc) in teachers.items()}
                              for teachers in mine["teachers"]]

    def stats_for_sync(self) -> torch.Tensor:
        """This group's part of the step's sync, laid out as ``self.sync`` (codistill/comm.py
        GroupSync) says: the step and value of the previous update's gradient norm (-1, 0 when there
        is none), the loss statistics, then the teachers' health (TeacherPool.probs)."""
        if self._norm is None:
            head = torch.zeros(2, device=self.device)
            head[0] = -1.0  # a fill on the device, not a host->device copy
        else:
            step, norm = self._norm
            head = torch.stack([norm.new_full((), float(step)), norm])
        return torch.cat([head, self._pending[3]])

    def finish_step(self, step, skip: bool, host: dict, sync_s: float) -> runlog.StepStats:
        """The optimizer update (or, when any rank of the group saw a non-finite loss, a skipped
        step: no update, counted, gradients dropped); ``host`` is this group's part of the sync,
        by name (GroupSync.split)."""
        alpha, use, ran, _, fb_s = self._pending
        norm_step, norm_value, health = host["norm_step"], host["norm"], host["health"]
        t0 = time.perf_counter()
        grad_norm = None
        if skip:
            skip_step(self.engine, self.accum - 1)
            self.skipped_steps += 1
            self.reset_carry()
        else:
            if self.zero_stage == 0:  # the plain optimizer keeps no norm; DeepSpeed's own do
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
            self.engine.step()
            if grad_norm is None:
                grad_norm = self.engine.get_global_grad_norm()
        if self.writer and norm_step >= 0:  # the previous update's norm, now on the host
            self.writer.scalar("grad_norm", norm_value, int(norm_step))
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.detach().float().reshape(()).to(self.device)
        elif grad_norm is not None:  # DeepSpeed gives a float in some paths (e.g. inf after an overflow)
            grad_norm = torch.full((), float(grad_norm), device=self.device)
        self._norm = None if grad_norm is None else (step, grad_norm)
        self.tokens_seen += self.step_tokens
        if self._noise_batch is not None:
            self.measure_noise(step, *self._noise_batch)
            self._noise_batch = None
        nan = float("nan")
        return runlog.StepStats(
            loss=host["loss"], ce=nan if skip else host["ce"], distill=nan if skip else host["distill"],
            agreement=host["agreement"], distill_ce=nan if skip else host["distill_ce"], alpha=alpha, peers=use, skipped=skip, skipped_steps=self.skipped_steps,
            step_time=fb_s + sync_s + time.perf_counter() - t0, lr=self.engine.get_lr()[0],
            teacher_ce={p: health[self.sync.health_ce(p)] for p in ran},
            teacher_nonfinite={p: health[self.sync.health_nonfinite(p)] > 0 for p in ran})

    def measure_noise(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """--noise_scale, on the group's leader every --noise_scale_every steps: the gradient noise
        scale of the next-token loss on this step's first micro-batch (codistill/noise.py; one
        more forward and backward pass, one host sync, and one copy of the parameters in their own
        dtype while it runs: the parts' gradient sum), in tokens, to TensorBoard and the console, read
        against the group's batch."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):  # dropout draws
            small, big, b, B = measure_gradients(self.engine.module, x, y)  # leave training's RNG stream as it was
        trace, g2 = self.noise.update(small, big, b, B)
        value = self.noise.value
        if self.writer:  # the raw estimates too: a study pools them over a stretch of the loss curve
            self.writer.scalar("train/noise_trace", trace, step)
            self.writer.scalar("train/noise_grad_sq", g2, step)
            if value is not None and math.isfinite(value):
                self.writer.scalar("train/noise_scale", value, step)
        self.log(f"[group {self.id}] step {step}: {noise_reading(self.step_tokens, value)} "
                 f"({self.noise.n} measurement{'s' if self.noise.n > 1 else ''})", force=True)

    def close(self) -> None:
        """Log the last update's gradient norm (there is no next sync) and close the writer."""
        if self._norm is not None and self.writer:
            self.writer.scalar("grad_norm", float(self._norm[1]), self._norm[0])
        self._norm = None
        if self.writer:
            self.writer.close()

    @torch.no_grad()
    def evaluate(self):
        """Validation loss/perplexity over the group's ranks: totals summed on the device, one
        all-reduce over the group and one host sync at the end. --eval_state carried: the LSTM
        carries its state across the batches (codistill/data.py eval_streams)."""
        self.engine.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        kw = {"state": CarriedState()} if self.carried_eval else {}  # --eval_state carried: rows, in order
        for batch in self.val:
            batch = batch.to(self.device)
            logits = self.engine(batch[:, :-1], **kw).float()
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
            return host_copy(self.engine.module.state_dict()) if self.leader else None
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
