"""Session affinity for the editor replicas: a request that names its replica goes to that replica, or nowhere.

The router admits each session on one replica (deployments/admission.py: an assignment table, not a hash, so adding
a replica moves no session) and passes that replica's id as the call's `replica=` keyword; this request router
sends the request to exactly that replica. When the replica is no longer among the running ones (it died, or was
scaled down) the request fails at once with ReplicaGone instead of waiting in Serve's retry loop or landing on
another replica. Requests that name no replica (info, one-off calls) may use every replica.
Written by hand: Serve's multiplexing routes by where a "model" was loaded, learnt only after the replica reports
it, and it would route a session elsewhere rather than fail when its replica is gone.
"""

from __future__ import annotations

import collections
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

# This process's routing counts, for the router's /api/stats: `retries` are requests Serve asked this router about
# again because no chosen replica had room (the retry loop the admission's fair queue keeps frames out of).
ROUTING: collections.Counter = collections.Counter()
_SEEN_MAX = 4096


class ReplicaGone(Exception):
    """The replica a request named is not running (died, or removed from the deployment)."""

    def __init__(self, replica: str, died: bool):
        super().__init__(f"editor replica {replica} is {'dead' if died else 'no longer running'}")
        self.replica, self.died = replica, died


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._died: set[str] = set()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        self._count(pending_request)
        if pending_request is not None:
            # Our one choice is the final one: if it cannot take the request now, back off before asking again
            # (Serve's locality mixins set this on their last tier; without it the routing loop spins).
            pending_request.routing_context.should_backoff = True
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if not target:
            return [candidate_replicas]
        for r in candidate_replicas:
            if r.replica_id.unique_id == target:
                return [[r]]
        ROUTING["gone"] += 1
        if not pending_request.future.done():
            # Fails the caller's await now; Serve stops routing a request whose future is done.
            pending_request.future.set_exception(ReplicaGone(target, died=target in self._died))
            # Serve 2.60 matches replicas to pending requests by internal_request_id, which every call made while
            # one websocket is served shares; a request failed here must leave that index, or the socket's next
            # call (the re-admission) is never matched and its routing task spins until the caller times out.
            self._remove_pending_request_from_indices(pending_request)
        return [candidate_replicas]

    def _count(self, pending_request: Optional[PendingRequest]) -> None:
        if pending_request is None:
            return
        rid = pending_request.metadata.internal_request_id
        if rid in self._seen:
            ROUTING["retries"] += 1
            return
        ROUTING["requests"] += 1
        self._seen[rid] = None
        while len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)

    def on_replica_actor_died(self, replica_id) -> None:
        self._died.add(replica_id.unique_id)
        ROUTING["replica_deaths"] += 1
        super().on_replica_actor_died(replica_id)
