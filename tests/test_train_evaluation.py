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
