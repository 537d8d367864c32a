"""What one router -> editor hop costs its caller (not a test): a Serve DeploymentHandle call, a Ray actor call and
the frame channel (deployments/frame_channel.py), each carrying a frame-sized payload there and back.

    python bench/frame_hop.py [--calls 300] [--payload 20000] [--num-cpus 2]

A deployment (the "router") calls the same `edit` on an editor deployment through its handle, on a plain Ray actor
through its actor handle, and on the editor deployment's own ChannelServer through a ChannelClient; CPU time is
the router process's (all its threads: Serve runs its handle's router on a loop thread of its own), wall time the
caller's await. Prints a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--payload", type=int, default=20000, help="bytes each way (a 128x128 JPEG is ~5-10 kB)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.frame_channel import ChannelClient, ChannelServer

    async def edit(job: dict, replica: str | None = None) -> dict:
        return {"image": job["image"], "timings": {"total": 1.0}, "replica": replica}

    @serve.deployment(max_ongoing_requests=4)
    class Editor:
        def __init__(self):
            self.channel = ChannelServer(edit, "127.0.0.1", 0)

        def address(self) -> dict:
            return self.channel.address()

        async def edit(self, job: dict, replica: str | None = None) -> dict:
            return await edit(job, replica)

    @ray.remote(num_cpus=0)
    class Actor:
        async def edit(self, job: dict, replica: str | None = None) -> dict:
            return await edit(job, replica)

    @serve.deployment
    class Router:
        def __init__(self, editor):
            self.editor, self.actor = editor, Actor.remote()

        async def run(self, calls: int, payload: int) -> dict:
            job = {"image": os.urandom(payload)}
            client = ChannelClient("editor", await self.editor.address.remote())
            hops = {"Serve handle": lambda: self.editor.edit.remote(job, replica="editor"),
                    "Ray actor": lambda: self.actor.edit.remote(job, replica="editor"),
                    "frame channel": lambda: client.call(job, "editor")}
            out = {}
            for name, hop in hops.items():
                for _ in range(20):  # warm: connections, the handle's replica list, code paths
                    await hop()
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(calls):
                    reply = await hop()
                    assert len(reply["image"]) == payload
                out[name] = {"cpu_ms": (time.process_time() - cpu) / calls * 1e3,
                             "wall_ms": (time.perf_counter() - wall) / calls * 1e3}
            client.close("done")
            return out

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        handle = serve.run(Router.bind(Editor.bind()), name="frame-hop", route_prefix=None)
        res = {"calls": args.calls, "payload_bytes": args.payload, "machine": os.uname().nodename,
               "cpus": os.cpu_count(), "hops": handle.run.remote(args.calls, args.payload).result()}
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(res, indent=1))
    print(f"| hop ({args.payload:,} B each way, {args.calls} calls, one at a time) | caller CPU a call (ms) | "
          "wall a call (ms) |\n| --- | --- | --- |")
    for name, r in res["hops"].items():
        print(f"| {name} | {r['cpu_ms']:.3f} | {r['wall_ms']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
