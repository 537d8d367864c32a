"""Parquet datasets of instruction edits and preference pairs: schemas, writers, readers, and row validation.

A bad row (missing field, undecodable image, unknown label) is counted by reason, reported and skipped; it never
raises out of a reader, so one broken shard cannot stop a training job. The same row check runs on pyarrow tables
(`read_*`) and on the column dicts Ray Data hands to `map_batches` (`clean_edit_batch`, `clean_preference_batch`).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rtedit.errors import InvalidImage

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval")
LABELS = ("A", "B", "tie")
# Decoding bombs: a training image larger than this is a data bug, not a photo we want.
MAX_IMAGE_PIXELS = 4096 * 4096

EDIT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.binary(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        # JSON object of the edit's parameters ({"shape": "circle", "colour": "red"}); a string keeps the schema fixed.
        pa.field("attributes", pa.string(), nullable=False),
        pa.field("references", pa.list_(pa.binary()), nullable=False),
        pa.field("target", pa.binary(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ],
    metadata={b"rtedit.kind": b"edit", b"rtedit.version": b"1"},
)

PREFERENCE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.binary(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("candidate_a", pa.binary(), nullable=False),
        pa.field("candidate_b", pa.binary(), nullable=False),
        # "A" or "B" names the preferred candidate; "tie" says neither is better.
        pa.field("label", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ],
    metadata={b"rtedit.kind": b"preference", b"rtedit.version": b"1"},
)


@dataclass
class EditExample:
    """One instruction edit; images are encoded bytes (PNG for exact targets)."""

    id: str
    source: bytes
    instruction: str
    family: str
    target: bytes
    attributes: dict[str, Any] = field(default_factory=dict)
    references: list[bytes] = field(default_factory=list)
    split: str = "train"

    def to_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in EDIT_SCHEMA.names}
        row["attributes"] = json.dumps(self.attributes, sort_keys=True)
        row["references"] = list(self.references)
        return row


@dataclass
class PreferencePair:
    """Two candidate edits of one source under one instruction, and which one a judge preferred."""

    id: str
    source: bytes
    instruction: str
    candidate_a: bytes
    candidate_b: bytes
    label: str
    split: str = "train"

    def to_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PREFERENCE_SCHEMA.names}


@dataclass
class ValidationReport:
    """Counts of rows seen, kept and skipped (by reason), with a few bad row ids for the log."""

    total: int = 0
    valid: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_ids: list[str] = field(default_factory=list)
    max_ids: int = 20

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, row_id: Any, reason: str) -> None:
        self.bad[reason] += 1
        if len(self.bad_ids) < self.max_ids:
            self.bad_ids.append(str(row_id))

    def merge(self, other: ValidationReport) -> ValidationReport:
        self.total += other.total
        self.valid += other.valid
        self.bad.update(other.bad)
        self.bad_ids.extend(other.bad_ids[: max(0, self.max_ids - len(self.bad_ids))])
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "valid": self.valid, "bad": self.num_bad, "bad_by_reason": dict(self.bad),
                "bad_ids": list(self.bad_ids)}

    def log(self, what: str) -> None:
        if self.num_bad:
            logger.warning("%s: skipped %d of %d rows: %s (first ids %s)", what, self.num_bad, self.total,
                           dict(self.bad), self.bad_ids[:5])
        else:
            logger.info("%s: %d rows, all valid", what, self.total)


# ---------------------------------------------------------------------------------------------------------------
# Images


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 HxWx3 array; raises InvalidImage for anything that is not a sane image."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise InvalidImage("image bytes are empty or not bytes")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InvalidImage(f"image of {im.width}x{im.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except InvalidImage:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise InvalidImage(f"undecodable image: {type(exc).__name__}: {exc}") from exc


def encode_png(array: np.ndarray) -> bytes:
    """uint8 HxWx3 array -> PNG bytes (lossless, so toy targets stay exact)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidImage(f"expected uint8 HxWx3, got {array.dtype} {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Row checks: each returns None for a good row or a short reason string for a bad one.


def _missing(row: Mapping[str, Any], names: Iterable[str]) -> str | None:
    for name in names:
        if name not in row or row[name] is None:
            return f"missing:{name}"
    return None


def _check_text(row: Mapping[str, Any], name: str) -> str | None:
    value = row[name]
    if not isinstance(value, str) or not value.strip():
        return f"empty:{name}"
    return None


def _check_split(row: Mapping[str, Any]) -> str | None:
    return None if row["split"] in SPLITS else "bad_split"


def check_edit_row(row: Mapping[str, Any], decode: bool = True) -> str | None:
    """Why this edit row is unusable, or None. With decode, every image must decode."""
    reason = _missing(row, EDIT_SCHEMA.names)
    reason = reason or _check_text(row, "instruction") or _check_text(row, "family") or _check_split(row)
    if reason:
        return reason
    try:
        attributes = json.loads(row["attributes"])
    except (TypeError, ValueError):
        return "bad_attributes"
    if not isinstance(attributes, dict):
        return "bad_attributes"
    if not isinstance(row["references"], (list, tuple)) or any(r is None for r in row["references"]):
        return "bad_references"
    if decode:
        for name, images in (("source", [row["source"]]), ("target", [row["target"]]),
                             ("references", list(row["references"]))):
            for data in images:
                try:
                    decode_rgb(data)
                except InvalidImage:
                    return f"undecodable:{name}"
    return None


def check_preference_row(row: Mapping[str, Any], decode: bool = True) -> str | None:
    """Why this preference row is unusable, or None."""
    reason = _missing(row, PREFERENCE_SCHEMA.names)
    reason = reason or _check_text(row, "instruction") or _check_split(row)
    if reason:
        return reason
    if row["label"] not in LABELS:
        return "bad_label"
    if decode:
        for name in ("source", "candidate_a", "candidate_b"):
            try:
                decode_rgb(row[name])
            except InvalidImage:
                return f"undecodable:{name}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Writers


def write_rows(path: str | Path, rows: Iterable[Mapping[str, Any]], schema: pa.Schema, rows_per_file: int,
                rows_per_group: int = 256, first_part: int = 0) -> list[Path]:
    """Write rows as part-NNNNN.parquet files (numbered from first_part) in a folder; returns the files written."""
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    chunk: list[Mapping[str, Any]] = []

    def flush() -> None:
        if not chunk:
            return
        file = folder / f"part-{first_part + len(files):05d}.parquet"
        table = pa.Table.from_pylist(list(chunk), schema=schema)
        pq.write_table(table, file, row_group_size=rows_per_group, compression="zstd")
        files.append(file)
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= rows_per_file:
            flush()
    flush()
    return files


def write_edit_examples(path: str | Path, examples: Iterable[EditExample | Mapping[str, Any]],
                        rows_per_file: int = 4096, first_part: int = 0) -> list[Path]:
    """Write edit examples (dataclasses or row dicts) into a folder of Parquet files with EDIT_SCHEMA.

    first_part numbers the first file, so parallel writers of one folder never collide."""
    rows = (e.to_row() if isinstance(e, EditExample) else e for e in examples)
    return write_rows(path, rows, EDIT_SCHEMA, rows_per_file, first_part=first_part)


def write_preference_pairs(path: str | Path, pairs: Iterable[PreferencePair | Mapping[str, Any]],
                           rows_per_file: int = 4096) -> list[Path]:
    """Write preference pairs into a folder of Parquet files with PREFERENCE_SCHEMA."""
    rows = (p.to_row() if isinstance(p, PreferencePair) else p for p in pairs)
    return write_rows(path, rows, PREFERENCE_SCHEMA, rows_per_file)


# ---------------------------------------------------------------------------------------------------------------
# Readers


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or every *.parquet under a folder (sorted, so reads are deterministic)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no Parquet data at {path}")
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no *.parquet files under {path}")
    return files


def _iter_rows(path: str | Path, names: list[str], report: ValidationReport) -> Iterator[dict[str, Any]]:
    for file in parquet_files(path):
        try:
            parquet = pq.ParquetFile(file)
        except Exception as exc:  # a truncated or foreign file is one bad file, not a crash
            logger.warning("unreadable Parquet file %s: %s", file, exc)
            report.total += 1
            report.add_bad(file.name, "unreadable_file")
            continue
        present = [n for n in names if n in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(columns=present, batch_size=256):
            yield from batch.to_pylist()


def _read(path: str | Path, names: list[str], check, split: str | None, decode: bool,
          what: str) -> tuple[list[dict[str, Any]], ValidationReport]:
    report = ValidationReport()
    rows = []
    for row in _iter_rows(path, names, report):
        report.total += 1
        reason = check(row, decode=decode)
        if reason is not None:
            report.add_bad(row.get("id"), reason)
            continue
        report.valid += 1
        if split is None or row["split"] == split:
            rows.append(row)
    report.log(f"{what} {path}")
    return rows, report


def read_edit_examples(path: str | Path, split: str | None = None,
                       decode: bool = True) -> tuple[list[EditExample], ValidationReport]:
    """Valid edit examples under path (optionally one split) and the report of rows skipped."""
    rows, report = _read(path, EDIT_SCHEMA.names, check_edit_row, split, decode, "edit examples")
    examples = [EditExample(**{**row, "attributes": json.loads(row["attributes"]),
                               "references": list(row["references"])}) for row in rows]
    return examples, report


def read_preference_pairs(path: str | Path, split: str | None = None,
                          decode: bool = True) -> tuple[list[PreferencePair], ValidationReport]:
    """Valid preference pairs under path (optionally one split) and the report of rows skipped."""
    rows, report = _read(path, PREFERENCE_SCHEMA.names, check_preference_row, split, decode, "preference pairs")
    return [PreferencePair(**row) for row in rows], report


# ---------------------------------------------------------------------------------------------------------------
# Column batches (Ray Data's map_batches hands dicts of numpy columns)


def _clean_batch(batch: Mapping[str, Any], names: list[str], check,
                 decode: bool) -> tuple[dict[str, list[Any]], ValidationReport]:
    report = ValidationReport()
    present = [n for n in names if n in batch]
    size = len(batch[present[0]]) if present else 0
    keep: dict[str, list[Any]] = {n: [] for n in present}
    for i in range(size):
        row = {n: _plain(batch[n][i]) for n in present}
        report.total += 1
        reason = check(row, decode=decode)
        if reason is not None:
            report.add_bad(row.get("id"), reason)
            continue
        report.valid += 1
        for n in present:
            keep[n].append(row[n])
    return keep, report


def _plain(value: Any) -> Any:
    """numpy scalars/arrays from Ray Data columns -> the Python values the row checks expect."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def clean_edit_batch(batch: Mapping[str, Any], decode: bool = True) -> tuple[dict[str, list[Any]], ValidationReport]:
    """Keep the valid rows of a column batch of edit examples; returns (columns, report)."""
    return _clean_batch(batch, EDIT_SCHEMA.names, check_edit_row, decode)


def clean_preference_batch(batch: Mapping[str, Any],
                           decode: bool = True) -> tuple[dict[str, list[Any]], ValidationReport]:
    """Keep the valid rows of a column batch of preference pairs; returns (columns, report)."""
    return _clean_batch(batch, PREFERENCE_SCHEMA.names, check_preference_row, decode)


def clean_table(table: pa.Table, kind: str = "edit", decode: bool = True) -> tuple[pa.Table, ValidationReport]:
    """Keep the valid rows of a pyarrow table (Ray Data's batch_format="pyarrow"); kind is "edit" or "preference"."""
    if kind not in ("edit", "preference"):
        raise ValueError(f"kind must be 'edit' or 'preference', got {kind!r}")
    check = check_edit_row if kind == "edit" else check_preference_row
    report = ValidationReport()
    keep = []
    for i, row in enumerate(table.to_pylist()):
        report.total += 1
        reason = check(row, decode=decode)
        if reason is not None:
            report.add_bad(row.get("id"), reason)
        else:
            report.valid += 1
            keep.append(i)
    return table.take(pa.array(keep, pa.int64())), report
