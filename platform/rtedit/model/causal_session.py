"""The `session` mode's forward over diffusers' blocks: the masked single pass and the three cached passes.

T and R attend to T and R; I attends to T, R and I; X attends to everything; T, R and I are modulated at the
condition timestep, X at the step's. So T's and R's keys and values depend on the instruction and references only
(`encode_session`, once per session), I's on those and the frame (`encode_frame`, once per frame), and each
denoising step runs X alone against them (`session_step`). `session_velocity` is the same model as one masked pass
over every token: what a student trains with, and the reference the cached passes are held to.

diffusers' Flux2Transformer2DModel.forward has no three-group mask, no text modulated at another timestep and no
pass without the text stream, so this module reimplements only its glue (embedders, modulations, RoPE, the two
block loops, the output layer) around diffusers' own block modules. A pass without text gives the blocks an empty
text stream, which runs them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rtedit.errors import ConfigError
from rtedit.model.causal_attention import (
    LayerKV,
    LayerPass,
    Span,
    check_spans,
    require_causal_processors,
)
from rtedit.model.inputs import TokenLayout, transformer_inputs
from rtedit.model.step_reuse import FrameReuse


@dataclass(frozen=True)
class SessionCache:
    """T's and R's keys and values in every attention layer (double blocks, then single blocks), per session."""

    layers: tuple[LayerKV, ...]
    condition_timestep: float
    text_tokens: int
    reference_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.layers)


@dataclass(frozen=True)
class FrameCache:
    """T's, R's and I's keys and values per layer: the prefix every denoising step of one frame attends to.

    It holds them concatenated (a copy of the session's part), so a step is one attention call per layer.
    """

    layers: tuple[LayerKV, ...]
    condition_timestep: float
    input_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.layers)


@dataclass(frozen=True)
class _Modulation:
    """The raw shift/scale/gate parameters at one timestep, for the three modulated places of the model."""

    image: torch.Tensor  # double blocks' image stream [B, 6D]
    text: torch.Tensor  # double blocks' text stream [B, 6D]
    single: torch.Tensor  # single blocks [B, 3D]


def _embed_time(transformer, sigma: torch.Tensor) -> torch.Tensor:
    """The timestep embedding of sigma in [0, 1], as the forward computes it (1000 x sigma, no guidance)."""
    return transformer.time_guidance_embed(sigma * 1000, None)


def _modulation(transformer, temb: torch.Tensor) -> _Modulation:
    return _Modulation(transformer.double_stream_modulation_img(temb), transformer.double_stream_modulation_txt(temb),
                       transformer.single_stream_modulation(temb))


def _at_condition(transformer, condition_timestep: float, like: torch.Tensor) -> _Modulation:
    """Modulation at the condition timestep, one per sample of `like` ([B] sigmas): every pass builds it alike."""
    return _modulation(transformer, _embed_time(transformer, torch.full_like(like, condition_timestep)))


def _per_token(parts: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Raw modulation per token, [B, n1 + n2..., k], for groups modulated at different timesteps.

    diffusers blends only its [ref, img] and [txt, ref, img] layouts; `Flux2Modulation.split` chunks the last
    dimension, so repeating each group's raw parameters over its tokens is the same thing for any layout.
    """
    batch = max(mod.shape[0] for mod, _ in parts)
    return torch.cat([mod.unsqueeze(1).expand(batch, n, -1) for mod, n in parts if n], dim=1)


def _block(transformer, block, *args):
    # diffusers' forward checkpoints blocks when training asks for it; a student trains through this forward too.
    if torch.is_grad_enabled() and transformer.gradient_checkpointing:
        return transformer._gradient_checkpointing_func(block, *args)
    return block(*args)


def _run_blocks(transformer, image: torch.Tensor, text: torch.Tensor, mod_image: torch.Tensor, mod_text: torch.Tensor,
                mod_single: torch.Tensor, rotary, layers: Sequence[LayerPass],
                reuse: FrameReuse | None = None) -> torch.Tensor:
    """diffusers' two block loops with one LayerPass per attention layer; returns the joint stream [text, image].

    `reuse` (X's pass only, whose text stream is empty) may replace each group's middle blocks by the last computed
    step's residual (rtedit.model.step_reuse)."""
    if reuse is not None and text.shape[1]:
        raise ConfigError("step reuse applies to X's pass alone, which has no text stream")
    streams = {"text": text}

    def double(block, layer):
        def run(image_stream: torch.Tensor) -> torch.Tensor:
            streams["text"], image_stream = _block(transformer, block, image_stream, streams["text"], mod_image,
                                                   mod_text, rotary, {"causal": layer})
            return image_stream
        return run

    def single(block, layer):
        return lambda hidden: _block(transformer, block, hidden, None, mod_single, rotary, {"causal": layer})

    doubles = transformer.transformer_blocks
    image = _run_group(reuse, "transformer_blocks", [double(b, lay) for b, lay in zip(doubles, layers)], image)
    hidden = torch.cat([streams["text"], image], dim=1)
    singles = [single(b, lay) for b, lay in zip(transformer.single_transformer_blocks, layers[len(doubles):])]
    return _run_group(reuse, "single_transformer_blocks", singles, hidden)


def _run_group(reuse: FrameReuse | None, name: str, blocks, hidden: torch.Tensor) -> torch.Tensor:
    if reuse is not None:
        return reuse.run(name, blocks, hidden)
    for block in blocks:
        hidden = block(hidden)
    return hidden


def _layer_count(transformer) -> int:
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def _output(transformer, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    return transformer.proj_out(transformer.norm_out(hidden, temb))


def _empty(like: torch.Tensor) -> torch.Tensor:
    # A group that is cached (or absent) enters a pass as an empty stream, which runs diffusers' blocks unchanged.
    return like.new_zeros(like.shape[0], 0, like.shape[2])


def _references_block(layout: TokenLayout) -> slice | None:
    refs = layout.references
    return slice(refs[0].start, refs[-1].stop) if refs else None


def session_spans(layout: TokenLayout) -> tuple[Span, ...]:
    """The session mask over the masked pass's joint sequence: text stream T, then the layout's image stream."""
    text = slice(0, layout.text_tokens)

    def joint(s: slice) -> slice:
        return slice(layout.text_tokens + s.start, layout.text_tokens + s.stop)

    refs = _references_block(layout)
    session = (text,) + ((joint(refs),) if refs is not None else ())
    spans = [Span(session, session)]
    if layout.input is not None:
        spans.append(Span((joint(layout.input),), session + (joint(layout.input),)))
    spans.append(Span((joint(layout.target),), (slice(0, layout.text_tokens + layout.img_ids.shape[0]),)))
    return tuple(spans)


def _condition_timestep(layout: TokenLayout) -> float:
    if layout.condition_timestep is None:
        raise ConfigError("the session mode modulates T, R and I at a condition timestep: build the layout with "
                          "token_layout(..., order='conditions_first', condition_timestep=...)")
    return float(layout.condition_timestep)


def session_velocity(transformer, layout: TokenLayout, target: torch.Tensor, conditions: torch.Tensor | None,
                     timestep: torch.Tensor, prompt_embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The masked single pass over T, I, R and X: the velocity of X [B, N, C] (arguments as transformer_inputs)."""
    require_causal_processors(transformer, "session")
    ct = _condition_timestep(layout)
    inputs = transformer_inputs(layout, target, conditions, timestep, prompt_embeds, dtype)
    sigma = inputs["timestep"]
    temb = _embed_time(transformer, sigma)
    step, cond = _modulation(transformer, temb), _at_condition(transformer, ct, sigma)
    # The image stream in the layout's order: conditions at the condition timestep, X at the step's.
    groups = sorted([(layout.conditions, cond), (layout.target, step)], key=lambda g: g[0].start)
    mod_image = _per_token([(mod.image, s.stop - s.start) for s, mod in groups])
    mod_single = _per_token([(cond.single, layout.text_tokens)] + [(mod.single, s.stop - s.start) for s, mod in groups])
    spans = session_spans(layout)
    check_spans(spans, layout.text_tokens + layout.img_ids.shape[0])
    rotary = transformer.pos_embed(torch.cat([layout.text_ids, layout.img_ids]))
    hidden = _run_blocks(transformer, transformer.x_embedder(inputs["hidden_states"]),
                         transformer.context_embedder(inputs["encoder_hidden_states"]), mod_image, cond.text,
                         mod_single, rotary, [LayerPass(spans=spans)] * _layer_count(transformer))
    x = slice(layout.text_tokens + layout.target.start, layout.text_tokens + layout.target.stop)
    return _output(transformer, hidden[:, x], temb)


def encode_session(transformer, layout: TokenLayout, references: torch.Tensor | None, prompt_embeds: torch.Tensor,
                   dtype: torch.dtype) -> SessionCache:
    """T's and R's keys and values: prompt_embeds [B, L, D_text], references [B, M_R, C] (all R, packed) or None."""
    require_causal_processors(transformer, "session")
    ct = _condition_timestep(layout)
    refs = _references_block(layout)
    count = 0 if references is None else references.shape[1]
    if count != (0 if refs is None else refs.stop - refs.start) or prompt_embeds.shape[1] != layout.text_tokens:
        raise ConfigError(f"{prompt_embeds.shape[1]} text and {count} reference tokens, the layout has "
                          f"{layout.text_tokens} and {layout.references}")
    text = transformer.context_embedder(prompt_embeds.to(dtype))
    image = _empty(text) if references is None else transformer.x_embedder(references.to(dtype))
    cond = _at_condition(transformer, ct, torch.zeros(text.shape[0], dtype=dtype, device=text.device))
    ids = [layout.text_ids] + ([layout.ids(refs)] if refs is not None else [])
    layers = [LayerPass(keep=True) for _ in range(_layer_count(transformer))]
    _run_blocks(transformer, image, text, cond.image, cond.text, cond.single, transformer.pos_embed(torch.cat(ids)),
                layers)
    return SessionCache(tuple(layer.kept for layer in layers), ct, layout.text_tokens, count)


def encode_frame(transformer, session: SessionCache, layout: TokenLayout, input_tokens: torch.Tensor,
                 dtype: torch.dtype) -> FrameCache:
    """I's keys and values against the session's: input_tokens [B, M_I, C]; returns the frame's T, R, I prefix."""
    require_causal_processors(transformer, "session")
    if layout.input is None or input_tokens is None:
        raise ConfigError("a session frame needs an input image (the layout's first condition)")
    refs = _references_block(layout)
    mismatch = (input_tokens.shape[1] != layout.input.stop - layout.input.start
                or layout.text_tokens != session.text_tokens
                or (0 if refs is None else refs.stop - refs.start) != session.reference_tokens
                or _condition_timestep(layout) != session.condition_timestep)
    if mismatch:
        raise ConfigError(f"the frame (layout {layout.input}, {input_tokens.shape[1]} input tokens, condition "
                          f"timestep {layout.condition_timestep}) does not fit the session ({session.text_tokens} "
                          f"text, {session.reference_tokens} reference tokens, {session.condition_timestep})")
    image = transformer.x_embedder(input_tokens.to(dtype))
    cond = _at_condition(transformer, session.condition_timestep,
                         torch.zeros(image.shape[0], dtype=dtype, device=image.device))
    layers = [LayerPass(past=kv, keep=True) for kv in session.layers]
    _run_blocks(transformer, image, _empty(image), cond.image, cond.text, cond.single,
                transformer.pos_embed(layout.ids(layout.input)), layers)
    prefix = tuple(kv.then(layer.kept) for kv, layer in zip(session.layers, layers))
    return FrameCache(prefix, session.condition_timestep, input_tokens.shape[1])


def session_step(transformer, frame: FrameCache, layout: TokenLayout, target: torch.Tensor, timestep: torch.Tensor,
                 dtype: torch.dtype, reuse: FrameReuse | None = None) -> torch.Tensor:
    """One denoising step's velocity of X [B, N, C] from X alone against the frame's cache (timestep: [B] sigma);
    `reuse`: the frame's step-2 reuse state, when the editor has it on."""
    require_causal_processors(transformer, "session")
    if target.shape[1] != layout.target.stop - layout.target.start:
        raise ConfigError(f"{target.shape[1]} target tokens, the layout has {layout.target}")
    if reuse is not None:
        reuse.begin_step()
    image = transformer.x_embedder(target.to(dtype))
    temb = _embed_time(transformer, timestep.to(dtype))
    step = _modulation(transformer, temb)
    hidden = _run_blocks(transformer, image, _empty(image), step.image, step.text, step.single,
                         transformer.pos_embed(layout.ids(layout.target)), [LayerPass(past=kv) for kv in frame.layers],
                         reuse)
    return _output(transformer, hidden, temb)
