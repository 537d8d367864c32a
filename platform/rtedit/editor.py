"""The Editor: one frame in three timed stages (prepare, denoise, decode), the FLUX.2 klein editing path in our code.

With every approximation off it computes exactly what `Flux2KleinPipeline(..., is_distilled=True)(guidance_scale=1)`
computes for the same inputs and seed; tests hold it to that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from rtedit.config import EditorConfig
from rtedit.errors import EditCancelled, EditError, InvalidRequest, ModelLoadError, UnsupportedRequest
from rtedit.images import (
    OUTPUT_FORMATS,
    ImageInput,
    array_to_pil,
    encode_image,
    fit_like_pipeline,
    pixels_to_array,
    to_pixel_tensor,
    to_uint8_array,
)
from rtedit.latents import LatentIdCache, TimestepCache, initial_noise, pack, unpack
from rtedit.presets import PRESETS, ModelBundle, build_preset, load_pretrained
from rtedit.prompts import PromptCache, PromptEmbedding, PromptEncoder, PromptService, settings_key
from rtedit.vae import LatentCodec

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
# The transformer sees 16x16-pixel patches: a VAE factor of 8 and 2x2 patchify.
PATCH_PIXELS = 16


@dataclass
class EditResult:
    """One edited frame."""

    image: PIL.Image.Image
    array: np.ndarray  # float32 HxWx3 in [0, 1], before quantisation
    timings: dict[str, float]  # ms: prepare, denoise, decode, total
    data: bytes | None = None  # encoded image when an output format was asked for
    seed: int = 0
    steps: int = 2
    prompt_truncated: bool = False


def stop_if_cancelled(cancel: threading.Event | None, where: str) -> None:
    if cancel is not None and cancel.is_set():
        raise EditCancelled(f"edit cancelled by its caller {where}")


@dataclass
class FramePlan:
    """Everything the denoise and decode stages need, produced by prepare."""

    emb: PromptEmbedding
    latents: torch.Tensor  # [1, N, 128] packed noise
    cond_tokens: torch.Tensor  # [1, M, 128] input image then references
    img_ids: torch.Tensor  # [1, N + M, 4]
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    lat_h: int
    lat_w: int
    cancel: threading.Event | None = None  # set by a caller that gave up: the next step boundary stops the edit

    def step_inputs(self, latents: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> dict:
        """The transformer's kwargs for one step: target tokens then condition tokens, as the pipeline orders them."""
        return dict(
            hidden_states=torch.cat([latents, self.cond_tokens], dim=1).to(dtype),
            timestep=t.expand(1).to(latents.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=self.emb.embeds,
            txt_ids=self.emb.text_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )


def _gray(height: int, width: int) -> np.ndarray:
    """A plain frame for probes and warm-ups."""
    return np.full((height, width, 3), 128, np.uint8)


class StageTimer:
    """Stage boundaries in ms: CUDA events on a GPU (no sync until the end), a host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, stage: str) -> None:
        self._marks.append((stage, self._now()))

    def timings(self) -> dict[str, float]:
        if self._cuda:
            self._marks[-1][1].synchronize()
            elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            elapsed = lambda a, b: (b - a) * 1000.0  # noqa: E731
        out = {name: elapsed(prev, cur) for (_, prev), (name, cur) in zip(self._marks, self._marks[1:])}
        out["total"] = elapsed(self._marks[0][1], self._marks[-1][1])
        return out


def resolve_device(device: str | torch.device | None, prefer_gpu: bool) -> torch.device:
    if device is None:
        return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


class Editor:
    """Edits frames with FLUX.2 klein; thread-safe, one request at a time on its device."""

    def __init__(self, bundle: ModelBundle, config: EditorConfig | None = None) -> None:
        config = (config or EditorConfig()).validate()
        sidecar = bundle.sidecar
        # The model folder knows its own prompt length and taps; they override the defaults.
        config = replace(
            config,
            prompt=replace(config.prompt, max_length=sidecar.prompt_length, layers=tuple(sidecar.text_encoder_layers)),
        )
        config.validate()
        self.config = config
        self.bundle = bundle
        self.transformer, self.vae, self.scheduler = bundle.transformer, bundle.vae, bundle.scheduler
        self.text_encoder, self.tokenizer = bundle.text_encoder, bundle.tokenizer
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        self.codec = LatentCodec(self.vae, self._load_taef2(config, sidecar))
        encoder = (
            PromptEncoder(self.text_encoder, self.tokenizer, config.prompt, name=bundle.name)
            if self.text_encoder is not None and self.tokenizer is not None
            else None
        )
        # Without a text encoder the key still matches the one a text-encoder service computes for this model.
        self.prompts = PromptService(encoder, config.prompt, settings_key(bundle.name, config.prompt))
        self.latent_ids = LatentIdCache()
        self.timestep_cache = TimestepCache(self.scheduler)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.attention = self.dbcache = self.compiled = None
        self.warm_steps = sidecar.steps[0] if sidecar.steps else 2
        self._setup_fast_path()

    def _load_taef2(self, config: EditorConfig, sidecar):
        """TAEF2 when the config or the model folder's rtedit.json asks for it; its weights are checked by sha256."""
        spec = sidecar.autoencoder
        if config.autoencoder != "taef2" and spec is None:
            return None
        from rtedit.taef2 import TAEF2_SHA256, load_taef2

        if spec is not None:
            for name, digest in spec.sha256.items():
                if TAEF2_SHA256.get(name) != digest:
                    raise ModelLoadError(f"rtedit.json names {name} with sha256 {digest}, not the official TAEF2 file")
        return load_taef2(config.taef2_dir, device=self.vae.device, dtype=self.vae.dtype)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(
        cls, name: str, device=None, dtype=None, config: EditorConfig | None = None, seed: int = 0
    ) -> "Editor":
        """`tiny` (CPU by default) or `klein-4b-random` (GPU), with seeded random weights."""
        if name not in PRESETS:
            raise ModelLoadError(f"unknown preset {name!r}; presets are {PRESETS}")
        dev = resolve_device(device, prefer_gpu=name != "tiny")
        config = config or EditorConfig()
        bundle = build_preset(name, dev, resolve_dtype(dtype, dev), seed=seed, text_encoder=config.text_encoder)
        return cls(bundle, replace(config, model=name))

    @classmethod
    def from_pretrained(cls, path_or_id: str, device=None, dtype=None, config: EditorConfig | None = None) -> "Editor":
        """A diffusers Flux2KleinPipeline folder or hub id, with its optional rtedit.json sidecar."""
        dev = resolve_device(device, prefer_gpu=True)
        config = config or EditorConfig()
        bundle = load_pretrained(str(path_or_id), dev, resolve_dtype(dtype, dev), text_encoder=config.text_encoder)
        return cls(bundle, replace(config, model=str(path_or_id)))

    @classmethod
    def from_pipeline(cls, pipe, config: EditorConfig | None = None) -> "Editor":
        """Adopts the components of an existing Flux2KleinPipeline (which stays usable)."""
        bundle = ModelBundle(
            transformer=pipe.transformer,
            vae=pipe.vae,
            scheduler=pipe.scheduler,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            name=getattr(pipe, "name_or_path", None) or type(pipe).__name__,
        )
        return cls(bundle, config)

    @classmethod
    def from_config(cls, config: EditorConfig) -> "Editor":
        """The one entry point the CLI, Serve and jobs share: a preset name or a model folder / hub id."""
        config.validate()
        if config.model in PRESETS:
            return cls.from_preset(config.model, config.device, config.dtype, config)
        return cls.from_pretrained(config.model, config.device, config.dtype, config)

    # ---- prompts ------------------------------------------------------------------------------------------------
    @property
    def prompt_encoder(self) -> PromptEncoder | None:
        return self.prompts.encoder

    @property
    def prompt_cache(self) -> PromptCache:
        return self.prompts.cache

    def prompt_key(self, prompt: str) -> str:
        """The cache key of an instruction for this model (no text encoder needed)."""
        return self.prompts.key(prompt)

    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        """The embedding of an instruction, from the PromptCache or the text encoder on a miss."""
        return self.prompts.encode_prompt(prompt)

    def encode_prompts(self, prompts: Sequence[str]) -> list[PromptEmbedding]:
        """Several instructions at once; the cache misses go through the text encoder as one batch."""
        return self.prompts.encode_prompts(prompts)

    def _embedding(self, prompt: str | PromptEmbedding) -> PromptEmbedding:
        if isinstance(prompt, PromptEmbedding):
            emb = prompt
        else:
            emb = self.encode_prompt(prompt)
        expected = self.transformer.config.joint_attention_dim
        if emb.embeds.ndim != 3 or emb.embeds.shape[0] != 1 or emb.embeds.shape[2] != expected:
            raise InvalidRequest(f"prompt embeddings must be [1, L, {expected}], got {list(emb.embeds.shape)}")
        if list(emb.text_ids.shape) != [1, emb.embeds.shape[1], 4]:
            raise InvalidRequest(f"text ids must be [1, {emb.embeds.shape[1]}, 4], got {list(emb.text_ids.shape)}")
        if emb.embeds.device.type == "cpu" and not torch.isfinite(emb.embeds).all():
            raise InvalidRequest("prompt embeddings contain NaN or infinity")
        if emb.embeds.device != self.device or emb.embeds.dtype != self.dtype:
            emb = emb.to(self.device, self.dtype)
        return emb

    # ---- the frame ----------------------------------------------------------------------------------------------
    def edit(
        self,
        image: ImageInput,
        prompt: str | PromptEmbedding,
        *,
        references: Sequence[ImageInput] = (),
        steps: int = 2,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        output_format: str | None = None,
        cancel: threading.Event | None = None,
    ) -> EditResult:
        """Edits `image` as `prompt` says, conditioned on optional reference images.

        `cancel`: an event the caller sets when it no longer wants the result (a thread cannot be killed); the edit
        then raises EditCancelled at its next stage or denoising step and frees the model for the next request.
        """
        try:
            self._check_request(references, steps, seed, height, width, output_format)
            with self._lock, torch.inference_mode():
                result = self._edit(image, prompt, tuple(references), steps, seed, height, width, output_format,
                                    cancel)
        except EditError as exc:
            self._counts[f"error:{type(exc).__name__}"] += 1
            raise
        self._counts["edits"] += 1
        return result

    def _edit(self, image, prompt, references, steps, seed, height, width, output_format, cancel=None) -> EditResult:
        stop_if_cancelled(cancel, "while it waited for the model")
        timer = StageTimer(self.device)
        plan = self._prepare(image, prompt, references, steps, seed, height, width)
        plan.cancel = cancel
        timer.mark("prepare")
        latents = self._denoise(plan)
        timer.mark("denoise")
        stop_if_cancelled(cancel, "before decode")
        pil, array, data = self._decode(latents, plan, output_format)
        timer.mark("decode")
        return EditResult(pil, array, timer.timings(), data, seed, steps, plan.emb.truncated)

    def _prepare(self, image, prompt, references, steps, seed, height, width) -> "FramePlan":
        """1. prepare: prompt embedding, condition images -> latent tokens, noise, position ids, timesteps."""
        emb = self._embedding(prompt)
        limits = self.config.images
        arrays = [fit_like_pipeline(to_uint8_array(image, limits, "image"))]
        arrays += [fit_like_pipeline(to_uint8_array(r, limits, f"reference {i}")) for i, r in enumerate(references)]
        explicit = height is not None or width is not None
        height = height or arrays[0].shape[0]
        width = width or arrays[0].shape[1]
        if self.config.buckets.sizes:
            height, width, arrays = self._into_bucket(height, width, arrays, explicit)
        lat_h, lat_w = height // PATCH_PIXELS, width // PATCH_PIXELS
        cond_latents = [self._encode_condition(arr, is_input=i == 0) for i, arr in enumerate(arrays)]
        cond_tokens = torch.cat([pack(lat) for lat in cond_latents], dim=1)
        cond_ids = self.latent_ids.references(tuple(tuple(lat.shape[2:]) for lat in cond_latents), self.device)
        target_ids = self.latent_ids.target(lat_h, lat_w, self.device)
        noise = initial_noise(seed, (1, self.transformer.config.in_channels, lat_h, lat_w), self.dtype, self.device)
        timesteps, sigmas = self.timestep_cache.get(lat_h * lat_w, steps, self.device)
        return FramePlan(
            emb=emb, latents=pack(noise), cond_tokens=cond_tokens, img_ids=torch.cat([target_ids, cond_ids], dim=1),
            timesteps=timesteps, sigmas=sigmas, lat_h=lat_h, lat_w=lat_w,
        )

    def _into_bucket(self, height: int, width: int, arrays: list[np.ndarray], explicit: bool):
        """Serving shapes are fixed: the output is a bucket size, and every condition image is resized to it.

        A frame of another size goes to the first bucket; an explicitly requested size must be one of them.
        """
        buckets = self.config.buckets
        size = ((height // PATCH_PIXELS) * PATCH_PIXELS, (width // PATCH_PIXELS) * PATCH_PIXELS)
        if size not in buckets.sizes:
            if explicit:
                raise InvalidRequest(f"output size {height}x{width} is not served here; sizes: {list(buckets.sizes)}")
            size = buckets.sizes[0]
        if len(arrays) - 1 not in buckets.references:
            raise InvalidRequest(
                f"{len(arrays) - 1} references are not served here; reference counts: {list(buckets.references)}"
            )
        h, w = size
        resize = lambda a: np.asarray(PIL.Image.fromarray(a).resize((w, h), PIL.Image.Resampling.BILINEAR))  # noqa: E731
        arrays = [a if a.shape[:2] == size else resize(a) for a in arrays]
        return h, w, arrays

    def _decode(self, latents: torch.Tensor, plan: "FramePlan", output_format):
        """3. decode: unpack, undo the latent batch-norm, unpatchify, VAE decode, quantise and encode."""
        pixels = self.codec.decode(unpack(latents, plan.lat_h, plan.lat_w))
        array = pixels_to_array(pixels)
        pil = array_to_pil(array)
        data = encode_image(pil, output_format) if output_format else None
        return pil, array, data

    def _encode_condition(self, arr: np.ndarray, is_input: bool) -> torch.Tensor:
        """The input image rides the main (bucketed, compilable) path; references are encoded on their own."""
        pixels = to_pixel_tensor(arr, self.codec.device, self.codec.dtype)
        return self.codec.encode(pixels) if is_input else self.codec.encode_reference(pixels)

    def _denoise(self, plan: "FramePlan") -> torch.Tensor:
        """2. denoise; a kernel failure retries the whole stage on the next attention backend (DBCache refreshed)."""
        return self.attention.run(self._denoise_steps, plan) if self.attention else self._denoise_steps(plan)

    def _denoise_steps(self, plan: "FramePlan") -> torch.Tensor:
        """Euler steps of the flow, condition tokens appended after the target tokens."""
        latents, num_target = plan.latents, plan.latents.shape[1]
        if self.dbcache is not None:
            self.dbcache.refresh(len(plan.timesteps))  # no cached residual may cross requests
        for i, t in enumerate(plan.timesteps):
            stop_if_cancelled(plan.cancel, f"before step {i + 1}")
            velocity = self.transformer(**plan.step_inputs(latents, t, self.dtype))[0][:, :num_target]
            # FlowMatchEulerDiscreteScheduler.step's arithmetic: float32 sample, cast back to the model dtype.
            latents = (latents.to(torch.float32) + (plan.sigmas[i + 1] - plan.sigmas[i]) * velocity).to(velocity.dtype)
        return latents

    def _warm_prompt(self) -> str | PromptEmbedding:
        """A prompt for probes and warm-ups; zeros of the right shape where this process has no text encoder."""
        if self.prompt_encoder is not None:
            return "warm up"
        length = self.config.prompt.max_length
        embeds = torch.zeros(1, length, self.transformer.config.joint_attention_dim, dtype=self.dtype, device=self.device)
        return PromptEmbedding(embeds, self.latent_ids.text(length, self.device), "warm-up")

    # ---- the fast path ------------------------------------------------------------------------------------------
    def _setup_fast_path(self) -> None:
        """Attention probe, then DBCache, then selective compile and the warm-up of every bucket, in that order."""
        cfg = self.config
        if cfg.select_attention:
            from rtedit.attention import select_attention_backend

            h, w = max(cfg.buckets.sizes, key=lambda s: s[0] * s[1]) if cfg.buckets.sizes else (512, 512)
            refs = max(cfg.buckets.references)
            with torch.inference_mode():
                plan = self._prepare(_gray(h, w), self._warm_prompt(), [_gray(h, w)] * refs, 2, 0, h, w)
                sample = plan.step_inputs(plan.latents, plan.timesteps[0], self.dtype)
                self.attention = select_attention_backend(self.transformer, sample, config=cfg.attention)
        if cfg.dbcache.enabled:
            from rtedit.caching import attach_cache

            self.dbcache = attach_cache(self.transformer, cfg.dbcache)
        if cfg.compile.enabled:
            from rtedit.compile import compile_regions

            ae = self.codec.taef2 if self.codec.taef2 is not None else self.vae
            self.compiled = compile_regions(cfg.compile, transformer=self.transformer, vae_encoder=ae.encoder, vae_decoder=ae.decoder)
            self.codec.reference_context = lambda: self.compiled.eager("vae_encoder")
            buckets = [(h, w, r) for (h, w) in cfg.buckets.sizes for r in cfg.buckets.references]
            self.compiled.warm_up(buckets, lambda b: self.edit(_gray(b[0], b[1]), self._warm_prompt(), references=[_gray(b[0], b[1])] * b[2], steps=self.warm_steps, height=b[0], width=b[1]))

    # ---- checks and reporting -----------------------------------------------------------------------------------
    def _check_request(self, references, steps, seed, height, width, output_format) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise InvalidRequest(f"steps must be an integer, got {steps!r}")
        if not 1 <= steps <= self.config.max_steps:
            raise InvalidRequest(f"steps must be in 1..{self.config.max_steps}, got {steps}")
        allowed = self.bundle.sidecar.steps
        if allowed is not None and steps not in allowed:
            raise UnsupportedRequest(f"this model was trained for steps {list(allowed)}; got steps={steps}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InvalidRequest(f"seed must be an integer, got {seed!r}")
        if not 0 <= int(seed) <= MAX_SEED:
            raise InvalidRequest(f"seed must be in 0..{MAX_SEED}, got {seed}")
        if isinstance(references, (str, bytes)) or not isinstance(references, (list, tuple)):
            raise InvalidRequest(f"references must be a list of images, got {type(references).__name__}")
        if len(references) > self.config.images.max_references:
            raise InvalidRequest(
                f"{len(references)} references given; at most {self.config.images.max_references} are accepted"
            )
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{name} must be an integer number of pixels, got {value!r}")
            if value < self.config.images.min_side:
                raise InvalidRequest(f"{name} must be at least {self.config.images.min_side}, got {value}")
        if height and width and height * width > self.config.images.max_pixels:
            raise InvalidRequest(f"{height}x{width} is over the limit of {self.config.images.max_pixels} pixels")
        if output_format is not None and str(output_format).lower() not in OUTPUT_FORMATS:
            raise InvalidRequest(f"output_format must be one of {sorted(set(OUTPUT_FORMATS))}, got {output_format!r}")

    @property
    def model_info(self) -> dict:
        return {
            "name": self.bundle.name,
            "random_weights": self.bundle.random_weights,
            "description": self.bundle.sidecar.description,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "transformer_params": sum(p.numel() for p in self.transformer.parameters()),
            "has_text_encoder": self.prompt_encoder is not None,
            "autoencoder": self.codec.name,
            "steps": list(self.bundle.sidecar.steps) if self.bundle.sidecar.steps else None,
            "native_size": self.bundle.sidecar.native_size,
        }

    def stats(self) -> dict:
        fast = {
            "attention": self.attention.stats() if self.attention else {"chosen": "native (not probed)"},
            "dbcache": self.dbcache.stats() if self.dbcache else {"enabled": False},
            "compile": self.compiled.stats() if self.compiled else {"enabled": False},
        }
        return {
            **fast,
            "edits": self._counts["edits"],
            "errors": {k.split(":", 1)[1]: v for k, v in self._counts.items() if k.startswith("error:")},
            "prompt_cache": self.prompt_cache.stats(),
            "latent_id_cache_entries": len(self.latent_ids),
            "timestep_cache_entries": len(self.timestep_cache),
        }
