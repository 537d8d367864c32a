"""Session affinity for the editor replicas: a session's frames go to one replica while it lives.

Serve's request router picks replicas; this one ranks them by rendezvous hashing of the session id (carried
as the request's multiplexed model id) so a session stays where its caches are, with no shared state and only
~1/n of sessions moving when a replica is added or dies. Requests without a session use every replica.
Written by hand: Serve's multiplexing routes by where a "model" was loaded, which is only learnt after the
replica reports it, so a session's first frames could land on different replicas.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous_score(session: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session}\x00{replica}".encode(), digest_size=8).digest(), "big")


def pick_replica(session: str, replica_ids: list[str]) -> str:
    """The replica id a session belongs to among `replica_ids` (highest random weight)."""
    return max(replica_ids, key=lambda r: rendezvous_score(session, r))


class SessionAffinityRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        session = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not session or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        # One rank only: when the session's replica is busy the request waits for it rather than moving.
        return [[by_id[pick_replica(session, list(by_id))]]]

    def _remove_pending_request_from_indices(self, pending_request: PendingRequest) -> None:
        """Also drop the request from Ray's per-model-id index, whose only cleanup is in MultiplexMixin (not used
        here): without this every session frame stays referenced, image and all, for the router's lifetime."""
        super()._remove_pending_request_from_indices(pending_request)
        session = pending_request.metadata.multiplexed_model_id
        queue = self._pending_requests_by_model_id.get(session)
        if queue is None:
            return
        if pending_request in queue:
            queue.remove(pending_request)
        if not queue:
            del self._pending_requests_by_model_id[session]
