"""The Editor: one frame in three timed stages (prepare, denoise, decode), the FLUX.2 klein editing path in our code.

With every approximation off it computes exactly what `Flux2KleinPipeline(..., is_distilled=True)(guidance_scale=1)`
computes for the same inputs and seed; tests hold it to that. The fast path (attention probe, DBCache, selective
compile, TAEF2, warm-up) is built from the EditorConfig in one place, `rtedit.fast_path.build`, in one order.

A causal model (rtedit.json "causal", `Editor.mode`) runs its mode's processors and `causal_denoise` over a
conditions-first layout; in the "session" mode a frame also has a session stage (T's and R's keys and values, from
the K/V store for an open `Session`, rtedit.session, or computed once for a one-shot edit).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from rtedit import fast_path
from rtedit.config import EditorConfig
from rtedit.device import is_device_failure, resolve_device, resolve_dtype
from rtedit.errors import ConfigError, EditCancelled, EditError, EngineDead, InvalidRequest, ModelLoadError
from rtedit.frame_request import FrameRequest, check_request
from rtedit.images import (
    ImageInput,
    check_output_format,
    check_shape,
    encode_image,
    fit_like_pipeline,
    fits_pipeline,
    open_checked,
    postprocess,
    stage_uint8,
    to_host,
    to_pixel_tensor,
    to_uint8_array,
    uint8_to_pixels,
)
from rtedit.jpeg_codec import is_jpeg
from rtedit.kv_store import KVStore
from rtedit.model.causal import LayerKV, SessionCache, causal_denoise
from rtedit.model.inputs import TokenLayout, token_layout, transformer_inputs
from rtedit.model.packing import PATCH_PIXELS, LatentIdCache, pack, unpack
from rtedit.model.schedule import NoiseCache, TimestepCache, euler_step
from rtedit.model.step_reuse import StepReuse
from rtedit.presets import KV_CONDITION_TIMESTEP, PRESETS, ModelBundle, Sidecar, build_preset, load_pretrained
from rtedit.prompts import PromptCache, PromptEmbedding, PromptEncoder, PromptService, model_prompt_settings
from rtedit.session import Session, SessionRegistry, session_cache
from rtedit.stage_timer import StageTimer
from rtedit.vae import LatentCodec

log = logging.getLogger(__name__)

@dataclass
class EditResult:
    """One edited frame."""

    image: PIL.Image.Image
    array: np.ndarray  # float32 HxWx3 in [0, 1], before quantisation
    timings: dict[str, float]  # ms: prepare, (session,) denoise, decode, total
    data: bytes | None = None  # encoded image when an output format was asked for
    seed: int = 0
    steps: int = 2
    prompt_truncated: bool = False


@dataclass
class FramePlan:
    """Everything the denoise and decode stages need, produced by prepare."""

    emb: PromptEmbedding
    latents: torch.Tensor  # [1, N, 128] packed noise
    conditions: torch.Tensor  # [1, M, 128] input image then references
    layout: TokenLayout  # where X, I and R sit, with their position ids
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    lat_h: int
    lat_w: int
    condition_shapes: tuple[tuple[int, int], ...] = ()  # token grid of the input image, then of each reference
    cancel: threading.Event | None = None  # set by a caller that gave up: the next step boundary stops the edit
    session: SessionCache | None = None  # the "session" mode's T/R keys and values (the session stage)

    def step_inputs(self, latents: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> dict:
        """The transformer's kwargs for one step (the scheduler's t is 1000 x sigma, the model takes sigma)."""
        sigma = t.expand(1).to(latents.dtype) / 1000
        return transformer_inputs(self.layout, latents, self.conditions, sigma, self.emb.embeds, dtype)


def training_free(bundle: ModelBundle, config: EditorConfig) -> Sidecar:
    """The sidecar of a full-attention model run in config.causal without distillation (the drift baseline),
    conditions modulated at timestep 0 as Flux2KleinKVPipeline does."""
    if bundle.sidecar.causal is not None:
        raise ConfigError(f"training_free runs a full-attention model causally; {bundle.name} was trained for the "
                          f"causal mode {bundle.sidecar.causal!r} already (drop training_free)")
    log.warning("%s runs in the causal mode %r without distillation (training_free): its outputs drift from the "
                "model's own; for measuring that drift only", bundle.name, config.causal)
    return replace(bundle.sidecar, causal=config.causal, condition_timestep=KV_CONDITION_TIMESTEP)


def stop_if_cancelled(cancel: threading.Event | None, where: str) -> None:
    if cancel is not None and cancel.is_set():
        raise EditCancelled(f"edit cancelled by its caller {where}")


class Editor:
    """Edits frames with FLUX.2 klein; thread-safe, one request at a time on its device."""

    def __init__(self, bundle: ModelBundle, config: EditorConfig | None = None) -> None:
        config = (config or EditorConfig()).validate()
        sidecar = training_free(bundle, config) if config.training_free else bundle.sidecar
        sidecar.check_servable(bundle.name, config.causal)
        self.mode, self.condition_timestep = sidecar.causal, sidecar.condition_timestep  # None: full attention
        prompt_config, prompt_settings = model_prompt_settings(config.prompt, sidecar, bundle.name)
        self.config = replace(config, prompt=prompt_config).validate()
        self.bundle = bundle
        self.transformer, self.vae, self.scheduler = bundle.transformer, bundle.vae, bundle.scheduler
        self.text_encoder, self.tokenizer = bundle.text_encoder, bundle.tokenizer
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        self.codec = LatentCodec(self.vae, self._load_taef2(self.config, sidecar))
        encoder = (
            PromptEncoder(self.text_encoder, self.tokenizer, prompt_config, name=bundle.name)
            if self.text_encoder is not None and self.tokenizer is not None
            else None
        )
        # Without a text encoder the key still matches the one a text-encoder service computes for this model.
        self.prompts = PromptService(encoder, prompt_config, prompt_settings)
        self.latent_ids = LatentIdCache()
        self.timestep_cache = TimestepCache(self.scheduler)
        self.noise = NoiseCache()
        self._lock = threading.Lock()
        self._reuse_counts: dict[str, int] = {}  # reuse_counts(): refreshed after a frame, at most once a second
        self._reuse_counts_at = -math.inf
        self._counts: Counter[str] = Counter()
        self.device_failure: str | None = None  # set once the device failed beyond recovery (check_health raises)
        self.attention = self.dbcache = self.compiled = None
        self.step_reuse: StepReuse | None = None  # the session mode's step-2 reuse (dbcache config, session mode)
        self.fp8: dict | None = None  # what rtedit.accel.fp8 converted, when config.fp8 is on
        self.jpeg = None  # rtedit.jpeg_codec.DeviceJpeg when config.image_codec chose nvJPEG
        self.jpeg_stats: dict = {"codec": "host", "reason": "image_codec: host"}
        self.graphs = None  # rtedit.accel.cuda_graphs.StageGraphs when config.cuda_graphs (encode, denoise, decode)
        self.warm: dict | None = None  # what warm_up() did, once it ran
        self.startup: dict[str, float] = {}  # seconds of each start-up phase (rtedit.fast_path.startup_phase)
        self.warm_steps = sidecar.steps[0] if sidecar.steps else 2
        self.sessions = SessionRegistry()  # the open sessions by id (rtedit.session)
        self.kv_store: KVStore | None = None
        fast_path.build(self)
        if self.mode == "session":  # after the warm-up, so a GPU's default bound sees the working memory taken
            self.kv_store = KVStore.for_device(self.config.kv_store_bytes, self.device, self.config.kv_store_share)

    def _load_taef2(self, config: EditorConfig, sidecar):
        """TAEF2 when the config or the model folder's rtedit.json asks for it; its weights are checked by sha256."""
        spec = sidecar.autoencoder
        if config.autoencoder != "taef2" and spec is None:
            return None
        from rtedit.accel.taef2 import TAEF2_SHA256, load_taef2

        if spec is not None:
            for name, digest in spec.sha256.items():
                if TAEF2_SHA256.get(name) != digest:
                    raise ModelLoadError(f"rtedit.json names {name} with sha256 {digest}, not the official TAEF2 file")
        return load_taef2(config.taef2_dir, device=self.vae.device, dtype=self.vae.dtype)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EditorConfig) -> "Editor":
        """The one entry point the CLI, Serve, the jobs and the benchmarks share: a preset, a folder or a hub id,
        with the fast path the config asks for built and warmed."""
        config.validate()
        if config.model in PRESETS:
            return cls.from_preset(config.model, config.device, config.dtype, config)
        return cls.from_pretrained(config.model, config.device, config.dtype, config)

    @classmethod
    def from_preset(
        cls, name: str, device=None, dtype=None, config: EditorConfig | None = None, seed: int = 0,
        steps: tuple[int, ...] | None = None,
    ) -> "Editor":
        """`tiny` (CPU by default) or `klein-4b-random` (GPU), with seeded random weights; `steps`: the step counts
        it serves, as a distilled student's rtedit.json names them (a 1-step student's frame, timed on its shapes)."""
        if name not in PRESETS:
            raise ModelLoadError(f"unknown preset {name!r}; presets are {PRESETS}")
        dev = resolve_device(device, prefer_gpu=name != "tiny")
        config = config or EditorConfig()
        bundle = build_preset(name, dev, resolve_dtype(dtype, dev), seed=seed, text_encoder=config.text_encoder,
                              causal=config.causal, steps=steps)
        return cls(bundle, replace(config, model=name))

    @classmethod
    def from_pretrained(cls, path_or_id: str, device=None, dtype=None, config: EditorConfig | None = None) -> "Editor":
        """A diffusers Flux2KleinPipeline folder or hub id, with its optional rtedit.json sidecar."""
        dev = resolve_device(device, prefer_gpu=True)
        config = config or EditorConfig()
        # A training-free run loads a full-attention folder as itself; the Editor then runs it in config.causal.
        bundle = load_pretrained(str(path_or_id), dev, resolve_dtype(dtype, dev), text_encoder=config.text_encoder,
                                 causal="auto" if config.training_free else config.causal)
        return cls(bundle, replace(config, model=str(path_or_id)))

    @classmethod
    def from_pipeline(cls, pipe, config: EditorConfig | None = None) -> "Editor":
        """Adopts the components of an existing Flux2KleinPipeline or Flux2KleinKVPipeline (which stays usable,
        except that a KV pipeline's transformer then carries the editor's kv processors)."""
        bundle = ModelBundle(
            transformer=pipe.transformer,
            vae=pipe.vae,
            scheduler=pipe.scheduler,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            name=getattr(pipe, "name_or_path", None) or type(pipe).__name__,
            sidecar=Sidecar.of_pipeline(pipe),
        )
        return cls(bundle, config)

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
        emb = prompt if isinstance(prompt, PromptEmbedding) else self.encode_prompt(prompt)
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

    # ---- sessions (rtedit.session) ------------------------------------------------------------------------------
    def open_session(self, prompt: str | PromptEmbedding, references: Sequence[ImageInput] = (),
                     bucket: tuple[int, int] | None = None, *, session_id: str | None = None) -> Session:
        """Frames edited with this instruction and these references (checked and decoded now), each frame's output
        size `bucket` (height, width) when given. `session_id` (a replica's websocket id; unique among the open
        sessions) finds it again with `session(session_id)`."""
        return self.sessions.open(self, prompt, references, bucket, session_id)

    def session(self, session_id: str) -> Session | None:
        """The open Session registered under `session_id`, or None (never opened, or closed)."""
        return self.sessions.get(session_id)

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
        On a "session" model this is a one-shot session (rtedit.session).
        """
        return self._run(FrameRequest(image, prompt, references, steps, seed, height, width, output_format), cancel)

    def _run(self, request: FrameRequest, cancel: threading.Event | None = None, session=None) -> EditResult:
        """One frame under the editor's lock, with its errors counted (a session's frames come here too)."""
        try:
            request = check_request(request, self.config, self.bundle.sidecar.steps)
            with self._lock, torch.inference_mode():
                result = self._edit(request, cancel, session)
                self._refresh_reuse_counts()
        except EditError as exc:
            self._counts[f"error:{type(exc).__name__}"] += 1
            raise
        except Exception as exc:
            if not is_device_failure(exc):
                raise
            self.device_failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self._counts["error:EngineDead"] += 1
            log.error("the device failed while editing (%s); this editor serves nothing more", self.device_failure)
            raise EngineDead(f"the editor's device failed ({self.device_failure}); restart it") from exc
        self._counts["edits"] += 1
        return result

    def _edit(self, request: FrameRequest, cancel: threading.Event | None = None, session=None) -> EditResult:
        stop_if_cancelled(cancel, "while it waited for the model")
        if self.device_failure is not None:
            raise EngineDead(f"the editor's device failed earlier ({self.device_failure}); restart it")
        timer = StageTimer(self.device)
        inputs = session.frame_inputs() if session is not None else None  # under the lock: updates wait for us
        if inputs is not None:
            request = replace(request, prompt=inputs.prompt, references=inputs.references)
        plan = self._prepare(request, inputs.latents if inputs is not None else None)
        plan.cancel = cancel
        timer.mark("prepare")
        if self.mode == "session":  # T's and R's keys and values: the session's stored ones, or a one-shot pass
            plan.session = self._attend(session_cache, self, plan, session, inputs)
            timer.mark("session")
        latents = self._denoise(plan)
        timer.mark("denoise")
        stop_if_cancelled(cancel, "before decode")
        pil, array, data = self._decode(latents, plan, request.output_format)
        timer.mark("decode")
        return EditResult(pil, array, timer.timings(), data, request.seed, request.steps, plan.emb.truncated)

    def _prepare(self, request: FrameRequest, reference_latents: dict | None = None) -> FramePlan:
        """1. prepare: prompt embedding, condition images -> latent tokens, noise, position ids, timesteps.

        `reference_latents`: a session's latents of its references by (index, fitted shape), filled on first use."""
        emb = self._embedding(request.prompt)
        limits = self.config.images
        frame = self._device_frame(request) if self.jpeg is not None else None
        arrays = [frame if frame is not None else fit_like_pipeline(to_uint8_array(request.image, limits, "image"))]
        arrays += [fit_like_pipeline(to_uint8_array(r, limits, f"reference {i}"))
                   for i, r in enumerate(request.references)]
        explicit = request.height is not None or request.width is not None
        height = request.height or arrays[0].shape[0]
        width = request.width or arrays[0].shape[1]
        if self.config.buckets.sizes:
            height, width, arrays = self._into_bucket(height, width, arrays, explicit)
        lat_h, lat_w = height // PATCH_PIXELS, width // PATCH_PIXELS
        cond_latents = [self._encode_condition(arr, is_input=i == 0, memo=reference_latents, key=(i, arr.shape))
                        for i, arr in enumerate(arrays)]
        shapes = tuple(tuple(lat.shape[2:]) for lat in cond_latents)
        cond_ids = self.latent_ids.references(shapes, self.device)
        per_image = torch.split(cond_ids[0], [lat.shape[2] * lat.shape[3] for lat in cond_latents])
        target_ids = self.latent_ids.target(lat_h, lat_w, self.device)
        if self.mode is None:
            layout = token_layout(target_ids, per_image, emb.text_ids)
        else:  # both causal modes: I and R first, modulated at the model's condition timestep
            layout = token_layout(target_ids, per_image, emb.text_ids, "conditions_first", self.condition_timestep)
        noise = self.noise.get(request.seed, (1, self.transformer.config.in_channels, lat_h, lat_w), self.dtype,
                               self.device)
        timesteps, sigmas = self.timestep_cache.get(lat_h * lat_w, request.steps, self.device)
        return FramePlan(emb=emb, latents=pack(noise), conditions=torch.cat([pack(lat) for lat in cond_latents], 1),
                         layout=layout, timesteps=timesteps, sigmas=sigmas, lat_h=lat_h, lat_w=lat_w,
                         condition_shapes=shapes)

    def _device_frame(self, request: FrameRequest) -> torch.Tensor | None:
        """The input JPEG decoded on the device (HxWx3 uint8), when it needs no resizing: already a served bucket
        (or, without buckets, a multiple of 16 within the pipeline's area). None: the host path decodes it."""
        if not is_jpeg(request.image):
            return None
        header = open_checked(request.image, self.config.images)
        width, height = header.size
        check_shape(width, height, self.config.images, "image")
        wanted = (request.height or height, request.width or width)
        served = wanted in self.config.buckets.sizes if self.config.buckets.sizes else fits_pipeline(height, width)
        if (height, width) != wanted or not served or header.mode not in ("RGB", "L"):
            self._counts["jpeg:host (resized or not RGB)"] += 1
            return None
        try:
            frame = self.jpeg.decode(bytes(request.image))
        except RuntimeError as exc:  # a JPEG nvJPEG cannot read: PIL decodes it or says why it is invalid
            if self._counts["jpeg:host (nvJPEG refused)"] == 0:
                log.warning("nvJPEG could not decode a frame (%s); such frames go to the host codec", exc)
            self._counts["jpeg:host (nvJPEG refused)"] += 1
            return None
        self._counts["jpeg:device decodes"] += 1
        return frame

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
        resized = [a if a.shape[:2] == size else
                   np.asarray(PIL.Image.fromarray(a).resize((w, h), PIL.Image.Resampling.BILINEAR)) for a in arrays]
        return h, w, resized

    def _encode_condition(self, arr: np.ndarray, is_input: bool, memo: dict | None = None, key=None) -> torch.Tensor:
        """The input image rides the main (bucketed, compilable, graph-captured) path; references are encoded on
        their own (once per session and size when a session's `memo` keeps them)."""
        if not is_input and memo is not None and key in memo:
            return memo[key]
        if is_input:  # a JPEG nvJPEG decoded is on the device already
            staged = arr[None] if isinstance(arr, torch.Tensor) else stage_uint8(arr[None], self.codec.device)
            if self.graphs is not None:
                return self.graphs.run("encode", arr.shape, self._encode_input, [staged])
            return self._encode_input(staged)
        latent = self.codec.encode_reference(to_pixel_tensor(arr, self.codec.device, self.codec.dtype))
        if memo is not None:
            memo[key] = latent
        return latent

    def _encode_input(self, staged: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(uint8_to_pixels(staged, self.codec.dtype))

    def _attend(self, fn, *args):
        """Runs a stage of transformer passes; a kernel failure retries it on the next attention backend."""
        return self.attention.run(fn, *args) if self.attention else fn(*args)

    def _denoise(self, plan: FramePlan) -> torch.Tensor:
        """2. denoise; a kernel failure retries the whole stage on the next attention backend (DBCache refreshed)."""
        return self._attend(self._denoise_steps, plan)

    def _denoise_steps(self, plan: FramePlan) -> torch.Tensor:
        """The steps, through the stage's CUDA graph for this shape when the editor has graphs (cancellation is then
        checked before the stage, not between its steps: a replay runs them all)."""
        if self.graphs is None:
            return self._steps(plan)
        session = plan.session
        key = (plan.lat_h, plan.lat_w, plan.condition_shapes, plan.layout.text_tokens, len(plan.timesteps))
        inputs = [plan.latents, plan.conditions, plan.emb.embeds, plan.emb.text_ids, plan.layout.img_ids,
                  plan.timesteps, plan.sigmas]
        held = [t for kv in session.layers for t in (kv.key, kv.value)] if session is not None else []

        def steps(latents, conditions, embeds, text_ids, img_ids, timesteps, sigmas, *kv):
            # Every tensor a step reads that can change between frames comes from the graph's static inputs.
            emb = replace(plan.emb, embeds=embeds, text_ids=text_ids)
            layout = replace(plan.layout, text_ids=text_ids[0], img_ids=img_ids)
            cache = None if session is None else replace(session, layers=tuple(
                LayerKV(k, v) for k, v in zip(kv[0::2], kv[1::2])))
            return self._steps(replace(plan, emb=emb, latents=latents, conditions=conditions, layout=layout,
                                       timesteps=timesteps, sigmas=sigmas, session=cache, cancel=None))

        on_replay = None  # a replay runs no Python: the reuse counters are told it ran
        if self.step_reuse is not None:
            on_replay = functools.partial(self.step_reuse.count_replayed_frame, len(plan.timesteps))
        elif self.dbcache is not None:
            on_replay = functools.partial(self.dbcache.count_replayed_request, len(plan.timesteps))
        return self.graphs.run("denoise", key, steps, inputs, held, on_replay=on_replay)

    def _steps(self, plan: FramePlan) -> torch.Tensor:
        """Euler steps of the flow; the velocity is read off the target tokens."""
        if self.mode is not None:  # the mode's cached passes (kv: step 1 extracts I's and R's K/V; session: I once)
            return causal_denoise(self.transformer, self.mode, plan.layout, plan.latents, plan.conditions,
                                  plan.emb.embeds, plan.timesteps, plan.sigmas, self.dtype, session=plan.session,
                                  before_step=lambda i: stop_if_cancelled(plan.cancel, f"before step {i + 1}"),
                                  reuse=self.step_reuse)
        latents = plan.latents
        if self.dbcache is not None:
            self.dbcache.refresh(len(plan.timesteps))  # no cached residual may cross requests
        for i, t in enumerate(plan.timesteps):
            stop_if_cancelled(plan.cancel, f"before step {i + 1}")
            velocity = self.transformer(**plan.step_inputs(latents, t, self.dtype))[0][:, plan.layout.target]
            latents = euler_step(latents, velocity, plan.sigmas[i], plan.sigmas[i + 1])
        return latents

    def _decode(self, latents: torch.Tensor, plan: FramePlan, output_format: str | None):
        """3. decode: unpack, undo the latent batch-norm, unpatchify, VAE decode, quantise (on the device), copy
        out, and encode."""
        if self.graphs is not None:
            image, quantised = self.graphs.run("decode", (plan.lat_h, plan.lat_w),
                                               functools.partial(self._decode_pixels, plan.lat_h, plan.lat_w),
                                               [latents])
        else:
            image, quantised = self._decode_pixels(plan.lat_h, plan.lat_w, latents)
        array, pixels = to_host(image, quantised)
        pil = PIL.Image.fromarray(pixels)
        if output_format and self.jpeg is not None and check_output_format(output_format) in ("jpeg", "jpg"):
            data = self.jpeg.encode(quantised)  # before the next frame's replay reuses the graph's output buffer
            self._counts["jpeg:device encodes"] += 1
        else:
            data = encode_image(pil, output_format) if output_format else None
        return pil, array, data

    def _decode_pixels(self, lat_h: int, lat_w: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return postprocess(self.codec.decode(unpack(latents, lat_h, lat_w)))

    # ---- the fast path and warm-up (rtedit.fast_path) -----------------------------------------------------------
    def warm_buckets(self) -> list[tuple[int, int, int]]:
        """(height, width, references) of every shape this editor serves."""
        return fast_path.warm_buckets(self)

    def warm_up(self, passes: int = 2) -> dict:
        """Runs every bucket `passes` times at the served step count (see rtedit.fast_path.warm_up)."""
        self.warm = fast_path.warm_up(self, passes)
        return self.warm

    # ---- checks and reporting -----------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Raises EngineDead once the device has failed beyond recovery (Serve then replaces the replica)."""
        if self.device_failure is not None:
            raise EngineDead(f"the editor's device failed ({self.device_failure})")

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
            "causal": self.mode,
            "condition_timestep": self.condition_timestep,
            "training_free": self.config.training_free,
        }

    def reuse_counts(self) -> dict[str, int]:
        """Step reuse (session path) and DBCache (full path) totals as of the last refresh (at most one a second,
        at the end of a frame, under the editor's lock): some are counted on the device, and reading them back
        per frame would cost a host sync each. Never waits for a frame."""
        return dict(self._reuse_counts)

    def _refresh_reuse_counts(self) -> None:
        now = time.monotonic()
        if now - self._reuse_counts_at < 1.0:
            return
        self._reuse_counts_at, counts = now, {}
        if self.step_reuse is not None:
            reuse = self.step_reuse.stats()
            counts.update(steps_reuse_allowed=sum(reuse["allowed"].values()),
                          steps_reused=sum(reuse["reused"].values()))
        if self.dbcache is not None:
            groups = self.dbcache.stats()["groups"].values()
            counts.update(dbcache_steps=sum(g["steps"] for g in groups),
                          dbcache_cached_steps=sum(g["cached_steps"] for g in groups))
        self._reuse_counts = counts

    def stats(self) -> dict:
        return {
            "attention_backend": self.attention.active if self.attention else "native (not probed)",
            "attention": self.attention.stats() if self.attention else {"chosen": "native (not probed)"},
            "dbcache": self.dbcache.stats() if self.dbcache else {"enabled": False},
            "step_reuse": self.step_reuse.stats() if self.step_reuse else {"enabled": False},
            "compile": self.compiled.stats() if self.compiled else {"enabled": False},
            "cuda_graphs": self.graphs.stats() if self.graphs else {"enabled": False},
            "fp8": self.fp8 or {"enabled": False},
            "image_codec": {**self.jpeg_stats, **{k.split(":", 1)[1]: v for k, v in self._counts.items()
                                                  if k.startswith("jpeg:")}},
            "warm_up": self.warm,
            "startup_s": dict(self.startup),
            "device_failure": self.device_failure,
            "edits": self._counts["edits"],
            "errors": {k.split(":", 1)[1]: v for k, v in self._counts.items() if k.startswith("error:")},
            "prompt_cache": self.prompt_cache.stats(),
            "latent_id_cache_entries": len(self.latent_ids),
            "timestep_cache_entries": len(self.timestep_cache),
            "noise_cache": self.noise.stats(),
            "causal": self.mode,
            "sessions": len(self.sessions),
            "kv_store": self.kv_store.stats() if self.kv_store is not None else {"enabled": False},
        }
