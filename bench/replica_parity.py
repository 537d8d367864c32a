"""Does bench/frame_latency.py's serving row time what a Serve replica runs? One process, one card.

    python bench/replica_parity.py --json out/parity.json                       # GPU: klein-4b-random, 512x512
    python bench/replica_parity.py --model tiny --size 64 --frames 3 --blocks 2  # CPU dry run (seconds)

Two editors: the bench's "serving configuration" row, built by the functions frame_latency.py builds it with, and
one built exactly as EditorDeployment builds its replica (deployments.editor.replica_editor with serve-gpu.yaml's
args, parsed by AppArgs). Both get the same frame, 2 steps, one input image and one prompt embedding computed once.
They are timed in alternating blocks of --frames frames (A B, B A, ...) so clock and thermal drift falls on both;
prints both medians and their ratio, and exits 1 when they differ by more than --tolerance (5 %), when their
configs differ, or when either recompiled after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # deployments/ (platform/ itself never goes on sys.path)
STAGES = ("prepare", "denoise", "decode", "total")


def frame_latency():
    """bench/frame_latency.py as a module (bench/ is no package): the serving row is built by its own functions."""
    spec = importlib.util.spec_from_file_location("frame_latency", REPO / "bench" / "frame_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recompiles(editor) -> dict:
    branches = editor.stats()["compile"].get("branches", {})
    return {n: b["recompiles"] for n, b in branches.items() if b["state"] != "off"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="klein-4b-random", choices=["klein-4b-random", "tiny"], help="tiny: CPU dry run")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--frames", type=int, default=30, help="frames per block")
    p.add_argument("--blocks", type=int, default=6, help="blocks per editor, alternating which goes first")
    p.add_argument("--warmup", type=int, default=10, help="frames per editor before the first block")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--compile-backend", default=None, help="default: the YAML's (inductor); tiny: eager")
    p.add_argument("--taef2-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.frames < 1 or args.blocks < 1:
        p.error("--frames and --blocks must be >= 1")
    if not torch.cuda.is_available() and args.model != "tiny":
        raise SystemExit("replica_parity needs a CUDA GPU for klein-4b-random (use --model tiny for a CPU dry run)")

    from deployments.config import AppArgs
    from deployments.editor import replica_editor

    fl = frame_latency()
    overrides = fl.engine_overrides(args.model, args.size, args.compile_backend, args.taef2_dir)
    configs = fl.row_configs(fl.serving_config(overrides), args.size)
    app_spec = yaml.safe_load(fl.SERVE_GPU.read_text())["applications"][0]["args"]
    app_spec["engine"] = fl.merged(app_spec["engine"], overrides)  # the same command-line overrides on both sides
    app = AppArgs.model_validate(app_spec)

    encoder = fl.encoder_editor(configs)
    emb = encoder.encode_prompt(fl.PROMPT)
    encoder = None
    fl.release()
    editors = {"bench serving row": fl.build(configs[fl.SERVING]),
               "replica_editor": replica_editor(app.engine, app.editor)}
    same_config = editors["bench serving row"].config == editors["replica_editor"].config
    image = fl.frame(args.size)
    outputs, samples = {}, {name: {s: [] for s in STAGES} for name in editors}
    for editor in editors.values():
        for _ in range(args.warmup):
            editor.edit(image, emb, steps=args.steps, seed=0)
    for block in range(args.blocks):
        for name in list(editors)[:: 1 if block % 2 == 0 else -1]:
            for _ in range(args.frames):
                res = editors[name].edit(image, emb, steps=args.steps, seed=0)
                for s in STAGES:
                    samples[name][s].append(res.timings[s])
            outputs[name] = res.array
        print(f"block {block + 1}/{args.blocks}: " + ", ".join(
            f"{n} {statistics.median(v['total'][-args.frames:]):.2f} ms" for n, v in samples.items()), flush=True)

    medians = {n: {s: statistics.median(v[s]) for s in STAGES} for n, v in samples.items()}
    bench_ms, replica_ms = (medians[n]["total"] for n in editors)
    ratio = replica_ms / bench_ms
    compiled = {n: recompiles(e) for n, e in editors.items()}
    no_recompiles = all(v == 0 for r in compiled.values() for v in r.values())
    ok = abs(ratio - 1) <= args.tolerance and same_config and no_recompiles
    card, uuid = fl.card()
    drift = fl.psnr(*outputs.values())
    print(f"{card} ({uuid}), {datetime.date.today()}, {args.model}, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.blocks} alternating blocks of {args.frames} frames per editor")
    print("| editor | prepare | denoise | decode | total median | frames | recompiles |")
    print("|---|---|---|---|---|---|---|")
    for n, m in medians.items():
        print(f"| {n} | {m['prepare']:.2f} | {m['denoise']:.2f} | {m['decode']:.2f} | {m['total']:.2f} | "
              f"{len(samples[n]['total'])} | {compiled[n]} |")
    print(f"replica / bench = {ratio:.4f} (tolerance {args.tolerance:.0%}); configs equal: {same_config}; "
          f"outputs {'identical' if drift == float('inf') else f'{drift:.1f} dB apart'}; {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "card": card, "card_uuid": uuid, "date": str(datetime.date.today()), "model": args.model,
            "size": args.size, "steps": args.steps, "frames_per_block": args.frames, "blocks": args.blocks,
            "medians_ms": medians, "ratio_replica_over_bench": ratio, "tolerance": args.tolerance,
            "configs_equal": same_config, "recompiles": compiled, "outputs_psnr_db": drift, "pass": ok,
            "samples_total_ms": {n: v["total"] for n, v in samples.items()},
            "config": configs[fl.SERVING].to_dict(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "numpy": np.__version__},
        }, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
