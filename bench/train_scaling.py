"""Data-parallel scaling of the teacher job: samples/s with 1 worker against N workers (not a test).

    python bench/train_scaling.py --config jobs/configs/toy_teacher.yaml --workers 1 2 --steps 200 --batch 64

Each worker count runs the real job (jobs.train_teacher through Ray Train + DeepSpeed) with the same batch per
worker and the precomputed latent cache, so the number measures the trainer, not image decoding. Throughput is the
median of the per-step samples/s (all workers) after the first --skip steps (start-up, allocator warm-up).
Prints a Markdown table and one JSON line; --json writes it too.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # jobs/ (platform/ itself never goes on sys.path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "jobs" / "configs" / "toy_teacher.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=30, help="first steps left out of the median")
    parser.add_argument("--batch", type=int, default=64, help="batch per worker (the same for every count)")
    parser.add_argument("--storage", default="/tmp/rtedit-scaling")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps <= args.skip:
        parser.error(f"--steps ({args.steps}) must exceed --skip ({args.skip})")

    import logging

    import ray
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from jobs import runtime, train_teacher
    from rtedit.train.config import load_job_config

    rows = []
    ray.init(address="local", log_to_driver=False)
    try:
        for workers in args.workers:
            config = load_job_config(args.config, [
                f"run.name=scaling-{workers}w-{int(time.time())}", f"run.storage_path={args.storage}",
                f"run.max_steps={args.steps}", f"run.batch_size={args.batch}", f"run.checkpoint_every={args.steps}",
                f"run.log_every={args.steps}", "run.max_failures=0", f"scaling.num_workers={workers}", *args.set])
            train_teacher.prepare(config)  # the latent cache: built once, found by fingerprint afterwards
            result = runtime.run(config, train_teacher.TASK)
            with open(result.metrics_csv) as fh:
                steps = [row for row in csv.DictReader(fh) if int(row["step"]) > args.skip]
            rate = statistics.median(float(r["samples_per_s"]) for r in steps)
            rows.append({"workers": workers, "batch_per_worker": args.batch, "steps": args.steps,
                         "samples_per_s": rate, "step_ms": 1000 * statistics.median(float(r["step_time_s"]) for r in steps),
                         "final_loss": float(steps[-1]["loss"]), "seconds": round(result.seconds, 1)})
            print(f"workers {workers}: {rate:.0f} samples/s", flush=True)
    finally:
        ray.shutdown()
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{card} x {max(args.workers)}, batch {args.batch} per worker, {args.steps} steps, median after {args.skip}")
    print("| workers | samples/s | step ms | x 1 worker | final loss | job seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['samples_per_s']:.0f} | {r['step_ms']:.1f} | {r['speedup']:.2f} | "
              f"{r['final_loss']:.4f} | {r['seconds']} |")
    result = {"card": card, "rows": rows}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
