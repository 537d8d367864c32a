"""Admission and fair share for the editor replicas (issue 15, items 2-4 and 7).

- Capacity: each replica takes `capacity` sessions: `editor.admission.max_sessions` when set, else
  `max(1, floor(1000 / (frame_ms * target_fps)))` with frame_ms the engine time measured at start-up (`measure_engine`,
  padded to `min_frame_ms`), reduced to what the K/V store holds when a session keeps keys and values there.
- `ReplicaBook` (in each editor replica) is the authority: it admits a session or refuses it, holds one frame per
  session at a time, and once draining refuses new sessions and tells its sessions to reconnect.
- `Assignments` (in the router) is the table session -> replica (a session never moves while its replica lives;
  a new replica takes new sessions), the router's view of each replica's capacity, and a `FairQueue` per replica.
- `FairQueue`: at most `slots` frames in flight at a replica, at most one per session, waiting sessions served
  round-robin; a frame is dispatched only into a free slot, so Serve's request router never finds the replica full
  and never sits in its retry loop probing queue lengths.

Written by hand: Serve routes requests, but it has no notion of a session's capacity, of a per-session share of a
replica, or of refusing a session before its first frame.
"""

from __future__ import annotations

import asyncio
import collections
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rtedit.errors import EditError

if TYPE_CHECKING:
    from rtedit.editor import Editor

PROBE_FRAMES = 3  # timed frames after one untimed one; the median is the engine time


class NoCapacity(EditError):
    """No editor replica has room for another session (or one-shot frame): retry later."""

    code = "no_capacity"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Reconnect(EditError):
    """The session's replica is leaving (draining or scaled down): reconnect to get a live one."""

    code = "reconnect"


# ---- capacity ---------------------------------------------------------------------------------------------------
def fps_capacity(frame_ms: float, target_fps: float) -> int:
    """Sessions one replica serves at target_fps each when a frame takes frame_ms: max(1, floor(1000/(ms*fps)))."""
    if not frame_ms > 0 or not target_fps > 0:
        raise ValueError(f"frame_ms and target_fps must be > 0, got {frame_ms!r} and {target_fps!r}")
    return max(1, math.floor(1000.0 / (frame_ms * target_fps)))


def replica_capacity(*, max_sessions: int | None, target_fps: float, frame_ms: float, session_kv_bytes: int,
                     kv_max_bytes: int | None) -> dict[str, Any]:
    """The replica's session capacity and how it was reached (reported in admission_state)."""
    if max_sessions is not None:
        capacity, source = max_sessions, "configured"
    else:
        capacity, source = fps_capacity(frame_ms, target_fps), "target_fps"
    kv_sessions = None
    if session_kv_bytes > 0 and kv_max_bytes is not None:
        kv_sessions = kv_max_bytes // session_kv_bytes
        if kv_sessions < capacity:
            # At least one: a session whose K/V does not fit is still served, recomputing it each frame.
            capacity, source = max(1, kv_sessions), "kv_store"
    return {"capacity": capacity, "source": source, "frame_ms": frame_ms, "target_fps": target_fps,
            "session_kv_bytes": session_kv_bytes, "kv_max_bytes": kv_max_bytes, "kv_sessions": kv_sessions}


def measure_engine(editor: "Editor") -> dict[str, Any]:
    """The engine's time per frame (median of PROBE_FRAMES after one untimed frame, at the largest warm-up bucket)
    and, on a "session" model, the bytes one session keeps in the K/V store. Runs after the warm-up."""
    from rtedit.fast_path import gray, warm_buckets, warm_prompt

    h, w, refs = max(warm_buckets(editor), key=lambda b: (b[0] * b[1], b[2]))
    prompt, image, references = warm_prompt(editor), gray(h, w), [gray(h, w)] * refs
    times, kv_bytes = [], 0
    if editor.mode == "session" and editor.kv_store is not None:
        before = editor.kv_store.stats()["bytes"]
        session = editor.open_session(prompt, references, (h, w))
        try:
            session.edit(image, steps=editor.warm_steps, seed=0)  # computes and stores its K/V
            kv_bytes = editor.kv_store.stats()["bytes"] - before
            for _ in range(PROBE_FRAMES):
                t0 = time.perf_counter()
                session.edit(image, steps=editor.warm_steps, seed=0)
                times.append((time.perf_counter() - t0) * 1000)
        finally:
            session.close()
    else:
        def run() -> None:
            editor.edit(image, prompt, references=references, steps=editor.warm_steps, height=h, width=w)

        run()
        for _ in range(PROBE_FRAMES):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1000)
    return {"engine_ms": statistics.median(times), "session_kv_bytes": max(0, kv_bytes), "bucket": [h, w, refs]}


# ---- the replica's book -----------------------------------------------------------------------------------------
class ReplicaBook:
    """One editor replica's admitted sessions (the authority: routers ask it, it answers yes or no)."""

    def __init__(self, replica: str, capacity: dict[str, Any], slots: int, retry_after_s: int):
        self.replica, self.capacity_info, self.slots, self.retry_after_s = replica, capacity, slots, retry_after_s
        self.capacity: int = capacity["capacity"]
        self.sessions: set[str] = set()
        self.one_shots = 0
        self.draining: str | None = None
        self.refused = 0
        self._locks: dict[str, asyncio.Lock] = {}

    def used(self) -> int:
        return len(self.sessions) + self.one_shots

    def admit(self, session: str) -> dict[str, Any]:
        if session in self.sessions:
            return {"admitted": True, **self.state()}
        reason = self._no_room()
        if reason is not None:
            self.refused += 1
            return {"admitted": False, "reason": reason, **self.state()}
        self.sessions.add(session)
        return {"admitted": True, **self.state()}

    def _no_room(self) -> str | None:
        if self.draining is not None:
            return f"replica {self.replica} is draining ({self.draining})"
        if self.used() >= self.capacity:
            return f"replica {self.replica} is full ({self.used()} of {self.capacity} sessions)"
        return None

    def release(self, session: str) -> bool:
        self._locks.pop(session, None)
        if session in self.sessions:
            self.sessions.discard(session)
            return True
        return False

    def begin_one_shot(self) -> str | None:
        """Takes a slot for one sessionless frame; the reason when there is none."""
        reason = self._no_room()
        if reason is None:
            self.one_shots += 1
        else:
            self.refused += 1
        return reason

    def end_one_shot(self) -> None:
        self.one_shots -= 1

    def frame_lock(self, session: str) -> asyncio.Lock:
        """Serialises a session's frames here (a timed-out frame's thread may still run when the next arrives)."""
        lock = self._locks.get(session)
        if lock is None:
            lock = self._locks[session] = asyncio.Lock()
        return lock

    def drain(self, reason: str | None) -> dict[str, Any]:
        """Stop taking sessions; admitted ones are told to reconnect at their next frame (None: take them again)."""
        self.draining = reason
        return self.state()

    def state(self) -> dict[str, Any]:
        return {"replica": self.replica, "capacity": self.capacity, "sessions": len(self.sessions),
                "one_shots": self.one_shots, "slots": self.slots, "draining": self.draining,
                "retry_after_s": self.retry_after_s, "refused": self.refused, "measured": self.capacity_info}


# ---- the router's side ------------------------------------------------------------------------------------------
class FairQueue:
    """At most `slots` frames in flight at one replica, one per session; waiting sessions are served in arrival
    order, and a served session's next frame queues behind the others: round-robin, so a flood cannot starve."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self.busy: set[str] = set()
        self.waiting: collections.OrderedDict[str, asyncio.Future] = collections.OrderedDict()
        self.served = 0
        self.waited = 0

    async def acquire(self, key: str) -> None:
        if key in self.busy or key in self.waiting:
            raise RuntimeError(f"session {key[:8]} already has a frame at this replica")
        if len(self.busy) < self.slots and not self.waiting:
            self.busy.add(key)
            self.served += 1
            return
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        self.waited += 1
        try:
            await future
        except asyncio.CancelledError:
            if self.waiting.get(key) is future:
                del self.waiting[key]
            elif key in self.busy:  # granted while being cancelled: hand the slot on
                self.release(key)
            raise

    def release(self, key: str) -> None:
        self.busy.discard(key)
        while len(self.busy) < self.slots and self.waiting:
            nxt, future = self.waiting.popitem(last=False)
            if future.done():
                continue
            self.busy.add(nxt)
            self.served += 1
            future.set_result(None)

    def resize(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.release("")  # grants waiters when the replica reports more slots

    def fail_all(self, exc: BaseException) -> None:
        """The replica is gone: every waiting frame fails with `exc`."""
        while self.waiting:
            _, future = self.waiting.popitem(last=False)
            if not future.done():
                future.set_exception(exc)


@dataclass
class ReplicaView:
    replica: str
    capacity: int
    sessions: int
    slots: int
    draining: str | None
    retry_after_s: int = 1
    failed: bool = False
    seen: float = field(default_factory=time.monotonic)
    channel: dict[str, Any] | None = None  # its frame channel's address (deployments/frame_channel.py)

    def free(self) -> int:
        return self.capacity - self.sessions


class Assignments:
    """The router's table session -> replica, its view of the replicas (from their admission_state) and a fair
    queue per replica. Ray-free: the Router feeds it replica states and calls the replicas."""

    def __init__(self, refresh_s: float = 1.0):
        self.refresh_s = refresh_s
        self.replicas: dict[str, ReplicaView] = {}
        self.table: dict[str, str] = {}
        self.queues: dict[str, FairQueue] = {}
        self.refreshed = -math.inf
        self.counts: collections.Counter = collections.Counter()
        self.last_assigned: dict[str, int] = {}  # replica -> admission number: ties go to the longest unused

    def stale(self) -> bool:
        return time.monotonic() - self.refreshed > self.refresh_s

    def update(self, states: list[dict[str, Any]]) -> None:
        """A fresh view: every replica that answered admission_state (those that did not are left out)."""
        now = time.monotonic()
        view = {}
        for s in states:
            view[s["replica"]] = ReplicaView(s["replica"], s["capacity"], s["sessions"] + s.get("one_shots", 0),
                                             s["slots"], s["draining"], s.get("retry_after_s", 1), seen=now,
                                             channel=s.get("channel"))
            queue = self.queues.get(s["replica"])
            if queue is None:
                self.queues[s["replica"]] = FairQueue(s["slots"])
            elif queue.slots != s["slots"]:
                queue.resize(s["slots"])
        self.replicas = view
        self.refreshed = now

    def note(self, state: dict[str, Any]) -> None:
        """One replica's state from an admit reply."""
        view = self.replicas.get(state["replica"])
        if view is not None:
            view.sessions, view.capacity = state["sessions"] + state.get("one_shots", 0), state["capacity"]
            view.draining = state["draining"]

    def candidates(self) -> list[str]:
        """Replicas that may take a session, most free first (a new replica, empty, takes new sessions); among equally
        free ones the one that took a session longest ago, so sessions one after another spread."""
        live = [v for v in self.replicas.values() if not v.failed and v.draining is None and v.free() > 0]
        return [v.replica for v in sorted(live, key=lambda v: (-v.free(), self.last_assigned.get(v.replica, -1),
                                                                 v.replica))]

    def retry_after_s(self) -> int:
        return min((v.retry_after_s for v in self.replicas.values()), default=1)

    def assign(self, session: str, replica: str) -> None:
        self.table[session] = replica
        self.counts["admitted"] += 1
        self.last_assigned[replica] = self.counts["admitted"]

    def unassign(self, session: str) -> str | None:
        """Drops the session from the table (closed, or moving); its replica's count in the view goes down."""
        replica = self.table.pop(session, None)
        view = self.replicas.get(replica) if replica is not None else None
        if view is not None:
            view.sessions = max(0, view.sessions - 1)
        return replica

    def failed(self, replica: str, exc: BaseException) -> list[str]:
        """The replica failed a call: no new sessions go there until a fresh view shows it answering; its waiting
        frames fail with `exc`; returns the sessions assigned to it (the router moves each at its next frame)."""
        view = self.replicas.get(replica)
        if view is not None:
            view.failed = True
        queue = self.queues.get(replica)
        if queue is not None:
            queue.fail_all(exc)
        self.counts["replica_failures"] += 1
        return [s for s, r in self.table.items() if r == replica]

    def queue(self, replica: str) -> FairQueue:
        queue = self.queues.get(replica)
        if queue is None:
            view = self.replicas.get(replica)
            queue = self.queues[replica] = FairQueue(view.slots if view is not None else 1)
        return queue

    def stats(self) -> dict[str, Any]:
        per_replica: dict[str, dict[str, Any]] = collections.defaultdict(dict)
        for replica, view in self.replicas.items():
            per_replica[replica].update({"capacity": view.capacity, "sessions": view.sessions, "slots": view.slots,
                                         "draining": view.draining, "failed": view.failed})
        for replica, queue in self.queues.items():
            per_replica[replica].update({"in_flight": len(queue.busy), "waiting": len(queue.waiting),
                                         "served": queue.served, "waited": queue.waited})
        assigned = collections.Counter(self.table.values())
        for replica, n in assigned.items():
            per_replica[replica]["assigned"] = n
        return {"replicas": dict(per_replica), "assigned": len(self.table), **dict(self.counts)}
