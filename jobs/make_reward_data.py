"""Write toy preference pairs for the reward model: python -m jobs.make_reward_data --out DIR --n N --seed S.

DIR/train and DIR/eval hold part-*.parquet files with rtedit.train.reward.pairs.REWARD_PAIR_SCHEMA (the preference
schema of rtedit.train.data plus family, kind, detail, target and PSNR columns); DIR/manifest.json says how they
were made and how many pairs of each kind and label each split holds. `--teacher models/toy-editor` adds pairs with
the toy teacher's own 2-step output for the first --teacher-n examples of each split (CPU: about 0.5 s an edit).
No Ray: the logic lives in rtedit.train.reward.pairs and rtedit.train.toy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rtedit.train import toy
from rtedit.train.reward.pairs import PairMix, example_pairs, manifest, write_reward_pairs

logger = logging.getLogger("jobs.make_reward_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", required=True, type=int, help="training examples (each gives several pairs)")
    parser.add_argument("--eval-n", type=int, default=None, help="eval examples (default n // 4, >= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", default="{}", help="PairMix fields as JSON, e.g. '{\"tie\": 0.5}'")
    parser.add_argument("--teacher", type=Path, default=None, help="a toy editor folder whose outputs join the pairs")
    parser.add_argument("--teacher-n", type=int, default=None, help="examples per split edited by the teacher")
    parser.add_argument("--taef2-dir", default=None, help="TAEF2 weights for the teacher (default the shared folder)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    args.eval_n = max(1, args.n // 4) if args.eval_n is None else args.eval_n
    try:
        args.mix = PairMix(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.mix).items()})
        args.mix.validate()
    except (TypeError, ValueError) as exc:
        parser.error(f"--mix: {exc}")
    return args


def teacher_outputs(folder: Path, examples: list[toy.ToyExample], taef2_dir: str | None) -> list[np.ndarray]:
    """The toy editor's 2-step output of each example, uint8, as `rtedit edit` gives it (seed 0)."""
    from rtedit.config import EditorConfig
    from rtedit.editor import Editor

    editor = Editor.from_config(EditorConfig(model=str(folder), device="cpu", **({"taef2_dir": taef2_dir}
                                                                                  if taef2_dir else {})))
    outs = []
    for example in examples:
        result = editor.edit(example.source, example.instruction, references=list(example.references), steps=2,
                             seed=0)
        outs.append(np.clip(np.rint(result.array * 255), 0, 255).astype(np.uint8))
    return outs


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    info = {"seed": args.seed, "mix": asdict(args.mix), "teacher": str(args.teacher) if args.teacher else None,
            "eval_photos": list(toy.EVAL_PHOTOS), "held_out_combos": [[f, c] for f, c in toy.HELD_OUT_COMBOS],
            "splits": {}}
    for split, n in (("train", args.n), ("eval", args.eval_n)):
        examples = list(toy.generate(n, args.seed, split))
        teacher = [None] * n
        if args.teacher is not None:
            k = n if args.teacher_n is None else min(n, args.teacher_n)
            t0 = time.perf_counter()
            teacher[:k] = teacher_outputs(args.teacher, examples[:k], args.taef2_dir)
            logger.info("%s: teacher edited %d examples in %.1fs", split, k, time.perf_counter() - t0)
        rows = [row for example, out in zip(examples, teacher)
                for row in example_pairs(example, args.mix, args.seed, out)]
        files = write_reward_pairs(args.out / split, rows)
        info["splits"][split] = {"examples": n, "files": [f.name for f in files], **manifest(rows)}
        logger.info("wrote %d %s pairs from %d examples", len(rows), split, n)
    info["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({"out": str(args.out), "train_pairs": info["splits"]["train"]["pairs"],
                      "eval_pairs": info["splits"]["eval"]["pairs"], "seconds": info["seconds"]}))
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
