"""Frame latency of our path against stock diffusers, one optimization at a time, in one process on one card.

    python bench/frame_latency.py --size 512 --frames 500 --rows stock   --json out/stock-512.json
    python bench/frame_latency.py --size 512 --frames 500 --rows ours    --json out/ours-512.json --reference out/stock-512.json
    python bench/frame_latency.py --merge out/*.json      # one table from rows split over processes (--only)
    python bench/frame_latency.py --model tiny --size 64 --frames 3 --warmup 1   # CPU dry run

klein-4b-random in bf16 on one GPU, one input image, 2 steps, one prompt embedding (computed once by an editor with
a text encoder, then passed to every row). Rows:
  stock: "stock eager" (Flux2KleinPipeline), then "stock compile" (compile_repeated_blocks + VAE encoder/decoder);
  ours:  each row is an EditorConfig built fresh with Editor.from_config (the previous editor freed first):
         "exact" is deployments/serve-gpu.yaml's replica config with every optimization off and no buckets; each
         next row adds one: "+attention" (probed kernel), "+compile" (selective, the frame's bucket warmed),
         "+dbcache dynamic", "+dbcache static" (timing only), "+taef2" (with each policy); "serving configuration"
         is exactly load_engine_config("deployments/serve-gpu.yaml").for_replica() (its 512 and 1024 buckets).
Each row: prepare/denoise/decode/total median and p99 over --frames frames (CUDA events), FPS, speedup against
stock eager (its JSON given, or in the same run), PSNR against our exact path (drift; with random weights it
catches bugs, it does not score quality); every compiled row asserts zero recompiles after warm-up. Weights: the
preset's seeded N(0, 0.02) init, the same in every row. --model tiny (CPU dry run): a tiny folder with 3 + 3
blocks (DBCache needs a middle block to skip), float32, the eager backend, the YAML's buckets scaled by --size/512.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import faulthandler
import functools
import gc
import json
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import yaml
from rtedit.config import EditorConfig, ShapeBuckets, engine_section, load_engine_config
from rtedit.stage_timer import StageTimer

REPO = Path(__file__).resolve().parents[1]
SERVE_GPU = REPO / "deployments" / "serve-gpu.yaml"
PROMPT = "make it winter"
STAGES = ("prepare", "denoise", "decode", "total")
SERVING = "serving configuration"
GRAPHS = " + graphs"
OURS = ("exact", "+attention", "+compile", "+dbcache dynamic", "+dbcache static", "+taef2 (dbcache dynamic)",
        "+taef2 (dbcache static)", SERVING)
# The serving configuration's variants (issue: engine speed): reuse off or static, CUDA graphs, FP8 linear layers.
VARIANTS = ("serving, no reuse", "serving, no reuse + graphs", "serving, static reuse", "serving, static reuse + graphs",
            "serving fp8, no reuse", "serving fp8, no reuse + graphs", "serving fp8, static reuse",
            "serving fp8, static reuse + graphs")
ROWS = ("stock eager", "stock compile", *OURS, *VARIANTS)


# ---- the rows as configs ---------------------------------------------------------------------------------------
@functools.cache
def tiny_model_dir() -> str:
    """The tiny preset saved as a diffusers folder with 3 double and 3 single blocks, so DBCache has a middle block
    to skip and Editor.from_config (and a Serve replica) loads it like any model; seeded, removed at exit."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from rtedit.presets import TINY_TRANSFORMER, build_preset, init_random_weights

    bundle = build_preset("tiny", torch.device("cpu"), torch.float32)
    transformer = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 3, "num_single_layers": 3}).eval()
    init_random_weights(transformer, 0)
    folder = tempfile.mkdtemp(prefix="rtedit-tiny-")
    atexit.register(shutil.rmtree, folder, True)
    Flux2KleinPipeline(scheduler=bundle.scheduler, vae=bundle.vae, text_encoder=bundle.text_encoder,
                       tokenizer=bundle.tokenizer, transformer=transformer, is_distilled=True).save_pretrained(folder)
    return folder


def engine_overrides(model: str = "klein-4b-random", size: int = 512, compile_backend: str | None = None,
                     taef2_dir: str | None = None) -> dict:
    """The command line's changes to serve-gpu.yaml's engine section, as nested YAML data; none for the GPU run."""
    section = engine_section(yaml.safe_load(SERVE_GPU.read_text()))
    over: dict = {}
    if model == "tiny":
        def scale(side: int) -> int:  # CPU-sized buckets of the same structure (512 and 1024 take minutes there)
            return max(64, side * size // 512 // 16 * 16)

        over = {"model": tiny_model_dir(), "dtype": "float32",
                "buckets": {"sizes": [[scale(h), scale(w)] for h, w in section["buckets"]["sizes"]]}}
        compile_backend = compile_backend or "eager"  # inductor on a CPU dry run compiles C++ for minutes
        if not torch.cuda.is_available():
            over["cuda_graphs"] = False  # the YAML captures CUDA graphs; a CPU dry run has none
    elif model != section["model"]:
        over["model"] = model
    if compile_backend:
        over["compile"] = {"backend": compile_backend}
    if taef2_dir:
        over["taef2_dir"] = taef2_dir
    return over


def merged(base: dict, over: dict) -> dict:
    """`base` with `over` laid on top, section by section (a YAML override of one nested key keeps the others)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def serving_config(overrides: dict | None = None) -> EditorConfig:
    """What a Serve replica of deployments/serve-gpu.yaml runs, with the command line's overrides."""
    section = engine_section(yaml.safe_load(SERVE_GPU.read_text()))
    changed = {k: merged(section.get(k) or {}, v) if isinstance(v, dict) else v for k, v in (overrides or {}).items()}
    return load_engine_config(SERVE_GPU, changed).for_replica()


def row_configs(serving: EditorConfig, size: int) -> dict[str, EditorConfig]:
    """Every "ours" row: the exact base, then each row the one before it plus one optimization, and the serving
    configuration as it is. tests/test_bench_configs.py holds each step to the fields it names."""
    def policy(config: EditorConfig, name: str) -> EditorConfig:
        return dataclasses.replace(config, dbcache=dataclasses.replace(config.dbcache, policy=name))

    exact = dataclasses.replace(
        serving, select_attention=False, autoencoder="vae", buckets=ShapeBuckets(), cuda_graphs=False,
        dbcache=dataclasses.replace(serving.dbcache, enabled=False, policy="dynamic"),
        compile=dataclasses.replace(serving.compile, enabled=False))
    rows = {"exact": exact, "+attention": dataclasses.replace(exact, select_attention=True)}
    rows["+compile"] = dataclasses.replace(rows["+attention"], compile=dataclasses.replace(exact.compile, enabled=True),
                                           buckets=ShapeBuckets(sizes=((size, size),), references=serving.buckets.references))
    rows["+dbcache dynamic"] = dataclasses.replace(rows["+compile"], dbcache=dataclasses.replace(exact.dbcache, enabled=True))
    rows["+dbcache static"] = policy(rows["+dbcache dynamic"], "static")
    rows["+taef2 (dbcache dynamic)"] = dataclasses.replace(rows["+dbcache dynamic"], autoencoder="taef2")
    rows["+taef2 (dbcache static)"] = policy(rows["+taef2 (dbcache dynamic)"], "static")
    rows[SERVING] = serving
    assert tuple(rows) == OURS
    rows.update(variant_configs(serving))
    return {name: config.validate() for name, config in rows.items()}


def variant_configs(serving: EditorConfig) -> dict[str, EditorConfig]:
    """VARIANTS: the serving configuration with its step-2 reuse off or static (timing only: random weights never
    pass the dynamic check), each with and without CUDA graphs, and with FP8 linear layers."""
    def variant(reuse: str, graphs: bool, fp8: bool = False) -> EditorConfig:
        dbcache = dataclasses.replace(serving.dbcache, enabled=reuse == "static", policy="static" if reuse == "static"
                                      else serving.dbcache.policy)
        return dataclasses.replace(serving, dbcache=dbcache, cuda_graphs=graphs,
                                   fp8=dataclasses.replace(serving.fp8, enabled=fp8))

    rows = {"serving, no reuse": variant("off", False), "serving, no reuse + graphs": variant("off", True),
            "serving, static reuse": variant("static", False), "serving, static reuse + graphs": variant("static", True),
            "serving fp8, no reuse": variant("off", False, True), "serving fp8, no reuse + graphs": variant("off", True, True),
            "serving fp8, static reuse": variant("static", False, True),
            "serving fp8, static reuse + graphs": variant("static", True, True)}
    assert tuple(rows) == VARIANTS
    return rows


def note(name: str, config: EditorConfig) -> str:
    if name == "exact":
        return "no approximation: equals the stock pipeline on CPU float32"
    if name == SERVING:
        return f"deployments/serve-gpu.yaml for_replica(), buckets {[list(s) for s in config.buckets.sizes]}"
    if name in VARIANTS:
        parts = ["cuda_graphs" if config.cuda_graphs else "", "fp8 " + config.fp8.granularity if config.fp8.enabled else "",
                 "TIMING ONLY: step 2 reused unconditionally" if "static" in name else ""]
        return "; ".join(p for p in parts if p)
    if "static" in name:
        return "TIMING ONLY: caches step 2 unconditionally"
    if name == "+compile":
        return f"{config.compile.backend}, static shapes, warmed"
    return ("TAEF2 encoder/decoder; " if "taef2" in name else "") + ("serving policy" if "dynamic" in name else "")


def build(config: EditorConfig):
    """One row's editor: the same entry point Serve, the CLI and the jobs use, fast path built and warmed."""
    from rtedit.editor import Editor

    return Editor.from_config(config)


def encoder_editor(configs: dict[str, EditorConfig]):
    """The exact row's editor with a text encoder: the prompt embedding every row is given (replicas have none)."""
    return build(dataclasses.replace(configs["exact"], text_encoder=True))


def release() -> None:
    """After dropping the last reference to an editor: its memory and compiled graphs go before the next is built."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- measuring -------------------------------------------------------------------------------------------------
def frame(size: int) -> np.ndarray:
    """A smooth deterministic frame (no dataset needed on the GPU host)."""
    rng = np.random.default_rng(0)
    base = rng.random((size // 32 + 1, size // 32 + 1, 3))
    img = np.kron(base, np.ones((32, 32, 1)))[:size, :size]
    return (np.clip(img + 0.05 * rng.random((size, size, 3)), 0, 1) * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.shape != b.shape:
        return None  # a bucket resized the frame: not comparable
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
    leaves it out (rows split over several cards: it shows each card times alike), else 0: not measured."""
    if not args.only or name in args.only:
        return args.frames, args.warmup
    if name == "exact" and args.parity_frames > 0:
        return args.parity_frames, args.warmup
    return 0, 0


def measure(name: str, once, frames: int, warmup: int, note: str = "") -> dict:
    """`once()` -> (output, stage timings) run warm-up + frames times; a row with 0 frames runs once for its output."""
    for _ in range(warmup):
        once()
    samples = {s: [] for s in STAGES}
    for _ in range(max(frames, 1)):
        out, t = once()
        for s in STAGES:
            samples[s].append(t[s])
    if not frames:
        return {"row": name, "_output": out, "_skipped": True}
    return summarize(name, samples, out, note)


class StockStageTimer:
    """Stage boundaries of a stock pipeline call from transformer hooks, on rtedit's StageTimer (CUDA events, or
    the host clock on a CPU): the first step's start ends prepare, the last step's end starts decode."""

    def __init__(self, transformer) -> None:
        self.device = transformer.device
        transformer.register_forward_pre_hook(lambda *_: self._step())
        transformer.register_forward_hook(lambda *_: self.timer.mark("step"))

    def start(self) -> None:
        self.timer, self.stepping = StageTimer(self.device), False

    def _step(self) -> None:
        if not self.stepping:
            self.timer.mark("prepare")
            self.stepping = True

    def stop(self) -> dict[str, float]:
        self.timer.mark("decode")
        t = self.timer.timings()
        return {"prepare": t["prepare"], "denoise": t["total"] - t["prepare"] - t["decode"], "decode": t["decode"],
                "total": t["total"]}


def run_stock(editor, image, emb, args, backend: str, rows: list[dict]) -> None:
    """Diffusers' own pipeline on the encoder editor's modules (freed after; our rows build their own); compiled
    with the backend of our compiled rows."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(scheduler=editor.scheduler, vae=editor.vae, text_encoder=editor.text_encoder,
                              tokenizer=editor.tokenizer, transformer=editor.transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    pil, timer = PIL.Image.fromarray(image), StockStageTimer(pipe.transformer)  # `once` reads `pil` when called

    def once():
        timer.start()
        out = pipe(image=[pil], prompt_embeds=emb.embeds, num_inference_steps=args.steps, guidance_scale=1.0,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
        return out, timer.stop()

    sizes = [args.size, *(s for s in args.also_size if s != args.size)]
    for size in sizes:
        pil = PIL.Image.fromarray(frame(size))
        rows.append(measure(sized("stock eager", size, args), once, *frame_counts("stock eager", args)))
    frames, warmup = frame_counts("stock compile", args)
    if frames:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
        pipe.vae.encoder.compile(backend=backend)
        pipe.vae.decoder.compile(backend=backend)
        for size in sizes:  # a new size recompiles during its warm-up frames
            pil = PIL.Image.fromarray(frame(size))
            rows.append(measure(sized("stock compile", size, args), once, frames, warmup,
                                f"compile_repeated_blocks(fullgraph) + VAE encoder/decoder, {backend}"))


def sized(name: str, size: int, args) -> str:
    return name if size == args.size else f"{name} @{size}"


def edit_once(editor, image, emb, steps: int) -> tuple[np.ndarray, dict]:
    res = editor.edit(image, emb, steps=steps, seed=0)
    return res.array, res.timings


def run_ours(configs: dict[str, EditorConfig], image, emb, args, rows: list[dict]) -> None:
    """Each row measured on an editor of its own; the exact row always runs (once at least): it anchors drift."""
    if args.only and not set(args.only) & (set(OURS) | set(VARIANTS)) and not args.parity_frames:
        return  # --only names stock rows alone
    # --only's order is the run's order (the exact row first): a run cut by its time limit has the rows named first.
    order = ["exact", *(n for n in args.only if n in configs and n != "exact")] if args.only else list(configs)
    for name in order:
        config = configs[name]
        frames, warmup = frame_counts(name, args)
        if not frames and name != "exact":
            continue
        try:
            run_row(name, config, image, emb, args, rows, frames, warmup)
        except Exception as exc:  # a failed row is reported and the others still run (one GPU call, many rows)
            print(f"row failed: {name}: {type(exc).__name__}: {' '.join(str(exc).split())[:600]}", flush=True)
            rows.append({"row": name, "_skipped": True, "failure": f"{type(exc).__name__}: {exc}"[:2000]})
        release()


def run_row(name: str, config: EditorConfig, image, emb, args, rows: list[dict], frames: int, warmup: int) -> None:
    """One row: its editor built from the config, timed, its stats checked (zero recompiles, every frame in a
    captured graph)."""
    started = time.perf_counter()
    editor = build(config)
    built_s = time.perf_counter() - started  # load, probe, compile and capture: what sizes a device call's rows
    print(f"{name}: editor built and warmed in {built_s:.0f} s, start-up phases (s) {editor.startup}", flush=True)
    row = measure(name, functools.partial(edit_once, editor, image, emb, args.steps), frames, warmup,
                  note(name, config))
    row["build_s"], row["startup_s"] = round(built_s, 1), dict(editor.startup)
    stats = editor.stats()
    if config.dbcache.enabled:
        row["dbcache"] = {k: stats["dbcache"][k] for k in ("policy", "label", "config", "groups")}
    if config.select_attention:
        row["attention_probe"] = stats["attention"]["probe"]
        row["note"] = f"chosen {stats['attention_backend']}; {row.get('note', '')}".rstrip("; ")
    if config.cuda_graphs:
        row["cuda_graphs"] = stats["cuda_graphs"]
        assert stats["cuda_graphs"]["unwarmed_runs"] == 0, f"{name}: a frame ran outside its captured graphs"
        from session_latency import same_editor_parity

        row["graph_vs_eager_max_abs"] = same_editor_parity(editor, lambda: edit_once(editor, image, emb, args.steps)[0])
        print(f"{name}: graphs against the same editor without them, max abs {row['graph_vs_eager_max_abs']:.3g}")
    if config.fp8.enabled:
        row["fp8"] = stats["fp8"]
    if config.compile.enabled:
        branches = stats["compile"]["branches"]
        row["recompiles"] = {n: b["recompiles"] for n, b in branches.items() if b["state"] != "off"}
        row["compile_failures"] = {n: b["failure"] for n, b in branches.items() if b["failure"]}
        assert all(v == 0 for v in row["recompiles"].values()), f"{name}: recompiled after warm-up: {row['recompiles']}"
    rows.append(row)
    twin = name.removesuffix(GRAPHS) if config.cuda_graphs and args.graph_twins else None
    if twin:
        rows.append(graphs_off(editor, twin, functools.partial(edit_once, editor, image, emb, args.steps), frames,
                               warmup, name))
    for size in args.also_size:  # the same warmed editor at its other buckets (the serving config warms 512 and 1024)
        if (size, size) in config.buckets.sizes and size != args.size:
            once = functools.partial(edit_once, editor, frame(size), emb, args.steps)
            rows.append(measure(f"{name} @{size}", once, frames, warmup, note(name, config)))
            if twin:
                rows.append(graphs_off(editor, f"{twin} @{size}", once, frames, warmup, name))


def graphs_off(editor, name: str, once, frames: int, warmup: int, graphed: str) -> dict:
    """A graphed row's twin timed on the same editor with its graphs set aside (same compiled kernels and weights):
    one build and one compile give both rows, which is what fits the rows of both sizes into one device call."""
    graphs, editor.graphs = editor.graphs, None
    try:
        return measure(name, once, frames, warmup, f"the editor of '{graphed}', its CUDA graphs set aside")
    finally:
        editor.graphs = graphs


# ---- reporting -------------------------------------------------------------------------------------------------
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
        if "attention_probe" in r:  # one line per row; the JSON keeps each kernel's errors
            print(f"{r['row']}: attention probe " + ", ".join(
                f"{p['name']} {p['ms']:.1f} ms" + (" (chosen)" if p["chosen"] else "") if p["ms"] is not None
                else f"{p['name']} unavailable" for p in r["attention_probe"]))


def merge(paths: list[str]) -> int:
    """One table from runs whose rows were split over processes or cards (--only): speedups against the stock
    eager row, wherever it ran; every row keeps the card it ran on."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (ROWS.index(r["row"].split(" @")[0]), -r["frames"]))
    stock = next(r for r in rows if r["row"] == "stock eager")
    for r in rows:
        r["speedup_vs_stock_eager"] = stock["total_median"] / r["total_median"]
    cards = sorted({run["card"] for run in runs})
    print_table(rows, f"merged from {len(paths)} runs: {', '.join(cards)}, {runs[0]['date']}, {runs[0]['size']}x{runs[0]['size']}")
    return 0


class Stopped(BaseException):  # not an Exception: a row's failure handler must not swallow the time limit
    """SIGTERM arrived (a time limit)."""


def _stop(*_) -> None:
    raise Stopped


def card() -> tuple[str, str]:
    """The card's name and UUID (results name the card they ran on)."""
    if not torch.cuda.is_available():
        return "CPU (dry run)", "cpu"
    return torch.cuda.get_device_name(), str(torch.cuda.get_device_properties(0).uuid)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rows", choices=["stock", "ours", "all"], default="all")
    p.add_argument("--only", nargs="+", default=None, choices=ROWS, metavar="ROW",
                   help="measure only these rows (others are not built; exact still runs once, for the drift column)")
    p.add_argument("--parity-frames", type=int, default=0,
                   help="with --only: time the exact row over this many frames as well, to compare cards")
    p.add_argument("--also-size", type=int, nargs="*", default=[],
                   help="time each of our rows' editors at these bucket sizes too (rows named 'ROW @SIZE')")
    p.add_argument("--graph-twins", action="store_true",
                   help="each '+ graphs' row also times its editor with the graphs set aside, as the row without them")
    p.add_argument("--reference", default=None, help="JSON of an earlier --rows stock run on the same card")
    p.add_argument("--taef2-dir", default=None, help="TAEF2 weights folder (default: rtedit.paths.taef2_dir())")
    p.add_argument("--json", default=None)
    p.add_argument("--dump-stacks-every", type=float, default=0, metavar="S",
                   help="every S seconds, every thread's Python stack to stderr (faulthandler): where a slow "
                        "start-up spends its time, even when a time limit ends the run")
    p.add_argument("--model", default="klein-4b-random", choices=["klein-4b-random", "tiny"], help="tiny: CPU dry run")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of every compiled row (default: the YAML's, inductor; tiny: eager)")
    return p


def main() -> int:
    if sys.argv[1:2] == ["--merge"]:
        return merge(sys.argv[2:])
    p = parser()
    args = p.parse_args()
    if args.frames < 1 or args.parity_frames < 0 or args.dump_stacks_every < 0:
        p.error(f"--frames must be >= 1, --parity-frames and --dump-stacks-every >= 0, got {args.frames}, "
                f"{args.parity_frames} and {args.dump_stacks_every}")
    if args.dump_stacks_every:
        faulthandler.dump_traceback_later(args.dump_stacks_every, repeat=True)
    if not torch.cuda.is_available() and args.model != "tiny":
        raise SystemExit("frame_latency needs a CUDA GPU for klein-4b-random (use --model tiny for a CPU dry run)")
    # Each start-up phase's begin and end (rtedit.fast_path.startup_phase) in the log: a row cut short by a time
    # limit while its editor builds still says which phase it was in.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("rtedit.fast_path").setLevel(logging.INFO)

    import diffusers
    import transformers

    configs = row_configs(serving_config(engine_overrides(args.model, args.size, args.compile_backend, args.taef2_dir)),
                          args.size)
    image, rows, dtype = frame(args.size), [], None
    signal.signal(signal.SIGTERM, _stop)  # `timeout` ends a long run: the finished rows still get a table and JSON
    try:
        encoder = encoder_editor(configs)
        emb, dtype = encoder.encode_prompt(PROMPT), encoder.dtype
        if args.rows != "ours":
            run_stock(encoder, image, emb, args, configs["+compile"].compile.backend, rows)
        encoder = None
        release()
        if args.rows != "stock":
            run_ours(configs, image, emb, args, rows)
    except Stopped:
        print("stopped by SIGTERM: the table and JSON hold the rows finished before it", flush=True)

    stock = next((r for r in rows if r["row"] == "stock eager"), None)
    if stock is None and args.reference:
        with open(args.reference) as fh:
            stock = next(r for r in json.load(fh)["rows"] if r["row"] == "stock eager")
    exact = next((r for r in rows if r["row"] == "exact"), None)
    failed = [r for r in rows if r.get("failure")]
    rows = [r for r in rows if not r.get("_skipped")]
    name, uuid = card()
    stock_at = {r["row"].partition(" @")[2]: r for r in rows if r["row"].partition(" @")[0] == "stock eager"}
    for r in rows:
        base = stock_at.get(r["row"].partition(" @")[2]) or (stock if " @" not in r["row"] else None)
        if base and not base.get("_skipped"):  # against stock eager at the row's own size
            r["speedup_vs_stock_eager"] = base["total_median"] / r["total_median"]
        if exact is not None:
            r["psnr_vs_exact_db"] = psnr(r["_output"], exact["_output"])
        r["card_uuid"] = uuid
    print_table(rows, f"{name} ({uuid}), {datetime.date.today()}, {args.model} {dtype}, {args.size}x{args.size}, "
                      f"{args.steps} steps, 1 input image, prompt cached")
    for r in failed:
        print(f"FAILED row {r['row']}: {r['failure']}")
    result = {
        "card": name, "card_uuid": uuid, "date": str(datetime.date.today()), "size": args.size, "steps": args.steps,
        "frames": args.frames,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "configs": {n: c.to_dict() for n, c in configs.items() if args.rows != "stock"},
        "rows": [{k: v for k, v in r.items() if k != "_output"} for r in rows],
        "failed": [{"row": r["row"], "failure": r["failure"]} for r in failed],
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
