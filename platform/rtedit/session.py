"""Sessions: one stream of frames edited with one instruction and one set of references on one editor.

`editor.open_session(prompt, references, bucket)` checks and decodes the instruction and references once and returns
a `Session`; `session.edit(frame, seed=..., steps=...)` edits one frame with them. What a frame costs depends on the
model's attention (rtedit.json "causal", `Editor.mode`):
- full attention (None) and "kv": every frame attends to everything again, so a session frame is exactly
  `editor.edit(frame, prompt, references=...)` with the session's inputs;
- "session": T (the instruction) and R (the references) attend only to themselves, so their keys and values in
  every layer (`SessionCache`) are computed once and kept in the editor's K/V store (rtedit.kv_store), keyed by this
  session's private token and a digest of what they depend on; a frame then runs its input image I once and the
  target X per step against them. An entry evicted under memory pressure is recomputed on the session's next frame.
  The references' latents are kept per output size as well, so they are VAE-encoded once per session and size.

`session.update(prompt=..., references=...)` swaps the inputs: it drops this session's store entries (and, when the
references change, their latents) and nothing else, and bumps `session.version`. `session.close()` frees them.

Serving: one Session per websocket. `editor.open_session(..., session_id=sid)` registers it under the caller's id,
`editor.session(sid)` finds it again (None once closed or never opened), and `session.version` tells a router whether
the replica holds the settings it last sent (resend the references only when it does not).

An edit without a session on a "session" model (`editor.edit`, `/api/predict`) is a one-shot session: T and R are
encoded for that frame alone (booked as `timings["session"]`) and never stored.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtedit.errors import InvalidRequest
from rtedit.frame_request import FrameRequest
from rtedit.images import ImageInput, to_uint8_array
from rtedit.kv_store import StoreKey, entry_digest
from rtedit.model.causal import SessionCache, encode_session, split_conditions
from rtedit.prompts import PromptEmbedding

if TYPE_CHECKING:
    from rtedit.editor import EditResult, Editor, FramePlan

_UNSET = object()


@dataclass(frozen=True)
class SessionInputs:
    """What a session's frames are conditioned on, replaced whole by `Session.update` (a frame reads one)."""

    prompt: str | PromptEmbedding
    prompt_key: str
    references: tuple[np.ndarray, ...]  # decoded and checked RGB uint8 arrays
    reference_digests: tuple[str, ...]
    version: int = 0
    # Reference latents by (index, fitted shape): encoded once per size; kept while the references stay the same.
    latents: dict = field(default_factory=dict, compare=False, repr=False)


def _array_digest(arr: np.ndarray) -> str:
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


class Session:
    """One stream's instruction and references on one editor; `edit` is thread-safe (frames run one at a time)."""

    def __init__(self, editor: "Editor", session_id: str, inputs: SessionInputs,
                 bucket: tuple[int, int] | None) -> None:
        self.editor = editor
        self.id = session_id
        self.token = uuid.uuid4().hex  # the store's key: unique to this object, never the caller's id
        self.bucket = bucket
        self._inputs = inputs
        self._closed = False
        self.frames = self.store_hits = self.store_misses = 0

    # ---- state --------------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> SessionInputs:
        return self._inputs

    @property
    def version(self) -> int:
        """0 when opened, one more after each update that changed the prompt or the references."""
        return self._inputs.version

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequest(f"session {self.id!r} is closed; open a new one")

    def frame_inputs(self) -> SessionInputs:
        """The inputs of the frame about to run (the editor calls this under its lock, which updates take)."""
        self._check_open()
        return self._inputs

    # ---- frames -------------------------------------------------------------------------------------------------
    def edit(self, frame: ImageInput, *, seed: int = 0, steps: int = 2, output_format: str | None = None,
             cancel: threading.Event | None = None) -> "EditResult":
        """Edits one frame with the session's instruction and references (output size: the session's bucket)."""
        self._check_open()
        inputs = self._inputs
        height, width = self.bucket or (None, None)
        if self.editor.mode != "session":
            result = self.editor.edit(frame, inputs.prompt, references=inputs.references, steps=steps, seed=seed,
                                      height=height, width=width, output_format=output_format, cancel=cancel)
        else:
            request = FrameRequest(frame, inputs.prompt, inputs.references, steps, seed, height, width, output_format)
            result = self.editor._run(request, cancel, session=self)
        self.frames += 1
        return result

    def update(self, *, prompt=_UNSET, references=_UNSET) -> int:
        """New prompt and/or references for the next frames; returns the version. Only this session's stored T/R
        keys and values are dropped (and its reference latents when the references change); an update that
        changes nothing keeps them and the version."""
        self._check_open()
        current = self._inputs
        prompt, key = (current.prompt, current.prompt_key) if prompt is _UNSET else check_session_prompt(
            self.editor, prompt)
        refs, digests = (current.references, current.reference_digests) if references is _UNSET else \
            check_session_references(self.editor, references)
        with self.editor._lock:  # waits for a frame in flight: no frame mixes the old inputs with the new
            self._check_open()
            current = self._inputs
            if key == current.prompt_key and digests == current.reference_digests:
                return current.version
            latents = current.latents if digests == current.reference_digests else {}
            self._inputs = SessionInputs(prompt, key, refs, digests, current.version + 1, latents)
            self._drop_entries()
            return self._inputs.version

    def close(self) -> None:
        """Frees the session's stored keys and values and latents; later edits raise InvalidRequest."""
        if self._closed:
            return
        with self.editor._lock:
            self._closed = True
            self._drop_entries()
            self._inputs.latents.clear()
        self.editor.sessions.forget(self)

    def _drop_entries(self) -> None:
        if self.editor.kv_store is not None:
            self.editor.kv_store.drop_session(self.token)

    def store_key(self, plan: "FramePlan", inputs: SessionInputs) -> StoreKey:
        """The store key of this session's T/R keys and values for a frame's plan (its bucket's token shapes)."""
        bucket = (plan.layout.text_tokens, plan.lat_h, plan.lat_w, plan.condition_shapes[1:])
        digest = entry_digest(prompt_key=inputs.prompt_key, reference_digests=inputs.reference_digests,
                              condition_timestep=plan.layout.condition_timestep, bucket=bucket,
                              dtype=self.editor.dtype, device=self.editor.device)
        return StoreKey(self.token, digest)

    def stats(self) -> dict:
        return {"id": self.id, "version": self.version, "closed": self._closed, "frames": self.frames,
                "references": len(self._inputs.references), "store_hits": self.store_hits,
                "store_misses": self.store_misses,
                "reference_latent_bytes": sum(t.nbytes for t in self._inputs.latents.values())}


# ---- checks, and what the editor calls ----------------------------------------------------------------------
def check_session_prompt(editor: "Editor", prompt) -> tuple[str | PromptEmbedding, str]:
    """(the prompt as the session keeps it, its key): a string is encoded now (its frames then find it in the
    PromptCache; refused here without a text encoder); an embedding is checked and moved to the editor's device."""
    emb = editor._embedding(prompt)
    return (emb if isinstance(prompt, PromptEmbedding) else prompt), emb.key


def check_session_references(editor: "Editor", references: Sequence[ImageInput]):
    """(decoded arrays, their digests); refused when the editor would refuse them in a frame."""
    if isinstance(references, (str, bytes)) or not isinstance(references, (list, tuple)):
        raise InvalidRequest(f"references must be a list of images, got {type(references).__name__}")
    config = editor.config
    if len(references) > config.images.max_references:
        raise InvalidRequest(f"{len(references)} references given; at most {config.images.max_references} "
                             "are accepted")
    if config.buckets.sizes and len(references) not in config.buckets.references:
        raise InvalidRequest(f"{len(references)} references are not served here; reference counts: "
                             f"{list(config.buckets.references)}")
    arrays = tuple(to_uint8_array(r, config.images, f"reference {i}") for i, r in enumerate(references))
    return arrays, tuple(_array_digest(a) for a in arrays)


class SessionRegistry:
    """An editor's open sessions by id (a Serve replica finds its websocket's session here)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, editor: "Editor", prompt, references, bucket, session_id: str | None) -> Session:
        session = open_session(editor, prompt, references, bucket, session_id)
        with self._lock:
            if session.id in self._sessions:
                raise InvalidRequest(f"session {session.id!r} is already open; find it with editor.session(id) "
                                     "or close it first")
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def forget(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    def __len__(self) -> int:
        return len(self._sessions)


def open_session(editor: "Editor", prompt, references: Sequence[ImageInput], bucket,
                 session_id: str | None) -> Session:
    """A checked, unregistered Session (Editor.open_session registers it)."""
    if bucket is not None:
        if not (isinstance(bucket, (list, tuple)) and len(bucket) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in bucket)):
            raise InvalidRequest(f"bucket must be (height, width) in pixels, got {bucket!r}")
        bucket = tuple(bucket)
        if editor.config.buckets.sizes and bucket not in editor.config.buckets.sizes:
            raise InvalidRequest(f"bucket {bucket} is not served here; sizes: {list(editor.config.buckets.sizes)}")
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise InvalidRequest(f"session_id must be a non-empty string, got {session_id!r}")
    prompt, key = check_session_prompt(editor, prompt)
    arrays, digests = check_session_references(editor, references)
    return Session(editor, session_id or uuid.uuid4().hex, SessionInputs(prompt, key, arrays, digests), bucket)


def session_cache(editor: "Editor", plan: "FramePlan", session: Session | None,
                  inputs: SessionInputs | None) -> SessionCache:
    """The frame's T/R keys and values: the session's stored entry, else computed (and stored for an open session;
    a one-shot edit stores nothing)."""
    if session is None:
        return _encode(editor, plan)
    key = session.store_key(plan, inputs)
    entry = editor.kv_store.get(key)
    if entry is not None:
        session.store_hits += 1
        return entry
    session.store_misses += 1
    entry = _encode(editor, plan)
    editor.kv_store.put(key, entry)
    return entry


def _encode(editor: "Editor", plan: "FramePlan") -> SessionCache:
    _, references = split_conditions(plan.layout, plan.conditions)
    with torch.inference_mode():
        return encode_session(editor.transformer, plan.layout, references, plan.emb.embeds, editor.dtype)
