"""An early-exit rule that recalibrates itself under drift: per-exit agreement trackers by confidence bin.

A threshold calibrated on clean data is confidently wrong under shift: the early exits' max-probability
stays high while their predictions stop agreeing with the full network's. After CALM (T. Schuster et al.,
"Confident Adaptive Language Modeling", NeurIPS 2022: pick the exit threshold so that the early
prediction is consistent with the full model's at a target rate) and BranchyNet's per-exit confidence
thresholds (S. Teerapittayanon, B. McDanel, H. T. Kung, ICPR 2016), recalibrated online instead of once:

* For every early exit k and confidence bin b (B equal bins of the prefix ensemble's max-probability
  on [0, 1]), two running averages over the samples that ran to the end: how often a sample's exit-k
  confidence fell in bin b (``seen``) and how often it did and exit k's prediction equalled the final
  one (``hits``); EMA rate ``rate``. Only a sample that ran to the end knows the final prediction.
* Exit k is open for a sample whose confidence is in bin b while the tracked agreement of all bins at
  or above b, ``sum(hits[b:]) / max(sum(seen[b:]), floor)``, is at least ``target``: the lowest
  confidence whose exits agree with the full network often enough (CALM's consistency target, with
  the estimate refreshed by the stream). The estimate counts ``PRIOR_SAMPLES`` pseudo-samples of
  disagreement, ``sum(hits[b:]) / (sum(seen[b:]) + PRIOR_SAMPLES * rate)``, so one lucky sample does not
  open a bin: it opens once enough agreeing samples sit in the tracker's window (~1/rate samples).
* Every ``explore``-th sample runs to the end whatever the rule says, so the trackers of open exits
  keep being fed (an exploration rate, as in bandit-style exit policies).

Choices left open, made here: the trackers start empty (every exit closed: the first samples run to
the end and fill them); predictions compared after the class-prior correction (what is scored).
Everything is tensor arithmetic on 0/1 indicators, so it exports as it is (no data-dependent branch).
"""
from __future__ import annotations

import torch

PRIOR_SAMPLES = 1.0  # pseudo-samples of disagreement in every agreement estimate (a pessimistic prior)


def bin_onehot(confidence: torch.Tensor, bins: int) -> torch.Tensor:
    """Confidences (E) -> one-hot of their bin (E x bins) on [0, 1] (1.0 falls in the last bin)."""
    lo = torch.arange(bins, dtype=torch.float32) / bins
    hi = torch.cat([lo[1:], torch.full((1,), 2.0)])
    c = confidence[:, None]
    return (1.0 - (c < lo).float()) * (c < hi).float()  # no GreaterOrEqual op in the exported graph


def suffix_matrix(bins: int) -> torch.Tensor:
    """B x B matrix whose product with a histogram (E x B) sums each bin with every bin above it."""
    return torch.triu(torch.ones(bins, bins)).T


def open_exits(onehot: torch.Tensor, hits: torch.Tensor, seen: torch.Tensor, suffix: torch.Tensor,
               target: float, rate: float) -> torch.Tensor:
    """1 for every early exit (E) whose sample's bin is open, else 0."""
    agreement = (hits @ suffix) / (seen @ suffix + PRIOR_SAMPLES * rate)
    return (onehot * (1.0 - (agreement < target).float())).sum(-1)


def hard_onehot(probs: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax of every row (K x C) without an ArgMax op."""
    return 1.0 - (probs < probs.amax(-1, keepdim=True)).float()


def update(hits: torch.Tensor, seen: torch.Tensor, onehot: torch.Tensor, predictions: torch.Tensor,
           ran_to_end: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The trackers after one sample: unchanged unless it ran to the end (``ran_to_end`` 0/1);
    ``predictions`` are the K prefix predictions (K x C), the last one the final."""
    hard = hard_onehot(predictions)
    agree = (hard[:-1] * hard[-1:]).sum(-1).clamp(max=1.0)[:, None]
    step = rate * ran_to_end
    return (1.0 - step) * hits + step * onehot * agree, (1.0 - step) * seen + step * onehot


def explore_now(clock: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 if this sample must run to the end else 0, the next clock); the clock counts 0..every-1."""
    if every <= 0:
        return torch.zeros(1), clock
    nxt = clock + 1.0
    return (clock == 0.0).float(), nxt - every * (1.0 - (nxt < every).float())
