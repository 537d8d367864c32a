"""Stage timings of Editor.edit against the stock Flux2KleinPipeline, in one process on one card.

    python bench/engine_timings.py --model klein-4b-random --size 512 --steps 2 --frames 50 [--json out.json]

Both paths get the same image, seed and cached prompt embeddings; the stock pipeline is timed with a host clock
after a device sync, ours by its own stage timer (CUDA events) and by the same host clock.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform as host_platform
import statistics
import sys
import time

import numpy as np
import PIL.Image
import torch


def test_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth synthetic photo-like frame (deterministic, no dataset needed on the GPU host)."""
    rng = np.random.default_rng(seed)
    base = rng.random((size // 32 + 1, size // 32 + 1, 3))
    img = np.kron(base, np.ones((32, 32, 1)))[:size, :size]
    return (np.clip(img + 0.05 * rng.random((size, size, 3)), 0, 1) * 255).astype(np.uint8)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="klein-4b-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock pipeline rows")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    import diffusers
    import transformers
    from diffusers import Flux2KleinPipeline

    from rtedit.config import EditorConfig
    from rtedit.editor import Editor

    t0 = time.perf_counter()
    editor = Editor.from_config(EditorConfig(model=args.model))
    build_s = time.perf_counter() - t0
    device = editor.device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({host_platform.processor() or 'x86_64'})"
    image = test_image(args.size)
    emb = editor.encode_prompt("make it winter")
    seed = 0

    rows = {}
    if not args.no_stock:
        pipe = Flux2KleinPipeline(
            scheduler=editor.scheduler, vae=editor.vae, text_encoder=editor.text_encoder,
            tokenizer=editor.tokenizer, transformer=editor.transformer, is_distilled=True,
        )
        pipe.set_progress_bar_config(disable=True)
        pil = PIL.Image.fromarray(image)

        def stock():
            return pipe(
                image=[pil], prompt_embeds=emb.embeds, num_inference_steps=args.steps, guidance_scale=1.0,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
            ).images[0]

        for _ in range(args.warmup):
            stock()
        sync()
        walls = []
        for _ in range(args.frames):
            t = time.perf_counter()
            stock_out = stock()
            sync()
            walls.append((time.perf_counter() - t) * 1000)
        rows["stock diffusers eager"] = {"total_wall_median": statistics.median(walls), "total_wall_p99": percentile(walls, 99)}

    for _ in range(args.warmup):
        editor.edit(image, emb, steps=args.steps, seed=seed)
    sync()
    stages = {k: [] for k in ("prepare", "denoise", "decode", "total")}
    walls = []
    for _ in range(args.frames):
        t = time.perf_counter()
        res = editor.edit(image, emb, steps=args.steps, seed=seed)
        sync()
        walls.append((time.perf_counter() - t) * 1000)
        for k in stages:
            stages[k].append(res.timings[k])
    ours = {f"{k}_median": statistics.median(v) for k, v in stages.items()}
    ours.update({f"{k}_p99": percentile(v, 99) for k, v in stages.items()})
    ours.update({"total_wall_median": statistics.median(walls), "total_wall_p99": percentile(walls, 99)})
    if not args.no_stock:
        ours["speedup_vs_stock_eager"] = rows["stock diffusers eager"]["total_wall_median"] / ours["total_wall_median"]
        ours["psnr_vs_stock_db"] = psnr(res.array, stock_out)
        ours["max_abs_diff_vs_stock"] = float(np.abs(res.array - stock_out).max())
    rows["rtedit exact path (no approximations)"] = ours

    result = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "frames": args.frames,
        "dtype": str(editor.dtype),
        "build_s": build_s,
        "versions": {
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0],
        },
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    print(f"\n{card}, {args.model}, {args.size}x{args.size}, {args.steps} steps, {args.frames} frames, {editor.dtype}")
    for name, row in rows.items():
        cells = "  ".join(f"{k} {v:.2f}" for k, v in row.items())
        print(f"{name:42s} {cells}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
