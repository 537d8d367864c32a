"""Load benchmark of the Serve app (not a test): many websocket clients, flicker, and Serve's per-frame cost.

    python bench/serve_load.py                          # starts a local cluster with deployments/serve.yaml's app
    python bench/serve_load.py --url ws://host:8000     # against a running service (memory is then not measured)
    python bench/serve_load.py --config deployments/serve-gpu.yaml --direct-model klein-4b-random   # on a GPU host

Phases:
1. load: --clients websocket clients each send --fps frames a second for --duration seconds (no client-side
   throttling: the server's mailboxes drop what the editors cannot take). Reports processed FPS, drop rate,
   p50/p99 latency of processed frames, the p99 of the last 10 s against the first 10 s (frames must not pile up
   before the mailbox), and the RSS of the Serve processes before and after.
2. flicker: one session, a 512x512 window slowly panning over a photo; mean absolute frame-to-frame change of
   the output against that of the input (a still camera should give a still picture).
3. overhead: 512x512 JPEG frames one at a time over the websocket against Editor.edit called directly in this
   process (same model, steps, seed, output format): the difference is what Serve itself costs per frame.
Prints a Markdown table (paste into bench/RESULTS.md) and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # deployments/ (platform/ itself never goes on sys.path)

from rtedit.transport import decode_reply, encode_frame  # noqa: E402


def to_jpeg(arr: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo(size: int) -> np.ndarray:
    from skimage import data

    img = PIL.Image.fromarray(data.astronaut()).resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(img)


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if len(values) else float("nan")


# ---- phase 1: load ---------------------------------------------------------------------------------------------


async def one_client(k: int, url: str, frames: list[bytes], fps: float, duration: float, t0: float, prompt: str,
                     log: list) -> dict:
    # t0: the shared start as time.time(); offsets in the log are wall-clock seconds since it.
    """One camera: a frame every 1/fps s. A client that falls behind skips frames rather than bursting
    (counted in `skipped`), so an overloaded load generator cannot pile frames up itself."""
    import websockets

    sent_at: dict[int, float] = {}
    stats = {"sent": 0, "skipped": 0, "processed": 0, "errors": 0, "dropped": 0, "closed": None}

    async def reader(ws):
        async for message in ws:
            if isinstance(message, str):
                continue
            reply = decode_reply(message)
            now = time.perf_counter()
            stats["dropped"] = max(stats["dropped"], reply.meta.get("dropped", 0))
            if reply.error is not None:
                stats["errors"] += 1
                continue
            stats["processed"] += 1
            sent = sent_at.pop(reply.id, None)
            if sent is not None:
                log.append((time.time() - (now - sent) - t0, now - sent))

    try:
        async with websockets.connect(url, max_size=2**24, open_timeout=120, ping_interval=None) as ws:
            reader_task = asyncio.create_task(reader(ws))
            period, i, start = 1.0 / fps, 0, time.perf_counter()
            while True:
                now = time.perf_counter()
                if now - start >= duration:
                    break
                due = start + i * period
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > period:
                    behind = int((now - due) / period)
                    stats["skipped"] += behind
                    i += behind
                meta = {"id": i, **({"prompt": f"{prompt} #{k % 4}"} if stats["sent"] == 0 else {})}
                sent_at[i] = time.perf_counter()
                await ws.send(encode_frame(meta, frames[(i + k) % len(frames)]))
                stats["sent"] += 1
                i += 1
            await asyncio.sleep(3.0)  # let in-flight frames come back
            reader_task.cancel()
    except Exception as exc:  # noqa: BLE001 - a closed connection is a result to report, not a crash
        stats["closed"] = repr(exc)[:200]
    return stats


def serve_rss() -> dict[str, float]:
    """RSS (MiB) of this machine's Serve processes (proxy, controller, replicas), by process title."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::ServeReplica") or cmd.startswith("ray::ProxyActor") or cmd.startswith("ray::Serve"):
            name = cmd.split()[0]
            out[name] = out.get(name, 0.0) + p.info["memory_info"].rss / 2**20
    return out


async def _clients(url: str, ids: list[int], fps: float, duration: float, size: int, t0: float) -> tuple:
    base = photo(max(size, 64))
    frames = [to_jpeg(np.roll(base, s, axis=1)) for s in range(0, 40, 4)]
    log: list = []
    await asyncio.sleep(max(0.0, t0 - time.time()))
    results = await asyncio.gather(*[one_client(k, url, frames, fps, duration, t0, "make it look like winter", log)
                                     for k in ids], return_exceptions=True)
    return [r if not isinstance(r, Exception) else {"failed": repr(r)[:200]} for r in results], log


def _clients_proc(job: tuple) -> tuple:
    return asyncio.run(_clients(*job))


def load_phase(url: str, clients: int, fps: float, duration: float, size: int, procs: int) -> dict:
    """Clients spread over `procs` processes (one Python process cannot generate 64 x 30 fps of JPEG frames)."""
    import multiprocessing as mp

    t0 = time.time() + 5.0 + procs  # a common start, after every process is up
    groups = [list(range(clients))[i::procs] for i in range(procs)]
    jobs = [(url, g, fps, duration, size, t0) for g in groups if g]
    if procs > 1:
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            parts = pool.map(_clients_proc, jobs)
    else:
        parts = [_clients_proc(jobs[0])]
    results = [r for part in parts for r in part[0]]
    log = [x for part in parts for x in part[1]]
    ok = [r for r in results if "failed" not in r]
    failures = [r["failed"] for r in results if "failed" in r] + [r["closed"] for r in ok if r["closed"]]
    sent = sum(r["sent"] for r in ok)
    processed = sum(r["processed"] for r in ok)
    dropped = sum(r["dropped"] for r in ok)
    lat = [x[1] * 1000 for x in log]
    first = [x[1] * 1000 for x in log if x[0] < 10]
    last = [x[1] * 1000 for x in log if x[0] >= duration - 10]
    return {
        "clients": clients, "procs": procs, "fps_per_client": fps, "duration_s": duration, "frame_px": size,
        "client_failures": len(failures), "failure_examples": failures[:3], "sent": sent,
        "skipped_by_client": sum(r["skipped"] for r in ok), "send_rate": sent / duration,
        "processed": processed, "processed_fps": processed / duration, "errors": sum(r["errors"] for r in ok),
        "dropped": dropped, "drop_rate": dropped / sent if sent else float("nan"),
        "latency_p50_ms": pct(lat, 50), "latency_p99_ms": pct(lat, 99),
        "p99_first10_ms": pct(first, 99), "p99_last10_ms": pct(last, 99),
    }


# ---- phase 2: flicker -----------------------------------------------------------------------------------------


def flicker_phase(url: str, n: int, size: int = 512, step_px: int = 2) -> dict:
    from websockets.sync.client import connect

    big = photo(size + n * step_px + 8)
    inputs = [np.ascontiguousarray(big[:size, i * step_px:i * step_px + size]) for i in range(n)]
    outputs = []
    with connect(url, max_size=2**24, open_timeout=120) as ws:
        for i, arr in enumerate(inputs):
            meta = {"id": i, **({"prompt": "make it look like a watercolor painting"} if i == 0 else {})}
            ws.send(encode_frame(meta, to_jpeg(arr, 95)))
            reply = decode_reply(ws.recv(timeout=600))
            if reply.error is not None:
                raise RuntimeError(f"flicker frame {i} failed: {reply.error}")
            outputs.append(np.asarray(PIL.Image.open(io.BytesIO(reply.image)).convert("RGB"), np.float32) / 255)
    ins = [a.astype(np.float32) / 255 for a in inputs]
    d_in = float(np.mean([np.abs(b - a).mean() for a, b in zip(ins, ins[1:])]))
    d_out = float(np.mean([np.abs(b - a).mean() for a, b in zip(outputs, outputs[1:])]))
    return {"frames": n, "pan_px_per_frame": step_px, "input_change": d_in, "output_change": d_out,
            "ratio": d_out / d_in if d_in else float("nan")}


# ---- phase 3: Serve's own per-frame cost ------------------------------------------------------------------------


def overhead_phase(url: str, n: int, model: str | None, size: int = 512, threads: int | None = 1) -> dict:
    """Serve round trips and direct Editor.edit calls interleaved, so both see the same machine load."""
    from websockets.sync.client import connect

    frame = to_jpeg(photo(size), 90)
    prompt = "make it look like a watercolor painting"
    editor = emb = None
    if model:
        import torch

        from rtedit.config import EditorConfig
        from rtedit.editor import Editor

        if threads:
            torch.set_num_threads(threads)  # as many threads as a CPU replica gets (Ray sets OMP_NUM_THREADS)
        editor = Editor.from_config(EditorConfig(model=model))
        emb = editor.encode_prompt(prompt)
    serve_ms, server_total, direct = [], [], []
    with connect(url, max_size=2**24, open_timeout=120) as ws:
        for i in range(n + 2):
            t = time.perf_counter()
            ws.send(encode_frame({"id": i, **({"prompt": prompt} if i == 0 else {})}, frame))
            reply = decode_reply(ws.recv(timeout=600))
            if reply.error is not None:
                raise RuntimeError(f"overhead frame {i} failed: {reply.error}")
            elapsed = (time.perf_counter() - t) * 1000
            if editor is not None:
                t = time.perf_counter()
                editor.edit(frame, emb, steps=2, seed=0, output_format="jpeg")
                direct_ms = (time.perf_counter() - t) * 1000
            if i >= 2:  # the first frames pay for the prompt's embedding transfer and warm-up
                serve_ms.append(elapsed)
                server_total.append(reply.meta["timings"]["total"])
                if editor is not None:
                    direct.append(direct_ms)
    out = {"frames": n, "frame_px": size, "serve_round_trip_p50_ms": pct(serve_ms, 50),
           "engine_total_in_replica_p50_ms": pct(server_total, 50),
           "serve_cost_vs_replica_engine_ms": pct(serve_ms, 50) - pct(server_total, 50)}
    if editor is not None:
        out["direct_edit_p50_ms"] = pct(direct, 50)
        out["serve_cost_per_frame_ms"] = out["serve_round_trip_p50_ms"] - out["direct_edit_p50_ms"]
    return out


# ---- driver --------------------------------------------------------------------------------------------------


def start_local(config: Path, num_cpus: int):
    """A fresh local cluster running the app of a Serve YAML (like `serve run`)."""
    import yaml

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppArgs

    spec = yaml.safe_load(config.read_text())
    app_spec = spec["applications"][0]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                   os.environ.get("PYTHONPATH")]))}})
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(AppArgs.model_validate(app_spec.get("args", {}))), name=app_spec["name"], route_prefix="/")
    return "ws://127.0.0.1:8000"


def markdown(res: dict) -> str:
    load, fl, ov = res.get("load", {}), res.get("flicker", {}), res.get("overhead", {})
    rows = [
        ("machine", res["machine"]),
        ("config", res["config"]),
        ("clients x fps x s (frame px; client processes)", f"{load.get('clients')} x {load.get('fps_per_client')} x "
         f"{load.get('duration_s')} ({load.get('frame_px')}; {load.get('procs')})"),
        ("frames sent (achieved send rate) / skipped by client", f"{load.get('sent')} "
         f"({load.get('send_rate', 0):.0f}/s) / {load.get('skipped_by_client')}"),
        ("processed FPS", f"{load.get('processed_fps', 0):.2f}"),
        ("drop rate", f"{load.get('drop_rate', 0):.3f}"),
        ("errors / failed clients", f"{load.get('errors')} / {load.get('client_failures')}"),
        ("latency p50 / p99 (ms)", f"{load.get('latency_p50_ms', 0):.0f} / {load.get('latency_p99_ms', 0):.0f}"),
        ("p99 first 10 s -> last 10 s (ms)", f"{load.get('p99_first10_ms', 0):.0f} -> "
                                              f"{load.get('p99_last10_ms', 0):.0f}"),
        ("Serve RSS before -> after (MiB)", f"{res.get('rss_before_mib', float('nan')):.0f} -> "
                                            f"{res.get('rss_after_mib', float('nan')):.0f}"),
        ("flicker: output / input change", f"{fl.get('output_change', 0):.4f} / {fl.get('input_change', 0):.4f} "
                                           f"(ratio {fl.get('ratio', 0):.2f})"),
        ("512px: Serve round trip p50 (ms)", f"{ov.get('serve_round_trip_p50_ms', 0):.1f}"),
        ("512px: Editor.edit direct p50 (ms)", f"{ov.get('direct_edit_p50_ms', float('nan')):.1f}"),
        ("512px: Serve cost per frame vs direct (ms)", f"{ov.get('serve_cost_per_frame_ms', float('nan')):.1f}"),
        ("512px: round trip minus in-replica engine time (ms)",
         f"{ov.get('serve_cost_vs_replica_engine_ms', float('nan')):.1f}"),
    ]
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="ws://host:port of a running service (default: start one locally)")
    ap.add_argument("--config", type=Path, default=REPO / "deployments" / "serve.yaml")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--size", type=int, default=128, help="load-phase frame side in pixels")
    ap.add_argument("--procs", type=int, default=1, help="client processes for the load phase")
    ap.add_argument("--flicker-frames", type=int, default=12)
    ap.add_argument("--overhead-frames", type=int, default=8)
    ap.add_argument("--direct-model", default="tiny", help="model for the direct Editor.edit baseline ('' to skip)")
    ap.add_argument("--direct-threads", type=int, default=1, help="torch threads of the direct baseline (0: default)")
    ap.add_argument("--machine", default=os.uname().nodename)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    url = args.url or start_local(args.config, args.num_cpus)
    ws_url = url.rstrip("/") + "/ws/predict"
    res: dict = {"machine": args.machine, "config": str(args.config.name if not args.url else args.url)}
    local = not args.url
    # Quiet-machine phases first: the load phase leaves replicas busy with its last frames.
    if args.overhead_frames:
        res["overhead"] = overhead_phase(ws_url, args.overhead_frames, args.direct_model or None,
                                         threads=args.direct_threads or None)
    if args.flicker_frames:
        res["flicker"] = flicker_phase(ws_url, args.flicker_frames)
    if local:
        res["rss_before_mib"] = sum(serve_rss().values())
    res["load"] = load_phase(ws_url, args.clients, args.fps, args.duration, args.size, args.procs)
    if local:
        time.sleep(5)
        res["rss_after_mib"] = sum(serve_rss().values())
    print(json.dumps(res, indent=1))
    print(markdown(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if local:
        from ray import serve

        import ray

        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
