"""Attention layers of the causal modes: the `session` mode's processors, and installing either mode's processors.

`kv` runs diffusers' own processors (Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor) unchanged. `session`
needs what diffusers has not: a three-group mask (T and R see T and R; I sees T, R and I; X sees everything) and
passes over a subset of the tokens against cached keys and values. Its processors are diffusers' processor bodies
with the one attention call replaced by `grouped_attention`, which computes a block mask as one attention call per
group of queries (exact, mask-free, so every attention backend can run it).

Arguments reach a processor only through `joint_attention_kwargs`, and Flux2Attention.forward drops undeclared ones
with a mere warning (the layer then silently runs full attention). So the processors declare `causal`, and every
causal pass first checks that its mode's processors are installed (`require_causal_processors`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    _get_qkv_projections,
)

from rtedit.errors import ConfigError

Mode = Literal["kv", "session"]
MODES: tuple[str, ...] = ("kv", "session")


@dataclass(frozen=True)
class LayerKV:
    """One attention layer's keys and values for some tokens, after QK-norm and RoPE: [B, S, heads, head_dim]."""

    key: torch.Tensor
    value: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.key.shape[1]

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes

    def then(self, later: LayerKV) -> LayerKV:
        """These tokens followed by `later`'s (one contiguous prefix, so a step attends to it in one call)."""
        return LayerKV(torch.cat([self.key, later.key], dim=1), torch.cat([self.value, later.value], dim=1))


@dataclass(frozen=True)
class Span:
    """Queries that see the same keys: slices of the pass's joint sequence (text stream first, then image)."""

    queries: tuple[slice, ...]
    keys: tuple[slice, ...]


@dataclass
class LayerPass:
    """What one attention layer does in one pass of the session forward.

    spans: who attends to whom among the pass's tokens, covering every query once; () means all to all.
    past: cached keys and values every query of the pass also attends to (T, R, and I once a frame is encoded).
    keep: record this pass's keys and values in `kept` (the processor sets it: a layer returns hidden states only).
    """

    spans: tuple[Span, ...] = ()
    past: LayerKV | None = None
    keep: bool = False
    kept: LayerKV | None = None


def check_spans(spans: tuple[Span, ...], length: int) -> None:
    """Spans must cover each of `length` queries exactly once, or grouped_attention would drop or repeat tokens."""
    covered = sorted((s.start, s.stop) for span in spans for s in span.queries if s.stop > s.start)
    stops = [0] + [stop for _, stop in covered]
    if [start for start, _ in covered] != stops[:-1] or stops[-1] != length:
        raise ConfigError(f"attention spans {covered} do not cover the {length} queries exactly once")


def _take(x: torch.Tensor, slices: tuple[slice, ...], prefix: torch.Tensor | None = None) -> torch.Tensor:
    parts = ([prefix] if prefix is not None else []) + [x[:, s] for s in slices if s.stop > s.start]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: LayerPass,
                      backend=None) -> torch.Tensor:
    """Attention of one pass: [B, S, heads, head_dim] in and out, each span of queries over its keys and the past."""
    if layer.keep:
        # contiguous: a single block's V is a view into its fused QKV+MLP output, which it would otherwise keep alive.
        layer.kept = LayerKV(key.contiguous(), value.contiguous())
    past_k, past_v = (layer.past.key, layer.past.value) if layer.past is not None else (None, None)
    everything = (slice(0, query.shape[1]),)
    # Outputs by the start of their queries (plain dict and loops: torch.compile traces this, fullgraph).
    pieces: dict[int, torch.Tensor] = {}
    for span in layer.spans or (Span(everything, everything),):
        queries = tuple(s for s in span.queries if s.stop > s.start)
        if not queries:
            continue
        out = dispatch_attention_fn(_take(query, queries), _take(key, span.keys, past_k),
                                    _take(value, span.keys, past_v), backend=backend)
        for s, piece in zip(queries, out.split([s.stop - s.start for s in queries], dim=1)):
            pieces[s.start] = piece
    if len(pieces) == 1:
        return next(iter(pieces.values()))
    return torch.cat([pieces[start] for start in sorted(pieces)], dim=1)


class _SessionAttention:
    """The attention call both session processors share."""

    _attention_backend = None
    _parallel_config = None

    def _attend(self, query, key, value, attention_mask, causal: LayerPass | None) -> torch.Tensor:
        if causal is None:  # outside a session pass: exactly the stock processor's attention
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)
        if attention_mask is not None or self._parallel_config is not None:
            raise ConfigError("a session pass takes no attention mask and no context parallelism")
        return grouped_attention(query, key, value, causal, backend=self._attention_backend)


class SessionAttnProcessor(_SessionAttention):
    """Flux2AttnProcessor (double-stream blocks) with its attention call replaced by `grouped_attention`."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 causal: LayerPass | None = None):
        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(attn, hidden_states,
                                                                                encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            enc_query, enc_key, enc_value = (t.unflatten(-1, (-1, attn.head_dim))
                                             for t in (enc_query, enc_key, enc_value))
            enc_query, enc_key = attn.norm_added_q(enc_query), attn.norm_added_k(enc_key)
            query = torch.cat([enc_query, query], dim=1)
            key = torch.cat([enc_key, key], dim=1)
            value = torch.cat([enc_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask, causal).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text, hidden_states.shape[1] - text], dim=1)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return (hidden_states, encoder_hidden_states) if encoder_hidden_states is not None else hidden_states


class SessionParallelSelfAttnProcessor(_SessionAttention):
    """Flux2ParallelSelfAttnProcessor (single-stream blocks) with its attention call replaced by `grouped_attention`."""

    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None, causal: LayerPass | None = None):
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        # Split by the global QKV:MLP ratio, as diffusers does, so a column-sharded projection splits the same way.
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, attention_mask, causal).flatten(2, 3).to(query.dtype)

        hidden_states = torch.cat([hidden_states, attn.mlp_act_fn(mlp_hidden_states)], dim=-1)
        return attn.to_out(hidden_states)


_PROCESSORS = {
    "kv": (Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor),
    "session": (SessionAttnProcessor, SessionParallelSelfAttnProcessor),
}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"causal mode must be one of {MODES}, got {mode!r}")


def _attention_layers(transformer: torch.nn.Module, mode: str) -> Iterator[tuple[torch.nn.Module, type]]:
    check_mode(mode)
    double, single = _PROCESSORS[mode]
    for block in transformer.transformer_blocks:
        yield block.attn, double
    for block in transformer.single_transformer_blocks:
        yield block.attn, single


def install_causal_processors(transformer: torch.nn.Module, mode: str) -> dict[str, object]:
    """Puts the mode's processors on every attention layer; returns the previous ones, for `restore_processors`.

    Each new processor keeps the attention backend (and context-parallel config) its predecessor had, so the start-up
    probe's kernel choice survives. Both modes' processors compute full attention when called without their
    arguments, so the full (non-causal) forward is unchanged while they are installed.
    """
    previous = transformer.attn_processors
    for attn, cls in _attention_layers(transformer, mode):
        processor = cls()
        for name in ("_attention_backend", "_parallel_config"):
            if getattr(attn.processor, name, None) is not None:
                setattr(processor, name, getattr(attn.processor, name))
        attn.set_processor(processor)
    return previous


def restore_processors(transformer: torch.nn.Module, previous: dict[str, object]) -> None:
    """Puts back the processors `install_causal_processors` returned."""
    transformer.set_attn_processor(dict(previous))  # diffusers pops from the dict it is given


@contextmanager
def causal_processors(transformer: torch.nn.Module, mode: str):
    """The mode's processors for the duration of a `with` block (tests, one-off evaluations)."""
    previous = install_causal_processors(transformer, mode)
    try:
        yield transformer
    finally:
        restore_processors(transformer, previous)


def require_causal_processors(transformer: torch.nn.Module, mode: str) -> None:
    """Refuses to run a causal pass whose arguments the installed processors would drop (full attention)."""
    wrong = [type(attn.processor).__name__ for attn, cls in _attention_layers(transformer, mode)
             if not isinstance(attn.processor, cls)]
    if wrong:
        names = ", ".join(cls.__name__ for cls in _PROCESSORS[mode])
        raise ConfigError(f"causal mode {mode!r} needs {names} on every attention layer; {len(wrong)} layer(s) have "
                          f"{sorted(set(wrong))}: call install_causal_processors(transformer, {mode!r}) first")
