"""The transformer's inputs for one step, built in one place for serving and training alike.

Token groups: T (instruction text, its own stream), X (the noisy target), I (the input image) and R (references).
The image stream holds X and the condition images (I, then each R) in one of two orders:
- "targets_first": X, I, R..., as Flux2KleinPipeline feeds them (the exact path);
- "conditions_first": I, R..., X, as diffusers' KV path expects them (`num_ref_tokens` leading tokens).
A `TokenLayout` says where each group sits and carries its position ids; it depends only on shapes, so a frame
builds it once and every step reuses it. `transformer_inputs` then assembles the forward's keyword arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from rtedit.errors import ConfigError

Order = Literal["targets_first", "conditions_first"]
ORDERS: tuple[str, ...] = ("targets_first", "conditions_first")


@dataclass(frozen=True)
class TokenLayout:
    """Where T, X, I and R sit: slices into the image stream (T is the text stream) and their position ids."""

    order: str
    text_ids: torch.Tensor  # [L, 4]
    img_ids: torch.Tensor  # [N + M, 4] in stream order
    target: slice  # X
    input: slice | None  # I (None when a step has no condition image)
    references: tuple[slice, ...]  # R, one slice per reference image
    condition_timestep: float | None = None  # I and R modulated at this timestep instead of the step's

    @property
    def text_tokens(self) -> int:
        return self.text_ids.shape[0]

    @property
    def conditions(self) -> slice:
        """I and every R together (contiguous in both orders)."""
        groups = ([self.input] if self.input is not None else []) + list(self.references)
        if not groups:
            return slice(self.target.start, self.target.start)
        return slice(groups[0].start, groups[-1].stop)

    @property
    def condition_tokens(self) -> int:
        return self.conditions.stop - self.conditions.start

    def to(self, device: torch.device | str) -> "TokenLayout":
        return dataclasses.replace(self, text_ids=self.text_ids.to(device), img_ids=self.img_ids.to(device))

    def ids(self, group: slice) -> torch.Tensor:
        """The position ids of one group, e.g. `layout.ids(layout.target)`."""
        return self.img_ids[group]


def _flat_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    # The forward uses ids[0] of a batched tensor: every sample of a batch shares one layout.
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[1] != 4:
        raise ConfigError(f"{what} must be [n, 4] or [1, n, 4] position ids, got {list(ids.shape)}")
    return ids


def token_layout(target_ids: torch.Tensor, condition_ids: Sequence[torch.Tensor], text_ids: torch.Tensor,
                 order: str = "targets_first", condition_timestep: float | None = None) -> TokenLayout:
    """The layout of X (target_ids), the condition images (input first, then references) and the text.

    `condition_timestep` modulates I and R at a fixed timestep; diffusers applies it to leading condition tokens
    only (its KV "extract" mode), so it needs `order="conditions_first"`.
    """
    if order not in ORDERS:
        raise ConfigError(f"token order must be one of {ORDERS}, got {order!r}")
    if condition_timestep is not None and order != "conditions_first":
        raise ConfigError("a separate condition timestep needs order='conditions_first': diffusers' forward "
                          "modulates leading condition tokens only")
    target_ids = _flat_ids(target_ids, "target ids")
    conditions = [_flat_ids(ids, f"condition {i} ids") for i, ids in enumerate(condition_ids)]
    n, sizes = target_ids.shape[0], [c.shape[0] for c in conditions]
    start = n if order == "targets_first" else 0
    groups = []
    for size in sizes:
        groups.append(slice(start, start + size))
        start += size
    target = slice(0, n) if order == "targets_first" else slice(start, start + n)
    parts = [target_ids, *conditions] if order == "targets_first" else [*conditions, target_ids]
    return TokenLayout(order=order, text_ids=_flat_ids(text_ids, "text ids"), img_ids=torch.cat(parts, dim=0),
                       target=target, input=groups[0] if groups else None, references=tuple(groups[1:]),
                       condition_timestep=condition_timestep)


def transformer_inputs(layout: TokenLayout, target: torch.Tensor, conditions: torch.Tensor | None,
                       timestep: torch.Tensor, prompt_embeds: torch.Tensor, dtype: torch.dtype) -> dict:
    """Keyword arguments of `Flux2Transformer2DModel.forward` for one step.

    target [B, N, C] noisy tokens; conditions [B, M, C] the condition images' tokens (input then references, as
    packed) or None; timestep [B] (or [1]) sigma in [0, 1]; prompt_embeds [B, L, D]. The velocity of X is
    `output[:, layout.target]`.
    """
    if target.shape[1] != layout.target.stop - layout.target.start:
        raise ConfigError(f"{target.shape[1]} target tokens, the layout has {layout.target}")
    m = 0 if conditions is None else conditions.shape[1]
    if m != layout.condition_tokens:
        raise ConfigError(f"{m} condition tokens, the layout has {layout.condition_tokens}")
    if prompt_embeds.shape[1] != layout.text_tokens:
        raise ConfigError(f"{prompt_embeds.shape[1]} text tokens, the layout has {layout.text_tokens}")
    stream = [target] if conditions is None else (
        [target, conditions] if layout.order == "targets_first" else [conditions, target])
    kwargs = dict(
        hidden_states=torch.cat(stream, dim=1).to(dtype) if len(stream) > 1 else stream[0].to(dtype),
        timestep=timestep.to(dtype),
        guidance=None,
        encoder_hidden_states=prompt_embeds.to(dtype),
        txt_ids=layout.text_ids,
        img_ids=layout.img_ids,
        return_dict=False,
    )
    if layout.condition_timestep is not None:
        kwargs.update(num_ref_tokens=layout.condition_tokens, ref_fixed_timestep=float(layout.condition_timestep))
    return kwargs
