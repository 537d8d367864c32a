"""Parquet edit data: round trips, and bad rows counted and skipped instead of crashing a reader."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rtedit.errors import InvalidImage
from rtedit.train import data


def _png(value: int, size: int = 8) -> bytes:
    return data.encode_png(np.full((size, size, 3), value, np.uint8))


def _edit(i: int, **overrides) -> dict:
    example = data.EditExample(id=f"e{i}", source=_png(i), instruction=f"make it {i}", family="brighten",
                               target=_png(i + 1), attributes={"amount": i}, references=[_png(7)],
                               split="train" if i % 2 else "eval")
    row = example.to_row()
    row.update(overrides)
    return row


def test_edit_round_trip_keeps_every_field(tmp_path):
    examples = [data.EditExample(id=f"e{i}", source=_png(i), instruction="invert it", family="invert",
                                 target=_png(255 - i), attributes={"k": i}, references=[_png(1), _png(2)] * (i % 2),
                                 split="train") for i in range(5)]
    files = data.write_edit_examples(tmp_path / "d", examples, rows_per_file=2)
    assert len(files) == 3
    assert pq.read_schema(files[0]).remove_metadata() == data.EDIT_SCHEMA.remove_metadata()
    back, report = data.read_edit_examples(tmp_path / "d")
    assert back == examples
    assert report.as_dict()["bad"] == 0 and report.valid == 5
    np.testing.assert_array_equal(data.decode_rgb(back[3].target), np.full((8, 8, 3), 252, np.uint8))


def test_edit_reader_counts_and_skips_bad_rows(tmp_path):
    good = [_edit(i) for i in range(4)]
    bad = [
        _edit(10, source=b"not an image"),
        _edit(11, target=_png(3)[:20]),  # truncated PNG
        _edit(12, references=[b"\x89PNG broken"]),
        _edit(13, instruction="   "),
        _edit(14, attributes="{not json"),
        _edit(15, split="test"),
    ]
    rows = good[:2] + bad + good[2:]
    data.write_edit_examples(tmp_path / "d", rows)
    # A row with a null field cannot be written with the non-null schema, so append one through a nullable schema.
    nullable = pa.schema([f.with_nullable(True) for f in data.EDIT_SCHEMA])
    pq.write_table(pa.Table.from_pylist([_edit(16, target=None)], schema=nullable), tmp_path / "d" / "z.parquet")
    examples, report = data.read_edit_examples(tmp_path / "d")
    assert [e.id for e in examples] == ["e0", "e1", "e2", "e3"]
    assert report.total == 11 and report.valid == 4 and report.num_bad == 7
    assert report.bad == {"undecodable:source": 1, "undecodable:target": 1, "undecodable:references": 1,
                          "empty:instruction": 1, "bad_attributes": 1, "bad_split": 1, "missing:target": 1}
    assert report.bad_ids == ["e10", "e11", "e12", "e13", "e14", "e15", "e16"]


def test_split_filter_and_unreadable_file(tmp_path):
    data.write_edit_examples(tmp_path / "d", [_edit(i) for i in range(6)])
    (tmp_path / "d" / "part-99999.parquet").write_bytes(b"garbage")
    train, report = data.read_edit_examples(tmp_path / "d", split="train")
    assert sorted(e.id for e in train) == ["e1", "e3", "e5"]
    assert report.bad == {"unreadable_file": 1}


def test_preference_pairs_round_trip_and_bad_labels(tmp_path):
    pairs = [data.PreferencePair(id=f"p{i}", source=_png(i), instruction="add a red circle",
                                 candidate_a=_png(1), candidate_b=_png(2), label=label)
             for i, label in enumerate(data.LABELS)]
    bad = [data.PreferencePair(id="p9", source=_png(0), instruction="x", candidate_a=_png(1),
                               candidate_b=_png(2), label="C"),
           data.PreferencePair(id="p8", source=_png(0), instruction="x", candidate_a=b"",
                               candidate_b=_png(2), label="A")]
    data.write_preference_pairs(tmp_path / "p", pairs + bad)
    back, report = data.read_preference_pairs(tmp_path / "p")
    assert back == pairs
    assert report.bad == {"bad_label": 1, "undecodable:candidate_a": 1}


def test_clean_batch_takes_ray_data_columns():
    rows = [_edit(0), _edit(1, source=b"x"), _edit(2)]
    batch = {name: np.array([r[name] for r in rows], dtype=object) for name in data.EDIT_SCHEMA.names}
    kept, report = data.clean_edit_batch(batch)
    assert kept["id"] == ["e0", "e2"]
    assert json.loads(kept["attributes"][1]) == {"amount": 2}
    assert report.bad == {"undecodable:source": 1}


def test_decode_rgb_rejects_non_images():
    with pytest.raises(InvalidImage):
        data.decode_rgb(b"")
    with pytest.raises(InvalidImage):
        data.decode_rgb(b"GIF89a junk")
    with pytest.raises(InvalidImage):
        data.encode_png(np.zeros((4, 4), np.uint8))
