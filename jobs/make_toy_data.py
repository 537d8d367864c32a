"""Write the toy editing world as Parquet: python -m jobs.make_toy_data --out DIR --n N --seed S.

DIR/train and DIR/eval hold part-*.parquet files with rtedit.train.data.EDIT_SCHEMA; DIR/manifest.json says how
they were made and what they hold. Ray is not needed here: the logic lives in rtedit.train.toy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rtedit.train import data, toy

logger = logging.getLogger("jobs.make_toy_data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (train/, eval/, manifest.json)")
    parser.add_argument("--n", required=True, type=int, help="number of training examples")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same bytes")
    parser.add_argument("--eval-n", type=int, default=None, help="number of eval examples (default n // 8, >= 1)")
    parser.add_argument("--families", default=",".join(toy.FAMILIES), help="comma-separated families to draw")
    parser.add_argument("--world", type=int, default=1, choices=toy.WORLDS,
                        help="toy world: 1 (models/toy-editor's first training data, byte for byte) or 2 (more "
                             "wordings, drawn shape styles and backgrounds; rtedit.train.toy says which)")
    parser.add_argument("--rows-per-file", type=int, default=2048, help="rows per Parquet file")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing files in parallel (the bytes do not depend on it); 0: one per core")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.rows_per_file < 1:
        parser.error(f"--rows-per-file must be >= 1, got {args.rows_per_file}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    args.workers = args.workers or os.cpu_count() or 1
    args.eval_n = max(1, args.n // 8) if args.eval_n is None else args.eval_n
    if args.eval_n < 0:
        parser.error(f"--eval-n must be >= 0, got {args.eval_n}")
    args.families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [f for f in args.families if f not in toy.FAMILIES]
    if unknown or not args.families:
        parser.error(f"--families must name some of {toy.FAMILIES}, got {unknown or 'none'}")
    return args


def write_part(folder: Path, seed: int, split: str, families: tuple[str, ...], part: int, start: int,
               stop: int, world: int = 1) -> tuple[str, Counter]:
    """Examples start..stop-1 of a split as part-<part>.parquet (an example depends only on seed, split, index)."""
    counts: Counter = Counter()

    def rows():
        for index in range(start, stop):
            example = toy.make_example(seed, split, index, families, world)
            counts[example.family] += 1
            yield example.to_edit_example()

    (file,) = data.write_edit_examples(folder, rows(), rows_per_file=stop - start, first_part=part)
    return file.name, counts


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    manifest = {"seed": args.seed, "size": toy.SIZE, "world": args.world, "families": list(args.families),
                "train_photos": list(toy.TRAIN_PHOTOS), "eval_photos": list(toy.EVAL_PHOTOS),
                "held_out_combos": [[f, c] for f, c in toy.HELD_OUT_COMBOS], "splits": {}}
    for split, n in (("train", args.n), ("eval", args.eval_n)):
        parts = [(args.out / split, args.seed, split, args.families, k, lo, min(lo + args.rows_per_file, n),
                  args.world) for k, lo in enumerate(range(0, n, args.rows_per_file))]
        if args.workers > 1 and len(parts) > 1:
            with ProcessPoolExecutor(min(args.workers, len(parts))) as pool:
                written = list(pool.map(write_part, *zip(*parts)))
        else:
            written = [write_part(*p) for p in parts]
        counts = sum((part_counts for _, part_counts in written), Counter())
        manifest["splits"][split] = {"n": n, "files": [name for name, _ in written],
                                     "families": dict(sorted(counts.items()))}
        logger.info("wrote %d %s examples in %d files", n, split, len(written))
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({"out": str(args.out), "train": args.n, "eval": args.eval_n, "seconds": manifest["seconds"]}))
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
