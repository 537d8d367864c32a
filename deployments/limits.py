"""What the router accepts, derived from the engine config when the app is built, and the checks it makes itself.

A request the engine config cannot serve (a reference count outside its buckets, a size it has no bucket for, a
step count the model was not trained for) is refused by the router, never after a round trip to a GPU replica.
Ray-free: config.py validates with it, router.py applies it, tests call it directly.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import PIL.Image
from rtedit.config import EditorConfig
from rtedit.config_parsing import from_dict
from rtedit.errors import ConfigError, UnsupportedRequest
from rtedit.model.packing import PATCH_PIXELS
from rtedit.presets import Sidecar, frame_size, nearest_size, size_mismatch
from rtedit.streaming import EditJob, SessionDefaults
from rtedit.transport import FrameLimits

FALLBACK_STEPS = 2  # a session's steps when neither router.defaults.steps nor the model's rtedit.json says
OffSize = Literal["resize", "refuse"]  # router.off_size: what a frame off the model's sizes gets


class NotServed(UnsupportedRequest):
    """A request this deployment's engine config or model cannot serve, refused by the router before any replica."""

    code = "not_served"


def served_reference_counts(engine: EditorConfig) -> tuple[int, ...]:
    """Reference counts the engine serves: its buckets' when it serves fixed shapes, else 0..images.max_references."""
    limit = engine.images.max_references
    if engine.buckets.sizes:
        return tuple(sorted({r for r in engine.buckets.references if r <= limit}))
    return tuple(range(limit + 1))


def engine_bounds(engine: EditorConfig) -> dict[str, tuple[str, int, str]]:
    """FrameLimits field -> ("max" or "min", the engine's bound, where it comes from)."""
    refs = served_reference_counts(engine)
    if not refs:
        raise ConfigError(f"engine.buckets.references {list(engine.buckets.references)} are all above "
                          f"engine.images.max_references ({engine.images.max_references}): no request is servable")
    bounds = {
        "max_steps": ("max", engine.max_steps, "engine.max_steps"),
        "max_prompt_chars": ("max", engine.prompt.max_chars, "engine.prompt.max_chars"),
        "max_references": ("max", max(refs), "engine.buckets.references" if engine.buckets.sizes
                           else "engine.images.max_references"),
        "max_reference_bytes": ("max", engine.images.max_bytes, "engine.images.max_bytes"),
        "min_side": ("min", engine.images.min_side, "engine.images.min_side"),
    }
    if engine.buckets.sizes:
        # Fixed shapes: a requested side must be one of the buckets' sides.
        sides = [side for size in engine.buckets.sizes for side in size]
        bounds["max_side"] = ("max", max(sides), "engine.buckets.sizes")
        bounds["min_side"] = ("min", max(min(sides), engine.images.min_side), "engine.buckets.sizes")
    return bounds


def derive_frame_limits(configured: dict[str, Any], engine: EditorConfig) -> FrameLimits:
    """router.limits within the engine's bounds: an unset limit is clamped to the engine's, an explicit one beyond
    it is a ConfigError (the router would accept what every replica refuses)."""
    limits = from_dict(FrameLimits, configured, "router.limits").validate()
    clamped = {}
    for name, (kind, bound, source) in engine_bounds(engine).items():
        value = getattr(limits, name)
        if (value <= bound) if kind == "max" else (value >= bound):
            continue
        if name in configured:
            side = "above" if kind == "max" else "below"
            raise ConfigError(f"router.limits.{name}={value} is {side} what the engine serves ({source}: {bound}); "
                              f"leave it unset to follow the engine, or change the engine section")
        clamped[name] = bound
    return dataclasses.replace(limits, **clamped).validate()


def model_session_defaults(defaults: SessionDefaults, sidecar: Sidecar, model: str) -> SessionDefaults:
    """The session defaults for this model: its first rtedit.json example is the prompt unless router.defaults
    sets one, which must then be one of the examples (a default the model never learnt edits nothing well)."""
    if not sidecar.examples:
        return defaults
    if defaults.prompt is None:
        return dataclasses.replace(defaults, prompt=sidecar.examples[0])
    if defaults.prompt not in sidecar.examples:
        raise ConfigError(f"router.defaults.prompt {defaults.prompt!r} is not one of the example instructions of "
                          f"{model} (rtedit.json examples: {list(sidecar.examples)}); leave it unset to use the "
                          "first, or add it to the model's examples")
    return defaults


def check_session_defaults(defaults: SessionDefaults, limits: FrameLimits, steps_override: int | None,
                           sizes: ServedSizes | None = None) -> None:
    """Configured session defaults a client could not have asked for are a build-time error."""
    if steps_override is not None and steps_override > limits.max_steps:
        raise ConfigError(f"router.defaults.steps={steps_override} is above the router's max_steps {limits.max_steps}")
    if defaults.prompt is not None and len(defaults.prompt) > limits.max_prompt_chars:
        raise ConfigError(f"router.defaults.prompt has {len(defaults.prompt)} characters, over max_prompt_chars "
                          f"{limits.max_prompt_chars}")
    for name in ("width", "height"):
        value = getattr(defaults, name)
        if value is not None and not limits.min_side <= value <= limits.max_side:
            raise ConfigError(f"router.defaults.{name}={value} is outside the served sides "
                              f"[{limits.min_side}, {limits.max_side}]")
    if (sizes is not None and sizes.sizes and defaults.width is not None and defaults.height is not None
            and (defaults.height, defaults.width) not in sizes.sizes):
        raise ConfigError(f"router.defaults height x width {defaults.height}x{defaults.width} is not a size the "
                          f"model serves ({sizes.describe_sizes()})")


def default_steps(override: int | None, model_steps: Sequence[int] | None) -> int:
    """A session's step count: router.defaults.steps when set, else the model's first allowed count, else 2."""
    if override is not None:
        return override
    return model_steps[0] if model_steps else FALLBACK_STEPS


@dataclass
class EngineChecks:
    """Per-frame checks against the engine config (and, once an editor reported it, the model's step counts)."""

    reference_counts: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]  # (height, width) buckets; empty: any size
    max_pixels: int
    steps: tuple[int, ...] | None = None  # the model's rtedit.json steps; None: any (or not known yet)

    @classmethod
    def from_config(cls, engine: EditorConfig) -> EngineChecks:
        return cls(served_reference_counts(engine), tuple(engine.buckets.sizes), engine.images.max_pixels)

    def check(self, job: EditJob) -> None:
        """Raises NotServed (422) with the reason for a frame no replica would edit."""
        refs = len(job.references)
        if refs not in self.reference_counts:
            raise NotServed(f"{refs} reference image(s) are not served here; reference counts served: "
                            f"{list(self.reference_counts)}")
        if self.steps is not None and job.steps not in self.steps:
            raise NotServed(f"this model was trained for steps {list(self.steps)}; got steps={job.steps}")
        if job.width is not None and job.height is not None:
            # The engine rounds a requested size down to whole patches before it looks for its bucket.
            size = (job.height // PATCH_PIXELS * PATCH_PIXELS, job.width // PATCH_PIXELS * PATCH_PIXELS)
            if self.sizes and size not in self.sizes:
                raise NotServed(f"output size {job.height}x{job.width} is not served here; sizes (height x width): "
                                f"{', '.join(f'{h}x{w}' for h, w in self.sizes)}")
            if job.width * job.height > self.max_pixels:
                raise NotServed(f"{job.height}x{job.width} is over the limit of {self.max_pixels} pixels")

    def describe(self) -> dict[str, Any]:
        """For /api/info: what a client may ask for besides FrameLimits."""
        return {"reference_counts": list(self.reference_counts), "sizes": [list(s) for s in self.sizes] or None,
                "steps": list(self.steps) if self.steps else None}


class OffSizeRefused(NotServed):
    """A frame off the model's sizes, refused because router.off_size is "refuse"."""

    code = "off_size"


@dataclass(frozen=True)
class ServedSizes:
    """The sizes a model serves (its rtedit.json `sizes`, within the engine's buckets when it has them) and what the
    router does with a frame of another size: "resize" answers it at the nearest served size (the input centre-
    cropped to that aspect and resized; the reply's `resized` says so), "refuse" answers OffSizeRefused (422).
    Without model sizes every frame passes (the engine's buckets, if any, are EngineChecks' business)."""

    sizes: tuple[tuple[int, int], ...]  # (height, width); empty: the model lists none
    off_size: OffSize = "resize"
    max_pixels: int = 0  # an input whose header says more is left to the engine to refuse, never decoded here

    @classmethod
    def of_model(cls, sidecar: Sidecar, engine: EditorConfig, off_size: OffSize, model: str) -> ServedSizes:
        sizes = tuple(sidecar.sizes or ())
        if sizes and engine.buckets.sizes:
            sizes = tuple(s for s in sizes if s in engine.buckets.sizes)
            if not sizes:
                raise ConfigError(f"engine.buckets.sizes {[list(s) for s in engine.buckets.sizes]} has none of the "
                                  f"sizes {model} serves (rtedit.json sizes {[list(s) for s in sidecar.sizes]})")
        return cls(sizes, off_size, engine.images.max_pixels)

    def describe_sizes(self) -> str:
        return ", ".join(f"{h}x{w}" for h, w in self.sizes)

    def fit(self, job: EditJob) -> tuple[EditJob, dict[str, Any] | None]:
        """The job as the model serves it, and the reply's `resized` note when it had to change (None: unchanged).

        Raises OffSizeRefused for an off-size frame when off_size is "refuse"."""
        if not self.sizes:
            return job, None
        try:
            with PIL.Image.open(io.BytesIO(job.image)) as header:  # reads the header only
                image_width, image_height = header.size
        except Exception:  # noqa: BLE001 - not an image: the engine refuses it with InvalidImage and the reason
            return job, None
        if image_width * image_height > self.max_pixels:
            return job, None  # the engine refuses it before decoding; decoding it here would be the bomb
        mismatch = size_mismatch(self.sizes, image_height, image_width, job.height, job.width)
        if mismatch is None:
            return job, None
        if self.off_size == "refuse":
            raise OffSizeRefused(f"{mismatch}; send a frame of a served size (router.off_size is 'refuse')")
        wanted = frame_size(image_height, image_width, job.height, job.width)
        height, width = wanted if wanted in self.sizes else nearest_size(self.sizes, *wanted)
        image = _crop_resize(job.image, height, width)
        note = {"from": [image_height, image_width], "to": [height, width], "reason": mismatch}
        return dataclasses.replace(job, image=image, height=height, width=width), note


def _crop_resize(data: bytes, height: int, width: int) -> bytes:
    """The image centre-cropped to height:width and resized to it, as lossless PNG (the engine decodes it again)."""
    with PIL.Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    scale = max(width / rgb.width, height / rgb.height)
    crop_w, crop_h = min(rgb.width, round(width / scale)), min(rgb.height, round(height / scale))
    left, top = (rgb.width - crop_w) // 2, (rgb.height - crop_h) // 2
    out = rgb.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), PIL.Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
