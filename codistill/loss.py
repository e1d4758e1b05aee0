"""The codistillation loss: CE(y, p) + alpha * psi(mean teacher probs, p).

psi is the cross entropy of the student's distribution against the averaged teacher
distribution (the paper's choice; equal to KL(q || p) up to the teacher's entropy, which has
no gradient). The logs show KL(q || p) (``LossStats.kl``): it falls towards 0 as the student
agrees with its teachers, while psi stays above the teachers' entropy (~ the CE itself). With a temperature T != 1 both sides are softened and psi is scaled by T^2
(Hinton et al.), so its gradient keeps the same magnitude.

Everything is computed in fp32, chunk by chunk over tokens: the forward pass keeps no
softmax of the whole batch and the backward pass recomputes it per chunk, so no B*T*V
tensor is held beyond the logits themselves, their gradient, and the teacher probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossStats:
    """Detached statistics of one loss call, kept on the logits' device (no host sync):
    ``values`` = [ce, distill, agreement, kl]. The float properties copy to the host."""
    values: torch.Tensor

    @property
    def ce(self) -> float:          # plain next-token cross entropy (no smoothing)
        return float(self.values[0])

    @property
    def distill(self) -> float:     # psi, before multiplying by alpha (0 when there is no teacher)
        return float(self.values[1])

    @property
    def agreement(self) -> float:   # top-1 agreement student vs averaged teacher (nan without teacher)
        return float(self.values[2])

    @property
    def kl(self) -> float:          # KL(q || p) = psi - T^2 H(q): 0 when the student agrees with the teacher
        return float(self.values[3])


@dataclass
class TopK:
    """The averaged teacher distribution kept sparse (``--teacher_topk K``): per token the K
    most likely tokens' probabilities (``values``, fp32, descending) and ids (``indices``,
    int64), and the ``rest`` of the mass, 1 - sum(values), spread uniformly over the V - K other
    tokens (the one choice that adds no information the teachers did not give). Memory is
    B x T x (K x 12 + 4) bytes instead of B x T x V x 4. A token whose teachers were all left
    out (non-finite) has values and rest 0: no distillation for it, as in the dense form.
    K = V holds the whole distribution (rest 0)."""
    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor

    def flat(self) -> TopK:
        k = self.values.shape[-1]
        return TopK(self.values.reshape(-1, k), self.indices.reshape(-1, k), self.rest.reshape(-1))

    def rows(self, i: int, n: int) -> TopK:
        return TopK(self.values[i:i + n], self.indices[i:i + n], self.rest[i:i + n])


def topk_of(q: torch.Tensor, k: int) -> TopK:
    """``q`` [N, V] (rows summing to 1, or all zero) kept as its top ``k`` entries per row."""
    v = q.shape[-1]
    values, indices = torch.topk(q, min(k, v), dim=-1)
    rest = (q.sum(-1) - values.sum(-1)).clamp_min_(0.0) if k < v else q.new_zeros(q.shape[0])
    return TopK(values, indices, rest)


CPU_CHUNK_MB, CUDA_CHUNK_MB = 32.0, 512.0


def resolve_chunk_mb(asked, device: torch.device) -> float:
    """--loss_chunk_mb: a number of MiB as given, or "auto" (or None): 32 MiB on CPU (measured
    there: larger chunks only add page faults), on CUDA 512 MiB or 1/32 of the device's free
    memory if less (never under 32). Small chunks cost kernel launches on a GPU: 32 MiB at a
    128 k vocabulary is 65 tokens, ~10 k launches per micro-batch of 16 x 2048; 512 MiB is 1024."""
    if asked is None or (isinstance(asked, str) and asked.strip().lower() == "auto"):
        if device.type != "cuda":
            return CPU_CHUNK_MB
        free, _ = torch.cuda.mem_get_info(device)
        return max(CPU_CHUNK_MB, min(CUDA_CHUNK_MB, free / 2**20 / 32))
    try:
        mb = float(asked)
    except (TypeError, ValueError):
        raise ValueError(f"--loss_chunk_mb must be a number of MiB or 'auto' (got {asked!r})") from None
    if not mb > 0:
        raise ValueError(f"--loss_chunk_mb must be > 0 or 'auto' (got {asked!r})")
    return mb


def chunk_rows(vocab: int, chunk_mb: float) -> int:
    """Tokens per loss chunk: one fp32 [tokens, V] chunk of ``chunk_mb`` MiB (--loss_chunk_mb).
    A fixed token count is not a memory bound: 4096 tokens at a 50 k vocabulary are 0.8 GB."""
    return max(1, int(chunk_mb * 2**20) // (4 * vocab))


class _CodistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, teacher_probs, alpha, temperature, label_smoothing, chunk):
        n, v = logits.shape
        ce = logits.new_zeros((), dtype=torch.float32)
        smooth = torch.zeros_like(ce)
        distill = torch.zeros_like(ce)
        entropy = torch.zeros_like(ce)
        agree = torch.zeros_like(ce)
        for i in range(0, n, chunk):
            s = logits[i:i + chunk].float()
            logp = F.log_softmax(s, dim=-1)
            ce -= logp.gather(1, targets[i:i + chunk, None]).sum()
            if label_smoothing:
                smooth -= logp.mean(dim=-1).sum()
            if isinstance(teacher_probs, TopK):
                logp_t = logp if temperature == 1.0 else F.log_softmax(s / temperature, dim=-1)
                d, a, h = _sparse_terms(teacher_probs.rows(i, chunk), logp_t, s, v)
                distill -= d * temperature ** 2
                agree += a
                entropy += h * temperature ** 2
            elif teacher_probs is not None:
                q = teacher_probs[i:i + chunk].float()
                logp_t = logp if temperature == 1.0 else F.log_softmax(s / temperature, dim=-1)
                distill -= torch.dot(q.reshape(-1), logp_t.reshape(-1)) * temperature ** 2
                agree += (row_argmax(s) == row_argmax(q)).sum()
                # H(q), for the KL in the logs only: log q written over logp_t, which is no longer
                # needed (no new [chunk, V] buffer: fresh allocations cost page faults on CPU);
                # clamped so that 0 log 0 = 0 (xlogy is ~5x slower on CPU)
                log_q = torch.clamp_min(q, torch.finfo(q.dtype).tiny, out=logp_t).log_()
                entropy -= torch.dot(q.reshape(-1), log_q.reshape(-1)) * temperature ** 2
        ctx.save_for_backward(logits, targets)
        # Stored on ctx, not saved_tensors: teacher outputs come from inference_mode, and
        # they need no version tracking (nothing writes to them).
        ctx.teacher_probs = teacher_probs
        ctx.hp = (alpha, temperature, label_smoothing, chunk)
        ce, smooth, distill, entropy = ce / n, smooth / n, distill / n, entropy / n
        loss = (1 - label_smoothing) * ce + label_smoothing * smooth
        if teacher_probs is not None:
            loss = loss + alpha * distill
        stats = torch.stack([ce, distill, agree / n if teacher_probs is not None else ce.new_full((), float("nan")),
                             distill - entropy])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, targets = ctx.saved_tensors
        q_all = ctx.teacher_probs
        alpha, temperature, label_smoothing, chunk = ctx.hp
        n, v = logits.shape
        scale = grad_loss.float() / n
        grad = torch.empty_like(logits)
        distilling = q_all is not None and alpha
        a = alpha * temperature if distilling else 0.0
        # d loss / d s = (1 + a) p - a q - (1 - ls) onehot(y) - ls / V  (p at T = 1: one softmax),
        # written as (1 + a) * [p - a/(1+a) q - ...] so that the factor joins the final scale.
        k = 1 + a if temperature == 1.0 else 1.0
        for i in range(0, n, chunk):
            s = logits[i:i + chunk].float()
            rows = grad[i:i + chunk]
            if rows.dtype == torch.float32:                        # softmax straight into grad
                g = torch.softmax(s, dim=-1, out=rows)
            else:
                g = F.softmax(s, dim=-1)
            if distilling:                                         # d psi / d s = T * (p_T - q)
                if temperature != 1.0:
                    g.add_(F.softmax(s / temperature, dim=-1), alpha=a)
                if isinstance(q_all, TopK):                        # q = u off the top K, values on it
                    t = q_all.rows(i, chunk)
                    u = _uniform_rest(t, v)
                    g.sub_(u[:, None], alpha=a / k)
                    g.scatter_add_(1, t.indices, (t.values - u[:, None]).mul_(-a / k))
                else:
                    g.sub_(q_all[i:i + chunk].float(), alpha=a / k)
            if label_smoothing:
                g.sub_(label_smoothing / v / k)
            g.scatter_add_(1, targets[i:i + chunk, None],
                           g.new_full((g.shape[0], 1), -(1 - label_smoothing) / k))
            g.mul_(scale * k)
            if g is not rows:
                rows.copy_(g)
        return grad, None, None, None, None, None, None


def _uniform_rest(t: TopK, v: int) -> torch.Tensor:
    """The probability of each token off the top K: rest / (V - K) (0 when K = V)."""
    k = t.values.shape[-1]
    return t.rest / (v - k) if v > k else torch.zeros_like(t.rest)


def _sparse_terms(t: TopK, logp: torch.Tensor, s: torch.Tensor, v: int):
    """For a chunk: sum_v q_v log p_v, the top-1 agreements and sum_v -q_v log q_v, with q the
    sparse distribution: sum_v q_v log p_v = sum_K (values - u) log p_K + u sum_v log p_v."""
    u = _uniform_rest(t, v)
    cross = ((t.values - u[:, None]) * logp.gather(1, t.indices)).sum() + (u * logp.sum(-1)).sum()
    agree = (row_argmax(s) == t.indices[:, 0]).sum()
    tiny = torch.finfo(t.values.dtype).tiny
    entropy = -(t.values * t.values.clamp_min(tiny).log()).sum() - (t.rest * u.clamp_min(tiny).log()).sum()
    return cross, agree, entropy


def row_argmax(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``x.argmax(-1)`` of a 2-D tensor, same result (first index of the maximum), computed in two
    stages: the maximum of each block of ``block`` columns (a vectorised reduction), then argmax
    over block maxima and within the winning block. On CPU, ATen's argmax is a scalar loop
    about 5x slower than amax over the same [tokens, vocab] logits; this is what top-1
    agreement costs per step.
    """
    n, v = x.shape
    nb = v // block
    if nb < 2:
        return x.argmax(-1)
    blocks = x[:, :nb * block].unflatten(1, (nb, block))
    bmax = blocks.amax(-1)                                     # [n, nb]
    bi = bmax.argmax(-1)                                       # first block holding the maximum
    rows = torch.arange(n, device=x.device)
    idx = bi * block + blocks[rows, bi].argmax(-1)
    if nb * block < v:                                         # the columns after the last full block
        tail_max, tail_idx = x[:, nb * block:].max(-1)
        idx = torch.where(tail_max > bmax[rows, bi], tail_idx + nb * block, idx)
    return idx


def codistill_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor | None = None,
                   alpha: float = 1.0, temperature: float = 1.0, label_smoothing: float = 0.0,
                   chunk_tokens: int = 4096) -> tuple[torch.Tensor, LossStats]:
    """Mean over tokens of CE(y, p) + alpha * psi(q, p).

    logits: [..., V] student logits; targets: [...] token ids; teacher_probs: [..., V] the
    averaged teacher distribution (at ``temperature``), the same kept sparse (``TopK``: the loss
    and its gradient use the sparse form, no [..., V] teacher tensor), or None for plain CE. Returns the loss
    (differentiable w.r.t. logits only) and detached statistics, both on the logits' device:
    nothing here waits for the device.
    """
    v = logits.shape[-1]
    if isinstance(teacher_probs, TopK):
        q = teacher_probs.flat()
    else:
        q = None if teacher_probs is None else teacher_probs.reshape(-1, v)
    loss, stats = _CodistillLoss.apply(logits.reshape(-1, v), targets.reshape(-1), q, float(alpha),
                                       float(temperature), float(label_smoothing), int(chunk_tokens))
    return loss, LossStats(stats)


def distill_alpha(step: int, distill_weight: float, burn_in_steps: int, ramp_steps: int = 0) -> float:
    """alpha at (1-based) ``step``: 0 during burn-in, then an optional linear ramp to the weight."""
    if distill_weight == 0 or step <= burn_in_steps:
        return 0.0
    if ramp_steps > 0:
        return distill_weight * min(1.0, (step - burn_in_steps) / ramp_steps)
    return distill_weight


