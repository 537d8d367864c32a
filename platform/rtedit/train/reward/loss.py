"""Losses of the reward model: Bradley-Terry with ties for training it, reward_loss for training a generator with it.

Bradley-Terry with ties (Rao-Kupper, the form TIGER's EditReward trainer uses with k = exp(tie_margin)): for the
model's logit d = logit P(A better than B) and margin m >= 0,

    P(A wins) = sigmoid(d - m),   P(B wins) = sigmoid(-d - m),   P(tie) = 1 - P(A wins) - P(B wins)
              = (e^{2m} - 1) sigmoid(d - m) sigmoid(-d - m).

The loss is the mean negative log-likelihood of the labels. With m = 0 a tie has no probability of its own: it is
then trained as half a win for each side (-0.5 log sigmoid(d) - 0.5 log sigmoid(-d)). Rows whose label is not
A/B/tie, or whose logit is not finite, are left out of the mean and counted in `LossStats.bad` by reason, never
dropped silently.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LABEL_IDS = {"A": 0, "B": 1, "tie": 2}
BAD_LABEL = -1


def label_ids(labels: Sequence[str]) -> torch.Tensor:
    """'A' / 'B' / 'tie' -> 0 / 1 / 2; anything else -> -1 (a bad row the loss counts)."""
    return torch.tensor([LABEL_IDS.get(label, BAD_LABEL) if isinstance(label, str) else BAD_LABEL
                         for label in labels], dtype=torch.long)


@dataclass
class LossStats:
    rows: int = 0
    used: int = 0
    bad: Counter = field(default_factory=Counter)
    accuracy: float = float("nan")
    """Share of used non-tied rows whose logit has the label's sign."""

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())


def outcome_log_probs(logits: torch.Tensor, tie_margin: float) -> torch.Tensor:
    """(N, 3) log P(A wins), log P(B wins), log P(tie) of the Rao-Kupper model (tie -inf when the margin is 0)."""
    d = logits.double() if logits.dtype == torch.float64 else logits.float()
    log_a, log_b = F.logsigmoid(d - tie_margin), F.logsigmoid(-d - tie_margin)
    if tie_margin > 0:
        log_tie = math.log(math.expm1(2 * tie_margin)) + log_a + log_b
    else:
        log_tie = torch.full_like(d, -math.inf)
    return torch.stack([log_a, log_b, log_tie], dim=-1)


def bt_ties_loss(logits: torch.Tensor, labels: torch.Tensor, tie_margin: float = math.log(5.0)
                 ) -> tuple[torch.Tensor, LossStats]:
    """Mean negative log-likelihood of labels (0 A, 1 B, 2 tie) under Bradley-Terry with ties; bad rows counted."""
    if tie_margin < 0 or not math.isfinite(tie_margin):
        raise ValueError(f"tie_margin must be a finite number >= 0, got {tie_margin}")
    if logits.ndim != 1 or labels.shape != logits.shape:
        raise ValueError(f"logits and labels must both be (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    labels = labels.to(logits.device)
    stats = LossStats(rows=int(labels.numel()))
    bad_label = (labels < 0) | (labels > 2)
    bad_logit = ~torch.isfinite(logits.detach()) & ~bad_label
    stats.bad.update({"bad_label": int(bad_label.sum()), "non_finite_logit": int(bad_logit.sum())})
    stats.bad = Counter({k: v for k, v in stats.bad.items() if v})
    keep = ~(bad_label | bad_logit)
    stats.used = int(keep.sum())
    if stats.used == 0:
        return logits.sum() * 0.0 if torch.isfinite(logits).all() else torch.zeros((), device=logits.device), stats
    d, y = logits[keep], labels[keep]
    if tie_margin > 0:
        nll = -outcome_log_probs(d, tie_margin).gather(1, y.unsqueeze(1)).squeeze(1)
    else:
        nll = torch.where(y == 0, -F.logsigmoid(d), torch.where(y == 1, -F.logsigmoid(-d),
                                                               -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))))
    decided = y < 2
    if decided.any():
        right = ((d.detach() > 0) == (y == 0))[decided]
        stats.accuracy = float(right.float().mean())
    return nll.mean(), stats


def reward_loss(model, candidates: torch.Tensor, sources: torch.Tensor, instructions: Sequence[str],
                baselines: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-log P(candidate is a better edit than its baseline), differentiable in `candidates` (pixels in [0, 1]).

    For DMDR: the generator's decoded edits are the candidates, the baseline is the source or a detached copy of
    the generator's starting edit (never the exact target). The model may sit on another device and dtype: the
    inputs go there and the loss comes back to the candidates' device as float32. `model` is an EditReward (or
    a DeepSpeed engine wrapping one), pairwise or pointwise.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if candidates.ndim != 4 or candidates.shape[1] != 3:
        raise ValueError(f"candidates must be (B, 3, H, W) pixels in [0, 1], got {tuple(candidates.shape)}")
    device = next(model.parameters()).device
    home = candidates.device
    logits = model(sources.to(device), list(instructions), candidates.to(device), baselines.detach().to(device))
    losses = -F.logsigmoid(logits.float()).to(home)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


__all__ = ["BAD_LABEL", "LABEL_IDS", "LossStats", "bt_ties_loss", "label_ids", "outcome_log_probs", "reward_loss"]
