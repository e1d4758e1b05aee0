"""Evaluation metrics on predicted distributions: perplexity (token and word level), ensembles
and prediction churn between two models (Anil et al., 2018, section on reproducibility).

All functions take LOG-probabilities ``[..., V]`` (``log_probs(logits)``) and integer targets
``[...]`` and return SUMS over tokens (as Python floats / ints), so that a split evaluated in
batches is reduced exactly by adding the batch sums and dividing once at the end
(``Totals``). Natural logarithms (nats) throughout.

Definitions (per evaluated token t with true next token y_t, models a and b):
- NLL: -log p(y_t); token perplexity = exp(sum NLL / number of tokens).
- word perplexity = exp(sum NLL / number of words), words counted by ``count_words``.
- ensemble: p_ens = mean_i p_i (average of probabilities, not of logits), then NLL of p_ens.
- churn, mean absolute difference: |p_a(y_t) - p_b(y_t)| averaged over tokens - the paper's
  prediction churn, restricted to the probability of the true next token.
- top-1 disagreement: fraction of tokens where argmax p_a != argmax p_b.
- symmetric KL: (KL(p_a || p_b) + KL(p_b || p_a)) / 2 in nats, averaged over tokens
  (the MEAN of the two directions, not their sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over tokens of -log p(target)."""
    return -logp.gather(-1, targets.unsqueeze(-1)).sum().item()


def ensemble_log_probs(logps: list[torch.Tensor]) -> torch.Tensor:
    """log of the average of the members' probabilities: logsumexp_i(log p_i) - log n."""
    if not logps:
        raise ValueError("an ensemble needs at least one member")
    if len(logps) == 1:
        return logps[0]
    return torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))


def churn_sums(logp_a: torch.Tensor, logp_b: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sums over tokens of |p_a(y) - p_b(y)|, [argmax a != argmax b] and the symmetric KL."""
    pa_y = logp_a.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
    pb_y = logp_b.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
    pa, pb = logp_a.exp(), logp_b.exp()
    # KL(a||b) + KL(b||a) = sum_v (p_a - p_b)(log p_a - log p_b); clamp removes -inf * 0 issues
    sym = ((pa - pb) * (logp_a.clamp_min(-1e4) - logp_b.clamp_min(-1e4))).sum(-1) / 2
    return {"abs_diff": (pa_y - pb_y).abs().sum().item(),
            "top1_disagree": (logp_a.argmax(-1) != logp_b.argmax(-1)).sum().item(),
            "sym_kl": sym.sum().item()}


def ppl(nll_total: float, count: int) -> float:
    """exp(total NLL / count); count is tokens for token perplexity, words for word perplexity."""
    if count <= 0:
        raise ValueError("perplexity of zero tokens/words is undefined")
    return math.exp(min(nll_total / count, 700.0))


def count_words(texts) -> int:
    """Number of whitespace-separated words (Python's str.split(): runs of any whitespace
    separate words; leading/trailing whitespace adds nothing) summed over ``texts``."""
    return sum(len(t.split()) for t in texts)


def split_docs(tokens, eos_id: int) -> list[list[int]]:
    """Cut a token sequence at EOS ids (EOS dropped); a piece without a final EOS is kept."""
    docs, cur = [], []
    for t in tokens:
        t = int(t)
        if t == eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        docs.append(cur)
    return docs


def count_words_in_tokens(tokens, eos_id: int, decode) -> tuple[int, int]:
    """(words, eos) of a span of token ids: the span is cut at EOS, each piece decoded with
    ``decode`` (SentencePiece's decode of a list of ids) and its words counted by
    ``count_words``. ``eos`` is the number of EOS tokens in the span (document ends), for
    the convention (e.g. Penn Treebank's) that also counts each end-of-sentence as a word."""
    docs = split_docs(tokens, eos_id)
    eos = sum(1 for t in tokens if int(t) == eos_id)
    return count_words(decode(d) for d in docs if d), eos


@dataclass
class Totals:
    """Running sums for one model (or ensemble) or one pair of models."""
    tokens: int = 0
    nll: float = 0.0
    churn: dict = field(default_factory=lambda: {"abs_diff": 0.0, "top1_disagree": 0.0, "sym_kl": 0.0})

    def add_nll(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll += nll_sum(logp, targets)
        self.tokens += targets.numel()

    def add_churn(self, logp_a: torch.Tensor, logp_b: torch.Tensor, targets: torch.Tensor) -> None:
        for k, v in churn_sums(logp_a, logp_b, targets).items():
            self.churn[k] += v
        self.tokens += targets.numel()

    def model_metrics(self, words: int | None = None) -> dict:
        out = {"loss": self.nll / self.tokens, "ppl": ppl(self.nll, self.tokens), "tokens": self.tokens}
        if words:
            out["word_ppl"] = ppl(self.nll, words)
        return out

    def churn_metrics(self) -> dict:
        n = self.tokens
        return {"mean_abs_p_diff": self.churn["abs_diff"] / n, "top1_disagreement": self.churn["top1_disagree"] / n,
                "sym_kl": self.churn["sym_kl"] / n, "tokens": n}
