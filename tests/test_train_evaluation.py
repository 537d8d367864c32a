"""Edit scoring: PSNR/SSIM sanity, instruction accuracy against the other global targets, summaries, grid."""

import math

import numpy as np

from rtedit.train import evaluation, toy


def test_psnr_and_ssim_reference_values():
    a = np.zeros((16, 16, 3), np.float32)
    b = np.full((16, 16, 3), 0.1, np.float32)
    assert math.isclose(evaluation.psnr(a, b), 20.0, rel_tol=1e-6)
    assert evaluation.psnr(a, a) == 100.0
    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 3)).astype(np.float32)
    assert math.isclose(evaluation.ssim(x, x), 1.0, rel_tol=1e-6)
    assert evaluation.ssim(x, 1 - x) < 0.1


def test_instruction_accuracy_prefers_the_own_target():
    e = toy.make_example(0, "eval", 0, families=("invert",))
    own = e.target.astype(np.float32) / 255
    alternatives = evaluation.alternative_targets(e.source, e.target)
    assert len(alternatives) == 7  # grayscale, hflip, rotate cw/ccw, brighten, darken, identity
    assert evaluation.closest_to_own(own, own, alternatives)
    assert not evaluation.closest_to_own(e.source.astype(np.float32) / 255, own, alternatives)


def test_summary_groups_families_and_grid_is_a_png(tmp_path):
    scores = evaluation.Scores()
    scores.add("invert", psnr=20, instruction_accuracy=1)
    scores.add("invert", psnr=30, instruction_accuracy=0)
    scores.add("add", psnr=10, instruction_accuracy=1)
    summary = scores.summary()
    assert summary["families"]["invert"] == {"n": 2, "psnr": 25.0, "instruction_accuracy": 0.5}
    assert summary["global"]["n"] == 2 and summary["local"]["psnr"] == 10.0
    assert math.isclose(summary["overall"]["psnr"], 20.0)
    tile = np.zeros((128, 128, 3), np.uint8)
    path = evaluation.save_grid([[tile, tile], [tile, tile, tile]], tmp_path / "g.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def _step(width: int = 16, at: int = 8, left=(0.0, 0.0, 0.0), right=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A vertical edge: columns < at are `left`, the others `right`."""
    image = np.empty((width, width, 3), np.float32)
    image[:, :at], image[:, at:] = left, right
    return image


def test_sobel_edges_and_their_f1_with_a_pixel_of_tolerance():
    step = _step()
    # Sobel scaled so a unit step reads 1 on the two pixels beside it; replicated borders add no edge.
    np.testing.assert_allclose(evaluation.sobel_magnitude(step)[5], [0] * 7 + [1, 1] + [0] * 7, atol=1e-12)
    assert evaluation.edge_map(step).sum() == 2 * 16
    # A red-to-blue step of nearly equal luma is still an edge (the strongest channel counts).
    assert evaluation.edge_map(_step(left=(0.86, 0.16, 0.16), right=(0.16, 0.35, 0.86))).any()
    # A gradient background (the toy's steepest: 140 levels over 128 pixels) is no edge.
    ramp = np.repeat(np.linspace(0, 140 / 255, 128)[None, :, None], 128, axis=0).repeat(3, axis=2)
    assert not evaluation.edge_map(ramp).any()
    assert evaluation.edge_f1(step, step) == 1.0
    shifted = _step(at=9)  # edges at columns 8, 9 against 7, 8: half match exactly, all within one pixel
    assert evaluation.edge_f1(shifted, step, tolerance=0) == 0.5
    assert evaluation.edge_f1(shifted, step, tolerance=1) == 1.0
    assert evaluation.edge_f1(_step(at=11), step, tolerance=1) == 0.0  # columns 10, 11: two pixels off
    flat = np.zeros_like(step)
    assert evaluation.edge_f1(flat, flat) == 1.0 and evaluation.edge_f1(flat, step) == 0.0


def test_behaviour_section_from_scores_and_per_example_values():
    assert evaluation.COPY_PASTE_FAMILY in toy.GLOBAL_FAMILIES and evaluation.STRUCTURE_FAMILY in toy.LOCAL_FAMILIES
    scores = evaluation.Scores()
    scores.add("identity", psnr=35, instruction_accuracy=1)
    scores.add("identity", psnr=20, instruction_accuracy=0)
    scores.add("invert", psnr=15, instruction_accuracy=1)
    scores.add("recolour", psnr=24, instruction_accuracy=1)
    scores.add("palette", psnr=12, instruction_accuracy=0)
    out = evaluation.behaviour(scores.summary(), source_psnrs=[35, 20, 30], edge_f1s=[0.5, 1.0])
    assert out["copy_paste"] == {"family": "identity", "n": 3, "psnr_vs_source": 85 / 3, "threshold_db": 30.0,
                                 "share_above_threshold": 2 / 3}  # 30 dB itself counts
    assert out["structure_transfer"]["n"] == 2 and out["structure_transfer"]["edge_f1"] == 0.75
    assert out["controllability"] == {"instruction_accuracy": 0.6, "by_family": {
        "identity": 0.5, "invert": 1.0, "palette": 0.0, "recolour": 1.0}}
    assert out["reference"] == {"families": ["palette"], "n": 1, "psnr": 12.0, "instruction_accuracy": 0.0}
    assert out["psnr_by_group"] == {"global": 70 / 3, "local": 24.0, "reference": 12.0}
    # Nothing measured is None (valid JSON), never NaN.
    empty = evaluation.Scores()
    empty.add("invert", psnr=15, instruction_accuracy=1)
    out = evaluation.behaviour(empty.summary(), [], [], copy_paste_threshold_db=25.0)
    assert out["copy_paste"]["psnr_vs_source"] is None and out["copy_paste"]["share_above_threshold"] is None
    assert out["copy_paste"]["threshold_db"] == 25.0 and out["structure_transfer"]["edge_f1"] is None
    assert out["reference"]["psnr"] is None and out["psnr_by_group"]["local"] is None
