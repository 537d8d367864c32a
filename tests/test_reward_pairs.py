"""Toy preference pairs: every label agrees with PSNR against the exact target, ties are equally good, the eval split
holds out photos, files are valid preference files, and bad rows are counted by reason."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rtedit.train import toy
from rtedit.train.data import read_preference_pairs
from rtedit.train.reward.pairs import (KINDS, PairBatcher, PairMix, REWARD_PAIR_SCHEMA, example_pairs, psnr,
                                       read_reward_pairs, teacher_label, to_tensors, write_reward_pairs)

MIX = PairMix(mix=1, tie=1.0)


@pytest.fixture(scope="module")
def rows():
    examples = list(toy.generate(24, 0, "train")) + list(toy.generate(8, 0, "eval"))
    out = []
    for e in examples:
        teacher = np.clip(e.target.astype(int) + 9, 0, 255).astype(np.uint8) if e.family != "identity" else None
        out += example_pairs(e, MIX, 0, teacher)
    return out


def _images(row):
    from rtedit.train.data import decode_rgb

    return decode_rgb(row["candidate_a"]), decode_rgb(row["candidate_b"]), decode_rgb(row["target"])


def test_labels_agree_with_psnr_against_the_exact_target(rows):
    assert {r["kind"] for r in rows} == set(KINDS)
    for r in rows:
        a, b, target = _images(r)
        pa_, pb = psnr(a, target, 60.0), psnr(b, target, 60.0)
        assert (pa_, pb) == pytest.approx((r["psnr_a"], r["psnr_b"]))
        if r["kind"] == "teacher":
            assert r["label"] == teacher_label(pa_, pb, MIX)
        elif r["label"] == "tie":
            assert abs(pa_ - pb) < MIX.tie_psnr_db, r["detail"]
        else:
            better, worse = (pa_, pb) if r["label"] == "A" else (pb, pa_)
            assert better > worse, (r["kind"], r["detail"])
            if r["kind"] != "mix":
                assert better == 60.0  # the exact edit itself
    labels = [r["label"] for r in rows if r["label"] != "tie"]
    assert 0.3 < labels.count("A") / len(labels) < 0.7  # which side is A is drawn


def test_identity_partial_edits_are_ties_and_pairs_are_deterministic(rows):
    identity = [r for r in rows if r["family"] == "identity" and r["detail"].startswith("partial")]
    assert identity and all(r["kind"] == "tie" and r["label"] == "tie" for r in identity)
    e = toy.make_example(0, "train", 3)
    assert example_pairs(e, MIX, 0) == example_pairs(e, MIX, 0)
    assert example_pairs(e, MIX, 0) != example_pairs(e, MIX, 1)


def test_teacher_rule():
    mix = PairMix(teacher_margin_db=3.0)
    assert teacher_label(30.0, 26.0, mix) == "A" and teacher_label(20.0, 60.0, mix) == "B"
    assert teacher_label(30.0, 28.0, mix) == "tie"


def test_eval_pairs_hold_out_photos(rows):
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert eval_rows and all(r["example_id"].startswith("eval-") for r in eval_rows)
    for i in range(40):
        e = toy.make_example(0, "eval", i)
        if "photo" in e.origin:
            assert e.origin["photo"] in toy.EVAL_PHOTOS


def test_files_are_preference_files_and_bad_rows_are_counted(tmp_path, rows):
    folder = tmp_path / "pairs"
    write_reward_pairs(folder, rows[:30])
    bad = [dict(rows[0], id="broken-image", candidate_a=b"not a png"), dict(rows[1], id="bad-kind", kind="sideways"),
           dict(rows[2], id="bad-label", label="C")]
    pq.write_table(pa.Table.from_pylist(bad, schema=REWARD_PAIR_SCHEMA), folder / "part-bad.parquet")
    (folder / "part-truncated.parquet").write_bytes(b"PAR1 broken")
    base, base_report = read_preference_pairs(folder)  # the shared reader sees valid preference pairs
    assert len(base) == 31 and base_report.num_bad == 3
    good, report = read_reward_pairs(folder)
    assert len(good) == 30 and report.total == 34
    assert dict(report.bad) == {"undecodable:candidate_a": 1, "bad_kind": 1, "bad_label": 1, "unreadable_file": 1}
    tensors = to_tensors(good, report)
    assert len(tensors) == 30 and tensors.report["bad"] == 4
    assert tensors.images.shape[0] < 3 * 30  # each distinct image decoded once
    batches = PairBatcher(tensors, 8, seed=0)
    first = batches.indices(0)
    assert first.tolist() == PairBatcher(tensors, 8, seed=0).indices(0).tolist()
    epoch = np.concatenate([batches.indices(i).numpy() for i in range(3)])
    assert len(set(epoch.tolist())) == 24  # without replacement inside an epoch
    b = batches(0)
    assert b["a"].shape == (8, 3, 128, 128) and float(b["a"].max()) <= 1.0 and b["labels"].shape == (8,)


def test_accuracy_table_splits_the_degraded_kind_by_degradation():
    import torch

    from rtedit.train.reward.evaluate import accuracy_table
    from rtedit.train.reward.pairs import PairTensors

    n = 5
    zeros = torch.zeros(n, dtype=torch.long)
    pairs = PairTensors(images=torch.zeros(1, 3, 4, 4, dtype=torch.uint8), source=zeros, a=zeros, b=zeros,
                        target=zeros, labels=torch.tensor([0, 0, 1, 0, 2]), instructions=["i"] * n,
                        families=["darken"] * n, kinds=["degraded", "degraded", "degraded", "wrong", "degraded"],
                        details=["blur:2.0", "jpeg:10", "blur:1.5", "brighten", "noise:0.1"], ids=list("abcde"),
                        example_ids=list("abcde"), psnr_a=torch.zeros(n), psnr_b=torch.zeros(n))
    table = accuracy_table(torch.tensor([1.0, -1.0, -1.0, 1.0, 3.0]), pairs, tie_margin=1.0)
    assert table["accuracy/degraded"] == pytest.approx(2 / 3) and table["accuracy/wrong"] == 1.0
    assert table["accuracy/degraded/blur"] == 1.0 and table["count/degradation/blur"] == 2
    assert table["accuracy/degraded/jpeg"] == 0.0 and table["count/degradation/jpeg"] == 1
    assert "accuracy/degraded/noise" not in table  # its one pair is a tie: not decided
    assert not any(k.startswith("accuracy/degraded/brighten") for k in table)
