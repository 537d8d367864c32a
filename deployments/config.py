"""Typed arguments of the Serve app (what `serve.yaml` carries under `args:`), checked when the app is built.

Pydantic at Serve's edge; the `engine` section goes through rtedit's one EditorConfig parser, once, here, and the
replicas receive that typed EditorConfig. The router's limits are derived from it (deployments/limits.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.guards import LOOPBACK_HOSTS, GuardLimits, is_loopback, normalise_host, normalise_origin
from deployments.limits import (
    OffSize,
    ServedSizes,
    check_session_defaults,
    derive_frame_limits,
    model_session_defaults,
)
from rtedit.config import EditorConfig, resolve_model_path
from rtedit.config_parsing import from_dict
from rtedit.errors import ConfigError, ModelLoadError
from rtedit.presets import Sidecar, model_sidecar
from rtedit.streaming import SessionDefaults
from rtedit.transport import FrameLimits

DEFAULT_MODEL = "models/toy-editor"  # the toy editor trained by jobs.train_teacher (models/toy-editor/README.md)


class _Strict(BaseModel):
    # A misspelt YAML key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class AutoscalingArgs(_Strict):
    """Serve autoscaling range for the editor replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(1.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


# ---- admission (deployments/admission.py; issue 15 items 2-4) -------------------------------------------------
class AdmissionArgs(_Strict):
    """Sessions per editor replica: beyond every replica's capacity a session is refused at once (websocket close
    1013, HTTP 503 with Retry-After), never queued behind the admitted ones."""

    max_sessions: Optional[int] = Field(None, ge=1)
    """Sessions one replica takes; None: max(1, floor(1000 / (engine_ms * target_fps))) with the engine time
    measured at start-up (at least min_frame_ms). Either is reduced to what the replica's K/V store holds."""
    target_fps: float = Field(10.0, gt=0, allow_inf_nan=False)
    """Frames a second each admitted session should get."""
    control_slots: int = Field(4, ge=1)
    """Serve's max_ongoing_requests headroom beside the edit slots (max_ongoing_requests), so admit, close and info
    calls never wait behind frames."""
    retry_after_s: int = Field(1, ge=1)
    """Retry-After of a refusal."""


class EditorArgs(_Strict):
    """The editor replicas: compute only."""

    num_replicas: int = Field(1, ge=1)
    """Fixed replica count (ignored when autoscaling is set)."""
    autoscaling: Optional[AutoscalingArgs] = None
    replicas_per_gpu: int = Field(0, ge=0)
    """0: CPU replicas; n >= 1: each replica reserves gpu_share/n of a GPU (scheduling only, no memory isolation)."""
    gpu_share: float = Field(1.0, gt=0, le=1)
    """Fraction of each GPU the editor replicas take together (leave room for a text encoder on the same GPU)."""
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(2, ge=1)
    """Frames queued at a replica; keep small so excess waits in the router's mailboxes, not here."""
    torch_threads: Optional[int] = Field(None, ge=1)
    """torch intra-op threads in the replica (None: torch's default)."""
    min_frame_ms: float = Field(0.0, ge=0)
    """Pad each edit to at least this long: a deliberately slow editor for tests and load shaping."""
    warmup: bool = True
    """Warm every served shape at start-up (Editor.warm_up) so the first client does not pay for lazy
    initialisation; compiled engines are warmed by Editor.from_config already."""
    health_check_period_s: float = Field(5.0, gt=0)
    channel_port: int = Field(0, ge=0, le=65535)
    """TCP port of the replica's frame channel (deployments/frame_channel.py) on its node; 0: any free port. Set it
    where a firewall between nodes must name the port (one editor replica per node then)."""
    channel_grace_s: float = Field(4.0, ge=0, lt=5)
    """At shutdown, how long frames in flight on the channel may take to finish (within Serve's graceful 5 s)."""
    admission: AdmissionArgs = Field(default_factory=AdmissionArgs)
    """Session capacity and refusal (deployments/admission.py)."""

    @model_validator(mode="before")
    @classmethod
    def _gone(cls, data: Any) -> Any:
        # Refused with the new key rather than extra="forbid"'s bare "extra inputs are not permitted".
        if isinstance(data, dict) and "embedding_cache_entries" in data:
            raise ValueError("editor.embedding_cache_entries is gone: replicas keep the embeddings the text encoder "
                             "sends in the engine's PromptCache; size it with engine.prompt.cache_entries and "
                             "engine.prompt.cache_bytes")
        return data

    @field_validator("min_frame_ms")
    @classmethod
    def _finite(cls, v: float) -> float:
        if math.isnan(v) or math.isinf(v):
            raise ValueError(f"min_frame_ms must be finite, got {v}")
        return v


class TextEncoderArgs(_Strict):
    """The text encoder deployment: owns the PromptCache."""

    num_replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.5, ge=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)


class RouterArgs(_Strict):
    """The FastAPI ingress: transport, sessions, frame dropping."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)
    """Each open websocket holds one slot for its whole life: size this for concurrent sessions."""
    api_key: Optional[str] = None
    """Required key (prefer api_key_env in files that get committed)."""
    api_key_env: Optional[str] = "RTEDIT_API_KEY"
    """Environment variable holding the key, read in the router replica."""
    frame_channel: Literal["direct", "serve"] = "direct"
    """How frames reach the editor replicas: "direct", over each replica's frame channel (a kept-open TCP
    connection, deployments/frame_channel.py: ~0.02 ms of router CPU a frame); "serve", through Serve's handle
    (~2 ms; for clusters whose nodes cannot open connections to each other's ports). Everything else goes
    through Serve either way."""
    edit_timeout_s: float = Field(120.0, gt=0)
    """A frame whose edit takes longer gets an error (a hung replica never hangs a client)."""
    limits: dict[str, Any] = Field(default_factory=dict)
    """rtedit.transport.FrameLimits fields."""
    defaults: dict[str, Any] = Field(default_factory=dict)
    """rtedit.streaming.SessionDefaults fields; an unset prompt is the model's first rtedit.json example."""
    off_size: OffSize = "resize"
    """A frame off the sizes the model's rtedit.json lists: "resize" answers it at the nearest of them (the reply's
    `resized` says from what), "refuse" answers an off_size error (422)."""
    stats_window: int = Field(2048, ge=16)
    """Samples kept per stage for the p50/p99 of /api/stats."""
    # Connection guards (deployments/guards.py): nothing a client holds can starve another or the health checks.
    idle_timeout_s: float = Field(300.0, gt=0)
    """A websocket with no message either way for this long is closed (1001, with the reason); above
    edit_timeout_s, so a client waiting on a slow edit is never idle."""
    body_timeout_s: float = Field(30.0, gt=0)
    """A request body must arrive within this long of the request reaching the router, else 408."""
    max_connections_per_client: int = Field(64, ge=1)
    """Open websockets plus HTTP requests in flight per client address (beyond: HTTP 429, websocket close 1008).
    Behind a reverse proxy every client has the proxy's address: raise it there."""
    reserved_for_health: int = Field(8, ge=1)
    """Slots of max_ongoing_requests kept for /healthz and /readyz: connections beyond the rest are refused (HTTP
    503, websocket close 1013)."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Browser origins (scheme://host[:port]) allowed besides the page's own; "*" allows every origin. A request
    or websocket handshake with another Origin is refused with 403."""

    allowed_hosts: Optional[list[str]] = None
    """Host header names (no port) the router answers; "*" any. None: on a loopback bind, the loopback names only
    (localhost, 127.0.0.1, ::1), so a foreign page whose name resolves to this machine (DNS rebinding) is refused
    with 403; on any other bind, every name (the API key guards it)."""

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        return [normalise_origin(o) for o in v]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        return None if v is None else [normalise_host(h) for h in v]

    @model_validator(mode="after")
    def _guards(self) -> "RouterArgs":
        if self.idle_timeout_s <= self.edit_timeout_s:
            raise ValueError(f"router.idle_timeout_s ({self.idle_timeout_s:g}) must be above router.edit_timeout_s "
                             f"({self.edit_timeout_s:g}): a client waiting on an edit would be closed as idle")
        if self.reserved_for_health >= self.max_ongoing_requests:
            raise ValueError(f"router.reserved_for_health ({self.reserved_for_health}) must be below "
                             f"router.max_ongoing_requests ({self.max_ongoing_requests})")
        return self

    def guard_limits(self, bind_host: str | None = None) -> GuardLimits:
        """What the router's ConnectionGuards enforce; `bind_host` is Serve's HTTP bind address (None: no proxy)."""
        hosts = self.allowed_hosts
        if hosts is None and bind_host is not None and is_loopback(bind_host):
            hosts = list(LOOPBACK_HOSTS)
        return GuardLimits(allowed_origins=frozenset(self.allowed_origins),
                           allowed_hosts=None if hosts is None or "*" in hosts else frozenset(hosts),
                           max_connections_per_client=self.max_connections_per_client,
                           max_connections=self.max_ongoing_requests - self.reserved_for_health,
                           body_timeout_s=self.body_timeout_s, idle_timeout_s=self.idle_timeout_s)

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict) -> dict:
        from_dict(FrameLimits, v, "router.limits").validate()
        return v

    @field_validator("defaults")
    @classmethod
    def _defaults(cls, v: dict) -> dict:
        from_dict(SessionDefaults, v, "router.defaults").validate()
        return v

    def frame_limits(self, engine: EditorConfig | None = None) -> FrameLimits:
        """The configured limits, within `engine`'s bounds when given (what the router enforces)."""
        if engine is None:
            return from_dict(FrameLimits, self.limits, "router.limits").validate()
        return derive_frame_limits(self.limits, engine)

    def session_defaults(self) -> SessionDefaults:
        """The configured defaults; `steps` is an override only when set (else the model's, see steps_override)."""
        return from_dict(SessionDefaults, self.defaults, "router.defaults").validate()

    @property
    def steps_override(self) -> int | None:
        return self.defaults.get("steps")


class AppArgs(_Strict):
    """Everything `deployments.app:build_app` needs."""

    # The engine section is a typed rtedit.config.EditorConfig, not pydantic: let pydantic hold the dataclass.
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    engine: EditorConfig = Field(default_factory=lambda: {"model": DEFAULT_MODEL}, validate_default=True)
    """rtedit.config.EditorConfig (from its fields as plain data): model (preset, folder or hub id), device, dtype,
    prompt, images, buckets and the fast path. A relative model folder is made absolute here."""
    editor: EditorArgs = Field(default_factory=EditorArgs)
    text_encoder: TextEncoderArgs = Field(default_factory=TextEncoderArgs)
    router: RouterArgs = Field(default_factory=RouterArgs)
    name: Literal["rtedit"] = "rtedit"

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> EditorConfig:
        try:
            if isinstance(v, EditorConfig):
                return dataclasses.replace(v, model=resolve_model_path(v.model)).validate()
            if not isinstance(v, dict):
                raise ConfigError(f"engine must be a mapping of EditorConfig fields, got {type(v).__name__}")
            return EditorConfig.from_dict({**v, "model": resolve_model_path(v["model"])} if "model" in v else v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _router_within_engine(self) -> "AppArgs":
        try:
            limits = self.router.frame_limits(self.engine)
            sidecar = self.model_sidecar()
            sizes = ServedSizes.of_model(sidecar, self.engine, self.router.off_size, self.engine.model)
            defaults = model_session_defaults(self.router.session_defaults(), sidecar, self.engine.model)
            check_session_defaults(defaults, limits, self.router.steps_override, sizes)
        except (ConfigError, ModelLoadError) as exc:
            raise ValueError(str(exc)) from None
        return self

    def model_sidecar(self) -> Sidecar:
        """The served model's rtedit.json as far as it is known before loading (presets.model_sidecar)."""
        return model_sidecar(self.engine.model)

    def editor_config(self) -> EditorConfig:
        """The typed engine config (the `engine` field itself)."""
        return self.engine

    def frame_limits(self) -> FrameLimits:
        """What the router accepts: router.limits within the engine's bounds."""
        return self.router.frame_limits(self.engine)


def replicas_options(args: EditorArgs) -> dict[str, Any]:
    """Serve deployment options for the editor from its arguments."""
    options: dict[str, Any] = {
        # The router dispatches at most max_ongoing_requests frames (admission's FairQueue); control calls get more.
        "max_ongoing_requests": args.max_ongoing_requests + args.admission.control_slots,
        "health_check_period_s": args.health_check_period_s,
        "ray_actor_options": {"num_cpus": args.num_cpus},
    }
    if args.replicas_per_gpu:
        options["ray_actor_options"]["num_gpus"] = args.gpu_share / args.replicas_per_gpu
    if args.autoscaling is not None:
        options["autoscaling_config"] = args.autoscaling.model_dump()
    else:
        options["num_replicas"] = args.num_replicas
    return options

