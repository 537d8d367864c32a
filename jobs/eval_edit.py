"""Score an editor on toy-world data: python -m jobs.eval_edit --model DIR --data DIR --steps N.

Prints one JSON object: PSNR and SSIM against the exact targets per family and overall (beside the TAEF2
round-trip PSNR of the same targets, the ceiling a TAEF2 model can reach), and instruction accuracy (the share of
outputs closer to their own target than to the target of any other global instruction on the same source). Writes
a PNG grid (source, reference, target, output) for a person to look at. The model runs through rtedit.Editor, the
same path `serve` uses; no Ray needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rtedit.config import EditorConfig
from rtedit.editor import Editor
from rtedit.images import pixels_to_array, to_pixel_tensor
from rtedit.train import evaluation, toy
from rtedit.train.data import decode_rgb, read_edit_examples
from rtedit.train.tasks.teacher import to_uint8

logger = logging.getLogger("jobs.eval_edit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers model folder (with rtedit.json) or preset")
    parser.add_argument("--data", required=True, type=Path, help="toy-world folder (its eval/ split) or a split folder")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per edit")
    parser.add_argument("--split", default="eval", choices=("train", "eval"))
    parser.add_argument("--limit", type=int, default=None, help="score at most this many examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of example i is seed + i")
    parser.add_argument("--device", default=None, help="cpu or cuda; default cuda when present")
    parser.add_argument("--taef2-dir", default=None, help="TAEF2 weights folder; default rtedit.paths.taef2_dir()")
    parser.add_argument("--grid", type=Path, default=Path("eval_grid.png"), help="PNG grid output path")
    parser.add_argument("--grid-per-family", type=int, default=2, help="grid rows per family")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


@torch.inference_mode()
def taef2_round_trip(editor: Editor, target: np.ndarray) -> np.ndarray:
    """The target through the editor's own autoencoder and back: what a perfect latent would decode to."""
    pixels = to_pixel_tensor(target, editor.codec.device, editor.codec.dtype)
    return pixels_to_array(editor.codec.decode(editor.codec.encode(pixels)))


def evaluate(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    folder = args.data / args.split if (args.data / args.split).is_dir() else args.data
    examples, report = read_edit_examples(folder, split=args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise SystemExit(f"no valid {args.split} examples under {folder}: {report.as_dict()}")
    editor = Editor.from_config(EditorConfig(model=args.model, device=args.device, taef2_dir=args.taef2_dir))
    scores, combinations = evaluation.Scores(), evaluation.Scores()
    grid_rows, per_family = [], {}
    for i, example in enumerate(examples):
        source, target = decode_rgb(example.source), decode_rgb(example.target)
        result = editor.edit(example.source, example.instruction, references=list(example.references),
                             steps=args.steps, seed=args.seed + i)
        output, own = result.array, target.astype(np.float32) / 255.0
        alternatives = evaluation.alternative_targets(source, target)
        values = dict(psnr=evaluation.psnr(output, own), ssim=evaluation.ssim(output, own),
                      taef2_psnr=evaluation.psnr(taef2_round_trip(editor, target), own),
                      instruction_accuracy=float(evaluation.closest_to_own(output, own, alternatives)))
        scores.add(example.family, **values)
        if example.family in toy.LOCAL_FAMILIES:  # generalisation: (family, attribute) combinations never trained on
            held_out = toy.is_held_out(example.family, example.attributes)
            combinations.add(f"{example.family}, {'held-out' if held_out else 'seen'} combination", **values)
        if per_family.get(example.family, 0) < args.grid_per_family:
            per_family[example.family] = per_family.get(example.family, 0) + 1
            reference = decode_rgb(example.references[0]) if example.references else np.full_like(source, 255)
            grid_rows.append([source, reference, target, to_uint8(output)])
    grid = evaluation.save_grid(grid_rows, args.grid)
    summary = scores.summary()
    return {"model": str(args.model), "data": str(folder), "steps": args.steps, "n": len(examples),
            "bad_rows": report.num_bad, **summary, "local_combinations": combinations.summary()["families"],
            "grid": str(grid),
            "seconds": round(time.perf_counter() - start, 1), "device": str(editor.device)}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = evaluate(parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
