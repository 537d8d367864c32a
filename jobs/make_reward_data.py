"""Write toy preference pairs for the reward model: python -m jobs.make_reward_data --out DIR --n N --seed S.

DIR/train and DIR/eval hold part-*.parquet files with rtedit.train.reward.pairs.REWARD_PAIR_SCHEMA (the preference
schema of rtedit.train.data plus family, kind, detail, target and PSNR columns); DIR/manifest.json says how they
were made and how many pairs of each kind and label each split holds. `--teacher models/toy-editor` adds pairs with
the toy teacher's own 2-step output for the first --teacher-n examples of each split (CPU: about 0.5 s an edit;
--device cuda on a GPU). `--workers N` builds the pairs in N processes (the same rows in the same order: each
example's pairs are a pure function of the example). No Ray: the logic lives in rtedit.train.reward.pairs and
rtedit.train.toy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import os
import time
from concurrent.futures import ProcessPoolExecutor
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
    parser.add_argument("--device", default="cpu", help="the teacher's device (cpu, cuda)")
    parser.add_argument("--workers", type=int, default=1, help="processes that build the pairs (0: one per CPU)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    args.workers = args.workers or os.cpu_count() or 1
    args.eval_n = max(1, args.n // 4) if args.eval_n is None else args.eval_n
    try:
        args.mix = PairMix(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.mix).items()})
        args.mix.validate()
    except (TypeError, ValueError) as exc:
        parser.error(f"--mix: {exc}")
    return args


def teacher_outputs(folder: Path, examples: list[toy.ToyExample], taef2_dir: str | None,
                    device: str = "cpu") -> list[np.ndarray]:
    """The toy editor's 2-step output of each example, uint8, as `rtedit edit` gives it (seed 0)."""
    from rtedit.config import EditorConfig
    from rtedit.editor import Editor

    editor = Editor.from_config(EditorConfig(model=str(folder), device=device, **({"taef2_dir": taef2_dir}
                                                                                  if taef2_dir else {})))
    outs = []
    for example in examples:
        result = editor.edit(example.source, example.instruction, references=list(example.references), steps=2,
                             seed=0)
        outs.append(np.clip(np.rint(result.array * 255), 0, 255).astype(np.uint8))
    return outs


def _pairs_of(job: tuple) -> list[dict]:
    """The pairs of examples [lo, hi) of a split (a worker process's share; teacher outputs passed in)."""
    seed, split, lo, hi, mix, teacher = job
    examples = [toy.make_example(seed, split, i) for i in range(lo, hi)]
    return [row for example, out in zip(examples, teacher) for row in example_pairs(example, mix, seed, out)]


def split_pairs(n: int, seed: int, split: str, mix: PairMix, teacher: list, workers: int) -> list[dict]:
    """Every pair of a split's first n examples, in example order, built in `workers` processes."""
    chunk = max(1, -(-n // (workers * 4)))
    jobs = [(seed, split, lo, min(n, lo + chunk), mix, teacher[lo:lo + chunk]) for lo in range(0, n, chunk)]
    if workers <= 1 or len(jobs) == 1:
        return [row for job in jobs for row in _pairs_of(job)]
    import multiprocessing

    import torch

    # A teacher that ran on a GPU initialised CUDA in this process: its workers start fresh rather than fork it.
    context = multiprocessing.get_context("spawn") if torch.cuda.is_initialized() else None
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        return [row for part in pool.map(_pairs_of, jobs) for row in part]


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    info = {"seed": args.seed, "mix": asdict(args.mix), "teacher": str(args.teacher) if args.teacher else None,
            "eval_photos": list(toy.EVAL_PHOTOS), "held_out_combos": [[f, c] for f, c in toy.HELD_OUT_COMBOS],
            "splits": {}}
    for split, n in (("train", args.n), ("eval", args.eval_n)):
        teacher = [None] * n
        if args.teacher is not None:
            k = n if args.teacher_n is None else min(n, args.teacher_n)
            t0 = time.perf_counter()
            teacher[:k] = teacher_outputs(args.teacher, list(toy.generate(k, args.seed, split)), args.taef2_dir,
                                          args.device)
            logger.info("%s: teacher edited %d examples in %.1fs", split, k, time.perf_counter() - t0)
        rows = split_pairs(n, args.seed, split, args.mix, teacher, args.workers)
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
