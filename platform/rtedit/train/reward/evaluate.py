"""How good a reward model is on toy pairs with exact answers, and whether its gradient alone improves an edit.

- `accuracy_table`: held-out accuracy on non-tied pairs, per kind of wrong candidate and per family, and tie
  calibration (the model's P(tie) and |P(A) - 1/2| on tied pairs beside P(tie) on decided ones);
- `psnr_agreement`: on the toy editor's own outputs (teacher pairs), how often the model orders the two candidates
  as their PSNR against the exact target does;
- `pixel_steps`: Adam on the pixels of an edit through `reward_loss` (baseline: the detached starting edit, or the
  source), pixels clamped to [0, 1]; the PSNR against the exact target before and after, per example.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rtedit.train.reward.loss import outcome_log_probs, reward_loss
from rtedit.train.reward.pairs import PairTensors, batch_of


@torch.no_grad()
def pair_logits(model, pairs: PairTensors, batch_size: int, device) -> torch.Tensor:
    """The model's logit of every pair, in order (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        b = batch_of(pairs, torch.arange(start, min(start + batch_size, len(pairs))))
        logits = model(b["source"].to(device), b["instructions"], b["a"].to(device), b["b"].to(device))
        out.append(logits.float().cpu())
    if was_training:
        model.train()
    return torch.cat(out)


def accuracy_table(logits: torch.Tensor, pairs: PairTensors, tie_margin: float) -> dict[str, float]:
    """Accuracy on non-tied pairs, overall, per kind ("accuracy/<kind>"), per degradation of the degraded kind
    ("accuracy/degraded/<blur|noise|...>", the detail's name before its ":") and per family ("family/<name>"); ties."""
    labels = pairs.labels
    decided = labels < 2
    right = (logits > 0) == (labels == 0)
    out: dict[str, float] = {"pairs": float(len(labels)), "decided_pairs": float(decided.sum())}
    out["accuracy"] = float(right[decided].float().mean()) if decided.any() else math.nan
    degradations = [d.split(":")[0] if k == "degraded" else None for k, d in zip(pairs.kinds, pairs.details)]
    names = {"kind": "accuracy/{}", "degradation": "accuracy/degraded/{}", "family": "family/{}"}
    for group, values in (("kind", pairs.kinds), ("degradation", degradations), ("family", pairs.families)):
        for name in sorted({v for v in values if v is not None}):
            mask = torch.tensor([v == name for v in values]) & decided
            if mask.any():
                out[names[group].format(name)] = float(right[mask].float().mean())
                out[f"count/{group}/{name}"] = float(mask.sum())
    ties = labels == 2
    out["ties"] = float(ties.sum())
    if ties.any():
        out["tie/mean_abs_p_minus_half"] = float((torch.sigmoid(logits[ties]) - 0.5).abs().mean())
        if tie_margin > 0:
            out["tie/mean_p_tie"] = float(outcome_log_probs(logits[ties], tie_margin).exp()[:, 2].mean())
    if decided.any():
        out["decided/mean_abs_p_minus_half"] = float((torch.sigmoid(logits[decided]) - 0.5).abs().mean())
        if tie_margin > 0:
            out["decided/mean_p_tie"] = float(outcome_log_probs(logits[decided], tie_margin).exp()[:, 2].mean())
    return out


def psnr_agreement(logits: torch.Tensor, pairs: PairTensors, min_gap_db: float = 0.0) -> dict[str, float]:
    """Share of teacher pairs (the toy editor's outputs) the model orders as PSNR to the exact target orders them."""
    mask = torch.tensor([k == "teacher" for k in pairs.kinds])
    gap = pairs.psnr_a - pairs.psnr_b
    mask &= gap.abs() > min_gap_db
    if not mask.any():
        return {"teacher_pairs": 0.0, "psnr_agreement": math.nan}
    agree = (logits[mask] > 0) == (gap[mask] > 0)
    out = {"teacher_pairs": float(mask.sum()), "psnr_agreement": float(agree.float().mean())}
    for detail in sorted({d for d, m in zip(pairs.details, mask.tolist()) if m}):
        sub = torch.tensor([d == detail for d in pairs.details]) & mask
        out[f"psnr_agreement/{detail}"] = float(((logits[sub] > 0) == (gap[sub] > 0)).float().mean())
    return out


def image_psnr(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of float images in [0, 1], (B, 3, H, W) each (inf where equal)."""
    mse = ((x.double() - target.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


@dataclass
class PixelExamples:
    """Edits to improve: sources, instructions, starting edits and exact targets (float (B, 3, H, W) in [0, 1])."""

    sources: torch.Tensor
    instructions: list[str]
    starts: torch.Tensor
    targets: torch.Tensor
    families: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.instructions)

    def take(self, keep: Sequence[int]) -> PixelExamples:
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        return PixelExamples(self.sources[idx], [self.instructions[i] for i in keep], self.starts[idx],
                             self.targets[idx], [self.families[i] for i in keep], [self.ids[i] for i in keep])


def pixel_examples(pairs: PairTensors, kind: str = "wrong", start: str = "worse") -> PixelExamples:
    """One example per toy example id from pairs of `kind`: the worse candidate (or the better) as the start."""
    seen, keep, starts = set(), [], []
    for i, (k, ex) in enumerate(zip(pairs.kinds, pairs.example_ids)):
        if k != kind or ex in seen or pairs.labels[i] == 2:
            continue
        seen.add(ex)
        a_better = bool(pairs.labels[i] == 0)
        use_a = a_better if start == "better" else not a_better
        keep.append(i)
        starts.append(int(pairs.a[i] if use_a else pairs.b[i]))
    idx = torch.tensor(keep, dtype=torch.long)
    return PixelExamples(pairs.pixels(pairs.source[idx]), [pairs.instructions[i] for i in keep],
                         pairs.pixels(torch.tensor(starts, dtype=torch.long)), pairs.pixels(pairs.target[idx]),
                         [pairs.families[i] for i in keep], [pairs.example_ids[i] for i in keep])


def split_by_id(examples: PixelExamples, validation_share: float = 0.3) -> tuple[PixelExamples, PixelExamples]:
    """(validation, test) by a hash of each example's id, so the split never depends on order."""
    val = [i for i, e in enumerate(examples.ids) if zlib.crc32(e.encode()) % 1000 < validation_share * 1000]
    test = [i for i in range(len(examples)) if i not in set(val)]
    return examples.take(val), examples.take(test)


def pixel_steps(model, examples: PixelExamples, lr: float, steps: int = 20, baseline: str = "start",
                batch_size: int = 16, device="cpu") -> dict[str, torch.Tensor]:
    """`steps` Adam steps on each edit's pixels through reward_loss; PSNR to the exact target before and after."""
    if baseline not in ("start", "source"):
        raise ValueError(f"baseline must be 'start' (the detached starting edit) or 'source', got {baseline!r}")
    model.eval()
    before, after, finals = [], [], []
    for lo in range(0, len(examples), batch_size):
        sl = slice(lo, lo + batch_size)
        sources, starts, targets = examples.sources[sl], examples.starts[sl], examples.targets[sl]
        instructions = examples.instructions[sl]
        base = (starts if baseline == "start" else sources).detach()
        x = starts.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            reward_loss(model, x, sources, instructions, base, reduction="sum").backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        before.append(image_psnr(starts, targets))
        after.append(image_psnr(x.detach(), targets))
        finals.append(x.detach())
    before, after = torch.cat(before), torch.cat(after)
    return {"before": before, "after": after, "gain": after - before, "final": torch.cat(finals)}


def summarise_gain(result: dict[str, torch.Tensor], families: Sequence[str]) -> dict[str, float]:
    gain = result["gain"]
    out = {"examples": float(len(gain)), "mean_gain_db": float(gain.mean()), "min_gain_db": float(gain.min()),
           "mean_psnr_before_db": float(result["before"].clamp(max=99).mean()),
           "mean_psnr_after_db": float(result["after"].clamp(max=99).mean())}
    for family in sorted(set(families)):
        mask = torch.tensor([f == family for f in families])
        out[f"family/{family}"] = float(gain[mask].mean())
        out[f"count/{family}"] = float(mask.sum())
    return out


__all__ = ["PixelExamples", "accuracy_table", "image_psnr", "pair_logits", "pixel_examples", "pixel_steps",
           "psnr_agreement", "split_by_id", "summarise_gain"]
