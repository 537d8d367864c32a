"""Scoring edits against exact targets: PSNR, SSIM, instruction accuracy, and a PNG grid for a person to look at."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rtedit.train import toy


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
        pick = lambda names: [self.rows[f] for f in self.rows if f in names]  # noqa: E731
        return {
            "overall": self._mean(list(self.rows.values())),
            "global": self._mean(pick(toy.GLOBAL_FAMILIES)),
            "local": self._mean(pick(toy.LOCAL_FAMILIES)),
            "reference": self._mean(pick(toy.REFERENCE_FAMILIES)),
            "families": families,
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
