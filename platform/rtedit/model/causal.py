"""The causal forwards of the engine, both modes, on the one transformer-input builder (rtedit.model.inputs).

Token groups: T the instruction (the text stream), R the references, I the input image (the frame), X the target.
- "kv" (BFL's klein-9B-KV design, on diffusers' forward and processors unchanged): the condition images I and R, as
  one group, attend to themselves only; T and X attend to everything; the conditions are modulated at the condition
  timestep, T and X at the step's. Per frame, step 1 extracts the conditions' K/V (`kv_extract`, diffusers' "extract"
  mode) and later steps run T and X against them (`kv_step`, its "cached" mode).
- "session" (ours, rtedit.model.causal_session): T and R attend to T and R, I to T, R and I, X to everything; T, R
  and I are modulated at the condition timestep. T and R K/V once per session, I's once per frame, X alone per step.

`causal_velocity` is the masked single pass of either mode (every token, the mode's mask and modulation): what a
student trains with and the reference of the cached path. `causal_denoise` runs a frame's Euler steps. Layouts come
from `token_layout(..., order="conditions_first", condition_timestep=...)`; the mode's attention processors must be
installed first (`install_causal_processors`), and every pass checks that they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

from rtedit.errors import ConfigError
from rtedit.model.causal_attention import (  # noqa: F401  (re-exported: the causal API in one place)
    MODES,
    LayerKV,
    LayerPass,
    Mode,
    causal_processors,
    check_mode,
    install_causal_processors,
    require_causal_processors,
    restore_processors,
)
from rtedit.model.causal_session import (  # noqa: F401
    FrameCache,
    SessionCache,
    encode_frame,
    encode_session,
    session_spans,
    session_step,
    session_velocity,
)
from rtedit.model.inputs import TokenLayout, token_layout, transformer_inputs
from rtedit.model.schedule import euler_step
from rtedit.model.step_reuse import FrameReuse, StepReuse


def check_causal_layout(layout: TokenLayout) -> None:
    """Both modes put the conditions first and modulate them at a fixed timestep; without one, diffusers' forward
    would get no `num_ref_tokens` and run full attention."""
    if layout.order != "conditions_first" or layout.condition_timestep is None:
        raise ConfigError(f"a causal layout needs order='conditions_first' and a condition_timestep, got order "
                          f"{layout.order!r}, condition_timestep {layout.condition_timestep!r}")


def split_conditions(layout: TokenLayout, conditions: torch.Tensor | None):
    """(I's tokens, all R's tokens) of a frame's packed conditions [B, M, C] (input first); either may be None."""
    base = layout.conditions.start
    refs = layout.references

    def part(start: int, stop: int) -> torch.Tensor:
        return conditions[:, start - base:stop - base]

    image = part(layout.input.start, layout.input.stop) if layout.input is not None else None
    references = part(refs[0].start, refs[-1].stop) if refs else None
    return image, references


def target_layout(layout: TokenLayout) -> TokenLayout:
    """The layout of X alone with the same text (kv's cached steps feed T and X only)."""
    return token_layout(layout.ids(layout.target), [], layout.text_ids)


# ---- kv ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVFrameCache:
    """The conditions' K/V of every layer for one frame (diffusers' cache; None when the frame has no conditions)."""

    cache: Flux2KVCache | None

    @property
    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        layers = self.cache.double_block_caches + self.cache.single_block_caches
        return sum(c.k_ref.nbytes + c.v_ref.nbytes for c in layers if c.k_ref is not None)


def kv_extract(transformer, layout: TokenLayout, target: torch.Tensor, conditions: torch.Tensor | None,
               timestep: torch.Tensor, prompt_embeds: torch.Tensor, dtype: torch.dtype):
    """kv's masked single pass over T, I, R and X (diffusers' "extract" mode): (velocity of X, the frame's cache)."""
    require_causal_processors(transformer, "kv")
    check_causal_layout(layout)
    inputs = transformer_inputs(layout, target, conditions, timestep, prompt_embeds, dtype)
    velocity, cache = transformer(**inputs, kv_cache_mode="extract")  # extract mode returns X's tokens alone
    return velocity, KVFrameCache(cache)


def kv_step(transformer, frame: KVFrameCache, layout: TokenLayout, target: torch.Tensor, timestep: torch.Tensor,
            prompt_embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A later step: T and X against the frame's cached condition K/V (diffusers' "cached" mode)."""
    require_causal_processors(transformer, "kv")
    inputs = transformer_inputs(target_layout(layout), target, None, timestep, prompt_embeds, dtype)
    if frame.cache is None:  # no condition tokens: nothing is cached, and T with X is plain attention
        return transformer(**inputs)[0]
    return transformer(**inputs, kv_cache=frame.cache, kv_cache_mode="cached")[0]


# ---- both modes --------------------------------------------------------------------------------------------------
def probe_inputs(mode: str, layout: TokenLayout, inputs: dict) -> dict:
    """The mode's masked pass as `transformer(**inputs)` kwargs (the attention probe times a plain forward): kv's
    extract pass, or the session mask on diffusers' forward (its modulation is not the session's: shapes only)."""
    check_mode(mode)
    check_causal_layout(layout)
    if mode == "kv":
        return {**inputs, "kv_cache_mode": "extract"}
    return {**inputs, "joint_attention_kwargs": {"causal": LayerPass(spans=session_spans(layout))}}


def causal_velocity(transformer, mode: str, layout: TokenLayout, target: torch.Tensor,
                    conditions: torch.Tensor | None, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The mode's masked single pass: the velocity of X [B, N, C] (arguments as transformer_inputs takes them)."""
    check_mode(mode)
    if mode == "kv":
        return kv_extract(transformer, layout, target, conditions, timestep, prompt_embeds, dtype)[0]
    check_causal_layout(layout)
    return session_velocity(transformer, layout, target, conditions, timestep, prompt_embeds, dtype)


def _kv_velocities(transformer, layout, conditions, prompt_embeds, dtype):
    frame: KVFrameCache | None = None

    def velocity(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal frame
        if frame is None:  # step 1 extracts the conditions' K/V while it computes its velocity
            v, frame = kv_extract(transformer, layout, latents, conditions, sigma, prompt_embeds, dtype)
            return v
        return kv_step(transformer, frame, layout, latents, sigma, prompt_embeds, dtype)

    return velocity


def _session_velocities(transformer, layout, conditions, prompt_embeds, dtype, session: SessionCache | None,
                        reuse: FrameReuse | None):
    check_causal_layout(layout)
    image, references = split_conditions(layout, conditions)
    if session is None:
        session = encode_session(transformer, layout, references, prompt_embeds, dtype)
    frame = encode_frame(transformer, session, layout, image, dtype)
    return lambda latents, sigma: session_step(transformer, frame, layout, latents, sigma, dtype, reuse)


def causal_denoise(transformer, mode: str, layout: TokenLayout, target: torch.Tensor,
                   conditions: torch.Tensor | None, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                   sigmas: torch.Tensor, dtype: torch.dtype, *, session: SessionCache | None = None,
                   cached: bool = True, before_step: Callable[[int], None] | None = None,
                   reuse: StepReuse | None = None) -> torch.Tensor:
    """A frame's Euler steps from the noise `target` [B, N, C]; returns the denoised latents of X.

    timesteps: the scheduler's (1000 x sigma) [steps]; sigmas [steps + 1]. `session`: the mode "session" cache of
    this instruction and these references (encoded here when None; `prompt_embeds` is then unused). `cached=False`
    runs the masked single pass at every step instead (the reference). `before_step(i)` runs before step i (the
    Editor's cancellation check). `reuse`: the session mode's step-2 reuse of X's block residuals
    (rtedit.model.step_reuse), a ConfigError with the other paths.
    """
    check_mode(mode)
    if reuse is not None and (mode != "session" or not cached):
        raise ConfigError(f"step reuse runs the session mode's cached X pass only (mode {mode!r}, cached={cached})")
    if not cached:
        def velocity(latents, sigma):
            return causal_velocity(transformer, mode, layout, latents, conditions, sigma, prompt_embeds, dtype)
    elif mode == "kv":
        velocity = _kv_velocities(transformer, layout, conditions, prompt_embeds, dtype)
    else:
        velocity = _session_velocities(transformer, layout, conditions, prompt_embeds, dtype, session,
                                       None if reuse is None else reuse.frame(len(timesteps)))
    latents = target
    for i, t in enumerate(timesteps):
        if before_step is not None:
            before_step(i)
        sigma = t.expand(latents.shape[0]).to(latents.dtype) / 1000  # as the pipelines pass it
        latents = euler_step(latents, velocity(latents, sigma), sigmas[i], sigmas[i + 1])
    return latents
