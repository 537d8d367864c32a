"""Where one frame's time goes: the serving configuration under torch.profiler, kernels grouped by kind.

    python bench/profile_frame.py --size 512 --frames 20 [--taef2-dir DIR]

klein-4b-random, bf16, one GPU: attention probe (every installed kernel), selective compile warmed for the
frame's bucket, DBCache with the serving (dynamic) policy, TAEF2. Prints the probe table, the stage medians, and
CUDA time by kernel kind (GEMM, attention, elementwise/norm, copies, other) with the top kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from frame_latency import frame  # noqa: E402


def kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "matmul", "sm90_xmma", "nvjet", "cublas")):
        return "gemm"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(k in n for k in ("memcpy", "memset", "copy")):
        return "copy"
    if any(k in n for k in ("triton", "elementwise", "norm", "reduce", "vectorized", "activation")):
        return "elementwise/norm (fused or not)"
    if "conv" in n or "implicit" in n:
        return "conv"
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--taef2-dir", default=None)
    parser.add_argument("--top", type=int, default=15, help="kernels listed, by CUDA time")
    args = parser.parse_args()
    if args.top < 1:
        parser.error(f"--top must be at least 1 (a count of kernels), got {args.top}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_frame needs a CUDA GPU")

    from rtedit.accel.dbcache import CachingConfig
    from rtedit.accel.compile import CompileConfig
    from rtedit.config import EditorConfig, ShapeBuckets
    from rtedit.editor import Editor

    config = EditorConfig(
        model="klein-4b-random", select_attention=True, autoencoder="taef2", taef2_dir=args.taef2_dir,
        buckets=ShapeBuckets(sizes=((args.size, args.size),), references=(0,)),
        dbcache=CachingConfig(enabled=True), compile=CompileConfig(enabled=True),
    )
    editor = Editor.from_config(config)
    image, emb = frame(args.size), editor.encode_prompt("make it winter")
    for row in editor.stats()["attention"]["probe"]:
        print("probe", {k: row[k] for k in ("name", "available", "error", "rel_err", "ms", "chosen")})
    for _ in range(10):
        editor.edit(image, emb)
    stages = defaultdict(list)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.frames):
            for k, v in editor.edit(image, emb).timings.items():
                stages[k].append(v)
    print("stage medians (ms):", {k: round(statistics.median(v), 2) for k, v in stages.items()})
    by_kind, kernels = defaultdict(float), []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and cuda_us:
            by_kind[kind(evt.key)] += cuda_us
            kernels.append((cuda_us, evt.count, evt.key))
    total = sum(by_kind.values())
    print(f"GPU kernel time per frame: {total / args.frames / 1000:.2f} ms")
    for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:32s} {us / args.frames / 1000:7.2f} ms/frame  {100 * us / total:5.1f} %")
    for us, count, name in sorted(kernels, reverse=True)[:args.top]:
        print(f"  {us / args.frames / 1000:7.3f} ms/frame  x{count // args.frames:<4d} {name[:110]}")
    print("compile:", {n: b["recompiles"] for n, b in editor.stats()["compile"]["branches"].items()},
          "attention:", editor.stats()["attention"]["chosen"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
