"""Toy preference pairs with exact answers, their Parquet files, and the batches the reward job trains on.

For each (source, instruction) of the toy world (rtedit.train.toy), the exact edit is paired against:

- `wrong`: the edit of another instruction (another global family, or the source returned unchanged, which is
  the identity "edit");
- `partial`: the exact edit blended toward the source, (1 - s) * target + s * source with s in `partial_share`;
- `degraded`: the exact edit blurred, noised, colour-shifted or JPEG-compressed (`degradations`);
- `teacher`: the toy teacher's own output (when `jobs.make_reward_data --teacher` gives one), labelled by the rule
  in PairMix: the candidate with the higher PSNR against the exact target wins when the two differ by at least
  `teacher_margin_db` (the exact edit counts as `exact_psnr_db`), else the pair is a tie;
- `mix`: two blends of the wrong edit and the exact one, c(t) = t * target + (1 - t) * wrong, the larger t wins
  (t drawn uniformly, at least `mix_gap` apart): it tells the model that moving a wrong edit toward the exact one
  is better all the way, which is what a pixel gradient of the reward has to say;
- `tie`: two candidates equally good: the same noise strength drawn twice (PSNRs within `tie_psnr_db`), or
  the identity family's partial edit, which equals the exact one.

Which side is A is drawn at random. The eval split comes from the toy world's eval split, so it holds out source
photos and (family, attribute) combinations exactly as the editing eval does.

The files have the preference schema of rtedit.train.data (every pair file is a valid preference file that
`read_preference_pairs` reads) plus columns the evaluation needs: family, kind, detail, the example id, the exact
target and both candidates' PSNR against it. `read_reward_pairs` checks every row (the preference row check,
then the extra columns) and counts bad rows by reason in a ValidationReport.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from rtedit.errors import InvalidImage
from rtedit.train import toy
from rtedit.train.data import (PREFERENCE_SCHEMA, ValidationReport, check_preference_row, decode_rgb, encode_png,
                               parquet_files, write_rows)

logger = logging.getLogger(__name__)

KINDS = ("wrong", "partial", "degraded", "mix", "teacher", "tie")
DEGRADATIONS = ("blur", "noise", "colour", "jpeg")
REWARD_PAIR_SCHEMA = pa.schema(
    list(PREFERENCE_SCHEMA) + [
        pa.field("family", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("target", pa.binary(), nullable=False),
        pa.field("psnr_a", pa.float64(), nullable=False),
        pa.field("psnr_b", pa.float64(), nullable=False),
    ],
    metadata={b"rtedit.kind": b"preference", b"rtedit.version": b"1", b"rtedit.reward_pairs": b"1"},
)
EXTRA_COLUMNS = ("family", "kind", "detail", "example_id", "target", "psnr_a", "psnr_b")


@dataclass
class PairMix:
    """How many pairs of each kind an example gives, and the rules that label them."""

    wrong: int = 1
    partial: int = 1
    degraded: int = 1
    tie: float = 0.25
    """Chance that an example also gives a tie pair (identity examples' partial pairs are ties regardless)."""
    mix: int = 1
    """Blend pairs per example (wrong edit toward the exact one); drawn from their own random stream."""
    mix_gap: float = 0.2
    teacher: int = 1
    """Pairs per example with the teacher's output, when the data has one (exact vs teacher, teacher vs wrong)."""
    partial_share: tuple[float, float] = (0.3, 0.7)
    """The source's share in a partial edit, drawn uniformly."""
    degradations: tuple[str, ...] = DEGRADATIONS
    blur_sigma: tuple[float, float] = (1.5, 3.0)
    noise_sigma: tuple[float, float] = (0.06, 0.15)
    colour_shift: tuple[float, float] = (0.1, 0.25)
    jpeg_quality: tuple[int, int] = (5, 15)
    min_wrong_difference: float = 8.0
    """A wrong edit must differ from the exact one by this mean absolute uint8 difference (else another is drawn)."""
    teacher_margin_db: float = 3.0
    exact_psnr_db: float = 60.0
    tie_psnr_db: float = 0.5

    def validate(self) -> PairMix:
        for name in ("wrong", "partial", "degraded", "mix", "teacher"):
            if getattr(self, name) < 0:
                raise ValueError(f"mix.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.tie <= 1:
            raise ValueError(f"mix.tie must be in [0, 1], got {self.tie}")
        lo, hi = self.partial_share
        if not 0 < lo <= hi < 1:
            raise ValueError(f"mix.partial_share must satisfy 0 < lo <= hi < 1, got {self.partial_share}")
        unknown = [d for d in self.degradations if d not in DEGRADATIONS]
        if unknown or not self.degradations:
            raise ValueError(f"mix.degradations must name some of {DEGRADATIONS}, got {list(self.degradations)}")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Candidates


def psnr(a: np.ndarray, b: np.ndarray, cap: float = math.inf) -> float:
    """PSNR of two uint8 (or [0, 255] float) images in dB; identical images give `cap`."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return cap if mse == 0 else min(cap, 10 * math.log10(255.0 ** 2 / mse))


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    y = np.pad(x.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    h, w = x.shape[:2]
    y = sum(k[i] * y[i:i + h] for i in range(len(k)))  # rows, then columns: one shifted copy per tap
    y = sum(k[i] * y[:, i:i + w] for i in range(len(k)))
    return y


def degrade(target: np.ndarray, kind: str, rng: np.random.Generator, mix: PairMix) -> tuple[np.ndarray, str]:
    """A degraded copy of a uint8 image and a short description of what was done."""
    x = target.astype(np.float64)
    if kind == "blur":
        sigma = rng.uniform(*mix.blur_sigma)
        out, detail = _gaussian_blur(x, sigma), f"blur:{sigma:.2f}"
    elif kind == "noise":
        sigma = rng.uniform(*mix.noise_sigma)
        out, detail = x + rng.normal(0, 255 * sigma, x.shape), f"noise:{sigma:.3f}"
    elif kind == "colour":
        shift = rng.uniform(*mix.colour_shift) * rng.choice([-1.0, 1.0], size=3)
        out, detail = x + 255 * shift, "colour:" + ",".join(f"{s:+.2f}" for s in shift)
    elif kind == "jpeg":
        quality = int(rng.integers(mix.jpeg_quality[0], mix.jpeg_quality[1] + 1))
        buf = io.BytesIO()
        Image.fromarray(target).save(buf, format="JPEG", quality=quality)
        out, detail = decode_rgb(buf.getvalue()).astype(np.float64), f"jpeg:{quality}"
    else:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {kind!r}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), detail


def wrong_edit(example: toy.ToyExample, rng: np.random.Generator, mix: PairMix) -> tuple[np.ndarray, str]:
    """Another instruction's edit of the source (or the unchanged source), clearly different from the exact edit."""
    options = [f for f in toy.GLOBAL_FAMILIES if f != example.family]
    for _ in range(50):
        family = options[rng.integers(len(options))]
        attributes = {"direction": ("clockwise", "counterclockwise")[rng.integers(2)]} if family == "rotate90" else {}
        if example.family == "rotate90" and family == "rotate90":
            continue
        out = toy.apply_global(family, example.source, attributes)
        if np.abs(out.astype(np.int32) - example.target).mean() >= mix.min_wrong_difference:
            return out, family
    raise ValueError(f"no wrong edit of {example.id} differs from its target by {mix.min_wrong_difference}")


def partial_edit(example: toy.ToyExample, rng: np.random.Generator, mix: PairMix) -> tuple[np.ndarray, str]:
    share = rng.uniform(*mix.partial_share)
    out = (1 - share) * example.target.astype(np.float64) + share * example.source.astype(np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), f"partial:{share:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Pairs of one example


def _pair(example: toy.ToyExample, kind: str, detail: str, better: np.ndarray, worse: np.ndarray,
          rng: np.random.Generator, index: int, tie: bool = False, exact_psnr: float = 60.0) -> dict[str, Any]:
    a_first = bool(rng.integers(2))
    a, b = (better, worse) if a_first else (worse, better)
    label = "tie" if tie else ("A" if a_first else "B")
    return {"id": f"{example.id}-{index}", "source": encode_png(example.source), "instruction": example.instruction,
            "candidate_a": encode_png(a), "candidate_b": encode_png(b), "label": label, "split": example.split,
            "family": example.family, "kind": kind, "detail": detail, "example_id": example.id,
            "target": encode_png(example.target), "psnr_a": psnr(a, example.target, exact_psnr),
            "psnr_b": psnr(b, example.target, exact_psnr)}


def teacher_label(psnr_a: float, psnr_b: float, mix: PairMix) -> str:
    """The rule of teacher pairs: the higher PSNR wins by a margin of mix.teacher_margin_db, else a tie."""
    if abs(psnr_a - psnr_b) < mix.teacher_margin_db:
        return "tie"
    return "A" if psnr_a > psnr_b else "B"


def example_pairs(example: toy.ToyExample, mix: PairMix, seed: int,
                  teacher_output: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Every pair of one toy example, a pure function of (example, mix, seed, teacher output)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(hashlib.sha1(example.id.encode()).hexdigest()[:8],
                                                                   16)]))
    pairs: list[dict[str, Any]] = []
    exact = example.target
    cap = mix.exact_psnr_db
    for _ in range(mix.wrong):
        wrong, detail = wrong_edit(example, rng, mix)
        pairs.append(_pair(example, "wrong", detail, exact, wrong, rng, len(pairs), exact_psnr=cap))
    for _ in range(mix.partial):
        partial, detail = partial_edit(example, rng, mix)
        same = np.array_equal(partial, exact)  # identity: blending toward the source changes nothing
        pairs.append(_pair(example, "tie" if same else "partial", detail, exact, partial, rng, len(pairs), tie=same,
                           exact_psnr=cap))
    for _ in range(mix.degraded):
        kind = mix.degradations[rng.integers(len(mix.degradations))]
        worse, detail = degrade(exact, kind, rng, mix)
        pairs.append(_pair(example, "degraded", detail, exact, worse, rng, len(pairs), exact_psnr=cap))
    if rng.random() < mix.tie:
        sigma = rng.uniform(*mix.noise_sigma)
        for _ in range(20):  # two draws of one noise strength: equally good within tie_psnr_db
            one = np.clip(np.rint(exact + rng.normal(0, 255 * sigma, exact.shape)), 0, 255).astype(np.uint8)
            two = np.clip(np.rint(exact + rng.normal(0, 255 * sigma, exact.shape)), 0, 255).astype(np.uint8)
            if abs(psnr(one, exact) - psnr(two, exact)) < mix.tie_psnr_db:
                pairs.append(_pair(example, "tie", f"noise:{sigma:.3f}", one, two, rng, len(pairs), tie=True,
                                   exact_psnr=cap))
                break
    if teacher_output is not None:
        for i in range(mix.teacher):
            other = exact if i % 2 == 0 else wrong_edit(example, rng, mix)[0]
            name = "exact" if i % 2 == 0 else "wrong"
            row = _pair(example, "teacher", f"teacher-vs-{name}", teacher_output, other, rng, len(pairs),
                        exact_psnr=cap)
            row["label"] = teacher_label(row["psnr_a"], row["psnr_b"], mix)
            pairs.append(row)
    return pairs + mix_pairs(example, mix, seed, first_index=len(pairs))


def mix_pairs(example: toy.ToyExample, mix: PairMix, seed: int, first_index: int = 0) -> list[dict[str, Any]]:
    """The `mix` pairs of one example, from a random stream of their own (other kinds do not move with mix.mix)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(hashlib.sha1(example.id.encode()).hexdigest()[:8],
                                                                   16), 1]))
    pairs = []
    exact, cap = example.target.astype(np.float64), mix.exact_psnr_db
    for _ in range(mix.mix):
        wrong, detail = wrong_edit(example, rng, mix)
        lo = rng.uniform(0, 1 - mix.mix_gap)
        hi = rng.uniform(lo + mix.mix_gap, 1)
        blend = lambda t: np.clip(np.rint(t * exact + (1 - t) * wrong), 0, 255).astype(np.uint8)  # noqa: E731
        pairs.append(_pair(example, "mix", f"{detail}:{lo:.2f}<{hi:.2f}", blend(hi), blend(lo), rng,
                           first_index + len(pairs), exact_psnr=cap))
    return pairs


def write_reward_pairs(folder: str | Path, rows: Iterator[dict[str, Any]] | list[dict[str, Any]],
                       rows_per_file: int = 2048) -> list[Path]:
    """Pairs as part-NNNNN.parquet files of REWARD_PAIR_SCHEMA (the data module's writer)."""
    return write_rows(folder, rows, REWARD_PAIR_SCHEMA, rows_per_file)


# ---------------------------------------------------------------------------------------------------------------
# Reading, with every bad row counted


def check_reward_row(row: dict[str, Any], decode: bool = True) -> str | None:
    reason = check_preference_row(row, decode=decode)
    if reason:
        return reason
    for name in EXTRA_COLUMNS:
        if row.get(name) is None:
            return f"missing:{name}"
    if row["kind"] not in KINDS:
        return "bad_kind"
    if not all(isinstance(row[k], (int, float)) and not math.isnan(row[k]) for k in ("psnr_a", "psnr_b")):
        return "bad_psnr"
    if decode:
        try:
            target = decode_rgb(row["target"])
        except InvalidImage:
            return "undecodable:target"
        if target.shape != decode_rgb(row["candidate_a"]).shape:
            return "target_shape"
    return None


def read_reward_pairs(path: str | Path, split: str | None = None,
                      decode: bool = True) -> tuple[list[dict[str, Any]], ValidationReport]:
    """Valid reward pairs under path (optionally one split) and the report of the rows left out, by reason."""
    report = ValidationReport()
    rows = []
    names = REWARD_PAIR_SCHEMA.names
    for file in parquet_files(path):
        try:
            parquet = pq.ParquetFile(file)
        except Exception as exc:  # a truncated file is one bad file, counted, not a crash
            logger.warning("unreadable Parquet file %s: %s", file, exc)
            report.total += 1
            report.add_bad(file.name, "unreadable_file")
            continue
        present = [n for n in names if n in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(columns=present, batch_size=256):
            for row in batch.to_pylist():
                report.total += 1
                reason = check_reward_row(row, decode=decode)
                if reason:
                    report.add_bad(row.get("id"), reason)
                    continue
                report.valid += 1
                if split is None or row["split"] == split:
                    rows.append(row)
    report.log(f"reward pairs {path}")
    return rows, report


@dataclass
class PairTensors:
    """Decoded pairs: one uint8 image table (each distinct image once) and per-pair indices into it."""

    images: torch.Tensor
    """(M, 3, H, W) uint8."""
    source: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor
    """0 A, 1 B, 2 tie (rtedit.train.reward.loss.LABEL_IDS)."""
    instructions: list[str]
    families: list[str]
    kinds: list[str]
    details: list[str]
    ids: list[str]
    example_ids: list[str]
    psnr_a: torch.Tensor
    psnr_b: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """Float (B, 3, H, W) images in [0, 1] of table indices."""
        return self.images[index].float().div_(255.0)

    def subset(self, keep: Sequence[int]) -> PairTensors:
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return PairTensors(self.images, self.source[keep_t], self.a[keep_t], self.b[keep_t], self.target[keep_t],
                           self.labels[keep_t], pick(self.instructions), pick(self.families), pick(self.kinds),
                           pick(self.details), pick(self.ids), pick(self.example_ids), self.psnr_a[keep_t],
                           self.psnr_b[keep_t], self.report)


def to_tensors(rows: list[dict[str, Any]], report: ValidationReport | None = None) -> PairTensors:
    from rtedit.train.reward.loss import LABEL_IDS

    table: dict[bytes, int] = {}
    arrays: list[np.ndarray] = []

    def index(data: bytes) -> int:
        key = hashlib.blake2b(data, digest_size=16).digest()
        if key not in table:
            table[key] = len(arrays)
            arrays.append(decode_rgb(data))
        return table[key]

    cols = {name: [] for name in ("source", "candidate_a", "candidate_b", "target")}
    for row in rows:
        for name in cols:
            cols[name].append(index(row[name]))
    if not arrays:
        raise ValueError("no valid pairs to train or evaluate on")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"the reward batcher needs one image size, got {sorted(shapes)}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PairTensors(images, long(cols["source"]), long(cols["candidate_a"]), long(cols["candidate_b"]),
                       long(cols["target"]), long([LABEL_IDS[r["label"]] for r in rows]),
                       [r["instruction"] for r in rows], [r["family"] for r in rows], [r["kind"] for r in rows],
                       [r["detail"] for r in rows], [r["id"] for r in rows], [r["example_id"] for r in rows],
                       torch.tensor([r["psnr_a"] for r in rows]), torch.tensor([r["psnr_b"] for r in rows]),
                       report.as_dict() if report else {})


class PairBatcher:
    """Batch i of a worker: a pure function of (seed, rank, i), epochs of shuffled pairs without replacement."""

    def __init__(self, pairs: PairTensors, batch_size: int, seed: int, rank: int = 0,
                 kind_weights: dict[str, float] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pairs, self.batch_size, self.seed, self.rank = pairs, batch_size, seed, rank
        weights = np.array([(kind_weights or {}).get(k, 1.0) for k in pairs.kinds], dtype=np.float64)
        self.weights = weights / weights.sum()

    def indices(self, i: int) -> torch.Tensor:
        n = len(self.pairs)
        per_epoch = max(1, n // self.batch_size)
        epoch, step = divmod(i, per_epoch)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, epoch]))
        if np.allclose(self.weights, 1 / n):
            order = rng.permutation(n)
        else:  # kind weights: draws with replacement at those rates
            order = rng.choice(n, size=per_epoch * self.batch_size, p=self.weights)
        return torch.as_tensor(order[step * self.batch_size:(step + 1) * self.batch_size], dtype=torch.long)

    def __call__(self, i: int) -> dict[str, Any]:
        return batch_of(self.pairs, self.indices(i))


def batch_of(pairs: PairTensors, idx: torch.Tensor) -> dict[str, Any]:
    return {"source": pairs.pixels(pairs.source[idx]), "a": pairs.pixels(pairs.a[idx]),
            "b": pairs.pixels(pairs.b[idx]), "labels": pairs.labels[idx],
            "instructions": [pairs.instructions[i] for i in idx.tolist()],
            "kinds": [pairs.kinds[i] for i in idx.tolist()]}


def manifest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        by_kind = counts.setdefault(row["kind"], {})
        by_kind[row["label"]] = by_kind.get(row["label"], 0) + 1
    return {"pairs": len(rows), "by_kind_label": counts}


__all__ = ["DEGRADATIONS", "KINDS", "PairBatcher", "PairMix", "PairTensors", "REWARD_PAIR_SCHEMA", "batch_of",
           "check_reward_row", "degrade", "example_pairs", "manifest", "mix_pairs", "partial_edit", "psnr",
           "read_reward_pairs", "teacher_label", "to_tensors", "write_reward_pairs", "wrong_edit"]
