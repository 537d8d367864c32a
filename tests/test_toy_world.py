"""The toy editing world: every family's target is exact, splits are disjoint, data is deterministic."""

import json

import numpy as np
import pytest

from jobs import make_toy_data
from rtedit.train import data, toy


def _examples(family: str, n: int = 6, split: str = "train", seed: int = 0):
    return [toy.make_example(seed, split, i, families=(family,)) for i in range(n)]


def _changed(e):
    return np.any(e.source != e.target, axis=2)


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_every_family_makes_valid_128px_rgb(family):
    for e in _examples(family, 4):
        assert e.family == family
        assert e.source.shape == e.target.shape == (128, 128, 3)
        assert e.source.dtype == e.target.dtype == np.uint8
        assert (len(e.references) == 1) == (family in toy.REFERENCE_FAMILIES)
        assert e.instruction and "{" not in e.instruction


def test_global_family_targets_are_exact():
    for e in _examples("grayscale"):
        x = e.source.astype(np.float64)
        luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
        assert np.all(np.abs(e.target[..., 0] - luma) <= 0.5 + 1e-9)
        assert np.all(e.target == e.target[..., :1])
    for e in _examples("invert"):
        assert np.all(e.source.astype(int) + e.target == 255)
    for e in _examples("hflip"):
        np.testing.assert_array_equal(e.target[:, ::-1], e.source)
    for e in _examples("rotate90", 10):
        back = 1 if e.attributes["direction"] == "clockwise" else -1
        np.testing.assert_array_equal(np.rot90(e.target, back), e.source)
        assert e.attributes["direction"] in e.instruction
    for e in _examples("brighten"):
        x = e.source.astype(np.float64)
        assert np.all(np.abs(e.target - (x + 0.4 * (255 - x))) <= 0.5 + 1e-9)
    for e in _examples("darken"):
        assert np.all(np.abs(e.target - 0.6 * e.source.astype(np.float64)) <= 0.5 + 1e-9)
    for e in _examples("identity"):
        np.testing.assert_array_equal(e.target, e.source)


def test_palette_family_maps_luma_quartiles_to_the_reference_bands():
    for e in _examples("palette"):
        ref = e.references[0]
        palette = ref[[0, 32, 64, 96], 0]
        np.testing.assert_array_equal(ref, np.repeat(palette, 32, axis=0)[:, None].repeat(128, axis=1))
        x = e.source.astype(np.float64)
        luma = np.floor(0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2] + 0.5).astype(int)
        np.testing.assert_array_equal(e.target, palette[luma // 64])


def test_recolour_changes_exactly_one_shape_to_the_named_colour():
    for e in _examples("recolour", 8):
        mask = _changed(e)
        assert mask.sum() > 100
        new = np.array(toy.COLOURS[e.attributes["colour"]])
        assert np.all(e.target[mask] == new)
        old = np.unique(e.source[mask], axis=0)
        assert len(old) == 1 and tuple(old[0]) in toy.COLOURS.values() and tuple(old[0]) != tuple(new)
        assert e.attributes["shape"] in e.instruction and e.attributes["colour"] in e.instruction


def test_remove_reveals_background_and_add_draws_in_the_named_cell():
    for e in _examples("remove", 8):
        mask = _changed(e)
        assert mask.sum() > 100
        old = np.unique(e.source[mask], axis=0)
        assert len(old) == 1 and tuple(old[0]) in toy.COLOURS.values()
        assert not np.any(np.all(e.target[mask] == old[0], axis=1))
        # The background is a tinted grey: channels stay within 40 of each other where the shape was.
        spread = e.target[mask].max(axis=1).astype(int) - e.target[mask].min(axis=1)
        assert spread.max() <= 40
    for e in _examples("add", 8):
        mask = _changed(e)
        assert mask.sum() > 100
        assert np.all(e.target[mask] == np.array(toy.COLOURS[e.attributes["colour"]]))
        row, col = toy.POSITIONS[e.attributes["position"]]
        ys, xs = np.nonzero(mask)
        assert row * toy.CELL <= ys.mean() < (row + 1) * toy.CELL
        assert col * toy.CELL <= xs.mean() < (col + 1) * toy.CELL


def test_splits_hold_out_photos_and_combinations():
    train = list(toy.generate(300, 5, "train"))
    evals = list(toy.generate(150, 5, "eval"))
    train_photos = {e.origin["photo"] for e in train if "photo" in e.origin}
    eval_photos = {e.origin["photo"] for e in evals if "photo" in e.origin}
    assert train_photos <= set(toy.TRAIN_PHOTOS) and len(train_photos) >= 8
    assert eval_photos and eval_photos <= set(toy.EVAL_PHOTOS)
    assert not set(toy.TRAIN_PHOTOS) & set(toy.EVAL_PHOTOS)
    assert not any(toy.is_held_out(e.family, e.attributes) for e in train)
    held = [e for e in evals if toy.is_held_out(e.family, e.attributes)]
    assert len({(e.family, json.dumps(e.attributes, sort_keys=True)) for e in held}) >= 3
    train_sources = {e.source.tobytes() for e in train}
    assert not any(e.source.tobytes() in train_sources for e in evals)


def test_wording_varies_within_each_family():
    examples = list(toy.generate(400, 2, "train"))
    for family in toy.FAMILIES:
        wordings = {e.instruction for e in examples if e.family == family}
        assert len(wordings) >= 3, family
    assert not any(" a orange" in e.instruction for e in examples)


def test_deterministic_for_a_seed_and_independent_of_n():
    a = list(toy.generate(12, 9, "train"))
    b = list(toy.generate(20, 9, "train"))[:12]
    c = list(toy.generate(12, 10, "train"))
    for x, y in zip(a, b):
        assert x.instruction == y.instruction and x.attributes == y.attributes
        np.testing.assert_array_equal(x.target, y.target)
    assert [x.source.tobytes() for x in a] != [z.source.tobytes() for z in c]


def test_cli_writes_readable_deterministic_parquet(tmp_path):
    manifest = make_toy_data.main(["--out", str(tmp_path / "a"), "--n", "40", "--seed", "4", "--eval-n", "12",
                                   "--rows-per-file", "16"])
    make_toy_data.main(["--out", str(tmp_path / "b"), "--n", "40", "--seed", "4", "--eval-n", "12"])
    train, report = data.read_edit_examples(tmp_path / "a" / "train")
    evals, eval_report = data.read_edit_examples(tmp_path / "a" / "eval")
    assert len(train) == 40 and len(evals) == 12 and report.num_bad == eval_report.num_bad == 0
    assert {e.split for e in train} == {"train"} and {e.split for e in evals} == {"eval"}
    assert manifest["splits"]["train"]["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["splits"]["eval"]["n"] == 12
    again, _ = data.read_edit_examples(tmp_path / "b" / "train")
    assert again == train
    first = toy.make_example(4, "train", 0)
    np.testing.assert_array_equal(data.decode_rgb(train[0].target), first.target)
    assert train[0].attributes["origin"] == first.origin


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        make_toy_data.parse_args(["--out", "x", "--n", "0"])
    with pytest.raises(SystemExit):
        make_toy_data.parse_args(["--out", "x", "--n", "3", "--families", "grayscale,sharpen"])
    with pytest.raises(SystemExit):
        make_toy_data.parse_args(["--out", "x", "--n", "3", "--workers", "-1"])
    with pytest.raises(SystemExit):
        make_toy_data.parse_args(["--out", "x", "--n", "3", "--rows-per-file", "0"])


def test_cli_parallel_workers_write_the_same_bytes(tmp_path):
    common = ["--n", "40", "--seed", "5", "--eval-n", "9", "--rows-per-file", "8"]
    one = make_toy_data.main(["--out", str(tmp_path / "one"), *common])
    two = make_toy_data.main(["--out", str(tmp_path / "two"), *common, "--workers", "2"])
    assert one["splits"] == two["splits"] and len(one["splits"]["train"]["files"]) == 5
    for split in ("train", "eval"):
        names = sorted(p.name for p in (tmp_path / "one" / split).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "two" / split).iterdir())
        for name in names:
            assert (tmp_path / "one" / split / name).read_bytes() == (tmp_path / "two" / split / name).read_bytes()
