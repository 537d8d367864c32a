"""The Editor's fast path, built from its EditorConfig in one place and one order, and its warm-up.

Order: the JPEG codec (rtedit.jpeg_codec), a causal mode's attention processors, FP8 layers, the attention probe,
DBCache (the session mode's own step reuse in its place), selective compile, then the warm-up of every bucket. The
probe switches attention processors and the compiled graphs must see the final processors and cache hooks, so
nothing may be attached in another order (benchmarks build their rows through Editor.from_config).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtedit.errors import ConfigError
from rtedit.frame_request import FrameRequest
from rtedit.model.causal import install_causal_processors, probe_inputs
from rtedit.prompts import PromptEmbedding

if TYPE_CHECKING:
    from rtedit.editor import Editor

logger = logging.getLogger(__name__)


def gray(height: int, width: int) -> np.ndarray:
    """A plain frame for probes and warm-ups."""
    return np.full((height, width, 3), 128, np.uint8)


@contextlib.contextmanager
def startup_phase(editor: "Editor", name: str) -> Iterator[None]:
    """Times one start-up phase into `editor.startup` (seconds) and logs its start and end, so a start-up cut short
    by a time limit or a health check still says which phase it was in."""
    logger.info("start-up: %s ...", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        editor.startup[name] = round(time.perf_counter() - start, 2)
        logger.info("start-up: %s took %.1f s", name, editor.startup[name])


def build(editor: "Editor") -> None:
    """Attention probe, then DBCache, then selective compile and the warm-up of every bucket, in that order:
    the probe switches attention processors, and compiled graphs must see the final processors and hooks. A
    causal mode's processors go in first (the probe then times them and sets their backend)."""
    cfg = editor.config
    if cfg.image_codec != "host":
        from rtedit.jpeg_codec import select_codec

        editor.jpeg, editor.jpeg_stats = select_codec(cfg.image_codec, editor.device)
    if editor.mode is not None:
        if cfg.dbcache.enabled and editor.mode == "kv":
            raise ConfigError(f"dbcache does not combine with the causal mode 'kv' of {editor.bundle.name}: "
                              "cache-dit replaces the block loop and breaks diffusers' KV cache; the session mode "
                              "has its own step-2 reuse")
        install_causal_processors(editor.transformer, editor.mode)
    if cfg.fp8.enabled:  # before the probe and the compile: both must see the FP8 layers
        from rtedit.accel.fp8 import quantize_blocks

        with startup_phase(editor, "fp8"):
            editor.fp8 = quantize_blocks(editor.transformer, cfg.fp8)
    if cfg.select_attention:
        with startup_phase(editor, "attention probe"):
            editor.attention = probe_attention(editor)
    if cfg.dbcache.enabled and editor.mode == "session":  # the session X pass's own reuse, not cache-dit
        from rtedit.accel.dbcache import block_groups
        from rtedit.model.step_reuse import StepReuse

        groups = {name: len(blocks) for name, blocks in block_groups(editor.transformer).items()}
        editor.step_reuse = StepReuse(cfg.dbcache, groups, editor.device)
    elif cfg.dbcache.enabled:
        from rtedit.accel.dbcache import attach_cache

        editor.dbcache = attach_cache(editor.transformer, cfg.dbcache)
    if cfg.compile.enabled:
        from rtedit.accel.compile import compile_regions

        autoencoder = editor.codec.taef2 if editor.codec.taef2 is not None else editor.vae
        editor.compiled = compile_regions(cfg.compile, transformer=editor.transformer,
                                          vae_encoder=autoencoder.encoder, vae_decoder=autoencoder.decoder)
        editor.codec.reference_context = functools.partial(editor.compiled.eager, "vae_encoder")
    if cfg.cuda_graphs:
        from rtedit.accel.cuda_graphs import StageGraphs, conditional_nodes_unavailable

        editor.graphs = StageGraphs(editor.device)
        dynamic = cfg.dbcache.enabled and cfg.dbcache.policy == "dynamic"
        if dynamic and editor.dbcache is not None and cfg.dbcache.taylorseer_order:
            editor.graphs.leave_out("denoise", "cache-dit's TaylorSeer keeps its extrapolation state in Python, "
                                    "which a replayed graph does not run, so its dynamic check is not captured")
        elif dynamic:
            if editor.dbcache is not None:  # cache-dit's check, made capturable (ConfigError on another version)
                from rtedit.accel.dbcache_graphs import decide_on_device

                decide_on_device(editor.dbcache)
            # both checks go through rtedit.accel.cuda_graphs.branch inside the denoise stage's capture
            if why := conditional_nodes_unavailable():
                logger.info("CUDA graphs: the dynamic %s check is read on the host between graph segments of the "
                            "denoise stage (%s)", "DBCache" if editor.dbcache is not None else "step-reuse", why)
    if editor.compiled is not None or editor.graphs is not None:
        editor.warm_up()  # every bucket compiled and captured now: no request ever compiles or captures


def probe_attention(editor: "Editor"):
    """The start-up kernel probe on one real step at the largest bucket (attention cost grows fastest there)."""
    from rtedit.accel.attention_probe import select_attention_backend

    cfg = editor.config
    h, w = max(cfg.buckets.sizes, key=lambda s: s[0] * s[1]) if cfg.buckets.sizes else (512, 512)
    request = FrameRequest(gray(h, w), warm_prompt(editor), (gray(h, w),) * max(cfg.buckets.references),
                           height=h, width=w)
    with torch.inference_mode():
        plan = editor._prepare(request)
        sample = plan.step_inputs(plan.latents, plan.timesteps[0], editor.dtype)
        if editor.mode is not None:  # the mode's masked pass: the attention calls its frames make
            sample = probe_inputs(editor.mode, plan.layout, sample)
        return select_attention_backend(editor.transformer, sample, config=cfg.attention)


def warm_buckets(editor: "Editor") -> list[tuple[int, int, int]]:
    """(height, width, references) of every shape this editor serves; the model's native size when the config
    lists no buckets."""
    buckets = editor.config.buckets
    if buckets.sizes:
        return [(h, w, r) for (h, w) in buckets.sizes for r in buckets.references]
    side = editor.bundle.sidecar.native_size or max(64, editor.config.images.min_side)
    return [(side, side, 0)]


def warm_up(editor: "Editor", passes: int = 2) -> dict:
    """Runs every bucket `passes` times at the served step count, so no request pays for lazy initialisation
    or compiles; zero prompt embeddings of the right shape where this process has no text encoder. A causal
    model warms whole causal frames (session mode: the T/R pass, I's pass and X's steps, as a session runs)."""
    def run(bucket: tuple[int, int, int], steps: int = editor.warm_steps) -> None:
        h, w, refs = bucket
        editor.edit(gray(h, w), warm_prompt(editor), references=[gray(h, w)] * refs, steps=steps, height=h, width=w)

    buckets = warm_buckets(editor)
    with startup_phase(editor, "warm-up (compiles)" if editor.compiled is not None else "warm-up"):
        if editor.compiled is not None:
            report = editor.compiled.warm_up(buckets, run, passes)
        else:
            for _ in range(passes):
                for bucket in buckets:
                    run(bucket)
            report = {"buckets": len(buckets)}
    if editor.graphs is not None and not editor.graphs.frozen:  # captured after the compiles, every served step count
        with startup_phase(editor, "graph capture"):
            editor.graphs.arm()
            for steps in sorted(set(editor.bundle.sidecar.steps or ()) | {editor.warm_steps}):
                for bucket in buckets:
                    run(bucket, steps)
            editor.graphs.freeze()
        report["cuda_graphs"] = editor.graphs.stats()
    editor.warm = {**report, "shapes": buckets, "steps": editor.warm_steps, "causal": editor.mode}
    return editor.warm


def warm_prompt(editor: "Editor") -> str | PromptEmbedding:
    """A prompt for probes and warm-ups; zeros of the right shape where this process has no text encoder."""
    if editor.prompt_encoder is not None:
        return "warm up"
    length = editor.config.prompt.max_length
    dim = editor.transformer.config.joint_attention_dim
    embeds = torch.zeros(1, length, dim, dtype=editor.dtype, device=editor.device)
    return PromptEmbedding(embeds, editor.latent_ids.text(length, editor.device), "warm-up")
