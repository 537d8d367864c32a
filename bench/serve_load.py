"""Load benchmark of the Serve app (not a test): many websocket clients, flicker, and Serve's per-frame cost.

    python bench/serve_load.py                          # starts a local cluster with deployments/serve.yaml's app
    python bench/serve_load.py --url http://host:8000   # against a running service (memory is then not measured)
    python bench/serve_load.py --config deployments/serve-gpu.yaml   # on a GPU host

Phases:
1. load: --clients rtedit.client sessions, each like the web page: a camera makes --fps frames a second for
   --duration seconds and the session sends the newest while fewer than --max-in-flight (2, as on the page; 0:
   unthrottled) of its frames are unanswered; camera frames never sent are client-side drops, frames the session
   mailbox overwrote are server-side drops, frames in flight on a connection that broke are lost. Reports
   processed FPS, drop rate, p50/p99 send-to-reply latency, the p99 of the last 10 s against the first 10 s
   (frames must not pile up before the mailbox), the p99 outside the router (transport, proxy, mailbox) to show
   where frames wait, and the RSS of the Serve processes before and after.
2. flicker: one session, a 512x512 window slowly panning over a photo; mean absolute frame-to-frame change of
   the output against that of the input (a still camera should give a still picture).
3. overhead: 512x512 JPEG frames one at a time over the websocket against Editor.edit called directly in this
   process (the --config app's engine, same steps, seed, output format): the difference is what Serve itself
   costs per frame.
Prints a Markdown table (paste into bench/RESULTS.md) and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # deployments/ (platform/ itself never goes on sys.path)


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


async def one_client(k: int, url: str, api_key: str | None, frames: list[bytes], fps: float, duration: float,
                     max_in_flight: int, prompt: str | None, drain_s: float, log: list) -> dict:
    """One web page (deployments/static/app.js) through rtedit.client: a camera makes frame i at i/fps s and hands
    it to the session, which sends the newest while fewer than max_in_flight (0: no limit) of its frames are
    unanswered; camera frames replaced before they went out are client-side drops. Log rows: (send offset,
    latency, router time, engine time, reply offset) in seconds, offsets from this client's first camera frame."""
    from rtedit.client import AsyncClient, Backoff, ClientError, EditFailed

    stats = {"camera": 0, "sent": 0, "processed": 0, "errors": 0, "server_dropped": 0, "client_dropped": 0,
             "unanswered": 0, "lost": 0, "reconnects": 0, "closed": None}
    start = time.perf_counter()

    async def reader(session) -> None:
        while True:
            try:
                edit = await session.receive()
            except EditFailed:  # an error reply: counted in the session's stats; the stream goes on
                continue
            if edit.sent_at is not None:
                timings = edit.timings
                log.append((edit.sent_at - start, edit.latency_ms / 1000, timings.get("server", math.nan) / 1000,
                            timings.get("total", math.nan) / 1000, edit.received_at - start))

    # A session that cannot connect within 10 s is a result to report (refused or unreachable), not a wait.
    client = AsyncClient(url, api_key=api_key, timeout_s=120, backoff=Backoff(give_up_after_s=10))
    session = client.session(f"{prompt} #{k % 4}" if prompt else None, max_in_flight=max_in_flight,
                             max_unread=1024)
    try:
        async with client, session:
            reader_task = asyncio.create_task(reader(session))
            period, camera = 1.0 / fps, 0
            start = time.perf_counter()
            while (now := time.perf_counter()) - start < duration:
                newest = int((now - start) / period)  # the camera frame showing now
                while camera <= newest:  # every frame the camera made reaches the session, which keeps the newest
                    session.send(frames[(camera + k) % len(frames)])
                    camera += 1
                await asyncio.sleep(max(0.0, start + camera * period - time.perf_counter()))
            try:
                await session.flush(drain_s)  # let frames in flight come back, so slow ones are counted
            except TimeoutError:
                pass
            reader_task.cancel()
            await asyncio.gather(reader_task, return_exceptions=True)
    except ClientError as exc:
        stats["closed"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        s = session.stats
        stats.update(camera=s.frames, sent=s.sent, processed=s.edits, errors=s.errors,
                     server_dropped=s.server_dropped, client_dropped=s.client_dropped,
                     unanswered=s.in_flight + s.pending, lost=s.lost, reconnects=s.reconnects)
    return stats


def serve_usage() -> dict[str, dict[str, float]]:
    """RSS (MiB) and CPU time (s) of this machine's Serve processes (proxy, controller, replicas), by process
    title, plus this process and its waited-for children (the load clients)."""
    import psutil

    out: dict[str, dict[str, float]] = {}
    for p in psutil.process_iter(["cmdline", "memory_info", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::Serve") or cmd.startswith("ray::ProxyActor"):
            # The title carries the running method ("ray::ServeController.listen_for_change"): keep the actor.
            usage = out.setdefault(cmd.split()[0].split(".")[0], {"rss_mib": 0.0, "cpu_s": 0.0})
            usage["rss_mib"] += p.info["memory_info"].rss / 2**20
            usage["cpu_s"] += p.info["cpu_times"].user + p.info["cpu_times"].system
    me = psutil.Process()
    cpu = me.cpu_times()
    out["load clients (this process)"] = {"rss_mib": math.nan,
                                          "cpu_s": cpu.user + cpu.system + cpu.children_user + cpu.children_system}
    return out


def sample_serve_rss(samples: list, t0: float, stop: threading.Event, every_s: float = 5.0) -> None:
    """(seconds since t0, total Serve RSS in MiB) every every_s until stop: growth shows as a slope."""
    while True:
        usage = serve_usage()
        samples.append((round(time.time() - t0, 1),
                        round(sum(u["rss_mib"] for name, u in usage.items() if name.startswith("ray::")), 1)))
        if stop.wait(every_s):
            return


async def _clients(url: str, api_key: str | None, ids: list[int], fps: float, duration: float, max_in_flight: int,
                   drain_s: float, size: int, prompt: str | None, t0: float) -> tuple:
    base = photo(max(size, 64))
    frames = [to_jpeg(np.roll(base, s, axis=1)) for s in range(0, 40, 4)]
    log: list = []
    await asyncio.sleep(max(0.0, t0 - time.time()))
    results = await asyncio.gather(*[one_client(k, url, api_key, frames, fps, duration, max_in_flight, prompt,
                                                drain_s, log) for k in ids],
                                   return_exceptions=True)
    return [r if not isinstance(r, Exception) else {"failed": repr(r)[:200]} for r in results], log


def _clients_proc(job: tuple) -> tuple:
    return asyncio.run(_clients(*job))


def load_phase(url: str, api_key: str | None, clients: int, fps: float, duration: float, max_in_flight: int,
               drain_s: float, size: int, procs: int, prompt: str | None, sample_rss: bool) -> dict:
    """Clients spread over `procs` processes (one Python process may not keep up with many unthrottled clients).
    With sample_rss, the Serve processes' RSS every 5 s from the common start (they must be on this machine)."""
    import multiprocessing as mp

    t0 = time.time() + 5.0 + procs  # a common start, after every process is up
    groups = [list(range(clients))[i::procs] for i in range(procs)]
    jobs = [(url, api_key, g, fps, duration, max_in_flight, drain_s, size, prompt, t0) for g in groups if g]
    rss_samples: list[tuple[float, float]] = []
    sampling = threading.Event()
    if sample_rss:
        threading.Thread(target=sample_serve_rss, args=(rss_samples, t0, sampling), daemon=True).start()
    if procs > 1:
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            parts = pool.map(_clients_proc, jobs)
    else:
        parts = [_clients_proc(jobs[0])]
    sampling.set()
    results = [r for part in parts for r in part[0]]
    log = [x for part in parts for x in part[1]]
    ok = [r for r in results if "failed" not in r]
    failures = [r["failed"] for r in results if "failed" in r] + [r["closed"] for r in ok if r["closed"]]
    total = {key: sum(r[key] for r in ok) for key in ("camera", "sent", "processed", "errors", "server_dropped",
                                                      "client_dropped", "unanswered", "lost", "reconnects")}
    client_dropped = total["client_dropped"]
    rows = np.asarray(log, float).reshape(-1, 5)
    sent_at, replied_at = rows[:, 0], rows[:, 4]
    latency_ms, router_ms, engine_ms = rows[:, 1] * 1000, rows[:, 2] * 1000, rows[:, 3] * 1000
    first, last = sent_at < 10, sent_at >= duration - 10
    # Send-to-reply minus the router's time: websocket transport, Serve's proxy and the session mailbox.
    outside_router_ms = latency_ms - router_ms
    return {
        "clients": clients, "procs": procs, "fps_per_client": fps, "duration_s": duration, "frame_px": size,
        "max_in_flight": max_in_flight, "client_failures": len(failures), "failure_examples": failures[:3],
        **total,
        "drop_rate": (client_dropped + total["server_dropped"]) / total["camera"] if total["camera"] else math.nan,
        "processed_fps": int((replied_at < duration).sum()) / duration,
        "latency_p50_ms": pct(latency_ms, 50), "latency_p99_ms": pct(latency_ms, 99),
        "p99_first10_ms": pct(latency_ms[first], 99), "p99_last10_ms": pct(latency_ms[last], 99),
        "p99_last_over_first": pct(latency_ms[last], 99) / pct(latency_ms[first], 99),
        "router_p50_ms": pct(router_ms, 50), "engine_p50_ms": pct(engine_ms, 50),
        "editor_busy": float(engine_ms[replied_at < duration].sum()) / 1000 / duration,
        "outside_router_p99_first10_ms": pct(outside_router_ms[first], 99),
        "outside_router_p99_last10_ms": pct(outside_router_ms[last], 99),
        "rss_mib_by_s": rss_samples,
    }


# ---- phase 2: flicker -----------------------------------------------------------------------------------------


def flicker_phase(url: str, api_key: str | None, prompt: str, n: int, size: int = 512, step_px: int = 2) -> dict:
    from rtedit.client import Client

    big = photo(size + n * step_px + 8)
    inputs = [np.ascontiguousarray(big[:size, i * step_px:i * step_px + size]) for i in range(n)]
    outputs = []
    with Client(url, api_key=api_key, timeout_s=600) as client, client.session(prompt, max_in_flight=1) as session:
        for arr in inputs:
            session.send(to_jpeg(arr, 95))
            outputs.append(session.receive(timeout=600).array.astype(np.float32) / 255)  # EditFailed stops the run
    ins = [a.astype(np.float32) / 255 for a in inputs]
    d_in = float(np.mean([np.abs(b - a).mean() for a, b in zip(ins, ins[1:])]))
    d_out = float(np.mean([np.abs(b - a).mean() for a, b in zip(outputs, outputs[1:])]))
    return {"frames": n, "pan_px_per_frame": step_px, "input_change": d_in, "output_change": d_out,
            "ratio": d_out / d_in if d_in else float("nan")}


# ---- phase 3: Serve's own per-frame cost ------------------------------------------------------------------------


def overhead_phase(url: str, api_key: str | None, prompt: str, n: int, engine, size: int = 512,
                   threads: int | None = 1) -> dict:
    """Serve round trips and direct Editor.edit calls (engine: the EditorConfig the app serves; None: no direct
    baseline) interleaved, so both see the same machine load."""
    from rtedit.client import Client

    frame = to_jpeg(photo(size), 90)
    editor = emb = None
    if engine:
        import torch

        from rtedit.editor import Editor

        if threads:
            torch.set_num_threads(threads)  # as many threads as a CPU replica gets (Ray sets OMP_NUM_THREADS)
        editor = Editor.from_config(engine)
        emb = editor.encode_prompt(prompt)
    serve_ms, server_total, direct = [], [], []
    with Client(url, api_key=api_key, timeout_s=600) as client, client.session(prompt, max_in_flight=1) as session:
        for i in range(n + 2):
            t = time.perf_counter()
            session.send(frame)
            reply = session.receive(timeout=600)  # an EditFailed stops the run: its numbers would mean nothing
            elapsed = (time.perf_counter() - t) * 1000
            if editor is not None:
                t = time.perf_counter()
                editor.edit(frame, emb, steps=2, seed=0, output_format="jpeg")
                direct_ms = (time.perf_counter() - t) * 1000
            if i >= 2:  # the first frames pay for the prompt's embedding transfer and warm-up
                serve_ms.append(elapsed)
                server_total.append(reply.timings["total"])
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


def app_spec(config: Path, overrides: list[str] = ()) -> tuple:
    """The first application of a Serve YAML with `section.key=value` overrides: (its name, its checked AppArgs)."""
    import yaml

    from deployments.config import AppArgs
    from rtedit.config_parsing import parse_override, set_dotted
    from rtedit.errors import ConfigError

    spec = yaml.safe_load(config.read_text())["applications"][0]
    args = spec.get("args") or {}
    for item in overrides:
        try:
            set_dotted(args, *parse_override(item, "--set"))
        except ConfigError as exc:
            raise SystemExit(str(exc)) from None
    return spec["name"], AppArgs.model_validate(args)


def start_local(config: Path, num_cpus: int, direct_ingress: bool = False, overrides: list[str] = ()):
    """A fresh local cluster running the app of a Serve YAML (like `serve run`). direct_ingress: Serve 2.60's
    RAY_SERVE_ENABLE_DIRECT_INGRESS, the router replica serving HTTP on a port of its own (the proxy's hop left out);
    the URL returned is that port's."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # read at import by the controller and the replicas
    import ray
    from ray import serve

    from deployments.app import build_app

    name, app_args = app_spec(config, overrides)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                   os.environ.get("PYTHONPATH")]))}})
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(app_args), name=name, route_prefix="/")
    return direct_ingress_url() if direct_ingress else "http://127.0.0.1:8000"


def direct_ingress_url() -> str:
    """The router replica's own HTTP port: Serve allocates it from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT (30000)."""
    import urllib.request

    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    for port in range(low, low + 16):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return f"http://127.0.0.1:{port}"
        except OSError:
            continue
    raise RuntimeError(f"no direct-ingress router answered /healthz on ports {low}-{low + 15}")


def rss_growth(load: dict, early_s: float, late_s: float) -> str:
    """The sampled Serve RSS nearest early_s and late_s seconds into the run."""
    samples = load.get("rss_mib_by_s")
    if not samples:
        return "not measured"
    (t1, m1), (t2, m2) = (min(samples, key=lambda sample: abs(sample[0] - s)) for s in (early_s, late_s))
    return f"{m1:.0f} (at {t1:.0f} s) -> {m2:.0f} (at {t2:.0f} s)"


def markdown(res: dict) -> str:
    load, fl, ov = res.get("load", {}), res.get("flicker", {}), res.get("overhead", {})
    nan = float("nan")
    rows = [
        ("machine", res["machine"]),
        ("config", " ".join([res["config"], *res.get("overrides", [])])),
        ("clients x fps x s (frame px; client processes)", f"{load.get('clients')} x {load.get('fps_per_client')} x "
         f"{load.get('duration_s')} ({load.get('frame_px')}; {load.get('procs')})"),
        ("max frames in flight per client", load.get("max_in_flight") or "unlimited"),
        ("camera frames / sent / processed", f"{load.get('camera')} / {load.get('sent')} / {load.get('processed')}"),
        ("dropped by client / by server", f"{load.get('client_dropped')} / {load.get('server_dropped')}"),
        ("drop rate (of camera frames)", f"{load.get('drop_rate', nan):.3f}"),
        ("errors / unanswered / failed clients", f"{load.get('errors')} / {load.get('unanswered')} / "
                                                 f"{load.get('client_failures')}"),
        ("lost on broken connections / reconnects", f"{load.get('lost')} / {load.get('reconnects')}"),
        ("processed FPS", f"{load.get('processed_fps', nan):.1f}"),
        ("latency p50 / p99 (ms, send to reply)", f"{load.get('latency_p50_ms', nan):.0f} / "
                                                  f"{load.get('latency_p99_ms', nan):.0f}"),
        ("p99 first 10 s -> last 10 s (ms)", f"{load.get('p99_first10_ms', nan):.0f} -> "
         f"{load.get('p99_last10_ms', nan):.0f} ({load.get('p99_last_over_first', nan):.2f}x)"),
        ("router time / engine time p50 (ms)", f"{load.get('router_p50_ms', nan):.0f} / "
                                               f"{load.get('engine_p50_ms', nan):.0f}"),
        ("editor busy (engine time / run time)", f"{load.get('editor_busy', nan):.2f}"),
        ("p99 outside the router, first -> last 10 s (ms)", f"{load.get('outside_router_p99_first10_ms', nan):.0f}"
         f" -> {load.get('outside_router_p99_last10_ms', nan):.0f}"),
        ("Serve RSS before -> after (MiB)", f"{sum(res.get('rss_before_mib', {}).values()):.0f} -> "
                                            f"{sum(res.get('rss_after_mib', {}).values()):.0f}"),
        ("Serve RSS 10 s into the run -> end of sending (MiB)", rss_growth(load, 10, load.get("duration_s", 0))),
        ("Serve RSS 60 s into the run -> end of sending (MiB)", rss_growth(load, 60, load.get("duration_s", 0))),
        ("CPU s during load + drain", ", ".join(f"{name.removeprefix('ray::ServeReplica:rtedit:')} {s:.0f}"
                                                   for name, s in res.get("load_cpu_s", {}).items())),
    ]
    router = "ray::ServeReplica:rtedit:Router"
    if router in res.get("load_cpu_s", {}) and router in res.get("idle_cpu_per_s", {}) and load.get("processed"):
        busy = res["load_cpu_s"][router] - res["idle_cpu_per_s"][router] * res["load_wall_s"]
        rows.append(("router CPU per processed frame, less its idle rate (ms)",
                     f"{1000 * busy / load['processed']:.2f} (idle {1000 * res['idle_cpu_per_s'][router]:.0f} "
                     f"ms/s)"))
    if fl:
        rows.append(("flicker: output / input change", f"{fl['output_change']:.4f} / {fl['input_change']:.4f} "
                                                       f"(ratio {fl['ratio']:.2f})"))
    if ov:
        rows += [
            ("512px: Serve round trip p50 (ms)", f"{ov['serve_round_trip_p50_ms']:.1f}"),
            ("512px: Editor.edit direct p50 (ms)", f"{ov.get('direct_edit_p50_ms', nan):.1f}"),
            ("512px: Serve cost per frame vs direct (ms)", f"{ov.get('serve_cost_per_frame_ms', nan):.1f}"),
            ("512px: round trip minus in-replica engine time (ms)", f"{ov['serve_cost_vs_replica_engine_ms']:.1f}"),
        ]
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="http(s):// or ws(s)://host:port of a running service (default: start one "
                                  "locally)")
    ap.add_argument("--api-key", default=os.environ.get("RTEDIT_API_KEY"),
                    help="the service's API key (default: $RTEDIT_API_KEY)")
    ap.add_argument("--prompt", help="the instruction (default: the service's default prompt, GET /api/info); the "
                                     "load phase's clients use it with one of four suffixes, so four prompts")
    ap.add_argument("--config", type=Path, default=REPO / "deployments" / "serve.yaml")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-in-flight", type=int, default=2,
                    help="unanswered frames a client allows, as the web page (0: unthrottled)")
    ap.add_argument("--drain", type=float, default=600,
                    help="seconds a client waits after the run for its unanswered frames (slow ones still count)")
    ap.add_argument("--size", type=int, default=128, help="load-phase frame side in pixels")
    ap.add_argument("--procs", type=int, default=1, help="client processes for the load phase")
    ap.add_argument("--idle-s", type=float, default=30,
                    help="seconds of an idle service first, to measure the CPU its processes use doing nothing")
    ap.add_argument("--flicker-frames", type=int, default=12)
    ap.add_argument("--overhead-frames", type=int, default=8)
    ap.add_argument("--direct-model", help="model of the direct Editor.edit baseline (default: the --config app's "
                                           "engine; '' to skip)")
    ap.add_argument("--direct-threads", type=int, default=1, help="torch threads of the direct baseline (0: default)")
    ap.add_argument("--machine", default=os.uname().nodename)
    ap.add_argument("--direct-ingress", action="store_true",
                    help="the local cluster with Serve's direct ingress: clients connect to the router replica's port")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override the --config app's arguments, e.g. router.frame_channel=serve (repeatable)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from rtedit.client import Client

    url = args.url or start_local(args.config, args.num_cpus, args.direct_ingress, args.set)
    prompt = args.prompt
    if prompt is None:
        with Client(url, api_key=args.api_key) as client:
            prompt = client.info()["defaults"]["prompt"]
        if not prompt:
            ap.error("the service has no default prompt (GET /api/info): pass --prompt")
    res: dict = {"machine": args.machine, "config": str(args.config.name if not args.url else args.url),
                 "overrides": args.set,
                 "prompt": prompt}
    local = not args.url
    # Quiet-machine phases first: the load phase leaves replicas busy with its last frames.
    if args.overhead_frames:
        engine = app_spec(args.config, args.set)[1].engine
        if args.direct_model is not None:
            engine = dataclasses.replace(engine, model=args.direct_model) if args.direct_model else None
        res["overhead"] = overhead_phase(url, args.api_key, prompt, args.overhead_frames, engine,
                                         threads=args.direct_threads or None)
    if args.flicker_frames:
        res["flicker"] = flicker_phase(url, args.api_key, prompt, args.flicker_frames)
    if local and args.idle_s:
        # Serve's replicas spend CPU while idle (long polls, metrics, health checks): the rate to take off the load's.
        quiet = serve_usage()
        time.sleep(args.idle_s)
        res["idle_cpu_per_s"] = {name: (u["cpu_s"] - quiet[name]["cpu_s"]) / args.idle_s
                                 for name, u in serve_usage().items() if name in quiet}
    if local:
        before = serve_usage()
        load_started = time.monotonic()
    res["load"] = load_phase(url, args.api_key, args.clients, args.fps, args.duration, args.max_in_flight,
                             args.drain, args.size, args.procs, prompt, sample_rss=local)
    if local:
        time.sleep(5)
        after = serve_usage()
        res["rss_before_mib"] = {name: u["rss_mib"] for name, u in before.items() if name.startswith("ray::")}
        res["rss_after_mib"] = {name: u["rss_mib"] for name, u in after.items() if name.startswith("ray::")}
        # CPU seconds over the load phase (and its drain), per process: who takes the machine's cores.
        res["load_cpu_s"] = {name: after[name]["cpu_s"] - before[name]["cpu_s"] for name in after if name in before}
        res["load_wall_s"] = time.monotonic() - load_started
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
