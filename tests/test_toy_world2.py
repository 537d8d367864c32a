"""Toy world 2: every wording the page and a newcomer use, drawn shape styles with exact targets, world 1 unchanged."""

import numpy as np
import pytest

from jobs import make_toy_data
from rtedit.train import data, toy

W2 = 2


def _examples(family, n=12, split="train", seed=0):
    return [toy.make_example(seed, split, i, families=(family,), world=W2) for i in range(n)]


def test_world_2_words_the_pages_examples_and_the_newcomers_instructions():
    page = ("make it black and white", "invert the colours", "flip it horizontally", "rotate it 90 degrees clockwise",
            "make it brighter", "make it darker", "make the circle blue", "remove the square",
            "add a yellow square at the top right")
    for text in page + toy.NEWCOMER_INSTRUCTIONS + ("recolour the red circle blue", "make it greyscale"):
        parsed = toy.parse_instruction(text)
        assert parsed is not None, text
        family, _, attributes = parsed
        assert not toy.is_held_out(family, attributes), text
    assert toy.parse_instruction("make the red circle blue")[2] == {"shape": "circle", "colour": "blue",
                                                                    "old_colour": "red"}
    # World 1's templates are world 2's first ones, unchanged.
    for family, options in toy.TEMPLATES.items():
        assert toy.TEMPLATES_2[family][:len(options)] == options
    wordings = {e.instruction for e in toy.generate(600, 3, "train", world=W2)}
    assert {"make it grayscale", "make it greyscale"} & wordings
    assert any(w.startswith("remove the ") and len(w.split()) == 4 for w in wordings)  # "remove the red circle"


def test_world_2_recolour_repaints_the_shape_whatever_its_style_and_remove_restores_the_background():
    styles = set()
    for e in _examples("recolour", 40):
        old, new = e.attributes["old_colour"], e.attributes["colour"]
        assert old != new and e.attributes["shape"] in e.instruction and new in e.instruction
        changed = np.any(e.source != e.target, axis=2)
        assert changed.sum() > 10
        styles.update(s[3] for s in e.origin["scene"] if s[0] == e.attributes["shape"])
        # Fully covered pixels take the named colour exactly; edge pixels blend it with the background.
        full = np.all(e.target == np.array(toy.COLOURS[new]), axis=2)
        assert full.sum() > 0.3 * changed.sum()
    assert len(styles) >= 4 and styles <= set(toy.STYLES)
    for e in _examples("remove", 20):
        scene = e.origin["scene"]
        assert any(s[0] == e.attributes["shape"] and s[1] == e.attributes["old_colour"] for s in scene)
        assert np.any(e.source != e.target)


def test_drawn_styles_render_exact_coverage():
    base = toy.Shape("circle", "red", "centre", 30, 0, 0)
    filled = toy.shape_alpha(base)
    np.testing.assert_array_equal(filled > 0, toy.shape_mask(base))  # world 1's mask is the filled style
    soft = toy.shape_alpha(toy.Shape("circle", "red", "centre", 30, 0, 0, style="soft"))
    assert 0 < ((soft > 0) & (soft < 1)).sum() and abs(soft.sum() - np.pi * 900) < 30
    ring = toy.shape_alpha(toy.Shape("circle", "red", "centre", 30, 0, 0, style="outline", stroke=4.0))
    assert abs(ring.sum() - 2 * np.pi * 30 * 4) < 60 and ring[64, 64] == 0
    scene = toy.Scene("solid", ((200, 200, 200), (200, 200, 200)),
                      (toy.Shape("square", "blue", "left", 15, 0, 0, style="soft outline", rgb=(0, 0, 255),
                                 stroke=3.0, wobble=((3, 0.05, 0.0),)),))
    image = toy.render_scene(scene)
    assert np.all(image[np.all(image != 200, axis=2)][:, 2] > 200)  # blends of grey and blue only
    np.testing.assert_array_equal(toy.render_scene(scene.with_shapes(())), np.full((128, 128, 3), 200, np.uint8))


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_world_2_is_valid_deterministic_and_keeps_the_split(family):
    a = _examples(family, 6, "eval", 4)
    b = [toy.make_example(4, "eval", i, families=(family,), world=W2) for i in range(6)]
    for x, y in zip(a, b):
        assert x.instruction == y.instruction and x.attributes == y.attributes and x.origin["world"] == 2
        np.testing.assert_array_equal(x.source, y.source)
        np.testing.assert_array_equal(x.target, y.target)
        assert x.source.shape == x.target.shape == (128, 128, 3) and "{" not in x.instruction
    if family in toy.GLOBAL_FAMILIES:
        for e in a:
            np.testing.assert_array_equal(e.target, toy.apply_global(family, e.source, e.attributes))


def test_world_2_holds_out_photos_and_combinations():
    train = list(toy.generate(300, 1, "train", world=W2))
    evals = list(toy.generate(120, 1, "eval", world=W2))
    assert not any(toy.is_held_out(e.family, e.attributes) for e in train)
    assert any(toy.is_held_out(e.family, e.attributes) for e in evals)
    photos = lambda es: {e.origin.get("photo") or e.origin.get("backdrop", {}).get("photo") for e in es} - {None}
    assert photos(train) <= set(toy.TRAIN_PHOTOS) and photos(evals) <= set(toy.EVAL_PHOTOS) and photos(evals)


def test_instruction_cases_probes_and_alternatives():
    parsed = toy.parse_instruction("make the circle blue")
    case = toy.instruction_case(parsed[0], parsed[2], 3, instruction="make the circle blue")
    assert case.attributes["old_colour"] != "blue" and case.instruction == "make the circle blue"
    alternatives = toy.case_alternatives(parsed[0], parsed[2], 3)
    assert len(alternatives) == 5  # four other colours and the removal, on the same scene
    assert all(np.array_equal(np.any(case.source != alt, axis=2), np.any(case.source != case.target, axis=2))
               for alt in alternatives[:4])
    photo = toy.whole_photo("chelsea")
    add = toy.instruction_case("add", {"shape": "square", "colour": "yellow", "position": "top right"}, 0,
                               backdrop=photo)
    assert np.array_equal(add.source, photo) and np.any(add.target[:43, 85:] != photo[:43, 85:])
    for name, probe in toy.drawn_probes().items():
        red = np.all(probe == probe[np.any(probe != 255, axis=2)][0], axis=2)
        assert red.sum() > 300, name
        blue = toy.probe_target(probe, "recolour", {"colour": "blue"})
        assert np.all(blue[red] == toy.COLOURS["blue"]) and np.all(toy.probe_target(probe, "remove", {}) == 255)
        assert len(toy.probe_alternatives(probe, "recolour", {"colour": "blue"})) == 5


def test_cli_world_flag_and_world_1_default(tmp_path):
    manifest = make_toy_data.main(["--out", str(tmp_path / "w2"), "--n", "6", "--eval-n", "2", "--world", "2"])
    assert manifest["world"] == 2
    rows, report = data.read_edit_examples(tmp_path / "w2" / "train")
    assert report.num_bad == 0 and rows[0].instruction == toy.make_example(0, "train", 0, world=2).instruction
    assert make_toy_data.main(["--out", str(tmp_path / "w1"), "--n", "2", "--eval-n", "1"])["world"] == 1
    with pytest.raises(SystemExit):
        make_toy_data.parse_args(["--out", "x", "--n", "3", "--world", "3"])
    assert toy.template_of("recolour", "make the red circle blue",
                           {"shape": "circle", "colour": "blue", "old_colour": "red"}) == \
        "make the {old_colour} {shape} {colour}"
    assert toy.template_of("recolour", "make the circle blue", {"shape": "circle", "colour": "blue"}) == \
        "make the {shape} {colour}"
