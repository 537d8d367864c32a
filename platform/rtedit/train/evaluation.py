"""Scoring edits against exact targets: PSNR, SSIM, instruction accuracy, the behavioural tests (copy-paste,
structure transfer, controllability, the reference family) made measurable, and a PNG grid for a person to look at."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rtedit.train import toy

# The behavioural tests' families: "leave it unchanged" must return the source; a recolour must keep the edges.
COPY_PASTE_FAMILY = "identity"
STRUCTURE_FAMILY = "recolour"
# A copy-paste output at or above this PSNR against its source counts as a copy (30 dB: rms error ~3 of 255 levels).
COPY_PASTE_THRESHOLD_DB = 30.0
# Edge pixels: some channel's Sobel response, scaled so a step of height h reads h, above 0.1 (a step of ~26 of 255
# levels). The toy's gradient backgrounds read ~0.01 a pixel, so only shape and stripe/checker borders are edges.
EDGE_THRESHOLD = 0.1
# An edge pixel matches one of the other map within this many pixels (Chebyshev distance): one pixel of slack.
EDGE_TOLERANCE_PX = 1


def psnr(output: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB of float images in [0, 1] (capped at 100 dB for identical images)."""
    mse = float(np.mean((output.astype(np.float64) - target.astype(np.float64)) ** 2))
    return 100.0 if mse <= 1e-10 else float(10 * np.log10(1.0 / mse))


def ssim(output: np.ndarray, target: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(output, target, channel_axis=2, data_range=1.0))


def alternative_targets(source: np.ndarray, own_target: np.ndarray) -> list[np.ndarray]:
    """Targets of the other global instructions on the same source (those equal to the own target left out)."""
    alternatives = []
    for family in toy.GLOBAL_FAMILIES:
        for attributes in ([{"direction": d} for d in toy.DIRECTIONS] if family == "rotate90" else [{}]):
            alt = toy.apply_global(family, source, attributes)
            if alt.shape == own_target.shape and not np.array_equal(alt, own_target):
                alternatives.append(alt.astype(np.float32) / 255.0)
    return alternatives


def closest_to_own(output: np.ndarray, own: np.ndarray, alternatives: Sequence[np.ndarray]) -> bool:
    own_mse = float(np.mean((output - own) ** 2))
    return all(own_mse < float(np.mean((output - alt) ** 2)) for alt in alternatives)


def sobel_magnitude(image: np.ndarray) -> np.ndarray:
    """HxW edge strength of an HxWx3 float image in [0, 1]: the largest per-channel Sobel gradient magnitude, divided
    by 4 so a step of height h reads h on the pixels beside it. Per channel, not on luma: a red shape on a grey of the
    same luma still has an edge. Borders are replicated, so the frame itself is no edge."""
    x = np.pad(np.asarray(image, np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[0] - 2, x.shape[1] - 2
    at = lambda dy, dx: x[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return np.sqrt(gx * gx + gy * gy).max(axis=2) / 4.0


def edge_map(image: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Boolean HxW map of the pixels whose Sobel strength (sobel_magnitude) exceeds `threshold`."""
    return sobel_magnitude(image) > threshold


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2 radius + 1) square: every pixel within `radius` (Chebyshev) of a True pixel."""
    if radius <= 0:
        return mask.copy()
    padded = np.pad(mask, radius)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def edge_f1(output: np.ndarray, target: np.ndarray, threshold: float = EDGE_THRESHOLD,
            tolerance: int = EDGE_TOLERANCE_PX) -> float:
    """F1 of the output's edge map against the target's: precision is the share of output edge pixels within
    `tolerance` pixels of a target edge, recall the share of target edge pixels within `tolerance` of an output
    edge. Two maps without edges agree (1.0); one empty map against a non-empty one scores 0."""
    if output.shape != target.shape:
        raise ValueError(f"output {output.shape} and target {target.shape} differ in shape")
    predicted, truth = edge_map(output, threshold), edge_map(target, threshold)
    if not predicted.any() and not truth.any():
        return 1.0
    if not predicted.any() or not truth.any():
        return 0.0
    precision = float((predicted & _dilate(truth, tolerance)).sum() / predicted.sum())
    recall = float((truth & _dilate(predicted, tolerance)).sum() / truth.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def share_at_least(values: Sequence[float], threshold: float) -> float | None:
    """The share of values >= threshold; None for no values."""
    return float(np.mean([v >= threshold for v in values])) if len(values) else None


@dataclass
class Scores:
    """Per-family lists of per-image scores; summary() averages them."""

    rows: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def add(self, family: str, **values: float) -> None:
        for key, value in values.items():
            self.rows[family][key].append(float(value))

    @staticmethod
    def _mean(groups: list[dict[str, list[float]]]) -> dict[str, float]:
        keys = sorted({k for g in groups for k in g})
        out: dict[str, float] = {"n": sum(len(next(iter(g.values()), [])) for g in groups)}
        for key in keys:
            values = [v for g in groups for v in g.get(key, [])]
            out[key] = float(np.mean(values)) if values else float("nan")
        return out

    def summary(self) -> dict[str, Any]:
        families = {f: self._mean([self.rows[f]]) for f in sorted(self.rows)}
        pick = lambda names: [self.rows[f] for f in self.rows if f in names]
        return {
            "overall": self._mean(list(self.rows.values())),
            "global": self._mean(pick(toy.GLOBAL_FAMILIES)),
            "local": self._mean(pick(toy.LOCAL_FAMILIES)),
            "reference": self._mean(pick(toy.REFERENCE_FAMILIES)),
            "families": families,
        }


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def behaviour(summary: dict[str, Any], source_psnrs: Sequence[float], edge_f1s: Sequence[float],
              copy_paste_threshold_db: float = COPY_PASTE_THRESHOLD_DB) -> dict[str, Any]:
    """The behavioural tests from a Scores.summary() and the per-example copy-paste PSNRs (output against source on
    COPY_PASTE_FAMILY) and edge F1s (on STRUCTURE_FAMILY). A value no example measured is None, never NaN (JSON)."""
    families = summary["families"]
    group = lambda name, key: summary[name].get(key) if summary[name]["n"] else None
    return {
        "copy_paste": {"family": COPY_PASTE_FAMILY, "n": len(source_psnrs),
                       "psnr_vs_source": _mean_or_none(source_psnrs), "threshold_db": copy_paste_threshold_db,
                       "share_above_threshold": share_at_least(source_psnrs, copy_paste_threshold_db)},
        "structure_transfer": {"family": STRUCTURE_FAMILY, "n": len(edge_f1s), "edge_f1": _mean_or_none(edge_f1s),
                               "edge_threshold": EDGE_THRESHOLD, "tolerance_px": EDGE_TOLERANCE_PX},
        "controllability": {"instruction_accuracy": group("overall", "instruction_accuracy"),
                            "by_family": {f: v.get("instruction_accuracy") for f, v in families.items()}},
        "reference": {"families": list(toy.REFERENCE_FAMILIES), "n": summary["reference"]["n"],
                      "psnr": group("reference", "psnr"),
                      "instruction_accuracy": group("reference", "instruction_accuracy")},
        "psnr_by_group": {name: group(name, "psnr") for name in ("global", "local", "reference")},
    }


def save_grid(rows: list[list[np.ndarray]], path: str | Path, tile: int = 128, gap: int = 2) -> Path:
    """One row per example (source, reference or blank, target, output), uint8 tiles, written as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (tile + gap), cols * (tile + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            im = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
            canvas[i * (tile + gap):i * (tile + gap) + tile, j * (tile + gap):j * (tile + gap) + tile] = im
    Image.fromarray(canvas).save(path)
    return path
