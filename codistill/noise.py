"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A): when codistillation can pay.

B_simple = tr(Sigma) / |G|^2, with G the true gradient and Sigma the per-example gradient
covariance, is the batch (here in tokens) past which a larger batch stops cutting the number
of steps: the data-parallel limit. From the squared norms of two gradient estimates at batch
sizes b < B, E|g_b|^2 = |G|^2 + tr(Sigma)/b, so

    |G|^2       ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
    tr(Sigma)   ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)

each noisy; both are smoothed (an exponential moving average) before their ratio is taken.

``measure`` gets both from one micro-batch, beside training: the micro-batch is cut into
``parts`` pieces, the gradient of the mean next-token cross-entropy on each (b = one piece)
and their mean (B = the micro-batch) - the cost of one forward and backward pass. The
gradients are taken with respect to detached views of the module's parameters
(torch.func.functional_call), so DeepSpeed's gradient hooks and buffers never see them; memory:
one extra copy of the parameters in their own dtype (``measure``). ZeRO-3
partitions the parameters themselves, so it is not supported (the flag check says so).
"""
from __future__ import annotations

import math

import torch
from torch.func import functional_call


def estimate(g2_small: float, g2_big: float, b_small: float, b_big: float) -> tuple[float, float]:
    """(tr(Sigma), |G|^2) from the squared gradient norms at batch sizes b_small < b_big."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1 / b_small - 1 / b_big)
    return trace, g2


class NoiseScale:
    """B_simple, smoothed: EMAs of tr(Sigma) and |G|^2, then their ratio (the two EMAs share
    their weights, so the ratio needs no bias correction)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.n, self._trace, self._g2 = beta, 0, 0.0, 0.0

    def update(self, g2_small: float, g2_big: float, b_small: float, b_big: float) -> tuple[float, float]:
        """Add one measurement; returns its own (unsmoothed) (tr(Sigma), |G|^2)."""
        trace, g2 = estimate(g2_small, g2_big, b_small, b_big)
        self.n += 1
        self._trace = self.beta * self._trace + (1 - self.beta) * trace
        self._g2 = self.beta * self._g2 + (1 - self.beta) * g2
        return trace, g2

    @property
    def value(self) -> float | None:
        """The smoothed B_simple, in the units of b (None before a measurement, inf when the
        true gradient is not resolved yet: |G|^2 <= 0)."""
        if self.n == 0:
            return None
        return self._trace / self._g2 if self._g2 > 0 else math.inf


def measure(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, parts: int = 4) -> tuple[float, float, int, int]:
    """(|g_b|^2 averaged over the parts, |g_B|^2, b, B), b and B in target tokens, of the mean
    cross-entropy of ``module`` on the micro-batch (x, y) cut into ``parts`` row blocks.

    Memory: one accumulator of the parts' gradient sum, in the parameters' own dtype (P x 2 bytes
    for bf16 parameters), beside one part's activations. The parameters are detached views (no
    copy); each part's gradient reaches a parameter's accumulator as soon as backward produces
    it (a post-accumulate-grad hook), its squared norm is summed in fp32 on the device, and it is
    freed: no flat copy of all gradients ever exists. One host sync, at the end."""
    rows = x.shape[0] // parts * parts
    if rows < parts:
        raise ValueError(f"a micro-batch of {x.shape[0]} sequences cannot be cut into {parts} parts")
    params = {k: p.detach().requires_grad_(True) for k, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    acc = {k: None for k in params}
    small = torch.zeros((), dtype=torch.float32, device=x.device)

    def fold(k):
        def hook(t):
            nonlocal small
            small = small + torch.linalg.vector_norm(t.grad, dtype=torch.float32).square()
            if acc[k] is None:
                acc[k] = t.grad
            else:
                acc[k].add_(t.grad)
            t.grad = None
        return hook

    handles = [t.register_post_accumulate_grad_hook(fold(k)) for k, t in params.items()]
    try:
        for xs, ys in zip(x[:rows].chunk(parts), y[:rows].chunk(parts)):
            logits = functional_call(module, {**params, **buffers}, (xs,))
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ys.flatten()).backward()
            del logits
    finally:
        for h in handles:
            h.remove()
    big = sum((torch.linalg.vector_norm(a, dtype=torch.float32).square() for a in acc.values() if a is not None),
              torch.zeros((), dtype=torch.float32, device=x.device)) / parts**2
    tokens = ys.numel()
    return float(small) / parts, float(big), tokens, tokens * parts


def reading(batch_tokens: int, noise: float | None) -> str:
    """A sentence for the console: the batch against the noise scale. By S(B) = S_min (1 + B_noise
    / B), doubling a batch below B_noise / 4 saves more than 40 % of the steps, and one past
    1.5 B_noise less than 20 % (benchmarks/batch_scaling.py measured both within 2x of B_simple)."""
    if noise is None:
        return "noise scale: not measured yet"
    if not math.isfinite(noise) or noise <= 0:
        return "noise scale: not resolved yet (the true gradient is below the measurement's noise)"
    verdict = ("far below the limit; more data-parallel ranks still help" if batch_tokens < noise / 4 else
               "near the limit; more data-parallel ranks help less and less" if batch_tokens < 1.5 * noise else
               "past the limit; more data-parallel ranks barely help - where codistillation can pay")
    return f"batch {_k(batch_tokens)} tokens, noise scale ~ {_k(noise)} tokens: {verdict}"


def _k(n: float) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n:.0f}"
