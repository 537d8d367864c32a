"""One against two editor replicas on one GPU: throughput and per-frame latency, in one process.

    python bench/replicas_per_gpu.py --size 512 --frames 60 --replicas 1 2 [--json out/replicas.json]
    python bench/replicas_per_gpu.py --model tiny --size 64 --frames 4 --replicas 1 2     # CPU dry run

Each replica is an editor built from deployments/serve-gpu.yaml's replica config (the serving configuration, one
bucket of --size) by Editor.from_config, as EditorDeployment builds one; a replica's frames run on a thread of its
own, each replica on its own CUDA stream (as separate Serve replica processes would have their own), all replicas
at once, each as fast as it can: frames per second of all replicas together, and each frame's latency (wall clock
of `edit`, median and p99). serve-gpu.yaml's `replicas_per_gpu` should be what gives the most frames per second
within the latency a session can take; the table says both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import statistics
import sys
import threading
import time

import numpy as np
import torch

import frame_latency as fl  # bench/ is the script's folder, so its sibling imports by name
from rtedit.fast_path import warm_prompt


def run(editors, frames: int, size: int) -> dict:
    """All editors at once, `frames` each; per-frame wall-clock latencies and the total throughput."""
    image = fl.frame(size)
    latencies: list[list[float]] = [[] for _ in editors]
    errors: list[BaseException] = []
    start_line = threading.Barrier(len(editors) + 1)

    def replica(i: int) -> None:
        editor = editors[i]
        stream = torch.cuda.Stream() if editor.device.type == "cuda" else None
        emb = warm_prompt(editor)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                start_line.wait()
                for _ in range(frames):
                    t0 = time.perf_counter()
                    editor.edit(image, emb)
                    latencies[i].append((time.perf_counter() - t0) * 1000)
            except BaseException as exc:  # reported after the run; the other replicas finish
                errors.append(exc)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(len(editors))]
    for t in threads:
        t.start()
    start_line.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    flat = [x for per in latencies for x in per]
    return {"replicas": len(editors), "frames": len(flat), "seconds": elapsed, "fps": len(flat) / elapsed,
            "latency_median_ms": statistics.median(flat), "latency_p99_ms": float(np.percentile(flat, 99)),
            "per_replica_fps": [len(per) / elapsed for per in latencies]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=60, help="frames per replica")
    p.add_argument("--warmup", type=int, default=5, help="frames per replica before the timed run")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="klein-4b-random", choices=["klein-4b-random", "tiny"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    serving = fl.serving_config(fl.engine_overrides(args.model, args.size))
    config = dataclasses.replace(serving, buckets=dataclasses.replace(serving.buckets, sizes=((args.size,) * 2,)))
    rows = []
    editors = []
    for count in sorted(args.replicas):
        while len(editors) < count:  # replicas accumulate: the 2-replica row reuses the first editor
            editors.append(fl.build(config))
        run(editors[:count], args.warmup, args.size)
        row = run(editors[:count], args.frames, args.size)
        rows.append(row)
        print(f"row done: {count} replica(s): {row['fps']:.1f} frames/s, latency median "
              f"{row['latency_median_ms']:.1f} ms, p99 {row['latency_p99_ms']:.1f} ms", flush=True)
    card, uuid = fl.card()
    print(f"{card} ({uuid}), {datetime.date.today()}, {args.model}, {args.size}x{args.size}, "
          f"{args.frames} frames per replica, serving config (dbcache {config.dbcache.policy if config.dbcache.enabled else 'off'}, "
          f"cuda_graphs {config.cuda_graphs})")
    print("| replicas on one GPU | frames/s (all) | per replica | latency median (ms) | latency p99 (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicas']} | {r['fps']:.1f} | {', '.join(f'{x:.1f}' for x in r['per_replica_fps'])} | "
              f"{r['latency_median_ms']:.1f} | {r['latency_p99_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": card, "card_uuid": uuid, "date": str(datetime.date.today()), "size": args.size,
                       "config": config.to_dict(), "rows": rows}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
