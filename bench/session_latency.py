"""The causal `session` path against the full path, in one process on one card, every row built from a config.

    python bench/session_latency.py --size 512 --frames 50 --json out/session-512.json
    python bench/session_latency.py --model tiny --size 64 --frames 3 --warmup 1      # CPU dry run

Rows: deployments/serve-gpu.yaml's replica config (frame_latency.serving_config) with the step-2 reuse off and one
bucket, at 0 and 1 reference images, each as `full` (the model's full attention) and `session` (`EditorConfig.causal="session"`: random preset weights run in that mode,
timing only). A session row opens one `Session` (its T/R pass, booked once as `session`) and times its frames,
which run I's pass and X's steps against the stored keys and values: `denoise` is the transformer's time per
frame wherever a frame's passes are booked. The FLOP ratio beside each measured ratio counts the linear layers
and attention of klein-4B's 25 blocks (26 D^2 per token plus 4 q k D per layer, D = 3072). A last row runs the
session path with its step-2 reuse, static policy (timing only: random weights never pass the dynamic check), and
prints its drift against the session row without reuse.

    python bench/session_latency.py --as-served --frames 20      # the session path exactly as serve-gpu.yaml serves it

`--as-served`: one editor, serve-gpu.yaml's replica config with `causal: session` and nothing else changed (every
bucket compiled and captured at start-up, the serving reuse policy, its graphs), a session per bucket timed at that
bucket, zero recompiles after warm-up asserted across all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys

import numpy as np

import frame_latency as fl  # bench/ is the script's folder, so its sibling imports by name
from rtedit.config import ShapeBuckets

PASS_STAGES = ("prepare", "session", "denoise", "decode", "total")


def flops(tokens_q: int, tokens_k: int, d: int = 3072, layers: int = 25) -> float:
    """One pass of `tokens_q` query tokens attending to `tokens_k` keys through klein-4B's blocks."""
    return layers * (26 * d * d * tokens_q + 4 * tokens_q * tokens_k * d)


def flop_ratio(size: int, refs: int, steps: int, text: int = 512) -> float:
    """Full path FLOPs over the session path's per frame (the T/R pass is per session, not per frame)."""
    n = (size // 16) ** 2
    full = steps * flops(text + n * (2 + refs), text + n * (2 + refs))
    session = flops(n, text + n * (1 + refs)) + steps * flops(n, text + n * (2 + refs))
    return full / session


REUSE_ROW = "session, 0 ref, step-2 reuse static (timing only)"


GRAPHS = " + graphs"


def row_configs(serving, size: int, with_reuse: bool = True, graphs: bool = False) -> dict[str, object]:
    """full/session x 0/1 references: the serving config without reuse, one bucket each; then the session row with
    the serving config's dbcache settings driving the session path's own step-2 reuse, static policy (on random
    weights the dynamic check never passes, so only the static policy times what a reused step costs). `graphs`:
    every row again with CUDA graphs over its stages (rtedit.accel.cuda_graphs), named with GRAPHS appended."""
    base = dataclasses.replace(serving, dbcache=dataclasses.replace(serving.dbcache, enabled=False), cuda_graphs=False)
    rows = {}
    for refs in (0, 1):
        bucket = dataclasses.replace(base.buckets, sizes=((size, size),), references=(refs,))
        for mode in ("off", "session"):
            name = f"{'full' if mode == 'off' else 'session'}, {refs} ref"
            rows[name] = dataclasses.replace(base, buckets=bucket, causal=mode)
    if with_reuse:
        reuse = dataclasses.replace(serving.dbcache, enabled=True, policy="static")
        rows[REUSE_ROW] = dataclasses.replace(rows["session, 0 ref"], dbcache=reuse)
    if graphs:  # each row, then its graphed twin: a run cut short still has its pairs
        rows = {n: c for name, cfg in rows.items()
                for n, c in ((name, cfg), (name + GRAPHS, dataclasses.replace(cfg, cuda_graphs=True)))}
    return rows


def same_editor_parity(editor, frame) -> float:
    """Max abs difference of one frame through the editor's CUDA graphs and the same frame without them, on the same
    editor (same compiled kernels and weights): what the graphs change, apart from any build-to-build difference."""
    graphed = frame()
    graphs, editor.graphs = editor.graphs, None
    try:
        eager = frame()
    finally:
        editor.graphs = graphs
    return float(np.abs(graphed - eager).max())


def time_session(session, image: np.ndarray, args):
    """The session's first frame (its T/R pass happens there, once), the warm-up, then per-stage samples."""
    first = session.edit(image, steps=args.steps)
    for _ in range(args.warmup):
        session.edit(image, steps=args.steps)
    samples = {s: [] for s in PASS_STAGES}
    for _ in range(args.frames):
        t = session.edit(image, steps=args.steps).timings
        for s in PASS_STAGES:
            samples[s].append(t.get(s, 0.0))
    return first, samples


def run_row(name: str, config, image: np.ndarray, emb, args) -> dict:
    # A 1-step row's model serves 1 step, as the DMDR student's rtedit.json says: warmed and captured at it.
    editor = served_steps_editor(config, 1) if args.one_step and args.steps == 1 else fl.build(config)
    refs = [fl.frame(args.size)[::-1].copy()] * config.buckets.references[0]
    session = editor.open_session(emb, refs, bucket=(args.size, args.size))
    first, samples = time_session(session, image, args)
    stats = editor.stats()
    recompiles = {n: b["recompiles"] for n, b in stats["compile"].get("branches", {}).items()}
    assert not any(recompiles.values()), f"{name}: recompiled after warm-up: {recompiles}"
    graph_vs_eager = None
    if config.cuda_graphs:
        assert stats["cuda_graphs"]["unwarmed_runs"] == 0, f"{name}: frames outside the captured graphs"
        graph_vs_eager = same_editor_parity(editor, lambda s=session: s.edit(image, steps=args.steps).array)
    reuse = stats["step_reuse"]
    row = {"row": name, "frames": args.frames, "steps": args.steps, "recompiles": recompiles, "mode": editor.mode,
           "session_pass_ms": first.timings.get("session"), "attention": stats["attention_backend"],
           "output": first.array, "graph_vs_eager_max_abs": graph_vs_eager, "reuse_hit_rate": reuse.get("hit_rate"), "reuse_label": reuse.get("label"),
           **{f"{s}_median": statistics.median(v) for s, v in samples.items()},
           "total_p99": float(np.percentile(samples["total"], 99))}
    print(f"row done: {name}: " + " ".join(f"{s} {row[f'{s}_median']:.2f}" for s in PASS_STAGES), flush=True)
    session.close()
    del editor, session
    fl.release()
    return row


def served_steps_editor(config, steps: int):
    """The config's editor (Editor.from_config's checks) on a preset whose sidecar serves `steps` steps only."""
    from rtedit.editor import Editor

    config.validate()
    return Editor.from_preset(config.model, config.device, config.dtype, config, steps=(steps,))


ONE_STEP = "session, 0 ref, 1 step"
ONE_STEP_FP8 = "session fp8, 0 ref, 1 step"
TWO_STEP_FULL = "full, 0 ref, 2 steps"


def one_step_configs(serving, size: int) -> dict[str, tuple[object, int]]:
    """The 1-step causal student's frame (the DMDR issue's served student: random weights, timing only) in bf16 and
    with FP8 linear layers, beside the full 2-step path, all with CUDA graphs: (config, steps) by row name."""
    rows = row_configs(serving, size, with_reuse=False, graphs=False)
    session, full = (dataclasses.replace(rows[n], cuda_graphs=True) for n in ("session, 0 ref", "full, 0 ref"))
    fp8 = dataclasses.replace(session, fp8=dataclasses.replace(session.fp8, enabled=True))
    return {TWO_STEP_FULL + GRAPHS: (full, 2), ONE_STEP + GRAPHS: (session, 1), ONE_STEP_FP8 + GRAPHS: (fp8, 1)}


AS_SERVED = "session as served (serve-gpu.yaml, causal session)"


def as_served_rows(serving, emb, args) -> list[dict]:
    """One editor built as a replica builds it in session mode; a session per warmed bucket, timed there."""
    config = dataclasses.replace(serving, causal="session")
    if args.model == "tiny":  # CPU dry run: its one double block leaves no middle block to reuse; no CUDA graphs
        config = dataclasses.replace(config, dbcache=dataclasses.replace(config.dbcache, enabled=False),
                                     cuda_graphs=False)
    editor = fl.build(config)
    rows = []
    for height, width in config.buckets.sizes:
        image = fl.frame(height) if height == width else fl.frame(max(height, width))[:height, :width].copy()
        session = editor.open_session(emb, [], bucket=(height, width))
        first, samples = time_session(session, image, args)
        parity = None  # the graphed frame against the same editor's eager frame (both decide the reuse alike)
        if config.cuda_graphs:
            parity = same_editor_parity(editor, lambda s=session, im=image: s.edit(im, steps=args.steps).array)
        session.close()
        rows.append({"row": f"{AS_SERVED} @{height}x{width}", "frames": args.frames, "steps": args.steps,
                     "session_pass_ms": first.timings.get("session"), "graph_vs_eager_max_abs": parity,
                     **{f"{s}_median": statistics.median(v) for s, v in samples.items()},
                     "total_p99": float(np.percentile(samples["total"], 99))})
        print(f"row done: {rows[-1]['row']}: " + " ".join(f"{s} {rows[-1][f'{s}_median']:.2f}" for s in PASS_STAGES),
              flush=True)
    stats = editor.stats()
    recompiles = {n: b["recompiles"] for n, b in stats["compile"].get("branches", {}).items()}
    assert not any(recompiles.values()), f"{AS_SERVED}: recompiled after warm-up: {recompiles}"
    if config.cuda_graphs:
        assert stats["cuda_graphs"]["unwarmed_runs"] == 0, f"{AS_SERVED}: frames outside the captured graphs"
    for row in rows:
        row.update(recompiles=recompiles, mode=editor.mode, attention=stats["attention_backend"],
                   cuda_graphs=stats.get("cuda_graphs"), reuse=stats["step_reuse"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--model", default="klein-4b-random", choices=["klein-4b-random", "tiny"])
    p.add_argument("--json", default=None)
    p.add_argument("--graphs", action="store_true", help="every row again with CUDA graphs (a GPU only)")
    p.add_argument("--one-step", action="store_true",
                   help="only the 1-step session rows (bf16, FP8) beside the full 2-step row, with CUDA graphs")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW", help="with --one-step: these of its rows")
    p.add_argument("--as-served", action="store_true", help="serve-gpu.yaml in session mode, every bucket, one editor")
    args = p.parse_args()
    if args.model == "tiny":  # the tiny preset's one double block leaves no middle block to reuse: no reuse row
        serving = fl.serving_config({"model": "tiny", "dtype": "float32", "compile": {"backend": "eager"}})
    else:
        serving = fl.serving_config()
    configs = {}
    if args.one_step:
        configs = {n: c for n, c in one_step_configs(serving, args.size).items() if not args.only or n in args.only}
    elif not args.as_served:
        configs = {n: (c, args.steps) for n, c in row_configs(serving, args.size, with_reuse=args.model != "tiny",
                                                             graphs=args.graphs).items()}
    # The prompt's embedding, from an editor with the text encoder and no fast path (replicas have none).
    encoder = fl.build(dataclasses.replace(serving, text_encoder=True, select_attention=False, buckets=ShapeBuckets(),
                                           cuda_graphs=False,
                                           compile=dataclasses.replace(serving.compile, enabled=False),
                                           dbcache=dataclasses.replace(serving.dbcache, enabled=False)))
    emb = encoder.encode_prompt(fl.PROMPT)
    del encoder
    fl.release()
    if args.as_served:
        rows = as_served_rows(serving, emb, args)
        card, uuid = fl.card()
        print(f"{card} ({uuid}), {datetime.date.today()}, {args.model}, {args.steps} steps, prompt cached")
        for r in rows:
            print(f"| {r['row']} | prepare {r['prepare_median']:.1f} | denoise {r['denoise_median']:.1f} | decode "
                  f"{r['decode_median']:.1f} | total {r['total_median']:.1f} | p99 {r['total_p99']:.1f} | T/R pass "
                  f"{r['session_pass_ms']:.1f} |")
        print("recompiles", rows[0]["recompiles"], "reuse", rows[0]["reuse"], "graphs", rows[0]["cuda_graphs"])
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"card": card, "card_uuid": uuid, "date": str(datetime.date.today()), "rows": rows}, fh,
                          indent=2, default=str)
        return 0
    image = fl.frame(args.size)
    rows, failed = [], []
    for name, (cfg, steps) in configs.items():
        try:
            rows.append(run_row(name, cfg, image, emb, argparse.Namespace(**{**vars(args), "steps": steps})))
        except Exception as exc:  # reported; the other rows of the one GPU call still run
            failed.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:800]}")
            print("row failed:", failed[-1], flush=True)
            fl.release()
    card, uuid = fl.card()
    print(f"{card} ({uuid}), {datetime.date.today()}, {args.model}, {args.size}x{args.size}, {args.steps} steps, "
          f"prompt cached, no step-2 reuse but in the last row")
    print("| row | prepare | session (per frame) | denoise | decode | total median | total p99 | T/R pass once "
          "| denoise full/session | FLOP ratio | attention |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by_name = {r["row"]: r for r in rows}
    drift = None
    graph_diffs = {r["row"]: float(np.abs(r["output"] - by_name[r["row"][:-len(GRAPHS)]]["output"]).max())
                   for r in rows if r["row"].endswith(GRAPHS) and r["row"][:-len(GRAPHS)] in by_name}
    if REUSE_ROW in by_name:  # the reused step's drift: the same frame and seed with and without reuse
        plain, reused = by_name["session, 0 ref"]["output"], by_name[REUSE_ROW]["output"]
        drift = {"max_abs": float(np.abs(plain - reused).max()),
                 "psnr_db": float(10 * np.log10(1.0 / max(float(np.mean((plain - reused) ** 2)), 1e-12)))}
    for r in rows:
        r.pop("output")
        refs = int(r["row"].split(", ")[1][0])
        graphs = GRAPHS if r["row"].endswith(GRAPHS) else ""
        full = by_name.get(f"full, {refs} ref{graphs}") or by_name.get(TWO_STEP_FULL + graphs)
        ratio = f"{full['denoise_median'] / r['denoise_median']:.2f}" if r["mode"] == "session" and full else "-"
        ideal = f"{flop_ratio(args.size, refs, args.steps):.2f}" if r["row"].removesuffix(graphs) in (
            "session, 0 ref", "session, 1 ref") else "-"
        once = f"{r['session_pass_ms']:.1f}" if r["session_pass_ms"] is not None else "-"
        print(f"| {r['row']} | {r['prepare_median']:.1f} | {r['session_median']:.2f} | {r['denoise_median']:.1f} | "
              f"{r['decode_median']:.1f} | {r['total_median']:.1f} | {r['total_p99']:.1f} | {once} | {ratio} | "
              f"{ideal} | {r['attention']} |")
    reuse_row = by_name.get(REUSE_ROW)
    if reuse_row is not None:
        print(f"step-2 reuse ({reuse_row['reuse_label']}): hit rate {reuse_row['reuse_hit_rate']}, drift against the "
              f"session row without reuse on the same frame and seed: max abs {drift['max_abs']:.4f}, PSNR "
              f"{drift['psnr_db']:.1f} dB (random weights)")
    for name, diff in graph_diffs.items():
        print(f"{name}: max abs difference from the same row without graphs (another editor, first frame): "
              f"{diff:.3g}; on the same editor without its graphs: {by_name[name]['graph_vs_eager_max_abs']:.3g}")
    for line in failed:
        print("FAILED row", line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"card": card, "card_uuid": uuid, "date": str(datetime.date.today()), "size": args.size,
                       "steps": args.steps, "rows": rows, "reuse_drift": drift, "graph_diffs": graph_diffs,
                       "failed": failed}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
