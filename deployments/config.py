"""Typed arguments of the Serve app (what `serve.yaml` carries under `args:`), checked when the app is built."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rtedit.config import EditorConfig
from rtedit.presets import PRESETS
from rtedit.streaming import SessionDefaults
from rtedit.transport import FrameLimits

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "models/toy-editor"  # the toy editor trained by jobs.train_teacher (models/toy-editor/README.md)


def resolve_model_path(model: Any) -> Any:
    """A relative model folder as an absolute path (replicas run in other working directories): looked up from
    the current directory, then from the repository root. Presets, hub ids and absolute paths pass unchanged."""
    if not isinstance(model, str) or model in PRESETS or Path(model).is_absolute():
        return model
    for base in (Path.cwd(), REPO_ROOT):
        if (base / model / "model_index.json").is_file():
            return str((base / model).resolve())
    return model


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
    embedding_cache_entries: int = Field(32, ge=1)
    """Prompt embeddings a replica keeps, so they cross from the text encoder once per prompt."""
    torch_threads: Optional[int] = Field(None, ge=1)
    """torch intra-op threads in the replica (None: torch's default)."""
    min_frame_ms: float = Field(0.0, ge=0)
    """Pad each edit to at least this long: a deliberately slow editor for tests and load shaping."""
    warmup: bool = True
    """Run one edit at start-up so the first client does not pay for lazy initialisation."""
    health_check_period_s: float = Field(5.0, gt=0)

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
    edit_timeout_s: float = Field(120.0, gt=0)
    """A frame whose edit takes longer gets an error (a hung replica never hangs a client)."""
    limits: dict[str, Any] = Field(default_factory=dict)
    """rtedit.transport.FrameLimits fields."""
    defaults: dict[str, Any] = Field(default_factory=dict)
    """rtedit.streaming.SessionDefaults fields."""
    stats_window: int = Field(2048, ge=16)
    """Samples kept per stage for the p50/p99 of /api/stats."""

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict) -> dict:
        _dataclass_from(FrameLimits, v).validate()
        return v

    @field_validator("defaults")
    @classmethod
    def _defaults(cls, v: dict) -> dict:
        _dataclass_from(SessionDefaults, v).validate()
        return v

    def frame_limits(self) -> FrameLimits:
        return _dataclass_from(FrameLimits, self.limits).validate()

    def session_defaults(self) -> SessionDefaults:
        return _dataclass_from(SessionDefaults, self.defaults).validate()


class AppArgs(_Strict):
    """Everything `deployments.app:build_app` needs."""

    engine: dict[str, Any] = Field(default_factory=lambda: {"model": DEFAULT_MODEL}, validate_default=True)
    """rtedit.config.EditorConfig fields: model (preset, folder or hub id), device, dtype, prompt, images."""
    editor: EditorArgs = Field(default_factory=EditorArgs)
    text_encoder: TextEncoderArgs = Field(default_factory=TextEncoderArgs)
    router: RouterArgs = Field(default_factory=RouterArgs)
    name: Literal["rtedit"] = "rtedit"

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: dict) -> dict:
        v = {**v, "model": resolve_model_path(v.get("model"))} if "model" in v else v
        EditorConfig.from_dict(v)
        return v

    def editor_config(self) -> EditorConfig:
        return EditorConfig.from_dict(self.engine)


def _dataclass_from(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


def replicas_options(args: EditorArgs) -> dict[str, Any]:
    """Serve deployment options for the editor from its arguments."""
    options: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing_requests,
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

