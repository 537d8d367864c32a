"""Drift of a causal variant from the exact (full-attention) path on toy-world examples, output against output.

    python bench/causal_drift.py --model models/toy-editor --data /tmp/toy --limit 50 --engine causal=kv \
        --engine training_free=true

Both editors are built from EditorConfigs (the exact one from --model alone, the variant with the --engine
overrides, as `jobs.eval_edit` applies them) and edit the same held-out examples with the same seeds; it prints one
JSON object: the mean and worst PSNR of the variant's output against the exact path's, and the largest pixel
difference. What it costs against the exact targets is `jobs.eval_edit`'s to say.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # jobs/ (platform/ itself never goes on sys.path)

from jobs.eval_edit import engine_config, parse_engine_overrides  # noqa: E402
from rtedit.config import EditorConfig  # noqa: E402
from rtedit.editor import Editor  # noqa: E402
from rtedit.train import evaluation  # noqa: E402
from rtedit.train.data import read_edit_examples  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, type=Path, help="toy-world folder (its eval/ split)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE", help="the variant's overrides")
    args = p.parse_args(argv)
    examples, _ = read_edit_examples(args.data / "eval", split="eval")
    examples = examples[: args.limit]
    exact = Editor.from_config(EditorConfig(model=args.model, device=args.device))
    variant = Editor.from_config(engine_config(args.model, args.device, None, parse_engine_overrides(args.engine)))
    psnrs, worst = [], 0.0
    for i, ex in enumerate(examples):
        a, b = (e.edit(ex.source, ex.instruction, references=list(ex.references), steps=args.steps, seed=i).array
                for e in (exact, variant))
        psnrs.append(evaluation.psnr(b, a))
        worst = max(worst, float(np.abs(a - b).max()))
    result = {"model": args.model, "variant": args.engine, "mode": variant.mode, "n": len(psnrs),
              "steps": args.steps, "psnr_vs_exact_mean": float(np.mean(psnrs)),
              "psnr_vs_exact_min": float(np.min(psnrs)), "max_abs": worst, "device": str(exact.device)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
