"""Typed configuration shared by the CLI, the Serve deployments and the jobs; validated once at the edge."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtedit.accel.attention_probe import AttentionConfig
from rtedit.accel.compile import CompileConfig
from rtedit.accel.dbcache import CachingConfig
from rtedit.accel.fp8 import FP8Config
from rtedit.config_parsing import from_dict
from rtedit.device import DTYPES
from rtedit.errors import ConfigError
from rtedit.paths import REPO_ROOT


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _check_float(name: str, value: Any, lo: float, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")


CAUSAL_CHOICES = ("auto", "off", "kv", "session")  # EditorConfig.causal
IMAGE_CODECS = ("host", "nvjpeg", "auto")  # rtedit.jpeg_codec.select_codec


@dataclass
class ImageLimits:
    """What the engine accepts as an input or reference image."""

    max_pixels: int = 4_000_000  # width * height; checked from the header, before any pixel is decoded
    max_bytes: int = 32 * 2**20  # encoded size of one image
    min_side: int = 64  # Flux2ImageProcessor.check_image_input refuses smaller sides
    max_aspect: float = 8.0  # and more extreme aspect ratios
    max_references: int = 4  # reference images beside the input image

    def validate(self) -> None:
        _check_int("images.max_pixels", self.max_pixels, 64 * 64)
        _check_int("images.max_bytes", self.max_bytes, 1024)
        _check_int("images.min_side", self.min_side, 16)
        _check_float("images.max_aspect", self.max_aspect, 1.0)
        _check_int("images.max_references", self.max_references, 0, 16)


@dataclass
class PromptConfig:
    """How instructions become embeddings."""

    max_length: int = 512  # tokens; longer prompts are truncated exactly as Flux2KleinPipeline does
    layers: tuple[int, ...] = (9, 18, 27)  # Qwen3 hidden states stacked into the joint embedding
    max_chars: int = 4096  # longer prompts are rejected before tokenising
    cache_entries: int = 256  # PromptCache bound in entries
    cache_bytes: int = 2 * 2**30  # and in bytes of cached tensors

    def validate(self) -> None:
        _check_int("prompt.max_length", self.max_length, 8, 4096)
        if not self.layers or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.layers):
            raise ConfigError(f"prompt.layers must be positive layer indices, got {self.layers!r}")
        _check_int("prompt.max_chars", self.max_chars, 1)
        _check_int("prompt.cache_entries", self.cache_entries, 1)
        _check_int("prompt.cache_bytes", self.cache_bytes, 1024)


@dataclass
class ShapeBuckets:
    """The output sizes and reference counts a replica serves; compiled regions are warmed for each at start-up.

    Empty `sizes` means any size (the exact path). Otherwise the input image and every reference are resized to the
    chosen bucket's size, and a request for another size or reference count is rejected.
    """

    sizes: tuple[tuple[int, int], ...] = ()  # (height, width), multiples of 16
    references: tuple[int, ...] = (0,)  # reference counts served beside the input image

    def validate(self) -> None:
        sizes = []
        for entry in self.sizes:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ConfigError(f"buckets.sizes entries must be [height, width], got {entry!r}")
            for v in entry:
                _check_int("buckets.sizes", v, 64, 4096)
                if v % 16:
                    raise ConfigError(f"buckets.sizes must be multiples of 16, got {entry!r}")
            sizes.append(tuple(entry))
        self.sizes = tuple(sizes)
        if not self.references:
            raise ConfigError("buckets.references must list at least one reference count")
        for v in self.references:
            _check_int("buckets.references", v, 0, 16)
        self.references = tuple(self.references)


@dataclass
class EditorConfig:
    """Everything an Editor needs besides its weights."""

    model: str = "tiny"  # preset name, local diffusers folder, or hub id
    device: str | None = None  # None: the preset's default (cuda when present for real models)
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    max_steps: int = 50  # requests with more steps are rejected
    text_encoder: bool = True  # False: no Qwen3 in this process; prompts arrive as PromptEmbeddings (Serve replicas)
    autoencoder: str = "vae"  # "vae" (FLUX.2's own, exact) or "taef2" (tiny, approximate; weights from taef2_dir)
    taef2_dir: str | None = None  # folder with taef2_encoder.pth / taef2_decoder.pth; None: rtedit.paths.taef2_dir()
    prompt: PromptConfig = field(default_factory=PromptConfig)
    images: ImageLimits = field(default_factory=ImageLimits)
    buckets: ShapeBuckets = field(default_factory=ShapeBuckets)
    # The fast path; every part is off by default, which keeps Editor.edit exactly the stock pipeline.
    select_attention: bool = False  # probe attention kernels at start-up and install the fastest correct one
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    dbcache: CachingConfig = field(default_factory=lambda: CachingConfig(enabled=False))
    compile: CompileConfig = field(default_factory=lambda: CompileConfig(enabled=False))
    # CUDA graphs over each frame's encode, denoise and decode stages, captured per bucket at warm-up
    # (rtedit.accel.cuda_graphs); a CUDA device and fixed buckets only. A dynamic reuse check is captured with the
    # denoise stage (cache-dit's through rtedit.accel.dbcache_graphs, cache-dit 1.5.3 only); with TaylorSeer that
    # stage stays uncaptured, as stats()["cuda_graphs"]["left_out"] says.
    cuda_graphs: bool = False
    fp8: FP8Config = field(default_factory=FP8Config)  # FP8 linear layers in the transformer's blocks (torchao)
    # JPEG frames in and out: "host" (PIL), "nvjpeg" (on the GPU, rtedit.jpeg_codec; refused where it cannot run)
    # or "auto" (nvJPEG where its start-up probe passes, else the host codec, as stats() says).
    image_codec: str = "host"
    # Causal models (rtedit.json "causal"): "auto" serves the model in its own attention mode; "off" (full
    # attention), "kv" or "session" must be the model's own, else loading fails with UnsupportedRequest.
    causal: str = "auto"
    # The training-free baseline: a full-attention model run in causal "kv" or "session" without distillation
    # (what BFL's KV pipeline does with an undistilled model): its outputs drift, for measuring that drift only.
    training_free: bool = False
    # Bytes of the session mode's K/V store (rtedit.kv_store); None: free GPU memory minus a margin, 1 GiB on a CPU.
    kv_store_bytes: int | None = None
    # The part of one GPU this editor's process owns (a Serve replica's num_gpus, set by deployments/editor.py): a
    # derived K/V store bound is that part of the device, not all its free memory. None: the whole device. Not
    # compared: it says where the editor runs, not what it computes (frames are alike under any store bound).
    kv_store_share: float | None = field(default=None, compare=False)

    def validate(self) -> "EditorConfig":
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a preset name, folder or hub id, got {self.model!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}")
        _check_int("max_steps", self.max_steps, 1, 50)
        if self.autoencoder not in ("vae", "taef2"):
            raise ConfigError(f"autoencoder must be 'vae' or 'taef2', got {self.autoencoder!r}")
        if self.taef2_dir is not None and not isinstance(self.taef2_dir, str):
            raise ConfigError(f"taef2_dir must be a folder path, got {self.taef2_dir!r}")
        if not isinstance(self.text_encoder, bool):
            raise ConfigError(f"text_encoder must be true or false, got {self.text_encoder!r}")
        if not isinstance(self.select_attention, bool):
            raise ConfigError(f"select_attention must be true or false, got {self.select_attention!r}")
        self.prompt.validate()
        self.images.validate()
        self.buckets.validate()
        self.attention.validate()
        self.dbcache.validate()
        self.compile.validate()
        self.fp8.validate()
        if self.image_codec not in IMAGE_CODECS:
            raise ConfigError(f"image_codec must be one of {list(IMAGE_CODECS)}, got {self.image_codec!r}")
        if self.causal not in CAUSAL_CHOICES:
            raise ConfigError(f"causal must be one of {list(CAUSAL_CHOICES)}, got {self.causal!r}")
        if self.kv_store_bytes is not None:
            _check_int("kv_store_bytes", self.kv_store_bytes, 0)
        if self.kv_store_share is not None:
            _check_float("kv_store_share", self.kv_store_share, 1e-4, 1.0)  # Ray's finest GPU fraction is 0.0001
        if not isinstance(self.training_free, bool):
            raise ConfigError(f"training_free must be true or false, got {self.training_free!r}")
        if self.training_free and self.causal not in ("kv", "session"):
            raise ConfigError(f"training_free runs a full-attention model in a causal mode: set causal to 'kv' or "
                              f"'session', got causal={self.causal!r}")
        if self.causal == "kv" and self.dbcache.enabled:
            raise ConfigError("dbcache does not combine with causal='kv': cache-dit replaces the transformer's block "
                              "loop and breaks diffusers' KV cache; the session mode has its own step-2 reuse")
        if (self.compile.enabled or self.dbcache.enabled) and not self.buckets.sizes:
            raise ConfigError("compile and dbcache serve fixed shapes: list buckets.sizes (e.g. [[512, 512]])")
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.cuda_graphs and not self.buckets.sizes:
            raise ConfigError("cuda_graphs captures each bucket at warm-up: list buckets.sizes (e.g. [[512, 512]])")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditorConfig":
        """Builds a validated config from plain data (YAML, JSON, CLI); unknown fields are errors."""
        return from_dict(cls, data).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_replica(self) -> "EditorConfig":
        """The config of a Serve editor replica: prompts arrive as embeddings from the text encoder deployment."""
        return dataclasses.replace(self, text_encoder=False)


def resolve_model_path(model: Any) -> Any:
    """A relative model folder as an absolute path (replicas and jobs run in other working directories): looked
    up from the current directory, then from the repository root. Presets, hub ids and absolute paths pass."""
    from rtedit.presets import PRESETS

    if not isinstance(model, str) or model in PRESETS or Path(model).is_absolute():
        return model
    for base in (Path.cwd(), REPO_ROOT):
        if (base / model / "model_index.json").is_file():
            return str((base / model).resolve())
    return model


def engine_section(data: Any, source: str = "config") -> dict[str, Any]:
    """The engine section of a Serve YAML (`applications[0].args.engine`), or a bare engine section."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must hold a mapping, got {type(data).__name__}")
    if "applications" not in data:
        return data
    apps = data["applications"]
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
        raise ConfigError(f"{source}: applications must be a non-empty list of Serve applications")
    args = apps[0].get("args") or {}
    if not isinstance(args, dict) or not isinstance(args.get("engine", {}), dict):
        raise ConfigError(f"{source}: applications[0].args.engine must be a mapping")
    return args.get("engine", {})


def load_engine_config(path: str | Path, overrides: dict[str, Any] | None = None) -> EditorConfig:
    """The EditorConfig a Serve YAML (or a bare engine-section YAML) describes, with top-level overrides."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read engine config {path}: {exc}") from exc
    section = {**engine_section(data, str(path)), **(overrides or {})}
    if "model" in section:
        section["model"] = resolve_model_path(section["model"])
    return EditorConfig.from_dict(section)
