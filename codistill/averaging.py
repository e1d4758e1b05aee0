"""Averaging: what a group does with its peers' weights when it averages them instead of
distilling from them (LocalSGD, ``average``; DiLoCo's outer step, ``diloco``).

Protocol (one round = the K steps between two exchange steps; see docs/averaging.md):
1. At an exchange step every group's ranks read the group's full fp32 master weights
   (``read_masters``: every rank of the group calls it, in the same order - under ZeRO-1/2/3 it
   is a collective of the group) and the group exports them as usual (codistill/exports.py).
2. Each group reads its peers' exports of THAT step through ``read_peer``: an export that fails
   the exchange's checks (codistill/exports.py read_export: not a well-formed safetensors file,
   truncated, another model config or tokenizer, non-finite weights - the guard codistill/teachers/health.py
   lists first), holds other tensors than the model's (codistill/teachers/loader.py check_usable) or is
   of another step is refused with an ExportError naming the peer, the file and the reason; a
   refused export is never averaged in. The mean is over the groups present (own + accepted).
3. ``average``: LocalSGD sets the weights to ``average(present)``, the fp32 mean in group order.
   ``diloco``: ``OuterOptimizer.step(present)`` computes the pseudo-gradient
   ``g = start - average(present)`` (``start``: the round's starting weights, the previous outer
   result, the same in every group) and applies Nesterov SGD to it:
   ``m = mu*m + g; new = start - lr*(g + mu*m)`` - bit for bit torch.optim.SGD(momentum=mu,
   nesterov=True, dampening=0, weight_decay=0) stepping a parameter ``start`` whose .grad is g.
   ``new`` is the next round's start.
4. ``write_masters`` (every rank of the group, the same full weights on each) sets the fp32
   masters AND the module's (bf16 or fp32) weights; the inner optimizer state (Adam moments,
   step counts) is left as it is. Every group then continues training from the result.

The outer optimizer's state (momentum per parameter and the round's start, fp32, plus the round
count) is a flat dict of tensors and numbers (``state_dict``): it goes into DeepSpeed's
client_state, which the checkpoint loads weights-only (codistill/checkpoint.py), and a round
resumed from it gives the bit-identical outer step. It holds two fp32 copies of the model on
every rank (not partitioned under ZeRO-3: a limitation, said in docs/averaging.md).

Bytes on the wire (``ExchangeBytes``, ``allreduce_bytes``): a group's exchange traffic is the
size of the export files it writes (weights + metadata) and of the peers' files it reads. The
synchronous data-parallel equivalent is the ring all-reduce of the gradients each rank sends
(and receives) per step, 2*(N-1)/N * P * b bytes for N ranks, P parameters, b bytes per
gradient element as communicated (DeepSpeed's engine.communication_data_type) - Patarasuk &
Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations" (JPDC 2009), the
factor nccl-tests' doc/PERFORMANCE.md calls busbw = algbw * 2*(n-1)/n. ZeRO-1/2 move the same
volume (reduce-scatter + all-gather, ZeRO paper, Rajbhandari et al. 2020, section 7.2.1: 2*Psi);
ZeRO-3 adds one more parameter all-gather, (N-1)/N * P * b (3*Psi in total, section 7.2.2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codistill.exports import Export, export_name, read_export
from codistill.teachers.loader import check_usable
from fileio import ExportError


# ---- the engine's fp32 master weights ---------------------------------------------------------
def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The engine's parameters by name (tied weights once), in the module's order: the same order
    on every rank, which the collectives of read_masters need. A frozen parameter is refused:
    DeepSpeed keeps no fp32 master of it (stage3.get_full_hp_param returns None for it)."""
    params = list(engine.module.named_parameters())
    frozen = [n for n, p in params if not p.requires_grad]
    if frozen:
        raise ValueError(f"averaging needs every parameter trainable; {frozen[0]} is frozen "
                         f"({len(frozen)} frozen): DeepSpeed keeps no fp32 master for it")
    return params


def _shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: p.shape is the empty placeholder


def _mode(engine) -> str:
    if engine.zero_optimization_stage() == 3:
        return "zero3"
    # ZeRO-1/2 and DeepSpeed's bf16 optimizer (stage 0 + bf16) link each parameter to its fp32
    # partition (deepspeed/utils/mixed_precision_linkage.py link_hp_params sets p._hp_mapping)
    if any(hasattr(p, "_hp_mapping") for p in engine.module.parameters()):
        return "linked"
    return "plain"  # stage 0 in fp32: the module's parameters are the optimizer's


@torch.no_grad()
def read_masters(engine) -> dict[str, torch.Tensor]:
    """The group's full fp32 master weights, name -> fp32 host tensor, on EVERY rank of the group.

    Every rank of the group must call it (same engine, same order): under ZeRO-1/2 each
    parameter is one all-reduce over the group (deepspeed/utils/tensor_fragment.py
    get_full_hp_param: each rank fills its fragment, zeros elsewhere, dist.all_reduce), under
    ZeRO-3 one all-gather (deepspeed/runtime/zero/stage3.py get_full_hp_param ->
    _fp32_state_allgather: dist.all_gather_into_tensor over the parameter's partition group),
    both reached through deepspeed.utils.safe_get_full_fp32_param (tensor_fragment.py,
    safe_get_full_fp32_param: ``ds_id`` -> ZeRO-3, ``_hp_mapping`` -> ZeRO-1/2/bf16)."""
    from deepspeed.utils import safe_get_full_fp32_param
    mode = _mode(engine)
    out = {}
    for name, p in trainable(engine):
        full = p.detach() if mode == "plain" else safe_get_full_fp32_param(p)
        out[name] = full.to("cpu", torch.float32, copy=True).reshape(_shape(p))
    return out


def with_masters(engine, state_dict: dict[str, torch.Tensor] | None, masters: dict[str, torch.Tensor]):
    """``state_dict`` (an export's module weights; None off the leader) with every parameter - under
    each of its names, a tied weight under both - replaced by its fp32 master (read_masters);
    buffers as they were. Under bf16 the exports of --peer_use average|diloco thus carry what the
    peers average, as one launch hosting every group averages (its engines' masters)."""
    if state_dict is None:
        return None
    by_id = {id(p): n for n, p in trainable(engine)}
    out = dict(state_dict)
    for k, t in engine.module.state_dict(keep_vars=True).items():
        if id(t) in by_id and k in out:
            out[k] = masters[by_id[id(t)]]
    return out


def _check_weights(engine, params, weights: dict[str, torch.Tensor]) -> None:
    missing = [n for n, _ in params if n not in weights]
    if missing:
        raise ValueError(f"write_masters: no value for {missing[0]} ({len(missing)} parameters missing)")
    for n, p in params:
        if tuple(weights[n].shape) != _shape(p):
            raise ValueError(f"write_masters: {n} has shape {tuple(weights[n].shape)}, the model {_shape(p)}")


@torch.no_grad()
def write_masters(engine, weights: dict[str, torch.Tensor]) -> None:
    """Set the engine's fp32 masters and its module's weights to ``weights`` (name -> tensor, the
    same full values on every rank; cast to fp32 for the masters, to the module's dtype for the
    module). Every rank of the group must call it. The inner optimizer's state is not touched.

    - stage 0 in fp32: the module's parameters are the masters; copied in place.
    - ZeRO-1/2 (and DeepSpeed's bf16 optimizer): deepspeed.utils.safe_set_full_fp32_param copies
      each rank's fragment of the value into its fp32 partition (tensor_fragment.py
      set_full_hp_param; no communication), then the optimizer's own ``update_lp_params`` copies
      the fp32 partitions into the bf16/fp32 module partitions and all-gathers them over the
      group - DeepSpeed's path after loading a universal checkpoint (runtime/engine.py
      load_checkpoint: ``self.optimizer.update_lp_params()``; stage_1_and_2.py / bf16_optimizer.py
      update_lp_params).
    - ZeRO-3: not through safe_set_full_fp32_param - stage3.py set_full_hp_param narrows the
      value at ``partition_numel * rank``, which runs past the end of a parameter whose numel is
      not a multiple of the group's size on the last rank (its partition is padded:
      partition_parameters.py _partition_param, ``tensor_size = self._aligned_size(param)``). The
      same steps, with the padding left out: the rank's fp32 partition from
      ``_get_fp32_opt_state_partition`` (what set_full_hp_param uses; swapped out again for NVMe
      offload as there), the module's partition ``param.ds_tensor`` (what the forward gathers
      from; stage3.py _reassign_or_swap_out_partitioned_parameters is DeepSpeed's own fp32 ->
      ds_tensor copy after a step), and ``param.data`` too for a parameter that stays gathered
      (ds_persist, under stage3_param_persistence_threshold: after a step stage3.py re-gathers
      those; here every rank holds the full value already).
    """
    params = trainable(engine)
    _check_weights(engine, params, weights)
    mode = _mode(engine)
    if mode == "plain":
        for n, p in params:
            p.data.copy_(weights[n].to(p.device, p.dtype).reshape(p.shape))
        return
    if mode == "linked":
        from deepspeed.utils import safe_set_full_fp32_param
        for n, p in params:
            safe_set_full_fp32_param(p, weights[n].to(p.device, torch.float32))
        engine.optimizer.update_lp_params()
        return
    _write_zero3(engine, params, weights)


def _write_zero3(engine, params, weights) -> None:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    opt = engine.optimizer
    if getattr(engine, "zero_offload_param", lambda: None)() is not None and \
            str(engine.zero_offload_param().device).lower().endswith("nvme"):
        raise NotImplementedError("write_masters: ZeRO-3 with parameters offloaded to NVMe is not supported")
    for n, p in params:
        flat = weights[n].reshape(-1)
        part, group_idx = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
        size, rank = part.numel(), opt._get_param_partition_rank(p)
        lo, hi = min(size * rank, flat.numel()), min(size * (rank + 1), flat.numel())
        piece = flat[lo:hi]
        part.narrow(0, 0, hi - lo).copy_(piece.to(part.device, part.dtype))
        if opt._swappable_optimizer_subgroup(group_idx):
            opt._optimizer_states_and_gradient_swap_out(group_idx)
        lp = p.ds_tensor.data.reshape(-1)
        lp.narrow(0, 0, hi - lo).copy_(piece.to(lp.device, lp.dtype))
        if p.ds_status == ZeroParamStatus.AVAILABLE and p.data.numel() == flat.numel():
            p.data.copy_(flat.to(p.device, p.dtype).reshape(p.data.shape))


# ---- the math -------------------------------------------------------------------------------
def average(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The fp32 mean of the groups present (``weights`` in group order, the same order in every
    group so that every group gets the same bits): sum in that order, then one division by n."""
    if not weights:
        raise ValueError("average: no weights to average")
    names = list(weights[0])
    for i, w in enumerate(weights[1:], 1):
        if set(w) != set(names):
            diff = sorted(set(w) ^ set(names))
            raise ValueError(f"average: weights {i} hold other tensors than weights 0 (e.g. {diff[0]})")
    out = {}
    for k in names:
        acc = weights[0][k].to(torch.float32, copy=True)
        for w in weights[1:]:
            acc.add_(w[k].to(torch.float32))
        out[k] = acc.div_(len(weights))
    return out


class OuterOptimizer:
    """DiLoCo's outer optimizer: Nesterov SGD over the pseudo-gradient ``start - mean(now)``.

    ``begin(start)`` opens a round (the first one; ``step`` opens the next one itself);
    ``step(present)`` returns the new weights ``start - lr * (g + mu * m)`` with ``m = mu*m + g``
    (m = 0 before the first step, so m = g then, as torch.optim.SGD's first step sets its buffer
    to the gradient). The same tensor operations as torch.optim.SGD's single-tensor path
    (``buf.mul_(mu).add_(g)``, ``g.add(buf, alpha=mu)``, ``p.add_(g, alpha=-lr)``), so the result
    equals SGD(momentum=mu, nesterov=True) bit for bit (tests/integration/test_averaging.py checks it).
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9):
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"outer optimizer: lr must be > 0 and momentum in [0, 1) (got lr {lr}, "
                             f"momentum {momentum})")
        self.lr, self.momentum = float(lr), float(momentum)
        self.start: dict[str, torch.Tensor] | None = None
        self.momentum_buf: dict[str, torch.Tensor] = {}
        self.rounds = 0  # outer steps taken

    def begin(self, start: dict[str, torch.Tensor]) -> None:
        self.start = {k: v.to("cpu", torch.float32, copy=True) for k, v in start.items()}

    def pseudo_gradient(self, present: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.start is None:
            raise RuntimeError("OuterOptimizer.step before begin(): the round has no starting weights")
        mean = average(present)
        if set(mean) != set(self.start):
            raise ValueError("outer step: the groups' weights hold other tensors than the round's start "
                             f"(e.g. {sorted(set(mean) ^ set(self.start))[0]})")
        return {k: self.start[k] - mean[k] for k in self.start}

    def step(self, present: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The outer step from the groups present; the result is also the next round's start."""
        g = self.pseudo_gradient(present)
        new = {}
        for k, grad in g.items():
            buf = self.momentum_buf.get(k)
            if buf is None:
                buf = self.momentum_buf[k] = grad.clone()  # torch.optim.SGD's first step: buf = g
            else:
                buf.mul_(self.momentum).add_(grad)
            d = grad.add(buf, alpha=self.momentum) if self.momentum else grad
            new[k] = self.start[k].clone().add_(d, alpha=-self.lr)
        self.rounds += 1
        self.begin(new)
        return {k: v.clone() for k, v in new.items()}

    def state_dict(self) -> dict:
        """For DeepSpeed's client_state: plain tensors and numbers only (loads weights-only)."""
        if self.start is None:
            raise RuntimeError("OuterOptimizer.state_dict before begin(): nothing to save")
        return {"rounds": self.rounds, "lr": self.lr, "momentum": self.momentum,
                "start": {k: v.clone() for k, v in self.start.items()},
                "momentum_buf": {k: v.clone() for k, v in self.momentum_buf.items()}}

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        """Resume exactly. lr and momentum stay those this optimizer was built with (the flags);
        the saved ones are only recorded. The tensors must be those of the model."""
        try:
            start, buf, rounds = state["start"], state["momentum_buf"], int(state["rounds"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: the outer optimizer's state is incomplete ({e!r}); it was not written "
                             "by codistill/averaging.py OuterOptimizer.state_dict") from None
        if self.start is not None:
            if set(start) != set(self.start):
                raise ValueError(f"{where}: the outer optimizer's state holds other tensors than the model "
                                 f"(e.g. {sorted(set(start) ^ set(self.start))[0]})")
            bad = [k for k in start if start[k].shape != self.start[k].shape]
            if bad:
                raise ValueError(f"{where}: outer state {bad[0]} has shape {tuple(start[bad[0]].shape)}, the "
                                 f"model {tuple(self.start[bad[0]].shape)}")
        if not set(buf) <= set(start):
            raise ValueError(f"{where}: outer momentum for tensors the round's start lacks")
        self.start = {k: v.to("cpu", torch.float32, copy=True) for k, v in start.items()}
        self.momentum_buf = {k: v.to("cpu", torch.float32, copy=True) for k, v in buf.items()}
        self.rounds = rounds
        self.saved_hyper = (state.get("lr"), state.get("momentum"))


# ---- the peer filter ------------------------------------------------------------------------
def expected_shapes(engine) -> dict[str, tuple]:
    """name -> full shape of every tensor an export of this model holds (module.state_dict keys:
    tied weights under each of their names), under ZeRO-3 too (ds_shape)."""
    return {k: _shape(v) for k, v in engine.module.state_dict(keep_vars=True).items()}


def read_peer(exports_dir: Path, peer: int, step: int, expect_config_hash: str, expect_tokenizer: str | None,
              expect: dict[str, tuple], names: list[str]) -> dict[str, torch.Tensor]:
    """Peer ``peer``'s export of ``step`` as fp32 tensors ``names`` (the model's parameters), only if
    it passes every check of the exchange (read_export: a well-formed file of that step, its size
    and digest, this model config and tokenizer, finite weights) and holds exactly this model's
    tensors (check_usable against ``expect``). Raises ExportError naming the peer and the reason."""
    try:
        exp: Export = read_export(exports_dir, step, expect_config_hash, expect_tokenizer)
        check_usable(exp, expect)
    except ExportError as e:
        raise ExportError(f"peer group {peer}: its export {export_name(step)} in {exports_dir} is not averaged "
                          f"in: {e}") from None
    return {n: exp.state_dict[n].to(torch.float32, copy=True) for n in names}


def gather_present(own: dict[str, torch.Tensor], own_group: int, peers: dict[int, Path], step: int,
                   expect_config_hash: str, expect_tokenizer: str | None, expect: dict[str, tuple],
                   log=print) -> tuple[list[dict[str, torch.Tensor]], list[int], dict[int, str]]:
    """The weights to average at ``step``: this group's own (``own``) and every peer's export that
    passes read_peer, in group order. Returns (weights, their groups, refused peer -> reason); each
    refusal is logged as a warning."""
    present, groups, refused = {own_group: own}, [own_group], {}
    for peer, exports_dir in sorted(peers.items()):
        try:
            present[peer] = read_peer(exports_dir, peer, step, expect_config_hash, expect_tokenizer, expect,
                                      list(own))
        except ExportError as e:
            refused[peer] = str(e)
            log(f"WARNING: [group {own_group}] step {step}: {e}")
    groups = sorted(present)
    return [present[g] for g in groups], groups, refused


# ---- bytes on the wire ----------------------------------------------------------------------
def export_bytes(exports_dir: Path, step: int) -> int:
    """Bytes of one export on disk: its weights file and its metadata file."""
    name = export_name(step)
    return sum(os.path.getsize(Path(exports_dir) / f"{name}{s}") for s in (".safetensors", ".json"))


def allreduce_bytes(num_params: int, ranks: int, bytes_per_element: int, zero_stage: int = 0) -> float:
    """Bytes each rank sends (and receives) per step in synchronous data parallelism over ``ranks``
    ranks: the ring all-reduce of the gradients, 2*(N-1)/N * P * b; ZeRO-3 adds the parameters'
    all-gather, (N-1)/N * P * b (sources in the module docstring). 0 for one rank."""
    if ranks < 1 or num_params < 0 or bytes_per_element < 1:
        raise ValueError(f"allreduce_bytes: need ranks >= 1, num_params >= 0, bytes_per_element >= 1 "
                         f"(got {ranks}, {num_params}, {bytes_per_element})")
    factor = 2 + (1 if zero_stage == 3 else 0)
    return factor * (ranks - 1) / ranks * num_params * bytes_per_element


def gradient_element_bytes(engine) -> int:
    """Bytes per gradient element as DeepSpeed communicates it (runtime/engine.py
    communication_data_type: the config's communication_data_type, else fp16/bf16 when enabled,
    else fp32)."""
    return torch.empty((), dtype=engine.communication_data_type).element_size()


@dataclass
class ExchangeBytes:
    """One group's exchange traffic: bytes of the exports it wrote and of the peers' exports it
    read (every method: distill reads its teachers' exports, average and diloco their peers'),
    next to what synchronous data parallelism would have moved per rank over the same steps."""
    group: int
    num_params: int
    dp_ranks: int                 # N of the synchronous baseline (e.g. every rank of the run)
    bytes_per_element: int = 4
    zero_stage: int = 0
    written: int = 0
    read: int = 0
    steps: int = 0
    per_peer: dict[int, int] = field(default_factory=dict)

    def wrote(self, exports_dir: Path, step: int) -> int:
        n = export_bytes(exports_dir, step)
        self.written += n
        return n

    def was_read(self, peer: int, exports_dir: Path, step: int) -> int:
        n = export_bytes(exports_dir, step)
        self.read += n
        self.per_peer[peer] = self.per_peer.get(peer, 0) + n
        return n

    def advance(self, steps: int = 1) -> None:
        self.steps += steps

    def record(self) -> dict[str, float]:
        """The scalars to log (TensorBoard tags under exchange/)."""
        dp = allreduce_bytes(self.num_params, self.dp_ranks, self.bytes_per_element, self.zero_stage)
        return {"exchange/bytes_written": float(self.written), "exchange/bytes_read": float(self.read),
                "exchange/bytes_total": float(self.written + self.read),
                "exchange/dp_allreduce_bytes_per_step": dp,
                "exchange/dp_allreduce_bytes": dp * self.steps}
