"""Evaluate a reward model folder on toy pairs: python -m jobs.eval_reward --model DIR --data DATA_DIR.

Prints (and with --out writes) JSON: held-out accuracy on non-tied pairs, per kind of wrong candidate and per
family; tie calibration; agreement with the exact-target PSNR ranking on the toy editor's own outputs (teacher
pairs). `--pixel-test` adds the gradient test: Adam on the pixels of wrong-instruction edits through reward_loss
for --steps steps (baseline the detached starting edit, or --baseline source), the learning rate chosen among --lrs
on a validation share of the examples, the PSNR gain against the exact target on the rest, per family; and the
same steps from correct edits (the exact target, and the toy editor's outputs when the data has them) to show they
are not made worse. No Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from rtedit.train.reward.evaluate import (accuracy_table, pair_logits, pixel_examples, pixel_steps, psnr_agreement,
                                          split_by_id, summarise_gain)
from rtedit.train.reward.model import EditReward
from rtedit.train.reward.pairs import read_reward_pairs, to_tensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logger = logging.getLogger("jobs.eval_reward")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="an EditReward folder (jobs.train_reward's export)")
    parser.add_argument("--data", required=True, type=Path, help="jobs.make_reward_data's folder")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tie-margin", type=float, default=None, help="default: the model's training config")
    parser.add_argument("--pixel-test", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1", help="Adam rates tried on the validation share")
    parser.add_argument("--baseline", choices=("start", "source"), default="start")
    parser.add_argument("--max-examples", type=int, default=0, help="cap on wrong-edit examples (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def tie_margin_of(folder: Path, default: float = 1.6094379124341003) -> float:
    record = folder / "training_config.json"
    if record.is_file():
        task = json.loads(record.read_text()).get("task", {})
        if "tie_margin" in task:
            return float(task["tie_margin"])
    return default


def teacher_examples(pairs, min_psnr_db: float = 25.0):
    """The toy editor's own outputs that are correct edits (PSNR to the exact target >= min_psnr_db), as starts."""
    from rtedit.train.reward.evaluate import PixelExamples

    keep = [i for i, (k, d) in enumerate(zip(pairs.kinds, pairs.details)) if k == "teacher" and d == "teacher-vs-exact"]
    if not keep:
        return None
    sub = pairs.subset(keep)
    a_is_teacher = sub.a != sub.target  # the candidate that is not the exact target
    starts = torch.where(a_is_teacher, sub.a, sub.b)
    psnr = torch.where(a_is_teacher, sub.psnr_a, sub.psnr_b)
    good = [i for i in range(len(sub)) if float(psnr[i]) >= min_psnr_db]
    if not good:
        return None
    return PixelExamples(sub.pixels(sub.source), sub.instructions, sub.pixels(starts), sub.pixels(sub.target),
                         sub.families, sub.example_ids).take(good)


def pixel_test(model, pairs, args, device) -> dict:
    """The learning rate is the one of --lrs with the largest mean gain on the validation share of wrong edits among
    those that lower no validation teacher edit's PSNR by more than 0.5 dB on average (all, if none does)."""
    examples = pixel_examples(pairs, "wrong", "worse")
    if args.max_examples:
        examples = examples.take(range(min(args.max_examples, len(examples))))
    validation, test = split_by_id(examples)
    teacher = teacher_examples(pairs)
    teacher_val, teacher_test = split_by_id(teacher) if teacher is not None else (None, None)
    lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    search = {}
    for lr in lrs:
        gain = float(pixel_steps(model, validation, lr, args.steps, args.baseline, args.batch_size,
                                 device)["gain"].mean())
        kept = math.nan
        if teacher_val is not None and len(teacher_val):
            kept = float(pixel_steps(model, teacher_val, lr, args.steps, args.baseline, args.batch_size,
                                     device)["gain"].mean())
        search[lr] = {"wrong_gain_db": gain, "teacher_change_db": kept}
        logger.info("validation lr %g: wrong edits %+.2f dB, teacher edits %+.2f dB", lr, gain, kept)
    allowed = [lr for lr, v in search.items() if not (v["teacher_change_db"] < -0.5)] or list(search)
    best = max(allowed, key=lambda lr: search[lr]["wrong_gain_db"])
    result = pixel_steps(model, test, best, args.steps, args.baseline, args.batch_size, device)
    out = {"lr_search_validation": {str(k): v for k, v in search.items()}, "lr": best,
           "validation_examples": len(validation), "baseline": args.baseline, "steps": args.steps,
           "wrong_edits": summarise_gain(result, test.families)}
    correct = pixel_examples(pairs, "wrong", "better")  # the exact edits of the same examples
    _, correct_test = split_by_id(correct)
    res = pixel_steps(model, correct_test, best, args.steps, args.baseline, args.batch_size, device)
    out["exact_edits"] = {"examples": len(correct_test), "min_psnr_after_db": float(res["after"].min()),
                          "mean_psnr_after_db": float(res["after"].clamp(max=99).mean())}
    if teacher_test is not None and len(teacher_test):
        res = pixel_steps(model, teacher_test, best, args.steps, args.baseline, args.batch_size, device)
        out["teacher_edits_psnr_ge_25db"] = summarise_gain(res, teacher_test.families)
    return out


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = EditReward.from_pretrained(args.model, device=device)
    rows, report = read_reward_pairs(args.data / args.split)
    pairs = to_tensors(rows, report)
    margin = args.tie_margin if args.tie_margin is not None else tie_margin_of(args.model)
    logits = pair_logits(model, pairs, args.batch_size, device)
    result = {"model": str(args.model), "head": model.config.head, "data": str(args.data), "split": args.split,
              "bad_rows": report.as_dict(), "tie_margin": margin, **accuracy_table(logits, pairs, margin),
              **psnr_agreement(logits, pairs)}
    if args.pixel_test:
        result["pixel_test"] = pixel_test(model, pairs, args, device)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
