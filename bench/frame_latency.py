"""Frame latency of our path against stock diffusers, one optimization at a time, in one process on one card.

    python bench/frame_latency.py --size 512 --frames 500 --rows stock   --json out/stock-512.json
    python bench/frame_latency.py --size 512 --frames 500 --rows ours    --json out/ours-512.json --reference out/stock-512.json
    python bench/frame_latency.py --merge out/*.json      # one table from rows split over processes (--only)

klein-4b-random in bf16 on one GPU, one input image, 2 steps, prompt embeddings cached. Rows:
  stock: "stock eager" (Flux2KleinPipeline), then "stock compile" (compile_repeated_blocks + VAE encoder/decoder
         compiled, on modules nothing has patched before), then the compile is undone;
  ours:  "exact" (no approximation), "+attention" (probed kernel), "+compile" (selective, warmed bucket),
         "+dbcache dynamic" (serving policy), "+dbcache static" (timing only), "+taef2" (with each policy).
Each row: prepare/denoise/decode/total median and p99 over --frames frames (CUDA events), FPS, speedup against
stock eager (when its JSON is given or in the same run) and the output's PSNR against our exact path (drift; with
random weights it catches bugs, it does not score quality). Weights: the preset's fixed N(0, 0.02) init.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

STAGES = ("prepare", "denoise", "decode", "total")
ROWS = ("stock eager", "stock compile", "exact", "+attention", "+compile", "+dbcache dynamic", "+dbcache static",
        "+taef2 (dbcache dynamic)", "+taef2 (dbcache static)")


def frame(size: int) -> np.ndarray:
    """A smooth deterministic frame (no dataset needed on the GPU host)."""
    rng = np.random.default_rng(0)
    base = rng.random((size // 32 + 1, size // 32 + 1, 3))
    img = np.kron(base, np.ones((32, 32, 1)))[:size, :size]
    return (np.clip(img + 0.05 * rng.random((size, size, 3)), 0, 1) * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def summarize(name: str, samples: dict[str, list[float]], output: np.ndarray, note: str = "") -> dict:
    row = {"row": name, "frames": len(samples["total"]), "note": note}
    for stage in STAGES:
        row[f"{stage}_median"] = statistics.median(samples[stage])
        row[f"{stage}_p99"] = float(np.percentile(samples[stage], 99))
    row["fps"] = 1000.0 / row["total_median"]
    row["_output"] = output
    # Printed as soon as measured, so a run cut short by a time limit still reports its finished rows.
    print(f"row done: {name}: " + " ".join(f"{s} {row[f'{s}_median']:.2f}/{row[f'{s}_p99']:.2f}" for s in STAGES), flush=True)
    return row


def frame_counts(name: str, args) -> tuple[int, int]:
    """(frames, warm-up frames) of a row: all for a row --only names, --parity-frames for "exact" when --only
    leaves it out (rows split over several cards: it shows each card times alike), else 0: set up, not measured."""
    if not args.only or name in args.only:
        return args.frames, args.warmup
    if name == "exact" and args.parity_frames > 0:
        return args.parity_frames, args.warmup
    return 0, 0


class _HostClock:
    """The part of torch.cuda.Event the timer uses, on the host clock (CPU dry runs of this script)."""

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: "_HostClock") -> float:
        return (other.t - self.t) * 1000.0


class StockStageTimer:
    """Stage boundaries of a stock pipeline call from transformer hooks: first step start and last step end."""

    def __init__(self, transformer) -> None:
        self.events: list[torch.cuda.Event] = []
        transformer.register_forward_pre_hook(lambda *_: self._first())
        transformer.register_forward_hook(lambda *_: self._last())

    def _event(self):
        e = torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else _HostClock()
        e.record()
        return e

    def start(self) -> None:
        self.begin, self.denoise_start, self.denoise_end = self._event(), None, None

    def _first(self) -> None:
        if self.denoise_start is None:
            self.denoise_start = self._event()

    def _last(self) -> None:
        self.denoise_end = self._event()

    def stop(self) -> dict[str, float]:
        end = self._event()
        end.synchronize()
        return {
            "prepare": self.begin.elapsed_time(self.denoise_start),
            "denoise": self.denoise_start.elapsed_time(self.denoise_end),
            "decode": self.denoise_end.elapsed_time(end),
            "total": self.begin.elapsed_time(end),
        }


def run_stock(editor, image, emb, args) -> list[dict]:
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(
        scheduler=editor.scheduler, vae=editor.vae, text_encoder=editor.text_encoder,
        tokenizer=editor.tokenizer, transformer=editor.transformer, is_distilled=True,
    )
    pipe.set_progress_bar_config(disable=True)
    pil, timer = PIL.Image.fromarray(image), StockStageTimer(pipe.transformer)

    def once():
        timer.start()
        out = pipe(image=[pil], prompt_embeds=emb.embeds, num_inference_steps=args.steps, guidance_scale=1.0,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
        return out, timer.stop()

    def measure(name, note=""):
        frames, warmup = frame_counts(name, args)
        for _ in range(warmup):
            once()
        samples = {s: [] for s in STAGES}
        for _ in range(max(frames, 1)):  # a row set up but not measured still runs once for its output
            out, t = once()
            for s in STAGES:
                samples[s].append(t[s])
        if not frames:
            return {"row": name, "_output": out, "_skipped": True}
        return summarize(name, samples, out, note)

    rows = [measure("stock eager")]
    compiled = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks, pipe.vae.encoder, pipe.vae.decoder]
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend)
    pipe.vae.encoder.compile(backend=args.compile_backend)
    pipe.vae.decoder.compile(backend=args.compile_backend)
    rows.append(measure("stock compile", "compile_repeated_blocks(fullgraph) + VAE encoder/decoder, inductor"))
    for module in compiled:
        module._compiled_call_impl = None  # back to eager: later rows start from unpatched modules
    return rows


def run_ours(editor, image, emb, args) -> list[dict]:
    from rtedit.accel.attention_probe import select_attention_backend
    from rtedit.accel.dbcache import CachingConfig, attach_cache
    from rtedit.accel.compile import CompileConfig, compile_regions
    from rtedit.config import ShapeBuckets
    from rtedit.accel.taef2 import load_taef2

    def measure(name, note=""):
        frames, warmup = frame_counts(name, args)
        for _ in range(warmup):
            editor.edit(image, emb, steps=args.steps, seed=0)
        samples = {s: [] for s in STAGES}
        for _ in range(max(frames, 1)):
            res = editor.edit(image, emb, steps=args.steps, seed=0)
            for s in STAGES:
                samples[s].append(res.timings[s])
        if not frames:  # set up but not measured here; its output still anchors the drift column
            return {"row": name, "_output": res.array, "_skipped": True}
        row = summarize(name, samples, res.array, note)
        if editor.dbcache is not None:
            stats = editor.dbcache.stats()
            row["dbcache"] = {k: stats[k] for k in ("policy", "label", "config", "groups")}
        if editor.compiled is not None:
            branches = editor.compiled.stats()["branches"]
            row["recompiles"] = {n: b["recompiles"] for n, b in branches.items()}
            assert all(v == 0 for v in row["recompiles"].values()), f"recompiled after warm-up: {row['recompiles']}"
        return row

    rows = [measure("exact", "no approximation: equals the stock pipeline on CPU float32")]

    def finished() -> bool:  # every row --only names is measured: skip setting up the later ones
        return bool(args.only) and set(args.only) <= {r["row"] for r in rows if not r.get("_skipped")}

    if finished():
        return rows
    # +attention: the start-up probe on the real shapes picks the fastest correct kernel.
    with torch.inference_mode():
        plan = editor._prepare(image, emb, (), args.steps, 0, None, None)
        editor.attention = select_attention_backend(editor.transformer, plan.step_inputs(plan.latents, plan.timesteps[0], editor.dtype))
    row = measure("+attention", f"chosen {editor.attention.chosen}")
    row["attention_probe"] = editor.attention.stats()["probe"]
    rows.append(row)
    if finished():
        return rows

    # +compile: transformer blocks and VAE encoder/decoder as separate branches, the frame's bucket warmed.
    editor.config = dataclasses.replace(editor.config, buckets=ShapeBuckets(sizes=((args.size, args.size),), references=(0,)))
    editor.compiled = compile_regions(CompileConfig(enabled=True, backend=args.compile_backend), transformer=editor.transformer,
                                      vae_encoder=editor.vae.encoder, vae_decoder=editor.vae.decoder)
    editor.codec.reference_context = lambda: editor.compiled.eager("vae_encoder")
    editor.compiled.warm_up([0], lambda _: editor.edit(image, emb, steps=args.steps, seed=0))
    rows.append(measure("+compile", "inductor, static shapes, warmed"))
    if finished():
        return rows

    for policy in ("dynamic", "static"):
        if editor.dbcache is not None:
            editor.dbcache.detach()
        editor.dbcache = attach_cache(editor.transformer, CachingConfig(enabled=True, policy=policy))
        note = "serving policy" if policy == "dynamic" else "TIMING ONLY: caches step 2 unconditionally"
        rows.append(measure(f"+dbcache {policy}", note))
        if finished():
            return rows

    taef2 = load_taef2(args.taef2_dir, device=editor.device, dtype=editor.dtype)
    taef2_regions = compile_regions(CompileConfig(enabled=True, transformer=False, backend=args.compile_backend), vae_encoder=taef2.encoder, vae_decoder=taef2.decoder)
    editor.codec.taef2 = taef2
    editor.codec.reference_context = lambda: taef2_regions.eager("vae_encoder")
    for policy in ("dynamic", "static"):
        editor.dbcache.detach()
        editor.dbcache = attach_cache(editor.transformer, CachingConfig(enabled=True, policy=policy))
        if policy == "dynamic":
            taef2_regions.warm_up([0], lambda _: editor.edit(image, emb, steps=args.steps, seed=0))
        note = "serving policy" if policy == "dynamic" else "TIMING ONLY: static DBCache"
        rows.append(measure(f"+taef2 (dbcache {policy})", note))
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print("| row | prepare | denoise | decode | total median | total p99 | frames | FPS | x stock eager | PSNR vs exact | card | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['speedup_vs_stock_eager']:.2f}" if "speedup_vs_stock_eager" in r else "-"
        drift = f"{r['psnr_vs_exact_db']:.1f}" if r.get("psnr_vs_exact_db") is not None else "-"
        print(f"| {r['row']} | {r['prepare_median']:.1f} | {r['denoise_median']:.1f} | {r['decode_median']:.1f} | "
              f"{r['total_median']:.1f} | {r['total_p99']:.1f} | {r['frames']} | {r['fps']:.1f} | {speed} | {drift} | "
              f"{r.get('card_uuid', '')[-8:]} | {r['note']} |")
    for r in rows:
        if "dbcache" in r:
            print(f"{r['row']}: dbcache {json.dumps(r['dbcache'], default=str)}")
        if "attention_probe" in r:
            for p in r["attention_probe"]:
                print(f"  attention probe {p}")


def merge(paths: list[str]) -> int:
    """One table from runs whose rows were split over processes or cards (--only): speedups against the stock
    eager row, wherever it ran; every row keeps the card it ran on."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (ROWS.index(r["row"]), -r["frames"]))
    stock = next(r for r in rows if r["row"] == "stock eager")
    for r in rows:
        r["speedup_vs_stock_eager"] = stock["total_median"] / r["total_median"]
    cards = sorted({run["card"] for run in runs})
    print_table(rows, f"merged from {len(paths)} runs: {', '.join(cards)}, {runs[0]['date']}, {runs[0]['size']}x{runs[0]['size']}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--merge"]:
        return merge(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rows", choices=["stock", "ours", "all"], default="all")
    parser.add_argument("--only", nargs="+", default=None, choices=ROWS, metavar="ROW",
                        help="measure only these rows; the others are set up (their effect kept) but not timed")
    parser.add_argument("--parity-frames", type=int, default=0,
                        help="with --only: time the exact row over this many frames as well, to compare cards")
    parser.add_argument("--reference", default=None, help="JSON of an earlier --rows stock run on the same card")
    parser.add_argument("--taef2-dir", default=None, help="TAEF2 weights folder (default: rtedit.paths.taef2_dir())")
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="klein-4b-random", choices=["klein-4b-random", "tiny"], help="tiny: CPU dry run")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of every compiled row")
    args = parser.parse_args()
    if args.frames < 1 or args.parity_frames < 0:
        parser.error(f"--frames must be >= 1 and --parity-frames >= 0, got {args.frames} and {args.parity_frames}")
    if not torch.cuda.is_available() and args.model != "tiny":
        raise SystemExit("frame_latency needs a CUDA GPU for klein-4b-random (use --model tiny for a CPU dry run)")

    import diffusers
    import transformers

    from rtedit.editor import Editor

    editor = Editor.from_preset(args.model)
    if args.model == "tiny":
        # DBCache needs a middle block to skip in each group; tiny has one double block, so the dry run gets three.
        from diffusers import Flux2Transformer2DModel

        from rtedit.presets import TINY_TRANSFORMER

        editor.transformer = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 3, "num_single_layers": 3}).eval()
    image = frame(args.size)
    emb = editor.encode_prompt("make it winter")
    rows = []
    if args.rows in ("stock", "all"):
        rows += run_stock(editor, image, emb, args)
    if args.rows in ("ours", "all"):
        rows += run_ours(editor, image, emb, args)

    stock = next((r for r in rows if r["row"] == "stock eager"), None)
    if stock is None and args.reference:
        with open(args.reference) as fh:
            stock = next(r for r in json.load(fh)["rows"] if r["row"] == "stock eager")
    exact = next((r for r in rows if r["row"] == "exact"), None)
    rows = [r for r in rows if not r.get("_skipped")]
    for r in rows:
        if stock and not stock.get("_skipped"):
            r["speedup_vs_stock_eager"] = stock["total_median"] / r["total_median"]
        if exact is not None:
            r["psnr_vs_exact_db"] = psnr(r["_output"], exact["_output"])
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    uuid = str(torch.cuda.get_device_properties(0).uuid) if torch.cuda.is_available() else "cpu"
    for r in rows:
        r["card_uuid"] = uuid
    print_table(rows, f"{card} ({uuid}), {datetime.date.today()}, {args.model} {editor.dtype}, {args.size}x{args.size}, "
                      f"{args.steps} steps, 1 input image, prompt cached")
    result = {
        "card": card, "card_uuid": uuid, "date": str(datetime.date.today()), "size": args.size, "steps": args.steps,
        "frames": args.frames,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "rows": [{k: v for k, v in r.items() if k != "_output"} for r in rows],
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
